// The op layer (csrc/ops: argument checks, run_on_device, device guards, the current stream, the
// device error records) called through torch's dispatcher with CUDA tensors, on the CPU emulator:
// the torchspec ops' CUDA registrations run as written, the kernels on the emulator.
//
// "CUDA" tensors here live in the emulator's device memory (host memory between guard pages). The
// binary links torch's CPU library only, so the CUDA dispatch key has no kernels but this file's:
// a boxed fallback runs any aten op on CPU tensors that alias the CUDA tensors' memory, and wraps
// its results back as CUDA tensors; copy_ (whose composite kernel would need a CUDA copy stub) is
// registered on its own. Device-to-host transfers (copy_ to the CPU, item()) are counted: the ops
// must make none on CUDA (no host synchronisation). The emulator checks that every launch uses the
// current stream of the tensors' device while that device is current (a stream of another device
// is "invalid resource handle").
//
// Usage: cuda_emulator_op_test      exit status 0 pass, 1 a failed check, 3 an emulator fault
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "emulated_cuda_context.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace {

int g_failures = 0, g_checks = 0;
int64_t g_host_transfers = 0;  // device-to-host copies and item() on CUDA tensors

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
}

// ---- an emulated CUDA backend for aten ----------------------------------------------------------

struct EmulatedCudaAllocator final : c10::Allocator {
  static void free_memory(void* p) { cudaFree(p); }
  c10::DataPtr allocate(size_t n) override {
    int device = 0;
    cudaGetDevice(&device);
    void* p = nullptr;
    if (n > 0) TORCH_CHECK(cudaMalloc(&p, n) == cudaSuccess, "emulated cudaMalloc of ", n, " bytes failed");
    return {p, p, &free_memory, c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_memory; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

EmulatedCudaAllocator g_allocator;

// CUDA's device guard for aten (c10::DeviceGuard, OptionalDeviceGuard): the emulator's device.
struct EmulatedCudaGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::CUDA; }
  c10::Device exchangeDevice(c10::Device d) const override {
    const c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override {
    int device = 0;
    cudaGetDevice(&device);
    return {c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)};
  }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(cudaSetDevice(d.index()) == cudaSuccess, "emulated cudaSetDevice(", int(d.index()), ") failed");
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override { cudaSetDevice(d.index()); }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return c10::Stream(c10::Stream::DEFAULT, s.device()); }
  c10::DeviceIndex deviceCount() const noexcept override {
    int n = 0;
    cudaGetDeviceCount(&n);
    return static_cast<c10::DeviceIndex>(n);
  }
};
C10_REGISTER_GUARD_IMPL(CUDA, EmulatedCudaGuard);

// A CPU tensor on the memory of CUDA tensor t, viewed as t is. Its storage is resizable: an out=
// kernel that resizes it moves it to CPU memory, which the fallback then copies back.
at::Tensor cpu_alias(const at::Tensor& t) {
  const c10::Storage& st = t.storage();
  void* base = const_cast<void*>(st.data());
  c10::Storage alias(c10::Storage::use_byte_size_t(), st.nbytes(),
                     c10::DataPtr(
                         base, base, [](void*) {}, c10::Device(c10::DeviceType::CPU)),
                     c10::GetCPUAllocator(),
                     /*resizable=*/true);
  auto impl =
      c10::make_intrusive<c10::TensorImpl>(std::move(alias), c10::DispatchKeySet(c10::DispatchKey::CPU), t.dtype());
  impl->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  return at::Tensor(std::move(impl));
}

// A CUDA tensor with cpu's sizes, strides and offset on `storage` (a CUDA storage).
at::Tensor cuda_view(const c10::Storage& storage, const at::Tensor& cpu) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::CUDA),
                                                   cpu.dtype());
  impl->set_sizes_and_strides(cpu.sizes(), cpu.strides(), cpu.storage_offset());
  return at::Tensor(std::move(impl));
}

