// Helpers shared by the CUDA kernel files (internal; no torch headers): element conversions,
// the launchers' dtype dispatch and shared-memory set-up, warp reductions, and the spelling of
// shared memory and launches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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
  if (rec == nullptr) return;
  const unsigned long long generation =
      static_cast<unsigned long long>(*reinterpret_cast<const volatile int64_t*>(&rec->generation));
  if (atomicMax(rec->claim, generation) >= generation) return;  // this generation's error is recorded
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

// ---- tensor cores and asynchronous copies (sm_80 and later) ----
// d += a * b for one warp's 16x16 (A, row-major) by 16x8 (B, column-major) tile, float32
// accumulators; T is bfloat16 (its uint16_t bits) or __half. Fragments, two 16-bit elements per
// register, the lower index in the low half (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"; g = lane / 4, t = lane % 4): a[0] A[g][2t..2t+1], a[1] A[g+8][2t..],
// a[2] A[g][2t+8..], a[3] A[g+8][2t+8..]; b[0] B[2t..2t+1][g], b[1] B[2t+8..2t+9][g];
// d[0..1] D[g][2t..2t+1], d[2..3] D[g+8][2t..2t+1].
#if defined(TORCHSPEC_CUDA_EMULATOR)
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             std::source_location loc = std::source_location::current()) {
  if constexpr (std::is_same_v<T, __half>) {
    cuemu_mma_f16_m16n8k16(d, a, b, d, loc);
  } else {
    cuemu_mma_bf16_m16n8k16(d, a, b, d, loc);
  }
}
#else
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the launchers use the CUDA-core kernels below sm_80
#endif
}
#endif

// cp.async.cg.shared.global: 16 bytes from global (src_bytes of them; the rest zeros) to shared
// memory, both 16-byte aligned, landing at a later cp_async_wait; commit closes a group.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(TORCHSPEC_CUDA_EMULATOR)
  cuemu_cp_async_16(smem, gmem, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(TORCHSPEC_CUDA_EMULATOR)
  cuemu_cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(TORCHSPEC_CUDA_EMULATOR)
  cuemu_cp_async_wait(kPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Two elements of T (bf16 bits or __half) from floats, rounded to nearest even, in one register:
// `lo` in the low half, as the mma fragments hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = Elem<T>::from_float(lo), h = Elem<T>::from_float(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
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
