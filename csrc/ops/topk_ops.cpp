// torch-facing launchers of topk_logprobs and linear_topk_logprobs (CPU and CUDA).
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../cpu/cpu_kernels.h"
#include "checks.h"
#include "dispatch.h"
#include "lm_head.h"

namespace torchspec {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Run the kernel on a [rows, V] matrix whose columns are contiguous. Seeds (optional) and outputs
// are contiguous [rows, k] / [rows] float32 / int64 tensors; they may be the same tensors.
void run_topk_lse(const at::Tensor& logits2d, int64_t k, double temperature, int64_t index_offset,
                  const at::Tensor* seed_values, const at::Tensor* seed_indices, const at::Tensor* seed_lse,
                  at::Tensor& out_values, at::Tensor& out_indices, at::Tensor& out_lse, bool finalize) {
  TopkLseParams p;
  p.logits = logits2d.data_ptr();
  p.dtype = float_kind(logits2d, "topk_logprobs", "logits");
  p.rows = logits2d.size(0);
  p.vocab = logits2d.size(1);
  p.row_stride = logits2d.stride(0);
  p.k = static_cast<int>(k);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.index_offset = index_offset;
  if (seed_values != nullptr) {
    p.seed_values = seed_values->data_ptr<float>();
    p.seed_indices = seed_indices->data_ptr<int64_t>();
    p.seed_lse = seed_lse->data_ptr<float>();
  }
  p.out_values = out_values.data_ptr<float>();
  p.out_indices = out_indices.data_ptr<int64_t>();
  p.out_lse = out_lse.data_ptr<float>();
  p.finalize = finalize;
  run_on_device(
      logits2d, p.rows, row_grain(p.vocab), "topk_logprobs", "rows",
      [&](int64_t begin, int64_t end) { cpu::topk_lse_rows(p, begin, end); },
      TORCHSPEC_IF_CUDA([&](cudaStream_t stream) { return cuda::topk_lse(p, stream); }));
}

// [..., V] -> a [rows, V] view (or copy) whose columns are contiguous.
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t last = t.size(-1);
  at::Tensor x = t.stride(-1) == 1 ? t : t.contiguous();
  x = x.reshape({-1, last});
  return x.stride(1) == 1 ? x : x.contiguous();
}

Outputs allocate_outputs(at::IntArrayRef batch, int64_t k, const at::Device& device) {
  std::vector<int64_t> shape(batch.begin(), batch.end());
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor lse = at::empty(shape, f32);
  shape.push_back(k);
  return {at::empty(shape, f32), at::empty(shape, f32.dtype(at::kLong)), lse};
}

Outputs topk_logprobs(const at::Tensor& logits, int64_t k, double temperature) {
  constexpr const char* op = "topk_logprobs";
  TORCHSPEC_CHECK_ARG(logits.dim() >= 1, op, "logits must have at least one dimension [..., V], got a scalar");
  check_device_supported(logits, op, "logits");
  float_kind(logits, op, "logits");
  check_topk_k(k, logits.size(-1), op);
  check_temperature(temperature, op);
  auto [values, indices, lse] = allocate_outputs(logits.sizes().slice(0, logits.dim() - 1), k, logits.device());
  if (logits.numel() == 0) return {values, indices, lse};
  at::Tensor v2 = values.view({-1, k}), i2 = indices.view({-1, k}), l2 = lse.view({-1});
  run_topk_lse(as_rows(logits), k, temperature, 0, nullptr, nullptr, nullptr, v2, i2, l2, true);
  return {values, indices, lse};
}

// Vocabulary chunk [begin, end) boundaries: every chunk holds at least k columns, so a chunk's
// own top-k is always full (a remainder smaller than k joins the chunk before it).
std::vector<int64_t> chunk_bounds(int64_t vocab, int64_t chunk, int64_t k) {
  std::vector<int64_t> bounds{0};
  while (bounds.back() < vocab) {
    int64_t end = std::min(vocab, bounds.back() + chunk);
    if (vocab - end < k) end = vocab;
    bounds.push_back(end);
  }
  return bounds;
}

Outputs linear_topk_logprobs(const at::Tensor& hidden, const at::Tensor& weight, int64_t k, double temperature) {
  constexpr const char* op = "linear_topk_logprobs";
  check_lm_head(hidden, weight, op, /*hidden_2d=*/false, "V");
  const int64_t H = hidden.size(-1), V = weight.size(0);
  check_topk_k(k, V, op);
  check_temperature(temperature, op);

  auto [values, indices, lse] = allocate_outputs(hidden.sizes().slice(0, hidden.dim() - 1), k, hidden.device());
  // The row count from the batch dims, not reshape's -1 (ambiguous when H = 0).
  const int64_t N = c10::multiply_integers(hidden.sizes().slice(0, hidden.dim() - 1));
  const at::Tensor h2 = hidden.reshape({N, H});
  if (N == 0) return {values, indices, lse};
  at::Tensor v2 = values.view({-1, k}), i2 = indices.view({-1, k}), l2 = lse.view({-1});

  // Tile [rows, vocab] (lm_head_tile_bytes): the extra memory is one tile of logits, never
  // [N, V]. Each vocabulary chunk merges into the running top-k.
  const bool cuda = hidden.is_cuda();
  const int64_t vocab_chunk = cuda ? 8192 : 4096;
  const int64_t max_cols = vocab_chunk + k;  // the widest chunk chunk_bounds makes
  const int64_t row_chunk = std::max<int64_t>(1, lm_head_tile_bytes(cuda) / (max_cols * hidden.element_size()));
  const std::vector<int64_t> bounds = chunk_bounds(V, vocab_chunk, k);
  const int64_t rows_alloc = std::min(N, row_chunk);
  at::Tensor buffer = at::empty({rows_alloc * std::min(V, max_cols)}, hidden.options());
  for (int64_t r0 = 0; r0 < N; r0 += row_chunk) {
    const int64_t r1 = std::min(N, r0 + row_chunk);
    const at::Tensor h = h2.slice(0, r0, r1);
    at::Tensor vals = v2.slice(0, r0, r1), idx = i2.slice(0, r0, r1), ls = l2.slice(0, r0, r1);
    for (size_t c = 0; c + 1 < bounds.size(); ++c) {
      const int64_t c0 = bounds[c], c1 = bounds[c + 1];
      at::Tensor logits = buffer.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
      at::mm_out(logits, h, weight.slice(0, c0, c1).t());
      const bool first = c == 0;
      run_topk_lse(logits, k, temperature, c0, first ? nullptr : &vals, first ? nullptr : &idx, first ? nullptr : &ls,
                   vals, idx, ls, c1 == V);
    }
  }
  return {values, indices, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchspec, CPU, m) {
  m.impl("topk_logprobs", &topk_logprobs);
  m.impl("linear_topk_logprobs", &linear_topk_logprobs);
}

#ifdef TORCHSPEC_WITH_CUDA
TORCH_LIBRARY_IMPL(torchspec, CUDA, m) {
  m.impl("topk_logprobs", &topk_logprobs);
  m.impl("linear_topk_logprobs", &linear_topk_logprobs);
}
#endif

}  // namespace torchspec