// A new CUDA tensor on `device` holding a copy of cpu's storage, viewed as cpu is.
at::Tensor cuda_copy(const at::Tensor& cpu, c10::Device device) {
  const torchspec::CudaDeviceGuard guard(device);
  c10::Storage storage(c10::Storage::use_byte_size_t(), cpu.storage().nbytes(), &g_allocator, false);
  if (cpu.storage().nbytes() > 0) std::memcpy(storage.mutable_data(), cpu.storage().data(), cpu.storage().nbytes());
  return cuda_view(storage, cpu);
}

void emulated_copy(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  // copy_(Tensor(a!) self, Tensor src, bool non_blocking) -> Tensor(a!)
  const bool non_blocking = (*stack)[stack->size() - 1].toBool();
  const at::Tensor src = (*stack)[stack->size() - 2].toTensor();
  const at::Tensor self = (*stack)[stack->size() - 3].toTensor();
  if (self.is_cpu() && src.is_cuda()) ++g_host_transfers;
  at::Tensor dst = self.is_cuda() ? cpu_alias(self) : self;
  dst.copy_(src.is_cuda() ? cpu_alias(src) : src, non_blocking);
  torch::jit::drop(*stack, 3);
  torch::jit::push(*stack, self);
}

// Any other aten op: CUDA tensors (and CUDA device arguments) become CPU aliases, the op runs on
// the CPU, and each result that shares an argument's memory becomes a view of that CUDA storage;
// a new result is copied to new CUDA memory on the arguments' device.
void emulated_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const std::string& name = op.schema().name();
  const size_t n = op.schema().arguments().size();
  std::vector<c10::IValue> args(stack->end() - static_cast<std::ptrdiff_t>(n), stack->end());
  torch::jit::drop(*stack, n);
  std::optional<c10::Device> device;
  std::vector<std::pair<const void*, c10::Storage>> storages;  // alias base -> CUDA storage
  const auto to_cpu = [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined() || !t.is_cuda()) return t;
    if (!device) device = t.device();
    storages.push_back({t.storage().data(), t.storage()});
    return cpu_alias(t);
  };
  std::vector<std::pair<at::Tensor, at::Tensor>> written;  // (CUDA argument, its CPU alias) of out= arguments
  for (size_t i = 0; i < n; ++i) {
    c10::IValue& a = args[i];
    if (a.isTensor()) {
      const at::Tensor t = a.toTensor();
      a = to_cpu(t);
      const auto& alias = op.schema().arguments()[i].alias_info();
      if (t.defined() && t.is_cuda() && alias && alias->isWrite()) written.push_back({t, a.toTensor()});
    } else if (a.isTensorList()) {
      std::vector<at::Tensor> list;
      for (const at::Tensor& t : a.toTensorVector()) list.push_back(to_cpu(t));
      a = list;
    } else if (a.isDevice() && a.toDevice().is_cuda()) {
      if (!device) device = a.toDevice();
      a = c10::Device(c10::DeviceType::CPU);
    }
  }
  if (!device) device = c10::Device(c10::DeviceType::CUDA, EmulatedCudaGuard().getDevice().index());
  const int64_t n_cuda_args = static_cast<int64_t>(storages.size());
  if (name == "aten::_local_scalar_dense" && n_cuda_args > 0) ++g_host_transfers;
  for (c10::IValue& a : args) torch::jit::push(*stack, std::move(a));
  op.callBoxed(stack);
  // An out= argument that the CPU kernel resized now has CPU memory: the CUDA tensor gets a copy.
  for (auto& [t, alias] : written) {
    if (alias.storage().data() == t.storage().data() && alias.sizes() == t.sizes()) continue;
    const at::Tensor moved = cuda_copy(alias, t.device());
    t.unsafeGetTensorImpl()->set_storage_keep_dtype(moved.storage());
    t.unsafeGetTensorImpl()->set_sizes_and_strides(alias.sizes(), alias.strides(), alias.storage_offset());
    storages.push_back({alias.storage().data(), moved.storage()});
  }
  const auto to_cuda = [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined() || !t.is_cpu()) return t;
    for (const auto& [base, storage] : storages) {
      if (t.storage().data() == base) return cuda_view(storage, t);
    }
    return cuda_copy(t, *device);
  };
  const size_t r = op.schema().returns().size();
  for (size_t i = stack->size() - r; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor()) {
      v = to_cuda(v.toTensor());
    } else if (v.isTensorList()) {
      std::vector<at::Tensor> list;
      for (const at::Tensor& t : v.toTensorVector()) list.push_back(to_cuda(t));
      v = list;
    }
  }
}

