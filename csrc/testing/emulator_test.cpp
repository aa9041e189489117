// Runs every CUDA kernel of csrc/kernels on the CPU emulator (cuda_emulator.h) against its CPU twin
// (csrc/cpu), on the cases of the CUDA tests, under every thread order of the emulator.
//
// Where the two compute the same thing in the same order the comparison is exact: top-k indices
// and values, argmaxes, maxima, the tree walks. Where the summation order or the exp differs
// (log-sum-exps, sums, attention outputs) the kernel is held to a bound derived below from float32
// rounding, against a float64 reference, and the CPU twin to the same bound.
//
// Usage: cuda_emulator_test [FAMILY...]   families: topk draft_loss tree_attention verify launch checks
//                                          (default: all); $CUEMU_ORDERS: only these thread orders
//        cuda_emulator_test selftest NAME  a kernel with a known bug: the emulator must report it
// Exit status: 0 pass, 1 a mismatch, 2 bad usage, 3 a fault found by the emulator.
#include "cuda_emulator.h"

#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdarg>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../common/draft_loss.h"
#include "../common/topk_lse.h"
#include "../common/tree.h"
#include "../cpu/cpu_common.h"
#include "../cpu/cpu_kernels.h"
#include "../kernels/cuda_kernels.h"

namespace {

using torchspec::ScalarKind;
using Order = cuemu::Order;

constexpr double kU = 1.0 / 16777216.0;  // float32 unit roundoff, 2^-24
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

const Order kOrders[] = {Order::kForward, Order::kReverse, Order::kRandom, Order::kEager};
// Shared memory's bytes at block start, one per order: never 0, which could pass for a missing init.
const unsigned char kPoison[] = {0xFF, 0x7F, 0xA5, 0x5A};

int g_cases = 0, g_runs = 0;

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

const char* dtype_name(ScalarKind k) {
  return k == ScalarKind::kFloat32 ? "f32" : k == ScalarKind::kBFloat16 ? "bf16" : "f16";
}
size_t esize(ScalarKind k) { return k == ScalarKind::kFloat32 ? 4 : 2; }

void store(void* base, ScalarKind k, int64_t i, float v) {
  namespace c = torchspec::cpu;
  switch (k) {
    case ScalarKind::kFloat32:
      static_cast<float*>(base)[i] = v;
      break;
    case ScalarKind::kBFloat16:
      static_cast<uint16_t*>(base)[i] = c::float_to_bfloat16(v);
      break;
    case ScalarKind::kFloat16:
      static_cast<uint16_t*>(base)[i] = c::float_to_half(v);
      break;
  }
}
float load(const void* base, ScalarKind k, int64_t i) { return torchspec::cpu::load_one(base, k, i); }

bool same_float(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0; }
bool equal_or_nan(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// "Device" memory: cudaMalloc'd (guard pages around it), freed on scope exit.
template <class T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) {
    if (cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) {
      std::fprintf(stderr, "cudaMalloc of %zu bytes failed\n", n * sizeof(T));
      std::exit(1);
    }
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T& operator[](size_t i) { return p[i]; }
  const T& operator[](size_t i) const { return p[i]; }
};

// Collects the mismatches of one run; fails the test (exit 1) after the run if there were any.
class Check {
 public:
  explicit Check(std::string what) : what_(std::move(what)) {}
  template <class... A>
  void expect(bool ok, const char* fmt, A... args) {
    if (ok) return;
    if (errors_++ < 12) std::fprintf(stderr, "MISMATCH %s: %s\n", what_.c_str(), format(fmt, args...).c_str());
  }
  ~Check() {
    if (errors_ > 0) {
      std::fprintf(stderr, "FAILED: %s (%d mismatches)\n", what_.c_str(), errors_);
      std::exit(1);
    }
  }

