// Microbenchmarks of the tree kernels, called directly (no torch). CPU: the kernels over ranges
// on std::threads (--threads=N, else $TORCHSPEC_BENCH_THREADS, else hardware_concurrency). CUDA
// (when built with it and a GPU is present): the kernels timed with CUDA events.
//
// tree_attention: random normal q, k, v (bfloat16 or float32), a random tree (parents[j] uniform
// in [0, j)), the prefix before the tree. Bytes processed = q + k + v + out, the floor; the CUDA
// kernel moves more (each block of rows reads its keys; split key ranges write and merge float32
// partials): the program prints both, and its FLOPs, for the GPU shapes, GPU or not, with the time
// each takes at an H100 SXM's and an H200's rates; the CUDA runs report the ratio as floor_ratio.
// verify_greedy: a chain of T nodes whose every token is the argmax of its parent's logits (the
// worst case: every logits row is read). Bytes processed = all the logits.
// greedy_walk: the same chain with the argmaxes given (TreeVerifyParams::argmax): the walk alone.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/tree.h"
#include "cpu/cpu_kernels.h"
#if defined(TORCHSPEC_WITH_CUDA)
#include <cuda_runtime.h>

#include "kernels/cuda_kernels.h"
#endif

namespace {

using torchspec::ScalarKind;
using torchspec::TreeAttentionParams;
using torchspec::TreeVerifyParams;
using bench::parallel_rows;

constexpr const char* kProgram = "bench_tree";

size_t element_size(ScalarKind dtype) { return dtype == ScalarKind::kFloat32 ? 4 : 2; }
const char* dtype_name(ScalarKind dtype) { return dtype == ScalarKind::kFloat32 ? "f32" : "bf16"; }

// n standard normal values of `dtype` (bfloat16: the upper 16 bits of the float), each block of
// 65536 from its own generator so that the data does not depend on the thread count.
std::vector<char> random_normal(int64_t n, ScalarKind dtype, uint32_t seed, int threads) {
  std::vector<char> data(n * element_size(dtype));
  constexpr int64_t kBlock = 65536;
  parallel_rows((n + kBlock - 1) / kBlock, threads, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      std::mt19937 gen(seed + static_cast<uint32_t>(blk));
      std::normal_distribution<float> normal;
      for (int64_t i = blk * kBlock; i < std::min(n, (blk + 1) * kBlock); ++i) {
        const float v = normal(gen);
        if (dtype == ScalarKind::kFloat32) {
          std::memcpy(data.data() + 4 * i, &v, 4);
        } else {
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          const uint16_t h = static_cast<uint16_t>(bits >> 16);
          std::memcpy(data.data() + 2 * i, &h, 2);
        }
      }
    }
  });
  return data;
}

