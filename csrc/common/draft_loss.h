// Parameters shared by the CPU and CUDA tile kernels of draft_topk_kl, the fused LM-head +
// top-k KL loss. Framework-free: no torch, no CUDA headers.
//
// The launcher computes the float32 logits z = hidden @ weight.T one tile at a time (a block of
// rows times a vocabulary chunk) and hands each tile to these kernels, so [N, V] never exists.
// Teacher entries: per row k ids (-1 = absent) with weights p (0 for absent entries and for rows
// that do not count, else the renormalised teacher probabilities).
#pragma once

#include <cstdint>

#include "topk_lse.h"

namespace torchspec {

// Where a tile lies, shared by both passes. Row r of the tile is row r of every per-row array of
// the passes' structs (the launcher offsets the pointers to the tile's first row).
struct DraftLossTile {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // row stride of the logits, in floats
  int64_t col_offset = 0;  // vocabulary id of the tile's column 0
  const int64_t* target_indices = nullptr;  // [rows, k]
  int k = 0;
  float inv_temperature = 1.0f;
};

// Forward: merge one tile into each row's running state.
struct DraftLossForwardTile : DraftLossTile {
  const float* logits = nullptr;  // [rows, cols], row stride ld; raw z (not divided by T)
  const float* target_weights = nullptr;  // [rows, k]
  // Running state, [rows] each; start from max = -inf, sum = 0, argmax (-inf, 0), dot = 0.
  float* run_max = nullptr;  // largest raw z seen (NaN ignored)
  float* run_sum = nullptr;  // sum of exp((z - run_max) / T); NaN once a NaN logit was seen
  float* argmax_value = nullptr;  // raw z of the argmax (NaN ranks above everything)
  int64_t* argmax_index = nullptr;  // lowest index among equal maxima
  float* target_dot = nullptr;  // sum_j p_j * z[idx_j] over the entries seen so far (raw z)
  float* out_lse = nullptr;  // when non-null (the last vocabulary chunk): log-sum-exp of z / T
};

// Backward: overwrite one tile of logits with the gradient of the loss with respect to them,
//   g[r, v] = row_scale[r] * exp(z[r, v] / T - lse[r]) - sum_{j : idx_j = v} coef[r, j],
// where row_scale = grad_loss / (T * counted rows) for rows that count (0 otherwise) and
// coef = p * row_scale. Rows with row_scale == 0 get exact zeros (even if their logits are NaN).
struct DraftLossBackwardTile : DraftLossTile {
  float* logits = nullptr;  // [rows, cols], row stride ld; z in, g out
  const float* target_coef = nullptr;  // [rows, k]
  const float* lse = nullptr;  // [rows], log-sum-exp of z / T from the forward
  const float* row_scale = nullptr;  // [rows]
};

// The log-sum-exp of a finished forward state (a NaN sum means a NaN logit was seen).
TORCHSPEC_HD float draft_finish_lse(float run_max, float run_sum, float inv_temperature) {
  return finish_lse(run_sum != run_sum, run_max, run_sum, inv_temperature);
}

}  // namespace torchspec
