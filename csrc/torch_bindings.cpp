// Every op schema of the torchspec library, and the pybind11 module for the non-op helpers (left
// out where the op layer is compiled for the CUDA emulator's test, TORCHSPEC_OPS_ON_EMULATOR).
#include <torch/library.h>

#ifndef TORCHSPEC_OPS_ON_EMULATOR
#include <torch/extension.h>

#include "common/tree.h"
#include "ops/device_errors.h"
#include "pipeline/bindings.h"

#ifdef TORCHSPEC_WITH_NCCL
#include <nccl.h>
#endif
#endif

TORCH_LIBRARY(torchspec, m) {
  // Top-k of logits / T as log-probabilities (sorted, lower index first on ties) and log-sum-exp.
  m.def("topk_logprobs(Tensor logits, int k, float temperature=1.0) -> (Tensor, Tensor, Tensor)");
  // Same result as topk_logprobs(hidden @ weight.T, k, temperature), over tiles of the logits.
  m.def("linear_topk_logprobs(Tensor hidden, Tensor weight, int k, float temperature=1.0) -> (Tensor, Tensor, Tensor)");
  // Fused LM head + loss ('kl', 'lk_alpha', 'lk_lambda') against a top-k teacher:
  // (loss, draft argmax [N], draft lse [N], draft log-probabilities at the teacher ids [N, k]).
  m.def(
      "draft_topk_kl(Tensor hidden, Tensor weight, Tensor teacher_indices, Tensor teacher_logprobs, "
      "Tensor? valid=None, float temperature=1.0, str loss=\"kl\", float kl_scale=1.0, float kl_decay=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of draft_topk_kl's loss with respect to hidden and weight (recomputes the logits).
  m.def(
      "draft_topk_kl_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor teacher_indices, "
      "Tensor teacher_logprobs, Tensor? valid, Tensor lse, Tensor draft_logprobs, float temperature, "
      "str loss=\"kl\", float kl_scale=1.0, float kl_decay=1.0) -> (Tensor, Tensor)");
  // draft_topk_kl and the gradients of its loss with respect to hidden and weight, in one pass.
  m.def(
      "draft_topk_kl_with_grad(Tensor hidden, Tensor weight, Tensor teacher_indices, Tensor teacher_logprobs, "
      "Tensor? valid=None, float temperature=1.0, str loss=\"kl\", float kl_scale=1.0, float kl_decay=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention of T draft-tree nodes over a shared prefix and their ancestors (mask from parents).
  m.def(
      "tree_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_lens, Tensor parents, float? scale=None) -> Tensor");
  // Greedy walk of draft trees against the target's argmaxes: (num_accepted, path, next_token).
  m.def("verify_tree_greedy(Tensor tokens, Tensor parents, Tensor target_logits) -> (Tensor, Tensor, Tensor)");
  // Lossless sampling walk of draft trees given uniforms [B, T]: (num_accepted, path, next_token).
  m.def(
      "verify_tree_sampling(Tensor tokens, Tensor parents, Tensor target_logits, float temperature, Tensor uniforms) "
      "-> (Tensor, Tensor, Tensor)");
  // x @ weight.T + bias for the few rows of a decoding step, reading each weight once (CPU kernel).
  m.def("small_rows_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

#ifndef TORCHSPEC_OPS_ON_EMULATOR
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
  m.def(
      "raise_device_errors", [](int device) { torchspec::raise_device_error(device, "raise_device_errors"); },
      pybind11::arg("device"),
      "Raises the input error a CUDA kernel of a torchspec op found on this device, if any (ops/device_errors.h); "
      "call it after torch.cuda.synchronize()");
  m.def(
      "tree_attention_cuda_cost",
      [](int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t prefix, int64_t D, int64_t esize, int64_t sms) {
        const torchspec::TreeAttentionCost c = torchspec::tree_attention_mma_cost(B, Hq, Hkv, T, prefix, D, esize, sms);
        pybind11::dict d;
        d["bytes"] = c.bytes;
        d["unique_bytes"] = c.unique_bytes;
        d["floor_bytes"] = c.floor_bytes;
        d["executed_flops"] = c.executed_flops;
        d["dense_flops"] = c.dense_flops;
        d["splits"] = c.splits;
        return d;
      },
      pybind11::arg("batch"), pybind11::arg("q_heads"), pybind11::arg("kv_heads"), pybind11::arg("nodes"),
      pybind11::arg("prefix"), pybind11::arg("dim"), pybind11::arg("esize"), pybind11::arg("sm_count"),
      "What the CUDA tensor-core tree_attention kernel moves and computes (common/tree.h): bytes, unique_bytes, "
      "floor_bytes, executed_flops, dense_flops, splits");
  torchspec::pipeline::bind(m);
}
#endif
