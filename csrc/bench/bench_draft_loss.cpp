// Microbenchmarks of the draft_topk_kl tile kernels, called directly (no torch), on one float32
// logits tile of the size the op uses (CPU: 2048 x 2048, CUDA: 4096 x 2048) with k = 64 teacher
// entries per row; and of the LK rows kernel (lk_alpha / lk_lambda statistics and coefficients of
// as many rows, k = 64), which the LK losses add to the tiles: per row it reads 3k floats and writes
// k, next to a tile row's 2048 (forward) or 4096 (backward). Only our kernels are timed: the op's GEMMs (hidden @
// weight_chunk.T and the two gradient GEMMs) are torch's and are covered by `python -m torchspec_ext.bench draft_loss`.
// CPU: the row-range kernels on std::threads (--threads=N, else $TORCHSPEC_BENCH_THREADS, else
// hardware_concurrency). CUDA (when built with it and a GPU is present): timed with CUDA events.
// Bytes processed = the tile's bytes read (forward) or read and written (backward).
//
// The backward kernel overwrites its tile; it is timed on whatever the tile holds (its cost does
// not depend on the values), so every iteration does the same work as the first.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/draft_loss.h"
#include "cpu/cpu_kernels.h"
#if defined(TORCHSPEC_WITH_CUDA)
#include "kernels/cuda_kernels.h"
#endif

namespace {

using torchspec::DraftLossBackwardTile;
using torchspec::DraftLossForwardTile;
using torchspec::DraftLossKind;
using torchspec::DraftLossLKRows;

constexpr int kTeacherK = 64;

// Host data of one tile: logits, teacher ids (some in the tile's columns) and weights, state.
struct HostTile {
  int64_t rows = 0, cols = 0;
  std::vector<float> logits, weights, coef, run_max, run_sum, argmax_value, dot, lse, row_scale;
  std::vector<int64_t> indices, argmax_index;

  HostTile(int64_t r, int64_t c) : rows(r), cols(c) {
    std::mt19937 gen(12345);
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int64_t> id(-1, 4 * c);  // about a quarter fall in this tile
    logits.resize(r * c);
    for (float& x : logits) x = normal(gen);
    indices.resize(r * kTeacherK);
    for (int64_t& i : indices) i = id(gen);
    weights.assign(r * kTeacherK, 1.0f / kTeacherK);
    coef.assign(r * kTeacherK, 1e-4f / kTeacherK);
    lse.assign(r, 9.0f);
    row_scale.assign(r, 1e-4f);
    reset_state();
  }
  void reset_state() {
    run_max.assign(rows, -std::numeric_limits<float>::infinity());
    run_sum.assign(rows, 0.0f);
    argmax_value.assign(rows, -std::numeric_limits<float>::infinity());
    argmax_index.assign(rows, 0);
    dot.assign(rows, 0.0f);
  }
  int64_t bytes() const { return rows * cols * static_cast<int64_t>(sizeof(float)); }
};

// Pointers of the parameter structs into `t`'s arrays, or into device copies of them (CUDA).
struct TilePointers {
  float *logits, *weights, *coef, *run_max, *run_sum, *argmax_value, *dot, *lse, *row_scale;
  int64_t *indices, *argmax_index;
};

TilePointers host_pointers(HostTile& t) {
  return {t.logits.data(),    t.weights.data(),      t.coef.data(),        t.run_max.data(),
          t.run_sum.data(),   t.argmax_value.data(), t.dot.data(),         t.lse.data(),
          t.row_scale.data(), t.indices.data(),      t.argmax_index.data()};
}

// The tile's columns are ids [cols, 2 cols).
torchspec::DraftLossTile geometry(const HostTile& t, const TilePointers& p) {
  torchspec::DraftLossTile g;
  g.rows = t.rows;
  g.cols = t.cols;
  g.ld = t.cols;
  g.col_offset = t.cols;
  g.target_indices = p.indices;
  g.k = kTeacherK;
  return g;
}

DraftLossForwardTile forward_params(const HostTile& t, const TilePointers& p) {
  DraftLossForwardTile f;
  static_cast<torchspec::DraftLossTile&>(f) = geometry(t, p);
  f.logits = p.logits;
  f.target_weights = p.weights;
  f.run_max = p.run_max;
  f.run_sum = p.run_sum;
  f.argmax_value = p.argmax_value;
  f.argmax_index = p.argmax_index;
  f.target_dot = p.dot;
  f.out_lse = p.lse;
  return f;
}

DraftLossBackwardTile backward_params(const HostTile& t, const TilePointers& p) {
  DraftLossBackwardTile b;
  static_cast<torchspec::DraftLossTile&>(b) = geometry(t, p);
  b.logits = p.logits;
  b.target_coef = p.coef;
  b.lse = p.lse;
  b.row_scale = p.row_scale;
  return b;
}

// Host data of the LK rows kernel: the draft's log-probabilities at k teacher ids (their mass about
// a half), the teacher's probabilities there (a few absent), tails, KL weights; outputs.
struct HostLKRows {
  int64_t rows = 0;
  std::vector<float> log_q, prob, tail, kl_weights, grad_scale, lambda_weight, accept, neg_log_accept, row_scale, coef;

