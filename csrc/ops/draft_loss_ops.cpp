// torch-facing launchers of draft_topk_kl (the fused LM head + top-k teacher loss of a draft
// model: kl, lk_alpha or lk_lambda) and of its backward, CPU and CUDA.
//
// The float32 logits are made one tile at a time (a vocabulary chunk, outer, times a block of rows,
// inner) by torch's GEMM and handed to a framework-free tile kernel (csrc/cpu/draft_loss.cpp,
// csrc/kernels/draft_loss.cu). The forward keeps per row a running log-sum-exp, argmax and teacher
// dot product, and gathers the logits at the teacher ids (which become the draft's log-probabilities
// there, from which the LK rows kernel computes the acceptance terms); the backward recomputes each
// tile, turns it into d loss / d logits in place and multiplies it into both gradients.
// draft_topk_kl_with_grad does both in one pass, for eager training, where the gradients are wanted
// whenever the loss is (lk_lambda excepted: its weight depends on every row's acceptance, so it
// runs the forward, then the backward). Extra memory: one tile and small [N] / [N, k] arrays, plus
// float32 accumulators of the gradients when the inputs are bfloat16 / float16.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "device_errors.h"
#include "dispatch.h"
#include "lm_head.h"

namespace torchspec {
namespace {

constexpr const char* kOp = "draft_topk_kl";
constexpr const char* kBackwardOp = "draft_topk_kl_backward";
constexpr const char* kWithGradOp = "draft_topk_kl_with_grad";

// The loss kind and its parameters, checked.
struct LossSpec {
  DraftLossKind kind;
  std::string name;
  double kl_scale, kl_decay;
};

LossSpec parse_loss(c10::string_view loss, double kl_scale, double kl_decay, const char* op) {
  const std::string name(loss);
  DraftLossKind kind = DraftLossKind::kKL;
  if (name == "lk_alpha") {
    kind = DraftLossKind::kLKAlpha;
  } else if (name == "lk_lambda") {
    kind = DraftLossKind::kLKLambda;
  } else {
    TORCHSPEC_CHECK_ARG(name == "kl", op, "loss must be 'kl', 'lk_alpha' or 'lk_lambda', got '", name, "'");
  }
  // w = kl_scale * exp(-kl_decay * acceptance) mixes KL and 1 - acceptance: it must stay in [0, 1].
  TORCHSPEC_CHECK_ARG(std::isfinite(kl_scale) && kl_scale >= 0.0 && kl_scale <= 1.0, op,
                      "kl_scale must be in [0, 1] (lk_lambda's KL weight is kl_scale * exp(-kl_decay * acceptance)), "
                      "got ",
                      kl_scale);
  TORCHSPEC_CHECK_ARG(std::isfinite(kl_decay) && kl_decay >= 0.0, op, "kl_decay must be a finite number >= 0, got ",
                      kl_decay);
  return {kind, name, kl_scale, kl_decay};
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& indices,
                  const at::Tensor& logprobs, const std::optional<at::Tensor>& valid, double temperature,
                  const char* op, bool check_index_range) {
  check_lm_head(hidden, weight, op, /*hidden_2d=*/true, "Vd");
  check_same_device(hidden, "hidden", indices, "teacher_indices", op);
  check_same_device(hidden, "hidden", logprobs, "teacher_logprobs", op);
  const int64_t N = hidden.size(0), V = weight.size(0);
  TORCHSPEC_CHECK_ARG(V >= 1, op, "weight must have at least one row (the draft vocabulary is empty)");
  TORCHSPEC_CHECK_ARG(V < (int64_t{1} << 31), op, "the draft vocabulary size must be below 2^31, got ", V);
  TORCHSPEC_CHECK_ARG(indices.scalar_type() == at::kLong, op, "teacher_indices must be int64, got ",
                      indices.scalar_type());
  TORCHSPEC_CHECK_ARG(indices.dim() == 2 && indices.size(0) == N, op,
                      "teacher_indices must be [N, k] with N = hidden.size(0) = ", N, ", got ", indices.sizes());
  TORCHSPEC_CHECK_ARG(logprobs.scalar_type() == at::kFloat, op, "teacher_logprobs must be float32, got ",
                      logprobs.scalar_type());
  TORCHSPEC_CHECK_ARG(logprobs.sizes() == indices.sizes(), op,
                      "teacher_logprobs must have the shape of teacher_indices ", indices.sizes(), ", got ",
                      logprobs.sizes());
  if (valid.has_value()) {
    check_same_device(hidden, "hidden", *valid, "valid", op);
    TORCHSPEC_CHECK_ARG(valid->scalar_type() == at::kBool, op, "valid must be bool, got ", valid->scalar_type());
    TORCHSPEC_CHECK_ARG(valid->dim() == 1 && valid->size(0) == N, op, "valid must be [N] with N = hidden.size(0) = ", N,
                        ", got ", valid->sizes());
  }
  check_temperature(temperature, op);
  if (check_index_range && indices.numel() > 0 && indices.is_cuda()) {
    // On the device, no host sync: raised by the next torchspec call on that device (device_errors.h).
    check_ids_on_device(indices, -1, V, DeviceErrorOp::kDraftLoss, op);
  } else if (check_index_range && indices.numel() > 0) {
    // An id outside the vocabulary is a data bug.
    const auto [lo, hi] = at::aminmax(indices);
    const int64_t min_id = lo.item<int64_t>(), max_id = hi.item<int64_t>();
    TORCHSPEC_CHECK_ARG(min_id >= -1, op, "teacher_indices must be -1 (absent) or in [0, Vd), got ", min_id);
    TORCHSPEC_CHECK_ARG(max_id < V, op, "teacher_indices must be < Vd = ", V, " (the draft vocabulary), got ", max_id);
  }
}

// What the loss needs of the teacher, all on the inputs' device:
//   weights [N, k] float32: p (softmax of the present entries' log-probabilities), 0 where the entry
//                           is absent or the row does not count;
//   counted [N] bool:       valid and at least one entry present;
//   row_weight [N] float32: counted / max(1, number of counted rows).
struct Targets {
  at::Tensor indices, weights, counted, row_weight;
};

Targets make_targets(const at::Tensor& indices, const at::Tensor& logprobs, const std::optional<at::Tensor>& valid) {
  Targets t;
  t.indices = indices.contiguous();
  const at::Tensor present = t.indices.ge(0);
  t.counted = present.any(1);
  if (valid.has_value()) t.counted = t.counted.logical_and(*valid);
  const at::Tensor p =
      at::softmax(logprobs.masked_fill(present.logical_not(), -std::numeric_limits<float>::infinity()), 1);
  // Rows with no present entry have NaN p: the where() drops them.
  t.weights = at::where(present.logical_and(t.counted.unsqueeze(1)), p, at::zeros({}, p.options())).contiguous();
  const at::Tensor count = t.counted.sum().clamp_min(1).to(at::kFloat);
  t.row_weight = (t.counted.to(at::kFloat) / count).contiguous();
  return t;
}

// What the LK losses need of the teacher besides Targets:
//   accept_prob [N, k] float32: at the first occurrence of each present id, the teacher's probability
//                               of that draft token (exp of its log-probabilities, summed over
//                               repeats of the id); -1 at absent entries and later repeats;
//   tail [N] float32:           the teacher's mass outside its top-k, max(0, 1 - sum_j exp(logprobs)).
struct LKTargets {
  at::Tensor accept_prob, tail;
};

LKTargets make_lk_targets(const Targets& t, const at::Tensor& logprobs) {
  LKTargets lk;
  const at::Tensor prob = logprobs.exp();
  const auto [sorted, order] = t.indices.sort(1);
  at::Tensor first = at::ones_like(sorted, sorted.options().dtype(at::kBool));
  const int64_t k = sorted.size(1);
  if (k > 1) first.narrow(1, 1, k - 1).copy_(sorted.narrow(1, 1, k - 1).ne(sorted.narrow(1, 0, k - 1)));
  const at::Tensor group = first.cumsum(1) - 1;  // the id's rank among the row's distinct ids
  const at::Tensor merged = at::zeros_like(prob).scatter_add_(1, group, prob.gather(1, order));
  const at::Tensor at_first =
      at::where(first.logical_and(sorted.ge(0)), merged.gather(1, group), at::full({}, -1.0f, prob.options()));
  lk.accept_prob = at::empty_like(prob).scatter_(1, order, at_first).contiguous();
  lk.tail = (1.0 - logprobs.to(at::kDouble).exp().sum(1)).clamp_min(0.0).to(at::kFloat).contiguous();
  return lk;
}

// LK losses read teacher_logprobs as probabilities: each counted row's must sum to at most 1, up to
// 1% (rounding, even of log-probabilities that went through bfloat16). Catches logits passed as
// log-probabilities. On CUDA checked by a small kernel, no host sync (device_errors.h); on CPU one
// small reduction.
void check_lk_logprobs(const at::Tensor& logprobs, const Targets& t, const LossSpec& spec, const char* op) {
  if (spec.kind == DraftLossKind::kKL || logprobs.numel() == 0) return;
  constexpr float kMaxLse = 1e-2f;
  const at::Tensor row_lse = at::logsumexp(logprobs, 1);
  if (logprobs.is_cuda()) {
    const at::Tensor counted_lse =
        at::where(t.counted, row_lse, at::full({}, -std::numeric_limits<float>::infinity(), row_lse.options()));
    check_at_most_on_device(counted_lse.to(at::kFloat), kMaxLse, DeviceErrorOp::kDraftLoss, op);
    return;
  }
  const float worst =
      at::where(t.counted, row_lse, at::full({}, -std::numeric_limits<float>::infinity(), row_lse.options()))
          .max()
          .item<float>();
  TORCHSPEC_CHECK_ARG(!(worst > kMaxLse), op, "teacher_logprobs must be log-probabilities for loss='", spec.name,
                      "': exp(teacher_logprobs) must sum to at most 1 in every counted row (log-sum-exp <= 0.01), "
                      "got a row whose log-sum-exp is ",
                      worst);
}

// Tiling: vocabulary chunks (outer) times row blocks (inner), lm_head_tile_bytes of float32 logits.
struct Tiling {
  int64_t vocab_chunk, row_chunk;
};

Tiling make_tiling(bool cuda, int64_t V) {
  // 2048 columns on both: on CUDA this keeps the float32 gradient accumulator of a bfloat16
  // weight chunk ([2048, H]) small as well.
  const int64_t vocab_chunk = std::min<int64_t>(V, 2048);
  return {vocab_chunk, std::max<int64_t>(1, lm_head_tile_bytes(cuda) / (vocab_chunk * 4))};
}

// GEMM operands: float32 on CPU (no mixed-precision GEMM there), the input dtype on CUDA.
at::Tensor gemm_operand(const at::Tensor& t) { return t.is_cuda() ? t : t.to(at::kFloat); }

// out (float32) = a @ b, or out += a @ b; a and b float32, or bfloat16 / float16 on CUDA.
void matmul_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (accumulate) {
    // No in-place mixed-precision accumulate: add products of at most 16 MiB, block by block of rows.
    const int64_t block = std::max<int64_t>(1, (int64_t{16} << 20) / (b.size(1) * 4));
    for (int64_t i = 0; i < a.size(0); i += block) {
      const int64_t n = std::min(block, a.size(0) - i);
      out.narrow(0, i, n).add_(at::mm(a.narrow(0, i, n), b, at::kFloat));
    }
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

// The tile at rows [r0, r0 + tile.size(0)) and vocabulary ids [c0, c0 + tile.size(1)).
DraftLossTile tile_geometry(const at::Tensor& tile, int64_t c0, int64_t r0, const at::Tensor& indices,
                            float inv_temperature) {
  DraftLossTile g;
  g.rows = tile.size(0);
  g.cols = tile.size(1);
  g.ld = tile.stride(0);
  g.col_offset = c0;
  g.k = static_cast<int>(indices.size(1));
  g.target_indices = indices.data_ptr<int64_t>() + r0 * g.k;
  g.inv_temperature = inv_temperature;
  return g;
}

// One tile kernel on p's rows (run_on_device); cuda_launch(p, stream) is the CUDA kernel, or
// nullptr in a CPU-only build (TORCHSPEC_IF_CUDA).
template <class Params, class CpuRows, class CudaLaunch>
void run_tile(const Params& p, const at::Tensor& like, const char* op, const CpuRows& cpu_rows,
              const CudaLaunch& cuda_launch) {
  run_on_device(
      like, p.rows, row_grain(p.cols), op, "rows", [&](int64_t b, int64_t e) { cpu_rows(p, b, e); },
      TORCHSPEC_IF_CUDA([&](cudaStream_t stream) { return cuda_launch(p, stream); }));
}

// Calls fn(tile, c0, c1, r0, r1) for every tile of float32 logits hidden[r0:r1] @ weight[c0:c1].T,
// vocabulary chunks outer; `at_chunk_end(c0, c1)` after each chunk's last row block.
template <class TileFn, class ChunkEndFn>
void for_each_tile(const at::Tensor& hidden_op, const at::Tensor& weight, const TileFn& fn,
                   const ChunkEndFn& at_chunk_end) {
  const int64_t N = hidden_op.size(0), V = weight.size(0);
  const Tiling tiling = make_tiling(hidden_op.is_cuda(), V);
  const int64_t rows_alloc = std::min(N, tiling.row_chunk);
  at::Tensor buffer = at::empty({rows_alloc * tiling.vocab_chunk}, hidden_op.options().dtype(at::kFloat));
  for (int64_t c0 = 0; c0 < V; c0 += tiling.vocab_chunk) {
    const int64_t c1 = std::min(V, c0 + tiling.vocab_chunk);
    const at::Tensor w = gemm_operand(weight.slice(0, c0, c1));
    for (int64_t r0 = 0; r0 < N; r0 += tiling.row_chunk) {
      const int64_t r1 = std::min(N, r0 + tiling.row_chunk);
      at::Tensor tile = buffer.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
      matmul_f32(tile, hidden_op.slice(0, r0, r1), w.t(), false);
      fn(tile, w, c0, c1, r0, r1);
    }
    at_chunk_end(c0, c1);
  }
}

// The forward's per-row state: running log-sum-exp, argmax and teacher dot product, then lse.
// draft_logprobs [N, k]: the logits at the teacher ids, log q = z / T - lse once a row's last
// vocabulary chunk is in (-inf at absent entries).
struct ForwardRows {
  const Targets& t;
  float inv_temperature;
  at::Tensor run_max, run_sum, argmax_value, argmax, dot, lse, draft_logprobs;

  ForwardRows(const Targets& targets, float inv_t, int64_t N, const at::TensorOptions& f32)
      : t(targets),
        inv_temperature(inv_t),
        run_max(at::full({N}, -std::numeric_limits<float>::infinity(), f32)),
        run_sum(at::zeros({N}, f32)),
        argmax_value(at::full({N}, -std::numeric_limits<float>::infinity(), f32)),
        argmax(at::zeros({N}, f32.dtype(at::kLong))),
        dot(at::zeros({N}, f32)),
        lse(at::empty({N}, f32)),
        draft_logprobs(at::full({N, targets.indices.size(1)}, -std::numeric_limits<float>::infinity(), f32)) {}

  // Folds the tile (rows from r0, vocabulary ids from c0) in; `last` when it ends its rows.
  void add_tile(const at::Tensor& tile, int64_t c0, int64_t r0, bool last, const char* op) {
    const int64_t k = t.indices.size(1);
    DraftLossForwardTile p;
    static_cast<DraftLossTile&>(p) = tile_geometry(tile, c0, r0, t.indices, inv_temperature);
    p.logits = tile.data_ptr<float>();
    p.target_weights = t.weights.data_ptr<float>() + r0 * k;
    p.run_max = run_max.data_ptr<float>() + r0;
    p.run_sum = run_sum.data_ptr<float>() + r0;
    p.argmax_value = argmax_value.data_ptr<float>() + r0;
    p.argmax_index = argmax.data_ptr<int64_t>() + r0;
    p.target_dot = dot.data_ptr<float>() + r0;
    p.out_lse = last ? lse.data_ptr<float>() + r0 : nullptr;
    p.target_logits = draft_logprobs.data_ptr<float>() + r0 * k;
    run_tile(p, tile, op, cpu::draft_loss_forward_rows, TORCHSPEC_IF_CUDA(cuda::draft_loss_forward));
  }

  // KL: sum over counted rows of (lse - sum_j p_j z_j / T) / count (sum_j p_j = 1 on those rows), in double.
  at::Tensor kl_loss_double() const {
    const at::Tensor per_row = at::where(t.counted, lse - dot * inv_temperature, at::zeros({}, lse.options()));
    return (per_row.to(at::kDouble) * t.row_weight.to(at::kDouble)).sum();
  }

  at::Tensor loss() const { return kl_loss_double().to(at::kFloat); }
};

// The LK rows kernel over rows [r0, r1) of the whole batch's arrays: accept and neg_log_accept,
// and with `coefficients` also row_scale and coef (from grad_scale and, for lk_lambda, the weight).
struct LKRows {
  const Targets& t;
  const LossSpec& spec;
  LKTargets lk;
  at::Tensor accept, neg_log_accept, row_scale, coef, grad_scale, lambda_weight;

  LKRows(const Targets& targets, const LossSpec& s, const at::Tensor& logprobs)
      : t(targets), spec(s), lk(make_lk_targets(targets, logprobs)) {
    const int64_t N = t.indices.size(0);
    const auto f32 = logprobs.options();
    accept = at::empty({N}, f32);
    neg_log_accept = at::empty({N}, f32);
    row_scale = at::empty({N}, f32);
    coef = at::empty_like(logprobs, at::MemoryFormat::Contiguous);
  }

  void run(const at::Tensor& draft_logprobs, int64_t r0, int64_t r1, bool coefficients, const char* op) {
    const int64_t k = t.indices.size(1);
    DraftLossLKRows p;
    p.rows = r1 - r0;
    p.k = static_cast<int>(k);
    p.kind = spec.kind;
    p.draft_logprobs = draft_logprobs.data_ptr<float>() + r0 * k;
    p.accept_prob = lk.accept_prob.data_ptr<float>() + r0 * k;
    p.tail = lk.tail.data_ptr<float>() + r0;
    p.accept = accept.data_ptr<float>() + r0;
    p.neg_log_accept = neg_log_accept.data_ptr<float>() + r0;
    if (coefficients) {
      p.kl_weights = t.weights.data_ptr<float>() + r0 * k;
      p.grad_scale = grad_scale.data_ptr<float>() + r0;
      p.lambda_weight = lambda_weight.defined() ? lambda_weight.data_ptr<float>() : nullptr;
      p.row_scale = row_scale.data_ptr<float>() + r0;
      p.coef = coef.data_ptr<float>() + r0 * k;
    }
    run_on_device(
        accept, p.rows, row_grain(k, 4096), op, "rows", [&](int64_t b, int64_t e) { cpu::draft_loss_lk_rows(p, b, e); },
        TORCHSPEC_IF_CUDA([&](cudaStream_t stream) { return cuda::draft_loss_lk_rows(p, stream); }));
  }

  // Mean acceptance over the counted rows (double scalar), once accept is filled for every row.
  at::Tensor mean_accept() const {
    const at::Tensor a = at::where(t.counted, accept, at::zeros({}, accept.options()));
    return (a.to(at::kDouble) * t.row_weight.to(at::kDouble)).sum();
  }

  // lk_lambda: w = kl_scale * exp(-kl_decay * mean acceptance), a constant of the gradient (as
  // SpecForge detaches it), kept as a float32 [1] tensor on the device (no sync).
  void set_lambda_weight() {
    lambda_weight = (spec.kl_scale * at::exp(-spec.kl_decay * mean_accept())).to(at::kFloat).reshape({1});
  }

  // The loss, once accept and neg_log_accept are filled for every row (and w for lk_lambda).
  at::Tensor loss(const ForwardRows& rows) const {
    if (spec.kind == DraftLossKind::kLKAlpha) {
      const at::Tensor per_row = at::where(t.counted, neg_log_accept, at::zeros({}, accept.options()));
      return (per_row.to(at::kDouble) * t.row_weight.to(at::kDouble)).sum().to(at::kFloat);
    }
    const at::Tensor w = lambda_weight.reshape({}).to(at::kDouble);
    return (w * rows.kl_loss_double() + (1.0 - w) * (1.0 - mean_accept())).to(at::kFloat);
  }
};

// Turns a tile of logits into d loss / d logits in place, for an upstream gradient grad_loss:
// d loss / d z[r, v] = row_scale[r] * softmax(z / T)[r, v] - sum_{j: idx_j = v} coef[r, j].
struct GradientRows {
  const Targets& t;
  float inv_temperature;
  at::Tensor row_scale, coef, lse;

  // grad_loss * row weight / T: KL's row_scale, and the LK rows kernel's grad_scale.
  static at::Tensor scale_of(const Targets& t, const at::Tensor& grad_loss, float inv_t) {
    return (t.row_weight * (grad_loss.reshape({}).to(at::kFloat) * inv_t)).contiguous();
  }

  // KL: coef = p * row_scale.
  GradientRows(const Targets& targets, float inv_t, const at::Tensor& grad_loss, const at::Tensor& lse_)
      : t(targets),
        inv_temperature(inv_t),
        row_scale(scale_of(t, grad_loss, inv_t)),
        coef((t.weights * row_scale.unsqueeze(1)).contiguous()),
        lse(lse_.contiguous()) {}

  // LK: the rows kernel's row_scale and coef (filled before a row's tiles are applied).
  GradientRows(const Targets& targets, float inv_t, const LKRows& lk, const at::Tensor& lse_)
      : t(targets), inv_temperature(inv_t), row_scale(lk.row_scale), coef(lk.coef), lse(lse_.contiguous()) {}

  void apply(at::Tensor& tile, int64_t c0, int64_t r0, const char* op) const {
    DraftLossBackwardTile p;
    static_cast<DraftLossTile&>(p) = tile_geometry(tile, c0, r0, t.indices, inv_temperature);
    p.logits = tile.data_ptr<float>();
    p.target_coef = coef.data_ptr<float>() + r0 * t.indices.size(1);
    p.lse = lse.data_ptr<float>() + r0;
    p.row_scale = row_scale.data_ptr<float>() + r0;
    run_tile(p, tile, op, cpu::draft_loss_backward_rows, TORCHSPEC_IF_CUDA(cuda::draft_loss_backward));
  }
};

// The forward over vocabulary chunks (outer) times row blocks: every row's state, lse and draft_logprobs.
void forward_sweep(ForwardRows& rows, const at::Tensor& hidden, const at::Tensor& weight, const char* op) {
  const int64_t V = weight.size(0);
  for_each_tile(
      gemm_operand(hidden), weight,
      [&](const at::Tensor& tile, const at::Tensor&, int64_t c0, int64_t c1, int64_t r0, int64_t) {
        rows.add_tile(tile, c0, r0, c1 == V, op);
      },
      [](int64_t, int64_t) {});
}

// Both gradients by remaking each tile (vocabulary chunks outer), given every row's coefficients.
std::tuple<at::Tensor, at::Tensor> backward_sweep(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const GradientRows& gradient, const char* op) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool exact_dtype = hidden.scalar_type() == at::kFloat;
  // float32 inputs: the gradients are accumulated in place; else in float32 and cast at the end.
  at::Tensor grad_hidden = exact_dtype ? at::empty_like(hidden, at::MemoryFormat::Contiguous) : at::empty({N, H}, f32);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  const at::Tensor hidden_op = gemm_operand(hidden);
  at::Tensor grad_weight_acc;  // float32 [chunk, H] when grad_weight is not float32

  for_each_tile(
      hidden_op, weight,
      [&](at::Tensor& tile, const at::Tensor& w, int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
        gradient.apply(tile, c0, r0, op);
        const at::Tensor g = w.scalar_type() == at::kFloat ? tile : tile.to(w.scalar_type());
        const at::Tensor h = hidden_op.slice(0, r0, r1);
        at::Tensor gh = grad_hidden.slice(0, r0, r1);
        matmul_f32(gh, g, w, c0 > 0);
        at::Tensor gw;
        if (exact_dtype) {
          gw = grad_weight.slice(0, c0, c1);
        } else {
          if (!grad_weight_acc.defined()) grad_weight_acc = at::empty({make_tiling(true, V).vocab_chunk, H}, f32);
          gw = grad_weight_acc.narrow(0, 0, c1 - c0);
        }
        matmul_f32(gw, g.t(), h, r0 > 0);
      },
      [&](int64_t c0, int64_t c1) {
        if (!exact_dtype) grad_weight.slice(0, c0, c1).copy_(grad_weight_acc.narrow(0, 0, c1 - c0));
      });
  if (!exact_dtype) grad_hidden = grad_hidden.to(hidden.scalar_type());
  return {grad_hidden, grad_weight};
}

// The LK coefficients of every row for an upstream gradient grad_loss (lk_lambda: after its weight).
void lk_coefficients(LKRows& lk, const Targets& t, const at::Tensor& draft_logprobs, const at::Tensor& grad_loss,
                     float inv_t, const char* op) {
  const int64_t N = t.indices.size(0);
  if (lk.spec.kind == DraftLossKind::kLKLambda) {
    lk.run(draft_logprobs, 0, N, false, op);
    lk.set_lambda_weight();
  }
  lk.grad_scale = GradientRows::scale_of(t, grad_loss, inv_t);
  lk.run(draft_logprobs, 0, N, true, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> draft_topk_kl(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& valid, double temperature,
    c10::string_view loss, double kl_scale, double kl_decay) {
  const LossSpec spec = parse_loss(loss, kl_scale, kl_decay, kOp);
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kOp, true);
  const at::OptionalDeviceGuard guard(hidden.device());
  const int64_t N = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  if (N == 0) {
    return {at::zeros({}, f32), at::empty({N}, f32.dtype(at::kLong)), at::empty({N}, f32),
            at::empty(teacher_logprobs.sizes(), f32)};
  }

  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  check_lk_logprobs(teacher_logprobs, t, spec, kOp);
  ForwardRows rows(t, static_cast<float>(1.0 / temperature), N, f32);
  forward_sweep(rows, hidden, weight, kOp);
  if (spec.kind == DraftLossKind::kKL) return {rows.loss(), rows.argmax, rows.lse, rows.draft_logprobs};
  LKRows lk(t, spec, teacher_logprobs);
  lk.run(rows.draft_logprobs, 0, N, false, kOp);
  if (spec.kind == DraftLossKind::kLKLambda) lk.set_lambda_weight();
  return {lk.loss(rows), rows.argmax, rows.lse, rows.draft_logprobs};
}

std::tuple<at::Tensor, at::Tensor> draft_topk_kl_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                          const at::Tensor& weight, const at::Tensor& teacher_indices,
                                                          const at::Tensor& teacher_logprobs,
                                                          const std::optional<at::Tensor>& valid, const at::Tensor& lse,
                                                          const at::Tensor& draft_logprobs, double temperature,
                                                          c10::string_view loss, double kl_scale, double kl_decay) {
  const LossSpec spec = parse_loss(loss, kl_scale, kl_decay, kBackwardOp);
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kBackwardOp, false);
  const int64_t N = hidden.size(0);
  TORCHSPEC_CHECK_ARG(grad_loss.numel() == 1 && at::isFloatingType(grad_loss.scalar_type()), kBackwardOp,
                      "grad_loss must be a floating scalar, got ", grad_loss.scalar_type(), " of shape ",
                      grad_loss.sizes());
  check_same_device(hidden, "hidden", grad_loss, "grad_loss", kBackwardOp);
  check_same_device(hidden, "hidden", lse, "lse", kBackwardOp);
  check_same_device(hidden, "hidden", draft_logprobs, "draft_logprobs", kBackwardOp);
  TORCHSPEC_CHECK_ARG(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == N, kBackwardOp,
                      "lse must be float32 [N] with N = hidden.size(0) = ", N, ", got ", lse.scalar_type(), " ",
                      lse.sizes());
  TORCHSPEC_CHECK_ARG(draft_logprobs.scalar_type() == at::kFloat && draft_logprobs.sizes() == teacher_indices.sizes(),
                      kBackwardOp, "draft_logprobs must be float32 [N, k] like teacher_indices ",
                      teacher_indices.sizes(), ", got ", draft_logprobs.scalar_type(), " ", draft_logprobs.sizes());
  const at::OptionalDeviceGuard guard(hidden.device());
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (N == 0)
    return {at::zeros_like(hidden, at::MemoryFormat::Contiguous), at::zeros_like(weight, at::MemoryFormat::Contiguous)};

  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  if (spec.kind == DraftLossKind::kKL) {
    return backward_sweep(hidden, weight, GradientRows(t, inv_t, grad_loss, lse), kBackwardOp);
  }
  LKRows lk(t, spec, teacher_logprobs);
  lk_coefficients(lk, t, draft_logprobs.contiguous(), grad_loss, inv_t, kBackwardOp);
  return backward_sweep(hidden, weight, GradientRows(t, inv_t, lk, lse), kBackwardOp);
}

// The forward and both gradients of the loss (for d total / d loss = 1) in one pass: blocks of rows
// (outer) times the whole vocabulary, so that each block's lse is known before its logits turn
// into d loss / d logits in place. Three GEMMs per tile, as eager autograd does; the separate
// backward above needs four (it makes the logits again), and so does lk_lambda here, whose weight
// needs every row's acceptance before any gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> draft_topk_kl_with_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& valid, double temperature,
    c10::string_view loss, double kl_scale, double kl_decay) {
  const LossSpec spec = parse_loss(loss, kl_scale, kl_decay, kWithGradOp);
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kWithGradOp, true);
  const at::OptionalDeviceGuard guard(hidden.device());
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  check_lk_logprobs(teacher_logprobs, t, spec, kWithGradOp);
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  ForwardRows rows(t, inv_temperature, N, f32);
  const at::Tensor one = at::ones({}, f32);

  if (spec.kind == DraftLossKind::kLKLambda && N > 0) {
    forward_sweep(rows, hidden, weight, kWithGradOp);
    LKRows lk(t, spec, teacher_logprobs);
    lk_coefficients(lk, t, rows.draft_logprobs, one, inv_temperature, kWithGradOp);
    auto [grad_hidden, grad_weight] =
        backward_sweep(hidden, weight, GradientRows(t, inv_temperature, lk, rows.lse), kWithGradOp);
    return {lk.loss(rows), rows.argmax, rows.lse, rows.draft_logprobs, grad_hidden, grad_weight};
  }

  const bool exact_dtype = hidden.scalar_type() == at::kFloat;
  // float32 inputs: the gradients are written in place; else in float32 and cast at the end.
  at::Tensor grad_hidden = at::empty({N, H}, f32);
  at::Tensor grad_weight = at::zeros({V, H}, f32);
  // lk_alpha: each block's coefficients come from the rows kernel once the block's lse is known.
  std::optional<LKRows> lk;
  if (spec.kind != DraftLossKind::kKL) {
    lk.emplace(t, spec, teacher_logprobs);
    lk->grad_scale = GradientRows::scale_of(t, one, inv_temperature);
  }
  // rows.lse is filled block by block before gradient reads that block (the same tensor).
  const GradientRows gradient =
      lk ? GradientRows(t, inv_temperature, *lk, rows.lse) : GradientRows(t, inv_temperature, one, rows.lse);
  const at::Tensor hidden_op = gemm_operand(hidden), w = gemm_operand(weight);
  const int64_t row_chunk = std::max<int64_t>(1, lm_head_tile_bytes(hidden.is_cuda()) / (V * 4));
  at::Tensor buffer = at::empty({std::max<int64_t>(1, std::min(N, row_chunk) * V)}, f32);

  for (int64_t r0 = 0; r0 < N; r0 += row_chunk) {
    const int64_t r1 = std::min(N, r0 + row_chunk);
    at::Tensor tile = buffer.narrow(0, 0, (r1 - r0) * V).view({r1 - r0, V});
    const at::Tensor h = hidden_op.slice(0, r0, r1);
    matmul_f32(tile, h, w.t(), false);
    rows.add_tile(tile, 0, r0, true, kWithGradOp);
    if (lk) lk->run(rows.draft_logprobs, r0, r1, true, kWithGradOp);
    gradient.apply(tile, 0, r0, kWithGradOp);
    const at::Tensor g = w.scalar_type() == at::kFloat ? tile : tile.to(w.scalar_type());
    at::Tensor gh = grad_hidden.slice(0, r0, r1);
    matmul_f32(gh, g, w, false);
    matmul_f32(grad_weight, g.t(), h, true);
  }
  const at::Tensor loss_value = N == 0 ? at::zeros({}, f32) : lk ? lk->loss(rows) : rows.loss();
  if (!exact_dtype) {
    grad_hidden = grad_hidden.to(hidden.scalar_type());
    grad_weight = grad_weight.to(weight.scalar_type());
  }
  return {loss_value, rows.argmax, rows.lse, rows.draft_logprobs, grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchspec, CPU, m) {
  m.impl("draft_topk_kl", &draft_topk_kl);
  m.impl("draft_topk_kl_backward", &draft_topk_kl_backward);
  m.impl("draft_topk_kl_with_grad", &draft_topk_kl_with_grad);
}

#ifdef TORCHSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(torchspec, CUDA, m) {
  m.impl("draft_topk_kl", &draft_topk_kl);
  m.impl("draft_topk_kl_backward", &draft_topk_kl_backward);
  m.impl("draft_topk_kl_with_grad", &draft_topk_kl_with_grad);
}
#endif

}  // namespace torchspec
