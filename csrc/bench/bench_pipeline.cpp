// Microbenchmarks of the tensor pipeline's framework-free parts (no torch).
// CPU: a teacher-like batch (hidden states [3, T, 1024] bf16, ids, mask, top-k, lse) packed into
// one buffer (plan + header + memcpy of every tensor, pack_host) against one memcpy of the same
// bytes (the floor), and the header decoded (what unpacking costs: the tensors are views).
// GPU (built with CUDA and NCCL, GPU present): the NCCL channel sending to itself through a
// one-rank communicator (send + recv as one group, waited on its events), bytes/s per message.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pipeline/wire.h"
#if defined(TORCHSPEC_WITH_NCCL)
#include <cuda_runtime.h>

#include "pipeline/nccl_comm.h"
#endif

namespace {

using torchspec::pipeline::BatchLayout;
using torchspec::pipeline::TensorEntry;
using torchspec::pipeline::WireDtype;

constexpr int64_t kMiB = 1 << 20;

// The tensors of a teacher batch of about `bytes` bytes, as the Python benchmark makes them.
std::vector<TensorEntry> teacher_entries(int64_t bytes) {
  const int64_t tokens = std::max<int64_t>(1, bytes / (3 * 1024 * 2 + 8 + 1 + 16 * 12 + 4));
  return {
      {"input_ids", WireDtype::kInt64, {tokens}},
      {"loss_mask", WireDtype::kBool, {tokens}},
      {"hidden_states", WireDtype::kBFloat16, {3, tokens, 1024}},
      {"topk_logprobs", WireDtype::kFloat32, {tokens, 16}},
      {"topk_indices", WireDtype::kInt64, {tokens, 16}},
      {"lse", WireDtype::kFloat32, {tokens}},
  };
}

int64_t payload_bytes(const BatchLayout& layout) {
  int64_t n = 0;
  for (const TensorEntry& e : layout.entries) n += e.nbytes;
  return n;
}

// Source tensors and the destination buffer of one batch, touched once so no page fault is timed.
struct HostBatch {
  BatchLayout layout;
  std::vector<std::unique_ptr<char[]>> tensors;
  std::vector<const void*> sources;
  std::unique_ptr<uint8_t[]> buffer;

  explicit HostBatch(int64_t bytes) : layout(torchspec::pipeline::plan_batch(0, teacher_entries(bytes))) {
    for (const TensorEntry& e : layout.entries) {
      tensors.emplace_back(new char[std::max<int64_t>(1, e.nbytes)]);
      std::memset(tensors.back().get(), 0x3c, e.nbytes);
      sources.push_back(tensors.back().get());
    }
    buffer.reset(new uint8_t[layout.total_bytes]);
    std::memset(buffer.get(), 0, layout.total_bytes);
  }
};

void bm_pack(benchmark::State& state) {
  HostBatch b(state.range(0) * kMiB);
  for (auto _ : state) {
    BatchLayout layout = torchspec::pipeline::plan_batch(1, teacher_entries(state.range(0) * kMiB));
    torchspec::pipeline::pack_host(layout, b.sources.data(), b.buffer.get());
    benchmark::DoNotOptimize(b.buffer.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * payload_bytes(b.layout));
}

void bm_memcpy_floor(benchmark::State& state) {
  HostBatch b(state.range(0) * kMiB);
  const int64_t n = payload_bytes(b.layout);
  std::unique_ptr<char[]> src(new char[n]);
  std::memset(src.get(), 0x3c, n);
  for (auto _ : state) {
    std::memcpy(b.buffer.get(), src.get(), n);
    benchmark::DoNotOptimize(b.buffer.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n);
}

void bm_decode_header(benchmark::State& state) {
  HostBatch b(state.range(0) * kMiB);
  torchspec::pipeline::encode_header(b.layout, b.buffer.get());
  for (auto _ : state) {
    BatchLayout layout = torchspec::pipeline::decode_header(b.buffer.get(), b.layout.header_bytes);
    benchmark::DoNotOptimize(layout.entries.data());
  }
  state.counters["header_bytes"] = static_cast<double>(b.layout.header_bytes);
}

#if defined(TORCHSPEC_WITH_NCCL)
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// One-rank NCCL channel sending `bytes` to itself per iteration; wall time per send + recv pair.
void bm_nccl_self(benchmark::State& state, torchspec::pipeline::NcclComm* comm) {
  const int64_t bytes = state.range(0) * kMiB;
  void *src = nullptr, *dst = nullptr;
  try {
    cuda_check(cudaMalloc(&src, bytes), "cudaMalloc");
    cuda_check(cudaMalloc(&dst, bytes), "cudaMalloc");
    cuda_check(cudaMemset(src, 0x3c, bytes), "cudaMemset");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    const auto once = [&] {
      const int64_t s = comm->send(src, bytes, 0, nullptr);
      const int64_t r = comm->recv(dst, bytes, 0, nullptr);
      comm->wait(s, 60.0);
      comm->wait(r, 60.0);
    };
    once();
    for (auto _ : state) once();
    state.SetBytesProcessed(state.iterations() * bytes);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
  cudaFree(src);
  cudaFree(dst);
}

std::unique_ptr<torchspec::pipeline::NcclComm> register_nccl() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_pipeline: NCCL benchmarks skipped: no GPU (%s)\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return nullptr;
  }
  auto comm = std::make_unique<torchspec::pipeline::NcclComm>(torchspec::pipeline::nccl_unique_id(), 0, 1, 0, 120.0);
  for (int64_t mib : {1, 16, 64, 256}) {
    benchmark::RegisterBenchmark(("nccl_self_send/" + std::to_string(mib) + "MiB").c_str(), bm_nccl_self, comm.get())
        ->Arg(mib)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }
  return comm;
}
#endif

}  // namespace

BENCHMARK(bm_pack)->Name("cpu_pack_batch")->Arg(1)->Arg(16)->Arg(64)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_memcpy_floor)
    ->Name("cpu_memcpy_floor")
    ->Arg(1)
    ->Arg(16)
    ->Arg(64)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_decode_header)->Name("cpu_decode_header")->Arg(16)->Unit(benchmark::kNanosecond);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if defined(TORCHSPEC_WITH_NCCL)
  std::unique_ptr<torchspec::pipeline::NcclComm> comm;
  try {
    comm = register_nccl();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_pipeline: NCCL benchmarks skipped: %s\n", e.what());
  }
#else
  std::fprintf(stderr, "bench_pipeline: built without CUDA/NCCL: NCCL benchmarks skipped\n");
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
