// The LM head shared by linear_topk_logprobs and draft_topk_kl: the checks of hidden and weight,
// and the size of the tiles of logits both ops make from them with torch's GEMM.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace torchspec {

// hidden [..., H] (or [N, H] when hidden_2d) and weight [V, H]: on one supported device, of one
// float32 / bfloat16 / float16 dtype, with the same H. `vocab` is the vocabulary's name in the
// messages ("V", or "Vd" for the draft's).
inline void check_lm_head(const at::Tensor& hidden, const at::Tensor& weight, const char* op, bool hidden_2d,
                          const char* vocab) {
  if (hidden_2d) {
    TORCHSPEC_CHECK_ARG(hidden.dim() == 2, op, "hidden must be 2-D [N, H], got ", hidden.dim(), " dimensions");
  } else {
    TORCHSPEC_CHECK_ARG(hidden.dim() >= 1, op, "hidden must be [..., H], got a scalar");
  }
  TORCHSPEC_CHECK_ARG(weight.dim() == 2, op, "weight must be 2-D [", vocab, ", H], got ", weight.dim(), " dimensions");
  check_device_supported(hidden, op, "hidden");
  check_same_device(hidden, "hidden", weight, "weight", op);
  float_kind(hidden, op, "hidden");
  TORCHSPEC_CHECK_ARG(hidden.scalar_type() == weight.scalar_type(), op,
                      "hidden and weight must have the same dtype, got ", hidden.scalar_type(), " and ",
                      weight.scalar_type());
  const int64_t H = hidden.size(-1);
  const char* h_from = hidden_2d ? "hidden.size(1)" : "hidden.size(-1)";
  TORCHSPEC_CHECK_ARG(weight.size(1) == H, op, "weight must be [", vocab, ", H] with H = ", h_from, " = ", H,
                      ", got weight ", weight.sizes());
}

// Bytes of one tile of logits: small next to [N, V], large enough for the GEMMs to run near full
// rate. 16 MiB on CPU: with 4 MiB tiles the GEMMs (2 cores, H = 576) ran 1.4x slower in
// linear_topk_logprobs ([252, 4096] tiles at N = 1000) and about 1.5x slower in draft_topk_kl
// ([512, 2048] float32 tiles at N = 4096). 32 MiB on CUDA (a tile stays in the L2 of large GPUs).
inline int64_t lm_head_tile_bytes(bool cuda) { return cuda ? (int64_t{32} << 20) : (int64_t{16} << 20); }

}  // namespace torchspec