 private:
  std::string what_;
  int errors_ = 0;
};

// The orders to run: all, or those named in $CUEMU_ORDERS (e.g. "reverse,eager").
bool order_enabled(Order o) {
  const char* only = std::getenv("CUEMU_ORDERS");
  if (only == nullptr || *only == '\0') return true;
  const std::string list = std::string(",") + only + ",";
  return list.find(std::string(",") + cuemu::order_name(o) + ",") != std::string::npos;
}

// Whether the case named `name` runs: all, or those whose name holds one of the ';'-separated
// parts of $CUEMU_CASES (the mutation script's quick runs take one small case each).
bool case_selected(const std::string& name) {
  const char* only = std::getenv("CUEMU_CASES");
  if (only == nullptr || *only == '\0') return true;
  const std::string list = only;
  for (size_t begin = 0; begin <= list.size();) {
    const size_t end = std::min(list.find(';', begin), list.size());
    if (end > begin && name.find(list.substr(begin, end - begin)) != std::string::npos) return true;
    begin = end + 1;
  }
  return false;
}

// Runs `launch` once per thread order (each with its own poison and a fresh output sentinel) and
// `verify` after each; `name` says what the case is, for the faults and mismatches.
template <class Prepare, class Launch, class Verify>
void for_each_order(const std::string& name, Prepare prepare, Launch launch, Verify verify) {
  if (!case_selected(name)) return;
  ++g_cases;
  for (size_t i = 0; i < std::size(kOrders); ++i) {
    if (!order_enabled(kOrders[i])) continue;
    cuemu::options().order = kOrders[i];
    cuemu::options().seed = 1 + i;
    cuemu::options().poison = kPoison[i];
    const std::string what = name + " [order " + cuemu::order_name(kOrders[i]) + "]";
    cuemu::options().context = what;
    prepare();
    const cudaError_t err = launch();
    if (err != cudaSuccess) {
      std::fprintf(stderr, "FAILED: %s: the launcher returned %s\n", what.c_str(), cudaGetErrorString(err));
      std::exit(1);
    }
    if (cudaGetLastError() != cudaSuccess) {
      std::fprintf(stderr, "FAILED: %s: an error is left in cudaGetLastError\n", what.c_str());
      std::exit(1);
    }
    Check check(what);
    verify(check);
    ++g_runs;
  }
  cuemu::options().context.clear();
  cuemu::options().run_block = nullptr;
}

// Runs only the blocks whose share of the grid falls in one of `units` (of `total` equal shares):
// for huge grids, e.g. the first and last rows, whatever the number of blocks per row.
void run_only_units(const std::set<int64_t>& units, int64_t total) {
  cuemu::options().run_block = [units, total](uint64_t block, uint64_t blocks) {
    const int64_t unit = static_cast<int64_t>(static_cast<unsigned __int128>(block) * total / blocks);
    return units.count(unit) != 0;
  };
}

std::vector<int64_t> all_of(int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

// ---- log-sum-exp ----------------------------------------------------------------------------------

// log(sum exp(x * inv_t)) in float64, with the kernels' rules for NaN and infinities.
double lse64(const std::vector<float>& x, float inv_t) {
  double m = -INFINITY;
  for (float v : x) {
    if (std::isnan(v)) return NAN;
    m = std::max<double>(m, v);
  }
  if (std::isinf(m)) return m;
  double s = 0;
  for (float v : x) s += std::exp((static_cast<double>(v) - m) * inv_t);
  return m * inv_t + std::log(s);
}

// Bound on |lse - exact| for a float32 online log-sum-exp over n values. The sum s >= 1 is made
// of chains of at most n / 256 + 64 additions (CUDA: a thread's share of the row, then the warp
// and block trees; CPU: one add per 256-value chunk after a 16-lane tree), each addition and each
// rescale of the running sum rounding by at most u relative: 3u per link. Each term's exponent
// (x - m) * scale is rounded twice, a relative error of the term of about 2u * |ln term|, whose
// weighted mean is at most ln n: 4u ln n. The CPU's polynomial exp2 adds 4u. Then logf (1 ulp),
// m * inv_t and the final addition (half an ulp each), and 4 ulp of slack for the seeded merge.
double lse_tol(int64_t n, double m_scaled, double lse) {
  const double chain = 3.0 * (static_cast<double>(n) / 256 + 64);
  return kU * (chain + 4 * std::log(static_cast<double>(std::max<int64_t>(n, 2))) + 4) +
         2 * kU * (std::fabs(m_scaled) + 6 * std::fabs(lse) + 2);
}

void expect_lse(Check& c, const char* who, int64_t row, float got, double want, int64_t n, double m_scaled) {
  if (std::isnan(want) || std::isinf(want)) {
    c.expect(std::isnan(want) ? std::isnan(got) : got == want, "row %lld: %s lse %g, want %g", (long long)row, who, got,
             want);
    return;
  }
  const double tol = lse_tol(n, m_scaled, want);
  c.expect(std::fabs(got - want) <= tol, "row %lld: %s lse %.9g, float64 %.9g (|diff| %.3g > bound %.3g)",
           (long long)row, who, got, want, std::fabs(got - want), tol);
}

// ---- topk_lse ---------------------------------------------------------------------------------------

enum class Fill { kNormal, kTies, kSignedZeros, kNonFinite, kAllNegInf, kIncreasing, kDecreasing, kNanTies };

struct TopkCase {
  ScalarKind dtype;
  int64_t rows, vocab;
  int k;
  Fill fill = Fill::kNormal;
  float temperature = 1.0f;
  int64_t stride_extra = 0;  // row stride = vocab + stride_extra
  int64_t misalign = 0;  // elements before row 0 (rows then start off 16 bytes)
  int64_t split = 0;  // > 0: two chunks, [0, split) then [split, vocab) seeded with the first's result
  std::vector<int64_t> only_rows;  // a huge case: only these rows (blocks) run
  std::string label;
};

float topk_value(const TopkCase& c, int64_t r, int64_t i, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  switch (c.fill) {
    case Fill::kNormal:
      return normal(gen);
    case Fill::kTies: {
      static const float levels[] = {-1.0f, 0.0f, 0.5f, 2.0f};
      return levels[gen() % 4];
    }
    case Fill::kSignedZeros: {
      const float u = unit(gen);
      return u < 0.35f ? 0.0f : u < 0.7f ? -0.0f : -std::fabs(normal(gen)) - 0.25f;
    }
    case Fill::kNonFinite: {
      const float u = unit(gen);
      if (r % 4 == 3) return -kInf;  // an all -inf row
      if (r % 4 == 2 && u < 0.002f) return kNaN;
      if (u < 0.004f) return kInf;
      if (u < 0.02f) return -kInf;
      return normal(gen);
    }
    case Fill::kAllNegInf:
      return -kInf;
    case Fill::kIncreasing:
      return static_cast<float>(i) * 1e-3f;
    case Fill::kDecreasing:
      return -static_cast<float>(i) * 1e-3f;
    case Fill::kNanTies:
      return (i % 97 == 5) ? kNaN : (i % 13 == 0 ? 1.0f : normal(gen));
  }
  return 0.0f;
}

void test_topk(const TopkCase& c) {
  const std::string name =
      format("topk %s rows=%lld V=%lld k=%d T=%g stride+%lld misalign=%lld split=%lld %s", dtype_name(c.dtype),
             (long long)c.rows, (long long)c.vocab, c.k, c.temperature, (long long)c.stride_extra,
             (long long)c.misalign, (long long)c.split, c.label.c_str());
  if (!case_selected(name)) return;
  const size_t es = esize(c.dtype);
  const int64_t stride = c.vocab + c.stride_extra;
  Dev<char> logits((c.misalign + (c.rows - 1) * stride + c.vocab) * es);
  void* base = logits.p + c.misalign * es;
  const std::vector<int64_t> rows = c.only_rows.empty() ? all_of(c.rows) : c.only_rows;
  for (int64_t r : rows) {
    std::mt19937 gen(1000003u * static_cast<uint32_t>(r) + static_cast<uint32_t>(c.vocab) +
                     static_cast<uint32_t>(c.fill));
    for (int64_t i = 0; i < c.vocab; ++i) store(base, c.dtype, r * stride + i, topk_value(c, r, i, gen));
  }
  const int k = c.k;
  const float inv_t = 1.0f / c.temperature;
  // The CPU twin, on host buffers.
  std::vector<float> cpu_v(c.rows * k), cpu_l(c.rows);
  std::vector<int64_t> cpu_i(c.rows * k);
  Dev<float> dv(c.rows * k), dl(c.rows);
  Dev<int64_t> di(c.rows * k);

  auto params = [&](float* v, int64_t* idx, float* l, int64_t begin, int64_t end, bool seeded) {
    torchspec::TopkLseParams p;
    p.logits = static_cast<char*>(base) + begin * es;
    p.dtype = c.dtype;
    p.rows = c.rows;
    p.vocab = end - begin;
    p.row_stride = stride;
    p.k = k;
    p.inv_temperature = inv_t;
    p.index_offset = begin;
    if (seeded) {
      p.seed_values = v;
      p.seed_indices = idx;
      p.seed_lse = l;
    }
    p.out_values = v;
    p.out_indices = idx;
    p.out_lse = l;
    p.finalize = end == c.vocab;
    return p;
  };
  const int64_t split = c.split > 0 ? c.split : c.vocab;
  for (int64_t r : rows) {
    torchspec::cpu::topk_lse_rows(params(cpu_v.data(), cpu_i.data(), cpu_l.data(), 0, split, false), r, r + 1);
    if (split < c.vocab) {
      torchspec::cpu::topk_lse_rows(params(cpu_v.data(), cpu_i.data(), cpu_l.data(), split, c.vocab, true), r, r + 1);
    }
  }
  std::vector<float> row(c.vocab);
  std::vector<double> want_lse(c.rows), m_scaled(c.rows);
  for (int64_t r : rows) {
    for (int64_t i = 0; i < c.vocab; ++i) row[i] = load(base, c.dtype, r * stride + i);
    want_lse[r] = lse64(row, inv_t);
    float m = -kInf;
    for (float x : row) m = std::isnan(x) ? m : std::max(m, x);
    m_scaled[r] = std::isinf(m) ? 0.0 : static_cast<double>(m) * inv_t;
  }
  for_each_order(
      name,
      [&] {
        if (!c.only_rows.empty()) run_only_units(std::set<int64_t>(rows.begin(), rows.end()), c.rows);
        for (int64_t r : rows) {
          std::memset(dv.p + r * k, 0xCD, k * sizeof(float));
          std::memset(di.p + r * k, 0xCD, k * sizeof(int64_t));
          std::memset(dl.p + r, 0xCD, sizeof(float));
        }
      },
      [&] {
        cudaError_t err = torchspec::cuda::topk_lse(params(dv.p, di.p, dl.p, 0, split, false), nullptr);
        if (err == cudaSuccess && split < c.vocab) {
          err = torchspec::cuda::topk_lse(params(dv.p, di.p, dl.p, split, c.vocab, true), nullptr);
        }
        return err;
      },
      [&](Check& check) {
        for (int64_t r : rows) {
          expect_lse(check, "CUDA", r, dl[r], want_lse[r], c.vocab, m_scaled[r]);
          expect_lse(check, "CPU", r, cpu_l[r], want_lse[r], c.vocab, m_scaled[r]);
          for (int j = 0; j < k; ++j) {
            const int64_t idx = di[r * k + j];
            check.expect(idx == cpu_i[r * k + j], "row %lld, rank %d: index %lld, CPU %lld", (long long)r, j,
                         (long long)idx, (long long)cpu_i[r * k + j]);
            if (idx < 0 || idx >= c.vocab) continue;
            // The kernel's value is the logit of its index as the key holds it, finalised with its lse.
            const float v = torchspec::key_value(torchspec::make_key(load(base, c.dtype, r * stride + idx), idx));
            const float want = v * inv_t - dl[r];
            check.expect(same_float(dv[r * k + j], want), "row %lld, rank %d (index %lld): value %.9g, want %.9g",
                         (long long)r, j, (long long)idx, dv[r * k + j], want);
          }
        }
      });
}

void topk_family() {
  const ScalarKind dtypes[] = {ScalarKind::kFloat32, ScalarKind::kBFloat16, ScalarKind::kFloat16};
  for (ScalarKind dt : dtypes) {
    test_topk({dt, 7, 50257, 64});
    test_topk({dt, 3, 151936, 1024});
    test_topk({dt, 2, 49152, 1});
    test_topk({dt, 5, 1000, 1000, Fill::kNormal, 1.0f, 0, 0, 0, {}, "(k = V)"});
    test_topk({dt, 2, 1024, 1024, Fill::kNormal, 1.0f, 0, 0, 0, {}, "(k = V = 1024)"});
    test_topk({dt, 3, 1, 1, Fill::kNormal, 1.0f, 0, 0, 0, {}, "(V = 1)"});
    test_topk({dt, 3, 7, 7});
    test_topk({dt, 4, 31, 5});
    test_topk({dt, 3, 1025, 257, Fill::kNormal, 0.7f});
    test_topk({dt, 9, 3001, 300, Fill::kNormal, 1.0f, 13, 1, 0, {}, "(strided, misaligned rows)"});
    test_topk({dt, 5, 2050, 64, Fill::kNormal, 2.5f, 1, 3, 0, {}, "(odd stride, misaligned rows)"});
    test_topk({dt, 4, 20000, 300, Fill::kTies, 1.0f, 0, 0, 0, {}, "(ties)"});
    test_topk({dt, 4, 5000, 1024, Fill::kTies, 1.0f, 0, 0, 0, {}, "(ties, k > 256)"});
    test_topk({dt, 4, 3000, 100, Fill::kSignedZeros, 1.0f, 0, 0, 0, {}, "(signed zeros)"});
    test_topk({dt, 8, 4099, 50, Fill::kNonFinite, 1.0f, 0, 1, 0, {}, "(NaN, +-inf, all -inf rows)"});
    test_topk({dt, 2, 300, 300, Fill::kAllNegInf, 1.0f, 0, 0, 0, {}, "(all -inf, k = V)"});
    test_topk({dt, 2, 20000, 1024, Fill::kIncreasing, 1.0f, 0, 0, 0, {}, "(increasing: a compaction every tile)"});
    test_topk({dt, 2, 20000, 1024, Fill::kDecreasing, 0.3f, 0, 0, 0, {}, "(decreasing)"});
    test_topk({dt, 3, 9000, 40, Fill::kNanTies, 1.0f, 0, 0, 0, {}, "(NaN ties: the lower index first)"});
    test_topk({dt, 5, 20000, 64, Fill::kNormal, 1.0f, 0, 0, 8192, {}, "(two seeded chunks)"});
    test_topk({dt, 3, 12000, 1024, Fill::kNonFinite, 1.0f, 0, 0, 8192, {}, "(two seeded chunks, k = 1024)"});
  }
  // The GPU shape: 8192 rows of a 152064-token vocabulary in bfloat16, k = 1024; the first and last rows.
  // clang-format off
  test_topk({ScalarKind::kBFloat16, 8192, 152064, 1024, Fill::kNormal, 1.0f, 0, 0, 0, {0, 8190, 8191},
             "(8192 x 152064, first and last rows)"});
  // clang-format on

  // ---- issue 31: offsets past 2^31 elements ----
  // 16384 rows of 152064 bf16: the last row starts 2.49e9 elements (4.98 GB) in, past any 32-bit
  // offset. The buffer is reserved, not committed (cudaMalloc here maps with MAP_NORESERVE): only the
  // two rows that run are written, 0.6 MB; k = 64 keeps the [rows, k] outputs at 12 MB.
  // clang-format off
  test_topk({ScalarKind::kBFloat16, 16384, 152064, 64, Fill::kNormal, 1.0f, 0, 0, 0, {0, 16383},
             "(past 2^31 elements: 16384 x 152064, first and last rows)"});
  // clang-format on
}

// ---- draft_topk_kl tiles ------------------------------------------------------------------------------

struct DraftCase {
  int64_t rows, vocab, chunk;
  int k;
  float temperature = 1.0f;
  int64_t ld_extra = 0;
  bool special = false;  // NaN and infinite logits, duplicate and absent ids, masked rows
  std::string label;
};

void test_draft_loss(const DraftCase& c) {
  const int64_t ld = c.vocab + c.ld_extra, R = c.rows, K = c.k;
  const float inv_t = 1.0f / c.temperature;
  std::mt19937 gen(static_cast<uint32_t>(R * 7919 + c.vocab + K));
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> z(R * ld, 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < c.vocab; ++i) z[r * ld + i] = normal(gen);
    if (c.special) {
      if (r % 5 == 1) z[r * ld + gen() % c.vocab] = kNaN;
      if (r % 5 == 2) z[r * ld + gen() % c.vocab] = kInf;
      if (r % 5 == 3) z[r * ld + gen() % c.vocab] = -kInf;
      if (r % 5 == 4) z[r * ld + c.vocab / 2] = z[r * ld + c.vocab / 3] = 50.0f;  // a tie for the argmax
    }
  }
  std::vector<int64_t> ids(R * K);
  std::vector<float> w(R * K), coef(R * K), scale(R);
  std::vector<bool> scale_cancels(R, false);  // a row_scale of 0 with non-zero coefficients (LK)
  for (int64_t r = 0; r < R; ++r) {
    double total = 0;
    for (int j = 0; j < K; ++j) {
      int64_t id = static_cast<int64_t>(gen() % c.vocab);
      if (c.special && j > 0 && gen() % 4 == 0) id = ids[r * K + gen() % j];  // a repeated id
      if (c.special && gen() % 7 == 0) id = -1;  // absent
      ids[r * K + j] = id;
      w[r * K + j] = id < 0 ? 0.0f : std::uniform_real_distribution<float>(0.01f, 1.0f)(gen);
      total += w[r * K + j];
    }
    for (int j = 0; j < K; ++j) w[r * K + j] = total > 0 ? static_cast<float>(w[r * K + j] / total) : 0.0f;
    scale[r] = (c.special && r % 3 == 0) ? 0.0f : 0.37f / static_cast<float>(R);  // a masked row every third
    for (int j = 0; j < K; ++j) coef[r * K + j] = w[r * K + j] * scale[r];
    if (c.special && r % 6 == 3) {  // lk_lambda's row_scale s (w + (1 - w) S) can be 0 with coef != 0
      scale[r] = 0.0f;
      scale_cancels[r] = true;
      for (int j = 0; j < K; ++j) coef[r * K + j] = (w[r * K + j] - 0.5f / K) * 0.37f / static_cast<float>(R);
    }
  }
  Dev<float> dz(R * ld), dw(R * K), dcoef(R * K), dscale(R), dlse(R), dgathered(R * K);
  Dev<int64_t> dids(R * K);
  std::memcpy(dw.p, w.data(), w.size() * 4);
  std::memcpy(dcoef.p, coef.data(), coef.size() * 4);
  std::memcpy(dscale.p, scale.data(), scale.size() * 4);
  std::memcpy(dids.p, ids.data(), ids.size() * 8);
  struct State {
    std::vector<float> m, s, av, dot, lse;
    std::vector<int64_t> ai;
  };
  auto init = [&](float* m, float* s, float* av, int64_t* ai, float* dot) {
    for (int64_t r = 0; r < R; ++r) {
      m[r] = -kInf;
      s[r] = 0.0f;
      av[r] = -kInf;
      ai[r] = 0;
      dot[r] = 0.0f;
    }
  };
  auto fwd = [&](const float* logits, const int64_t* idx, const float* wt, float* m, float* s, float* av, int64_t* ai,
                 float* dot, float* lse, float* gathered, int64_t c0, int64_t c1) {
    torchspec::DraftLossForwardTile p;
    p.rows = R;
    p.cols = c1 - c0;
    p.ld = ld;
    p.col_offset = c0;
    p.target_indices = idx;
    p.k = K;
    p.inv_temperature = inv_t;
    p.logits = logits + c0;
    p.target_weights = wt;
    p.run_max = m;
    p.run_sum = s;
    p.argmax_value = av;
    p.argmax_index = ai;
    p.target_dot = dot;
    p.out_lse = c1 == c.vocab ? lse : nullptr;
    p.target_logits = gathered;
    return p;
  };
  auto chunks = [&] {
    std::vector<std::pair<int64_t, int64_t>> v;
    for (int64_t c0 = 0; c0 < c.vocab; c0 += c.chunk) v.push_back({c0, std::min(c.vocab, c0 + c.chunk)});
    return v;
  }();
  State cpu;
  cpu.m.resize(R), cpu.s.resize(R), cpu.av.resize(R), cpu.dot.resize(R), cpu.lse.resize(R), cpu.ai.resize(R);
  init(cpu.m.data(), cpu.s.data(), cpu.av.data(), cpu.ai.data(), cpu.dot.data());
  std::vector<float> cpu_gathered(R * K, -kInf);  // absent entries keep the launcher's -inf
  for (auto [c0, c1] : chunks) {
    torchspec::cpu::draft_loss_forward_rows(
        fwd(z.data(), ids.data(), w.data(), cpu.m.data(), cpu.s.data(), cpu.av.data(), cpu.ai.data(), cpu.dot.data(),
            cpu.lse.data(), cpu_gathered.data(), c0, c1),
        0, R);
  }
  // Each kernel's gathered entries are log q = z[id] / T - (its own lse): both roundings as written,
  // or one (the CPU clones may fuse them into an fma).
  auto expect_gathered = [&](Check& check, const char* who, const float* got, const float* lse_of) {
    for (int64_t r = 0; r < R; ++r) {
      for (int j = 0; j < K; ++j) {
        const int64_t id = ids[r * K + j];
        const float want = id < 0 ? -kInf : z[r * ld + id] * inv_t - lse_of[r];
        const float fused = id < 0 ? -kInf : std::fma(z[r * ld + id], inv_t, -lse_of[r]);
        check.expect(same_float(got[r * K + j], want) || same_float(got[r * K + j], fused) ||
                         (std::isnan(want) && std::isnan(got[r * K + j])),
                     "%s row %lld entry %d (id %lld): log q %.9g, want %.9g", who, (long long)r, j, (long long)id,
                     got[r * K + j], want);
      }
    }
  };
  Dev<float> m(R), s(R), av(R), dot(R), lse(R);
  Dev<int64_t> ai(R);
  std::vector<double> want_lse(R), m_scaled(R), dot_abs(R);
  for (int64_t r = 0; r < R; ++r) {
    want_lse[r] = lse64(std::vector<float>(z.begin() + r * ld, z.begin() + r * ld + c.vocab), inv_t);
    m_scaled[r] = std::isinf(cpu.m[r]) ? 0.0 : static_cast<double>(cpu.m[r]) * inv_t;
    for (int j = 0; j < K; ++j) {
      if (ids[r * K + j] >= 0) dot_abs[r] += std::fabs(static_cast<double>(w[r * K + j]) * z[r * ld + ids[r * K + j]]);
    }
  }
  const std::string name =
      format("draft_loss forward rows=%lld V=%lld chunk=%lld k=%d T=%g ld+%lld %s", (long long)R, (long long)c.vocab,
             (long long)c.chunk, K, c.temperature, (long long)c.ld_extra, c.label.c_str());
  for_each_order(
      name,
      [&] {
        std::memcpy(dz.p, z.data(), z.size() * 4);
        init(m.p, s.p, av.p, ai.p, dot.p);
        std::memset(lse.p, 0xCD, R * 4);
        for (int64_t i = 0; i < R * K; ++i) dgathered[i] = -kInf;
      },
      [&] {
        for (auto [c0, c1] : chunks) {
          const cudaError_t err = torchspec::cuda::draft_loss_forward(
              fwd(dz.p, dids.p, dw.p, m.p, s.p, av.p, ai.p, dot.p, lse.p, dgathered.p, c0, c1), nullptr);
          if (err != cudaSuccess) return err;
        }
        return cudaSuccess;
      },
      [&](Check& check) {
        for (int64_t r = 0; r < R; ++r) {
          check.expect(equal_or_nan(m[r], cpu.m[r]), "row %lld: run_max %g, CPU %g", (long long)r, m[r], cpu.m[r]);
          check.expect(ai[r] == cpu.ai[r] && equal_or_nan(av[r], cpu.av[r]),
                       "row %lld: argmax %lld (%g), CPU %lld (%g)", (long long)r, (long long)ai[r], av[r],
                       (long long)cpu.ai[r], cpu.av[r]);
          if (cpu.m[r] == kInf) {
            // Past a +inf logit the sum is a placeholder (CUDA keeps 1, the CPU 0): only the lse (+inf) counts.
          } else if (std::isnan(cpu.s[r])) {
            check.expect(std::isnan(s[r]), "row %lld: run_sum %g, CPU NaN", (long long)r, s[r]);
          } else {
            const double tol = lse_tol(c.vocab, 0, 0) * std::fabs(cpu.s[r]) * 2;  // both within the bound
            check.expect(std::fabs(s[r] - cpu.s[r]) <= tol, "row %lld: run_sum %.9g, CPU %.9g", (long long)r, s[r],
                         cpu.s[r]);
          }
          if (std::isfinite(dot_abs[r])) {
            // Two float32 sums of the same k products in different orders: each within (k + 8) u sum|terms|.
            const double tol = 2 * (K + 8 + 2 * static_cast<double>(chunks.size())) * kU * dot_abs[r];
            check.expect(std::fabs(dot[r] - cpu.dot[r]) <= tol, "row %lld: target_dot %.9g, CPU %.9g", (long long)r,
                         dot[r], cpu.dot[r]);
          } else {
            check.expect(equal_or_nan(dot[r], cpu.dot[r]), "row %lld: target_dot %g, CPU %g", (long long)r, dot[r],
                         cpu.dot[r]);
          }
          expect_lse(check, "CUDA", r, lse[r], want_lse[r], c.vocab, m_scaled[r]);
          expect_lse(check, "CPU", r, cpu.lse[r], want_lse[r], c.vocab, m_scaled[r]);
        }
        expect_gathered(check, "CUDA", dgathered.p, lse.p);
        expect_gathered(check, "CPU", cpu_gathered.data(), cpu.lse.data());
      });

  // Backward over the same tiles, from the CPU's lse (the same input for both).
  Dev<float> dlse_in(R);
  std::memcpy(dlse_in.p, cpu.lse.data(), R * 4);
  auto bwd = [&](float* g, const int64_t* idx, const float* cf, const float* l, const float* sc, int64_t c0,
                 int64_t c1) {
    torchspec::DraftLossBackwardTile p;
    p.rows = R;
    p.cols = c1 - c0;
    p.ld = ld;
    p.col_offset = c0;
    p.target_indices = idx;
    p.k = K;
    p.inv_temperature = inv_t;
    p.logits = g + c0;
    p.target_coef = cf;
    p.lse = l;
    p.row_scale = sc;
    return p;
  };
  std::vector<float> g = z;
  for (auto [c0, c1] : chunks) {
    torchspec::cpu::draft_loss_backward_rows(
        bwd(g.data(), ids.data(), coef.data(), cpu.lse.data(), scale.data(), c0, c1), 0, R);
  }
  // Per element g = scale * 2^(z * a - b) - (the coefficients at that column). The exponent is
  // rounded twice, by u |z a| and u |z a - b| (the CPU clones may fuse them: count both for each
  // kernel), a relative error of ln 2 times that in the power; exp2 itself is within 4u (the CPU's
  // polynomial) and 1u (libm); the product by the scale and each subtraction round by u of what
  // they hold. The bound is the sum of both kernels' errors.
  std::vector<double> bound(R * ld, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const double a = inv_t * 1.4426950408889634, b = cpu.lse[r] * 1.4426950408889634;
    std::vector<int> terms(c.vocab, 0);
    std::vector<double> coefs(c.vocab, 0.0);
    for (int j = 0; j < K; ++j) {
      if (ids[r * K + j] >= 0) {
        ++terms[ids[r * K + j]];
        coefs[ids[r * K + j]] += std::fabs(coef[r * K + j]);
      }
    }
    for (int64_t i = 0; i < c.vocab; ++i) {
      const double za = z[r * ld + i] * a, e = std::fabs(scale[r] * std::exp2(za - b));
      const double power = e > 0 ? 2 * (std::log(2.0) * 2 * (std::fabs(za) + std::fabs(za - b)) + 6) * e : 0.0;
      bound[r * ld + i] = kU * (power + 2 * (1 + terms[i]) * (e + coefs[i])) +
                          std::ldexp(std::fabs(scale[r]), -124);  // the polynomial's floor at 2^-125
    }
  }
  for_each_order(
      format("draft_loss backward rows=%lld V=%lld chunk=%lld k=%d T=%g ld+%lld %s", (long long)R, (long long)c.vocab,
             (long long)c.chunk, K, c.temperature, (long long)c.ld_extra, c.label.c_str()),
      [&] { std::memcpy(dz.p, z.data(), z.size() * 4); },
      [&] {
        for (auto [c0, c1] : chunks) {
          const cudaError_t err =
              torchspec::cuda::draft_loss_backward(bwd(dz.p, dids.p, dcoef.p, dlse_in.p, dscale.p, c0, c1), nullptr);
          if (err != cudaSuccess) return err;
        }
        return cudaSuccess;
      },
      [&](Check& check) {
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t i = 0; i < ld; ++i) {
            const float got = dz[r * ld + i], want = g[r * ld + i];
            if (i >= c.vocab) {  // the padding past the row is never written
              check.expect(same_float(got, z[r * ld + i]), "row %lld col %lld (padding) changed", (long long)r,
                           (long long)i);
            } else if (scale[r] == 0.0f && !scale_cancels[r]) {
              check.expect(same_float(got, 0.0f), "row %lld col %lld: masked row gives %g, want +0", (long long)r,
                           (long long)i, got);
            } else if (!std::isfinite(want) || !std::isfinite(bound[r * ld + i])) {
              check.expect(equal_or_nan(got, want), "row %lld col %lld: %g, CPU %g", (long long)r, (long long)i, got,
                           want);
            } else {
              check.expect(std::fabs(got - want) <= bound[r * ld + i], "row %lld col %lld: grad %.9g, CPU %.9g",
                           (long long)r, (long long)i, got, want);
            }
          }
        }
      });
}

