// Microbenchmarks of the top-k / log-sum-exp kernels, called directly (no torch), on random
// normal logits. CPU: topk_lse_rows over row ranges on std::threads; the count is --threads=N,
// else $TORCHSPEC_BENCH_THREADS, else hardware_concurrency. CUDA (when built with it and a GPU is
// present): the kernel timed with CUDA events. Bytes processed = logits read, so the bytes/s
// column is the effective input bandwidth.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench_common.h"
#include "common/topk_lse.h"
#include "cpu/cpu_kernels.h"
#if defined(TORCHSPEC_WITH_CUDA)
#include "kernels/cuda_kernels.h"
#endif

namespace {

using torchspec::ScalarKind;
using torchspec::TopkLseParams;

struct Shape {
  ScalarKind dtype;
  int64_t rows;
  int64_t vocab;
  int k;
};

int64_t input_bytes(const Shape& s) { return s.rows * s.vocab * (s.dtype == ScalarKind::kFloat32 ? 4 : 2); }

std::string bench_name(const char* device, const Shape& s) {
  return std::string(device) + "_topk_lse/" + (s.dtype == ScalarKind::kFloat32 ? "f32" : "bf16") +
         "/N=" + std::to_string(s.rows) + "/V=" + std::to_string(s.vocab) + "/k=" + std::to_string(s.k);
}

TopkLseParams make_params(const Shape& s, const void* logits, float* values, int64_t* indices, float* lse) {
  TopkLseParams p;
  p.logits = logits;
  p.dtype = s.dtype;
  p.rows = s.rows;
  p.vocab = s.vocab;
  p.row_stride = s.vocab;
  p.k = s.k;
  p.out_values = values;
  p.out_indices = indices;
  p.out_lse = lse;
  return p;
}

// Standard normal logits (bfloat16: the upper 16 bits of the float), one generator per row so
// that the data does not depend on the thread count.
std::unique_ptr<char[]> random_logits(const Shape& s, int threads) {
  std::unique_ptr<char[]> data(new char[input_bytes(s)]);
  bench::parallel_rows(s.rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::mt19937 gen(static_cast<uint32_t>(1234567 + r));
      std::normal_distribution<float> normal;
      if (s.dtype == ScalarKind::kFloat32) {
        float* row = reinterpret_cast<float*>(data.get()) + r * s.vocab;
        for (int64_t c = 0; c < s.vocab; ++c) row[c] = normal(gen);
      } else {
        uint16_t* row = reinterpret_cast<uint16_t*>(data.get()) + r * s.vocab;
        for (int64_t c = 0; c < s.vocab; ++c) {
          const float v = normal(gen);
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          row[c] = static_cast<uint16_t>(bits >> 16);
        }
      }
    }
  });
  return data;
}

// Inputs and outputs of one CPU benchmark, made on its first run.
struct CpuCase {
  Shape shape;
  std::unique_ptr<char[]> logits;
  std::vector<float> values, lse;
  std::vector<int64_t> indices;
};

// CPU kernel, rows split over `threads` threads (wall-clock time).
void bm_cpu(benchmark::State& state, CpuCase* c, int threads) {
  const Shape& s = c->shape;
  if (!c->logits) {
    c->logits = random_logits(s, threads);
    c->values.resize(s.rows * s.k);
    c->indices.resize(s.rows * s.k);
    c->lse.resize(s.rows);
  }
  const TopkLseParams p = make_params(s, c->logits.get(), c->values.data(), c->indices.data(), c->lse.data());
  for (auto _ : state) {
    bench::parallel_rows(s.rows, threads,
                         [&](int64_t begin, int64_t end) { torchspec::cpu::topk_lse_rows(p, begin, end); });
  }
  state.SetBytesProcessed(state.iterations() * input_bytes(s));
  state.counters["threads"] = threads;
}

#if defined(TORCHSPEC_WITH_CUDA)
void check_at_exit(cudaError_t err, const char* what) { bench::check_at_exit(err, what, "bench_topk"); }

// Device buffers of one CUDA benchmark, made on its first run. The inputs are copies of the same
// logits, together more than twice the L2 size, so that each launch reads its input from memory.
struct CudaCase {
  Shape shape;
  std::vector<void*> inputs;
  float* values = nullptr;
  int64_t* indices = nullptr;
  float* lse = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;

