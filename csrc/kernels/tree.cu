// CUDA tree attention and tree verification (framework-free).
//
// Tree attention has two kernels (tree_attention_plan picks one):
// - Tensor cores, bfloat16 / float16 on sm_80 and later (tree_attention_mma_kernel, below): the
//   G * T query rows of a (batch row, kv head) packed into blocks of 64, each over a range of its
//   keys, merged by a second kernel when there are several ranges. Its comment says how.
// - CUDA cores, float32 and any dtype before sm_80 (tree_attention_kernel): one block of 8 warps
//   per (batch row, kv head, tile of nodes). The block's rows are the G = Hq / Hkv query heads of
//   the kv head for each node of the tile, G * nodes <= 64 (common/tree.h); warp w owns rows w,
//   w + 8, ... Every key tile (32 keys, staged in shared memory as float, K padded to D + 1 columns
//   so that lane l reading key l is free of bank conflicts) is read once by the block and used by
//   all its rows: the prefix's keys and values are read once per tile of nodes. Lane l scores key l
//   against the row's query (broadcast from shared memory), the warp folds the tile into the row's
//   online softmax (base 2, float32) and writes the probabilities to shared memory, then P @ V for
//   all the warp's rows with lane l owning dimensions l, l + 32, ... The keys are the prefix, then
//   the tree's nodes up to the tile's last one, masked per node: bit kk of a node's mask says
//   whether key kk of the tile is one of its ancestors or itself. The tree tiles run from the last
//   down, so that each node's walk to the root runs once across them.
//
// Verification: one block per batch row walks the tree sequentially; at each visited node the
// block reduces that node's logits row (argmax, or max and sum of exp), and thread 0 decides.
// Only the rows of visited nodes are read.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace torchspec {
namespace cuda {
namespace {

// Whether batch row `b`'s inputs are valid, checked by every thread of the block (blockDim.x of
// them), the same answer in each: its tree (parents [T]: -1 at the root, an earlier node
// elsewhere), and where given its prefix length (in [0, max_prefix]), its tokens [T] (in [0, V))
// and its uniforms [T] (in [0, 1)). The first error is recorded (common/device_error.h). The
// launchers copy nothing to the host to check these; a walk to the root of a valid tree ends.
__device__ bool row_is_valid(const int64_t* parents, int64_t T, int64_t b, DeviceErrorOp op, DeviceErrorRecord* rec,
                             int64_t prefix = 0, int64_t max_prefix = -1, const int64_t* tokens = nullptr,
                             int64_t V = 0, const double* u = nullptr) {
  int bad = 0;
  if (threadIdx.x == 0 && max_prefix >= 0 && (prefix < 0 || prefix > max_prefix)) {
    bad = 1;
    record_device_error(rec, op, DeviceErrorKind::kPrefixLength, b, 0, prefix, 0, max_prefix);
  }
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) {
    const int64_t a = parents[j];
    if (j == 0 ? a != -1 : (a < 0 || a >= j)) {
      bad = 1;
      record_device_error(rec, op, j == 0 ? DeviceErrorKind::kTreeRoot : DeviceErrorKind::kTreeParent, b, j, a, 0, j);
    }
    if (tokens != nullptr && (tokens[j] < 0 || tokens[j] >= V)) {
      bad = 1;
      record_device_error(rec, op, DeviceErrorKind::kTokenId, b, j, tokens[j], 0, V);
    }
    if (u != nullptr && !(u[j] >= 0.0 && u[j] < 1.0)) {
      bad = 1;
      record_device_error(rec, op, DeviceErrorKind::kUniform, b, j, __double_as_longlong(u[j]), 0, 1);
    }
  }
  return __syncthreads_or(bad) == 0;
}

// ---- tree attention -------------------------------------------------------------------------

constexpr int kAttnWarps = 8;
constexpr int kAttnThreads = 32 * kAttnWarps;
constexpr int kRowsPerWarp = kTreeAttentionRowsPerBlock / kAttnWarps;
constexpr int kKeyTile = 32;  // keys per shared-memory tile: one per lane
constexpr int kMaxDimPerLane = 8;  // D <= 256

// Dynamic shared memory of a block (4-byte words): the rows' queries, a K tile (padded), a V tile,
// each warp's probabilities for its rows, each node's ancestor mask.
size_t attention_smem_bytes(const TreeAttentionParams& p) {
  const int64_t G = p.q_heads / p.kv_heads, D = p.head_dim, nodes = tree_attention_tile_nodes(G);
  return 4 * (G * nodes * D + kKeyTile * (D + 1) + kKeyTile * D + kAttnWarps * kRowsPerWarp * kKeyTile + nodes);
}

// kDimPerLane: the dimensions a lane owns in P @ V (D <= 32 kDimPerLane); 4 up to D = 128 keeps
// the accumulators in fewer registers (two blocks per SM instead of one).
template <typename T, int kDimPerLane>
__global__ void __launch_bounds__(kAttnThreads) tree_attention_kernel(TreeAttentionParams p) {
  const int64_t T_ = p.nodes, D = p.head_dim, S = p.seq;
  const int G = static_cast<int>(p.q_heads / p.kv_heads);
  const int64_t tile_nodes = tree_attention_tile_nodes(G);
  const int64_t tiles = (T_ + tile_nodes - 1) / tile_nodes;
  const int64_t unit = blockIdx.x / tiles;  // b * Hkv + g
  const int64_t g = unit % p.kv_heads, b = unit / p.kv_heads;
  const int64_t j0 = blockIdx.x % tiles * tile_nodes;
  const int nodes = static_cast<int>(min(tile_nodes, T_ - j0));
  const int rows = G * nodes;  // row r: node j0 + r / G, query head g * G + r % G
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t prefix = p.prefix_lens[b];
  const int64_t* parents = p.parents + b * T_;
  T* out = static_cast<T*>(p.out);
  if (!row_is_valid(parents, T_, b, DeviceErrorOp::kTreeAttention, p.error, prefix, S - T_)) {
    for (int64_t i = tid; i < rows * D; i += kAttnThreads) {
      const int64_t r = i / D;
      out[((b * p.q_heads + g * G + r % G) * T_ + j0 + r / G) * D + i % D] = Elem<T>::from_float(NAN);
    }
    return;
  }

  TORCHSPEC_EXTERN_SHARED(float, smem);
  float* qs = smem;  // [rows][D], scaled by scale * log2(e)
  float* ks = qs + G * tile_nodes * D;  // [kKeyTile][D + 1]
  float* vs = ks + kKeyTile * (D + 1);  // [kKeyTile][D]
  float* ps = vs + kKeyTile * D;  // [kAttnWarps][kRowsPerWarp][kKeyTile]: 2^(score - running max)
  unsigned* masks = reinterpret_cast<unsigned*>(ps + kAttnWarps * kRowsPerWarp * kKeyTile);  // [nodes]

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k) + unit * S * D;
  const T* v = static_cast<const T*>(p.v) + unit * S * D;
  const float qscale = p.scale * kLog2e;
  for (int64_t i = tid; i < rows * D; i += kAttnThreads) {
    const int64_t r = i / D, h = g * G + r % G, j = j0 + r / G;
    qs[i] = Elem<T>::to_float(q[((b * p.q_heads + h) * T_ + j) * D + i % D]) * qscale;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimPerLane; ++c) acc[i][c] = 0.0f;
  }
  int64_t ancestor = j0 + tid;  // thread tid < nodes: the next ancestor of node j0 + tid to mask

  // Folds the n keys at positions pos0 .. pos0 + n - 1 into every row; tree_first >= 0: they are
  // tree nodes tree_first .. tree_first + n - 1, each valid for a row only if in its node's mask.
  const auto fold_tile = [&](int64_t pos0, int n, int64_t tree_first) {
    __syncthreads();  // the previous tile's keys, values, probabilities and masks are consumed
    for (int64_t i = tid; i < n * D; i += kAttnThreads) {
      const int64_t kk = i / D, d = i % D;
      ks[kk * (D + 1) + d] = Elem<T>::to_float(k[(pos0 + kk) * D + d]);
      vs[i] = Elem<T>::to_float(v[(pos0 + kk) * D + d]);
    }
    if (tree_first >= 0 && tid < nodes) {
      unsigned bits = 0;
      // Each step goes to an earlier node (checked above; stopped here anyway): at most T steps.
      while (ancestor >= tree_first) {
        bits |= 1u << (ancestor - tree_first);
        const int64_t up = parents[ancestor];
        ancestor = up < ancestor ? up : -1;
      }
      masks[tid] = bits;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kAttnWarps * i;
      if (r >= rows) break;  // warp-uniform
      const bool valid = lane < n && (tree_first < 0 || (masks[r / G] >> lane & 1u));
      float s = -INFINITY;
      if (valid) {
        const float* qr = qs + r * D;
        const float* kr = ks + lane * (D + 1);
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
        s = dot;
      }
      const float m_new = fmaxf(m[i], warp_max(s));
      // While every score is -inf (m_new = -inf) nothing is rescaled and -inf scores weigh 0:
      // 2^(-inf - -inf) would be NaN.
      const float corr = m_new == -INFINITY ? 1.0f : exp2f(m[i] - m_new);  // 0 from m = -inf
      const float e = valid && s != -INFINITY ? exp2f(s - m_new) : 0.0f;
      l[i] = l[i] * corr + warp_sum(e);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kDimPerLane; ++c) acc[i][c] *= corr;
      ps[(warp * kRowsPerWarp + i) * kKeyTile + lane] = e;
    }
    __syncwarp();  // the warp's probabilities are written
    for (int kk = 0; kk < n; ++kk) {
      float vk[kDimPerLane];
#pragma unroll
      for (int c = 0; c < kDimPerLane; ++c) vk[c] = lane + 32 * c < D ? vs[kk * D + lane + 32 * c] : 0.0f;
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        if (warp + kAttnWarps * i >= rows) break;
        const float e = ps[(warp * kRowsPerWarp + i) * kKeyTile + kk];
#pragma unroll
        for (int c = 0; c < kDimPerLane; ++c) acc[i][c] = fmaf(e, vk[c], acc[i][c]);
      }
    }
  };

  for (int64_t t0 = 0; t0 < prefix; t0 += kKeyTile)
    fold_tile(t0, static_cast<int>(min(int64_t{kKeyTile}, prefix - t0)), -1);
  // The tree's nodes up to the tile's last, from the last key tile down (ancestors precede nodes).
  const int64_t last = j0 + nodes - 1;
  for (int64_t t0 = last / kKeyTile * kKeyTile; t0 >= 0; t0 -= kKeyTile) {
    fold_tile(prefix + t0, static_cast<int>(min(int64_t{kKeyTile}, last + 1 - t0)), t0);
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp + kAttnWarps * i;
    if (r >= rows) break;
    const float inv = 1.0f / l[i];  // l >= 1 unless every score is -inf: then NaN, as softmax
    T* o = out + ((b * p.q_heads + g * G + r % G) * T_ + j0 + r / G) * D;
#pragma unroll
    for (int c = 0; c < kDimPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) o[d] = Elem<T>::from_float(acc[i][c] * inv);
    }
  }
}