// ---- draft_topk_kl, LK rows ---------------------------------------------------------------------

struct LKCase {
  int64_t rows;
  int k;
  torchspec::DraftLossKind kind;
  bool special = false;  // absent and repeated ids, zero acceptance, no tail, -inf and NaN log q, masked rows
  std::string label;
};

// The row's LK values in float64 as defined in common/draft_loss.h, written from the definition
// (linear space, in entry order), independently of both kernels.
struct LKWant {
  double accept, neg_log_accept, row_scale, row_mag;
  std::vector<double> coef, coef_mag;
};

LKWant lk_reference(const float* log_q, const float* prob, float tail, const float* kl_w, double scale, double w, int k,
                    torchspec::DraftLossKind kind) {
  const bool alpha = kind == torchspec::DraftLossKind::kLKAlpha;
  LKWant o{0, 0, 0, 0, std::vector<double>(k, 0.0), std::vector<double>(k, 0.0)};
  double sum_q = 0, a = 0;
  for (int j = 0; j < k; ++j) {
    if (prob[j] < 0) continue;
    const double q = std::exp(static_cast<double>(log_q[j]));
    sum_q += q;
    a += std::min<double>(q, prob[j]);
  }
  const double q_tail = std::max(0.0, 1.0 - sum_q);
  const double tail_side = q_tail < tail ? 1.0 : 0.0;
  a += std::min<double>(q_tail, tail);
  o.accept = a;
  o.neg_log_accept = a == 0 ? 0.0 : -std::log(a);
  if (scale == 0 || (alpha && a == 0)) return o;
  double sum_cq = 0, sum_abs = 0;
  for (int j = 0; j < k; ++j) {
    double cq = 0;
    if (prob[j] >= 0) {
      const double q = std::exp(static_cast<double>(log_q[j]));
      cq = ((q < prob[j] ? 1.0 : 0.0) - tail_side) * q / (alpha ? a : 1.0);
    }
    sum_cq += cq;
    sum_abs += std::fabs(cq);
    o.coef[j] = alpha ? scale * cq : scale * (w * kl_w[j] + (1 - w) * cq);
    o.coef_mag[j] = std::fabs(scale) * (alpha ? std::fabs(cq) : w * std::fabs(kl_w[j]) + (1 - w) * std::fabs(cq));
  }
  o.row_scale = alpha ? scale * sum_cq : scale * (w + (1 - w) * sum_cq);
  o.row_mag = std::fabs(scale) * (alpha ? sum_abs : w + (1 - w) * sum_abs);
  return o;
}

