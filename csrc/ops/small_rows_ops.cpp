// torch-facing launcher of small_rows_linear: x @ weight.T + bias for the few rows of a decoding
// step, by the CPU kernel that reads each weight once (cpu/small_rows.cpp). On CUDA it is
// at::linear: cuBLAS already reads the weight once for a few rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/small_rows.h"
#include "../cpu/cpu_kernels.h"
#include "checks.h"

namespace torchspec {
namespace {

at::Tensor small_rows_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "small_rows_linear";
  TORCHSPEC_CHECK_ARG(weight.dim() == 2, op, "weight must be 2-D [out, in], got ", weight.dim(), " dimensions");
  TORCHSPEC_CHECK_ARG(x.dim() >= 1, op, "x must be [..., in], got a 0-D tensor");
  const int64_t in = weight.size(1), out_features = weight.size(0);
  TORCHSPEC_CHECK_ARG(x.size(-1) == in, op, "x's last dimension (", x.size(-1), ") must be weight's in (", in,
                      "): weight is [out, in] = ", weight.sizes());
  check_device_supported(x, op, "x");
  check_same_device(x, "x", weight, "weight", op);
  TORCHSPEC_CHECK_ARG(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                      "x must be float32 or bfloat16, got ", x.scalar_type());
  // A float32 x may also read a bfloat16 weight (a copy at half the bytes); the result is float32.
  const bool mixed = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16;
  TORCHSPEC_CHECK_ARG(weight.scalar_type() == x.scalar_type() || mixed, op, "weight must have x's dtype (",
                      x.scalar_type(), ") or, for a float32 x, be bfloat16; got ", weight.scalar_type());
  if (bias.has_value()) {
    check_same_device(x, "x", *bias, "bias", op);
    TORCHSPEC_CHECK_ARG(bias->dim() == 1 && bias->size(0) == out_features, op, "bias must be [out] = [", out_features,
                        "], got ", bias->sizes());
    TORCHSPEC_CHECK_ARG(bias->scalar_type() == x.scalar_type(), op, "bias must have x's dtype (", x.scalar_type(),
                        "), got ", bias->scalar_type());
  }
  if (x.is_cuda()) return at::linear(x, weight.to(x.scalar_type()), bias);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(out_features);
  const at::Tensor x32 = x.reshape({-1, in}).to(at::kFloat).contiguous();  // a few rows: the copy is free
  const at::Tensor w = weight.stride(1) == 1 && weight.stride(0) >= in ? weight : weight.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({x32.size(0), out_features}, x32.options());
  SmallRowsLinearParams p;
  p.x = x32.data_ptr<float>();
  p.weight = w.data_ptr();
  p.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.weight_dtype = weight.scalar_type() == at::kBFloat16 ? ScalarKind::kBFloat16 : ScalarKind::kFloat32;
  p.rows = x32.size(0);
  p.in_features = in;
  p.out_features = out_features;
  p.weight_stride = w.stride(0);
  if (p.rows > 0) {
    // Tasks of at least 32 weight rows (the kernel's block) and about 2^15 weight elements.
    const int64_t grain = std::max<int64_t>(32, (int64_t{1} << 15) / std::max<int64_t>(in, 1));
    at::parallel_for(0, out_features, grain,
                     [&](int64_t begin, int64_t end) { cpu::small_rows_linear_range(p, begin, end); });
  }
  return out.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchspec, CPU, m) { m.impl("small_rows_linear", &small_rows_linear); }

#ifdef TORCHSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(torchspec, CUDA, m) { m.impl("small_rows_linear", &small_rows_linear); }
#endif

}  // namespace torchspec
