// A fake NCCL for csrc/testing/pipeline_test.cpp: the API subset pipeline/nccl_comm.cpp uses, over
// the CUDA emulator's streams (cuda_emulator.h). A send or receive queues an item on its stream that
// completes when the test says (fake_nccl::complete_all), a call can be made to fail once, the
// communicator's initialisation to stay in progress, an asynchronous error to appear; every call
// on an aborted communicator is recorded as a use after free.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <map>
#include <string>
#include <vector>

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
} ncclResult_t;
typedef enum { ncclInt8 = 0, ncclUint8 = 1 } ncclDataType_t;

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;
typedef struct {
  int blocking;
} ncclConfig_t;
#define NCCL_CONFIG_INITIALIZER {1}

struct ncclComm {
  bool freed = false;
  int polls_until_ready = 0;  // ncclCommGetAsyncError answers ncclInProgress this many more times
};
typedef ncclComm* ncclComm_t;

namespace fake_nccl {

struct State {
  std::map<std::string, ncclResult_t> fail_next;  // the next call of this function returns that
  int init_polls = 0;  // a new communicator stays in progress for this many polls (-1: for good)
  ncclResult_t async_error = ncclSuccess;
  ncclResult_t abort_result = ncclSuccess;
  int aborts = 0, inits = 0, group_depth = 0;
  std::vector<cuemu::PendingId> pending;  // queued sends and receives
  std::vector<std::string> misuse;  // calls on an aborted communicator, unbalanced groups
};

inline State& state() {
  static State s;
  return s;
}

inline ncclResult_t take(const char* fn) {
  auto it = state().fail_next.find(fn);
  if (it == state().fail_next.end()) return ncclSuccess;
  const ncclResult_t r = it->second;
  state().fail_next.erase(it);
  return r;
}

inline bool live(ncclComm_t comm, const char* fn) {
  if (comm != nullptr && !comm->freed) return true;
  state().misuse.push_back(std::string(fn) + " on " + (comm == nullptr ? "a null" : "an aborted") + " communicator");
  return false;
}

// Completes every queued send and receive.
inline void complete_all() {
  for (const cuemu::PendingId& id : state().pending) cuemu::complete_pending(id);
  state().pending.clear();
}

}  // namespace fake_nccl

inline const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess:
      return "no error";
    case ncclInProgress:
      return "operation in progress";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclSystemError:
      return "unhandled system error";
    default:
      return "fake NCCL error";
  }
}
inline ncclResult_t ncclGetVersion(int* version) {
  *version = 0;
  return ncclSuccess;
}
inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id->internal, 7, NCCL_UNIQUE_ID_BYTES);
  return fake_nccl::take("ncclGetUniqueId");
}
inline ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int, ncclUniqueId, int, ncclConfig_t* config) {
  if (const ncclResult_t r = fake_nccl::take("ncclCommInitRankConfig")) return r;
  *comm = new ncclComm;  // never deleted: a use after abort stays detectable
  (*comm)->polls_until_ready = fake_nccl::state().init_polls;
  ++fake_nccl::state().inits;
  return config->blocking == 0 && (*comm)->polls_until_ready != 0 ? ncclInProgress : ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* result) {
  if (!fake_nccl::live(comm, "ncclCommGetAsyncError")) return ncclInvalidArgument;
  if (comm->polls_until_ready != 0) {
    if (comm->polls_until_ready > 0) --comm->polls_until_ready;
    *result = ncclInProgress;
    return ncclSuccess;
  }
  *result = fake_nccl::state().async_error;
  return ncclSuccess;
}
inline const char* ncclGetLastError(ncclComm_t) { return "fake NCCL's last error"; }
inline ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!fake_nccl::live(comm, "ncclCommAbort")) return ncclInvalidArgument;
  comm->freed = true;  // freed even when the abort reports an error, as NCCL's
  ++fake_nccl::state().aborts;
  return fake_nccl::state().abort_result;
}
inline ncclResult_t fake_transfer(const char* fn, ncclComm_t comm, cudaStream_t stream) {
  if (!fake_nccl::live(comm, fn)) return ncclInvalidArgument;
  if (const ncclResult_t r = fake_nccl::take(fn)) return r;
  fake_nccl::state().pending.push_back(cuemu::enqueue_pending(stream));
  return ncclSuccess;
}
inline ncclResult_t ncclSend(const void*, size_t, ncclDataType_t, int, ncclComm_t comm, cudaStream_t stream) {
  return fake_transfer("ncclSend", comm, stream);
}
inline ncclResult_t ncclRecv(void*, size_t, ncclDataType_t, int, ncclComm_t comm, cudaStream_t stream) {
  return fake_transfer("ncclRecv", comm, stream);
}
inline ncclResult_t ncclGroupStart() {
  if (const ncclResult_t r = fake_nccl::take("ncclGroupStart")) return r;
  ++fake_nccl::state().group_depth;
  return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
  if (--fake_nccl::state().group_depth < 0) fake_nccl::state().misuse.push_back("ncclGroupEnd without a start");
  return fake_nccl::take("ncclGroupEnd");
}