void test_draft_lk_rows(const LKCase& c) {
  const int64_t R = c.rows;
  const int K = c.k;
  std::mt19937 gen(static_cast<uint32_t>(R * 131 + K * 7 + static_cast<int>(c.kind)));
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> log_q(R * K), prob(R * K), kl_w(R * K), tail(R), scale(R);
  const float w = 0.6f;
  for (int64_t r = 0; r < R; ++r) {
    // A draft and a correlated teacher over the k ids plus 8 more tokens (the tails).
    std::vector<double> d(K + 8), t(K + 8);
    double dz = 0, tz = 0;
    for (int j = 0; j < K + 8; ++j) {
      d[j] = normal(gen);
      t[j] = 0.7 * d[j] + normal(gen);
      dz += std::exp(d[j]);
      tz += std::exp(t[j]);
    }
    double kept = 0, kl_total = 0;
    for (int j = 0; j < K; ++j) {
      const int64_t i = r * K + j;
      log_q[i] = static_cast<float>(d[j] - std::log(dz));
      prob[i] = static_cast<float>(std::exp(t[j]) / tz);
      kept += prob[i];
      if (c.special && j > 0 && gen() % 5 == 0) {  // a repeat of entry 0: same log q, its mass merged there
        log_q[i] = log_q[r * K];
        prob[r * K] += prob[i];
        prob[i] = -1.0f;
      } else if (c.special && gen() % 6 == 0) {  // absent: -inf log q, teacher mass outside the draft vocabulary
        log_q[i] = -kInf;
        prob[i] = -1.0f;
      }
      kl_w[i] = prob[i] < 0 ? 0.0f : unit(gen);
      kl_total += kl_w[i];
    }
    for (int j = 0; j < K; ++j) kl_w[r * K + j] = kl_total > 0 ? static_cast<float>(kl_w[r * K + j] / kl_total) : 0.0f;
    tail[r] = static_cast<float>(std::max(0.0, 1.0 - kept));
    scale[r] = (0.5f + unit(gen)) / static_cast<float>(R);
    if (!c.special) continue;
    switch (r % 8) {
      case 1:  // every entry absent
        for (int j = 0; j < K; ++j) prob[r * K + j] = -1.0f, log_q[r * K + j] = -kInf;
        break;
      case 2:  // zero acceptance: the present ids have teacher probability 0 and there is no tail
        for (int j = 0; j < K; ++j) prob[r * K + j] = std::min(prob[r * K + j], 0.0f);
        tail[r] = 0.0f;
        break;
      case 3:  // no teacher tail, and a present id with log q = -inf
        tail[r] = 0.0f;
        log_q[r * K] = -kInf;
        break;
      case 4:  // a masked row with NaN log q (padding)
        scale[r] = 0.0f;
        log_q[r * K + K / 2] = kNaN;
        break;
      case 5:  // the draft's whole mass on the ids: q_t = 0
        for (int j = 0; j < K; ++j) {
          if (prob[r * K + j] >= 0) log_q[r * K + j] = static_cast<float>(d[j] - std::log(dz - std::exp(d[K])));
        }
        break;
      case 6:  // a masked row
        scale[r] = 0.0f;
        break;
    }
  }
  auto params = [&](const float* lq, const float* pr, const float* tl, const float* kw, const float* sc,
                    const float* lw, float* acc, float* nla, float* rs, float* cf) {
    torchspec::DraftLossLKRows p;
    p.rows = R;
    p.k = K;
    p.kind = c.kind;
    p.draft_logprobs = lq;
    p.accept_prob = pr;
    p.tail = tl;
    p.kl_weights = kw;
    p.grad_scale = sc;
    p.lambda_weight = lw;
    p.accept = acc;
    p.neg_log_accept = nla;
    p.row_scale = rs;
    p.coef = cf;
    return p;
  };
  std::vector<float> acc(R), nla(R), rs(R), cf(R * K);
  torchspec::cpu::draft_loss_lk_rows(params(log_q.data(), prob.data(), tail.data(), kl_w.data(), scale.data(), &w,
                                            acc.data(), nla.data(), rs.data(), cf.data()),
                                     0, R);
  Dev<float> dlq(R * K), dpr(R * K), dtl(R), dkw(R * K), dsc(R), dw(1), dacc(R), dnla(R), drs(R), dcf(R * K);
  std::memcpy(dlq.p, log_q.data(), R * K * 4);
  std::memcpy(dpr.p, prob.data(), R * K * 4);
  std::memcpy(dtl.p, tail.data(), R * 4);
  std::memcpy(dkw.p, kl_w.data(), R * K * 4);
  std::memcpy(dsc.p, scale.data(), R * 4);
  dw[0] = w;
  std::vector<LKWant> want(R);
  for (int64_t r = 0; r < R; ++r) {
    want[r] = lk_reference(&log_q[r * K], &prob[r * K], tail[r], &kl_w[r * K], scale[r], w, K, c.kind);
  }
  // Both kernels work in double and round once to float32; the reference differs from them by the
  // order of its double sums: half an ulp of the result plus 1e-12 of the terms' magnitude.
  auto close = [](float got, double ref, double mag) {
    if (std::isnan(ref)) return std::isnan(got);
    return std::fabs(got - ref) <= kU * std::fabs(ref) + 1e-12 * mag + 1e-300;
  };
  auto verify = [&](Check& check, const char* who, const float* a, const float* n, const float* s, const float* f) {
    for (int64_t r = 0; r < R; ++r) {
      const LKWant& o = want[r];
      check.expect(close(a[r], o.accept, o.accept), "%s row %lld: accept %.9g, want %.9g", who, (long long)r, a[r],
                   o.accept);
      check.expect(close(n[r], o.neg_log_accept, std::fabs(o.neg_log_accept) + 1),
                   "%s row %lld: -log accept %.9g, want %.9g", who, (long long)r, n[r], o.neg_log_accept);
      check.expect(close(s[r], o.row_scale, o.row_mag), "%s row %lld: row_scale %.9g, want %.9g", who, (long long)r,
                   s[r], o.row_scale);
      if (scale[r] == 0.0f)
        check.expect(same_float(s[r], 0.0f), "%s row %lld: masked row_scale %g", who, (long long)r, s[r]);
      for (int j = 0; j < K; ++j) {
        const float got = f[r * K + j];
        check.expect(close(got, o.coef[j], o.coef_mag[j]) && (scale[r] != 0.0f || same_float(got, 0.0f)),
                     "%s row %lld entry %d: coef %.9g, want %.9g", who, (long long)r, j, got, o.coef[j]);
      }
    }
  };
  const char* kind = c.kind == torchspec::DraftLossKind::kLKAlpha ? "lk_alpha" : "lk_lambda";
  for_each_order(
      format("draft_loss lk rows=%lld k=%d %s %s", (long long)R, K, kind, c.label.c_str()),
      [&] {
        std::memset(dacc.p, 0xCD, R * 4);
        std::memset(dnla.p, 0xCD, R * 4);
        std::memset(drs.p, 0xCD, R * 4);
        std::memset(dcf.p, 0xCD, R * K * 4);
      },
      [&] {
        return torchspec::cuda::draft_loss_lk_rows(
            params(dlq.p, dpr.p, dtl.p, dkw.p, dsc.p, dw.p, dacc.p, dnla.p, drs.p, dcf.p), nullptr);
      },
      [&](Check& check) {
        verify(check, "CUDA", dacc.p, dnla.p, drs.p, dcf.p);
        verify(check, "CPU", acc.data(), nla.data(), rs.data(), cf.data());
      });
  // The statistics alone (coef null): the same accept, nothing else written.
  for_each_order(
      format("draft_loss lk statistics rows=%lld k=%d %s %s", (long long)R, K, kind, c.label.c_str()),
      [&] {
        std::memset(dacc.p, 0xCD, R * 4);
        std::memset(dnla.p, 0xCD, R * 4);
      },
      [&] {
        return torchspec::cuda::draft_loss_lk_rows(
            params(dlq.p, dpr.p, dtl.p, nullptr, nullptr, nullptr, dacc.p, dnla.p, nullptr, nullptr), nullptr);
      },
      [&](Check& check) {
        for (int64_t r = 0; r < R; ++r) {
          check.expect(same_float(dacc[r], acc[r]) || close(dacc[r], want[r].accept, want[r].accept),
                       "row %lld: accept %.9g, CPU %.9g", (long long)r, dacc[r], acc[r]);
          check.expect(close(dnla[r], want[r].neg_log_accept, std::fabs(want[r].neg_log_accept) + 1),
                       "row %lld: -log accept %.9g", (long long)r, dnla[r]);
        }
      });
}

void draft_loss_family() {
  test_draft_loss({1, 8192, 8192, 64});
  test_draft_loss({7, 32000, 8192, 64, 1.0f, 0, false, "(4 chunks)"});
  test_draft_loss({33, 32768 + 3, 4096, 16, 0.7f, 5, false, "(odd vocabulary, strided rows)"});
  test_draft_loss({300, 5, 5, 3, 1.0f, 0, false, "(V = 5)"});
  test_draft_loss({40, 9000, 2500, 1, 1.0f, 0, false, "(k = 1: cross-entropy)"});
  test_draft_loss(
      {25, 7000, 3000, 40, 1.6f, 3, true, "(NaN and infinite logits, repeated and absent ids, masked rows)"});
  test_draft_loss({12, 1000, 1000, 300, 1.0f, 0, true, "(k = 300 > 256, repeated ids)"});
  for (const auto kind : {torchspec::DraftLossKind::kLKAlpha, torchspec::DraftLossKind::kLKLambda}) {
    test_draft_lk_rows({1, 1, kind});
    test_draft_lk_rows({7, 5, kind});
    test_draft_lk_rows({83, 64, kind, true, "(absent and repeated ids, zero acceptance, no tail, masked rows)"});
    test_draft_lk_rows({1000, 33, kind, true, "(125 blocks)"});
    test_draft_lk_rows({13, 300, kind, true, "(k = 300: ten entries a lane)"});
  }
}

// ---- tree attention -----------------------------------------------------------------------------

enum class AttnSpecial { kNone, kChain, kInfKeyNegativeScore, kAllNegInf, kInfScore };

struct AttnCase {
  ScalarKind dtype;
  int64_t B, Hq, Hkv, T, D;
  std::vector<int64_t> prefix;
  int64_t extra;
  AttnSpecial special = AttnSpecial::kNone;
  std::set<int64_t> only_units;  // a huge case: these (b * Hkv + g) units only
  std::string label;
  bool shared_kv = false;  // v is k's memory (a huge case: half the reservation)
  int64_t splits = 0;  // tensor cores: key ranges per block of rows (0: the launcher's choice)
};

