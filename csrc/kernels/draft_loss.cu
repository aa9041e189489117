// CUDA kernels of draft_topk_kl (see common/draft_loss.h). Tile kernels: one thread block per row
// of the float32 logits tile. Forward: each thread keeps an online (max, sum of exp) and the best
// (value, index) key over its columns, the block reduces them and merges the result into the
// row's running state; warp 0 adds (and gathers) the teacher entries that fall in the tile.
// Backward: each thread overwrites its columns with the softmax term, then the teacher entries are
// subtracted with atomics (an id may repeat within a row). LK rows: one warp per row, its lanes
// over the row's k entries, in double.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace torchspec {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// Each warp's partial forward state, for the block reduction; the row's lse for the gathered entries.
struct WarpPartials {
  float m[kWarps], s[kWarps];
  int nan[kWarps];
  uint64_t best[kWarps];
  float lse;
};

// Thread 0 of forward_kernel: merges the block's partial state into the row's running state.
__device__ void finish_row(const DraftLossForwardTile& p, int64_t row, float m, float s, bool saw_nan, uint64_t best,
                           float dot, float scale, WarpPartials& red) {
  for (int w = 1; w < kWarps; ++w) {
    lse_combine(m, s, red.m[w], red.s[w], scale);
    saw_nan |= red.nan[w] != 0;
    best = max(best, red.best[w]);
  }
  // Merge with the state of the earlier vocabulary chunks (a NaN sum marks a NaN seen there).
  float rm = p.run_max[row], rs = p.run_sum[row];
  saw_nan |= rs != rs;
  if (saw_nan) {
    rm = fmaxf(rm, m);
    rs = NAN;
  } else {
    lse_combine(rm, rs, m, s, scale);
    if (rm == INFINITY) rs = 1.0f;  // inf - inf made the sum NaN; the lse is +inf (as on the CPU)
  }
  best = max(best, make_key(p.argmax_value[row], p.argmax_index[row]));
  p.run_max[row] = rm;
  p.run_sum[row] = rs;
  p.argmax_value[row] = key_value(best);
  p.argmax_index[row] = key_index(best);
  p.target_dot[row] += dot;
  if (p.out_lse != nullptr) red.lse = p.out_lse[row] = draft_finish_lse(rm, rs, p.inv_temperature);
}

__global__ void __launch_bounds__(kBlock) forward_kernel(DraftLossForwardTile p) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const float* z = p.logits + row * p.ld;
  const float scale = p.inv_temperature * kLog2e;

  float m = -INFINITY, s = 0.0f;
  bool saw_nan = false;
  uint64_t best = 0;  // below every real key
  for (int64_t c = tid; c < p.cols; c += kBlock) {
    const float x = z[c];
    best = max(best, make_key(x, p.col_offset + c));
    if (x != x) {
      saw_nan = true;
      continue;
    }
    if (x > m) {
      s = m == -INFINITY ? 0.0f : s * exp2f((m - x) * scale);
      m = x;
    }
    if (isfinite(m)) s += exp2f((x - m) * scale);
  }
  for (int d = 16; d > 0; d >>= 1) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, d);
    const float s2 = __shfl_xor_sync(0xFFFFFFFFu, s, d);
    saw_nan |= __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(saw_nan), d) != 0;
    best = max(best, __shfl_xor_sync(0xFFFFFFFFu, best, d));
    lse_combine(m, s, m2, s2, scale);
  }
  TORCHSPEC_SHARED(WarpPartials, red);
  if (lane == 0) {
    red.m[warp] = m;
    red.s[warp] = s;
    red.nan[warp] = saw_nan;
    red.best[warp] = best;
  }
  // Warp 0 also sums (and gathers) the teacher entries that fall in this tile.
  const int64_t* ids = p.target_indices + row * p.k;
  float* gathered = p.target_logits == nullptr ? nullptr : p.target_logits + row * p.k;
  float dot = 0.0f;
  if (warp == 0) {
    for (int j = lane; j < p.k; j += 32) {
      const int64_t col = ids[j] - p.col_offset;
      const float w = p.target_weights[row * p.k + j];
      if (col >= 0 && col < p.cols && w != 0.0f) dot += w * z[col];
      if (gathered != nullptr && col >= 0 && col < p.cols) gathered[j] = z[col];
    }
    dot = warp_sum(dot);
  }
  __syncthreads();
  if (tid == 0) finish_row(p, row, m, s, saw_nan, best, dot, scale, red);
  // Last chunk: the gathered logits become log q (every block of the launch takes this branch or none).
  if (p.out_lse == nullptr || gathered == nullptr) return;
  __syncthreads();
  for (int j = tid; j < p.k; j += kBlock) {
    if (ids[j] >= 0) gathered[j] = gathered[j] * p.inv_temperature - red.lse;
  }
}

