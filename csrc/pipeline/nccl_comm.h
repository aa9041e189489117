// The NCCL transport of the tensor pipeline: a point-to-point communicator with its own send and
// receive streams, one CUDA event per operation ("ticket"), and waits that poll the event and the
// communicator's asynchronous error so that a dead or stuck peer gives an error within the timeout
// (the communicator is then aborted), never a hang. Framework-free: raw device pointers and CUDA
// streams, no torch; the extension binds it in pipeline/bindings.cpp, bench_pipeline uses it as is.
// Every call leaves the caller's current CUDA device as it found it, and may come from any thread
// (the binding releases the Python GIL around each), so abort(), done() or the destructor can meet
// a wait(). Nothing here waits without a bound: settle() and wait() stop at their timeout, and the
// destructor waits for nothing (CUDA frees a destroyed stream or event once its work is done).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchspec {
namespace pipeline {

// An operation that did not complete within its timeout (the communicator is aborted).
class NcclTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

std::string nccl_unique_id();  // NCCL_UNIQUE_ID_BYTES bytes, to share with the other ranks

class NcclComm {
 public:
  // Joins the communicator `unique_id` as `rank` of `nranks` on `device`; non-blocking NCCL
  // config, so the initialisation too fails after `timeout_s` instead of hanging. A one-rank
  // communicator (nranks == 1) sends to itself: each send is issued together with the next recv.
  NcclComm(const std::string& unique_id, int rank, int nranks, int device, double timeout_s);
  // Aborts the communicator (frees it without waiting on a peer that may be gone) and destroys the
  // streams and events without waiting for their work: memory that a transfer may still touch must
  // be kept until the event of shutdown() completed.
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Enqueue `bytes` bytes from / into device memory after the work already queued on `after`
  // (the producer's stream); returns a ticket for done() / wait(). The memory must stay valid
  // until the ticket completes.
  int64_t send(const void* data, int64_t bytes, int peer, cudaStream_t after);
  int64_t recv(void* data, int64_t bytes, int peer, cudaStream_t after);

  // Whether the ticket's operation completed. Throws on an asynchronous NCCL error (after aborting).
  bool done(int64_t ticket);
  // Blocks until the ticket's operation completed, then releases the ticket; after timeout_s throws
  // NcclTimeout, on an NCCL error std::runtime_error, aborting the communicator in both cases.
  void wait(int64_t ticket, double timeout_s);
  // Aborts the communicator (idempotent); throws if ncclCommAbort itself failed.
  void abort();
  // Aborts, then returns an event (the caller's to destroy) that completes once all the work queued
  // on the channel's streams did: until then a buffer of an operation that was never waited for
  // (a receive posted ahead, a send of a channel dropped mid-flight) may still be read or written.
  // Null when no event could be recorded: such buffers must then never be freed.
  cudaEvent_t shutdown();
  bool aborted() const { return aborted_.load(); }
  int device() const { return device_; }

 private:
  struct Op {
    cudaEvent_t event = nullptr;
    bool issued = false;  // false: a send to self waiting for its recv
  };
  struct PendingSelfSend {
    const void* data;
    int64_t bytes;
    int64_t ticket;
  };

  // The private functions run with mutex_ held.
  bool poll(int64_t ticket, bool release);
  void release_resources();
  int64_t new_ticket(cudaStream_t stream, cudaStream_t after);
  void discard_ticket(int64_t ticket);  // a ticket whose operation was never enqueued
  void issue(cudaStream_t stream, int64_t ticket);
  void settle(ncclResult_t result, const char* what);  // waits out ncclInProgress, throws on errors
  [[noreturn]] void fail(const std::string& message, bool timeout);
  ncclResult_t abort_locked();  // ncclCommAbort's result (ncclSuccess when there was nothing to abort)
  void check_open() const;

  // Guards the communicator, the streams, the operations, their events and the self-sends: a
  // close() or a garbage collection in another thread must not free what a wait() is polling.
  std::mutex mutex_;
  ncclComm_t comm_ = nullptr;
  int rank_, nranks_, device_;
  double timeout_s_;
  std::atomic<bool> aborted_{false};
  std::string abort_reason_;
  cudaStream_t send_stream_ = nullptr, recv_stream_ = nullptr;
  std::map<int64_t, Op> ops_;
  std::vector<cudaEvent_t> free_events_;
  std::deque<PendingSelfSend> self_sends_;
  int64_t next_ticket_ = 0;
};

}  // namespace pipeline
}  // namespace torchspec