void test_tree_attention(const AttnCase& c) {
  const int64_t B = c.B, Hq = c.Hq, Hkv = c.Hkv, T = c.T, D = c.D, G = Hq / Hkv;
  int64_t S = 0;
  for (int64_t p : c.prefix) S = std::max(S, p + T);
  S += c.extra;
  const std::string name =
      format("tree_attention %s B=%lld Hq=%lld Hkv=%lld T=%lld D=%lld S=%lld%s %s", dtype_name(c.dtype), (long long)B,
             (long long)Hq, (long long)Hkv, (long long)T, (long long)D, (long long)S,
             c.splits > 0 ? format(" splits=%lld", (long long)c.splits).c_str() : "", c.label.c_str());
  if (!case_selected(name)) return;
  const size_t es = esize(c.dtype);
  Dev<char> q(B * Hq * T * D * es), k(B * Hkv * S * D * es), v(c.shared_kv ? 1 : B * Hkv * S * D * es),
      out(B * Hq * T * D * es);
  char* const vp = c.shared_kv ? k.p : v.p;
  Dev<int64_t> lens(B), parents(B * T);
  std::vector<int64_t> units;
  for (int64_t u = 0; u < B * Hkv; ++u) {
    if (c.only_units.empty() || c.only_units.count(u)) units.push_back(u);
  }
  std::mt19937 tree_gen(static_cast<uint32_t>(T * 31 + B));
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = c.prefix[b];
    parents[b * T] = -1;
    for (int64_t j = 1; j < T; ++j) {
      parents[b * T + j] = c.special == AttnSpecial::kChain ? j - 1 : static_cast<int64_t>(tree_gen() % j);
    }
  }
  for (int64_t u : units) {
    const int64_t b = u / Hkv, g = u % Hkv;
    std::mt19937 gen(static_cast<uint32_t>(u * 7907 + D));
    std::normal_distribution<float> normal;
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      for (int64_t i = 0; i < T * D; ++i) {
        float x = normal(gen);
        if ((c.special == AttnSpecial::kInfKeyNegativeScore || c.special == AttnSpecial::kAllNegInf) && i % D == 0) {
          x = c.special == AttnSpecial::kAllNegInf ? std::fabs(x) + 0.5f : -std::fabs(x) - 0.5f;
        }
        store(q.p, c.dtype, (b * Hq + h) * T * D + i, x);
      }
    }
    for (int64_t i = 0; i < S * D; ++i) {
      const int64_t at = (b * Hkv + g) * S * D + i, pos = i / D;
      float kx = normal(gen);
      const float vx = normal(gen);
      if (i % D == 0) {
        const int64_t prefix = c.prefix[b];
        switch (c.special) {
          case AttnSpecial::kInfKeyNegativeScore:  // q[..., 0] < 0: these keys score -inf and weigh 0
            if (pos == 0 || pos == prefix + 1) kx = kInf;
            break;
          case AttnSpecial::kAllNegInf:  // q[..., 0] > 0: every key of (b, g) scores -inf: NaN, as softmax
            if (b % 2 == 0) kx = -kInf;
            break;
          case AttnSpecial::kInfScore:  // a key scoring +inf for some rows: NaN there
            if (pos == prefix) kx = kInf;
            break;
          default:
            break;
        }
      }
      store(k.p, c.dtype, at, kx);
      store(vp, c.dtype, at, vx);
    }
  }
  torchspec::TreeAttentionParams p;
  p.dtype = c.dtype;
  p.batch = B;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.nodes = T;
  p.seq = S;
  p.head_dim = D;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.q = q.p;
  p.k = k.p;
  p.v = vp;
  p.prefix_lens = lens.p;
  p.parents = parents.p;
  p.out = out.p;
  p.splits = c.splits;
  // The launch plan (tensor cores for bf16 / f16 on the emulated sm_90) and the merge's workspace.
  torchspec::TreeAttentionPlan plan;
  if (torchspec::cuda::tree_attention_plan(p, &plan) != cudaSuccess) {
    std::fprintf(stderr, "FAILED: %s: tree_attention_plan\n", name.c_str());
    std::exit(1);
  }
  Dev<float> workspace(plan.workspace_bytes / 4);
  p.splits = plan.splits;
  p.workspace = workspace.p;
  std::vector<char> cpu_out(B * Hq * T * D * es);
  torchspec::TreeAttentionParams pc = p;
  pc.out = cpu_out.data();
  for (int64_t u : units) torchspec::cpu::tree_attention_units(pc, u, u + 1);
  // float64 reference on the same (rounded) inputs.
  std::vector<double> ref(B * Hq * T * D, 0.0);
  std::vector<double> vmax(B * Hq * T, 0.0);
  std::vector<double> weighted_abs_v(B * Hq * T * D, 0.0);  // sum over keys of softmax weight * |v|
  for (int64_t u : units) {
    const int64_t b = u / Hkv, g = u % Hkv, prefix = c.prefix[b];
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      for (int64_t j = 0; j < T; ++j) {
        std::vector<int64_t> keys;
        for (int64_t t = 0; t < prefix; ++t) keys.push_back(t);
        for (int64_t a = j; a >= 0; a = parents[b * T + a]) keys.push_back(prefix + a);
        std::vector<double> sc(keys.size());
        double mx = -INFINITY;
        bool nan = false;
        for (size_t i = 0; i < keys.size(); ++i) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += static_cast<double>(load(q.p, c.dtype, ((b * Hq + h) * T + j) * D + d)) *
                   load(k.p, c.dtype, ((b * Hkv + g) * S + keys[i]) * D + d);
          }
          sc[i] = dot * p.scale;
          nan |= std::isnan(sc[i]);
          mx = std::max(mx, sc[i]);
        }
        double* o = ref.data() + ((b * Hq + h) * T + j) * D;
        if (nan || std::isinf(mx)) {  // every score -inf: 0 / 0; a +inf score: inf - inf
          for (int64_t d = 0; d < D; ++d) o[d] = NAN;
          continue;
        }
        double l = 0;
        for (size_t i = 0; i < keys.size(); ++i) {
          const double e = std::exp(sc[i] - mx);
          l += e;
          for (int64_t d = 0; d < D; ++d) {
            const double vv = load(vp, c.dtype, ((b * Hkv + g) * S + keys[i]) * D + d);
            o[d] += e * vv;
            vmax[(b * Hq + h) * T + j] = std::max(vmax[(b * Hq + h) * T + j], std::fabs(vv));
          }
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= l;
        double* wv = weighted_abs_v.data() + ((b * Hq + h) * T + j) * D;
        for (size_t i = 0; i < keys.size(); ++i) {
          const double w = std::exp(sc[i] - mx) / l;
          for (int64_t d = 0; d < D; ++d) {
            wv[d] += w * std::fabs(static_cast<double>(load(vp, c.dtype, ((b * Hkv + g) * S + keys[i]) * D + d)));
          }
        }
      }
    }
  }
  // Error of the CPU twin against float64, per output row, relative to the row's largest |v|.
  double cpu_err = 0, scale_max = 0;
  for (int64_t u : units) {
    const int64_t b = u / Hkv, g = u % Hkv;
    for (int64_t r = (b * Hq + g * G) * T; r < (b * Hq + (g + 1) * G) * T; ++r) {
      scale_max = std::max(scale_max, vmax[r]);
      for (int64_t d = 0; d < D; ++d) {
        const double want = ref[r * D + d], got = load(cpu_out.data(), c.dtype, r * D + d);
        if (!std::isnan(want)) cpu_err = std::max(cpu_err, std::fabs(got - want));
      }
    }
  }
  // The kernel's error is held to twice the CPU twin's (both float32 accumulations of the same
  // terms in other orders, the DESIGN's attention recipe), and above that floor to 2^-22 of |v|.
  // On tensor cores P is rounded to the inputs' type before P V (as FlashAttention does), each
  // weight by at most half an ulp relative (2^-8 for bfloat16, 2^-11 for float16): the output moves
  // by at most that times sum_i p_i |v_i,d| / l, which each element's bound adds.
  const double tol = 2 * cpu_err + scale_max * std::ldexp(1.0, -22);
  const double p_rounding = !plan.tensor_cores                 ? 0.0
                            : c.dtype == ScalarKind::kBFloat16 ? std::ldexp(1.0, -8)
                                                               : std::ldexp(1.0, -11);
  for_each_order(
      name,
      [&] {
        if (!c.only_units.empty()) run_only_units(c.only_units, B * Hkv);
        std::memset(out.p, 0xCD, B * Hq * T * D * es);
      },
      [&] { return torchspec::cuda::tree_attention(p, nullptr); },
      [&](Check& check) {
        double err = 0;
        for (int64_t u : units) {
          const int64_t b = u / Hkv, g = u % Hkv;
          for (int64_t r = (b * Hq + g * G) * T; r < (b * Hq + (g + 1) * G) * T; ++r) {
            for (int64_t d = 0; d < D; ++d) {
              const double want = ref[r * D + d];
              const float got = load(out.p, c.dtype, r * D + d), cpu = load(cpu_out.data(), c.dtype, r * D + d);
              if (std::isnan(want)) {
                check.expect(std::isnan(got) && std::isnan(cpu), "row %lld dim %lld: %g (CPU %g), float64 NaN",
                             (long long)r, (long long)d, got, cpu);
                continue;
              }
              err = std::max(err, std::fabs(got - want));
              const double bound = tol + p_rounding * weighted_abs_v[r * D + d];
              check.expect(
                  std::fabs(got - want) <= bound,
                  "row %lld (b %lld, head %lld, node %lld) dim %lld: %.9g, float64 %.9g, CPU %.9g (bound %.3g)",
                  (long long)r, (long long)(r / (Hq * T)), (long long)(r / T % Hq), (long long)(r % T), (long long)d,
                  got, want, cpu, bound);
            }
          }
        }
        (void)err;
      });
}

void tree_attention_family() {
  const ScalarKind f32 = ScalarKind::kFloat32, bf16 = ScalarKind::kBFloat16, f16 = ScalarKind::kFloat16;
  // The cases of test_tree.py's CUDA tests, then more tiles of nodes, long prefixes and D = 256.
  test_tree_attention({f32, 1, 1, 1, 1, 8, {0}, 0, AttnSpecial::kNone, {}, "(the root alone)"});
  test_tree_attention({f32, 2, 4, 2, 7, 33, {5, 19}, 3, AttnSpecial::kNone, {}, "(GQA, odd T and D)"});
  test_tree_attention({f32, 3, 8, 1, 13, 64, {40, 0, 17}, 0, AttnSpecial::kNone, {}, "(MQA, a row without prefix)"});
  test_tree_attention({f32, 2, 6, 3, 31, 128, {100, 37}, 11});
  test_tree_attention({f32, 1, 32, 8, 64, 128, {300}, 5, AttnSpecial::kNone, {}, "(the benchmark's heads)"});
  test_tree_attention({f32, 2, 16, 1, 9, 256, {20, 3}, 1, AttnSpecial::kNone, {}, "(G = 16, D = 256)"});
  test_tree_attention({f32, 1, 10, 2, 6, 250, {17}, 0, AttnSpecial::kNone, {}, "(D = 250, G = 5)"});
  test_tree_attention({f32, 2, 4, 2, 9, 24, {37, 1}, 0, AttnSpecial::kChain, {}, "(a chain: causal attention)"});
  test_tree_attention(
      {f32, 2, 4, 2, 5, 16, {40, 1}, 0, AttnSpecial::kInfKeyNegativeScore, {}, "(+inf keys scoring -inf)"});
  test_tree_attention({f32, 2, 4, 2, 5, 16, {7, 3}, 0, AttnSpecial::kAllNegInf, {}, "(every score -inf in even rows)"});
  test_tree_attention({f32, 2, 4, 2, 6, 16, {9, 0}, 1, AttnSpecial::kInfScore, {}, "(a +inf score)"});
  test_tree_attention({f32, 2, 8, 2, 100, 64, {70, 33}, 2, AttnSpecial::kNone, {}, "(T = 100)"});
  test_tree_attention({f32, 1, 16, 1, 37, 256, {600}, 0, AttnSpecial::kNone, {}, "(G = 16, D = 256, T = 37)"});
  test_tree_attention({f32, 2, 2, 2, 70, 96, {1030, 513}, 3, AttnSpecial::kNone, {}, "(G = 1, long prefix)"});
  for (ScalarKind dt : {bf16, f16}) {
    test_tree_attention({dt, 3, 8, 2, 21, 64, {150, 77, 0}, 2});
    test_tree_attention({dt, 2, 16, 1, 9, 256, {20, 3}, 1, AttnSpecial::kNone, {}, "(G = 16, D = 256)"});
    test_tree_attention({dt, 2, 4, 2, 5, 16, {40, 1}, 0, AttnSpecial::kInfKeyNegativeScore, {}, "(+inf keys)"});
  }
  // The GPU benchmark's shape: B 64, Hq 32, Hkv 8, T 64, a 4096-token prefix, D 128, bfloat16;
  // the first and the last (b, kv head) units.
  // clang-format off
  test_tree_attention({bf16, 64, 32, 8, 64, 128, std::vector<int64_t>(64, 4096), 0, AttnSpecial::kNone, {0, 511},
                       "(the GPU shape, first and last units)"});
  // clang-format on

  // ---- issue 31 ----
  // bfloat16 and float16 run on the tensor-core kernel (the emulated device is an sm_90): key
  // ranges merged by a second kernel (forced, on small cases: some ranges are empty for the short
  // rows), D not a multiple of 8 (no cp.async), T > 64 (two ancestor words per node), NaN rules.
  // clang-format off
  test_tree_attention({bf16, 3, 8, 2, 21, 64, {150, 77, 0}, 2, AttnSpecial::kNone, {}, "(key ranges)", false, 3});
  test_tree_attention({f16, 2, 6, 3, 31, 128, {300, 37}, 11, AttnSpecial::kNone, {}, "(key ranges)", false, 4});
  test_tree_attention({bf16, 2, 4, 2, 7, 33, {5, 19}, 3, AttnSpecial::kNone, {}, "(D = 33: no cp.async)", false, 2});
  test_tree_attention({bf16, 1, 10, 2, 6, 250, {17}, 0, AttnSpecial::kNone, {}, "(D = 250, G = 5)"});
  test_tree_attention({bf16, 2, 8, 2, 100, 64, {70, 33}, 2, AttnSpecial::kNone, {}, "(T = 100)", false, 2});
  test_tree_attention({bf16, 2, 4, 2, 9, 64, {60, 123}, 0, AttnSpecial::kNone, {}, "(a tile ending just past the prefix)"});
  test_tree_attention({f16, 2, 4, 2, 9, 24, {37, 1}, 0, AttnSpecial::kChain, {}, "(a chain)", false, 2});
  test_tree_attention({bf16, 2, 4, 2, 5, 16, {7, 3}, 0, AttnSpecial::kAllNegInf, {}, "(every score -inf in even rows)", false, 2});
  test_tree_attention({f16, 2, 4, 2, 6, 16, {9, 0}, 1, AttnSpecial::kInfScore, {}, "(a +inf score)", false, 2});
  // The shape: B 4, T 64, prefix 4096, Hq 9 / Hkv 3, D 64 bf16: 12 (row, kv head) units of
  // 3 blocks of rows, each split over the prefix (8 ranges: 288 blocks for 132 multiprocessors),
  // merged; the first and last units.
  test_tree_attention({bf16, 4, 9, 3, 64, 64, std::vector<int64_t>(4, 4096), 0, AttnSpecial::kNone, {0, 11},
                       "(the issue's shape, first and last units)"});
  // clang-format on
  // Hq 9 / Hkv 3, D 64 (the draft model's heads): G = 3, a tile of 21 nodes leaves a last one of one node.
  test_tree_attention({bf16, 2, 9, 3, 64, 64, {300, 77}, 0, AttnSpecial::kNone, {}, "(Hq 9 / Hkv 3, D 64)"});
  test_tree_attention({f32, 2, 9, 3, 22, 64, {41, 0}, 1, AttnSpecial::kNone, {}, "(Hq 9 / Hkv 3, T 22)"});
  // Past 2^31 elements: B 64, Hkv 8, S 32896 (a 32k context), D 128: k and v of unit 511 start
  // 2.15e9 elements in. Only that unit runs, over a prefix of 100; k and v share one reservation
  // (4.3 GB of address space, not committed), of which its 8 MB are written.
  // clang-format off
  test_tree_attention({bf16, 64, 32, 8, 64, 128, std::vector<int64_t>(64, 100), 32896 - 164, AttnSpecial::kNone,
                       {511}, "(past 2^31 elements: the last unit of a 32k context)", true});
  // The same past 2^31 on an sm_75 (64 KiB of shared memory), where bf16 runs on the CUDA-core kernel:
  // G = 1, D = 64, S 65728 (4.3 GB reserved).
  cudaSetDevice(cuemu::add_device(65536, 7));
  test_tree_attention({bf16, 64, 8, 8, 64, 64, std::vector<int64_t>(64, 100), 65728 - 164, AttnSpecial::kNone,
                       {511}, "(past 2^31 elements on an sm_75: the CUDA-core kernel)", true});
  cudaSetDevice(0);
  // clang-format on
}

