// Parameters and the tree walk shared by the CPU and CUDA tree attention and verification kernels.
// Framework-free: no torch, no CUDA headers.
//
// A draft tree of T nodes per batch row is given by parents [B, T] (int64): parents[b, 0] = -1
// (node 0, the root, is the last committed token) and 0 <= parents[b, j] < j otherwise. The CPU
// launchers validate the trees on the host; the CUDA kernels validate them on the device (no host
// copy), record the first error in `error` (common/device_error.h) and leave the outputs of a batch
// row with a malformed tree NaN (attention) or -1 (verification): a walk to the root is then always
// bounded, each step going to an earlier node.
#pragma once

#include <cstdint>

#include "device_error.h"
#include "topk_lse.h"

namespace torchspec {

// out = attention of the T tree nodes over their prefix and their ancestors (see the op's doc).
// All tensors contiguous: q, out [B, Hq, T, D]; k, v [B, Hkv, S, D]; prefix_lens [B];
// parents [B, T]. Node j of row b attends to key positions [0, prefix_lens[b]) and to
// prefix_lens[b] + a for every ancestor a of j and j itself. Query head h reads kv head
// h / (Hq / Hkv). q, k, v, out share `dtype`; accumulation is float32.
struct TreeAttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  const int64_t* prefix_lens = nullptr;
  const int64_t* parents = nullptr;
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t nodes = 0;  // T
  int64_t seq = 0;  // S
  int64_t head_dim = 0;  // D
  float scale = 1.0f;
  DeviceErrorRecord* error = nullptr;  // CUDA: where a malformed tree or prefix length is reported
  // CUDA, tensor cores: key ranges per block of query rows (0: the launcher's choice, see
  // plan_tree_attention) and, when there are several, the merge's float32 workspace of
  // TreeAttentionPlan::workspace_bytes.
  int64_t splits = 0;
  float* workspace = nullptr;
};

// The CUDA tree_attention kernels (kernels/tree.cu), and their blocking, shared with the
// benchmarks' byte and FLOP counts.
//
// Tensor cores (bfloat16 / float16 on sm_80 and later): the G * T query rows of a (batch row, kv
// head) are packed node-major (row r: node r / G, query head r % G of the group) into blocks of
// kTreeAttentionMmaRows rows; the keys each block needs, positions [0, prefix + its last node + 1),
// are split into `splits` ranges of whole tiles of kTreeAttentionMmaKeys keys, one block each, whose
// partial results (output and log-sum-exp per row) a second kernel merges.
// CUDA cores (float32, and any dtype below sm_80): one block per (batch row, kv head, tile of
// tree_attention_tile_nodes(G) nodes), float32 FMAs.
constexpr int kTreeAttentionMmaRows = 64;  // 4 warps x 16 rows
constexpr int kTreeAttentionMmaKeys = 64;
constexpr int kTreeAttentionMinSplitTiles = 4;  // a split of a full-length row reads >= 4 tiles
constexpr int kTreeAttentionMaxSplits = 32;
constexpr int kTreeAttentionRowsPerBlock = 64;  // CUDA cores: query rows per block

TORCHSPEC_HD int64_t tree_attention_tile_nodes(int64_t group) {
  return group >= kTreeAttentionRowsPerBlock ? 1 : kTreeAttentionRowsPerBlock / group;
}

// How a tree_attention call runs on a device with `sm_count` multiprocessors.
struct TreeAttentionPlan {
  bool tensor_cores = false;
  int64_t row_blocks = 1;  // tensor cores: blocks of packed query rows per (batch row, kv head)
  int64_t splits = 1;  // tensor cores: key ranges per block of rows (> 1: merged by a second kernel)
  int64_t head_dim_pad = 0;  // tensor cores: D rounded up to 64, 128 or 256 (the kernel's shared rows)
  size_t workspace_bytes = 0;  // splits > 1: float32 partial outputs and log-sum-exps
};

// splits: 0 for the launcher's choice (enough blocks for two per multiprocessor, each reading at
// least kTreeAttentionMinSplitTiles tiles of the longest possible row), else that many.
inline TreeAttentionPlan plan_tree_attention(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D,
                                             bool tensor_cores, int64_t sm_count, int64_t splits = 0) {
  TreeAttentionPlan plan;
  plan.tensor_cores = tensor_cores;
  if (!tensor_cores) return plan;
  const int64_t rows = (Hq / Hkv) * T, units = B * Hkv;
  plan.row_blocks = (rows + kTreeAttentionMmaRows - 1) / kTreeAttentionMmaRows;
  plan.head_dim_pad = D <= 64 ? 64 : D <= 128 ? 128 : 256;
  if (splits <= 0) {
    const int64_t tiles = (S + kTreeAttentionMmaKeys - 1) / kTreeAttentionMmaKeys;
    int64_t most = tiles / kTreeAttentionMinSplitTiles;
    most = most < 1 ? 1 : most > kTreeAttentionMaxSplits ? kTreeAttentionMaxSplits : most;
    const int64_t blocks = units * plan.row_blocks;
    splits = (2 * sm_count + blocks - 1) / blocks;
    splits = splits < 1 ? 1 : splits > most ? most : splits;
  }
  plan.splits = splits;
  if (splits > 1) plan.workspace_bytes = static_cast<size_t>(splits * units * rows * (D + 1)) * 4;
  return plan;
}

