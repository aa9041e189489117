// CPU kernels of draft_topk_kl (see common/draft_loss.h). Each row of a tile is read in
// 256-float chunks: a vectorised max / NaN scan updates the running argmax, then a vectorised
// exp-sum updates the running log-sum-exp; the k teacher entries are looked up directly. The LK
// rows kernel works on the k entries of a row only, in double.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_common.h"
#include "cpu_kernels.h"

namespace torchspec {
namespace cpu {
namespace {

using namespace simd;

constexpr int kChunk = 256;  // floats: 1 KiB, in L1 for both passes over it
constexpr int kGroups = kChunk / kLanes;

TORCHSPEC_CPU_CLONES
void forward_impl(const DraftLossForwardTile& p, int64_t row_begin, int64_t row_end) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float exp2_scale = p.inv_temperature * kLog2e;
  float buf[kChunk];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = p.logits + r * p.ld;
    float m = p.run_max[r];
    float s = p.run_sum[r];
    bool saw_nan = s != s;
    float best = p.argmax_value[r];
    int64_t best_index = p.argmax_index[r];
    for (int64_t c0 = 0; c0 < p.cols; c0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, p.cols - c0));
      const float* x = row + c0;
      if (n < kChunk) {
        std::memcpy(buf, x, n * sizeof(float));
        for (int i = n; i < kChunk; ++i) buf[i] = ninf;  // a -inf pad changes neither max nor sum
        x = buf;
      }
      f32x16 vmax = f32x16{} + ninf;
      i32x16 vnan = {};
#pragma GCC unroll 2
      for (int g = 0; g < kGroups; ++g) {
        f32x16 v;
        std::memcpy(&v, x + g * kLanes, sizeof(v));
        vmax = v > vmax ? v : vmax;  // NaN lanes compare false
        vnan |= v != v;
      }
      const float cmax = reduce_max(vmax);
      const bool chunk_nan = reduce_or(vnan) != 0;
      // Argmax in torch.argmax's order: the first NaN, else the first occurrence of the maximum.
      if (best == best) {
        if (chunk_nan) {
          int i = 0;
          while (x[i] == x[i]) ++i;
          best = x[i];
          best_index = p.col_offset + c0 + i;
        } else if (cmax > best) {
          int i = 0;
          while (x[i] != cmax) ++i;
          best = cmax;
          best_index = p.col_offset + c0 + i;
        }
      }
      saw_nan |= chunk_nan;
      lse_add_chunk<kGroups>(x, cmax, exp2_scale, m, s);
    }
    float dot = p.target_dot[r];
    for (int j = 0; j < p.k; ++j) {
      const int64_t col = p.target_indices[r * p.k + j] - p.col_offset;
      const float w = p.target_weights[r * p.k + j];
      if (col >= 0 && col < p.cols && w != 0.0f) dot += w * row[col];
    }
    // The gather in a loop of its own, so that the dot product's loop (whose float32 result the
    // training tests record bit for bit) stays as it was.
    const int64_t* ids = p.target_indices + r * p.k;
    float* gathered = p.target_logits == nullptr ? nullptr : p.target_logits + r * p.k;
    if (gathered != nullptr) {
      for (int j = 0; j < p.k; ++j) {
        const int64_t col = ids[j] - p.col_offset;
        if (col >= 0 && col < p.cols) gathered[j] = row[col];
      }
    }
    if (saw_nan) s = std::numeric_limits<float>::quiet_NaN();
    p.run_max[r] = m;
    p.run_sum[r] = s;
    p.argmax_value[r] = best;
    p.argmax_index[r] = best_index;
    p.target_dot[r] = dot;
    if (p.out_lse != nullptr) {
      const float lse = draft_finish_lse(m, s, p.inv_temperature);
      p.out_lse[r] = lse;
      if (gathered != nullptr) {
        for (int j = 0; j < p.k; ++j) {
          if (ids[j] >= 0) gathered[j] = gathered[j] * p.inv_temperature - lse;
        }
      }
    }
  }
}

// Subtracts row r's teacher coefficients at their columns of the tile (only the non-zero ones
// when `nonzero_only`: a zeroed row stays +0 where they are zero).
inline void subtract_coefficients(const DraftLossBackwardTile& p, int64_t r, float* row, bool nonzero_only) {
  for (int j = 0; j < p.k; ++j) {
    const int64_t col = p.target_indices[r * p.k + j] - p.col_offset;
    const float c = p.target_coef[r * p.k + j];
    if (col >= 0 && col < p.cols && (c != 0.0f || !nonzero_only)) row[col] -= c;
  }
}