// ---- tree verification ------------------------------------------------------------------------------

enum class VerifyMode { kGreedy, kGreedyArgmax, kSampling };
enum class TreeShape {
  kRandom,  // parents[j] uniform in [0, j)
  kChain,  // each node's token the argmax of its parent's logits: every node accepted (greedy), the worst case
  kStar,  // every node a child of the root: many rejections at one node (sampling)
};

struct VerifyCase {
  ScalarKind dtype;
  int64_t B, T, V;
  VerifyMode mode;
  float temperature = 1.0f;
  TreeShape shape = TreeShape::kRandom;
  bool special = false;  // NaN and ties (greedy) / zero-probability tokens (sampling)
  std::set<int64_t> only_rows;
  std::string label;
};

// The float64 walk of the sampling rules (csrc/cpu/tree.cpp): picks uniforms that are never within
// a relative 1e-3 of a decision's threshold, and a final draw at the middle of the most likely
// remaining token's share, so that float32 rounding cannot change a decision of either kernel.
void choose_uniforms(const VerifyCase& c, int64_t b, const void* logits, const std::vector<int64_t>& tokens,
                     const std::vector<int64_t>& parents, double* u, std::mt19937_64& gen) {
  const int64_t T = c.T, V = c.V;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int64_t j = 0; j < T; ++j) u[j] = unit(gen);
  int64_t cur = 0;
  std::vector<double> prob(V);
  while (true) {
    double mx = -INFINITY, total = 0;
    for (int64_t i = 0; i < V; ++i) mx = std::max<double>(mx, load(logits, c.dtype, (b * T + cur) * V + i));
    for (int64_t i = 0; i < V; ++i) {
      prob[i] =
          std::exp((load(logits, c.dtype, (b * T + cur) * V + i) - mx) * static_cast<double>(1.0f / c.temperature));
      total += prob[i];
    }
    for (double& x : prob) x /= total;
    double residual = 1;
    std::vector<int64_t> rejected;
    int64_t next = -1;
    for (int64_t ch = cur + 1; ch < T; ++ch) {
      if (parents[b * T + ch] != cur) continue;
      const int64_t t = tokens[b * T + ch];
      if (std::find(rejected.begin(), rejected.end(), t) != rejected.end()) continue;
      const double pt = prob[t];
      while (pt > 0 && std::fabs(u[ch] * residual - pt) < 1e-3 * std::max(pt, u[ch] * residual)) u[ch] = unit(gen);
      if (u[ch] * residual < pt) {
        next = ch;
        break;
      }
      residual -= pt;
      rejected.push_back(t);
    }
    if (next >= 0) {
      cur = next;
      continue;
    }
    int64_t best = -1;
    for (int64_t i = 0; i < V; ++i) {
      if (std::find(rejected.begin(), rejected.end(), i) == rejected.end() && (best < 0 || prob[i] > prob[best]))
        best = i;
    }
    double before = 0;
    for (int64_t i = 0; i < best; ++i) {
      if (std::find(rejected.begin(), rejected.end(), i) == rejected.end()) before += prob[i];
    }
    u[0] = std::min((before + prob[best] / 2) / residual, 1.0 - 1e-12);
    return;
  }
}

void test_verify(const VerifyCase& c) {
  const int64_t B = c.B, T = c.T, V = c.V;
  const char* mode = c.mode == VerifyMode::kGreedy         ? "greedy"
                     : c.mode == VerifyMode::kGreedyArgmax ? "greedy(argmax given)"
                                                           : "sampling";
  const std::string name = format("verify %s %s B=%lld T=%lld V=%lld T=%g %s", mode, dtype_name(c.dtype), (long long)B,
                                  (long long)T, (long long)V, c.temperature, c.label.c_str());
  if (!case_selected(name)) return;
  const size_t es = esize(c.dtype);
  Dev<char> logits(B * T * V * es);
  Dev<int64_t> tokens(B * T), parents(B * T), argmax(B * T), num(B), path(B * T), next(B);
  Dev<double> uniforms(B * T);
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < B; ++b) {
    if (c.only_rows.empty() || c.only_rows.count(b)) rows.push_back(b);
  }
  std::vector<int64_t> tok(B * T), par(B * T), am(B * T);
  for (int64_t b : rows) {
    std::mt19937 gen(static_cast<uint32_t>(b * 104729 + T * 31 + V));
    std::normal_distribution<float> normal(0.0f, 2.0f);
    for (int64_t j = 0; j < T; ++j) {
      par[b * T + j] = j == 0                         ? -1
                       : c.shape == TreeShape::kChain ? j - 1
                       : c.shape == TreeShape::kStar  ? 0
                                                      : static_cast<int64_t>(gen() % j);
      for (int64_t i = 0; i < V; ++i) {
        float x = normal(gen);
        if (c.special && c.mode != VerifyMode::kSampling) {
          if (j % 5 == 1 && i == V / 2) x = kNaN;
          if (j % 5 == 2 && (i == V / 3 || i == V / 2)) x = 100.0f;  // a tie: the lower id wins
        }
        if (c.special && c.mode == VerifyMode::kSampling && i % 3 == 1) x = -kInf;  // zero probability
        store(logits.p, c.dtype, (b * T + j) * V + i, x);
      }
      // torch.argmax's rule: the first NaN, else the first of the largest.
      int64_t best = 0;
      for (int64_t i = 1; i < V; ++i) {
        const float xb = load(logits.p, c.dtype, (b * T + j) * V + best),
                    xi = load(logits.p, c.dtype, (b * T + j) * V + i);
        if (std::isnan(xb)) break;
        if (std::isnan(xi) || xi > xb) best = i;
      }
      am[b * T + j] = best;
    }
    for (int64_t j = 0; j < T; ++j) {
      // A child's token is its parent's argmax half the time (the chain: always), else random.
      const bool argmax_token = c.shape == TreeShape::kChain || (c.shape == TreeShape::kRandom && gen() % 2 == 0);
      tok[b * T + j] = j > 0 && argmax_token ? am[b * T + par[b * T + j]] : static_cast<int64_t>(gen() % V);
    }
  }
  std::memcpy(tokens.p, tok.data(), tok.size() * 8);
  std::memcpy(parents.p, par.data(), par.size() * 8);
  std::memcpy(argmax.p, am.data(), am.size() * 8);
  if (c.mode == VerifyMode::kSampling) {
    std::mt19937_64 gen(static_cast<uint64_t>(T * 7 + V));
    for (int64_t b : rows) choose_uniforms(c, b, logits.p, tok, par, uniforms.p + b * T, gen);
  }
  torchspec::TreeVerifyParams p;
  p.tokens = tokens.p;
  p.parents = parents.p;
  p.logits = logits.p;
  p.dtype = c.dtype;
  p.argmax = c.mode == VerifyMode::kGreedyArgmax ? argmax.p : nullptr;
  p.uniforms = c.mode == VerifyMode::kSampling ? uniforms.p : nullptr;
  p.inv_temperature = 1.0f / c.temperature;
  p.batch = B;
  p.nodes = T;
  p.vocab = V;
  std::vector<int64_t> cn(B), cp(B * T), cx(B);
  torchspec::TreeVerifyParams pc = p;
  pc.num_accepted = cn.data();
  pc.path = cp.data();
  pc.next_token = cx.data();
  for (int64_t b : rows) torchspec::cpu::verify_tree_rows(pc, b, b + 1);
  p.num_accepted = num.p;
  p.path = path.p;
  p.next_token = next.p;
  for_each_order(
      name,
      [&] {
        if (!c.only_rows.empty()) run_only_units(c.only_rows, B);
        for (int64_t b : rows) {
          num[b] = next[b] = -77;
          for (int64_t j = 0; j < T; ++j) path[b * T + j] = -77;
        }
      },
      [&] { return torchspec::cuda::verify_tree(p, nullptr); },
      [&](Check& check) {
        for (int64_t b : rows) {
          check.expect(num[b] == cn[b] && next[b] == cx[b], "row %lld: accepted %lld, next %lld; CPU %lld, %lld",
                       (long long)b, (long long)num[b], (long long)next[b], (long long)cn[b], (long long)cx[b]);
          for (int64_t j = 0; j < T; ++j) {
            check.expect(path[b * T + j] == cp[b * T + j], "row %lld: path[%lld] = %lld, CPU %lld", (long long)b,
                         (long long)j, (long long)path[b * T + j], (long long)cp[b * T + j]);
          }
          if (c.shape == TreeShape::kChain && c.mode != VerifyMode::kSampling && !c.special) {
            check.expect(num[b] == T - 1, "row %lld: the chain of argmaxes was not fully accepted (%lld)", (long long)b,
                         (long long)num[b]);
          }
        }
      });
}

void verify_family() {
  for (ScalarKind dt : {ScalarKind::kFloat32, ScalarKind::kBFloat16, ScalarKind::kFloat16}) {
    for (VerifyMode m : {VerifyMode::kGreedy, VerifyMode::kSampling}) {
      test_verify({dt, 4, 6, 10, m});
      test_verify({dt, 3, 64, 1000, m, 0.7f});
      test_verify({dt, 2, 13, 50257, m, 1.7f, TreeShape::kRandom, false, {}, "(a vocabulary past 16-byte rows: odd)"});
      test_verify({dt, 2, 9, 4099, m, 1.0f, TreeShape::kChain, false, {}, "(a chain)"});
      test_verify({dt, 3, 64, 500, m, 1.3f, TreeShape::kStar, false, {}, "(a star: 63 children of the root)"});
      // clang-format off
      test_verify({dt, 3, 17, 777, m, 1.0f, TreeShape::kRandom, true, {},
                   m == VerifyMode::kSampling ? "(zero-probability tokens)" : "(NaN, ties)"});
      // clang-format on
    }
    test_verify({dt, 5, 40, 300, VerifyMode::kGreedyArgmax});
  }
  // clang-format off
  test_verify({ScalarKind::kFloat32, 1, 1, 1, VerifyMode::kGreedy, 1.0f, TreeShape::kRandom, false, {},
               "(the root alone, V = 1)"});
  test_verify({ScalarKind::kFloat32, 2, 3, 1, VerifyMode::kSampling, 1.0f, TreeShape::kRandom, false, {}, "(V = 1)"});
  // The GPU shape: B 64, T 64, V 152064, bfloat16, chains accepted to the end; the first and last rows.
  test_verify({ScalarKind::kBFloat16, 64, 64, 152064, VerifyMode::kGreedy, 1.0f, TreeShape::kChain, false, {0, 62, 63},
               "(the GPU shape, first and last rows)"});
  test_verify({ScalarKind::kBFloat16, 64, 64, 152064, VerifyMode::kSampling, 1.0f, TreeShape::kChain, false, {63},
               "(the GPU shape, last row)"});
  // clang-format on

  // ---- issue 31: offsets past 2^31 elements ----
  // B 224, T 64, V 152064 bf16: the last row's logits start 2.18e9 elements in (4.4 GB reserved,
  // not committed); its accepted chain reads all 64 of its rows (19 MB written).
  // clang-format off
  test_verify({ScalarKind::kBFloat16, 224, 64, 152064, VerifyMode::kGreedy, 1.0f, TreeShape::kChain, false, {223},
               "(past 2^31 elements, last row)"});
  // clang-format on
}

// ---- launchers: shared memory and errors --------------------------------------------------------

