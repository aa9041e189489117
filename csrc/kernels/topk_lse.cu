// CUDA top-k + log-sum-exp: one thread block per row, one read of the row.
//
// Each tile of the row is read with 16-byte loads; every element updates the thread's running
// (max, sum of exp) and is offered to a shared-memory candidate buffer if it beats the block's
// threshold, a lower bound of the row's k-th largest key. When the buffer could overflow on the
// next tile, a radix select over the 64-bit keys finds the exact k-th largest, the buffer is
// compacted to those k and the threshold rises. For ordinary logits the threshold is tight
// after a few tiles and almost nothing is offered afterwards.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace torchspec {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// Shared state of one block, besides the dynamically sized candidate buffer.
struct BlockState {
  int count;
  int hist[256];
  int warp_sums[kWarps];
  uint64_t threshold_key;  // keys below it can never be in the top k
  float threshold_value;  // the value part of threshold_key, for a cheap first test
  int sel_bin, sel_above, sel_bin_count;
  float red_m[kWarps], red_s[kWarps];
  int red_nan[kWarps];
};

// Block-wide offer of one key per thread: warp-aggregated slots in the candidate buffer.
__device__ __forceinline__ void offer(bool want, uint64_t key, uint64_t* cand, BlockState& st) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, want);
  if (ballot == 0) return;
  int base = 0;
  if (lane == 0) base = atomicAdd(&st.count, __popc(ballot));
  base = __shfl_sync(0xFFFFFFFFu, base, 0);
  if (want) cand[base + __popc(ballot & ((1u << lane) - 1u))] = key;
}

// Exact k-th largest of the c keys in cand (c > k, keys unique), then keep only keys >= it.
// Called by the whole block; leaves exactly k keys and raises the threshold.
__device__ void compact(uint64_t* cand, int c, int k, BlockState& st) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  uint64_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kBlock) st.hist[b] = 0;
    __syncthreads();
    for (int i = tid; i < c; i += kBlock) {
      const uint64_t key = cand[i];
      if ((key & mask) == prefix) atomicAdd(&st.hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns bins 255-8l .. 248-8l, so lanes run from the largest digit down.
      int own = 0;
      for (int j = 0; j < 8; ++j) own += st.hist[255 - 8 * lane - j];
      int incl = own;
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xFFFFFFFFu, incl, d);
        if (lane >= d) incl += up;
      }
      const int excl = incl - own;
      if (excl < remaining && remaining <= incl) {
        int above = excl;
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - 8 * lane - j;
          const int n = st.hist[bin];
          if (above + n >= remaining) {
            st.sel_bin = bin;
            st.sel_above = above;
            st.sel_bin_count = n;
            break;
          }
          above += n;
        }
      }
    }
    __syncthreads();
    const int bin = st.sel_bin;
    remaining -= st.sel_above;
    prefix |= static_cast<uint64_t>(bin) << shift;
    mask |= static_cast<uint64_t>(255) << shift;
    // Every key with this prefix is wanted: the prefix (low bits zero) is the threshold.
    if (st.sel_bin_count == remaining) break;
    __syncthreads();  // sel_* are rewritten by the next pass
  }
  const uint64_t threshold = prefix;
  // Stable in-place compaction: a kept key moves only to a lower or equal position.
  int written = 0;
  for (int base = 0; base < c; base += kBlock) {
    const int i = base + tid;
    const uint64_t key = i < c ? cand[i] : 0;
    const bool keep = i < c && key >= threshold;
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, keep);
    __syncthreads();  // every read of this round precedes any write; warp_sums is free again
    if (lane == 0) st.warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int offset = written, total = written;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) offset += st.warp_sums[w];
      total += st.warp_sums[w];
    }
    if (keep) cand[offset + __popc(ballot & ((1u << lane) - 1u))] = key;
    written = total;
  }
  __syncthreads();
  if (tid == 0) {
    st.count = written;  // == k
    st.threshold_key = threshold;
    st.threshold_value = key_value(threshold);
  }
  __syncthreads();
}

