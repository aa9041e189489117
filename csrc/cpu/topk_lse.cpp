// CPU top-k + log-sum-exp: one read of each row, in chunks that stay in L1.
// Per chunk: a vectorised max / NaN scan and exp-sum (the exp is a polynomial so the loop
// vectorises without -ffast-math), then a scalar scan only when the chunk can change the top-k.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"

namespace torchspec {
namespace cpu {
namespace {

using namespace simd;

constexpr int kChunk = 256;  // floats: 1 KiB, in L1 for the passes over it
constexpr int kGroups = kChunk / kLanes;
static_assert(kGroups <= 31, "group bits must fit an int32 mask");

// The k best keys of a stream. Keys above the threshold are appended to a buffer; when it
// fills, nth_element keeps the best k and the k-th becomes the new threshold (cheaper than a heap
// update per accepted key: for random logits most offers arrive while the threshold is low).
class TopK {
 public:
  void reset(size_t k) {
    k_ = k;
    capacity_ = std::max<size_t>(2 * k, k + 256);
    keys_.clear();
    keys_.reserve(capacity_);
    threshold_ = 0;
    has_threshold_ = false;
  }
  // True once k keys above `threshold()` are known; before that every key is taken.
  bool has_threshold() const { return has_threshold_; }
  uint64_t threshold() const { return threshold_; }
  void offer(uint64_t key) {
    if (key <= threshold_) return;
    keys_.push_back(key);
    if (keys_.size() == capacity_) keep_best();
  }
  // The k best keys, sorted best first.
  const std::vector<uint64_t>& finish() {
    if (keys_.size() > k_) keep_best();
    std::sort(keys_.begin(), keys_.end(), std::greater<uint64_t>());
    return keys_;
  }

 private:
  void keep_best() {
    std::nth_element(keys_.begin(), keys_.begin() + (k_ - 1), keys_.end(), std::greater<uint64_t>());
    threshold_ = keys_[k_ - 1];
    keys_.resize(k_);
    has_threshold_ = true;
  }
  std::vector<uint64_t> keys_;
  size_t k_ = 0, capacity_ = 0;
  uint64_t threshold_ = 0;  // keys at or below it are not among the k best
  bool has_threshold_ = false;
};

TORCHSPEC_CPU_CLONES
void rows_impl(const TopkLseParams& p, int64_t row_begin, int64_t row_end) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float exp2_scale = p.inv_temperature * kLog2e;  // 1/T in log2 units
  const size_t esize = element_size(p.dtype);
  TopK top;
  float buf[kChunk];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* row = static_cast<const char*>(p.logits) + r * p.row_stride * esize;
    top.reset(static_cast<size_t>(p.k));
    if (p.seed_values != nullptr) {
      for (int j = 0; j < p.k; ++j) top.offer(make_key(p.seed_values[r * p.k + j], p.seed_indices[r * p.k + j]));
    }
    float m = ninf;  // running raw maximum (NaN ignored)
    float s = 0.0f;  // sum of exp((x - m) / T)
    bool saw_nan = false;
    // Values at or below this can't enter the top k (see the scan below); -inf until known.
    float threshold = ninf;
    for (int64_t c0 = 0; c0 < p.vocab; c0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, p.vocab - c0));
      const float* x = buf;
      if (p.dtype == ScalarKind::kFloat32 && n == kChunk) {
        x = static_cast<const float*>(row) + c0;  // no copy needed
      } else {
        load_chunk(row, p.dtype, c0, n, buf);
        for (int i = n; i < kChunk; ++i) buf[i] = ninf;  // a -inf pad changes neither max nor sum
      }
      // One pass over the chunk in registers: the maximum (NaN ignored), NaN presence, and which
      // 16-lane groups hold a value above the top-k threshold (bit g of `above` for group g).
      f32x16 vmax = f32x16{} + ninf;
      i32x16 vnan = {};
      i32x16 above = {};
#pragma GCC unroll 2
      for (int g = 0; g < kGroups; ++g) {
        f32x16 v;
        std::memcpy(&v, x + g * kLanes, sizeof(v));
        vmax = v > vmax ? v : vmax;  // NaN lanes compare false
        vnan |= v != v;
        above |= (v > threshold) & (1 << g);
      }
      const float cmax = reduce_max(vmax);
      const bool chunk_nan = reduce_or(vnan) != 0;
      const int32_t groups_above = reduce_or(above);
      saw_nan |= chunk_nan;
      lse_add_chunk<kGroups>(x, cmax, exp2_scale, m, s);
      const int64_t base = p.index_offset + c0;
      if (!top.has_threshold() || chunk_nan) {
        for (int i = 0; i < n; ++i) top.offer(make_key(x[i], base + i));
      } else if (groups_above != 0) {
        // Only groups with a value above the threshold; a value equal to it never enters (it has
        // a higher index than the threshold key). Pad lanes are -inf and never above it.
        for (int g = 0; g < kGroups; ++g) {
          if (!(groups_above & (1 << g))) continue;
          for (int i = g * kLanes; i < (g + 1) * kLanes; ++i) {
            if (x[i] > threshold) top.offer(make_key(x[i], base + i));
          }
        }
      }
      if (top.has_threshold()) threshold = key_value(top.threshold());
    }
    float lse = finish_lse(saw_nan, m, s, p.inv_temperature);
    if (p.seed_lse != nullptr) lse = log_add_exp(lse, p.seed_lse[r]);
    const std::vector<uint64_t>& best = top.finish();
    for (int j = 0; j < p.k; ++j) {
      const uint64_t key = best[j];
      const float v = key_value(key);
      p.out_values[r * p.k + j] = p.finalize ? v * p.inv_temperature - lse : v;
      p.out_indices[r * p.k + j] = key_index(key);
    }
    p.out_lse[r] = lse;
  }
}

}  // namespace

void topk_lse_rows(const TopkLseParams& p, int64_t row_begin, int64_t row_end) { rows_impl(p, row_begin, row_end); }

}  // namespace cpu
}  // namespace torchspec