  explicit HostLKRows(int64_t r) : rows(r) {
    std::mt19937 gen(777);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    const size_t n = static_cast<size_t>(r) * kTeacherK;
    log_q.resize(n);
    prob.resize(n);
    for (size_t i = 0; i < n; ++i) {
      log_q[i] = std::log(unit(gen) / kTeacherK + 1e-9f);
      prob[i] = unit(gen) < 0.1f ? -1.0f : unit(gen) / kTeacherK;
    }
    tail.assign(r, 0.3f);
    kl_weights.assign(n, 1.0f / kTeacherK);
    grad_scale.assign(r, 1e-4f);
    lambda_weight.assign(1, 0.6f);
    accept.resize(r);
    neg_log_accept.resize(r);
    row_scale.resize(r);
    coef.resize(n);
  }
  int64_t bytes() const { return rows * kTeacherK * 4 * static_cast<int64_t>(sizeof(float)); }
};

DraftLossLKRows lk_params(HostLKRows& h, DraftLossKind kind, float* const* ptrs) {
  // ptrs: log_q, prob, tail, kl_weights, grad_scale, lambda_weight, accept, neg_log_accept, row_scale, coef
  DraftLossLKRows p;
  p.rows = h.rows;
  p.k = kTeacherK;
  p.kind = kind;
  p.draft_logprobs = ptrs[0];
  p.accept_prob = ptrs[1];
  p.tail = ptrs[2];
  p.kl_weights = ptrs[3];
  p.grad_scale = ptrs[4];
  p.lambda_weight = ptrs[5];
  p.accept = ptrs[6];
  p.neg_log_accept = ptrs[7];
  p.row_scale = ptrs[8];
  p.coef = ptrs[9];
  return p;
}

std::string bench_name(const char* device, const char* pass, int64_t rows, int64_t cols) {
  return std::string(device) + "_draft_loss_" + pass + "/rows=" + std::to_string(rows) +
         "/cols=" + std::to_string(cols) + "/k=" + std::to_string(kTeacherK);
}

void bm_cpu_forward(benchmark::State& state, int64_t rows, int64_t cols, int threads) {
  HostTile t(rows, cols);
  const DraftLossForwardTile f = forward_params(t, host_pointers(t));
  for (auto _ : state) {
    state.PauseTiming();
    t.reset_state();  // same buffers: the pointers in f stay valid
    state.ResumeTiming();
    bench::parallel_rows(rows, threads,
                         [&](int64_t b, int64_t e) { torchspec::cpu::draft_loss_forward_rows(f, b, e); });
  }
  state.SetBytesProcessed(state.iterations() * t.bytes());
  state.counters["threads"] = threads;
}

void bm_cpu_backward(benchmark::State& state, int64_t rows, int64_t cols, int threads) {
  HostTile t(rows, cols);
  const DraftLossBackwardTile b = backward_params(t, host_pointers(t));
  for (auto _ : state) {
    bench::parallel_rows(rows, threads,
                         [&](int64_t lo, int64_t hi) { torchspec::cpu::draft_loss_backward_rows(b, lo, hi); });
  }
  state.SetBytesProcessed(state.iterations() * 2 * t.bytes());
  state.counters["threads"] = threads;
}

void bm_cpu_lk_rows(benchmark::State& state, int64_t rows, DraftLossKind kind, int threads) {
  HostLKRows h(rows);
  float* const ptrs[] = {h.log_q.data(),      h.prob.data(),          h.tail.data(),   h.kl_weights.data(),
                         h.grad_scale.data(), h.lambda_weight.data(), h.accept.data(), h.neg_log_accept.data(),
                         h.row_scale.data(),  h.coef.data()};
  const DraftLossLKRows p = lk_params(h, kind, ptrs);
  for (auto _ : state) {
    bench::parallel_rows(rows, threads, [&](int64_t b, int64_t e) { torchspec::cpu::draft_loss_lk_rows(p, b, e); });
  }
  state.SetBytesProcessed(state.iterations() * h.bytes());
  state.counters["threads"] = threads;
}

#if defined(TORCHSPEC_WITH_CUDA)
template <class T>
T* device_copy(const std::vector<T>& host, std::vector<void*>& owned) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d), host.size() * sizeof(T)));
  owned.push_back(d);
  CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Both CUDA kernels on one device copy of a tile, each launch timed with CUDA events.