// Sort the first n keys of cand descending (n <= capacity), padding to a power of two with 0.
__device__ void sort_descending(uint64_t* cand, int n) {
  int n2 = 1;
  while (n2 < n) n2 <<= 1;
  for (int i = n + threadIdx.x; i < n2; i += kBlock) cand[i] = 0;
  __syncthreads();
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n2 / 2; t += kBlock) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = cand[lo], b = cand[hi];
        if ((a < b) == descending) {
          cand[lo] = b;
          cand[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) topk_lse_kernel(TopkLseParams p, int capacity) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kTile = kBlock * kVec;
  TORCHSPEC_EXTERN_SHARED(uint64_t, cand);
  TORCHSPEC_SHARED(BlockState, st);

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const T* rowp = static_cast<const T*>(p.logits) + row * p.row_stride;
  const int k = p.k;
  const float scale = p.inv_temperature * kLog2e;

  if (tid == 0) {
    st.count = 0;
    st.threshold_key = 0;
    st.threshold_value = -INFINITY;
  }
  if (p.seed_values != nullptr) {
    for (int j = tid; j < k; j += kBlock) cand[j] = make_key(p.seed_values[row * k + j], p.seed_indices[row * k + j]);
    if (tid == 0) st.count = k;
  }
  __syncthreads();

  float m = -INFINITY, s = 0.0f;
  bool saw_nan = false;
  // Head (until 16-byte alignment) and tail: fewer than 2 * kVec elements, offered unconditionally.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(rowp);
  const int64_t head = min(p.vocab, static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T)));
  const int64_t nvec = (p.vocab - head) / kVec;
  const int64_t tail_begin = head + nvec * kVec;
  const int64_t n_edge = head + (p.vocab - tail_begin);
  if (tid < 32) {  // one warp: offer() needs whole warps
    for (int64_t e = tid; e < ((n_edge + 31) / 32) * 32; e += 32) {
      const bool valid = e < n_edge;
      const int64_t col = e < head ? e : tail_begin + (e - head);
      float x = -INFINITY;
      if (valid) {
        x = Elem<T>::to_float(rowp[col]);
        saw_nan |= x != x;
        float xm = x != x ? -INFINITY : x;
        lse_combine(m, s, xm, xm == -INFINITY ? 0.0f : 1.0f, scale);
      }
      offer(valid, make_key(x, col + p.index_offset), cand, st);
    }
  }
  __syncthreads();

  using Vec = uint4;
  const Vec* vecp = reinterpret_cast<const Vec*>(rowp + head);
  uint64_t thr_key = st.threshold_key;
  float thr_val = st.threshold_value;
  Vec cur = tid < nvec ? __ldcs(vecp + tid) : Vec{};
  for (int64_t base = 0; base < nvec; base += kBlock) {
    const int64_t i = base + tid;
    Vec next = Vec{};
    if (i + kBlock < nvec) next = __ldcs(vecp + i + kBlock);  // in flight while this tile runs
    const bool active = i < nvec;
    float x[kVec];
    const T* e = reinterpret_cast<const T*>(&cur);
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = active ? Elem<T>::to_float(e[j]) : -INFINITY;
    float vmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      vmax = fmaxf(vmax, x[j]);  // fmaxf ignores NaN
      saw_nan |= x[j] != x[j];
    }
    if (vmax > m) {
      s = m == -INFINITY ? 0.0f : s * exp2f((m - vmax) * scale);
      m = vmax;
    }
    if (isfinite(m)) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s += exp2f((x[j] - m) * scale);
    }
    const int64_t col0 = head + i * kVec + p.index_offset;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      bool want = active && !(x[j] < thr_val);  // cheap test first; NaN passes it
      const uint64_t key = want ? make_key(x[j], col0 + j) : 0;
      want = want && key >= thr_key;
      offer(want, key, cand, st);
    }
    __syncthreads();
    const int c = st.count;
    if (c > capacity - kTile) compact(cand, c, k, st);
    __syncthreads();  // every thread has read count before the next tile adds to it
    thr_key = st.threshold_key;
    thr_val = st.threshold_value;
    cur = next;
  }

  // Reduce the per-thread (max, sum, nan) over the block.
  for (int d = 16; d > 0; d >>= 1) {
    const float m2 = __shfl_xor_sync(0xFFFFFFFFu, m, d);
    const float s2 = __shfl_xor_sync(0xFFFFFFFFu, s, d);
    saw_nan |= __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(saw_nan), d) != 0;
    lse_combine(m, s, m2, s2, scale);
  }
  if ((tid & 31) == 0) {
    st.red_m[tid >> 5] = m;
    st.red_s[tid >> 5] = s;
    st.red_nan[tid >> 5] = saw_nan;
  }
  __syncthreads();
  const int c = st.count;
  __syncthreads();
  if (c > k) compact(cand, c, k, st);
  sort_descending(cand, k);
  TORCHSPEC_SHARED(float, row_lse);
  if (tid == 0) {
    float bm = st.red_m[0], bs = st.red_s[0];
    bool bnan = st.red_nan[0] != 0;
    for (int w = 1; w < kWarps; ++w) {
      lse_combine(bm, bs, st.red_m[w], st.red_s[w], scale);
      bnan |= st.red_nan[w] != 0;
    }
    float lse = finish_lse(bnan, bm, bs, p.inv_temperature);
    if (p.seed_lse != nullptr) lse = log_add_exp(lse, p.seed_lse[row]);
    row_lse = lse;
    p.out_lse[row] = lse;
  }
  __syncthreads();
  const float lse = row_lse;
  for (int j = tid; j < k; j += kBlock) {
    const uint64_t key = cand[j];
    const float v = key_value(key);
    p.out_values[row * k + j] = p.finalize ? v * p.inv_temperature - lse : v;
    p.out_indices[row * k + j] = key_index(key);
  }
}

template <typename T>
cudaError_t launch(const TopkLseParams& p, cudaStream_t stream) {
  constexpr int kTile = kBlock * (16 / sizeof(T));
  // Room for the k kept keys (or seeds), the unaligned edges and two tiles of new offers.
  const int capacity = p.k + 2 * kTile + 32;
  const size_t smem = static_cast<size_t>(capacity) * sizeof(uint64_t);
  const cudaError_t err = allow_dynamic_smem(topk_lse_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  TORCHSPEC_LAUNCH(topk_lse_kernel<T>, static_cast<unsigned>(p.rows), kBlock, smem, stream)(p, capacity);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_lse(const TopkLseParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace torchspec