// A greedy verify_tree launch of one chain of T nodes over a vocabulary of 3 (all logits 0: the
// argmax is token 0, every draft token 1, so the walk stops at the root): its error code.
cudaError_t verify_chain(int64_t T) {
  Dev<float> logits(T * 3);
  Dev<int64_t> tokens(T), parents(T), num(1), path(T), next(1);
  for (int64_t j = 0; j < T; ++j) {
    parents[j] = j - 1;
    tokens[j] = 1;
  }
  torchspec::TreeVerifyParams p;
  p.tokens = tokens.p;
  p.parents = parents.p;
  p.logits = logits.p;
  p.batch = 1;
  p.nodes = T;
  p.vocab = 3;
  p.num_accepted = num.p;
  p.path = path.p;
  p.next_token = next.p;
  cuemu::options().run_block = nullptr;
  return torchspec::cuda::verify_tree(p, nullptr);
}

void expect_launch(const char* what, cudaError_t got, cudaError_t want) {
  if (got != want) {
    std::fprintf(stderr, "FAILED: launch: %s: the launcher returned \"%s\", want \"%s\"\n", what,
                 cudaGetErrorString(got), cudaGetErrorString(want));
    std::exit(1);
  }
  const cudaError_t left = cudaGetLastError();
  if (left != cudaSuccess) {
    std::fprintf(stderr,
                 "FAILED: launch: %s: \"%s\" is left in cudaGetLastError, where the next, unrelated launch "
                 "check would find it\n",
                 what, cudaGetErrorString(left));
    std::exit(1);
  }
}

// verify_tree keeps the tokens rejected at a node in 8 T bytes of dynamic shared memory, beside
// its static state (about 4 KiB): the launcher must count both against the 48 KiB a launch gets
// without the opt-in attribute, and fail cleanly past what the device allows.
void launch_family() {
  const ScalarKind f32 = ScalarKind::kFloat32;
  // The emulator learns a kernel's static shared memory when a block of it runs (a GPU knows it
  // from the compiler): each launcher runs once on a small case first.
  test_verify({f32, 2, 5, 7, VerifyMode::kGreedy});
  test_topk({f32, 2, 100, 10});
  test_tree_attention({f32, 1, 2, 1, 3, 8, {4}, 0});
  // Static + dynamic past 48 KiB while the dynamic part alone is not: T from 5602 to 6144.
  for (int64_t T : {5602, 6000, 6144}) {
    test_verify(
        {f32, 2, T, 5, VerifyMode::kSampling, 1.0f, TreeShape::kRandom, false, {}, "(static + dynamic over 48 KiB)"});
    test_verify(
        {f32, 2, T, 5, VerifyMode::kGreedy, 1.0f, TreeShape::kRandom, false, {}, "(static + dynamic over 48 KiB)"});
  }
  // Past the opt-in limit (an H200's 227 KiB) the attribute cannot be set: the launcher fails, and
  // the next, unrelated launch must not see its error.
  expect_launch("verify_tree, T = 29000", verify_chain(29000), cudaErrorInvalidValue);
  test_topk({f32, 3, 700, 7, Fill::kNormal, 1.0f, 0, 0, 0, {}, "(the launch after a failed one)"});

  // The limit the ops check before launching (a clear error instead of a failed launch) is exact:
  // the largest tree it allows launches, one node more does not.
  torchspec::TreeVerifyParams vp;
  size_t needed = 0, allowed = 0;
  vp.nodes = 1;
  expect_launch("verify_tree_smem", torchspec::cuda::verify_tree_smem(vp, &needed, &allowed), cudaSuccess);
  const int64_t static_bytes = static_cast<int64_t>(needed) - 8;
  const int64_t max_nodes = (static_cast<int64_t>(allowed) - static_bytes) / 8;
  if (allowed != 232448 || static_bytes < 4096 || static_bytes > 8192) {
    std::fprintf(stderr, "FAILED: launch: verify_tree_smem says %zu bytes allowed, %lld static\n", allowed,
                 (long long)static_bytes);
    std::exit(1);
  }
  vp.nodes = max_nodes + 1;
  expect_launch("verify_tree_smem", torchspec::cuda::verify_tree_smem(vp, &needed, &allowed), cudaSuccess);
  if (needed <= allowed) {
    std::fprintf(stderr, "FAILED: launch: verify_tree_smem allows T = %lld\n", (long long)vp.nodes);
    std::exit(1);
  }
  expect_launch("verify_tree at the largest T verify_tree_smem allows", verify_chain(max_nodes), cudaSuccess);
  expect_launch("verify_tree one node past it", verify_chain(max_nodes + 1), cudaErrorInvalidValue);

  // ---- issue 31: two host threads on one device launching two shared-memory sizes ----
  // Another thread's launcher runs between this launcher's attribute set-up and its launch
  // (before_launch), on a device where neither ran before. Set to each call's own size, the
  // attribute was lowered by the smaller launch below this one's need: "invalid argument".
  cudaSetDevice(cuemu::add_device(232448));
  cuemu::options().before_launch = [] {
    expect_launch("another thread's verify_tree, T = 5700", verify_chain(5700), cudaSuccess);
  };
  expect_launch("verify_tree, T = 6000, with another thread's smaller launch in between", verify_chain(6000),
                cudaSuccess);
  cudaSetDevice(0);
  std::printf("launch: verify_tree takes up to %lld nodes (%lld bytes of static shared memory)\n", (long long)max_nodes,
              (long long)static_bytes);

  // tree_attention at D = 256, G = 16 on a device whose blocks opt in to less shared memory than it
  // needs, then on one with exactly enough.
  const AttnCase big_heads{
      f32, 2, 16, 1, 9, 256, {20, 3}, 1, AttnSpecial::kNone, {}, "(on a device with just enough shared memory)"};
  torchspec::TreeAttentionParams ap;
  ap.dtype = f32;
  ap.q_heads = 16;
  ap.kv_heads = 1;
  ap.nodes = 9;
  ap.head_dim = 256;
  expect_launch("tree_attention_smem", torchspec::cuda::tree_attention_smem(ap, &needed, &allowed), cudaSuccess);
  cudaSetDevice(cuemu::add_device(static_cast<int>(needed) - 1));
  {
    Dev<float> q(2 * 16 * 9 * 256), kv(2 * 32 * 256), out(2 * 16 * 9 * 256);
    Dev<int64_t> lens(2), parents(2 * 9);
    for (int64_t b = 0; b < 2; ++b) {
      lens[b] = 3;
      for (int64_t j = 0; j < 9; ++j) parents[b * 9 + j] = j - 1;
    }
    torchspec::TreeAttentionParams p = ap;
    p.batch = 2;
    p.seq = 32;
    p.q = q.p;
    p.k = p.v = kv.p;
    p.out = out.p;
    p.prefix_lens = lens.p;
    p.parents = parents.p;
    expect_launch("tree_attention D = 256 with one byte of shared memory too few",
                  torchspec::cuda::tree_attention(p, nullptr), cudaErrorInvalidValue);
  }
  cudaSetDevice(cuemu::add_device(static_cast<int>(needed)));
  test_tree_attention(big_heads);
  cudaSetDevice(0);
}

// ---- issue 31: inputs the CUDA kernels check on the device ------------------------------------------

void reset_error_record(torchspec::DeviceErrorRecord* r);

// A device error record as the op layer makes it: mapped pinned host memory, zeroed, generation 1,
// its claim word in device memory.
torchspec::DeviceErrorRecord* new_error_record() {
  void* host = nullptr;
  void* dev = nullptr;
  void* claim = nullptr;
  if (cudaHostAlloc(&host, sizeof(torchspec::DeviceErrorRecord), cudaHostAllocMapped) != cudaSuccess ||
      cudaHostGetDevicePointer(&dev, host, 0) != cudaSuccess || cudaMalloc(&claim, 8) != cudaSuccess) {
    std::fprintf(stderr, "cudaHostAlloc failed\n");
    std::exit(1);
  }
  std::memset(host, 0, sizeof(torchspec::DeviceErrorRecord));
  auto* r = static_cast<torchspec::DeviceErrorRecord*>(dev);
  r->claim = static_cast<unsigned long long*>(claim);
  reset_error_record(r);
  return r;
}

void reset_error_record(torchspec::DeviceErrorRecord* r) {
  unsigned long long* claim = r->claim;
  std::memset(r, 0, sizeof(*r));
  r->claim = claim;
  *claim = 0;
  r->generation = 1;
}

void expect_record(Check& check, const torchspec::DeviceErrorRecord* r, torchspec::DeviceErrorKind kind,
                   torchspec::DeviceErrorOp op, int64_t row, int64_t index, int64_t value) {
  check.expect(*r->claim == 1 && r->kind == static_cast<int32_t>(kind) && r->op == static_cast<int32_t>(op) &&
                   r->row == row && r->index == index && r->value == value,
               "device error record: claim %llu kind %d op %d row %lld index %lld value %lld; want kind %d op %d "
               "row %lld index %lld value %lld",
               (unsigned long long)*r->claim, r->kind, r->op, (long long)r->row, (long long)r->index,
               (long long)r->value, static_cast<int>(kind), static_cast<int>(op), (long long)row, (long long)index,
               (long long)value);
}

// tree_attention with one bad batch row (a parent after its node, a node its own parent, a prefix
// past S - T, no root): that row's outputs NaN, the others the CPU twin's (float32 rounding apart).
void check_attention_inputs(const char* what, int64_t bad_row, torchspec::DeviceErrorKind kind, int64_t index,
                            int64_t value, const std::function<void(int64_t*, int64_t*)>& spoil) {
  const int64_t B = 3, Hq = 4, Hkv = 2, T = 7, D = 16, S = 18;
  const int64_t good_parents[] = {-1, 0, 0, 1, 1, 3, 2};
  Dev<float> q(B * Hq * T * D), k(B * Hkv * S * D), v(B * Hkv * S * D), out(B * Hq * T * D);
  Dev<int64_t> lens(B), parents(B * T);
  std::mt19937 gen(17);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < B * Hq * T * D; ++i) q[i] = normal(gen);
  for (int64_t i = 0; i < B * Hkv * S * D; ++i) k[i] = normal(gen), v[i] = normal(gen);
  for (int64_t b = 0; b < B; ++b) {
    lens[b] = 3 + 4 * b;
    for (int64_t j = 0; j < T; ++j) parents[b * T + j] = good_parents[j];
  }
  torchspec::TreeAttentionParams p;
  p.q = q.p;
  p.k = k.p;
  p.v = v.p;
  p.out = out.p;
  p.prefix_lens = lens.p;
  p.parents = parents.p;
  p.batch = B;
  p.q_heads = Hq;
  p.kv_heads = Hkv;
  p.nodes = T;
  p.seq = S;
  p.head_dim = D;
  p.scale = 0.25f;
  std::vector<float> cpu(B * Hq * T * D);
  torchspec::TreeAttentionParams pc = p;
  pc.out = cpu.data();
  torchspec::cpu::tree_attention_units(pc, 0, B * Hkv);  // the valid inputs
  spoil(parents.p, lens.p);
  p.error = new_error_record();
  for_each_order(
      format("checks: tree_attention, %s", what),
      [&] {
        reset_error_record(p.error);
        std::memset(out.p, 0xCD, B * Hq * T * D * 4);
      },
      [&] { return torchspec::cuda::tree_attention(p, nullptr); },
      [&](Check& check) {
        for (int64_t i = 0; i < B * Hq * T * D; ++i) {
          const int64_t b = i / (Hq * T * D);
          if (b == bad_row) {
            check.expect(std::isnan(out[i]), "batch row %lld (bad): element %lld is %g, not NaN", (long long)b,
                         (long long)i, out[i]);
          } else {
            check.expect(std::fabs(out[i] - cpu[i]) <= 1e-5f, "batch row %lld: element %lld is %.9g, CPU %.9g",
                         (long long)b, (long long)i, out[i], cpu[i]);
          }
        }
        expect_record(check, p.error, kind, torchspec::DeviceErrorOp::kTreeAttention, bad_row, index, value);
      });
}