template <typename T, int kDimPerLane>
cudaError_t launch_attention(const TreeAttentionParams& p, cudaStream_t stream) {
  const int64_t G = p.q_heads / p.kv_heads;
  if (p.head_dim > 32 * kDimPerLane || G > kTreeAttentionRowsPerBlock) return cudaErrorInvalidValue;
  const int64_t tile_nodes = tree_attention_tile_nodes(G);
  const int64_t blocks = p.batch * p.kv_heads * ((p.nodes + tile_nodes - 1) / tile_nodes);
  if (blocks >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const size_t smem = attention_smem_bytes(p);
  const cudaError_t err = allow_dynamic_smem(tree_attention_kernel<T, kDimPerLane>, smem);
  if (err != cudaSuccess) return err;
  TORCHSPEC_LAUNCH((tree_attention_kernel<T, kDimPerLane>), static_cast<unsigned>(blocks), kAttnThreads, smem,
                   stream)(p);
  return cudaGetLastError();
}

// ---- tree attention on tensor cores (bfloat16 / float16, sm_80 and later) --------------------
//
// A block of 4 warps: 64 packed query rows of one (batch row b, kv head g) - row R of the unit is
// node R / G, query head g * G + R % G - over one range of whole 64-key tiles of the positions the
// rows need, [0, prefix + the block's last node + 1) (split s of `splits`, common/tree.h). Warp w
// owns rows 16w .. 16w + 15. Per tile: S = Q K^T by mma.sync m16n8k16 (8 columns of 8 keys times
// D / 16 steps), scaled to base 2 and masked (a prefix key counts for every row; tree node a for
// the rows of the nodes it is an ancestor of, or is), folded into each row's online softmax
// (float32; a row's four lanes share its maximum through two shuffles), then O += P V, with P
// taken from S's accumulators as the A operand (rounded to T: no trip through shared memory) and
// V read as pairs of 16-bit elements. K and V tiles are double buffered with cp.async: tile i + 1
// loads while tile i is multiplied. Inside the tile loop the index math is int32 (positions are
// below 2^31, the op checks S); the unit's base offsets are int64.
// Shared memory, in elements of T, each row padded by 8 so that a warp's fragment loads hit 32
// distinct banks: Q [64][Dp + 8], K [2][64][Dp + 8], V [2][64][Dp + 8]; then each node's ancestor
// bits (uint64 words: bit a of node j's words set when a is j or an ancestor of j).

constexpr int kMmaRows = kTreeAttentionMmaRows;
constexpr int kMmaWarps = kMmaRows / 16;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaKeys = kTreeAttentionMmaKeys;
constexpr int kSmemPad = 8;
constexpr int kMergeRows = 4;  // the merge kernel's rows per block: one warp each

// A launch's geometry, computed on the host.
struct MmaShape {
  int group;  // G = Hq / Hkv
  int rows;  // G * T: packed query rows per unit
  int row_blocks, splits;
  int mask_words;  // ceil(T / 64) ancestor words per node
  int nodes_per_block;  // the most nodes a block's rows span
  bool q_vec, kv_async;  // 16-byte loads of q; cp.async of k and v (D % 8 == 0, 16-byte aligned)
};

template <int kDp>
size_t mma_smem_bytes(const MmaShape& shape, size_t esize) {
  return static_cast<size_t>(kMmaRows + 4 * kMmaKeys) * (kDp + kSmemPad) * esize +
         static_cast<size_t>(shape.nodes_per_block) * shape.mask_words * 8;
}

__device__ __forceinline__ uint32_t ld_pair(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ uint32_t pair_of(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

template <typename T, int kDp>
__global__ void __launch_bounds__(kMmaThreads) tree_attention_mma_kernel(TreeAttentionParams p, MmaShape shape) {
  constexpr int kStride = kDp + kSmemPad;
  constexpr int kKSteps = kDp / 16, kDTiles = kDp / 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, grp = lane >> 2, tig = lane & 3;
  // The row blocks of one key range are neighbours in the grid: they run together and read the
  // range's keys and values once from memory, then from L2.
  const int rb = static_cast<int>(blockIdx.x % shape.row_blocks);
  const int split = static_cast<int>(blockIdx.x / shape.row_blocks % shape.splits);
  const int64_t unit = blockIdx.x / shape.row_blocks / shape.splits;  // b * Hkv + g
  const int64_t b = unit / p.kv_heads, g = unit % p.kv_heads;
  const int G = shape.group, Tn = static_cast<int>(p.nodes), D = static_cast<int>(p.head_dim);
  const int r0 = rb * kMmaRows, here = min(kMmaRows, shape.rows - r0);
  const int node_lo = r0 / G, node_hi = (r0 + here - 1) / G;
  const int64_t* parents = p.parents + b * Tn;
  const int64_t units = p.batch * p.kv_heads;
  T* out = static_cast<T*>(p.out);
  float* ws_out = p.workspace;  // splits > 1: [splits][units * rows][D] partial outputs, then the lse
  float* ws_lse = shape.splits == 1 ? nullptr : ws_out + static_cast<int64_t>(shape.splits) * units * shape.rows * D;
  const int64_t ws_row0 = (split * units + unit) * shape.rows + r0;
  const int64_t out_bh0 = b * p.q_heads + g * G;  // (b, first query head of the group)

  if (!row_is_valid(parents, Tn, b, DeviceErrorOp::kTreeAttention, p.error, p.prefix_lens[b], p.seq - Tn)) {
    for (int i = tid; i < here * D; i += kMmaThreads) {
      const int r = i / D, R = r0 + r;
      if (shape.splits == 1) {
        out[((out_bh0 + R % G) * Tn + R / G) * D + i % D] = Elem<T>::from_float(NAN);
      } else if (i % D == 0) {
        ws_lse[ws_row0 + r] = NAN;  // the merge writes NaN
      }
    }
    return;
  }
  const int prefix = static_cast<int>(p.prefix_lens[b]);
  const int keys = prefix + node_hi + 1;  // positions [0, keys) of the unit
  const int tiles = (keys + kMmaKeys - 1) / kMmaKeys;
  const int per_split = (tiles + shape.splits - 1) / shape.splits;
  const int t_begin = split * per_split, t_end = min(tiles, t_begin + per_split);

  TORCHSPEC_EXTERN_SHARED(uint4, mma_smem);
  T* qs = reinterpret_cast<T*>(mma_smem);
  T* ks = qs + kMmaRows * kStride;  // [2][kMmaKeys][kStride]
  T* vs = ks + 2 * kMmaKeys * kStride;
  uint64_t* masks = reinterpret_cast<uint64_t*>(vs + 2 * kMmaKeys * kStride);
  const uint4 zero4 = {0u, 0u, 0u, 0u};

  // The block's queries (zeros past D and past its rows) and the pad columns of both K / V stages.
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kMmaRows * (kDp / 8); i += kMmaThreads) {
    const int r = i / (kDp / 8), c = i % (kDp / 8) * 8;
    T* dst = qs + r * kStride + c;
    if (r < here && c < D) {
      const int R = r0 + r;
      const T* src = q + ((out_bh0 + R % G) * Tn + R / G) * D + c;
      if (shape.q_vec) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int e = 0; e < 8; ++e) dst[e] = c + e < D ? src[e] : Elem<T>::from_float(0.0f);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = zero4;
    }
  }
  if (shape.kv_async) {  // cp.async writes columns [0, D) only
    for (int i = tid; i < 4 * kMmaKeys * (kDp / 8); i += kMmaThreads) {
      const int r = i / (kDp / 8), c = i % (kDp / 8) * 8;
      if (c >= D) *reinterpret_cast<uint4*>(ks + r * kStride + c) = zero4;  // ks..vs: 4 x kMmaKeys rows
    }
  }
  // Each node's ancestor bits; the walk stops unless a step goes to an earlier node.
  const int words = shape.mask_words;
  for (int i = tid; i <= node_hi - node_lo; i += kMmaThreads) {
    uint64_t* m = masks + i * words;
    for (int w = 0; w < words; ++w) m[w] = 0;
    for (int a = node_lo + i; a >= 0;) {
      m[a >> 6] |= uint64_t{1} << (a & 63);
      const int up = static_cast<int>(parents[a]);
      a = up < a ? up : -1;
    }
  }

  const T* kg = static_cast<const T*>(p.k) + unit * p.seq * D;
  const T* vg = static_cast<const T*>(p.v) + unit * p.seq * D;
  const auto load_tile = [&](int tile, int stage) {
    const int key0 = tile * kMmaKeys;
    T* kd = ks + stage * kMmaKeys * kStride;
    T* vd = vs + stage * kMmaKeys * kStride;
    if (shape.kv_async) {
      const int chunks = D / 8;  // 16-byte chunks per key
      for (int i = tid; i < kMmaKeys * chunks; i += kMmaThreads) {
        const int kk = i / chunks, c = i % chunks * 8, key = key0 + kk;
        const int64_t at = static_cast<int64_t>(key < keys ? key : key0) * D + c;  // read nothing past keys
        cp_async_16(kd + kk * kStride + c, kg + at, key < keys ? 16 : 0);
        cp_async_16(vd + kk * kStride + c, vg + at, key < keys ? 16 : 0);
      }
    } else {
      for (int i = tid; i < kMmaKeys * kDp; i += kMmaThreads) {
        const int kk = i / kDp, c = i % kDp, key = key0 + kk;
        const bool in = key < keys && c < D;
        const int64_t at = static_cast<int64_t>(key) * D + c;
        kd[kk * kStride + c] = in ? kg[at] : Elem<T>::from_float(0.0f);
        vd[kk * kStride + c] = in ? vg[at] : Elem<T>::from_float(0.0f);
      }
    }
  };

  const float qscale = p.scale * kLog2e;  // scores in base 2
  const int qrow = warp * 16 + grp;  // this thread's rows: qrow and qrow + 8
  const int ksteps = (D + 15) / 16, dtiles = (D + 7) / 8;
  float o[kDTiles][4];
#pragma unroll
  for (int dn = 0; dn < kDTiles; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  if (t_begin < t_end) load_tile(t_begin, 0);
  cp_async_commit();
  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    if (t + 1 < t_end) {
      load_tile(t + 1, stage ^ 1);  // its stage was last read before the previous tile's end barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t (and, at the first, the queries and masks) is in shared memory
    const T* kt = ks + stage * kMmaKeys * kStride;
    const T* vt = vs + stage * kMmaKeys * kStride;
    const int key0 = t * kMmaKeys;

    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      if (kk >= ksteps) break;  // block-uniform: D's last step of 16
      const T* qa = qs + qrow * kStride + kk * 16 + 2 * tig;
      const uint32_t a[4] = {ld_pair(qa), ld_pair(qa + 8 * kStride), ld_pair(qa + 8), ld_pair(qa + 8 * kStride + 8)};
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const T* kb = kt + (n * 8 + grp) * kStride + kk * 16 + 2 * tig;
        const uint32_t bk[2] = {ld_pair(kb), ld_pair(kb + 8)};
        mma_m16n8k16<T>(s[n], a, bk);
      }
    }

    // Scale, mask, and each row's maximum over the tile (a row's values are in a quad of lanes).
    const bool prefix_only = key0 + kMmaKeys <= prefix;
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = qrow + (c >> 1) * 8, key = key0 + n * 8 + 2 * tig + (c & 1);
        bool ok = row < here && key < keys;
        if (ok && !prefix_only && key >= prefix) {
          const int a = key - prefix, node = (r0 + row) / G;
          ok = a <= node && (masks[(node - node_lo) * words + (a >> 6)] >> (a & 63) & 1u);
        }
        s[n][c] = ok ? s[n][c] * qscale : -INFINITY;
        mt[c >> 1] = fmaxf(mt[c >> 1], s[n][c]);
      }
    }
    float sum[2] = {0.0f, 0.0f}, corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mt[i] = fmaxf(mt[i], __shfl_xor_sync(0xFFFFFFFFu, mt[i], 1));
      mt[i] = fmaxf(mt[i], __shfl_xor_sync(0xFFFFFFFFu, mt[i], 2));
      const float m_new = fmaxf(m[i], mt[i]);
      // While every score is -inf nothing is rescaled (2^(-inf - -inf) would be NaN).
      corr[i] = m_new == -INFINITY ? 1.0f : exp2f(m[i] - m_new);
      m[i] = m_new;
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float e = s[n][c] == -INFINITY ? 0.0f : exp2f(s[n][c] - m[c >> 1]);
        s[n][c] = e;
        sum[c >> 1] += e;
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * corr[i] + sum[i];  // this lane's share of the row's sum
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) {
      o[dn][0] *= corr[0];
      o[dn][1] *= corr[0];
      o[dn][2] *= corr[1];
      o[dn][3] *= corr[1];
    }

    // O += P V: P's accumulators are the A fragments of 4 steps of 16 keys.
