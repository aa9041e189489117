// CUDA kernels, framework-free: raw pointers and a stream in, cudaError_t out.
#pragma once

#include <cuda_runtime_api.h>

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

// Tree attention (see TreeAttentionParams); one thread block per (batch row, query head, node).
cudaError_t tree_attention(const TreeAttentionParams& p, cudaStream_t stream);

// Tree verification, greedy when p.uniforms is null, else sampling (see TreeVerifyParams); one
// thread block per batch row walks its tree.
cudaError_t verify_tree(const TreeVerifyParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchspec
