// The NCCL transport of the tensor pipeline (see nccl_comm.h). Compiled only with NCCL.
#ifdef TORCHSPEC_WITH_NCCL
#include "nccl_comm.h"

#include <chrono>
#include <cstring>
#include <thread>

namespace torchspec {
namespace pipeline {

namespace {

using Clock = std::chrono::steady_clock;

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pipeline NCCL channel: ") + what + ": " + cudaGetErrorString(err));
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Short spins first (a completed send is usually seen at once), then sleeps that keep a core free.
void backoff(int& polls) {
  if (++polls > 64) std::this_thread::sleep_for(std::chrono::microseconds(polls > 1024 ? 1000 : 50));
}

// Makes `device` current for a scope and restores the caller's device after it: a channel on
// cuda:1 must not move the current device of the code that uses it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// An NCCL group that ends on every path: left open by an exception, it would take in this
// thread's later NCCL calls (torch.distributed's too), which would then wait for a group end
// that never comes.
class Group {
 public:
  Group() : started_(ncclGroupStart()) {}
  ~Group() {
    if (started_ == ncclSuccess && !ended_) ncclGroupEnd();
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  ncclResult_t started() const { return started_; }
  ncclResult_t end() {
    ended_ = true;
    return ncclGroupEnd();
  }

 private:
  ncclResult_t started_;
  bool ended_ = false;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw std::runtime_error(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
  return std::string(id.internal, sizeof(id.internal));
}

NcclComm::NcclComm(const std::string& unique_id, int rank, int nranks, int device, double timeout_s)
    : rank_(rank), nranks_(nranks), device_(device), timeout_s_(timeout_s) {
  if (unique_id.size() != NCCL_UNIQUE_ID_BYTES) {
    throw std::invalid_argument("pipeline NCCL channel: the unique id must be " + std::to_string(NCCL_UNIQUE_ID_BYTES) +
                                " bytes, got " + std::to_string(unique_id.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("pipeline NCCL channel: rank " + std::to_string(rank) + " of " +
                                std::to_string(nranks));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const DeviceGuard guard(device);
  try {
    cuda_check(cudaStreamCreateWithFlags(&send_stream_, cudaStreamNonBlocking), "cudaStreamCreate(send)");
    cuda_check(cudaStreamCreateWithFlags(&recv_stream_, cudaStreamNonBlocking), "cudaStreamCreate(recv)");
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once; settle()/wait() poll with a deadline
    settle(ncclCommInitRankConfig(&comm_, nranks, id, rank, &config), "ncclCommInitRankConfig");
  } catch (...) {
    release_resources();  // no destructor runs after a throwing constructor
    throw;
  }
}

NcclComm::~NcclComm() {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    const DeviceGuard guard(device_);
    release_resources();
  } catch (const std::exception&) {
    release_resources();  // the device could not be made current: free what can be freed anyway
  }
}

// Waits for nothing: a stream that still waits on a hung producer, or an NCCL kernel that has not
// seen the abort yet, would hang the caller (a garbage collection, the interpreter's exit). CUDA
// releases a destroyed stream or event once its work completed.
void NcclComm::release_resources() {
  abort_locked();
  for (auto& [ticket, op] : ops_) cudaEventDestroy(op.event);
  for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  if (send_stream_ != nullptr) cudaStreamDestroy(send_stream_);
  if (recv_stream_ != nullptr) cudaStreamDestroy(recv_stream_);
  ops_.clear();
  free_events_.clear();
  self_sends_.clear();
  send_stream_ = recv_stream_ = nullptr;
  aborted_ = true;
}

cudaEvent_t NcclComm::shutdown() {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked();
  if (send_stream_ == nullptr || recv_stream_ == nullptr) return nullptr;
  try {
    const DeviceGuard guard(device_);
    // One event after both streams: the receive stream waits for the send stream's last work.
    cudaEvent_t sent = nullptr, done = nullptr;
    if (cudaEventCreateWithFlags(&sent, cudaEventDisableTiming) != cudaSuccess) return nullptr;
    const bool ok = cudaEventRecord(sent, send_stream_) == cudaSuccess &&
                    cudaStreamWaitEvent(recv_stream_, sent, 0) == cudaSuccess &&
                    cudaEventCreateWithFlags(&done, cudaEventDisableTiming) == cudaSuccess;
    cudaEventDestroy(sent);
    if (ok && cudaEventRecord(done, recv_stream_) == cudaSuccess) return done;
    if (done != nullptr) cudaEventDestroy(done);
  } catch (const std::exception&) {
  }
  return nullptr;
}

void NcclComm::check_open() const {
  if (aborted_) throw std::runtime_error("pipeline NCCL channel: the communicator was aborted (" + abort_reason_ + ")");
}

void NcclComm::fail(const std::string& message, bool timeout) {
  if (!aborted_) abort_reason_ = message;
  abort_locked();  // its own failure is kept in abort_reason_: the error to raise is this one
  if (timeout) throw NcclTimeout("pipeline NCCL channel: " + message);
  throw std::runtime_error("pipeline NCCL channel: " + message);
}

void NcclComm::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  const ncclResult_t r = abort_locked();
  if (r != ncclSuccess) {
    throw std::runtime_error(std::string("pipeline NCCL channel: ncclCommAbort failed: ") + ncclGetErrorString(r));
  }
}

ncclResult_t NcclComm::abort_locked() {
  aborted_ = true;
  if (abort_reason_.empty()) abort_reason_ = "closed";
  if (comm_ == nullptr) return ncclSuccess;
  // The handle is freed by the abort even when it reports an error: never used again.
  const ncclResult_t r = ncclCommAbort(comm_);
  comm_ = nullptr;
  if (r != ncclSuccess) abort_reason_ += std::string("; ncclCommAbort failed: ") + ncclGetErrorString(r);
  return r;
}

void NcclComm::settle(ncclResult_t result, const char* what) {
  const Clock::time_point t0 = Clock::now();
  int polls = 0;
  while (result == ncclInProgress) {
    if (seconds_since(t0) > timeout_s_) {
      fail(std::string(what) + " still in progress after " + std::to_string(timeout_s_) + " s", true);
    }
    backoff(polls);
    if (comm_ == nullptr) break;  // ncclCommInitRankConfig failed before it made the communicator
    ncclCommGetAsyncError(comm_, &result);
  }
  if (result != ncclSuccess) {
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : "";
    fail(std::string(what) + ": " + ncclGetErrorString(result) + (last && *last ? std::string(" (") + last + ")" : ""),
         false);
  }
}

int64_t NcclComm::new_ticket(cudaStream_t stream, cudaStream_t after) {
  Op op;
  if (free_events_.empty()) {
    cuda_check(cudaEventCreateWithFlags(&op.event, cudaEventDisableTiming), "cudaEventCreate");
  } else {
    op.event = free_events_.back();
    free_events_.pop_back();
  }
  try {
    // The transfer starts after what the producer queued so far (e.g. the packing copies).
    cuda_check(cudaEventRecord(op.event, after), "cudaEventRecord(producer stream)");
    cuda_check(cudaStreamWaitEvent(stream, op.event, 0), "cudaStreamWaitEvent");
  } catch (...) {
    free_events_.push_back(op.event);  // not recorded on a channel stream: reusable
    throw;
  }
  const int64_t ticket = next_ticket_++;
  ops_.emplace(ticket, op);
  return ticket;
}

void NcclComm::discard_ticket(int64_t ticket) {
  auto it = ops_.find(ticket);
  if (it == ops_.end()) return;
  free_events_.push_back(it->second.event);
  ops_.erase(it);
}

// The operation is enqueued on `stream`: an event that cannot mark its end leaves it untracked
// (wait() would see it neither complete nor fail), so the communicator is aborted.
void NcclComm::issue(cudaStream_t stream, int64_t ticket) {
  Op& op = ops_.at(ticket);
  const cudaError_t err = cudaEventRecord(op.event, stream);
  if (err != cudaSuccess) fail(std::string("cudaEventRecord(channel stream): ") + cudaGetErrorString(err), false);
  op.issued = true;
}

int64_t NcclComm::send(const void* data, int64_t bytes, int peer, cudaStream_t after) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const DeviceGuard guard(device_);
  const int64_t ticket = new_ticket(send_stream_, after);
  if (nranks_ == 1) {
    // A one-rank communicator must issue a send to itself in one group with its recv.
    self_sends_.push_back({data, bytes, ticket});
    return ticket;
  }
  settle(ncclSend(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, send_stream_), "ncclSend");
  issue(send_stream_, ticket);
  return ticket;
}

int64_t NcclComm::recv(void* data, int64_t bytes, int peer, cudaStream_t after) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_open();
  const DeviceGuard guard(device_);
  if (nranks_ == 1) {
    if (self_sends_.empty()) {
      throw std::runtime_error(
          "pipeline NCCL channel to itself: recv with no send queued before it (a send to self "
          "is issued together with the matching recv)");
    }
    const PendingSelfSend s = self_sends_.front();
    if (s.bytes != bytes) {
      throw std::runtime_error("pipeline NCCL channel to itself: recv of " + std::to_string(bytes) +
                               " bytes does not match the queued send of " + std::to_string(s.bytes));
    }
    const int64_t ticket = new_ticket(recv_stream_, after);
    // The send side must also wait for the recv buffer's producer: both ride on one group.
    const cudaError_t waited = cudaStreamWaitEvent(send_stream_, ops_.at(ticket).event, 0);
    if (waited != cudaSuccess) {
      discard_ticket(ticket);  // the send stays queued for a later recv
      cuda_check(waited, "cudaStreamWaitEvent");
    }
    self_sends_.pop_front();
    // Inside the group the calls only queue (their errors are checked once it ended): the group
    // is closed before any error handling could abort the communicator, and on every path.
    ncclResult_t sent = ncclSuccess, received = ncclSuccess, ended = ncclSuccess;
    {
      Group group;
      settle(group.started(), "ncclGroupStart");
      sent = ncclSend(s.data, static_cast<size_t>(bytes), ncclUint8, rank_, comm_, send_stream_);
      received = ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, rank_, comm_, recv_stream_);
      ended = group.end();
    }
    settle(sent, "ncclSend");
    settle(received, "ncclRecv");
    settle(ended, "ncclGroupEnd");
    issue(send_stream_, s.ticket);
    issue(recv_stream_, ticket);
    return ticket;
  }
  const int64_t ticket = new_ticket(recv_stream_, after);
  settle(ncclRecv(data, static_cast<size_t>(bytes), ncclUint8, peer, comm_, recv_stream_), "ncclRecv");
  issue(recv_stream_, ticket);
  return ticket;
}

bool NcclComm::done(int64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  return poll(ticket, false);
}

bool NcclComm::poll(int64_t ticket, bool release) {
  check_open();
  auto it = ops_.find(ticket);
  if (it == ops_.end()) throw std::invalid_argument("pipeline NCCL channel: unknown ticket " + std::to_string(ticket));
  if (it->second.issued) {
    const cudaError_t err = cudaEventQuery(it->second.event);
    if (err == cudaSuccess) {
      if (release) {
        free_events_.push_back(it->second.event);
        ops_.erase(it);
      }
      return true;
    }
    if (err != cudaErrorNotReady) fail(std::string("cudaEventQuery: ") + cudaGetErrorString(err), false);
    // Not an error: cleared, or the next kernel launch check on this thread would report it.
    if (cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
  }
  ncclResult_t state = ncclSuccess;
  ncclCommGetAsyncError(comm_, &state);
  if (state != ncclSuccess && state != ncclInProgress) {
    fail(std::string("asynchronous error: ") + ncclGetErrorString(state) + " (" + ncclGetLastError(comm_) + ")", false);
  }
  return false;
}

void NcclComm::wait(int64_t ticket, double timeout_s) {
  const Clock::time_point t0 = Clock::now();
  int polls = 0;
  while (true) {
    {
      // Locked per poll only: an abort() from another thread gets in between two polls.
      std::lock_guard<std::mutex> lock(mutex_);
      if (poll(ticket, true)) return;
      if (seconds_since(t0) > timeout_s) {
        fail("operation " + std::to_string(ticket) + " did not complete within " + std::to_string(timeout_s) +
                 " s (peer gone or stopped?)",
             true);
      }
    }
    backoff(polls);
  }
}

}  // namespace pipeline
}  // namespace torchspec
#endif  // TORCHSPEC_WITH_NCCL