#pragma unroll
    for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vb = vt + (kk * 16 + 2 * tig) * kStride + grp;
#pragma unroll
      for (int dn = 0; dn < kDTiles; ++dn) {
        if (dn >= dtiles) break;  // block-uniform: D's last 8 columns
        const T* v0 = vb + dn * 8;
        const uint32_t bv[2] = {pair_of(v0[0], v0[kStride]), pair_of(v0[8 * kStride], v0[9 * kStride])};
        mma_m16n8k16<T>(o[dn], a, bv);
      }
    }
    __syncthreads();  // every warp is done with this stage before tile t + 2 is loaded into it
  }

  // The rows' sums over their quads, then the output (one key range) or the partials.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 1);
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = qrow + 8 * half;
    if (row >= here) continue;
    const int R = r0 + row;
    if (shape.splits == 1) {
      const float inv = 1.0f / l[half];  // l >= 1 unless every score is -inf: then NaN, as softmax
      T* dst = out + ((out_bh0 + R % G) * Tn + R / G) * D;
#pragma unroll
      for (int dn = 0; dn < kDTiles; ++dn) {
        for (int e = 0; e < 2; ++e) {
          const int d = dn * 8 + 2 * tig + e;
          if (d < D) dst[d] = Elem<T>::from_float(o[dn][2 * half + e] * inv);
        }
      }
      continue;
    }
    // A range with no key for the row (l = 0) weighs nothing in the merge; NaN stays NaN.
    const float lv = l[half];
    const bool some = lv > 0.0f && lv < INFINITY;
    const float inv = some ? 1.0f / lv : lv == 0.0f ? 0.0f : NAN;
    float* dst = ws_out + (ws_row0 + row) * D;
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) {
      for (int e = 0; e < 2; ++e) {
        const int d = dn * 8 + 2 * tig + e;
        if (d < D) dst[d] = o[dn][2 * half + e] * inv;
      }
    }
    if (tig == 0) ws_lse[ws_row0 + row] = some ? m[half] + log2f(lv) : lv == 0.0f ? -INFINITY : NAN;
  }
}

