// Python bindings of the tensor pipeline: the wire format (used by every transport) and, in
// builds with NCCL, the NCCL communicator. The Python side is torchspec_ext/pipeline.
#include "bindings.h"

#include "wire.h"

#ifdef TORCHSPEC_WITH_NCCL
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <vector>

#include "nccl_comm.h"
#endif

namespace torchspec {
namespace pipeline {

namespace {

namespace py = pybind11;

// (header bytes, [offset per entry], total bytes) for entries given as (name, dtype code, shape).
py::tuple plan(uint64_t seq, const std::vector<std::tuple<std::string, int, std::vector<int64_t>>>& tensors) {
  std::vector<TensorEntry> entries;
  entries.reserve(tensors.size());
  for (const auto& [name, code, shape] : tensors) {
    TORCH_CHECK(code >= 0 && code < kNumWireDtypes, "pipeline: unknown wire dtype code ", code, " for '", name, "'");
    entries.push_back(TensorEntry{name, static_cast<WireDtype>(code), shape});
  }
  const BatchLayout layout = plan_batch(seq, std::move(entries));
  std::string header(static_cast<size_t>(layout.header_bytes), '\0');
  encode_header(layout, reinterpret_cast<uint8_t*>(header.data()));
  py::list offsets;
  for (const TensorEntry& e : layout.entries) offsets.append(e.offset);
  return py::make_tuple(py::bytes(header), offsets, layout.total_bytes);
}

const uint8_t* host_bytes(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous(),
              "pipeline: ", what, " must be a contiguous 1-D uint8 CPU tensor");
  return t.data_ptr<uint8_t>();
}

// (seq, total bytes, [(name, dtype code, shape, offset)]) of a header held in a uint8 CPU tensor.
py::tuple decode(const at::Tensor& header) {
  const BatchLayout layout = decode_header(host_bytes(header, "the header"), header.numel());
  py::list entries;
  for (const TensorEntry& e : layout.entries) {
    entries.append(py::make_tuple(e.name, static_cast<int>(e.dtype), e.shape, e.offset));
  }
  return py::make_tuple(layout.seq, layout.total_bytes, entries);
}

#ifdef TORCHSPEC_WITH_NCCL
void* device_bytes(NcclComm& comm, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == comm.device() && t.is_contiguous(), "pipeline NCCL channel: the ", what,
              " buffer must be a contiguous tensor on cuda:", comm.device(), ", got ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
  return t.data_ptr();
}

cudaStream_t current_stream(const NcclComm& comm) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(comm.device())).stream();
}

// Buffers of operations that may still be under way when their communicator is destroyed (a
// preamble receive posted ahead, the sends of a channel dropped mid-flight), each set kept until
// the event after its channel's last work completed. Holding the tensors is what keeps the caching
// allocator from handing their memory to another tensor while NCCL may still use it; recording
// them on the channel's streams instead (recordStream) makes the allocator record an event on those
// streams when the tensor is freed, after the communicator has destroyed them, and a received
// batch, a view of its buffer, routinely outlives its channel. Never destroyed (a static vector of
// tensors would be freed after the CUDA allocator at exit); swept by every NcclComm call.
class Graveyard {
 public:
  void bury(cudaEvent_t done, std::vector<at::Tensor> buffers) {
    if (buffers.empty()) {
      if (done != nullptr) cudaEventDestroy(done);
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_back({done, std::move(buffers)});
  }
  // Frees the buffers whose event completed. An entry without an event (none could be recorded)
  // or whose event failed (a broken device) keeps its buffers for good: a leak, never a reuse.
  void sweep() {
    std::vector<at::Tensor> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      bool not_ready = false;
      for (auto it = entries_.begin(); it != entries_.end();) {
        const cudaError_t state = it->done != nullptr ? cudaEventQuery(it->done) : cudaErrorNotReady;
        if (state == cudaSuccess) {
          cudaEventDestroy(it->done);
          for (at::Tensor& t : it->buffers) freed.push_back(std::move(t));
          it = entries_.erase(it);
        } else {
          not_ready |= state == cudaErrorNotReady && it->done != nullptr;
          ++it;
        }
      }
      // "Not ready" is left in cudaGetLastError, where the next launch check would take it for its
      // own error (as torch clears it); any other error stays for the caller to see.
      if (not_ready && cudaPeekAtLastError() == cudaErrorNotReady) cudaGetLastError();
    }
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }

