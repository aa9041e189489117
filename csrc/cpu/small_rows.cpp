// The small-rows linear kernel (common/small_rows.h). A decoding step multiplies a few rows (1 to 17
// here) by every weight, so it is bound by reading the weights from memory once: each weight row is
// read in one pass and multiplied by up to kGroup rows of x (which stay in L1). More rows are done in
// groups over a block of kBlock weight rows, small enough to stay in L2 between the groups, so the
// weights still cross the memory bus once.
#include <algorithm>
#include <cstring>

#include "../common/small_rows.h"
#include "cpu_common.h"
#include "cpu_kernels.h"

namespace torchspec {
namespace cpu {
namespace {

// 8-lane vectors, two per row and step: GCC keeps arrays of these in registers on AVX2 and AVX-512
// alike (arrays of 16-lane vectors are spilled to the stack on AVX2).
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
constexpr int64_t kStep = 16;  // weight elements per step: two 8-lane vectors

constexpr int64_t kGroup = 4;  // rows of x per pass over a weight row (8 sums in registers)
constexpr int64_t kBlock = 32;  // weight rows per block: 32 x 2048 float32 is 256 KiB, within L2

template <ScalarKind W>
__attribute__((always_inline)) inline f32x8 load8(const void* row, int64_t i) {
  if constexpr (W == ScalarKind::kFloat32) {
    f32x8 v;
    std::memcpy(&v, static_cast<const float*>(row) + i, sizeof(v));
    return v;
  } else {  // bfloat16: the upper half of a float32
    u16x8 h;
    std::memcpy(&h, static_cast<const uint16_t*>(row) + i, sizeof(h));
    return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
  }
}

__attribute__((always_inline)) inline float sum_lanes(f32x8 v) {
  const simd::f32x4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (a[0] + a[1]) + (a[2] + a[3]);
}

// out[r, o] for the N rows of x from `x` (and of out from `out`) and weight rows [o_begin, o_end).
template <int N, ScalarKind W>
__attribute__((always_inline)) inline void group_rows(const SmallRowsLinearParams& p, const float* x, float* out,
                                                      int64_t o_begin, int64_t o_end) {
  const int64_t in = p.in_features, vec_end = in / kStep * kStep;
  const size_t row_bytes = static_cast<size_t>(p.weight_stride) * element_size(W);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const void* w = static_cast<const char*>(p.weight) + o * row_bytes;
    f32x8 lo[N] = {}, hi[N] = {};
    for (int64_t i = 0; i < vec_end; i += kStep) {
      const f32x8 w_lo = load8<W>(w, i), w_hi = load8<W>(w, i + 8);
#pragma GCC unroll 4
      for (int r = 0; r < N; ++r) {
        f32x8 x_lo, x_hi;
        std::memcpy(&x_lo, x + r * in + i, sizeof(x_lo));
        std::memcpy(&x_hi, x + r * in + i + 8, sizeof(x_hi));
        lo[r] += w_lo * x_lo;
        hi[r] += w_hi * x_hi;
      }
    }
    for (int r = 0; r < N; ++r) {
      float s = sum_lanes(lo[r] + hi[r]);
      for (int64_t i = vec_end; i < in; ++i) s += x[r * in + i] * load_one(w, W, i);
      out[r * p.out_features + o] = p.bias != nullptr ? s + p.bias[o] : s;
    }
  }
}

template <ScalarKind W>
__attribute__((always_inline)) inline void linear_range(const SmallRowsLinearParams& p, int64_t o_begin,
                                                        int64_t o_end) {
  for (int64_t b = o_begin; b < o_end; b += kBlock) {
    const int64_t e = std::min(o_end, b + kBlock);
    for (int64_t r = 0; r < p.rows; r += kGroup) {
      const float* x = p.x + r * p.in_features;
      float* out = p.out + r * p.out_features;
      switch (std::min(kGroup, p.rows - r)) {
        case 1:
          group_rows<1, W>(p, x, out, b, e);
          break;
        case 2:
          group_rows<2, W>(p, x, out, b, e);
          break;
        case 3:
          group_rows<3, W>(p, x, out, b, e);
          break;
        default:
          group_rows<4, W>(p, x, out, b, e);
          break;
      }
    }
  }
}

TORCHSPEC_CPU_CLONES
void linear_float32(const SmallRowsLinearParams& p, int64_t o_begin, int64_t o_end) {
  linear_range<ScalarKind::kFloat32>(p, o_begin, o_end);
}

TORCHSPEC_CPU_CLONES
void linear_bfloat16(const SmallRowsLinearParams& p, int64_t o_begin, int64_t o_end) {
  linear_range<ScalarKind::kBFloat16>(p, o_begin, o_end);
}

}  // namespace

void small_rows_linear_range(const SmallRowsLinearParams& p, int64_t out_begin, int64_t out_end) {
  if (p.weight_dtype == ScalarKind::kBFloat16) {
    linear_bfloat16(p, out_begin, out_end);
  } else {
    linear_float32(p, out_begin, out_end);
  }
}

}  // namespace cpu
}  // namespace torchspec
