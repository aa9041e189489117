// The op layer's CUDA device guard and current stream (ops/cuda_context.h) where the op layer is
// compiled against the CPU emulator (op_layer_test.cpp): the emulator's current device, and a
// current stream per device that the test sets, as torch.cuda.set_stream does in a real build.
#pragma once

#include "cuda_emulator.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <map>

namespace torchspec {

class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(c10::Device device) {
    TORCH_INTERNAL_ASSERT(device.is_cuda() && device.has_index(), "CudaDeviceGuard needs a CUDA device with an index");
    cudaGetDevice(&previous_);
    TORCH_CHECK(cudaSetDevice(device.index()) == cudaSuccess, "emulated cudaSetDevice(", int(device.index()),
                ") failed");
  }
  ~CudaDeviceGuard() { cudaSetDevice(previous_); }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Per device: the stream torch would call current (the legacy default stream, null, until set).
inline std::map<int, cudaStream_t>& emulated_current_streams() {
  static std::map<int, cudaStream_t> streams;
  return streams;
}

inline cudaStream_t current_cuda_stream() {
  int device = 0;
  cudaGetDevice(&device);
  auto it = emulated_current_streams().find(device);
  return it == emulated_current_streams().end() ? nullptr : it->second;
}

}  // namespace torchspec