float to_float(const char* data, ScalarKind dtype, int64_t i) {
  if (dtype == ScalarKind::kFloat32) {
    float v;
    std::memcpy(&v, data + 4 * i, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, data + 2 * i, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// ---- tree attention -----------------------------------------------------------------------------

struct AttnShape {
  ScalarKind dtype;
  int64_t batch, nodes, prefix, q_heads, kv_heads, dim;
  int64_t seq() const { return prefix + nodes; }
  // The floor: q, k and v read once, out written once.
  int64_t bytes() const {
    return (2 * batch * q_heads * nodes * dim + 2 * batch * kv_heads * seq() * dim) *
           static_cast<int64_t>(element_size(dtype));
  }
  // What the CUDA kernel reads and writes (common/tree.h): tensor cores for bfloat16 (sm_80+).
  int64_t cuda_bytes(int64_t sm_count = 132) const {
    const int64_t es = static_cast<int64_t>(element_size(dtype));
    if (dtype == ScalarKind::kFloat32) {
      return torchspec::tree_attention_cuda_bytes(batch, q_heads, kv_heads, nodes, prefix, dim, es);
    }
    return torchspec::tree_attention_mma_cost(batch, q_heads, kv_heads, nodes, prefix, dim, es, sm_count).bytes;
  }
  std::string name(const char* device) const {
    return std::string(device) + "_tree_attention/" + dtype_name(dtype) + "/B=" + std::to_string(batch) +
           "/T=" + std::to_string(nodes) + "/prefix=" + std::to_string(prefix) + "/Hq=" + std::to_string(q_heads) +
           "/Hkv=" + std::to_string(kv_heads) + "/D=" + std::to_string(dim);
  }
};

// Host inputs of one attention benchmark.
struct AttnData {
  std::vector<char> q, k, v, out;
  std::vector<int64_t> prefix_lens, parents;
  void make(const AttnShape& s, int threads) {
    q = random_normal(s.batch * s.q_heads * s.nodes * s.dim, s.dtype, 1, threads);
    k = random_normal(s.batch * s.kv_heads * s.seq() * s.dim, s.dtype, 1000003, threads);
    v = random_normal(s.batch * s.kv_heads * s.seq() * s.dim, s.dtype, 2000003, threads);
    out.assign(q.size(), 0);
    prefix_lens.assign(s.batch, s.prefix);
    std::mt19937 gen(7);
    parents.resize(s.batch * s.nodes);
    for (int64_t b = 0; b < s.batch; ++b) {
      parents[b * s.nodes] = -1;
      for (int64_t j = 1; j < s.nodes; ++j)
        parents[b * s.nodes + j] = std::uniform_int_distribution<int64_t>(0, j - 1)(gen);
    }
  }
};

TreeAttentionParams attn_params(const AttnShape& s) {
  TreeAttentionParams p;
  p.dtype = s.dtype;
  p.batch = s.batch;
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.nodes = s.nodes;
  p.seq = s.seq();
  p.head_dim = s.dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.dim));
  return p;
}

struct CpuAttnCase {
  AttnShape shape;
  AttnData data;
};

void bm_cpu_attention(benchmark::State& state, CpuAttnCase* c, int threads) {
  const AttnShape& s = c->shape;
  if (c->data.q.empty()) c->data.make(s, threads);
  TreeAttentionParams p = attn_params(s);
  p.q = c->data.q.data();
  p.k = c->data.k.data();
  p.v = c->data.v.data();
  p.out = c->data.out.data();
  p.prefix_lens = c->data.prefix_lens.data();
  p.parents = c->data.parents.data();
  for (auto _ : state) {
    parallel_rows(s.batch * s.kv_heads, threads,
                  [&](int64_t begin, int64_t end) { torchspec::cpu::tree_attention_units(p, begin, end); });
  }
  state.SetBytesProcessed(state.iterations() * s.bytes());
  state.counters["threads"] = threads;
}

// ---- verification -------------------------------------------------------------------------------

struct VerifyShape {
  ScalarKind dtype;
  int64_t batch, nodes, vocab;
  bool walk_only;  // argmaxes given
  int64_t bytes() const { return walk_only ? 0 : batch * nodes * vocab * static_cast<int64_t>(element_size(dtype)); }
  std::string name(const char* device) const {
    return std::string(device) + (walk_only ? "_greedy_walk" : "_verify_greedy/") +
           (walk_only ? "" : dtype_name(dtype)) + "/B=" + std::to_string(batch) + "/T=" + std::to_string(nodes) +
           (walk_only ? "" : "/V=" + std::to_string(vocab));
  }
};

// A fully accepted chain: tokens[j] = argmax of node j - 1's logits.
struct VerifyData {
  std::vector<char> logits;
  std::vector<int64_t> tokens, parents, argmax, num_accepted, path, next_token;
  void make(const VerifyShape& s, int threads) {
    const int64_t rows = s.batch * s.nodes;
    argmax.resize(rows);
    if (s.walk_only) {
      std::mt19937 gen(3);
      for (int64_t& a : argmax) a = std::uniform_int_distribution<int64_t>(0, s.vocab - 1)(gen);
    } else {
      logits = random_normal(rows * s.vocab, s.dtype, 4242, threads);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t best = 0;
        for (int64_t i = 1; i < s.vocab; ++i) {
          if (to_float(logits.data(), s.dtype, r * s.vocab + i) > to_float(logits.data(), s.dtype, r * s.vocab + best))
            best = i;
        }
        argmax[r] = best;
      }
    }
    tokens.resize(rows);
    parents.resize(rows);
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t j = 0; j < s.nodes; ++j) {
        parents[b * s.nodes + j] = j - 1;
        tokens[b * s.nodes + j] = j == 0 ? 0 : argmax[b * s.nodes + j - 1];
      }
    }
    num_accepted.resize(s.batch);
    path.resize(rows);
    next_token.resize(s.batch);
  }
};

