// CUDA kernels, framework-free: raw pointers and a stream in, cudaError_t out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "../common/device_error.h"
#include "../common/draft_loss.h"
#include "../common/topk_lse.h"
#include "../common/tree.h"

namespace torchspec {
namespace cuda {

// Top-k of each row with its log-sum-exp (see TopkLseParams); one thread block per row.
cudaError_t topk_lse(const TopkLseParams& p, cudaStream_t stream);

// draft_topk_kl forward: merge a logits tile into the running state; one thread block per row.
cudaError_t draft_loss_forward(const DraftLossForwardTile& p, cudaStream_t stream);

// draft_topk_kl backward: a logits tile becomes d loss / d logits in place; one block per row.
cudaError_t draft_loss_backward(const DraftLossBackwardTile& p, cudaStream_t stream);

// draft_topk_kl, LK losses: each row's statistics and coefficients; one warp per row.
cudaError_t draft_loss_lk_rows(const DraftLossLKRows& p, cudaStream_t stream);

// How tree_attention runs on the current device (common/tree.h): tensor cores for bfloat16 / float16
// on sm_80 and later, else CUDA cores; the number of key ranges and the workspace they need.
cudaError_t tree_attention_plan(const TreeAttentionParams& p, TreeAttentionPlan* plan);

// Tree attention (see TreeAttentionParams). With tensor cores and more than one key range
// (tree_attention_plan), p.workspace must hold plan.workspace_bytes and p.splits be plan.splits.
cudaError_t tree_attention(const TreeAttentionParams& p, cudaStream_t stream);

// Shared memory per block (static + dynamic, bytes) that a tree_attention or verify_tree launch
// with p needs, and the most the current device allows: the ops check one against the other, so
// that a tree or head size past the device's limit gets a clear error instead of a failed launch.
cudaError_t tree_attention_smem(const TreeAttentionParams& p, size_t* needed, size_t* allowed);
cudaError_t verify_tree_smem(const TreeVerifyParams& p, size_t* needed, size_t* allowed);

// Checks that every id of ids [n] (row-major, `cols` per row) is in [low, limit); the first bad one
// found is written to rec (common/device_error.h), reported by the op layer at its next call.
cudaError_t check_index_range(const int64_t* ids, int64_t n, int64_t cols, int64_t low, int64_t limit, DeviceErrorOp op,
                              DeviceErrorRecord* rec, cudaStream_t stream);

// Checks that every value of values [n] (float32, one per row) is at most `limit` (NaN passes); the
// first bad one found is written to rec as its row, its value's and the limit's float64 bits.
cudaError_t check_at_most(const float* values, int64_t n, float limit, DeviceErrorOp op, DeviceErrorRecord* rec,
                          cudaStream_t stream);

// Tree verification, greedy when p.uniforms is null, else sampling (see TreeVerifyParams); one
// thread block per batch row walks its tree.
cudaError_t verify_tree(const TreeVerifyParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchspec
