// CPU tree attention and tree verification (framework-free).
//
// Tree attention: one work unit per (batch row, kv head). All G * T query rows of the kv head's
// group (G = Hq / Hkv query heads, T nodes) share every key: the prefix is read once per unit in
// tiles of 16 keys (converted to float, K transposed), scores for 8 query rows at a time are
// 16-lane vectors, and an online softmax (base 2, float32, polynomial exp2) folds each tile into
// the rows' accumulators, P @ V for the 8 rows in registers.
// Then each row walks its ancestors (parents from the node to the root, at most T keys) with the
// same online softmax. No mask is built: the prefix needs none and the ancestors are enumerated.
//
// Verification: one walk per batch row; only the logits rows of visited nodes are read.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "cpu_kernels.h"

namespace torchspec {
namespace cpu {
namespace {

using namespace simd;

constexpr int kKeys = kLanes;  // keys per prefix tile: one f32x16 of scores per query row
constexpr int kRowBlock = 8;  // query rows processed together (key and value loads reused)

// Per-thread buffers of one unit, reused across units.
struct AttentionScratch {
  std::vector<float> q, acc, m, l, ktile, kt, vtile, tree_k, tree_v, dummy;
  void resize(int64_t rows, int64_t nodes, int64_t dim) {
    q.resize(rows * dim);
    acc.resize(rows * dim);
    m.resize(rows);
    l.resize(rows);
    dummy.assign(dim, 0.0f);
    ktile.resize(kKeys * dim);
    kt.resize(dim * kKeys);
    vtile.resize(kKeys * dim);
    tree_k.resize(nodes * dim);
    tree_v.resize(nodes * dim);
  }
};

// Folds one key's (or one tile's) base-2 scores into row r's online softmax state: m is the
// running maximum score, l the running sum of 2^(s - m), acc the running sum of 2^(s - m) * v.
inline void rescale_row(float& m, float& l, float* acc, int64_t dim, float new_max) {
  if (!(new_max > m)) return;
  const float corr = std::exp2(m - new_max);  // 0 while m is -inf
  l *= corr;
  for (int64_t d = 0; d < dim; ++d) acc[d] *= corr;
  m = new_max;
}

// sum_d a[d] * b[d], 16 lanes at a time (a scalar loop would be one dependent chain).
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t n) {
  f32x16 acc = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    f32x16 x, y;
    std::memcpy(&x, a + d, sizeof(x));
    std::memcpy(&y, b + d, sizeof(y));
    acc += x * y;
  }
  float s = reduce_sum(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

TORCHSPEC_CPU_CLONES
void attention_unit(const TreeAttentionParams& p, int64_t unit, AttentionScratch& w) {
  const int64_t T = p.nodes, D = p.head_dim, S = p.seq;
  const int64_t G = p.q_heads / p.kv_heads;
  const int64_t R = G * T;  // query rows r = head_in_group * T + node: contiguous in q and out
  const int64_t b = unit / p.kv_heads, g = unit % p.kv_heads;
  const int64_t q_offset = (b * p.q_heads + g * G) * T * D;
  const int64_t kv_offset = (b * p.kv_heads + g) * S * D;
  const int64_t prefix = p.prefix_lens[b];
  const int64_t* parents = p.parents + b * T;
  w.resize(R, T, D);

  load_chunk(p.q, p.dtype, q_offset, R * D, w.q.data());
  const float qscale = p.scale * kLog2e;  // scores in base 2: exp2 instead of exp
  for (float& x : w.q) x *= qscale;
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);

  // The prefix, in tiles of kKeys keys shared by all R rows. Per block of kRowBlock rows: the
  // scores (one 16-lane vector per row, lane = key), the online-softmax update, then P @ V with
  // the block's accumulators in registers 16 dimensions at a time.
  const int64_t D16 = D / kLanes * kLanes;
  float* const dummy_row = w.dummy.data();  // the accumulator of rows past R in the last block
  const f32x16 lane_index = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const f32x16 ninf = f32x16{} - std::numeric_limits<float>::infinity();
  for (int64_t t0 = 0; t0 < prefix; t0 += kKeys) {
    const int64_t n = std::min<int64_t>(kKeys, prefix - t0);
    load_chunk(p.k, p.dtype, kv_offset + t0 * D, n * D, w.ktile.data());
    load_chunk(p.v, p.dtype, kv_offset + t0 * D, n * D, w.vtile.data());
    for (int64_t d = 0; d < D; ++d) {
      for (int kk = 0; kk < kKeys; ++kk) w.kt[d * kKeys + kk] = kk < n ? w.ktile[kk * D + d] : 0.0f;
    }
    const auto valid = lane_index < static_cast<float>(n);
    for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
      const float* qr[kRowBlock];
      for (int i = 0; i < kRowBlock; ++i) qr[i] = w.q.data() + std::min(r0 + i, R - 1) * D;
      f32x16 s[kRowBlock] = {};
      for (int64_t d = 0; d < D; ++d) {
        f32x16 kv;
        std::memcpy(&kv, w.kt.data() + d * kKeys, sizeof(kv));
#pragma GCC unroll 16
        for (int i = 0; i < kRowBlock; ++i) s[i] += qr[i][d] * kv;
      }
      alignas(64) float e[kRowBlock][kKeys];
      float* acc[kRowBlock];
      for (int i = 0; i < kRowBlock; ++i) {
        const int64_t r = r0 + i;
        if (r >= R) {
          std::memset(e[i], 0, sizeof(e[i]));
          acc[i] = dummy_row;
          continue;
        }
        acc[i] = w.acc.data() + r * D;
        const f32x16 si = valid ? s[i] : ninf;
        rescale_row(w.m[r], w.l[r], acc[i], D, reduce_max(si));
        // A -inf score weighs exactly 0 (also while m is -inf, where 2^(s - m) would be NaN).
        const f32x16 ei = si != ninf ? exp2_nonpositive(si - w.m[r]) : f32x16{};
        w.l[r] += reduce_sum(ei);
        std::memcpy(e[i], &ei, sizeof(ei));
      }
      for (int64_t d0 = 0; d0 < D16; d0 += kLanes) {
        f32x16 a[kRowBlock];
        for (int i = 0; i < kRowBlock; ++i) std::memcpy(&a[i], acc[i] + d0, sizeof(f32x16));
        for (int64_t kk = 0; kk < n; ++kk) {
          f32x16 v;
          std::memcpy(&v, w.vtile.data() + kk * D + d0, sizeof(v));
#pragma GCC unroll 16
          for (int i = 0; i < kRowBlock; ++i) a[i] += e[i][kk] * v;
        }
        for (int i = 0; i < kRowBlock; ++i) std::memcpy(acc[i] + d0, &a[i], sizeof(f32x16));
      }
      for (int64_t d = D16; d < D; ++d) {  // dimensions past the last multiple of 16
        for (int i = 0; i < kRowBlock; ++i) {
          for (int64_t kk = 0; kk < n; ++kk) acc[i][d] += e[i][kk] * w.vtile[kk * D + d];
        }
      }
    }
  }

  // The ancestors and the node itself: tree keys and values converted once for all rows.
  load_chunk(p.k, p.dtype, kv_offset + prefix * D, T * D, w.tree_k.data());
  load_chunk(p.v, p.dtype, kv_offset + prefix * D, T * D, w.tree_v.data());
  for (int64_t r = 0; r < R; ++r) {
    const float* q = w.q.data() + r * D;
    float* acc = w.acc.data() + r * D;
    for (int64_t a = r % T; a >= 0; a = parents[a]) {
      const float* key = w.tree_k.data() + a * D;
      const float s = dot(q, key, D);
      rescale_row(w.m[r], w.l[r], acc, D, s);
      const float e = s == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp2(s - w.m[r]);
      w.l[r] += e;
      const float* v = w.tree_v.data() + a * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += e * v[d];
    }
    // l >= 1 (the row's maximum contributes 2^0) unless every score is -inf: then NaN, as softmax.
    const float inv = 1.0f / w.l[r];
    for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
  }
  store_chunk(w.acc.data(), R * D, p.dtype, p.out, q_offset);
}

// ---- verification ---------------------------------------------------------------------------

constexpr int kChunk = 256;

// Index of the largest logit of a row, the lowest index among equal ones, NaN above everything
// (as torch.argmax). Per chunk: a vectorised maximum and NaN test, then a scan of the chunk
// only when it holds a NaN or beats the best so far.
TORCHSPEC_CPU_CLONES
int64_t row_argmax(const void* logits, ScalarKind dtype, int64_t row_offset, int64_t vocab) {
  alignas(64) float buf[kChunk];
  float best = 0.0f;
  int64_t best_index = -1;
  for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, vocab - c0);
    const float* x = buf;
    if (dtype == ScalarKind::kFloat32 && n == kChunk) {
      x = static_cast<const float*>(logits) + row_offset + c0;
    } else {
      load_chunk(logits, dtype, row_offset + c0, n, buf);
    }
    if (n < kChunk) {  // the last chunk (all of a small vocabulary): scalar
      for (int64_t i = 0; i < n; ++i) {
        if (x[i] != x[i]) return c0 + i;
        if (best_index < 0 || x[i] > best) {
          best = x[i];
          best_index = c0 + i;
        }
      }
      break;
    }
    f32x16 vmax = f32x16{} - std::numeric_limits<float>::infinity();
    i32x16 vnan = {};
    for (int g = 0; g < kChunk / kLanes; ++g) {
      f32x16 v;
      std::memcpy(&v, x + g * kLanes, sizeof(v));
      vmax = v > vmax ? v : vmax;  // NaN lanes compare false
      vnan |= v != v;
    }
    if (reduce_or(vnan) != 0) {  // the first NaN is the answer
      for (int64_t i = 0;; ++i) {
        if (x[i] != x[i]) return c0 + i;
      }
    }
    const float cmax = reduce_max(vmax);
    if (best_index < 0 || cmax > best) {  // an equal maximum in a later chunk has a higher index
      int64_t i = 0;
      while (x[i] != cmax) ++i;
      best = cmax;
      best_index = c0 + i;
    }
  }
  return best_index;
}