// out = the key ranges' partial outputs weighted by their share of the softmax: one warp per
// query row (rows numbered as the workspace numbers them: unit * G * T + packed row).
template <typename T>
__global__ void __launch_bounds__(32 * kMergeRows) tree_attention_merge_kernel(TreeAttentionParams p, MmaShape shape) {
  const int64_t units = p.batch * p.kv_heads, all = units * shape.rows;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31, D = static_cast<int>(p.head_dim), splits = shape.splits, G = shape.group;
  if (row >= all) return;  // whole warps; no collective below
  const float* lse = p.workspace + splits * all * D;
  float top = -INFINITY;
  bool nan = false;
  for (int s = 0; s < splits; ++s) {
    const float x = lse[s * all + row];
    nan |= x != x;
    top = fmaxf(top, x);
  }
  const int64_t unit = row / shape.rows, b = unit / p.kv_heads, g = unit % p.kv_heads;
  const int R = static_cast<int>(row % shape.rows);
  T* dst = static_cast<T*>(p.out) + ((b * p.q_heads + g * G + R % G) * p.nodes + R / G) * D;
  // Every score -inf (all ranges empty) or a +inf score: NaN, as softmax.
  if (nan || top == -INFINITY || top == INFINITY) {
    for (int d = lane; d < D; d += 32) dst[d] = Elem<T>::from_float(NAN);
    return;
  }
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += exp2f(lse[s * all + row] - top);
  for (int d = lane; d < D; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += exp2f(lse[s * all + row] - top) * p.workspace[(s * all + row) * D + d];
    dst[d] = Elem<T>::from_float(acc / total);
  }
}

