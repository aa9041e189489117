// Microbenchmarks of the small-rows linear kernel (out = x @ W.T for the few rows of a decoding
// step), called directly (no torch), on the default target's LM head shape (49152 x 576). The
// weight is copied until the copies outgrow twice the last-level cache (64 MiB assumed) and the
// timed calls rotate over them, so each reads its weight from memory, as a forward's layers do.
// CPU only: on CUDA the op is cuBLAS. Threads: --threads=N, else $TORCHSPEC_BENCH_THREADS, else
// hardware_concurrency. Bytes processed = the weight read once, the floor, so the bytes/s column
// is the effective read bandwidth; compare it with the machine's (a sum over 256 MiB).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/small_rows.h"
#include "cpu/cpu_kernels.h"

namespace {

using torchspec::ScalarKind;
using torchspec::SmallRowsLinearParams;

constexpr int64_t kOutOfCacheBytes = int64_t{64} << 20;

struct Shape {
  ScalarKind weight_dtype;
  int64_t rows, out_features, in_features;
};

int64_t weight_bytes(const Shape& s) {
  return s.out_features * s.in_features * (s.weight_dtype == ScalarKind::kFloat32 ? 4 : 2);
}

std::string bench_name(const Shape& s) {
  return std::string("cpu_small_rows_linear/") + (s.weight_dtype == ScalarKind::kFloat32 ? "f32" : "bf16") +
         "/rows=" + std::to_string(s.rows) + "/W=" + std::to_string(s.out_features) + "x" +
         std::to_string(s.in_features);
}

// Inputs and output of one benchmark, made on its first run: x float32, weight copies of its dtype.
struct Case {
  Shape shape;
  std::vector<float> x, out;
  std::vector<std::unique_ptr<char[]>> weights;

  void setup() {
    const Shape& s = shape;
    std::mt19937 gen(12345);
    std::normal_distribution<float> normal;
    x.resize(s.rows * s.in_features);
    for (float& v : x) v = normal(gen);
    out.resize(s.rows * s.out_features);
    const int64_t bytes = weight_bytes(s), copies = std::max<int64_t>(2, kOutOfCacheBytes / bytes + 1);
    std::unique_ptr<char[]> first(new char[bytes]);
    const int64_t n = s.out_features * s.in_features;
    for (int64_t i = 0; i < n; ++i) {
      const float v = normal(gen) * 0.04f;
      if (s.weight_dtype == ScalarKind::kFloat32) {
        std::memcpy(first.get() + 4 * i, &v, 4);
      } else {
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        const uint16_t half = static_cast<uint16_t>(bits >> 16);
        std::memcpy(first.get() + 2 * i, &half, 2);
      }
    }
    for (int64_t c = 1; c < copies; ++c) {
      weights.emplace_back(new char[bytes]);
      std::memcpy(weights.back().get(), first.get(), bytes);
    }
    weights.push_back(std::move(first));
  }
};

// The kernel over output-row ranges on `threads` threads (wall-clock time), a new weight copy each call.
void bm_cpu(benchmark::State& state, Case* c, int threads) {
  const Shape& s = c->shape;
  if (c->weights.empty()) c->setup();
  SmallRowsLinearParams p;
  p.x = c->x.data();
  p.out = c->out.data();
  p.weight_dtype = s.weight_dtype;
  p.rows = s.rows;
  p.in_features = s.in_features;
  p.out_features = s.out_features;
  p.weight_stride = s.in_features;
  size_t next = 0;
  for (auto _ : state) {
    p.weight = c->weights[next++ % c->weights.size()].get();
    bench::parallel_rows(s.out_features, threads,
                         [&](int64_t begin, int64_t end) { torchspec::cpu::small_rows_linear_range(p, begin, end); });
    benchmark::DoNotOptimize(c->out.data());
  }
  state.SetBytesProcessed(state.iterations() * weight_bytes(s));
  state.counters["threads"] = threads;
  state.counters["weight_copies"] = static_cast<double>(c->weights.size());
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = bench::take_threads_arg(argc, argv, "bench_small_rows");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_threads", std::to_string(threads));

  std::vector<std::unique_ptr<Case>> cases;
  std::vector<Shape> shapes;
  for (int64_t rows : {1, 2, 5, 8, 17}) shapes.push_back({ScalarKind::kFloat32, rows, 49152, 576});
  for (int64_t rows : {1, 5}) shapes.push_back({ScalarKind::kBFloat16, rows, 49152, 576});
  for (const Shape& s : shapes) {
    cases.push_back(std::make_unique<Case>());
    cases.back()->shape = s;
    benchmark::RegisterBenchmark(bench_name(s).c_str(), bm_cpu, cases.back().get(), threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  std::fprintf(stderr, "bench_small_rows: CPU only (on CUDA the op is cuBLAS's linear)\n");

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
