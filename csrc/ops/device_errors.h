// The device error records of the op layer (common/device_error.h): one per CUDA device, in mapped
// pinned host memory, written by the kernels that validate their inputs on the device and read by
// the host, without waiting for the device, at every CUDA launch of an op (run_on_device). So an
// input error that a CUDA kernel finds is raised by the next torchspec call on that device (or by
// torchspec_ext._C.raise_device_errors after a synchronisation), not by the call that made it:
// the alternative, copying the inputs to the host to check them, synchronises every call.
#pragma once

#include <ATen/ATen.h>

#include "../common/device_error.h"

namespace torchspec {

// The record of CUDA device `device`, as the kernels address it (made at the first call).
DeviceErrorRecord* device_error_record(int device);

// Raises the error a kernel recorded on CUDA device `device`, if any, and clears it:
// "torchspec.<op>: a CUDA kernel of an earlier (or this) ... call on cuda:<device> found invalid
// input: ..." (an op that launches several kernels may see its own first kernel's error).
void raise_device_error(int device, const char* op);

// Checks on the device that every id of `ids` (int64, [..., k]) is in [low, limit): a bad one is
// recorded for `which` and raised by the next call; no host synchronisation. CUDA tensors only.
void check_ids_on_device(const at::Tensor& ids, int64_t low, int64_t limit, DeviceErrorOp which, const char* op);

// Checks on the device that every value of `values` (float32, one per row) is at most `limit` (NaN
// passes): a bad one is recorded for `which` and raised by the next call. CUDA tensors only.
void check_at_most_on_device(const at::Tensor& values, float limit, DeviceErrorOp which, const char* op);

}  // namespace torchspec
