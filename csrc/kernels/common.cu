// Launch support shared by the CUDA kernel files (framework-free): the shared-memory opt-in of the
// launchers (allow_dynamic_smem, cuda_common.cuh) and the input checks of an index tensor and of a
// bound on values.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace torchspec {
namespace cuda {

namespace {

std::mutex& raised_mutex() {
  static std::mutex m;
  return m;
}

// The (kernel, device) pairs whose shared-memory attribute is set.
std::set<std::pair<const void*, int>>& raised() {
  static std::set<std::pair<const void*, int>> s;
  return s;
}

constexpr int kCheckThreads = 256;

// Every id of ids [n] (row-major, `cols` per row) in [low, limit), else the first bad one found
// (in no particular order) is recorded.
__global__ void __launch_bounds__(kCheckThreads)
    index_range_kernel(const int64_t* ids, int64_t n, int64_t cols, int64_t low, int64_t limit, DeviceErrorOp op,
                       DeviceErrorRecord* rec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kCheckThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kCheckThreads + threadIdx.x; i < n; i += stride) {
    const int64_t v = ids[i];
    if (v < low || v >= limit)
      record_device_error(rec, op, DeviceErrorKind::kIndexRange, i / cols, i % cols, v, low, limit);
  }
}

// Every value of values [n] at most `limit` (NaN passes), else the first bad one found (in no
// particular order) is recorded, the float64 bits of the value and of the limit in the record.
__global__ void __launch_bounds__(kCheckThreads)
    at_most_kernel(const float* values, int64_t n, float limit, DeviceErrorOp op, DeviceErrorRecord* rec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kCheckThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kCheckThreads + threadIdx.x; i < n; i += stride) {
    const float v = values[i];
    if (v > limit) {
      record_device_error(rec, op, DeviceErrorKind::kAtMost, i, 0, __double_as_longlong(v), 0,
                          __double_as_longlong(limit));
    }
  }
}

}  // namespace

cudaError_t allow_dynamic_smem_of(const void* kernel, size_t dynamic) {
  cudaFuncAttributes attr;
  int device = 0, optin = 0;
  cudaError_t err = dynamic > 0x7FFFFFFF ? cudaErrorInvalidValue : cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess && attr.sharedSizeBytes + dynamic <= 48 * 1024) return cudaSuccess;
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess && attr.sharedSizeBytes + dynamic > static_cast<size_t>(optin)) err = cudaErrorInvalidValue;
  if (err == cudaSuccess) {
    // Set once per (kernel, device); concurrent first calls all set the same value.
    std::lock_guard<std::mutex> lock(raised_mutex());
    if (raised().count({kernel, device}) == 0) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 optin - static_cast<int>(attr.sharedSizeBytes));
      if (err == cudaSuccess) raised().insert({kernel, device});
    }
  }
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

cudaError_t check_index_range(const int64_t* ids, int64_t n, int64_t cols, int64_t low, int64_t limit, DeviceErrorOp op,
                              DeviceErrorRecord* rec, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + kCheckThreads - 1) / kCheckThreads, 1024);
  TORCHSPEC_LAUNCH(index_range_kernel, static_cast<unsigned>(blocks), kCheckThreads, 0, stream)(
      ids, n, cols < 1 ? 1 : cols, low, limit, op, rec);
  return cudaGetLastError();
}

cudaError_t check_at_most(const float* values, int64_t n, float limit, DeviceErrorOp op, DeviceErrorRecord* rec,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + kCheckThreads - 1) / kCheckThreads, 1024);
  TORCHSPEC_LAUNCH(at_most_kernel, static_cast<unsigned>(blocks), kCheckThreads, 0, stream)(values, n, limit, op, rec);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace torchspec
