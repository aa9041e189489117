// torch-facing launchers of tree_attention, verify_tree_greedy and verify_tree_sampling (CPU and
// CUDA). The trees (parents), prefix lengths, tokens and uniforms are validated on the host for CPU
// tensors, and by the kernels for CUDA tensors (no host copy, no synchronisation: CUDA graphs can
// capture these ops): an error is then raised by the next torchspec call on that device
// (device_errors.h). Shapes, dtypes and devices are checked on the host in both cases.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "../common/tree.h"
#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "dispatch.h"

namespace torchspec {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// An int32 / int64 index tensor as a contiguous int64 tensor on its device.
at::Tensor as_index(const at::Tensor& t, const char* op, const char* name) {
  TORCHSPEC_CHECK_ARG(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, name,
                      " must be int64 (or int32), got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// parents [B, T] (int64, on the CPU): parents[b, 0] = -1 and 0 <= parents[b, j] < j for j > 0.
void check_trees(const at::Tensor& parents_host, const char* op) {
  const int64_t B = parents_host.size(0), T = parents_host.size(1);
  const int64_t* par = parents_host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCHSPEC_CHECK_ARG(par[b * T] == -1, op, "parents[", b, ", 0] must be -1 (node 0 is the root), got ", par[b * T]);
    for (int64_t j = 1; j < T; ++j) {
      const int64_t a = par[b * T + j];
      TORCHSPEC_CHECK_ARG(a != -1, op, "parents[", b, ", ", j, "] = -1: a second root (only node 0 may be a root)");
      TORCHSPEC_CHECK_ARG(a >= 0 && a < j, op, "parents[", b, ", ", j, "] = ", a,
                          ": a node's parent must be an earlier node (0 <= parent < ", j, ")");
    }
  }
}

// Shape and dtype checks of parents against the batch and node counts; returns it as int64.
at::Tensor checked_parents(const at::Tensor& parents, int64_t B, int64_t T, const char* t_source, const char* op) {
  TORCHSPEC_CHECK_ARG(parents.dim() == 2, op, "parents must be 2-D [B, T], got ", parents.dim(), " dimensions");
  TORCHSPEC_CHECK_ARG(parents.size(0) == B, op, "parents must be [B, T] with B = ", B, ", got ", parents.sizes());
  TORCHSPEC_CHECK_ARG(parents.size(1) == T, op, "parents has T = ", parents.size(1), " nodes but ", t_source, " has ",
                      T, " (T mismatch)");
  return as_index(parents, op, "parents");
}

at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_lens,
                          const at::Tensor& parents, std::optional<double> scale) {
  constexpr const char* op = "tree_attention";
  TORCHSPEC_CHECK_ARG(q.dim() == 4, op, "q must be 4-D [B, Hq, T, D], got ", q.dim(), " dimensions");
  TORCHSPEC_CHECK_ARG(k.dim() == 4, op, "k must be 4-D [B, Hkv, S, D], got ", k.dim(), " dimensions");
  TORCHSPEC_CHECK_ARG(v.sizes() == k.sizes(), op, "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  check_device_supported(q, op, "q");
  check_same_device(q, "q", k, "k", op);
  check_same_device(q, "q", v, "v", op);
  check_same_device(q, "q", prefix_lens, "prefix_lens", op);
  check_same_device(q, "q", parents, "parents", op);
  const ScalarKind dtype = float_kind(q, op, "q");
  TORCHSPEC_CHECK_ARG(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                      "q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                      v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCHSPEC_CHECK_ARG(k.size(0) == B && k.size(3) == D, op, "k must be [B, Hkv, S, D] with B = ", B, " and D = ", D,
                      " (from q), got ", k.sizes());
  TORCHSPEC_CHECK_ARG(T >= 1, op, "q must hold at least one tree node (the root), got T = 0");
  TORCHSPEC_CHECK_ARG(D >= 1, op, "the head dimension D must not be empty");
  TORCHSPEC_CHECK_ARG(Hkv >= 1 && Hq % Hkv == 0, op, "the query heads (", Hq, ") must be a multiple of the kv heads (",
                      Hkv, ")");
  TORCHSPEC_CHECK_ARG(prefix_lens.dim() == 1 && prefix_lens.size(0) == B, op, "prefix_lens must be [B] with B = ", B,
                      ", got ", prefix_lens.sizes());
  const at::Tensor lens = as_index(prefix_lens, op, "prefix_lens");
  const at::Tensor par = checked_parents(parents, B, T, "q (dim 2)", op);
  const double scale_value = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCHSPEC_CHECK_ARG(std::isfinite(scale_value), op, "scale must be finite, got ", scale_value);

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (B == 0 || Hq == 0) return out;
  if (q.is_cpu()) {  // CUDA: the kernel checks them
    check_trees(par, op);
    const int64_t* lp = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCHSPEC_CHECK_ARG(lp[b] >= 0 && lp[b] + T <= S, op, "prefix_lens[", b, "] = ", lp[b],
                          ": need 0 <= prefix_lens[b] and prefix_lens[b] + T <= S (T = ", T, ", S = ", S, ")");
    }
  }

  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  TreeAttentionParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.out = out.data_ptr();
  p.prefix_lens = lens.data_ptr<int64_t>();
  p.parents = par.data_ptr<int64_t>();
  p.dtype = dtype;
  p.batch = B;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.nodes = T;
  p.seq = S;
  p.head_dim = D;
  p.scale = static_cast<float>(scale_value);
  run_on_device(
      q, B * Hkv, 1, op, nullptr, [&](int64_t begin, int64_t end) { cpu::tree_attention_units(p, begin, end); },
      TORCHSPEC_IF_CUDA([&](cudaStream_t stream) {
        TORCHSPEC_CHECK_ARG(D <= 256, op, "the CUDA kernel supports head dimensions D <= 256, got ", D);
        TORCHSPEC_CHECK_ARG(S < (int64_t{1} << 31), op, "the sequence length S must be below 2^31 on CUDA, got ", S);
        TORCHSPEC_CHECK_ARG(B * Hkv * T < (int64_t{1} << 31), op, "B * Hkv * T must be below 2^31 on CUDA");
        TreeAttentionPlan plan;
        const cudaError_t plan_err = cuda::tree_attention_plan(p, &plan);
        TORCH_CHECK(plan_err == cudaSuccess, "torchspec.tree_attention: ", cudaGetErrorString(plan_err));
        TORCHSPEC_CHECK_ARG(plan.tensor_cores || Hq / Hkv <= 16, op,
                            "the CUDA-core kernel (float32, or a GPU before sm_80) supports up to 16 query heads per "
                            "kv head, got ",
                            Hq / Hkv);
        size_t needed = 0, allowed = 0;
        const cudaError_t smem_err = cuda::tree_attention_smem(p, &needed, &allowed);
        TORCH_CHECK(smem_err == cudaSuccess, "torchspec.tree_attention: ", cudaGetErrorString(smem_err));
        TORCHSPEC_CHECK_ARG(needed <= allowed, op, "D = ", D, " with ", Hq / Hkv,
                            " query heads per kv head and T = ", T, " needs ", needed,
                            " bytes of shared memory per block on CUDA, more than this GPU allows (", allowed, ")");
        // Several key ranges per block of rows: their float32 partials, merged by a second kernel. The
        // caching allocator orders its reuse on this stream after both kernels.
        at::Tensor workspace;
        if (plan.splits > 1) {
          workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes / 4)}, q.options().dtype(at::kFloat));
          p.workspace = workspace.data_ptr<float>();
        }
        p.splits = plan.splits;
        p.error = device_error_record(q.get_device());
        return cuda::tree_attention(p, stream);
      }));
  return out;
}