TreeVerifyParams verify_params(const VerifyShape& s) {
  TreeVerifyParams p;
  p.dtype = s.dtype;
  p.batch = s.batch;
  p.nodes = s.nodes;
  p.vocab = s.vocab;
  return p;
}

struct CpuVerifyCase {
  VerifyShape shape;
  VerifyData data;
};

void bm_cpu_verify(benchmark::State& state, CpuVerifyCase* c, int threads) {
  const VerifyShape& s = c->shape;
  if (c->data.tokens.empty()) c->data.make(s, threads);
  VerifyData& d = c->data;
  TreeVerifyParams p = verify_params(s);
  p.tokens = d.tokens.data();
  p.parents = d.parents.data();
  p.logits = s.walk_only ? nullptr : d.logits.data();
  p.argmax = s.walk_only ? d.argmax.data() : nullptr;
  p.num_accepted = d.num_accepted.data();
  p.path = d.path.data();
  p.next_token = d.next_token.data();
  for (auto _ : state) {
    if (s.walk_only) {
      torchspec::cpu::verify_tree_rows(p, 0, s.batch);  // a few microseconds: threads would cost more
    } else {
      parallel_rows(s.batch, threads,
                    [&](int64_t begin, int64_t end) { torchspec::cpu::verify_tree_rows(p, begin, end); });
    }
  }
  if (d.num_accepted[0] != s.nodes - 1) state.SkipWithError("the chain was not fully accepted");
  state.SetBytesProcessed(state.iterations() * s.bytes());
}

#if defined(TORCHSPEC_WITH_CUDA)
void check_at_exit(cudaError_t err, const char* what) { bench::check_at_exit(err, what, kProgram); }

template <class T>
T* to_device(const std::vector<T>& host) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, host.size() * sizeof(T))));
  if (!host.empty()) CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Device buffers, CUDA events and a stream; freed at exit.
struct CudaCase {
  std::vector<void*> buffers;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  template <class T>
  T* upload(const std::vector<T>& host) {
    T* d = to_device(host);
    buffers.push_back(d);
    return d;
  }
  void init() {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }
  // Times launch() with CUDA events for every benchmark iteration, after a warm-up.
  template <class Launch>
  void run(benchmark::State& state, const Launch& launch) {
    bench::time_launches(state, stream, start, stop, launch);
  }
  ~CudaCase() {
    for (void* d : buffers) check_at_exit(cudaFree(d), "cudaFree");
    if (start != nullptr) check_at_exit(cudaEventDestroy(start), "cudaEventDestroy");
    if (stop != nullptr) check_at_exit(cudaEventDestroy(stop), "cudaEventDestroy");
    if (stream != nullptr) check_at_exit(cudaStreamDestroy(stream), "cudaStreamDestroy");
  }
};

struct CudaAttnCase : CudaCase {
  AttnShape shape;
  TreeAttentionParams p;
};

