// Parameters and key encoding shared by the CPU and CUDA top-k / log-sum-exp kernels.
// Framework-free: no torch, no CUDA headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TORCHSPEC_HD __host__ __device__ __forceinline__
#else
#define TORCHSPEC_HD inline
#endif

namespace torchspec {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One launch of the top-k / log-sum-exp kernel over `rows` rows of `vocab` logits.
// Row r starts at logits + r * row_stride (elements); columns are contiguous.
// With seeds (all three non-null), each row starts from an earlier partial result over other
// columns (the vocabulary chunks of linear_topk_logprobs), so the output is the merge of both.
// finalize = false: out_values holds raw logits (for merging, seeds take this form);
// finalize = true:  out_values holds logits / T - lse, the final log-probabilities.
struct TopkLseParams {
  const void* logits = nullptr;
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;
  int k = 1;
  float inv_temperature = 1.0f;
  int64_t index_offset = 0;  // added to every column index (the chunk's first vocabulary id)
  const float* seed_values = nullptr;  // [rows, k] raw logits, sorted descending
  const int64_t* seed_indices = nullptr;  // [rows, k]
  const float* seed_lse = nullptr;  // [rows], already divided by T
  float* out_values = nullptr;  // [rows, k]; may alias seed_values
  int64_t* out_indices = nullptr;  // [rows, k]; may alias seed_indices
  float* out_lse = nullptr;  // [rows]; may alias seed_lse
  bool finalize = true;
};

// 1 / ln 2: the kernels compute exp(x) as exp2(x * kLog2e).
constexpr float kLog2e = 1.4426950408889634f;

// Largest k the kernels support (the op's documented limit).
constexpr int kMaxTopK = 1024;

// Total order used for selection: larger value first, NaN above +inf (as torch.topk), and among
// equal values the lower index first. Encoded in one 64-bit key so that "better" == "greater":
// high word = float bits mapped to an unsigned order, low word = ~index.
TORCHSPEC_HD uint32_t order_bits(float v) {
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(v);
#else
  __builtin_memcpy(&b, &v, 4);
#endif
  if (v != v) return 0xFFFFFFFFu;  // every NaN is the largest
  if (v == 0.0f) return 0x80000000u;  // -0 ties with +0 (then the lower index wins), as the reference
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

TORCHSPEC_HD float value_from_order_bits(uint32_t o) {
  uint32_t b = (o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o;
  if (o == 0xFFFFFFFFu) b = 0x7FC00000u;  // canonical NaN
  float v;
#if defined(__CUDA_ARCH__)
  v = __uint_as_float(b);
#else
  __builtin_memcpy(&v, &b, 4);
#endif
  return v;
}

TORCHSPEC_HD uint64_t make_key(float v, int64_t index) {
  return (static_cast<uint64_t>(order_bits(v)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

TORCHSPEC_HD float key_value(uint64_t key) { return value_from_order_bits(static_cast<uint32_t>(key >> 32)); }

TORCHSPEC_HD int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// log(sum exp(x / T)) from the raw running maximum m and s = sum exp((x - m) / T); the
// non-finite cases are decided as the float64 reference decides them (NaN wins, then +inf).
TORCHSPEC_HD float finish_lse(bool saw_nan, float m, float s, float inv_temperature) {
  if (saw_nan) return NAN;
  if (m == INFINITY || m == -INFINITY) return m;
  return m * inv_temperature + logf(s);
}

// log(exp(a) + exp(b)) for two partial log-sum-exps, with the same non-finite rules.
TORCHSPEC_HD float log_add_exp(float a, float b) {
  if (a != a || b != b) return NAN;
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  if (hi == INFINITY || hi == -INFINITY) return hi;
  return hi + log1pf(expf(lo - hi));
}

// Combine two partial (max, sum) pairs of the online log-sum-exp, where s = sum exp2((x - m) * scale)
// (scale is 1/T in log2 units); the merged pair is left in (m, s).
TORCHSPEC_HD void lse_combine(float& m, float& s, float m2, float s2, float scale) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) {
    m = mx;
    s = 0.0f;
    return;
  }
  s = s * exp2f((m - mx) * scale) + s2 * exp2f((m2 - mx) * scale);
  m = mx;
}

}  // namespace torchspec