// x[v] <- exp((x[v] - max) / T) for the V values of a row (NaN ignored by the maximum; values
// that underflow, -inf included, give exactly 0); returns their sum (float64 across chunks).
TORCHSPEC_CPU_CLONES
double exp_and_sum(float* x, int64_t V, float inv_temperature) {
  const int64_t V16 = V / kLanes * kLanes;
  f32x16 vmax = f32x16{} - std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < V16; v += kLanes) {
    f32x16 a;
    std::memcpy(&a, x + v, sizeof(a));
    vmax = a > vmax ? a : vmax;
  }
  float mx = reduce_max(vmax);
  for (int64_t v = V16; v < V; ++v) mx = x[v] > mx ? x[v] : mx;
  const float scale = inv_temperature * kLog2e;
  double total = 0.0;
  for (int64_t c0 = 0; c0 < V16; c0 += kChunk) {
    f32x16 sum = {};
    for (int64_t v = c0; v < std::min(V16, c0 + kChunk); v += kLanes) {
      f32x16 a;
      std::memcpy(&a, x + v, sizeof(a));
      const f32x16 y = (a - mx) * scale;
      // exp2_nonpositive floors its results at 2^-125, but a token of probability 0 must never be
      // accepted or drawn: below 2^-150, where expf and std::exp2 underflow, exactly 0 (-inf too).
      a = y <= -150.0f ? f32x16{} : exp2_nonpositive(y);
      std::memcpy(x + v, &a, sizeof(a));
      sum += a;
    }
    total += reduce_sum(sum);
  }
  for (int64_t v = V16; v < V; ++v) {
    x[v] = std::exp2((x[v] - mx) * scale);
    total += x[v];
  }
  return total;
}

