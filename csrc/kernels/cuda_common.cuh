// Helpers shared by the CUDA kernel files (internal; no torch headers): element conversions,
// the launchers' dtype dispatch and shared-memory set-up, warp reductions, and the spelling of
// shared memory and launches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/device_error.h"
#include "../common/topk_lse.h"

// Shared-memory declarations and launches, spelled so that the CPU emulator (csrc/testing) can
// compile the kernel files too; its header defines these three macros for it.
#if !defined(TORCHSPEC_CUDA_EMULATOR)
#define TORCHSPEC_SHARED(type, name) __shared__ type name
#define TORCHSPEC_EXTERN_SHARED(type, name) extern __shared__ type name[]
#define TORCHSPEC_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace torchspec {
namespace cuda {

// Element types of the kernels: float, bfloat16 (as its uint16_t bits) and __half.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Elem<uint16_t> {  // bfloat16 bits
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// Records the first input error a kernel finds (common/device_error.h); `rec` may be null (then
// the kernel only makes its outputs NaN or -1, as it does anyway).
__device__ __forceinline__ void record_device_error(DeviceErrorRecord* rec, DeviceErrorOp op, DeviceErrorKind kind,
                                                    int64_t row, int64_t index, int64_t value, int64_t low,
                                                    int64_t limit) {
  if (rec == nullptr || atomicCAS(&rec->claim, 0, 1) != 0) return;
  rec->op = static_cast<int32_t>(op);
  rec->row = row;
  rec->index = index;
  rec->value = value;
  rec->low = low;
  rec->limit = limit;
  __threadfence_system();  // the fields before the kind that publishes them
  *reinterpret_cast<volatile int32_t*>(&rec->kind) = static_cast<int32_t>(kind);
  __threadfence_system();
}

// f(T{}) with T the element type of `dtype` (float, bfloat16 bits, __half): the launchers'
// dispatch, e.g. dispatch_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); }).
template <class F>
cudaError_t dispatch_dtype(ScalarKind dtype, F&& f) {
  switch (dtype) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kBFloat16:
      return f(uint16_t{});
    case ScalarKind::kFloat16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// Lets `kernel` be launched with `dynamic` bytes of dynamic shared memory. Past 48 KiB per block,
// its static shared memory included, a launch needs the opt-in attribute (and fails with "invalid
// argument" without it). The attribute is set once per (kernel, device), to the most the device
// allows, never to one call's own size: two host threads launching different sizes on one device
// would race, one lowering it below what the other's launch needs. A launch that cannot fit fails
// here with cudaErrorInvalidValue. A failure is returned and also cleared from cudaGetLastError:
// left there, the caller's next, unrelated launch check would report it. (common.cu)
cudaError_t allow_dynamic_smem_of(const void* kernel, size_t dynamic);
template <class Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t dynamic) {
  return allow_dynamic_smem_of(reinterpret_cast<const void*>(kernel), dynamic);
}

// The shared memory per block (static + `dynamic`, bytes) a launch of `kernel` needs, and the most
// the current device allows a block (its opt-in limit).
template <class Kernel>
cudaError_t smem_needed_and_allowed(Kernel* kernel, size_t dynamic, size_t* needed, size_t* allowed) {
  cudaFuncAttributes attr;
  int device = 0, optin = 0;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  *needed = attr.sharedSizeBytes + dynamic;
  *allowed = static_cast<size_t>(optin);
  return cudaSuccess;
}

// Maximum / sum over the 32 lanes of a full warp, in every lane.
__device__ __forceinline__ float warp_max(float v) {
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);
  return v;
}

}  // namespace cuda
}  // namespace torchspec
