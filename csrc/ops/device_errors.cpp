// The device error records of the op layer (device_errors.h).
#include "device_errors.h"

#include <atomic>
#include <cstring>
#include <mutex>
#include <sstream>
#include <vector>

#include "checks.h"

#ifdef TORCHSPEC_WITH_CUDA
#include "../kernels/cuda_kernels.h"
#include "cuda_context.h"
#endif

namespace torchspec {

#ifdef TORCHSPEC_WITH_CUDA
namespace {

struct Records {
  std::mutex mutex;
  std::vector<DeviceErrorRecord*> host, device;  // per device; never freed (kernels may still write)
};

Records& records() {
  static Records* r = new Records;  // not destroyed at exit: a kernel may run past it
  return *r;
}

// The host's view of `device`'s record, made if needed (with the lock held).
DeviceErrorRecord* record_locked(Records& r, int device, bool make) {
  if (device < 0) return nullptr;
  if (static_cast<size_t>(device) >= r.host.size()) {
    if (!make) return nullptr;
    r.host.resize(device + 1, nullptr);
    r.device.resize(device + 1, nullptr);
  }
  if (r.host[device] == nullptr && make) {
    void* host = nullptr;
    void* dev = nullptr;
    void* claim = nullptr;
    const CudaDeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    cudaError_t err = cudaHostAlloc(&host, sizeof(DeviceErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable);
    if (err == cudaSuccess) err = cudaHostGetDevicePointer(&dev, host, 0);
    if (err == cudaSuccess) err = cudaMalloc(&claim, sizeof(unsigned long long));
    // Stream-ordered before the first kernel that may record (no synchronisation, capturable).
    if (err == cudaSuccess) err = cudaMemsetAsync(claim, 0, sizeof(unsigned long long), current_cuda_stream());
    TORCH_CHECK(err == cudaSuccess, "torchspec: cannot allocate the device error record of cuda:", device, ": ",
                cudaGetErrorString(err));
    std::memset(host, 0, sizeof(DeviceErrorRecord));
    DeviceErrorRecord* rec = static_cast<DeviceErrorRecord*>(host);
    rec->claim = static_cast<unsigned long long*>(claim);
    rec->generation = 1;
    r.host[device] = static_cast<DeviceErrorRecord*>(host);
    r.device[device] = static_cast<DeviceErrorRecord*>(dev);
  }
  return r.host[device];
}

const char* op_name(int32_t op) {
  switch (static_cast<DeviceErrorOp>(op)) {
    case DeviceErrorOp::kTreeAttention:
      return "tree_attention";
    case DeviceErrorOp::kVerifyTree:
      return "verify_tree_greedy / verify_tree_sampling";
    case DeviceErrorOp::kDraftLoss:
      return "draft_topk_kl";
    case DeviceErrorOp::kUnknown:
      break;
  }
  return "torchspec";
}

// What was wrong, in the words of the CPU ops' checks (tree_ops.cpp, draft_loss_ops.cpp).
std::string describe(const DeviceErrorRecord& e) {
  std::ostringstream s;
  switch (static_cast<DeviceErrorKind>(e.kind)) {
    case DeviceErrorKind::kTreeRoot:
      s << "parents[" << e.row << ", 0] must be -1 (node 0 is the root), got " << e.value;
      break;
    case DeviceErrorKind::kTreeParent:
      if (e.value == -1) {
        s << "parents[" << e.row << ", " << e.index << "] = -1: a second root (only node 0 may be a root)";
      } else {
        s << "parents[" << e.row << ", " << e.index << "] = " << e.value
          << ": a node's parent must be an earlier node (0 <= parent < " << e.index << ")";
      }
      break;
    case DeviceErrorKind::kPrefixLength:
      s << "prefix_lens[" << e.row << "] = " << e.value
        << ": need 0 <= prefix_lens[b] and prefix_lens[b] + T <= S (here at most " << e.limit << ")";
      break;
    case DeviceErrorKind::kTokenId:
      s << "tokens[" << e.row << ", " << e.index << "] = " << e.value << " is not a token id in [0, V = " << e.limit
        << ")";
      break;
    case DeviceErrorKind::kUniform: {
      double u;
      std::memcpy(&u, &e.value, sizeof(u));
      s << "uniforms[" << e.row << ", " << e.index << "] = " << u << " is not in [0, 1)";
      break;
    }
    case DeviceErrorKind::kIndexRange:
      if (static_cast<DeviceErrorOp>(e.op) == DeviceErrorOp::kDraftLoss) {
        s << "teacher_indices[" << e.row << ", " << e.index << "] = " << e.value
          << ": teacher_indices must be -1 (absent) or in [0, Vd = " << e.limit << ")";
      } else {
        s << "index [" << e.row << ", " << e.index << "] = " << e.value << " is not in [" << e.low << ", " << e.limit
          << ")";
      }
      break;
    case DeviceErrorKind::kAtMost: {
      double v, limit;
      std::memcpy(&v, &e.value, sizeof(v));
      std::memcpy(&limit, &e.limit, sizeof(limit));
      if (static_cast<DeviceErrorOp>(e.op) == DeviceErrorOp::kDraftLoss) {
        s << "teacher_logprobs must be log-probabilities for the LK losses: exp(teacher_logprobs) must sum to at "
             "most 1 in every counted row (log-sum-exp <= "
          << limit << "), got row " << e.row << " whose log-sum-exp is " << v;
      } else {
        s << "value [" << e.row << "] = " << v << " is above " << limit;
      }
      break;
    }
    case DeviceErrorKind::kNone:
      s << "(no error)";
      break;
  }
  return s.str();
}

}  // namespace

DeviceErrorRecord* device_error_record(int device) {
  Records& r = records();
  std::lock_guard<std::mutex> lock(r.mutex);
  record_locked(r, device, true);
  return r.device[device];
}

void raise_device_error(int device, const char* op) {
  Records& r = records();
  DeviceErrorRecord found;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    DeviceErrorRecord* rec = record_locked(r, device, false);
    if (rec == nullptr || *reinterpret_cast<volatile int32_t*>(&rec->kind) == 0) return;
    std::atomic_thread_fence(std::memory_order_acquire);  // the fields were written before the kind
    std::memcpy(&found, rec, sizeof(found));
    // Cleared: kind first (nothing to report), then the next generation (a kernel may record again).
    *reinterpret_cast<volatile int32_t*>(&rec->kind) = 0;
    std::atomic_thread_fence(std::memory_order_release);
    *reinterpret_cast<volatile int64_t*>(&rec->generation) = found.generation + 1;
  }
  TORCH_CHECK(false, "torchspec.", op, ": a CUDA kernel of an earlier (or this) ", op_name(found.op),
              " call on cuda:", device, " found invalid input: ", describe(found),
              ". Its outputs for that batch row are NaN (attention) or -1 (verification), or its loss is wrong "
              "(draft loss). CUDA inputs are checked on the device, without a host synchronisation, so the error is "
              "raised by the next torchspec call on that device; after torch.cuda.synchronize(), "
              "torchspec_ext._C.raise_device_errors(device) raises it at once.");
}

void check_ids_on_device(const at::Tensor& ids, int64_t low, int64_t limit, DeviceErrorOp which, const char* op) {
  TORCH_INTERNAL_ASSERT(ids.is_cuda() && ids.scalar_type() == at::kLong);
  const at::Tensor c = ids.contiguous();
  const CudaDeviceGuard guard(c.device());
  const int device = c.get_device();
  raise_device_error(device, op);
  const cudaError_t err = cuda::check_index_range(c.data_ptr<int64_t>(), c.numel(), c.dim() >= 1 ? c.size(-1) : 1, low,
                                                  limit, which, device_error_record(device), current_cuda_stream());
  TORCH_CHECK(err == cudaSuccess, "torchspec.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

void check_at_most_on_device(const at::Tensor& values, float limit, DeviceErrorOp which, const char* op) {
  TORCH_INTERNAL_ASSERT(values.is_cuda() && values.scalar_type() == at::kFloat);
  const at::Tensor c = values.contiguous();
  const CudaDeviceGuard guard(c.device());
  const int device = c.get_device();
  raise_device_error(device, op);
  const cudaError_t err = cuda::check_at_most(c.data_ptr<float>(), c.numel(), limit, which, device_error_record(device),
                                              current_cuda_stream());
  TORCH_CHECK(err == cudaSuccess, "torchspec.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

#else  // a CPU-only build: no CUDA tensor gets this far (check_device_supported)

DeviceErrorRecord* device_error_record(int) { return nullptr; }
void raise_device_error(int, const char*) {}
void check_ids_on_device(const at::Tensor&, int64_t, int64_t, DeviceErrorOp, const char* op) {
  TORCH_CHECK(false, "torchspec.", op, ": built without CUDA");
}
void check_at_most_on_device(const at::Tensor&, float, DeviceErrorOp, const char* op) {
  TORCH_CHECK(false, "torchspec.", op, ": built without CUDA");
}

#endif

}  // namespace torchspec
