// Every op schema of the torchspec library, and the pybind11 module for the non-op helpers.
#include <torch/extension.h>
#include <torch/library.h>

#include "pipeline/bindings.h"

#ifdef TORCHSPEC_WITH_NCCL
#include <nccl.h>
#endif

TORCH_LIBRARY(torchspec, m) {
  // Top-k of logits / T as log-probabilities (sorted, lower index first on ties) and log-sum-exp.
  m.def("topk_logprobs(Tensor logits, int k, float temperature=1.0) -> (Tensor, Tensor, Tensor)");
  // Same result as topk_logprobs(hidden @ weight.T, k, temperature), over tiles of the logits.
  m.def("linear_topk_logprobs(Tensor hidden, Tensor weight, int k, float temperature=1.0) -> (Tensor, Tensor, Tensor)");
}

namespace {

// What this build of the extension contains, for diagnostics and for skipping tests.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef TORCHSPEC_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef TORCHSPEC_WITH_NCCL
  int version = 0;
  ncclGetVersion(&version);
  info["nccl_version"] = version;
#else
  info["nccl_version"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchspec_ext compiled core: ops are registered under torch.ops.torchspec";
  m.def("build_info", &build_info, "What this build contains: {'cuda': bool, 'nccl_version': int or None}");
  torchspec::pipeline::bind(m);
}
