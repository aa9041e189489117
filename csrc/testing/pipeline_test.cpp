// The NCCL transport of the tensor pipeline (pipeline/nccl_comm.cpp) over a fake NCCL
// (fake_nccl/nccl.h) and the CUDA emulator's streams and events: its tickets, waits, aborts and
// teardown, with NCCL and CUDA calls made to fail or to never complete. No GPU and no NCCL.
//
// Usage: cuda_emulator_pipeline_test     exit status 0 pass, 1 a failed check, 3 an emulator fault
// (a cudaStreamSynchronize that would wait forever is one: the destructor must wait for nothing).
#include "cuda_emulator.h"

#include <nccl.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>

#include "../pipeline/nccl_comm.h"

namespace {

using torchspec::pipeline::NcclComm;
using torchspec::pipeline::NcclTimeout;

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
}

const std::string kUid(NCCL_UNIQUE_ID_BYTES, '\7');
char g_buffer[256];  // the transfers' memory (never touched by the fake)

struct Counts {
  uint64_t streams, events, streams_destroyed, events_destroyed;
  static Counts now() {
    const cuemu::Stats& s = cuemu::stats();
    return {s.streams_created, s.events_created, s.streams_destroyed, s.events_destroyed};
  }
};

void reset() {
  fake_nccl::state() = fake_nccl::State{};
  cuemu::options().fail_call = nullptr;
}

// Makes the n-th next call of `api` (1: the next) fail with cudaErrorLaunchFailure, once.
void fail_nth(const char* api, int n) {
  auto left = std::make_shared<int>(n);
  cuemu::options().fail_call = [api, left](const char* called) {
    return std::string(called) == api && --*left == 0 ? cudaErrorLaunchFailure : cudaSuccess;
  };
}

// The message fn() throws (with "[timeout] " first for NcclTimeout), or "" when it throws nothing.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const NcclTimeout& e) {
    return std::string("[timeout] ") + e.what();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void expect_clean(const std::string& what) {
  for (const std::string& m : fake_nccl::state().misuse) check(false, what + ": " + m);
  check(fake_nccl::state().group_depth == 0, what + ": an NCCL group left open");
}

cudaStream_t new_stream() {
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  return s;
}

void test_round_trips() {
  reset();
  const cudaStream_t producer = new_stream();
  const Counts before = Counts::now();
  {
    NcclComm c(kUid, 0, 2, 0, 5.0);
    for (int i = 0; i < 5; ++i) {
      const int64_t t = c.send(g_buffer, 64, 1, producer);
      check(!c.done(t), "a send done before its transfer completed");
      fake_nccl::complete_all();
      check(c.done(t), "a completed send not done");
      c.wait(t, 1.0);
      const int64_t r = c.recv(g_buffer, 64, 1, producer);
      fake_nccl::complete_all();
      c.wait(r, 1.0);
    }
    check(cudaGetLastError() == cudaSuccess, "a poll left \"device not ready\" in cudaGetLastError");
    check(Counts::now().events - before.events == 1, "the completed operations' events are not reused (" +
                                                         std::to_string(Counts::now().events - before.events) +
                                                         " events made for 10 operations)");
  }
  const Counts after = Counts::now();
  check(after.streams - before.streams == 2 && after.streams_destroyed - before.streams_destroyed == 2,
        "the communicator's two streams are not destroyed with it");
  check(after.events - before.events == after.events_destroyed - before.events_destroyed,
        "events left after the communicator");
  check(fake_nccl::state().aborts == 1, "the destructor aborts the communicator once");
  expect_clean("round trips");
}

void test_wait_times_out() {
  reset();
  const cudaStream_t producer = new_stream();
  NcclComm c(kUid, 0, 2, 0, 5.0);
  const int64_t t = c.send(g_buffer, 64, 1, producer);
  const std::string e = error_of([&] { c.wait(t, 0.05); });
  check(has(e, "[timeout]") && has(e, "did not complete within"), "a wait past its timeout: " + e);
  check(c.aborted() && fake_nccl::state().aborts == 1, "a timed-out wait aborts the communicator");
  check(error_of([&] { c.abort(); }).empty() && fake_nccl::state().aborts == 1, "a second abort calls NCCL again");
  check(has(error_of([&] { c.send(g_buffer, 64, 1, producer); }), "was aborted"), "a send after the abort");
  check(has(error_of([&] { c.wait(t, 1.0); }), "was aborted"), "a wait after the abort");
  expect_clean("a timed-out wait");
}

void test_async_error() {
  reset();
  const cudaStream_t producer = new_stream();
  NcclComm c(kUid, 0, 2, 0, 5.0);
  const int64_t t = c.recv(g_buffer, 64, 1, producer);
  fake_nccl::state().async_error = ncclRemoteError;
  const std::string e = error_of([&] { c.wait(t, 5.0); });
  check(has(e, "asynchronous error: remote process exited") && !has(e, "[timeout]"), "an asynchronous error: " + e);
  check(c.aborted() && fake_nccl::state().aborts == 1, "an asynchronous error aborts the communicator");
  expect_clean("an asynchronous error");
}

void test_init_in_progress() {
  reset();
  fake_nccl::state().init_polls = -1;  // never ready
  const Counts before = Counts::now();
  const std::string e = error_of([&] { NcclComm c(kUid, 0, 2, 0, 0.05); });
  check(has(e, "[timeout]") && has(e, "ncclCommInitRankConfig still in progress"), "a stuck initialisation: " + e);
  const Counts after = Counts::now();
  check(after.streams - before.streams == after.streams_destroyed - before.streams_destroyed,
        "a failed constructor leaves streams");
  check(fake_nccl::state().aborts == 1, "a stuck initialisation is aborted");
  expect_clean("a stuck initialisation");
  reset();
  fake_nccl::state().init_polls = 3;  // ready after three polls
  check(error_of([&] { NcclComm c(kUid, 0, 2, 0, 5.0); }).empty(), "an initialisation in progress for a while");
}

