// Python bindings of the tensor pipeline: the wire format (used by every transport) and, in
// builds with NCCL, the NCCL communicator. The Python side is torchspec_ext/pipeline.
#include "bindings.h"

#include "wire.h"

#ifdef TORCHSPEC_WITH_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

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

// The transfer runs on the communicator's own stream, which the caching allocator does not know:
// without this, a buffer freed before its transfer completed (a preamble receive posted ahead on
// a channel dropped without close() while the peer still sends) goes back to the allocator and
// may be handed to another tensor while NCCL still writes into it, or reads it.
void record_use(const at::Tensor& t, cudaStream_t stream, int device) {
  c10::cuda::CUDACachingAllocator::recordStream(
      t.storage().data_ptr(), c10::cuda::getStreamFromExternal(stream, static_cast<c10::DeviceIndex>(device)));
}

// The bound type: local to this file, as pybind11's own types are hidden (binding NcclComm itself,
// a default-visibility type, warns "declared with greater visibility than its base").
struct PyNcclComm : NcclComm {
  using NcclComm::NcclComm;
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
            const int64_t ticket = c.send(device_bytes(c, buf, "send"), buf.nbytes(), peer, current_stream(c));
            record_use(buf, c.send_stream(), c.device());
            return ticket;
          },
          py::arg("buffer"), py::arg("peer"), "Queue a send of the buffer after the current stream's work; a ticket")
      .def(
          "recv",
          [](PyNcclComm& c, const at::Tensor& buf, int peer) {
            const int64_t ticket = c.recv(device_bytes(c, buf, "recv"), buf.nbytes(), peer, current_stream(c));
            record_use(buf, c.recv_stream(), c.device());
            return ticket;
          },
          py::arg("buffer"), py::arg("peer"), "Queue a receive into the buffer; a ticket")
      .def("done", &NcclComm::done, py::arg("ticket"))
      .def("wait", &NcclComm::wait, py::arg("ticket"), py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("abort", &NcclComm::abort)
      .def_property_readonly("aborted", &NcclComm::aborted);
#endif
}

}  // namespace pipeline
}  // namespace torchspec