void bm_cuda_attention(benchmark::State& state, CudaAttnCase* c, int threads) {
  try {
    if (c->stream == nullptr) {
      c->init();
      AttnData host;
      host.make(c->shape, threads);
      c->p = attn_params(c->shape);
      c->p.q = c->upload(host.q);
      c->p.k = c->upload(host.k);
      c->p.v = c->upload(host.v);
      c->p.out = c->upload(host.out);
      c->p.prefix_lens = c->upload(host.prefix_lens);
      c->p.parents = c->upload(host.parents);
      torchspec::TreeAttentionPlan plan;
      CUDA_CHECK(torchspec::cuda::tree_attention_plan(c->p, &plan));
      c->p.splits = plan.splits;
      if (plan.workspace_bytes > 0) {
        c->p.workspace = c->upload(std::vector<float>(plan.workspace_bytes / 4));
      }
    }
    c->run(state, [&] { return torchspec::cuda::tree_attention(c->p, c->stream); });
    state.SetBytesProcessed(state.iterations() * c->shape.bytes());
    state.counters["floor_ratio"] = static_cast<double>(c->shape.cuda_bytes()) / static_cast<double>(c->shape.bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

struct CudaVerifyCase : CudaCase {
  VerifyShape shape;
  TreeVerifyParams p;
};

void bm_cuda_verify(benchmark::State& state, CudaVerifyCase* c, int threads) {
  try {
    if (c->stream == nullptr) {
      c->init();
      VerifyData host;
      host.make(c->shape, threads);
      c->p = verify_params(c->shape);
      c->p.tokens = c->upload(host.tokens);
      c->p.parents = c->upload(host.parents);
      if (c->shape.walk_only) {
        c->p.argmax = c->upload(host.argmax);
      } else {
        c->p.logits = c->upload(host.logits);
      }
      c->p.num_accepted = c->upload(host.num_accepted);
      c->p.path = c->upload(host.path);
      c->p.next_token = c->upload(host.next_token);
    }
    c->run(state, [&] { return torchspec::cuda::verify_tree(c->p, c->stream); });
    int64_t accepted = 0;
    CUDA_CHECK(cudaMemcpy(&accepted, c->p.num_accepted, sizeof(int64_t), cudaMemcpyDeviceToHost));
    if (accepted != c->shape.nodes - 1) state.SkipWithError("the chain was not fully accepted");
    state.SetBytesProcessed(state.iterations() * c->shape.bytes());
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// Registers the CUDA benchmarks when a GPU is present; without one, says so and registers none.
void register_cuda(std::vector<std::unique_ptr<CudaAttnCase>>& attn,
                   std::vector<std::unique_ptr<CudaVerifyCase>>& verify, int threads) {
  std::string why;
  const std::string gpu = bench::gpu_name(why);
  if (gpu.empty()) {
    std::fprintf(stderr, "%s: CUDA benchmarks skipped: no GPU (%s)\n", kProgram, why.c_str());
    return;
  }
  benchmark::AddCustomContext("gpu", gpu);
  for (int64_t b : {1, 8, 64}) {
    attn.push_back(std::make_unique<CudaAttnCase>());
    attn.back()->shape = AttnShape{ScalarKind::kBFloat16, b, 64, 4096, 32, 8, 128};
    benchmark::RegisterBenchmark(attn.back()->shape.name("cuda").c_str(), bm_cuda_attention, attn.back().get(), threads)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (bool walk : {false, true}) {
    verify.push_back(std::make_unique<CudaVerifyCase>());
    verify.back()->shape = VerifyShape{ScalarKind::kBFloat16, 64, 64, 152064, walk};
    benchmark::RegisterBenchmark(verify.back()->shape.name("cuda").c_str(), bm_cuda_verify, verify.back().get(),
                                 threads)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}
#endif

// The CUDA tensor-core tree_attention kernel at the GPU shapes (the issue-31 shape and the GPU
// benchmark's), bfloat16 on 132 multiprocessors: bytes and FLOPs against the floor, and the time
// each takes at an H100 SXM's (3.35 TB/s) and an H200's (4.8 TB/s) rates, 989 TFLOP/s dense bf16.
// Arithmetic (common/tree.h), not a measurement.
void print_attention_costs() {
  struct Gpu {
    const char* name;
    double bandwidth, flops;
  };
  const Gpu gpus[] = {{"H100 SXM", 3.35e12, 989e12}, {"H200", 4.8e12, 989e12}};
  const AttnShape shapes[] = {{ScalarKind::kBFloat16, 4, 64, 4096, 9, 3, 64},
                              {ScalarKind::kBFloat16, 1, 64, 4096, 32, 8, 128},
                              {ScalarKind::kBFloat16, 8, 64, 4096, 32, 8, 128},
                              {ScalarKind::kBFloat16, 64, 64, 4096, 32, 8, 128}};
  for (const AttnShape& s : shapes) {
    const torchspec::TreeAttentionCost c =
        torchspec::tree_attention_mma_cost(s.batch, s.q_heads, s.kv_heads, s.nodes, s.prefix, s.dim, 2, 132);
    std::fprintf(stderr,
                 "%s: CUDA tree_attention B=%lld T=%lld prefix=%lld Hq=%lld Hkv=%lld D=%lld bf16: %lld key range(s); "
                 "its blocks load and store %.2f MiB, %.2f MiB once each (%.2fx the floor of %.2f MiB); %.2f GFLOP on "
                 "tensor cores (dense attention %.2f)",
                 kProgram, (long long)s.batch, (long long)s.nodes, (long long)s.prefix, (long long)s.q_heads,
                 (long long)s.kv_heads, (long long)s.dim, (long long)c.splits, c.bytes / 1048576.0,
                 c.unique_bytes / 1048576.0, static_cast<double>(c.unique_bytes) / c.floor_bytes,
                 c.floor_bytes / 1048576.0, c.executed_flops / 1e9, c.dense_flops / 1e9);
    for (const Gpu& g : gpus) {
      const double floor_us = std::max(c.floor_bytes / g.bandwidth, c.dense_flops / g.flops) * 1e6;
      const double ours_us = std::max(c.unique_bytes / g.bandwidth, c.executed_flops / g.flops) * 1e6;
      std::fprintf(stderr, "; %s: floor %.1f us, the kernel's unique bytes and FLOPs %.1f us", g.name, floor_us,
                   ours_us);
    }
    std::fprintf(stderr, "\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = bench::take_threads_arg(argc, argv, kProgram);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("cpu_threads", std::to_string(threads));
  print_attention_costs();

  std::vector<std::unique_ptr<CpuAttnCase>> attn_cases;
  for (const AttnShape& s : {AttnShape{ScalarKind::kFloat32, 1, 64, 4096, 32, 8, 128},
                             AttnShape{ScalarKind::kBFloat16, 1, 64, 4096, 32, 8, 128}}) {
    attn_cases.push_back(std::make_unique<CpuAttnCase>());
    attn_cases.back()->shape = s;
    benchmark::RegisterBenchmark(s.name("cpu").c_str(), bm_cpu_attention, attn_cases.back().get(), threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  std::vector<std::unique_ptr<CpuVerifyCase>> verify_cases;
  for (const VerifyShape& s : {VerifyShape{ScalarKind::kBFloat16, 16, 64, 152064, false},
                               VerifyShape{ScalarKind::kBFloat16, 64, 64, 152064, true}}) {
    verify_cases.push_back(std::make_unique<CpuVerifyCase>());
    verify_cases.back()->shape = s;
    benchmark::RegisterBenchmark(s.name("cpu").c_str(), bm_cpu_verify, verify_cases.back().get(), threads)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }
#if defined(TORCHSPEC_WITH_CUDA)
  std::vector<std::unique_ptr<CudaAttnCase>> cuda_attn;
  std::vector<std::unique_ptr<CudaVerifyCase>> cuda_verify;
  try {
    register_cuda(cuda_attn, cuda_verify, threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: CUDA benchmarks skipped: %s\n", kProgram, e.what());
  }
#else
  std::fprintf(stderr, "%s: built without CUDA: CUDA benchmarks skipped\n", kProgram);
#endif

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