void bm_cuda(benchmark::State& state, int64_t rows, int64_t cols, bool backward) {
  std::vector<void*> owned;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  try {
    HostTile t(rows, cols);
    const TilePointers p{
        device_copy(t.logits, owned),  device_copy(t.weights, owned),     device_copy(t.coef, owned),
        device_copy(t.run_max, owned), device_copy(t.run_sum, owned),     device_copy(t.argmax_value, owned),
        device_copy(t.dot, owned),     device_copy(t.lse, owned),         device_copy(t.row_scale, owned),
        device_copy(t.indices, owned), device_copy(t.argmax_index, owned)};
    const DraftLossForwardTile f = forward_params(t, p);
    const DraftLossBackwardTile b = backward_params(t, p);
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    bench::time_launches(state, stream, start, stop, [&] {
      return backward ? torchspec::cuda::draft_loss_backward(b, stream)
                      : torchspec::cuda::draft_loss_forward(f, stream);
    });
    state.SetBytesProcessed(state.iterations() * (backward ? 2 : 1) * t.bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  for (void* d : owned) bench::check_at_exit(cudaFree(d), "cudaFree", "bench_draft_loss");
  if (start != nullptr) bench::check_at_exit(cudaEventDestroy(start), "cudaEventDestroy", "bench_draft_loss");
  if (stop != nullptr) bench::check_at_exit(cudaEventDestroy(stop), "cudaEventDestroy", "bench_draft_loss");
  if (stream != nullptr) bench::check_at_exit(cudaStreamDestroy(stream), "cudaStreamDestroy", "bench_draft_loss");
}

void bm_cuda_lk_rows(benchmark::State& state, int64_t rows, DraftLossKind kind) {
  std::vector<void*> owned;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  try {
    HostLKRows h(rows);
    float* const ptrs[] = {device_copy(h.log_q, owned),      device_copy(h.prob, owned),
                           device_copy(h.tail, owned),       device_copy(h.kl_weights, owned),
                           device_copy(h.grad_scale, owned), device_copy(h.lambda_weight, owned),
                           device_copy(h.accept, owned),     device_copy(h.neg_log_accept, owned),
                           device_copy(h.row_scale, owned),  device_copy(h.coef, owned)};
    const DraftLossLKRows p = lk_params(h, kind, ptrs);
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    bench::time_launches(state, stream, start, stop, [&] { return torchspec::cuda::draft_loss_lk_rows(p, stream); });
    state.SetBytesProcessed(state.iterations() * h.bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  for (void* d : owned) bench::check_at_exit(cudaFree(d), "cudaFree", "bench_draft_loss");
  if (start != nullptr) bench::check_at_exit(cudaEventDestroy(start), "cudaEventDestroy", "bench_draft_loss");
  if (stop != nullptr) bench::check_at_exit(cudaEventDestroy(stop), "cudaEventDestroy", "bench_draft_loss");
  if (stream != nullptr) bench::check_at_exit(cudaStreamDestroy(stream), "cudaStreamDestroy", "bench_draft_loss");
}
#endif

std::string lk_name(const char* device, DraftLossKind kind, int64_t rows) {
  return std::string(device) + "_draft_loss_" + (kind == DraftLossKind::kLKAlpha ? "lk_alpha" : "lk_lambda") +
         "_rows/rows=" + std::to_string(rows) + "/k=" + std::to_string(kTeacherK);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = bench::take_threads_arg(argc, argv, "bench_draft_loss");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_threads", std::to_string(threads));

  constexpr int64_t kCpuRows = 2048, kCpuCols = 2048;  // the op's CPU tile (16 MiB)
  benchmark::RegisterBenchmark(bench_name("cpu", "forward", kCpuRows, kCpuCols).c_str(), bm_cpu_forward, kCpuRows,
                               kCpuCols, threads)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(bench_name("cpu", "backward", kCpuRows, kCpuCols).c_str(), bm_cpu_backward, kCpuRows,
                               kCpuCols, threads)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  for (const DraftLossKind kind : {DraftLossKind::kLKAlpha, DraftLossKind::kLKLambda}) {
    benchmark::RegisterBenchmark(lk_name("cpu", kind, kCpuRows).c_str(), bm_cpu_lk_rows, kCpuRows, kind, threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
#if defined(TORCHSPEC_WITH_CUDA)
  std::string why;
  std::string gpu;
  try {
    gpu = bench::gpu_name(why);
  } catch (const std::exception& e) {
    why = e.what();
  }
  if (gpu.empty()) {
    std::fprintf(stderr, "bench_draft_loss: CUDA benchmarks skipped: no GPU (%s)\n", why.c_str());
  } else {
    benchmark::AddCustomContext("gpu", gpu);
    constexpr int64_t kCudaRows = 4096, kCudaCols = 2048;  // the op's CUDA tile (32 MiB)
    for (const bool backward : {false, true}) {
      benchmark::RegisterBenchmark(bench_name("cuda", backward ? "backward" : "forward", kCudaRows, kCudaCols).c_str(),
                                   bm_cuda, kCudaRows, kCudaCols, backward)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
    for (const DraftLossKind kind : {DraftLossKind::kLKAlpha, DraftLossKind::kLKLambda}) {
      benchmark::RegisterBenchmark(lk_name("cuda", kind, kCudaRows).c_str(), bm_cuda_lk_rows, kCudaRows, kind)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
#else
  std::fprintf(stderr, "bench_draft_loss: built without CUDA: CUDA benchmarks skipped\n");
#endif

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