 private:
  struct Entry {
    cudaEvent_t done;
    std::vector<at::Tensor> buffers;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

Graveyard& graveyard() {
  static Graveyard* g = new Graveyard;
  return *g;
}

// The bound type: local to this file, as pybind11's own types are hidden (binding NcclComm itself,
// a default-visibility type, warns "declared with greater visibility than its base"). Keeps each
// operation's buffer until the operation was waited for; recv() waits on the host before it hands
// a batch over, so only operations never waited for outlive the communicator.
struct PyNcclComm : NcclComm {
  using NcclComm::NcclComm;
  ~PyNcclComm() {
    // The destructor runs from a garbage collection with the GIL; ncclCommAbort can be slow.
    py::gil_scoped_release release;
    graveyard().bury(shutdown(), take_all());
    graveyard().sweep();
  }
  template <class Op>
  int64_t start(const at::Tensor& buffer, const Op& op) {
    graveyard().sweep();
    const int64_t ticket = op();
    std::lock_guard<std::mutex> lock(held_mutex_);
    held_.emplace(ticket, buffer);
    return ticket;
  }
  void finished(int64_t ticket) {
    at::Tensor done;  // freed outside the lock
    std::lock_guard<std::mutex> lock(held_mutex_);
    auto it = held_.find(ticket);
    if (it == held_.end()) return;
    done = std::move(it->second);
    held_.erase(it);
  }
  std::vector<at::Tensor> take_all() {
    std::lock_guard<std::mutex> lock(held_mutex_);
    std::vector<at::Tensor> all;
    for (auto& [ticket, t] : held_) all.push_back(std::move(t));
    held_.clear();
    return all;
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(held_mutex_);
    return held_.size();
  }

 private:
  std::mutex held_mutex_;
  std::map<int64_t, at::Tensor> held_;
};
#endif

}  // namespace

void bind(py::module_& m) {
  py::register_exception<HeaderError>(m, "PipelineHeaderError", PyExc_ValueError);
  m.def("pipeline_plan", &plan, py::arg("seq"), py::arg("tensors"),
        "Pipeline wire format: (header bytes, offsets, total bytes) for [(name, dtype code, shape)]");
  m.def("pipeline_decode", &decode, py::arg("header"),
        "Pipeline wire format: (seq, total bytes, [(name, dtype code, shape, offset)]) of a header");
  m.attr("pipeline_header_prefix_bytes") = kPrefixBytes;
  m.attr("pipeline_small_bytes") = kSmallBytes;
#ifdef TORCHSPEC_WITH_NCCL
  py::register_exception<NcclTimeout>(m, "NcclTimeoutError", PyExc_TimeoutError);
  m.def("nccl_unique_id", [] { return py::bytes(nccl_unique_id()); }, "A new NCCL unique id (bytes)");
  py::class_<PyNcclComm>(m, "NcclComm", "Point-to-point NCCL communicator of the tensor pipeline (nccl_comm.h)")
      .def(py::init([](py::bytes uid, int rank, int nranks, int device, double timeout_s) {
             std::string id = uid;
             py::gil_scoped_release release;  // the peer joins through its own Python process
             return std::make_unique<PyNcclComm>(id, rank, nranks, device, timeout_s);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("nranks"), py::arg("device"), py::arg("timeout"))
      .def(
          "send",
          [](PyNcclComm& c, const at::Tensor& buf, int peer) {
            return c.start(buf,
                           [&] { return c.send(device_bytes(c, buf, "send"), buf.nbytes(), peer, current_stream(c)); });
          },
          py::arg("buffer"), py::arg("peer"), py::call_guard<py::gil_scoped_release>(),
          "Queue a send of the buffer after the current stream's work; a ticket")
      .def(
          "recv",
          [](PyNcclComm& c, const at::Tensor& buf, int peer) {
            return c.start(buf,
                           [&] { return c.recv(device_bytes(c, buf, "recv"), buf.nbytes(), peer, current_stream(c)); });
          },
          py::arg("buffer"), py::arg("peer"), py::call_guard<py::gil_scoped_release>(),
          "Queue a receive into the buffer; a ticket")
      .def("done", &NcclComm::done, py::arg("ticket"), py::call_guard<py::gil_scoped_release>())
      .def(
          "wait",
          [](PyNcclComm& c, int64_t ticket, double timeout) {
            c.wait(ticket, timeout);
            c.finished(ticket);  // a failed wait keeps the buffer: the operation may still run
          },
          py::arg("ticket"), py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("abort", &NcclComm::abort, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("aborted", &NcclComm::aborted)
      // Diagnostics for the tests: buffers held for operations not waited for yet, and the sets of
      // buffers kept past their communicator's end (process-wide).
      .def_property_readonly("held_buffers", &PyNcclComm::held);
  m.def("nccl_graveyard_size", [] {
    graveyard().sweep();
    return graveyard().size();
  });
#endif
}

}  // namespace pipeline
}  // namespace torchspec
