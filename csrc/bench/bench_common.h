// Helpers shared by the C++ microbenchmarks: row-range threading, the --threads flag, CUDA error
// checks and the CUDA-event timing loop. Header-only; messages name the calling benchmark (its
// `program` argument).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(TORCHSPEC_WITH_CUDA)
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#endif

namespace bench {

// Calls fn(begin, end) on `threads` contiguous ranges of [0, n): one on this thread, the others
// on new std::threads.
template <class Fn>
void parallel_rows(int64_t n, int threads, const Fn& fn) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) workers.emplace_back(fn, n * i / t, n * (i + 1) / t);
  fn(0, n / t);
  for (std::thread& w : workers) w.join();
}

// --threads=N (taken out of argv), else $TORCHSPEC_BENCH_THREADS, else hardware_concurrency.
inline int take_threads_arg(int& argc, char** argv, const char* program) {
  const char* value = std::getenv("TORCHSPEC_BENCH_THREADS");
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      value = argv[i] + 10;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  argv[argc] = nullptr;
  if (value == nullptr || *value == '\0') return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  if (*end != '\0' || n < 1 || n > 4096) {
    std::fprintf(stderr, "%s: bad thread count '%s'\n", program, value);
    std::exit(2);
  }
  return static_cast<int>(n);
}

#if defined(TORCHSPEC_WITH_CUDA)
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
#define CUDA_CHECK(call) ::bench::check((call), #call)

// For destructors: report, never throw.
inline void check_at_exit(cudaError_t err, const char* what, const char* program) {
  if (err != cudaSuccess) std::fprintf(stderr, "%s: %s: %s\n", program, what, cudaGetErrorString(err));
}

// The first GPU's name, or an empty string (with the reason in `why`) when there is none.
inline std::string gpu_name(std::string& why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    why = err != cudaSuccess ? cudaGetErrorString(err) : "0 devices";
    return "";
  }
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return prop.name;
}

// Times launch() (which returns a cudaError_t) with CUDA events on `stream` for every benchmark
// iteration (for UseManualTime), after `warmup` untimed launches.
template <class Launch>
void time_launches(benchmark::State& state, cudaStream_t stream, cudaEvent_t start, cudaEvent_t stop,
                   const Launch& launch, int64_t warmup = 3) {
  for (int64_t i = 0; i < warmup; ++i) CUDA_CHECK(launch());
  CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    CUDA_CHECK(cudaEventRecord(start, stream));
    CUDA_CHECK(launch());
    CUDA_CHECK(cudaEventRecord(stop, stream));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(ms * 1e-3);
  }
}
#endif

}  // namespace bench