TORCH_LIBRARY_IMPL(aten, CUDA, m) { m.impl("copy_", torch::CppFunction::makeFromBoxedFunction<&emulated_copy>()); }
TORCH_LIBRARY_IMPL(_, CUDA, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&emulated_fallback>()); }

// ---- helpers ------------------------------------------------------------------------------------

const c10::Device kCpu(c10::DeviceType::CPU);
c10::Device cuda(int i) { return {c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)}; }

c10::OperatorHandle op_handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                          const at::Tensor& parents) {
  static auto op = op_handle("torchspec::tree_attention")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, std::optional<double>)>();
  return op.call(q, k, v, lens, parents, std::nullopt);
}

using Verified = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
Verified verify_greedy(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logits) {
  static auto op = op_handle("torchspec::verify_tree_greedy")
                       .typed<Verified(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(tokens, parents, logits);
}
Verified verify_sampling(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& logits, double t,
                         const at::Tensor& u) {
  static auto op =
      op_handle("torchspec::verify_tree_sampling")
          .typed<Verified(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const at::Tensor&)>();
  return op.call(tokens, parents, logits, t, u);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_logprobs(const at::Tensor& logits, int64_t k) {
  static auto op = op_handle("torchspec::topk_logprobs")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double)>();
  return op.call(logits, k, 1.0);
}
using DraftLoss = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
DraftLoss draft_topk_kl(const at::Tensor& h, const at::Tensor& w, const at::Tensor& ids, const at::Tensor& lp,
                        const std::string& loss = "kl") {
  static auto op = op_handle("torchspec::draft_topk_kl")
                       .typed<DraftLoss(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, double, c10::string_view, double, double)>();
  return op.call(h, w, ids, lp, std::nullopt, 1.0, loss, 1.0, 1.0);
}

// The message of the RuntimeError fn() raises, or "" when it raises none.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

void expect_error(const std::function<void()>& fn, const std::string& pattern, const std::string& what) {
  const std::string msg = error_of(fn);
  check(std::regex_search(msg, std::regex(pattern)),
        what + ": expected an error matching /" + pattern + "/, got \"" + msg.substr(0, 400) + "\"");
}

// What the last launch ran on, and whether the caller's device is restored.
void expect_launch(cudaStream_t stream, int device, const std::string& what) {
  int current = -1;
  cudaGetDevice(&current);
  check(cuemu::stats().last_stream == stream && cuemu::stats().last_device == device,
        what + ": the kernel ran on device " + std::to_string(cuemu::stats().last_device) +
            (cuemu::stats().last_stream == stream ? " on" : " not on") +
            " the current stream of cuda:" + std::to_string(device));
  check(current == 0, what + ": the caller's current device (0) was not restored, it is " + std::to_string(current));
}

// Runs fn and checks it made no device-to-host transfer.
template <class F>
auto without_host_transfers(const std::string& what, F fn) {
  const int64_t before = g_host_transfers;
  auto result = fn();
  check(g_host_transfers == before,
        what + ": " + std::to_string(g_host_transfers - before) + " device-to-host transfers (a host sync each)");
  return result;
}

at::Tensor random_parents(int64_t B, int64_t T, at::Generator& gen) {
  at::Tensor p = at::empty({B, T}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    p[b][0] = -1;
    for (int64_t j = 1; j < T; ++j) p[b][j] = at::randint(0, j, {1}, gen, at::kLong).item<int64_t>();
  }
  return p;
}

// float64 tree attention on the CPU: a dense mask from the parents.
at::Tensor attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                               const at::Tensor& parents) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  at::Tensor mask = at::zeros({B, 1, T, S}, at::kBool);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t prefix = lens[b].item<int64_t>();
    for (int64_t j = 0; j < T; ++j) {
      for (int64_t t = 0; t < prefix; ++t) mask[b][0][j][t] = true;
      for (int64_t a = j; a >= 0; a = parents[b][a].item<int64_t>()) mask[b][0][j][prefix + a] = true;
    }
  }
  const at::Tensor k64 = k.to(at::kDouble).repeat_interleave(Hq / Hkv, 1);
  const at::Tensor v64 = v.to(at::kDouble).repeat_interleave(Hq / Hkv, 1);
  at::Tensor s = at::matmul(q.to(at::kDouble), k64.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  s = s.masked_fill(mask.logical_not(), -INFINITY);
  return at::matmul(at::softmax(s, -1), v64);
}

