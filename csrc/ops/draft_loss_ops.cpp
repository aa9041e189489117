// torch-facing launchers of draft_topk_kl (the fused LM head + top-k KL loss of a draft model)
// and of its backward, CPU and CUDA.
//
// The float32 logits are made one tile at a time (a vocabulary chunk, outer, times a block of rows,
// inner) by torch's GEMM and handed to a framework-free tile kernel (csrc/cpu/draft_loss.cpp,
// csrc/kernels/draft_loss.cu). The forward keeps per row a running log-sum-exp, argmax and teacher
// dot product; the backward recomputes each tile, turns it into d loss / d logits in place and
// multiplies it into both gradients. draft_topk_kl_with_grad does both in one pass, for eager
// training, where the gradients are wanted whenever the loss is. Extra memory: one tile and small
// [N] / [N, k] arrays, plus float32 accumulators of the gradients when the inputs are bfloat16 /
// float16.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
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
struct ForwardRows {
  const Targets& t;
  float inv_temperature;
  at::Tensor run_max, run_sum, argmax_value, argmax, dot, lse;

  ForwardRows(const Targets& targets, float inv_t, int64_t N, const at::TensorOptions& f32)
      : t(targets),
        inv_temperature(inv_t),
        run_max(at::full({N}, -std::numeric_limits<float>::infinity(), f32)),
        run_sum(at::zeros({N}, f32)),
        argmax_value(at::full({N}, -std::numeric_limits<float>::infinity(), f32)),
        argmax(at::zeros({N}, f32.dtype(at::kLong))),
        dot(at::zeros({N}, f32)),
        lse(at::empty({N}, f32)) {}

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
    run_tile(p, tile, op, cpu::draft_loss_forward_rows, TORCHSPEC_IF_CUDA(cuda::draft_loss_forward));
  }

  // loss = sum over counted rows of (lse - sum_j p_j z_j / T) / count; sum_j p_j = 1 on those rows.
  at::Tensor loss() const {
    const at::Tensor per_row = at::where(t.counted, lse - dot * inv_temperature, at::zeros({}, lse.options()));
    return (per_row.to(at::kDouble) * t.row_weight.to(at::kDouble)).sum().to(at::kFloat);
  }
};

// Turns a tile of logits into d loss / d logits in place, for an upstream gradient grad_loss:
// d loss / d z[r, v] = row_scale[r] * softmax(z / T)[r, v] - sum_{j: idx_j = v} coef[r, j].
struct GradientRows {
  const Targets& t;
  float inv_temperature;
  at::Tensor row_scale, coef, lse;

  GradientRows(const Targets& targets, float inv_t, const at::Tensor& grad_loss, const at::Tensor& lse_)
      : t(targets),
        inv_temperature(inv_t),
        row_scale((t.row_weight * (grad_loss.reshape({}).to(at::kFloat) * inv_t)).contiguous()),
        coef((t.weights * row_scale.unsqueeze(1)).contiguous()),
        lse(lse_.contiguous()) {}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> draft_topk_kl(const at::Tensor& hidden, const at::Tensor& weight,
                                                             const at::Tensor& teacher_indices,
                                                             const at::Tensor& teacher_logprobs,
                                                             const std::optional<at::Tensor>& valid,
                                                             double temperature) {
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kOp, true);
  const at::OptionalDeviceGuard guard(hidden.device());
  const int64_t N = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor argmax = at::empty({N}, f32.dtype(at::kLong));
  at::Tensor lse = at::empty({N}, f32);
  if (N == 0) return {at::zeros({}, f32), argmax, lse};

  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  ForwardRows rows(t, static_cast<float>(1.0 / temperature), N, f32);
  const int64_t V = weight.size(0);
  for_each_tile(
      gemm_operand(hidden), weight,
      [&](const at::Tensor& tile, const at::Tensor&, int64_t c0, int64_t c1, int64_t r0, int64_t) {
        rows.add_tile(tile, c0, r0, c1 == V, kOp);
      },
      [](int64_t, int64_t) {});
  return {rows.loss(), rows.argmax, rows.lse};
}

