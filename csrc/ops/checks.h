// Argument checks shared by the torch-facing launchers: each message names the argument.
#pragma once

#include <ATen/ATen.h>

#include "../common/topk_lse.h"

#define TORCHSPEC_CHECK_ARG(cond, op, ...) TORCH_CHECK(cond, "torchspec.", op, ": ", __VA_ARGS__)

namespace torchspec {

// The kernels' element type for a floating tensor, or a clear error.
inline ScalarKind float_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kFloat16;
    default:
      TORCH_CHECK(false, "torchspec.", op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_device_supported(const at::Tensor& t, const char* op, const char* name) {
  TORCHSPEC_CHECK_ARG(t.is_cpu() || t.is_cuda(), op, name, " must be on a CPU or CUDA device, got ", t.device());
#ifndef TORCHSPEC_WITH_CUDA
  TORCHSPEC_CHECK_ARG(!t.is_cuda(), op, name,
                      " is on CUDA but torchspec_ext was built without CUDA (set TORCHSPEC_BUILD_CUDA=1 and "
                      "reinstall on a machine with the CUDA toolkit)");
#endif
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCHSPEC_CHECK_ARG(a.device() == b.device(), op, a_name, " and ", b_name, " must be on the same device, got ",
                      a.device(), " and ", b.device());
}

inline void check_topk_k(int64_t k, int64_t vocab, const char* op) {
  TORCHSPEC_CHECK_ARG(vocab >= 1, op, "the vocabulary (last) dimension must not be empty");
  TORCHSPEC_CHECK_ARG(vocab < (int64_t{1} << 31), op, "the vocabulary size must be below 2^31, got ", vocab);
  TORCHSPEC_CHECK_ARG(k >= 1 && k <= std::min<int64_t>(vocab, kMaxTopK), op, "k must be in [1, min(V, ", kMaxTopK,
                      ")] = [1, ", std::min<int64_t>(vocab, kMaxTopK), "], got k=", k, " with V=", vocab);
}

// The kernels scale by float(1 / temperature), so that must be a normal float32 number too.
inline void check_temperature(double temperature, const char* op, const char* hint = "") {
  const float inverse = static_cast<float>(1.0 / temperature);
  TORCHSPEC_CHECK_ARG(temperature > 0.0 && std::isfinite(temperature) && std::isnormal(inverse), op,
                      "temperature must be a finite number > 0 whose inverse is a float32 number (about 1e-38 to "
                      "1e38)",
                      hint, ", got ", temperature);
}

}  // namespace torchspec
