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
};

// What a kernel found. `claim` picks the first writer (atomicCAS 0 -> 1); the writer fills the
// fields, then publishes `kind` last, so a host that sees kind != kNone sees the fields too.
struct DeviceErrorRecord {
  int32_t claim;
  int32_t kind;  // a DeviceErrorKind
  int32_t op;  // which op's kernel: DeviceErrorOp
  int32_t pad;
  int64_t row, index, value, low, limit;
};

enum class DeviceErrorOp : int32_t {
  kUnknown = 0,
  kTreeAttention,
  kVerifyTree,
  kDraftLoss,
};

}  // namespace torchspec
