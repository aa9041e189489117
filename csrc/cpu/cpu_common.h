// Helpers shared by the CPU kernel files (internal; framework-free): float bit casts, the
// bfloat16 / float16 conversions and the x86 target clones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../common/topk_lse.h"

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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TORCHSPEC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHSPEC_CPU_CLONES
#endif

}  // namespace cpu
}  // namespace torchspec
