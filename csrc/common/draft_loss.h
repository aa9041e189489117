// Parameters shared by the CPU and CUDA kernels of draft_topk_kl, the fused LM-head + top-k
// teacher loss (kl, lk_alpha, lk_lambda). Framework-free: no torch, no CUDA headers.
//
// The launcher computes the float32 logits z = hidden @ weight.T one tile at a time (a block of
// rows times a vocabulary chunk) and hands each tile to these kernels, so [N, V] never exists.
// Teacher entries: per row k ids (-1 = absent) with weights p (0 for absent entries and for rows
// that do not count, else the renormalised teacher probabilities).
//
// Every loss kind has a gradient of the same shape, d loss / d z[r, v] =
//   row_scale[r] * softmax(z / T)[r, v] - sum_{j : idx_j = v} coef[r, j],
// so one backward tile kernel serves all; only row_scale and coef differ (the KL ones come from
// the teacher alone, the LK ones from DraftLossLKRows once the row's log-sum-exp is known).
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
  // [rows, k] or null: raw z[idx_j] for the entries whose id is in this tile; on the last chunk
  // (out_lse non-null) every entry with idx_j >= 0 becomes log q = z[idx_j] / T - lse. Entries with
  // idx_j = -1 are left as they are (the launcher fills them with -inf).
  float* target_logits = nullptr;
};

// Backward: overwrite one tile of logits with the gradient of the loss with respect to them,
//   g[r, v] = row_scale[r] * exp(z[r, v] / T - lse[r]) - sum_{j : idx_j = v} coef[r, j]
// (KL: row_scale = grad_loss / (T * counted rows) for rows that count, 0 otherwise, and
// coef = p * row_scale). A row with row_scale == 0 gets exact zeros minus its non-zero
// coefficients, its logits unread (so NaN logits of a row that does not count give zeros).
struct DraftLossBackwardTile : DraftLossTile {
  float* logits = nullptr;  // [rows, cols], row stride ld; z in, g out
  const float* target_coef = nullptr;  // [rows, k]
  const float* lse = nullptr;  // [rows], log-sum-exp of z / T from the forward
  const float* row_scale = nullptr;  // [rows]
};

enum class DraftLossKind : int { kKL = 0, kLKAlpha = 1, kLKLambda = 2 };

// The LK losses of rows whose forward is done, from the draft's log-probabilities at the teacher
// ids. Per row, with q_j = exp(draft_logprobs[j]) over the distinct present ids (accept_prob >= 0),
// P_j = accept_prob[j] (the teacher's probability of that draft token), p_t = tail (the teacher's
// mass outside its top-k) and q_t = max(0, 1 - sum_j q_j) (the draft's mass outside those ids):
//   a = sum_j min(P_j, q_j) + min(p_t, q_t)      (computed as a log-sum-exp of the min's logs)
//   accept = a, neg_log_accept = -log a (0 where a == 0: no gradient there either);
// with c_j = [q_j < P_j] - [q_t < p_t] (d a / d q_j; a tie counts as the teacher's side) and
// s = grad_scale[r] (d total / d loss * row weight / T; 0 for rows that do not count):
//   lk_alpha:  row_scale = s * sum_j c_j q_j / a,  coef_j = s * c_j q_j / a
//   lk_lambda: row_scale = s * (w + (1 - w) sum_j c_j q_j),  coef_j = s * (w p_j + (1 - w) c_j q_j)
// with w = *lambda_weight (detached) and p_j = kl_weights[j] (the KL path's renormalised
// teacher). Arithmetic in double. A row with s == 0 gets row_scale = coef = 0 exactly.
struct DraftLossLKRows {
  int64_t rows = 0;
  int k = 0;
  DraftLossKind kind = DraftLossKind::kLKAlpha;
  const float* draft_logprobs = nullptr;  // [rows, k]: log q at the teacher ids, -inf where absent
  const float* accept_prob = nullptr;  // [rows, k]: P_j at a distinct present id, < 0 elsewhere
  const float* tail = nullptr;  // [rows]: p_t
  const float* kl_weights = nullptr;  // [rows, k] (lk_lambda's coefficients only)
  const float* grad_scale = nullptr;  // [rows] (coefficients only)
  const float* lambda_weight = nullptr;  // [1]: w (lk_lambda's coefficients only)
  float* accept = nullptr;  // [rows]
  float* neg_log_accept = nullptr;  // [rows]
  float* row_scale = nullptr;  // [rows]; with coef: null for the statistics alone
  float* coef = nullptr;  // [rows, k]
};

// log(exp(a) + exp(b)) in double: NaN if either is NaN, -inf only if both are.
TORCHSPEC_HD double lk_log_add_exp(double a, double b) {
  if (a != a || b != b) return NAN;
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  if (lo == -INFINITY) return hi;
  return hi + log1p(exp(lo - hi));
}

// Whether an entry takes part in the LK sums: a distinct present id (P_j >= 0, or NaN).
TORCHSPEC_HD bool lk_counts(float accept_prob) { return !(accept_prob < 0.0f); }

// log min(P_j, q_j) of one entry from log q_j and log P_j; NaN if either is.
TORCHSPEC_HD double lk_log_min(double log_q, double log_p) {
  return log_q != log_q ? log_q : (log_q < log_p ? log_q : log_p);
}

// The running maximum of the entries' log min, NaN once one is NaN.
TORCHSPEC_HD double lk_max(double m, double t) { return (t > m || t != t) ? t : m; }

// log a of one row from its teacher-id part (m = the largest log min(P_j, q_j), s = sum of
// exp(log min - m); m = -inf when there is none) and its tail (sum_q = sum_j q_j, tail = p_t);
// *tail_side = [q_t < p_t], d min(p_t, q_t) / d q_t.
TORCHSPEC_HD double lk_log_accept(double m, double s, double sum_q, float tail, double* tail_side) {
  const double ids = m == -INFINITY ? -INFINITY : m + log(s);
  const double q_tail = 1.0 - sum_q;
  const double log_q_tail = q_tail > 0.0 ? log(q_tail) : -INFINITY;
  const double log_p_tail = log(static_cast<double>(tail));
  *tail_side = log_q_tail < log_p_tail ? 1.0 : 0.0;
  return lk_log_add_exp(ids, log_q_tail < log_p_tail ? log_q_tail : log_p_tail);
}

// The log-sum-exp of a finished forward state (a NaN sum means a NaN logit was seen).
TORCHSPEC_HD float draft_finish_lse(float run_max, float run_sum, float inv_temperature) {
  return finish_lse(run_sum != run_sum, run_max, run_sum, inv_temperature);
}

}  // namespace torchspec
