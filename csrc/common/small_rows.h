// Parameters of the CPU small-rows linear kernel: y = x @ weight.T (+ bias) for the few rows of a
// decoding step. Framework-free: no torch headers.
#pragma once

#include <cstdint>

#include "topk_lse.h"

namespace torchspec {

// out [rows, out_features] = x [rows, in_features] @ weight[:, :in_features].T + bias, float32
// accumulation. x, bias and out are float32 and contiguous; weight's rows are `weight_stride`
// elements apart, of `weight_dtype` (float32 or bfloat16); bias may be null.
struct SmallRowsLinearParams {
  const float* x = nullptr;
  const void* weight = nullptr;
  const float* bias = nullptr;
  float* out = nullptr;
  ScalarKind weight_dtype = ScalarKind::kFloat32;
  int64_t rows = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t weight_stride = 0;
};

}  // namespace torchspec