// Checks shared by both verification ops; fills the index and shape fields of p and returns the
// (contiguous) tensors the kernel reads: tokens, parents, logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_verify(const at::Tensor& tokens, const at::Tensor& parents,
                                                              const at::Tensor& target_logits, const char* op,
                                                              TreeVerifyParams& p) {
  TORCHSPEC_CHECK_ARG(tokens.dim() == 2, op, "tokens must be 2-D [B, T], got ", tokens.dim(), " dimensions");
  TORCHSPEC_CHECK_ARG(target_logits.dim() == 3, op, "target_logits must be 3-D [B, T, V], got ", target_logits.dim(),
                      " dimensions");
  check_device_supported(target_logits, op, "target_logits");
  check_same_device(target_logits, "target_logits", tokens, "tokens", op);
  check_same_device(target_logits, "target_logits", parents, "parents", op);
  p.dtype = float_kind(target_logits, op, "target_logits");
  const int64_t B = tokens.size(0), T = tokens.size(1), V = target_logits.size(2);
  TORCHSPEC_CHECK_ARG(T >= 1, op, "tokens must hold at least the root (T >= 1), got T = 0");
  TORCHSPEC_CHECK_ARG(target_logits.size(0) == B, op, "target_logits must be [B, T, V] with B = ", B,
                      " (from tokens), got ", target_logits.sizes());
  TORCHSPEC_CHECK_ARG(target_logits.size(1) == T, op, "target_logits has T = ", target_logits.size(1),
                      " nodes but tokens has ", T, " (T mismatch)");
  TORCHSPEC_CHECK_ARG(V >= 1, op, "the vocabulary (last) dimension of target_logits must not be empty");
  TORCHSPEC_CHECK_ARG(V < (int64_t{1} << 31), op, "the vocabulary size must be below 2^31, got ", V);
  at::Tensor tok = as_index(tokens, op, "tokens");
  at::Tensor par = checked_parents(parents, B, T, "tokens", op);
  if (B > 0 && tok.is_cpu()) {  // CUDA: the kernel checks them
    check_trees(par, op);
    const int64_t* tp = tok.data_ptr<int64_t>();
    for (int64_t i = 0; i < B * T; ++i) {
      TORCHSPEC_CHECK_ARG(tp[i] >= 0 && tp[i] < V, op, "tokens[", i / T, ", ", i % T, "] = ", tp[i],
                          " is not a token id in [0, V = ", V, ")");
    }
  }
  p.batch = B;
  p.nodes = T;
  p.vocab = V;
  return {tok, par, target_logits.contiguous()};
}