// verify_tree (greedy or sampling) with one bad batch row: its outputs -1, the other row the CPU twin's.
void check_verify_inputs(const char* what, bool sampling, int64_t bad_row, torchspec::DeviceErrorKind kind,
                         int64_t index, int64_t value, const std::function<void(int64_t*, int64_t*, double*)>& spoil) {
  const int64_t B = 2, T = 5, V = 9;
  const int64_t good_parents[] = {-1, 0, 0, 1, 2};
  Dev<float> logits(B * T * V);
  Dev<int64_t> tokens(B * T), parents(B * T), num(B), path(B * T), next(B);
  Dev<double> u(B * T);
  std::mt19937 gen(23);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < B * T * V; ++i) logits[i] = normal(gen);
  for (int64_t i = 0; i < B * T; ++i) {
    parents[i] = good_parents[i % T];
    tokens[i] = static_cast<int64_t>(gen() % V);
    u[i] = 0.25 + 0.5 * static_cast<double>(gen() % 1000) / 1000.0;
  }
  torchspec::TreeVerifyParams p;
  p.tokens = tokens.p;
  p.parents = parents.p;
  p.logits = logits.p;
  p.uniforms = sampling ? u.p : nullptr;
  p.batch = B;
  p.nodes = T;
  p.vocab = V;
  std::vector<int64_t> cn(B), cp(B * T), cx(B);
  torchspec::TreeVerifyParams pc = p;
  pc.num_accepted = cn.data();
  pc.path = cp.data();
  pc.next_token = cx.data();
  torchspec::cpu::verify_tree_rows(pc, 0, B);  // the valid inputs
  spoil(tokens.p, parents.p, u.p);
  p.num_accepted = num.p;
  p.path = path.p;
  p.next_token = next.p;
  p.error = new_error_record();
  for_each_order(
      format("checks: verify_tree %s, %s", sampling ? "sampling" : "greedy", what),
      [&] {
        reset_error_record(p.error);
        for (int64_t i = 0; i < B * T; ++i) path[i] = -77;
        num[0] = num[1] = next[0] = next[1] = -77;
      },
      [&] { return torchspec::cuda::verify_tree(p, nullptr); },
      [&](Check& check) {
        for (int64_t b = 0; b < B; ++b) {
          const bool bad = b == bad_row;
          check.expect(num[b] == (bad ? -1 : cn[b]) && next[b] == (bad ? -1 : cx[b]),
                       "row %lld: accepted %lld, next %lld; want %lld, %lld", (long long)b, (long long)num[b],
                       (long long)next[b], (long long)(bad ? -1 : cn[b]), (long long)(bad ? -1 : cx[b]));
          for (int64_t j = 0; j < T; ++j) {
            const int64_t want = bad ? -1 : cp[b * T + j];
            check.expect(path[b * T + j] == want, "row %lld: path[%lld] = %lld, want %lld", (long long)b, (long long)j,
                         (long long)path[b * T + j], (long long)want);
          }
        }
        expect_record(check, p.error, kind, torchspec::DeviceErrorOp::kVerifyTree, bad_row, index, value);
      });
}

void checks_family() {
  using K = torchspec::DeviceErrorKind;
  check_attention_inputs("a parent after its node", 1, K::kTreeParent, 4, 6,
                         [](int64_t* par, int64_t*) { par[7 + 4] = 6; });
  check_attention_inputs("a node its own parent (a cycle)", 2, K::kTreeParent, 3, 3,
                         [](int64_t* par, int64_t*) { par[14 + 3] = 3; });
  check_attention_inputs("no root", 0, K::kTreeRoot, 0, 2, [](int64_t* par, int64_t*) { par[0] = 2; });
  check_attention_inputs("a prefix past S - T", 2, K::kPrefixLength, 0, 12,
                         [](int64_t*, int64_t* lens) { lens[2] = 12; });
  check_attention_inputs("a negative prefix", 1, K::kPrefixLength, 0, -1,
                         [](int64_t*, int64_t* lens) { lens[1] = -1; });
  for (bool sampling : {false, true}) {
    check_verify_inputs("a token past the vocabulary", sampling, 1, K::kTokenId, 2, 9,
                        [](int64_t* tok, int64_t*, double*) { tok[5 + 2] = 9; });
    check_verify_inputs("a second root", sampling, 0, K::kTreeParent, 3, -1,
                        [](int64_t*, int64_t* par, double*) { par[3] = -1; });
  }
  double nan = std::numeric_limits<double>::quiet_NaN();
  int64_t nan_bits;
  std::memcpy(&nan_bits, &nan, 8);
  check_verify_inputs("a NaN uniform", true, 0, K::kUniform, 3, nan_bits,
                      [nan](int64_t*, int64_t*, double* u) { u[3] = nan; });

  // The index check of the draft loss's teacher ids: one id past the limit.
  const int64_t rows = 700, k = 5;
  Dev<int64_t> ids(rows * k);
  for (int64_t i = 0; i < rows * k; ++i) ids[i] = static_cast<int64_t>(i % 31) - 1;
  ids[611 * k + 3] = 30;
  torchspec::DeviceErrorRecord* rec = new_error_record();
  for_each_order(
      "checks: index range [-1, 30), one id of 3500 past it", [&] { reset_error_record(rec); },
      [&] {
        return torchspec::cuda::check_index_range(ids.p, rows * k, k, -1, 30, torchspec::DeviceErrorOp::kDraftLoss, rec,
                                                  nullptr);
      },
      [&](Check& check) {
        expect_record(check, rec, K::kIndexRange, torchspec::DeviceErrorOp::kDraftLoss, 611, 3, 30);
      });

  // The LK losses' bound on each counted row's log-sum-exp: -inf (uncounted rows), NaN and values
  // at the bound pass, one row of 1500 just above it does not.
  const int64_t n = 1500;
  const float bound = 1e-2f;
  Dev<float> lse(n);
  for (int64_t i = 0; i < n; ++i) {
    lse[i] = i % 7 == 0    ? -std::numeric_limits<float>::infinity()
             : i % 11 == 0 ? std::numeric_limits<float>::quiet_NaN()
             : i % 13 == 0 ? bound
                           : -0.001f * static_cast<float>(i % 97);
  }
  lse[1207] = std::nextafter(bound, 1.0f);
  for_each_order(
      "checks: at most 0.01, one value of 1500 just above", [&] { reset_error_record(rec); },
      [&] {
        return torchspec::cuda::check_at_most(lse.p, n, bound, torchspec::DeviceErrorOp::kDraftLoss, rec, nullptr);
      },
      [&](Check& check) {
        expect_record(check, rec, K::kAtMost, torchspec::DeviceErrorOp::kDraftLoss, 1207, 0,
                      __double_as_longlong(std::nextafter(bound, 1.0f)));
        check.expect(rec->limit == __double_as_longlong(bound), "device error record: the limit's bits %lld",
                     (long long)rec->limit);
      });
}

// ---- self-tests: kernels with known bugs, each of which the emulator must report ------------------

__global__ void st_deadlock(float* out) {
  float v = 1.0f;
  if ((threadIdx.x & 31) == 5) {
    __syncthreads();  // lane 5 at a barrier while the other lanes wait for it in the shuffle
  } else {
    v = __shfl_sync(0xFFFFFFFFu, v, 0);
  }
  out[threadIdx.x] = v;
}
__global__ void st_divergent_barrier(float* out) {
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
__global__ void st_divergent_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);  // half the warp skips it
  v = __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  out[threadIdx.x] = v;
}
__global__ void st_exited_lane(float* out) {
  if ((threadIdx.x & 31) == 3) return;
  out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1.0f, 0);
}
__global__ void st_shuffle_outside_mask(float* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_sync(0x0000FFFFu, 1.0f, 20);
}
__global__ void st_shared_overflow(float* out) {
  TORCHSPEC_EXTERN_SHARED(float, s);  // 1024 bytes asked: 256 floats
  s[threadIdx.x + 1] = 2.0f;  // thread 255 writes s[256], one past the end
  out[threadIdx.x] = s[threadIdx.x];
}
__global__ void st_shared_slack(float* out) {
  TORCHSPEC_EXTERN_SHARED(float, s);  // 1000 bytes asked: s[250] is past the end, before the guard page
  if (threadIdx.x == 0) s[250] = 1.0f;
  out[threadIdx.x] = 0.0f;
}
__global__ void st_misaligned_load(const float* in, float* out) {
  const uint4 x = __ldcs(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = static_cast<float>(x.x);
}
__global__ void st_global_overflow(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }
__global__ void st_endless_loop(const int64_t* parents, float* out) {
  int64_t a = 2;  // 2 -> 1 -> 2 ...: a cycle, never the root (volatile: the loop has an effect)
  while (a >= 0) a = *static_cast<const volatile int64_t*>(parents + a);
  out[threadIdx.x] = static_cast<float>(a);
}
__global__ void st_uninitialised_shared(float* out) {
  TORCHSPEC_SHARED(float, total);
  __syncthreads();
  out[threadIdx.x] = total;  // never written: the poison
}

int selftest(const std::string& name) {
  cuemu::options().context = "selftest " + name;
  Dev<float> in(256), out(256);
  for (int i = 0; i < 256; ++i) in[i] = 1.0f;
  const dim3 grid(1);
  if (name == "deadlock") TORCHSPEC_LAUNCH(st_deadlock, grid, 64, 0, nullptr)(out.p);
  else if (name == "divergent_barrier") TORCHSPEC_LAUNCH(st_divergent_barrier, grid, 64, 0, nullptr)(out.p);
  else if (name == "divergent_shuffle") TORCHSPEC_LAUNCH(st_divergent_shuffle, grid, 64, 0, nullptr)(out.p);
  else if (name == "exited_lane") TORCHSPEC_LAUNCH(st_exited_lane, grid, 32, 0, nullptr)(out.p);
  else if (name == "shuffle_outside_mask") TORCHSPEC_LAUNCH(st_shuffle_outside_mask, grid, 32, 0, nullptr)(out.p);
  else if (name == "shared_overflow") TORCHSPEC_LAUNCH(st_shared_overflow, grid, 256, 1024, nullptr)(out.p);
  else if (name == "shared_slack") TORCHSPEC_LAUNCH(st_shared_slack, grid, 32, 1000, nullptr)(out.p);
  else if (name == "misaligned_load") TORCHSPEC_LAUNCH(st_misaligned_load, grid, 32, 0, nullptr)(in.p, out.p);
  else if (name == "global_overflow") TORCHSPEC_LAUNCH(st_global_overflow, grid, 256, 0, nullptr)(in.p, out.p);
  else if (name == "endless_loop") {
    Dev<int64_t> cycle(3);
    cycle[0] = -1;
    cycle[1] = 2;
    cycle[2] = 1;
    cuemu::options().launch_cpu_limit_s = 1.0;
    TORCHSPEC_LAUNCH(st_endless_loop, grid, 32, 0, nullptr)(cycle.p, out.p);
  } else if (name == "uninitialised_shared") {
    TORCHSPEC_LAUNCH(st_uninitialised_shared, grid, 32, 0, nullptr)(out.p);
    // Not a fault: the value read is the poison, which a comparison catches.
    std::printf("read %08x\n", __float_as_uint(out[0]));
    return __float_as_uint(out[0]) == 0xFFFFFFFFu ? 0 : 1;
  } else {
    std::fprintf(stderr, "unknown selftest %s\n", name.c_str());
    return 2;
  }
  std::fprintf(stderr, "selftest %s: the emulator reported nothing (error %s)\n", name.c_str(),
               cudaGetErrorString(cudaGetLastError()));
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cuemu::detail::emu();  // installs the fault handlers
  std::vector<std::string> families;
  for (int i = 1; i < argc; ++i) families.push_back(argv[i]);
  if (!families.empty() && families[0] == "selftest") {
    if (families.size() != 2) return 2;
    return selftest(families[1]);
  }
  // clang-format off
  const std::vector<std::pair<std::string, void (*)()>> all = {
      {"topk", topk_family},
      {"draft_loss", draft_loss_family},
      {"tree_attention", tree_attention_family},
      {"verify", verify_family},
      {"launch", launch_family},
      {"checks", checks_family},
  };
  // clang-format on
  if (families.empty()) {
    for (const auto& [name, fn] : all) families.push_back(name);
  }
  for (const std::string& f : families) {
    auto it = std::find_if(all.begin(), all.end(), [&](const auto& e) { return e.first == f; });
    if (it == all.end()) {
      std::fprintf(stderr, "unknown family %s (topk draft_loss tree_attention verify launch checks)\n", f.c_str());
      return 2;
    }
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    const int cases0 = g_cases, runs0 = g_runs;
    const cuemu::Stats s0 = cuemu::stats();
    it->second();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    const cuemu::Stats& s = cuemu::stats();
    const size_t orders = std::count_if(std::begin(kOrders), std::end(kOrders), order_enabled);
    std::printf(
        "%s: %d cases x %zu thread orders = %d runs passed (%llu launches, %llu blocks, %llu threads, "
        "%llu rendezvous) in %.1f s (%.1f s of CPU)\n",
        f.c_str(), g_cases - cases0, orders, g_runs - runs0, (unsigned long long)(s.launches - s0.launches),
        (unsigned long long)(s.blocks - s0.blocks), (unsigned long long)(s.threads - s0.threads),
        (unsigned long long)(s.rendezvous - s0.rendezvous), secs, cpu);
  }
  return 0;
}
