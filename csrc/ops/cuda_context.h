// The CUDA device guard and current stream the launchers use: torch's, or, where the op layer is
// compiled against the CPU emulator (csrc/testing/op_layer_test.cpp, TORCHSPEC_OPS_ON_EMULATOR),
// the emulator's, so that the op layer's guards and streams run there too. CUDA builds only.
#pragma once

#if defined(TORCHSPEC_OPS_ON_EMULATOR)
#include "emulated_cuda_context.h"  // csrc/testing, on the include path of that build only
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace torchspec {

using CudaDeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_cuda_stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace torchspec
#endif
