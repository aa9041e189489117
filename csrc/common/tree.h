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
};

// The CUDA tree_attention kernel's blocking, shared with the benchmarks' byte counts: one thread
// block serves at most kTreeAttentionRowsPerBlock query rows, the G = Hq / Hkv query heads of one
// kv head for a tile of tree_attention_tile_nodes(G) consecutive nodes, and reads the prefix's
// keys and values once for all of them.
constexpr int kTreeAttentionRowsPerBlock = 64;

TORCHSPEC_HD int64_t tree_attention_tile_nodes(int64_t group) {
  return group >= kTreeAttentionRowsPerBlock ? 1 : kTreeAttentionRowsPerBlock / group;
}

// Bytes the CUDA tree_attention kernel reads and writes for B rows of T nodes, each with a
// prefix of `prefix` tokens (element size `esize`): every block reads its rows' queries, the
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