MmaShape mma_shape(const TreeAttentionParams& p, const TreeAttentionPlan& plan) {
  MmaShape s;
  s.group = static_cast<int>(p.q_heads / p.kv_heads);
  s.rows = static_cast<int>(s.group * p.nodes);
  s.row_blocks = static_cast<int>(plan.row_blocks);
  s.splits = static_cast<int>(plan.splits);
  s.mask_words = static_cast<int>((p.nodes + 63) / 64);
  s.nodes_per_block = static_cast<int>(std::min<int64_t>(p.nodes, (kMmaRows - 1) / s.group + 2));
  const bool d8 = p.head_dim % 8 == 0;
  s.q_vec = d8 && (reinterpret_cast<uintptr_t>(p.q) & 15) == 0;
  s.kv_async = d8 && ((reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v)) & 15) == 0;
  return s;
}

template <typename T, int kDp>
cudaError_t launch_attention_mma(const TreeAttentionParams& p, const TreeAttentionPlan& plan, cudaStream_t stream) {
  const MmaShape shape = mma_shape(p, plan);
  const int64_t units = p.batch * p.kv_heads;
  const int64_t blocks = units * plan.row_blocks * plan.splits;
  if (blocks >= (int64_t{1} << 31) || p.seq >= (int64_t{1} << 31) || p.head_dim > kDp) return cudaErrorInvalidValue;
  if (plan.splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  const size_t smem = mma_smem_bytes<kDp>(shape, sizeof(T));
  cudaError_t err = allow_dynamic_smem(tree_attention_mma_kernel<T, kDp>, smem);
  if (err != cudaSuccess) return err;
  TORCHSPEC_LAUNCH((tree_attention_mma_kernel<T, kDp>), static_cast<unsigned>(blocks), kMmaThreads, smem, stream)(
      p, shape);
  err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t merge_blocks = (units * shape.rows + kMergeRows - 1) / kMergeRows;
  if (merge_blocks >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  TORCHSPEC_LAUNCH(tree_attention_merge_kernel<T>, static_cast<unsigned>(merge_blocks), 32 * kMergeRows, 0, stream)(
      p, shape);
  return cudaGetLastError();
}

// ---- verification ---------------------------------------------------------------------------

constexpr int kVerifyThreads = 512;
constexpr int kVerifyWarps = kVerifyThreads / 32;

struct VerifyState {
  int64_t cur;  // node being expanded
  int64_t accepted;
  int64_t next;  // >= 0 once the walk is over
  int n_rejected;
  uint64_t warp_keys[kVerifyWarps];
  float warp_f[kVerifyWarps];
  float row_max;
  float row_sum;
  double goal;  // sampling: the inversion target within the chosen segment
  int segment;  // sampling: the thread whose segment holds the target, or -1
  int last_segment;  // sampling: the last thread whose segment has residual mass
  double seg_mass[kVerifyThreads];
};

// Block-wide maximum of one 64-bit key per thread (every thread gets it).
__device__ uint64_t block_max_key(uint64_t key, VerifyState& st) {
  for (int d = 16; d > 0; d >>= 1) {
    const uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, key, d);
    key = o > key ? o : key;
  }
  if ((threadIdx.x & 31) == 0) st.warp_keys[threadIdx.x >> 5] = key;
  __syncthreads();
  uint64_t best = st.warp_keys[0];
  for (int w = 1; w < kVerifyWarps; ++w) best = st.warp_keys[w] > best ? st.warp_keys[w] : best;
  __syncthreads();  // warp_keys is free again
  return best;
}

template <bool kMax>
__device__ float block_reduce(float v, VerifyState& st) {
  for (int d = 16; d > 0; d >>= 1) {
    const float o = __shfl_xor_sync(0xFFFFFFFFu, v, d);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  if ((threadIdx.x & 31) == 0) st.warp_f[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = st.warp_f[0];
  for (int w = 1; w < kVerifyWarps; ++w) r = kMax ? fmaxf(r, st.warp_f[w]) : r + st.warp_f[w];
  __syncthreads();
  return r;
}

// Running argmax of one thread over elements it visits in increasing index order: the first
// NaN wins, else the first of the largest values.
struct ArgmaxState {
  float best = -INFINITY;
  int64_t index = -1;
  bool nan = false;
  __device__ __forceinline__ void offer(float x, int64_t i) {
    if (nan) return;
    if (x != x) {
      nan = true;
      best = x;
      index = i;
    } else if (x > best || index < 0) {
      best = x;
      index = i;
    }
  }
  // Its key for the block reduction (0 when the thread saw nothing).
  __device__ __forceinline__ uint64_t key() const { return index < 0 ? 0 : make_key(best, index); }
};

// This thread's argmax key over a row: 16-byte loads, four in flight per thread, when the row is
// 16-byte aligned (else one element at a time). Threads take interleaved vectors, so each sees
// increasing indices and the block reduction of the keys (larger value, then lower index)
// gives the row's argmax with torch.argmax's rules.
template <typename T>
__device__ uint64_t thread_argmax_key(const T* row, int64_t V) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  ArgmaxState st;
  int64_t scalar_begin = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const uint4* vec = reinterpret_cast<const uint4*>(row);
    const int64_t nvec = V / kVec;
    for (int64_t base = 0; base < nvec; base += kUnroll * kVerifyThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kVerifyThreads + threadIdx.x;
        if (i < nvec) raw[u] = __ldcs(vec + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kVerifyThreads + threadIdx.x;
        if (i >= nvec) break;
        const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int j = 0; j < kVec; ++j) st.offer(Elem<T>::to_float(e[j]), i * kVec + j);
      }
    }
    scalar_begin = nvec * kVec;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < V; i += kVerifyThreads) st.offer(Elem<T>::to_float(row[i]), i);
  return st.key();
}