// ---- the tests ----------------------------------------------------------------------------------

// tree_attention on cuda:1 from device 0, with a stream of its own current on cuda:1: a transposed
// q (a contiguous copy on the device), int32 parents (converted there), no host transfer; the
// error against float64 at most twice the CPU op's.
void test_tree_attention(cudaStream_t stream1) {
  at::Generator gen = at::detail::createCPUGenerator(7);
  const int64_t B = 3, Hq = 6, Hkv = 2, T = 9, D = 40, S = 30;
  const at::Tensor q_btHd = at::randn({B, T, Hq, D}, gen);
  const at::Tensor q = q_btHd.transpose(1, 2);  // [B, Hq, T, D], not contiguous
  const at::Tensor k = at::randn({B, Hkv, S, D}, gen), v = at::randn({B, Hkv, S, D}, gen);
  const at::Tensor lens = at::tensor({5, 0, 17}, at::kLong);
  const at::Tensor parents = random_parents(B, T, gen).to(at::kInt);
  const at::Tensor ref = attention_reference(q, k, v, lens, parents.to(at::kLong));
  const at::Tensor cpu = tree_attention(q, k, v, lens, parents);
  const at::Tensor qd = q_btHd.to(cuda(1)).transpose(1, 2);
  const at::Tensor kd = k.to(cuda(1)), vd = v.to(cuda(1)), lensd = lens.to(cuda(1)), pard = parents.to(cuda(1));
  const at::Tensor out =
      without_host_transfers("tree_attention", [&] { return tree_attention(qd, kd, vd, lensd, pard); });
  expect_launch(stream1, 1, "tree_attention");
  check(out.is_cuda() && out.get_device() == 1 && out.sizes() == q.sizes(),
        "tree_attention: output on cuda:1, [B, Hq, T, D]");
  const double cpu_err = (cpu.to(at::kDouble) - ref).abs().max().item<double>();
  const double err = (out.to(kCpu).to(at::kDouble) - ref).abs().max().item<double>();
  check(err <= 2 * cpu_err + std::ldexp(v.abs().max().item<double>(), -22),
        "tree_attention on cuda:1: error " + std::to_string(err) + " > twice the CPU op's " + std::to_string(cpu_err));
}

// tree_attention in bfloat16 on cuda:1 (tensor cores on the emulated sm_90): one block of rows over a
// 600-key prefix is split into key ranges, so the op allocates the merge's workspace and launches
// two kernels on the current stream; the error against float64 within twice the CPU op's plus the
// rounding of P to bfloat16 (2^-8 of the largest |v|).
void test_tree_attention_tensor_cores(cudaStream_t stream1) {
  at::Generator gen = at::detail::createCPUGenerator(9);
  const int64_t B = 1, Hq = 2, Hkv = 1, T = 8, D = 64, S = 620;
  const at::Tensor q = at::randn({B, Hq, T, D}, gen).to(at::kBFloat16);
  const at::Tensor k = at::randn({B, Hkv, S, D}, gen).to(at::kBFloat16),
                   v = at::randn({B, Hkv, S, D}, gen).to(at::kBFloat16);
  const at::Tensor lens = at::tensor({600}, at::kLong);
  const at::Tensor parents = at::tensor({-1, 0, 0, 1, 1, 2, 5, 6}, at::kLong).view({B, T});
  const at::Tensor ref = attention_reference(q, k, v, lens, parents);
  const at::Tensor cpu = tree_attention(q, k, v, lens, parents);
  const uint64_t launches = cuemu::stats().launches;
  const at::Tensor out = without_host_transfers("tree_attention (bf16)", [&] {
    return tree_attention(q.to(cuda(1)), k.to(cuda(1)), v.to(cuda(1)), lens.to(cuda(1)), parents.to(cuda(1)));
  });
  expect_launch(stream1, 1, "tree_attention (bf16)");
  check(cuemu::stats().launches - launches == 2,
        "tree_attention (bf16): " + std::to_string(cuemu::stats().launches - launches) +
            " launches, want the key ranges' kernel and the merge");
  const double cpu_err = (cpu.to(at::kDouble) - ref).abs().max().item<double>();
  const double err = (out.to(kCpu).to(at::kDouble) - ref).abs().max().item<double>();
  const double bound = 2 * cpu_err + std::ldexp(v.to(at::kDouble).abs().max().item<double>(), -8);
  check(err <= bound, "tree_attention (bf16) on cuda:1: error " + std::to_string(err) + " > " + std::to_string(bound));
}

