// CPU kernels, framework-free: raw pointers in, results out. Each processes a range of rows so
// that the caller picks the threading (at::parallel_for in the op, std::thread in benchmarks).
#pragma once

#include <cstdint>

#include "../common/draft_loss.h"
#include "../common/small_rows.h"
#include "../common/topk_lse.h"
#include "../common/tree.h"

namespace torchspec {
namespace cpu {

// Top-k of each row with its log-sum-exp, rows [row_begin, row_end) of p (see TopkLseParams).
void topk_lse_rows(const TopkLseParams& p, int64_t row_begin, int64_t row_end);

// draft_topk_kl forward: merge rows [row_begin, row_end) of a logits tile into the running state.
void draft_loss_forward_rows(const DraftLossForwardTile& p, int64_t row_begin, int64_t row_end);

// draft_topk_kl backward: rows [row_begin, row_end) of a logits tile become d loss / d logits.
void draft_loss_backward_rows(const DraftLossBackwardTile& p, int64_t row_begin, int64_t row_end);

// draft_topk_kl, LK losses: rows [row_begin, row_end) of p's statistics and coefficients.
void draft_loss_lk_rows(const DraftLossLKRows& p, int64_t row_begin, int64_t row_end);

// Tree attention for the (batch row, kv head) pairs u in [unit_begin, unit_end), u = b * Hkv + g:
// every query head of the group and every node (see TreeAttentionParams).
void tree_attention_units(const TreeAttentionParams& p, int64_t unit_begin, int64_t unit_end);

// Tree verification of batch rows [row_begin, row_end): greedy when p.uniforms is null, else
// sampling (see TreeVerifyParams).
void verify_tree_rows(const TreeVerifyParams& p, int64_t row_begin, int64_t row_end);

// Small-rows linear: out[:, o] for the weight rows o in [out_begin, out_end) (see SmallRowsLinearParams).
void small_rows_linear_range(const SmallRowsLinearParams& p, int64_t out_begin, int64_t out_end);

}  // namespace cpu
}  // namespace torchspec