__device__ __forceinline__ bool is_rejected(const int64_t* rejected, int n, int64_t token) {
  for (int i = 0; i < n; ++i) {
    if (rejected[i] == token) return true;
  }
  return false;
}

// Greedy (p.uniforms null) or sampling walk of batch row blockIdx.x; see TreeVerifyParams and
// the CPU kernel (csrc/cpu/tree.cpp) for the rules, which this follows step for step.
template <typename T>
__global__ void __launch_bounds__(kVerifyThreads) verify_tree_kernel(TreeVerifyParams p) {
  const int64_t b = blockIdx.x, Tn = p.nodes, V = p.vocab;
  const int tid = threadIdx.x;
  const int64_t* tokens = p.tokens + b * Tn;
  const int64_t* parents = p.parents + b * Tn;
  int64_t* path = p.path + b * Tn;
  TORCHSPEC_EXTERN_SHARED(int64_t, rejected);  // sampling: tokens rejected at the current node, <= T
  TORCHSPEC_SHARED(VerifyState, st);
  const bool sampling = p.uniforms != nullptr;
  const double* u = sampling ? p.uniforms + b * Tn : nullptr;
  if (!row_is_valid(parents, Tn, b, DeviceErrorOp::kVerifyTree, p.error, 0, -1, tokens, V, u)) {
    for (int64_t i = tid; i < Tn; i += kVerifyThreads) path[i] = -1;
    if (tid == 0) p.num_accepted[b] = p.next_token[b] = -1;
    return;
  }
  if (tid == 0) {
    st.cur = 0;
    st.accepted = 0;
    st.next = -1;
    path[0] = 0;
  }
  __syncthreads();
  while (true) {
    const int64_t cur = st.cur;
    const bool done = st.next >= 0;
    __syncthreads();  // every thread has read the state before thread 0 changes it
    if (done) break;
    const T* row = static_cast<const T*>(p.logits) + (b * Tn + cur) * V;
    if (!sampling) {
      int64_t target;
      if (p.argmax != nullptr) {
        target = p.argmax[b * Tn + cur];
      } else {
        target = key_index(block_max_key(thread_argmax_key(row, V), st));
      }
      if (tid == 0) {
        int64_t c = next_child(parents, Tn, cur, cur);
        while (c >= 0 && tokens[c] != target) c = next_child(parents, Tn, cur, c);
        if (c >= 0) {
          path[++st.accepted] = c;
          st.cur = c;
        } else {
          st.next = target;
        }
      }
      __syncthreads();
      continue;
    }
    // Sampling: max and sum of exp((x - max) / T) over the row.
    float mx = -INFINITY;
    for (int64_t i = tid; i < V; i += kVerifyThreads) mx = fmaxf(mx, Elem<T>::to_float(row[i]));
    mx = block_reduce<true>(mx, st);
    float s = 0.0f;
    for (int64_t i = tid; i < V; i += kVerifyThreads) s += expf((Elem<T>::to_float(row[i]) - mx) * p.inv_temperature);
    s = block_reduce<false>(s, st);
    const auto prob = [&](int64_t tok) {
      return static_cast<double>(expf((Elem<T>::to_float(row[tok]) - mx) * p.inv_temperature)) / s;
    };
    if (tid == 0) {
      double residual = 1.0;
      int n_rej = 0;
      int64_t c = next_child(parents, Tn, cur, cur);
      for (; c >= 0; c = next_child(parents, Tn, cur, c)) {
        const int64_t t = tokens[c];
        if (is_rejected(rejected, n_rej, t)) continue;
        const double pt = prob(t);
        if (u[c] * residual < pt) break;
        residual -= pt;
        rejected[n_rej++] = t;
      }
      st.n_rejected = n_rej;
      if (c >= 0) {
        path[++st.accepted] = c;
        st.cur = c;
      }
      st.goal = u[0] * residual;
      st.segment = c >= 0 ? -2 : -1;  // -2: a child was accepted, no final draw
    }
    __syncthreads();
    if (st.segment == -2) continue;
    // Final draw by inversion over the residual: contiguous segments of the row per thread, their
    // masses scanned by thread 0, then the chosen segment scanned by its thread.
    const int n_rej = st.n_rejected;
    const int64_t seg = (V + kVerifyThreads - 1) / kVerifyThreads;
    const int64_t lo = tid * seg, hi = min(V, lo + seg);
    double mass = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
      if (!is_rejected(rejected, n_rej, i)) mass += prob(i);
    }
    st.seg_mass[tid] = mass;
    __syncthreads();
    if (tid == 0) {
      double goal = st.goal, cum = 0.0;
      st.segment = -1;
      st.last_segment = 0;
      for (int i = 0; i < kVerifyThreads; ++i) {
        if (st.seg_mass[i] <= 0.0) continue;
        st.last_segment = i;
        if (st.segment < 0 && cum + st.seg_mass[i] > goal) {
          st.segment = i;
          st.goal = goal - cum;
        }
        cum += st.seg_mass[i];
      }
      if (st.segment < 0) {  // rounding left the target unreached: the last token with mass
        st.segment = st.last_segment;
        st.goal = 2.0;  // above any segment's mass
      }
    }
    __syncthreads();
    if (tid == st.segment) {
      double cum = 0.0;
      int64_t last = lo < hi ? lo : 0;
      for (int64_t i = lo; i < hi; ++i) {
        const double pi = prob(i);
        if (pi <= 0.0 || is_rejected(rejected, n_rej, i)) continue;
        cum += pi;
        last = i;
        if (cum > st.goal) break;
      }
      st.next = last;
    }
    __syncthreads();
  }
  if (tid == 0) {
    p.num_accepted[b] = st.accepted;
    p.next_token[b] = st.next;
  }
  for (int64_t i = st.accepted + 1 + tid; i < Tn; i += kVerifyThreads) path[i] = -1;
}