Outputs run_verify(TreeVerifyParams& p, const at::Tensor& tok, const at::Tensor& par, const at::Tensor& logits,
                   const char* op) {
  const auto i64 = tok.options();
  at::Tensor num_accepted = at::empty({p.batch}, i64), path = at::empty({p.batch, p.nodes}, i64);
  at::Tensor next_token = at::empty({p.batch}, i64);
  if (p.batch == 0) return {num_accepted, path, next_token};
  p.tokens = tok.data_ptr<int64_t>();
  p.parents = par.data_ptr<int64_t>();
  p.logits = logits.data_ptr();
  p.num_accepted = num_accepted.data_ptr<int64_t>();
  p.path = path.data_ptr<int64_t>();
  p.next_token = next_token.data_ptr<int64_t>();
  // A walk reads at least one logits row: with small vocabularies, many rows per task.
  run_on_device(
      logits, p.batch, row_grain(p.vocab, 65536), op, "batch rows",
      [&](int64_t begin, int64_t end) { cpu::verify_tree_rows(p, begin, end); },
      TORCHSPEC_IF_CUDA([&](cudaStream_t stream) {
        // The kernel keeps the tokens rejected at a node in shared memory, 8 bytes per node.
        size_t needed = 0, allowed = 0;
        const cudaError_t smem_err = cuda::verify_tree_smem(p, &needed, &allowed);
        TORCH_CHECK(smem_err == cudaSuccess, "torchspec.", op, ": ", cudaGetErrorString(smem_err));
        TORCHSPEC_CHECK_ARG(needed <= allowed, op, "T = ", p.nodes, " tree nodes need ", needed,
                            " bytes of shared memory per block on CUDA, more than this GPU allows (", allowed,
                            "): at most ", p.nodes - static_cast<int64_t>((needed - allowed + 7) / 8), " nodes");
        p.error = device_error_record(logits.get_device());
        return cuda::verify_tree(p, stream);
      }));
  return {num_accepted, path, next_token};
}

Outputs verify_tree_greedy(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_logits) {
  constexpr const char* op = "verify_tree_greedy";
  TreeVerifyParams p;
  auto [tok, par, logits] = prepare_verify(tokens, parents, target_logits, op, p);
  return run_verify(p, tok, par, logits, op);
}

Outputs verify_tree_sampling(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target_logits,
                             double temperature, const at::Tensor& uniforms) {
  constexpr const char* op = "verify_tree_sampling";
  check_temperature(temperature, op, " (use verify_tree_greedy for temperature 0)");
  TreeVerifyParams p;
  auto [tok, par, logits] = prepare_verify(tokens, parents, target_logits, op, p);
  check_same_device(target_logits, "target_logits", uniforms, "uniforms", op);
  TORCHSPEC_CHECK_ARG(uniforms.scalar_type() == at::kDouble, op, "uniforms must be float64, got ",
                      uniforms.scalar_type());
  TORCHSPEC_CHECK_ARG(uniforms.dim() == 2 && uniforms.size(0) == p.batch && uniforms.size(1) == p.nodes, op,
                      "uniforms must be [B, T] = [", p.batch, ", ", p.nodes, "], got ", uniforms.sizes());
  const at::Tensor u = uniforms.contiguous();
  if (p.batch > 0 && u.is_cpu()) {  // CUDA: the kernel checks them
    const double* up = u.data_ptr<double>();
    for (int64_t i = 0; i < p.batch * p.nodes; ++i) {
      TORCHSPEC_CHECK_ARG(up[i] >= 0.0 && up[i] < 1.0, op, "uniforms[", i / p.nodes, ", ", i % p.nodes, "] = ", up[i],
                          " is not in [0, 1)");
    }
  }
  p.uniforms = u.data_ptr<double>();
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  return run_verify(p, tok, par, logits, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchspec, CPU, m) {
  m.impl("tree_attention", &tree_attention);
  m.impl("verify_tree_greedy", &verify_tree_greedy);
  m.impl("verify_tree_sampling", &verify_tree_sampling);
}

#ifdef TORCHSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(torchspec, CUDA, m) {
  m.impl("tree_attention", &tree_attention);
  m.impl("verify_tree_greedy", &verify_tree_greedy);
  m.impl("verify_tree_sampling", &verify_tree_sampling);
}
#endif

}  // namespace torchspec
