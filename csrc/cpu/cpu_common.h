// Helpers shared by the CPU kernel files (internal to csrc/cpu; framework-free): the x86 target
// clones, float bit casts, the bfloat16 / float16 conversions and row loads / stores, and (in
// namespace simd) 16-lane GCC/Clang float vectors with a polynomial exp2, horizontal reductions
// and an online log-sum-exp step, so that hot loops vectorise without -ffast-math.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/topk_lse.h"

// The 64-byte vector types below are internal to the CPU kernels (never passed across an ABI
// boundary); GCC's note about their ABI does not concern us.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TORCHSPEC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHSPEC_CPU_CLONES
#endif

namespace torchspec {
namespace cpu {

inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

inline float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normal and subnormal halves: shift into a float's mantissa and rescale the exponent by 2^112.
  float mag = bits_float(em << 13) * 5.192296858534828e33f;
  if (em >= 0x7C00u) mag = bits_float((em << 13) | 0x7F800000u);  // inf and NaN
  return bits_float(float_bits(mag) | sign);
}

// Round to nearest even, NaN kept quiet.
inline uint16_t float_to_bfloat16(float v) {
  const uint32_t b = float_bits(v);
  if (v != v) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Round to nearest even, with overflow to inf, subnormals and NaN.
inline uint16_t float_to_half(float v) {
  const uint32_t b = float_bits(v);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;  // NaN
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half, exact rounding by the FPU
    const float scaled = bits_float(abs) * 16777216.0f;  // * 2^24: the subnormal's integer mantissa
    return sign | static_cast<uint16_t>(__builtin_nearbyintf(scaled));
  }
  const uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline size_t element_size(ScalarKind dtype) { return dtype == ScalarKind::kFloat32 ? 4 : 2; }

// n elements of `dtype` from row + begin (elements) as floats.
inline void load_chunk(const void* row, ScalarKind dtype, int64_t begin, int64_t n, float* out) {
  switch (dtype) {
    case ScalarKind::kFloat32: {
      const float* src = static_cast<const float*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = src[i];
      break;
    }
    case ScalarKind::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = bits_float(static_cast<uint32_t>(src[i]) << 16);
      break;
    }
    case ScalarKind::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(row) + begin;
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(src[i]);
      break;
    }
  }
}

// One element of `dtype` at data + index, as a float.
inline float load_one(const void* data, ScalarKind dtype, int64_t index) {
  float v;
  load_chunk(data, dtype, index, 1, &v);
  return v;
}

// n floats stored as `dtype` at row + begin (elements).
inline void store_chunk(const float* in, int64_t n, ScalarKind dtype, void* row, int64_t begin) {
  switch (dtype) {
    case ScalarKind::kFloat32:
      std::memcpy(static_cast<float*>(row) + begin, in, n * sizeof(float));
      break;
    case ScalarKind::kBFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(row)[begin + i] = float_to_bfloat16(in[i]);
      break;
    case ScalarKind::kFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(row)[begin + i] = float_to_half(in[i]);
      break;
  }
}

namespace simd {

constexpr int kLanes = 16;

// 16 floats as one GCC/Clang vector: each target clone lowers it to its own SIMD instructions
// (one AVX-512 register, two AVX2 registers: enough independent work either way).
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// 2^y for y <= 0, 16 lanes (relative error about 2e-7); results below 2^-125 are not exact but
// tiny. A NaN lane gives an unspecified value: rows holding NaN get lse = NaN anyway.
__attribute__((always_inline)) inline f32x16 exp2_nonpositive(f32x16 y) {
  y = y < -125.0f ? f32x16{} - 125.0f : y;
  const f32x16 shifted = y + 12582912.0f;  // 1.5 * 2^23: rounds y to an integer in the low bits
  const u32x16 n = (u32x16)shifted - 0x4B400000u;
  const f32x16 f = y - (shifted - 12582912.0f);  // in [-0.5, 0.5]
  f32x16 p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return (f32x16)((u32x16)p + (n << 23));
}

// Horizontal reductions by halving (lane-by-lane extraction compiles to far slower code).
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

__attribute__((always_inline)) inline float reduce_sum(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[1]) + (b[2] + b[3]);
}

// Maximum of lanes that hold no NaN.
__attribute__((always_inline)) inline float reduce_max(f32x16 v) {
  const f32x8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x8 a = lo > hi ? lo : hi;
  const f32x4 b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3), b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f32x4 b = b0 > b1 ? b0 : b1;
  const float c0 = b[0] > b[1] ? b[0] : b[1], c1 = b[2] > b[3] ? b[2] : b[3];
  return c0 > c1 ? c0 : c1;
}

__attribute__((always_inline)) inline int32_t reduce_or(i32x16 v) {
  const i32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) |
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const i32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) | __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] | b[1]) | (b[2] | b[3]);
}

// One chunk of `groups` 16-float groups into an online log-sum-exp (m = running maximum, s = sum of
// exp2((x - m) * exp2_scale)), given the chunk's maximum cmax (NaN ignored; NaN is tracked apart).
template <int groups>
__attribute__((always_inline)) inline void lse_add_chunk(const float* x, float cmax, float exp2_scale, float& m,
                                                         float& s) {
  if (cmax > m) {
    s = (m == -std::numeric_limits<float>::infinity()) ? 0.0f : s * std::exp2((m - cmax) * exp2_scale);
    m = cmax;
  }
  if (std::isfinite(m)) {
    f32x16 vsum = {};
#pragma GCC unroll 2
    for (int g = 0; g < groups; ++g) {
      f32x16 v;
      std::memcpy(&v, x + g * kLanes, sizeof(v));
      vsum += exp2_nonpositive((v - m) * exp2_scale);
    }
    s += reduce_sum(vsum);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace torchspec