template <typename T>
cudaError_t launch_verify(const TreeVerifyParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(int64_t) * p.nodes;  // the tokens rejected at a node
  const cudaError_t err = allow_dynamic_smem(verify_tree_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  TORCHSPEC_LAUNCH(verify_tree_kernel<T>, static_cast<unsigned>(p.batch), kVerifyThreads, smem, stream)(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t tree_attention_plan(const TreeAttentionParams& p, TreeAttentionPlan* plan) {
  int device = 0, sms = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return err;
  }
  const bool tensor_cores = p.dtype != ScalarKind::kFloat32 && major >= 8 && p.head_dim <= 256;
  *plan = plan_tree_attention(p.batch, p.q_heads, p.kv_heads, p.nodes, p.seq, p.head_dim, tensor_cores, sms, p.splits);
  return cudaSuccess;
}

cudaError_t tree_attention(const TreeAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.q_heads == 0) return cudaSuccess;
  TreeAttentionPlan plan;
  const cudaError_t err = tree_attention_plan(p, &plan);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (!std::is_same_v<T, float>) {
      if (plan.tensor_cores) {
        return plan.head_dim_pad == 64    ? launch_attention_mma<T, 64>(p, plan, stream)
               : plan.head_dim_pad == 128 ? launch_attention_mma<T, 128>(p, plan, stream)
                                          : launch_attention_mma<T, 256>(p, plan, stream);
      }
    }
    return p.head_dim <= 128 ? launch_attention<T, 4>(p, stream) : launch_attention<T, kMaxDimPerLane>(p, stream);
  });
}