__global__ void __launch_bounds__(kBlock) backward_kernel(DraftLossBackwardTile p) {
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  float* g = p.logits + row * p.ld;
  const float scale = p.row_scale[row];
  if (scale == 0.0f) {  // zeros (logits unread), minus the non-zero coefficients
    for (int64_t c = tid; c < p.cols; c += kBlock) g[c] = 0.0f;
  } else {
    const float a = p.inv_temperature * kLog2e;
    const float b = p.lse[row] * kLog2e;
    for (int64_t c = tid; c < p.cols; c += kBlock) g[c] = scale * exp2f(g[c] * a - b);
  }
  __syncthreads();  // every softmax term is written before the teacher terms are subtracted
  for (int j = tid; j < p.k; j += kBlock) {
    const int64_t col = p.target_indices[row * p.k + j] - p.col_offset;
    const float c = p.target_coef[row * p.k + j];
    if (col >= 0 && col < p.cols && (scale != 0.0f || c != 0.0f)) atomicAdd(g + col, -c);
  }
}

constexpr int kLKWarps = 8;  // rows per block of lk_rows_kernel

__device__ __forceinline__ double warp_sum_d(double v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);
  return __shfl_sync(0xFFFFFFFFu, v, 0);  // lane 0's sum in every lane (the orders differ by a rounding)
}

// The LK statistics and coefficients of rows (see DraftLossLKRows): one warp per row, lane l takes
// entries l, l + 32, ...; the same three passes as the CPU twin, the sums reduced over the warp.
__global__ void __launch_bounds__(32 * kLKWarps) lk_rows_kernel(DraftLossLKRows p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLKWarps + (threadIdx.x >> 5);
  if (r >= p.rows) return;  // a whole warp
  const float* log_q = p.draft_logprobs + r * p.k;
  const float* prob = p.accept_prob + r * p.k;
  double sum_q = 0.0, m = -INFINITY;
  for (int j = lane; j < p.k; j += 32) {
    if (!lk_counts(prob[j])) continue;
    sum_q += exp(static_cast<double>(log_q[j]));
    m = lk_max(m, lk_log_min(log_q[j], log(static_cast<double>(prob[j]))));
  }
  sum_q = warp_sum_d(sum_q);
  for (int d = 16; d > 0; d >>= 1) m = lk_max(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
  double s = 0.0;
  if (m > -INFINITY) {
    for (int j = lane; j < p.k; j += 32) {
      if (lk_counts(prob[j])) s += exp(lk_log_min(log_q[j], log(static_cast<double>(prob[j]))) - m);
    }
  }
  s = warp_sum_d(s);
  double tail_side;
  const double log_a = lk_log_accept(m, s, sum_q, p.tail[r], &tail_side);
  if (lane == 0) {
    p.accept[r] = static_cast<float>(exp(log_a));
    p.neg_log_accept[r] = log_a == -INFINITY ? 0.0f : static_cast<float>(-log_a);
  }
  if (p.coef == nullptr) return;
  float* coef = p.coef + r * p.k;
  const double scale = p.grad_scale[r];
  const bool alpha = p.kind == DraftLossKind::kLKAlpha;
  if (scale == 0.0 || (alpha && log_a == -INFINITY)) {
    for (int j = lane; j < p.k; j += 32) coef[j] = 0.0f;
    if (lane == 0) p.row_scale[r] = 0.0f;
    return;
  }
  const double w = alpha ? 0.0 : *p.lambda_weight;
  double sum_cq = 0.0;
  for (int j = lane; j < p.k; j += 32) {
    double cq = 0.0;
    if (lk_counts(prob[j])) {
      const double side = log_q[j] < log(static_cast<double>(prob[j])) ? 1.0 : 0.0;
      cq = (side - tail_side) * exp(log_q[j] - (alpha ? log_a : 0.0));
      sum_cq += cq;
    }
    coef[j] = static_cast<float>(alpha ? scale * cq : scale * (w * p.kl_weights[r * p.k + j] + (1.0 - w) * cq));
  }
  sum_cq = warp_sum_d(sum_cq);
  if (lane == 0) p.row_scale[r] = static_cast<float>(alpha ? scale * sum_cq : scale * (w + (1.0 - w) * sum_cq));
}

}  // namespace

cudaError_t draft_loss_forward(const DraftLossForwardTile& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  TORCHSPEC_LAUNCH(forward_kernel, static_cast<unsigned>(p.rows), kBlock, 0, stream)(p);
  return cudaGetLastError();
}

cudaError_t draft_loss_backward(const DraftLossBackwardTile& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  TORCHSPEC_LAUNCH(backward_kernel, static_cast<unsigned>(p.rows), kBlock, 0, stream)(p);
  return cudaGetLastError();
}

cudaError_t draft_loss_lk_rows(const DraftLossLKRows& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((p.rows + kLKWarps - 1) / kLKWarps);
  TORCHSPEC_LAUNCH(lk_rows_kernel, blocks, 32 * kLKWarps, 0, stream)(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace torchspec