// A failure before the operation is queued: nothing to abort, the event goes back to the pool.
void test_ticket_failure() {
  reset();
  const cudaStream_t producer = new_stream();
  NcclComm c(kUid, 0, 2, 0, 5.0);
  const Counts before = Counts::now();
  fail_nth("cudaEventRecord", 1);  // the record on the producer's stream
  const std::string e = error_of([&] { c.send(g_buffer, 64, 1, producer); });
  cuemu::options().fail_call = nullptr;
  check(has(e, "cudaEventRecord(producer stream)"), "a failed producer record: " + e);
  check(!c.aborted(), "a failure before anything was queued aborts the communicator");
  const int64_t t = c.send(g_buffer, 64, 1, producer);
  fake_nccl::complete_all();
  c.wait(t, 1.0);
  check(Counts::now().events - before.events == 1, "the failed ticket's event is lost (" +
                                                       std::to_string(Counts::now().events - before.events) +
                                                       " events made, 1 expected)");
  expect_clean("a failed ticket");
}

// A failure after the operation was queued: it could never be waited for, so the channel aborts.
void test_issue_failure() {
  reset();
  const cudaStream_t producer = new_stream();
  NcclComm c(kUid, 0, 2, 0, 5.0);
  fail_nth("cudaEventRecord", 2);  // the record on the channel's stream, after ncclSend
  const std::string e = error_of([&] { c.send(g_buffer, 64, 1, producer); });
  cuemu::options().fail_call = nullptr;
  check(has(e, "cudaEventRecord(channel stream)"), "a failed channel record: " + e);
  check(c.aborted() && fake_nccl::state().aborts == 1, "a queued operation without its event does not abort");
  expect_clean("a failed issue");
}

void test_abort_failure() {
  reset();
  {
    NcclComm c(kUid, 0, 2, 0, 5.0);
    fake_nccl::state().abort_result = ncclSystemError;
    const std::string e = error_of([&] { c.abort(); });
    check(has(e, "ncclCommAbort failed: unhandled system error"), "a failed ncclCommAbort: " + e);
    check(has(error_of([&] { c.send(g_buffer, 8, 1, nullptr); }), "ncclCommAbort failed"),
          "the abort's failure is not in the channel's reason");
  }
  check(fake_nccl::state().aborts == 1, "the communicator aborted again after a failed abort");
  expect_clean("a failed abort (no call on the freed communicator)");
}

// The destructor with transfers that never complete and a producer that never finishes: it must
// return (a cudaStreamSynchronize here is an emulator fault), and shutdown()'s event completes only
// once all of the channel's work has.
void test_teardown_waits_for_nothing() {
  reset();
  const cudaStream_t producer = new_stream();
  const cuemu::PendingId hung = cuemu::enqueue_pending(producer);  // the producer's kernel, stuck
  cudaEvent_t drained = nullptr;
  {
    NcclComm c(kUid, 0, 2, 0, 5.0);
    c.send(g_buffer, 64, 1, producer);
    c.recv(g_buffer + 128, 64, 1, producer);
    drained = c.shutdown();
    check(drained != nullptr && c.aborted(), "shutdown() gives an event and aborts");
  }
  check(cudaEventQuery(drained) == cudaErrorNotReady, "the drained event completed before the transfers");
  fake_nccl::complete_all();
  check(cudaEventQuery(drained) == cudaErrorNotReady, "the drained event completed before the producer");
  cuemu::complete_pending(hung);
  check(cudaEventQuery(drained) == cudaSuccess, "the drained event never completes");
  cudaEventDestroy(drained);
  check(fake_nccl::state().aborts == 1, "teardown aborts once");
  expect_clean("teardown");
}

void test_send_to_self() {
  reset();
  const cudaStream_t producer = new_stream();
  NcclComm c(kUid, 0, 1, 0, 5.0);
  check(has(error_of([&] { c.recv(g_buffer, 32, 0, producer); }), "recv with no send queued"), "a recv first");
  const int64_t s = c.send(g_buffer, 32, 0, producer);
  check(has(error_of([&] { c.recv(g_buffer + 64, 16, 0, producer); }), "does not match the queued send of 32"),
        "a recv of another size");
  fail_nth("cudaStreamWaitEvent", 2);  // the send stream's wait for the receive buffer's producer
  check(has(error_of([&] { c.recv(g_buffer + 64, 32, 0, producer); }), "cudaStreamWaitEvent"),
        "a failed wait of the send stream");
  cuemu::options().fail_call = nullptr;
  const int64_t r = c.recv(g_buffer + 64, 32, 0, producer);  // the send is still queued
  fake_nccl::complete_all();
  c.wait(s, 1.0);
  c.wait(r, 1.0);
  check(!c.aborted(), "send to self");
  expect_clean("send to self");
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cuemu::detail::emu();  // installs the fault handlers
  const std::pair<const char*, void (*)()> tests[] = {
      {"round trips", test_round_trips},           {"a wait past its timeout", test_wait_times_out},
      {"an asynchronous error", test_async_error}, {"an initialisation in progress", test_init_in_progress},
      {"a failed ticket", test_ticket_failure},    {"a failed issue", test_issue_failure},
      {"a failed abort", test_abort_failure},      {"teardown", test_teardown_waits_for_nothing},
      {"send to self", test_send_to_self},
  };
  for (const auto& [name, fn] : tests) {
    const int before = g_failures;
    fn();
    std::printf("%s: %s\n", name, g_failures == before ? "passed" : "FAILED");
  }
  std::printf("NCCL channel on the fake NCCL: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