TORCHSPEC_CPU_CLONES
void backward_impl(const DraftLossBackwardTile& p, int64_t row_begin, int64_t row_end) {
  const float a = p.inv_temperature * kLog2e;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* row = p.logits + r * p.ld;
    const float scale = p.row_scale[r];
    if (scale == 0.0f) {
      std::memset(row, 0, p.cols * sizeof(float));
      subtract_coefficients(p, r, row, true);
      continue;
    }
    const float b = p.lse[r] * kLog2e;
    // exp(z / T - lse) = 2^(z * a - b); the exponent is <= 0 up to rounding.
    int64_t c = 0;
    for (; c + kLanes <= p.cols; c += kLanes) {
      f32x16 v;
      std::memcpy(&v, row + c, sizeof(v));
      v = exp2_nonpositive(v * a - b) * scale;
      std::memcpy(row + c, &v, sizeof(v));
    }
    if (c < p.cols) {
      const int n = static_cast<int>(p.cols - c);
      float tail[kLanes] = {};
      std::memcpy(tail, row + c, n * sizeof(float));
      f32x16 v;
      std::memcpy(&v, tail, sizeof(v));  // lanes past n are never stored back
      v = exp2_nonpositive(v * a - b) * scale;
      std::memcpy(tail, &v, sizeof(v));
      std::memcpy(row + c, tail, n * sizeof(float));
    }
    subtract_coefficients(p, r, row, false);
  }
}

// One row of the LK losses (see DraftLossLKRows): three passes over its k entries.
void lk_row(const DraftLossLKRows& p, int64_t r) {
  const float* log_q = p.draft_logprobs + r * p.k;
  const float* prob = p.accept_prob + r * p.k;
  double sum_q = 0.0, m = -INFINITY;
  for (int j = 0; j < p.k; ++j) {
    if (!lk_counts(prob[j])) continue;
    sum_q += std::exp(static_cast<double>(log_q[j]));
    m = lk_max(m, lk_log_min(log_q[j], std::log(static_cast<double>(prob[j]))));
  }
  double s = 0.0;
  if (m > -INFINITY) {
    for (int j = 0; j < p.k; ++j) {
      if (lk_counts(prob[j])) s += std::exp(lk_log_min(log_q[j], std::log(static_cast<double>(prob[j]))) - m);
    }
  }
  double tail_side;
  const double log_a = lk_log_accept(m, s, sum_q, p.tail[r], &tail_side);
  p.accept[r] = static_cast<float>(std::exp(log_a));
  p.neg_log_accept[r] = log_a == -INFINITY ? 0.0f : static_cast<float>(-log_a);
  if (p.coef == nullptr) return;
  float* coef = p.coef + r * p.k;
  const double scale = p.grad_scale[r];
  // No gradient: a row that does not count, or one whose -log a is infinite (lk_alpha).
  if (scale == 0.0 || (p.kind == DraftLossKind::kLKAlpha && log_a == -INFINITY)) {
    p.row_scale[r] = 0.0f;
    for (int j = 0; j < p.k; ++j) coef[j] = 0.0f;
    return;
  }
  const bool alpha = p.kind == DraftLossKind::kLKAlpha;
  const double w = alpha ? 0.0 : *p.lambda_weight;
  const float* kl_weights = alpha ? nullptr : p.kl_weights + r * p.k;
  double sum_cq = 0.0;  // sum_j c_j q_j (lk_lambda), or that divided by a (lk_alpha)
  for (int j = 0; j < p.k; ++j) {
    double cq = 0.0;
    if (lk_counts(prob[j])) {
      const double side = log_q[j] < std::log(static_cast<double>(prob[j])) ? 1.0 : 0.0;
      cq = (side - tail_side) * std::exp(log_q[j] - (alpha ? log_a : 0.0));
      sum_cq += cq;
    }
    coef[j] = static_cast<float>(alpha ? scale * cq : scale * (w * kl_weights[j] + (1.0 - w) * cq));
  }
  p.row_scale[r] = static_cast<float>(alpha ? scale * sum_cq : scale * (w + (1.0 - w) * sum_cq));
}

}  // namespace

void draft_loss_forward_rows(const DraftLossForwardTile& p, int64_t row_begin, int64_t row_end) {
  forward_impl(p, row_begin, row_end);
}

void draft_loss_backward_rows(const DraftLossBackwardTile& p, int64_t row_begin, int64_t row_end) {
  backward_impl(p, row_begin, row_end);
}

void draft_loss_lk_rows(const DraftLossLKRows& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) lk_row(p, r);
}

}  // namespace cpu
}  // namespace torchspec