// verify_tree_greedy and verify_tree_sampling on cuda:1: the CPU op's integers exactly.
void test_verify(cudaStream_t stream1) {
  at::Generator gen = at::detail::createCPUGenerator(11);
  const int64_t B = 4, T = 12, V = 50;
  const at::Tensor logits = at::randn({B, T, V}, gen) * 3;
  const at::Tensor parents = random_parents(B, T, gen);
  at::Tensor tokens = at::randint(0, V, {B, T}, gen, at::kLong);
  const at::Tensor best = logits.argmax(-1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 1; j < T; j += 2) tokens[b][j] = best[b][parents[b][j].item<int64_t>()];  // accepted greedily
  }
  const at::Tensor u = at::rand({B, T}, gen, at::kDouble);
  const auto dev = [](const at::Tensor& t) { return t.to(cuda(1)); };
  for (int sampling = 0; sampling < 2; ++sampling) {
    const char* what = sampling ? "verify_tree_sampling" : "verify_tree_greedy";
    const Verified cpu =
        sampling ? verify_sampling(tokens, parents, logits, 0.8, u) : verify_greedy(tokens, parents, logits);
    const Verified got = without_host_transfers(what, [&] {
      return sampling ? verify_sampling(dev(tokens), dev(parents), dev(logits), 0.8, dev(u))
                      : verify_greedy(dev(tokens), dev(parents), dev(logits));
    });
    expect_launch(stream1, 1, what);
    check(at::equal(std::get<0>(got).to(kCpu), std::get<0>(cpu)) &&
              at::equal(std::get<1>(got).to(kCpu), std::get<1>(cpu)) &&
              at::equal(std::get<2>(got).to(kCpu), std::get<2>(cpu)),
          std::string(what) + " on cuda:1: not the CPU op's num_accepted, path and next_token");
  }
}

// topk_logprobs on strided rows (a slice of wider rows) on cuda:1: the CPU op's indices, values
// within float32 rounding of the log-sum-exp.
void test_topk(cudaStream_t stream1) {
  at::Generator gen = at::detail::createCPUGenerator(3);
  const at::Tensor wide = at::randn({5, 1200}, gen);
  const at::Tensor logits = wide.narrow(1, 3, 1000);
  const auto cpu = topk_logprobs(logits, 37);
  const auto got =
      without_host_transfers("topk_logprobs", [&] { return topk_logprobs(wide.to(cuda(1)).narrow(1, 3, 1000), 37); });
  expect_launch(stream1, 1, "topk_logprobs");
  check(at::equal(std::get<1>(got).to(kCpu), std::get<1>(cpu)),
        "topk_logprobs on cuda:1: indices differ from the CPU op's");
  check((std::get<0>(got).to(kCpu) - std::get<0>(cpu)).abs().max().item<double>() < 1e-5,
        "topk_logprobs on cuda:1: values differ from the CPU op's");
}

