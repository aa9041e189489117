// CUDA tile kernels of draft_topk_kl (see common/draft_loss.h): one thread block per row of the
// float32 logits tile. Forward: each thread keeps an online (max, sum of exp) and the best
// (value, index) key over its columns, the block reduces them and merges the result into the
// row's running state; warp 0 adds the teacher entries that fall in the tile. Backward: each
// thread overwrites its columns with the softmax term, then the teacher entries are subtracted
// with atomics (an id may repeat within a row).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace torchspec {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// Each warp's partial forward state, for the block reduction.
struct WarpPartials {
  float m[kWarps], s[kWarps];
  int nan[kWarps];
  uint64_t best[kWarps];
};

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
  // Warp 0 also sums the teacher entries that fall in this tile.
  float dot = 0.0f;
  if (warp == 0) {
    for (int j = lane; j < p.k; j += 32) {
      const int64_t col = p.target_indices[row * p.k + j] - p.col_offset;
      const float w = p.target_weights[row * p.k + j];
      if (col >= 0 && col < p.cols && w != 0.0f) dot += w * z[col];
    }
    dot = warp_sum(dot);
  }
  __syncthreads();
  if (tid != 0) return;
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
  if (p.out_lse != nullptr) p.out_lse[row] = draft_finish_lse(rm, rs, p.inv_temperature);
}

__global__ void __launch_bounds__(kBlock) backward_kernel(DraftLossBackwardTile p) {
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  float* g = p.logits + row * p.ld;
  const float scale = p.row_scale[row];
  if (scale == 0.0f) {
    for (int64_t c = tid; c < p.cols; c += kBlock) g[c] = 0.0f;
    return;
  }
  const float a = p.inv_temperature * kLog2e;
  const float b = p.lse[row] * kLog2e;
  for (int64_t c = tid; c < p.cols; c += kBlock) g[c] = scale * exp2f(g[c] * a - b);
  __syncthreads();  // every softmax term is written before the teacher terms are subtracted
  for (int j = tid; j < p.k; j += kBlock) {
    const int64_t col = p.target_indices[row * p.k + j] - p.col_offset;
    if (col >= 0 && col < p.cols) atomicAdd(g + col, -p.target_coef[row * p.k + j]);
  }
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

}  // namespace cuda
}  // namespace torchspec