std::tuple<at::Tensor, at::Tensor> draft_topk_kl_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                          const at::Tensor& weight, const at::Tensor& teacher_indices,
                                                          const at::Tensor& teacher_logprobs,
                                                          const std::optional<at::Tensor>& valid, const at::Tensor& lse,
                                                          double temperature) {
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kBackwardOp, false);
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCHSPEC_CHECK_ARG(grad_loss.numel() == 1 && at::isFloatingType(grad_loss.scalar_type()), kBackwardOp,
                      "grad_loss must be a floating scalar, got ", grad_loss.scalar_type(), " of shape ",
                      grad_loss.sizes());
  check_same_device(hidden, "hidden", grad_loss, "grad_loss", kBackwardOp);
  check_same_device(hidden, "hidden", lse, "lse", kBackwardOp);
  TORCHSPEC_CHECK_ARG(lse.scalar_type() == at::kFloat && lse.dim() == 1 && lse.size(0) == N, kBackwardOp,
                      "lse must be float32 [N] with N = hidden.size(0) = ", N, ", got ", lse.scalar_type(), " ",
                      lse.sizes());
  const at::OptionalDeviceGuard guard(hidden.device());
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool exact_dtype = hidden.scalar_type() == at::kFloat;
  // float32 inputs: the gradients are accumulated in place; else in float32 and cast at the end.
  at::Tensor grad_hidden = exact_dtype ? at::empty_like(hidden, at::MemoryFormat::Contiguous) : at::empty({N, H}, f32);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (N == 0) return {grad_hidden.zero_().to(hidden.scalar_type()), grad_weight.zero_()};

  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  const GradientRows gradient(t, static_cast<float>(1.0 / temperature), grad_loss, lse);
  const at::Tensor hidden_op = gemm_operand(hidden);
  at::Tensor grad_weight_acc;  // float32 [chunk, H] when grad_weight is not float32

  for_each_tile(
      hidden_op, weight,
      [&](at::Tensor& tile, const at::Tensor& w, int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
        gradient.apply(tile, c0, r0, kBackwardOp);
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

// The forward and both gradients of the loss (for d total / d loss = 1) in one pass: blocks of rows
// (outer) times the whole vocabulary, so that each block's lse is known before its logits turn
// into d loss / d logits in place. Three GEMMs per tile, as eager autograd does; the separate
// backward above needs four (it makes the logits again).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> draft_topk_kl_with_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& valid, double temperature) {
  check_inputs(hidden, weight, teacher_indices, teacher_logprobs, valid, temperature, kWithGradOp, true);
  const at::OptionalDeviceGuard guard(hidden.device());
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool exact_dtype = hidden.scalar_type() == at::kFloat;
  // float32 inputs: the gradients are written in place; else in float32 and cast at the end.
  at::Tensor grad_hidden = at::empty({N, H}, f32);
  at::Tensor grad_weight = at::zeros({V, H}, f32);
  const Targets t = make_targets(teacher_indices, teacher_logprobs, valid);
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  ForwardRows rows(t, inv_temperature, N, f32);
  // rows.lse is filled block by block before gradient reads that block (the same tensor).
  const GradientRows gradient(t, inv_temperature, at::ones({}, f32), rows.lse);
  const at::Tensor hidden_op = gemm_operand(hidden), w = gemm_operand(weight);
  const int64_t row_chunk = std::max<int64_t>(1, lm_head_tile_bytes(hidden.is_cuda()) / (V * 4));
  at::Tensor buffer = at::empty({std::max<int64_t>(1, std::min(N, row_chunk) * V)}, f32);

  for (int64_t r0 = 0; r0 < N; r0 += row_chunk) {
    const int64_t r1 = std::min(N, r0 + row_chunk);
    at::Tensor tile = buffer.narrow(0, 0, (r1 - r0) * V).view({r1 - r0, V});
    const at::Tensor h = hidden_op.slice(0, r0, r1);
    matmul_f32(tile, h, w.t(), false);
    rows.add_tile(tile, 0, r0, true, kWithGradOp);
    gradient.apply(tile, 0, r0, kWithGradOp);
    const at::Tensor g = w.scalar_type() == at::kFloat ? tile : tile.to(w.scalar_type());
    at::Tensor gh = grad_hidden.slice(0, r0, r1);
    matmul_f32(gh, g, w, false);
    matmul_f32(grad_weight, g.t(), h, true);
  }
  const at::Tensor loss = N == 0 ? at::zeros({}, f32) : rows.loss();
  if (!exact_dtype) {
    grad_hidden = grad_hidden.to(hidden.scalar_type());
    grad_weight = grad_weight.to(weight.scalar_type());
  }
  return {loss, rows.argmax, rows.lse, grad_hidden, grad_weight};
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