void greedy_row(const TreeVerifyParams& p, int64_t b) {
  const int64_t T = p.nodes;
  const int64_t* tokens = p.tokens + b * T;
  const int64_t* parents = p.parents + b * T;
  int64_t* path = p.path + b * T;
  int64_t cur = 0, accepted = 0, target = 0;
  path[0] = 0;
  while (true) {
    target =
        p.argmax != nullptr ? p.argmax[b * T + cur] : row_argmax(p.logits, p.dtype, (b * T + cur) * p.vocab, p.vocab);
    int64_t c = next_child(parents, T, cur, cur);
    while (c >= 0 && tokens[c] != target) c = next_child(parents, T, cur, c);
    if (c < 0) break;
    path[++accepted] = c;
    cur = c;
  }
  for (int64_t i = accepted + 1; i < T; ++i) path[i] = -1;
  p.num_accepted[b] = accepted;
  p.next_token[b] = target;
}

// Sampling: at node cur, p = softmax(logits[cur] / temperature). Children are tried in index
// order against the residual r (initially p): child c with token t is accepted with probability
// r(t) / sum(r), i.e. when u[b, c] * sum(r) < r(t); on rejection r(t) is set to 0 (a later child
// with the same token then has probability 0). With no child accepted, the next token is drawn
// from r by inversion with u[b, 0]. The emitted token is thus distributed as p (rejection
// sampling with point-mass drafts), whatever the tree.
void sampling_row(const TreeVerifyParams& p, int64_t b, std::vector<float>& row, std::vector<int64_t>& rejected) {
  const int64_t T = p.nodes, V = p.vocab;
  const int64_t* tokens = p.tokens + b * T;
  const int64_t* parents = p.parents + b * T;
  const double* u = p.uniforms + b * T;
  int64_t* path = p.path + b * T;
  row.resize(V);
  int64_t cur = 0, accepted = 0, next = -1;
  path[0] = 0;
  while (next < 0) {
    load_chunk(p.logits, p.dtype, (b * T + cur) * V, V, row.data());
    const double total = exp_and_sum(row.data(), V, p.inv_temperature);
    const auto prob = [&](int64_t v) { return static_cast<double>(row[v]) / total; };
    double residual = 1.0;  // sum of the residual r
    rejected.clear();
    int64_t c = next_child(parents, T, cur, cur);
    for (; c >= 0; c = next_child(parents, T, cur, c)) {
      const int64_t t = tokens[c];
      if (std::find(rejected.begin(), rejected.end(), t) != rejected.end()) continue;
      const double pt = prob(t);
      if (u[c] * residual < pt) break;
      residual -= pt;
      rejected.push_back(t);
    }
    if (c >= 0) {
      path[++accepted] = c;
      cur = c;
      continue;
    }
    // Inversion over the residual: the first token whose cumulative residual mass exceeds
    // u * sum(r). Rounding may leave the target unreached: then the last token with mass.
    const double goal = u[0] * residual;
    double cum = 0.0;
    int64_t last = -1;
    for (int64_t v = 0; v < V; ++v) {
      const double pv = prob(v);
      if (pv <= 0.0 || std::find(rejected.begin(), rejected.end(), v) != rejected.end()) continue;
      cum += pv;
      last = v;
      if (cum > goal) break;
    }
    next = last >= 0 ? last : 0;
  }
  for (int64_t i = accepted + 1; i < T; ++i) path[i] = -1;
  p.num_accepted[b] = accepted;
  p.next_token[b] = next;
}

}  // namespace

void tree_attention_units(const TreeAttentionParams& p, int64_t unit_begin, int64_t unit_end) {
  AttentionScratch scratch;
  for (int64_t u = unit_begin; u < unit_end; ++u) attention_unit(p, u, scratch);
}

void verify_tree_rows(const TreeVerifyParams& p, int64_t row_begin, int64_t row_end) {
  std::vector<float> row;
  std::vector<int64_t> rejected;
  for (int64_t b = row_begin; b < row_end; ++b) {
    if (p.uniforms == nullptr) {
      greedy_row(p, b);
    } else {
      sampling_row(p, b, row, rejected);
    }
  }
}

}  // namespace cpu
}  // namespace torchspec