// What the CUDA tensor-core kernel moves and computes for B rows of T nodes, each with a prefix of
// `prefix` tokens (element size `esize`), on `sm_count` multiprocessors.
// - bytes: what its blocks load and store: each block its rows' queries, its tree (parents) and
//   prefix length, and the keys and values of its range (nothing past the rows' last key); its
//   outputs once, or, split, float32 partials written and read back by the merge, then the outputs.
// - unique_bytes: the same with each range's keys and values and each query counted once: what
//   memory serves when L2 holds them for the other blocks of rows of the range (they run side by
//   side: neighbours in the grid), the partials included.
// - executed_flops: the tiles the tensor cores multiply (64 rows x 64 keys, D padded to 16 for
//   Q K^T and to 8 for P V); dense_flops: attention over all prefix + T keys of every row,
//   4 * rows * (prefix + T) * D. floor_bytes: q, k and v read once, out written once.
struct TreeAttentionCost {
  int64_t bytes = 0, unique_bytes = 0, floor_bytes = 0, executed_flops = 0, dense_flops = 0, splits = 1;
};

inline TreeAttentionCost tree_attention_mma_cost(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t prefix,
                                                 int64_t D, int64_t esize, int64_t sm_count) {
  const int64_t G = Hq / Hkv, rows = G * T, units = B * Hkv;
  const TreeAttentionPlan plan = plan_tree_attention(B, Hq, Hkv, T, prefix + T, D, true, sm_count);
  const int64_t dk = (D + 15) / 16 * 16, dv = (D + 7) / 8 * 8, splits = plan.splits;
  TreeAttentionCost c;
  c.splits = splits;
  int64_t loads = 0, unique = 0, flops = 0, widest = 0;  // per unit
  for (int64_t rb = 0; rb < plan.row_blocks; ++rb) {
    const int64_t r0 = rb * kTreeAttentionMmaRows;
    const int64_t here = rows - r0 < kTreeAttentionMmaRows ? rows - r0 : kTreeAttentionMmaRows;
    const int64_t keys = prefix + (r0 + here - 1) / G + 1;
    widest = keys > widest ? keys : widest;
    const int64_t outputs = splits > 1 ? 2 * splits * here * (D + 1) * 4 + here * D * esize : here * D * esize;
    loads += splits * (here * D * esize + T * 8 + 8) + 2 * keys * D * esize + outputs;
    unique += here * D * esize + outputs;
    flops += (keys + kTreeAttentionMmaKeys - 1) / kTreeAttentionMmaKeys * 2 * kTreeAttentionMmaRows *
             kTreeAttentionMmaKeys * (dk + dv);
  }
  unique += splits * (T * 8 + 8) + 2 * widest * D * esize;
  c.bytes = units * loads;
  c.unique_bytes = units * unique;
  c.floor_bytes = (2 * B * Hq * T + 2 * units * (prefix + T)) * D * esize;
  c.executed_flops = units * flops;
  c.dense_flops = 4 * units * rows * (prefix + T) * D;
  return c;
}

// Bytes the CUDA-core tree_attention kernel (float32) reads and writes for B rows of T nodes, each
// with a prefix of `prefix` tokens (element size `esize`): every block reads its rows' queries, the
// prefix's keys and values, the tree's keys and values up to its last node, and writes its rows.
inline int64_t tree_attention_cuda_bytes(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t prefix, int64_t D,
                                         int64_t esize) {
  const int64_t G = Hq / Hkv, tile = tree_attention_tile_nodes(G);
  int64_t per_unit = 0;  // one (batch row, kv head)
  for (int64_t j0 = 0; j0 < T; j0 += tile) {
    const int64_t nodes = T - j0 < tile ? T - j0 : tile;
    per_unit += 2 * G * nodes * D + 2 * (prefix + j0 + nodes) * D;
  }
  return B * Hkv * per_unit * esize;
}

// Verification of draft trees against the target's logits, one walk per batch row from node 0
// (see verify_tree_greedy / verify_tree_sampling). tokens, parents, path [B, T]; logits
// [B, T, V] contiguous; num_accepted, next_token [B]. All indices int64.
struct TreeVerifyParams {
  const int64_t* tokens = nullptr;
  const int64_t* parents = nullptr;
  const void* logits = nullptr;
  ScalarKind dtype = ScalarKind::kFloat32;
  // Greedy only, optional: the argmax of every node's logits [B, T], given instead of logits
  // (the walk alone, for benchmarks). When set, logits is not read.
  const int64_t* argmax = nullptr;
  // Sampling only: uniforms [B, T] in [0, 1); null for greedy. u[b, c] decides whether child c is
  // accepted (each node is tested at most once, and node 0 never), u[b, 0] draws the final token.
  const double* uniforms = nullptr;
  float inv_temperature = 1.0f;
  int64_t batch = 0;
  int64_t nodes = 0;  // T
  int64_t vocab = 0;  // V
  int64_t* num_accepted = nullptr;
  int64_t* path = nullptr;
  int64_t* next_token = nullptr;
  DeviceErrorRecord* error = nullptr;  // CUDA: where a malformed tree, token id or uniform is reported
};

// The verification walk's step, on the host and the device: the first child of node `cur` (in
// index order) after node `after`, or -1. parents is one batch row's [T]; children come after
// their parent, so next_child(parents, T, cur, cur) is cur's first child.
TORCHSPEC_HD int64_t next_child(const int64_t* parents, int64_t nodes, int64_t cur, int64_t after) {
  for (int64_t c = (after > cur ? after : cur) + 1; c < nodes; ++c) {
    if (parents[c] == cur) return c;
  }
  return -1;
}

}  // namespace torchspec