  void setup(int threads) {
    int device = 0, l2_bytes = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    const int64_t bytes = input_bytes(shape);
    const int64_t copies = std::max<int64_t>(2, 2 * static_cast<int64_t>(l2_bytes) / bytes + 1);
    const std::unique_ptr<char[]> host = random_logits(shape, threads);
    for (int64_t i = 0; i < copies; ++i) {
      void* d = nullptr;
      CUDA_CHECK(cudaMalloc(&d, bytes));
      inputs.push_back(d);
      CUDA_CHECK(cudaMemcpy(d, host.get(), bytes, cudaMemcpyHostToDevice));
    }
    CUDA_CHECK(cudaMalloc(&values, shape.rows * shape.k * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&indices, shape.rows * shape.k * sizeof(int64_t)));
    CUDA_CHECK(cudaMalloc(&lse, shape.rows * sizeof(float)));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }

  ~CudaCase() {
    for (void* d : inputs) check_at_exit(cudaFree(d), "cudaFree(input)");
    if (values != nullptr) check_at_exit(cudaFree(values), "cudaFree(values)");
    if (indices != nullptr) check_at_exit(cudaFree(indices), "cudaFree(indices)");
    if (lse != nullptr) check_at_exit(cudaFree(lse), "cudaFree(lse)");
    if (start != nullptr) check_at_exit(cudaEventDestroy(start), "cudaEventDestroy");
    if (stop != nullptr) check_at_exit(cudaEventDestroy(stop), "cudaEventDestroy");
    if (stream != nullptr) check_at_exit(cudaStreamDestroy(stream), "cudaStreamDestroy");
  }
};

// CUDA kernel timed with CUDA events after a warm-up, each launch on the next input copy.
void bm_cuda(benchmark::State& state, CudaCase* c, int threads) {
  try {
    if (c->inputs.empty()) c->setup(threads);
    TopkLseParams p = make_params(c->shape, nullptr, c->values, c->indices, c->lse);
    size_t next = 0;
    const auto launch = [&] {
      p.logits = c->inputs[next];
      next = (next + 1) % c->inputs.size();
      return torchspec::cuda::topk_lse(p, c->stream);
    };
    bench::time_launches(state, c->stream, c->start, c->stop, launch, 2 * static_cast<int64_t>(c->inputs.size()));
    state.SetBytesProcessed(state.iterations() * input_bytes(c->shape));
    state.counters["input_copies"] = static_cast<double>(c->inputs.size());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// Registers the CUDA benchmarks when a GPU is present; without one, says so and registers none.
void register_cuda(std::vector<std::unique_ptr<CudaCase>>& cases, int threads) {
  std::string why;
  const std::string gpu = bench::gpu_name(why);
  if (gpu.empty()) {
    std::fprintf(stderr, "bench_topk: CUDA benchmarks skipped: no GPU (%s)\n", why.c_str());
    return;
  }
  benchmark::AddCustomContext("gpu", gpu);
  for (const Shape& s :
       {Shape{ScalarKind::kFloat32, 2048, 49152, 64}, Shape{ScalarKind::kBFloat16, 8192, 152064, 64}}) {
    cases.push_back(std::make_unique<CudaCase>());
    cases.back()->shape = s;
    benchmark::RegisterBenchmark(bench_name("cuda", s).c_str(), bm_cuda, cases.back().get(), threads)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const int threads = bench::take_threads_arg(argc, argv, "bench_topk");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_threads", std::to_string(threads));

  std::vector<std::unique_ptr<CpuCase>> cpu_cases;
  for (const Shape& s : {Shape{ScalarKind::kFloat32, 2048, 49152, 64}, Shape{ScalarKind::kBFloat16, 512, 152064, 64}}) {
    cpu_cases.push_back(std::make_unique<CpuCase>());
    cpu_cases.back()->shape = s;
    benchmark::RegisterBenchmark(bench_name("cpu", s).c_str(), bm_cpu, cpu_cases.back().get(), threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
#if defined(TORCHSPEC_WITH_CUDA)
  std::vector<std::unique_ptr<CudaCase>> cuda_cases;
  try {
    register_cuda(cuda_cases, threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_topk: CUDA benchmarks skipped: %s\n", e.what());
  }
#else
  std::fprintf(stderr, "bench_topk: built without CUDA: CUDA benchmarks skipped\n");
#endif

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
