// Input errors that a CUDA kernel finds (a malformed tree, a token id outside the vocabulary ...)
// and the op layer reports on the host without waiting for the kernel: the kernel writes the first
// one into a record in mapped pinned host memory (one per device, ops/device_errors.h), and the next
// torchspec call on that device raises it. Validating on the host instead costs a device-to-host
// copy per call, which stalls the GPU's queue and cannot be captured in a CUDA graph.
// Framework-free: no torch, no CUDA headers.
#pragma once

#include <cstdint>

namespace torchspec {

enum class DeviceErrorKind : int32_t {
  kNone = 0,
  kTreeRoot,  // parents[row, 0] = value, not -1
  kTreeParent,  // parents[row, index] = value, not in [0, index)
  kPrefixLength,  // prefix_lens[row] = value, not in [0, limit] (limit = S - T)
  kTokenId,  // tokens[row, index] = value, not in [0, limit)
  kUniform,  // uniforms[row, index] = the float64 whose bits are value, not in [0, 1)
  kIndexRange,  // ids[row, index] = value, not in [low, limit): the caller names the tensor
  kAtMost,  // values[row] = the float64 whose bits are value, above the float64 whose bits are limit
};

// What a kernel found, in mapped pinned host memory. One error is recorded per `generation`: the
// first kernel thread to raise the device-memory `claim` word to it (atomicMax: no atomic touches
// host memory) fills the fields, then publishes `kind` last, so a host that sees kind != kNone
// sees the fields too. The host reads the record, clears `kind`, then moves `generation` on.
struct DeviceErrorRecord {
  unsigned long long* claim;  // device memory: the last generation whose error was recorded
  int64_t generation;  // written by the host, starting at 1
  int32_t kind;  // a DeviceErrorKind
  int32_t op;  // which op's kernel: DeviceErrorOp
  int64_t row, index, value, low, limit;
};

enum class DeviceErrorOp : int32_t {
  kUnknown = 0,
  kTreeAttention,
  kVerifyTree,
  kDraftLoss,
};

}  // namespace torchspec
