// Helpers shared by the C++ microbenchmarks (no torch): thread ranges, the --threads argument and
// CUDA error checks.
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
#include <cuda_runtime.h>
#endif

namespace torchspec_bench {

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
#define CUDA_CHECK(call) ::torchspec_bench::check((call), #call)

// For destructors: report, never throw.
inline void check_at_exit(cudaError_t err, const char* what, const char* program) {
  if (err != cudaSuccess) std::fprintf(stderr, "%s: %s: %s\n", program, what, cudaGetErrorString(err));
}
#endif

}  // namespace torchspec_bench