// Inputs the CUDA kernels check on the device: the call raises nothing (it cannot without a host
// sync), the bad batch row's outputs are NaN / -1, and the next torchspec call on that device
// raises the CPU op's message; a call on another device does not; the call after the error works.
void test_device_checks() {
  at::Generator gen = at::detail::createCPUGenerator(5);
  const int64_t B = 3, Hq = 4, Hkv = 2, T = 6, D = 16, S = 20;
  const at::Tensor q = at::randn({B, Hq, T, D}, gen), k = at::randn({B, Hkv, S, D}, gen),
                   v = at::randn({B, Hkv, S, D}, gen);
  const at::Tensor lens = at::tensor({3, 7, 0}, at::kLong);
  const at::Tensor parents =
      at::tensor({-1, 0, 0, 1, 1, 2, -1, 0, 1, 2, 3, 4, -1, 0, 0, 0, 0, 0}, at::kLong).view({B, T});
  const auto dev = [](const at::Tensor& t, int d = 1) { return t.to(cuda(d)); };
  const auto good = [&](int d = 1) { tree_attention(dev(q, d), dev(k, d), dev(v, d), dev(lens, d), dev(parents, d)); };
  struct Bad {
    std::function<void(at::Tensor&, at::Tensor&)> mutate;  // of (parents, lens)
    int64_t row;  // the batch row it spoils
    std::string message;
  };
  const std::vector<Bad> bad = {
      {[](at::Tensor& p, at::Tensor&) { p[1][3] = 5; }, 1,
       R"(parents\[1, 3\] = 5: a node's parent must be an earlier node)"},
      {[](at::Tensor& p, at::Tensor&) { p[1][2] = 2; }, 1,
       R"(parents\[1, 2\] = 2: a node's parent must be an earlier node)"},
      {[](at::Tensor& p, at::Tensor&) { p[2][0] = 0; }, 2,
       R"(parents\[2, 0\] must be -1 \(node 0 is the root\), got 0)"},
      {[](at::Tensor& p, at::Tensor&) { p[0][4] = -1; }, 0, R"(parents\[0, 4\] = -1: a second root)"},
      {[](at::Tensor&, at::Tensor& l) { l[1] = 15; }, 1,
       R"(prefix_lens\[1\] = 15: need 0 <= prefix_lens\[b\] and prefix_lens\[b\] \+ T <= S)"},
      {[](at::Tensor&, at::Tensor& l) { l[0] = -1; }, 0, R"(prefix_lens\[0\] = -1)"},
  };
  for (const Bad& c : bad) {
    at::Tensor p = parents.clone(), l = lens.clone();
    c.mutate(p, l);
    const std::string cpu_msg = error_of([&] { tree_attention(q, k, v, l, p); });
    check(std::regex_search(cpu_msg, std::regex(c.message)), "the CPU op raises /" + c.message + "/: " + cpu_msg);
    at::Tensor out;
    const std::string first = error_of([&] { out = tree_attention(dev(q), dev(k), dev(v), dev(l), dev(p)); });
    check(first.empty(), "tree_attention on cuda:1 with a bad input raised at once (a host sync?): " + first);
    if (!out.defined()) continue;
    const at::Tensor o = out.to(kCpu);
    const at::Tensor row_nan = o.isnan().flatten(1).all(1);
    for (int64_t b = 0; b < B; ++b) {
      check(row_nan[b].item<bool>() == (b == c.row), "tree_attention with /" + c.message + "/: batch row " +
                                                         std::to_string(b) +
                                                         " NaN: " + std::to_string(row_nan[b].item<bool>()));
    }
    check(error_of([&] { good(0); }).empty(), "an error on cuda:1 was raised by a call on cuda:0");
    expect_error([&] { good(1); },
                 "an earlier \\(or this\\) tree_attention call on cuda:1 found invalid input: " + c.message,
                 "the next call on cuda:1 after /" + c.message + "/");
    check(error_of([&] { good(1); }).empty(), "the call after the reported error failed too");
  }

  // Verification: a token outside the vocabulary, a uniform outside [0, 1), a malformed tree.
  const int64_t V = 10;
  const at::Tensor logits = at::randn({2, 4, V}, gen);
  const at::Tensor tok = at::tensor({1, 2, 3, 4, 5, 6, 7, 8}, at::kLong).view({2, 4});
  const at::Tensor par = at::tensor({-1, 0, 0, 1, -1, 0, 1, 1}, at::kLong).view({2, 4});
  const at::Tensor u = at::rand({2, 4}, gen, at::kDouble);
  struct BadVerify {
    int which;  // 0 tokens, 1 uniforms, 2 parents
    std::function<void(at::Tensor&)> mutate;
    int64_t row;  // the batch row it spoils
    std::string message;
    bool sampling_only;
  };
  const std::vector<BadVerify> bad_verify = {
      {0, [](at::Tensor& t) { t[1][2] = 10; }, 1, R"(tokens\[1, 2\] = 10 is not a token id in \[0, V = 10\))", false},
      {0, [](at::Tensor& t) { t[0][1] = -3; }, 0, R"(tokens\[0, 1\] = -3)", false},
      {1, [](at::Tensor& t) { t[1][2] = 1.0; }, 1, R"(uniforms\[1, 2\] = 1 is not in \[0, 1\))", true},
      {2, [](at::Tensor& t) { t[1][3] = 3; }, 1, R"(parents\[1, 3\] = 3: a node's parent must be an earlier node)",
       false},
  };
  for (const BadVerify& c : bad_verify) {
    for (int sampling = c.sampling_only ? 1 : 0; sampling < 2; ++sampling) {
      at::Tensor t = tok.clone(), p = par.clone(), uu = u.clone();
      c.mutate(c.which == 0 ? t : c.which == 1 ? uu : p);
      const auto call = [&](bool on_cuda) {
        const auto d = [&](const at::Tensor& x) { return on_cuda ? dev(x) : x; };
        return sampling ? verify_sampling(d(t), d(p), d(logits), 1.0, d(uu)) : verify_greedy(d(t), d(p), d(logits));
      };
      const std::string label =
          std::string(sampling ? "verify_tree_sampling" : "verify_tree_greedy") + " /" + c.message + "/";
      const std::string cpu_msg = error_of([&] { call(false); });
      check(std::regex_search(cpu_msg, std::regex(c.message)), "the CPU op raises " + label + ": " + cpu_msg);
      Verified got;
      const std::string first = error_of([&] { got = call(true); });
      check(first.empty(), label + " on cuda:1 raised at once (a host sync?): " + first);
      if (!std::get<0>(got).defined()) continue;
      const at::Tensor num = std::get<0>(got).to(kCpu);
      const int64_t r = c.row;
      check(num[r].item<int64_t>() == -1 && std::get<2>(got).to(kCpu)[r].item<int64_t>() == -1 &&
                (std::get<1>(got).to(kCpu)[r] == -1).all().item<bool>(),
            label + ": batch row " + std::to_string(r) + " is not all -1");
      check(num[1 - r].item<int64_t>() >= 0, label + ": the other batch row was spoilt");
      expect_error(
          [&] { verify_greedy(dev(tok), dev(par), dev(logits)); },
          "an earlier \\(or this\\) verify_tree_greedy / verify_tree_sampling call on cuda:1 found invalid input: " +
              c.message,
          "the next call on cuda:1 after " + label);
    }
  }

  // The draft loss's teacher ids, checked by a small kernel instead of .item().
  const int64_t N = 6, H = 8, Vd = 30, K = 4;
  const at::Tensor h = at::randn({N, H}, gen), w = at::randn({Vd, H}, gen);
  at::Tensor ids = at::randint(0, Vd, {N, K}, gen, at::kLong);
  const at::Tensor lp = at::log_softmax(at::randn({N, K}, gen), 1);
  const auto cpu_loss = draft_topk_kl(h, w, ids, lp);
  const auto got =
      without_host_transfers("draft_topk_kl", [&] { return draft_topk_kl(dev(h), dev(w), dev(ids), dev(lp)); });
  check(std::abs(std::get<0>(got).to(kCpu).item<double>() - std::get<0>(cpu_loss).item<double>()) < 1e-5,
        "draft_topk_kl on cuda:1: not the CPU op's loss");
  ids[4][2] = Vd;
  expect_error([&] { draft_topk_kl(h, w, ids, lp); }, R"(teacher_indices must be < Vd = 30)", "the CPU draft loss");
  // The op launches more kernels after the check: on the emulator (and maybe on a GPU) the op itself
  // sees the error before its next launch; else the next call raises it.
  std::string msg = error_of([&] {
    without_host_transfers("draft_topk_kl (bad id)", [&] { return draft_topk_kl(dev(h), dev(w), dev(ids), dev(lp)); });
  });
  if (msg.empty()) msg = error_of([&] { good(1); });
  check(
      std::regex_search(
          msg,
          std::regex(
              R"(an earlier \(or this\) draft_topk_kl call on cuda:1 found invalid input: teacher_indices\[4, 2\] = 30: teacher_indices must be -1 \(absent\) or in \[0, Vd = 30\))")),
      "draft_topk_kl with a bad teacher id on cuda:1: " + msg);
  check(error_of([&] { good(1); }).empty(), "the call after the reported draft loss error failed too");

  // The LK losses' check of teacher_logprobs (each counted row's log-sum-exp <= 0.01), on the device.
  ids[4][2] = 0;
  const auto cpu_lk = draft_topk_kl(h, w, ids, lp, "lk_alpha");
  const auto got_lk = without_host_transfers(
      "draft_topk_kl lk_alpha", [&] { return draft_topk_kl(dev(h), dev(w), dev(ids), dev(lp), "lk_alpha"); });
  check(std::abs(std::get<0>(got_lk).to(kCpu).item<double>() - std::get<0>(cpu_lk).item<double>()) < 1e-5,
        "draft_topk_kl lk_alpha on cuda:1: not the CPU op's loss");
  at::Tensor lk_logits = lp.clone();
  lk_logits[2].zero_();  // log-sum-exp log 4: logits passed as log-probabilities
  expect_error([&] { draft_topk_kl(h, w, ids, lk_logits, "lk_alpha"); }, R"(got a row whose log-sum-exp is 1.386)",
               "the CPU LK loss");
  msg = error_of([&] {
    without_host_transfers("draft_topk_kl lk_alpha (logits)",
                           [&] { return draft_topk_kl(dev(h), dev(w), dev(ids), dev(lk_logits), "lk_alpha"); });
  });
  if (msg.empty()) msg = error_of([&] { good(1); });
  check(std::regex_search(msg, std::regex(R"(draft_topk_kl call on cuda:1 found invalid input: teacher_logprobs must )"
                                          R"(be log-probabilities .* got row 2 whose log-sum-exp is 1.386)")),
        "draft_topk_kl lk_alpha with logits on cuda:1: " + msg);
  check(error_of([&] { good(1); }).empty(), "the call after the reported LK error failed too");
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cuemu::detail::emu();  // installs the fault handlers
  cuemu::add_device(232448);  // cuda:1, an H100's shared memory
  cudaSetDevice(1);
  cudaStream_t stream1 = nullptr;
  cudaStreamCreateWithFlags(&stream1, cudaStreamNonBlocking);
  torchspec::emulated_current_streams()[1] = stream1;
  cudaSetDevice(0);
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"tree_attention", [&] { test_tree_attention(stream1); }},
      {"tree_attention (tensor cores)", [&] { test_tree_attention_tensor_cores(stream1); }},
      {"verify", [&] { test_verify(stream1); }},
      {"topk", [&] { test_topk(stream1); }},
      {"device checks", [&] { test_device_checks(); }},
  };
  for (const auto& [name, fn] : tests) {
    const int before = g_failures;
    try {
      fn();
    } catch (const std::exception& e) {
      check(false, std::string(name) + ": unexpected exception: " + e.what());
    }
    std::printf("%s: %s\n", name, g_failures == before ? "passed" : "FAILED");
  }
  std::printf("op layer on the emulator: %d checks, %d failed (%llu launches)\n", g_checks, g_failures,
              static_cast<unsigned long long>(cuemu::stats().launches));
  return g_failures == 0 ? 0 : 1;
}
