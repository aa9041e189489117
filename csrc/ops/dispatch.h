// Running a kernel on the tensors' device, shared by the torch-facing launchers: the CPU kernel
// split by at::parallel_for, or the CUDA kernel on the current stream with its error checked.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"

#ifdef TORCHSPEC_WITH_CUDA
#include "../kernels/cuda_kernels.h"
#include "cuda_context.h"
#include "device_errors.h"
#endif

// The CUDA launch argument of run_on_device: the expression itself in a CUDA build, nullptr in a
// CPU-only one (where the cuda:: kernels it names do not exist).
#ifdef TORCHSPEC_WITH_CUDA
#define TORCHSPEC_IF_CUDA(...) __VA_ARGS__
#else
#define TORCHSPEC_IF_CUDA(...) nullptr
#endif

namespace torchspec {

// at::parallel_for grain for rows of `row_elements` elements: about `task_elements` per task
// (a few rows of tens of thousands of elements already amortise the dispatch).
inline int64_t row_grain(int64_t row_elements, int64_t task_elements = 16384) {
  return std::max<int64_t>(1, task_elements / std::max<int64_t>(row_elements, 1));
}

// Runs a kernel over work items [0, n) on the device of `like`; nothing for n == 0.
//   CPU:  at::parallel_for(0, n, grain, cpu_range), cpu_range(begin, end) doing [begin, end);
//   CUDA: n must be below 2^31 when `items` names them (one thread block each; nullptr: the caller
//         checks its own grid), then, under a device guard, an input error that an earlier kernel
//         found on the device is raised (device_errors.h), and cuda_launch(stream) on the current
//         stream returns the launch's cudaError_t: a failure is "torchspec.<op>: CUDA kernel
//         failed: ...". cuda_launch may check arguments and query the device first.
// Pass cuda_launch as TORCHSPEC_IF_CUDA(...).
template <class CpuRange, class CudaLaunch>
void run_on_device(const at::Tensor& like, int64_t n, int64_t grain, const char* op, const char* items,
                   const CpuRange& cpu_range, const CudaLaunch& cuda_launch) {
  if (n == 0) return;
  if (like.is_cpu()) {
    at::parallel_for(0, n, grain, cpu_range);
    return;
  }
#ifdef TORCHSPEC_WITH_CUDA
  if (items != nullptr) {
    TORCHSPEC_CHECK_ARG(n < (int64_t{1} << 31), op, "at most 2^31 - 1 ", items, " on CUDA, got ", n);
  }
  const CudaDeviceGuard guard(like.device());
  raise_device_error(like.get_device(), op);
  const cudaError_t err = cuda_launch(current_cuda_stream());
  TORCH_CHECK(err == cudaSuccess, "torchspec.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
#else
  (void)op;
  (void)items;
  (void)cuda_launch;
#endif
}

}  // namespace torchspec