cudaError_t verify_tree(const TreeVerifyParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) { return launch_verify<decltype(t)>(p, stream); });
}

cudaError_t tree_attention_smem(const TreeAttentionParams& p, size_t* needed, size_t* allowed) {
  TreeAttentionPlan plan;
  const cudaError_t err = tree_attention_plan(p, &plan);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (!std::is_same_v<T, float>) {
      if (plan.tensor_cores) {
        const MmaShape shape = mma_shape(p, plan);
        return plan.head_dim_pad == 64    ? smem_needed_and_allowed(tree_attention_mma_kernel<T, 64>,
                                                                    mma_smem_bytes<64>(shape, 2), needed, allowed)
               : plan.head_dim_pad == 128 ? smem_needed_and_allowed(tree_attention_mma_kernel<T, 128>,
                                                                    mma_smem_bytes<128>(shape, 2), needed, allowed)
                                          : smem_needed_and_allowed(tree_attention_mma_kernel<T, 256>,
                                                                    mma_smem_bytes<256>(shape, 2), needed, allowed);
      }
    }
    const size_t dynamic = attention_smem_bytes(p);
    return p.head_dim <= 128
               ? smem_needed_and_allowed(tree_attention_kernel<T, 4>, dynamic, needed, allowed)
               : smem_needed_and_allowed(tree_attention_kernel<T, kMaxDimPerLane>, dynamic, needed, allowed);
  });
}

cudaError_t verify_tree_smem(const TreeVerifyParams& p, size_t* needed, size_t* allowed) {
  return dispatch_dtype(p.dtype, [&](auto t) {
    return smem_needed_and_allowed(verify_tree_kernel<decltype(t)>, sizeof(int64_t) * p.nodes, needed, allowed);
  });
}

}  // namespace cuda
}  // namespace torchspec
