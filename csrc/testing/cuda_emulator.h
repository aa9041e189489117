// A CPU emulator of the part of the CUDA execution model that csrc/kernels uses, so that the CUDA
// kernels run, and are compared with their CPU twins, on a machine without a GPU.
//
// The .cu files compile for it with g++ (-x c++ -std=c++20, csrc/testing/include first on the
// include path: their <cuda_runtime.h>, <cuda_fp16.h> ... resolve to this header). Each CUDA thread
// of a block is a fiber with its own stack; blocks run one after the other; a block's fibers switch
// only at __syncthreads, __syncwarp and the warp collectives, which are checked rendezvous: every
// thread of the block at the same __syncthreads, every lane of the mask at the same collective
// (same call site, same mask), no exited thread awaited. Shared memory is poisoned at every block
// start, a guard page follows the dynamic part, and a launch asking for more than 48 KiB (static +
// dynamic) fails unless cudaFuncAttributeMaxDynamicSharedMemorySize allows it, as on a GPU (whose
// opt-in limit is the device's, add_device). cudaFuncSetAttribute, cudaFuncGetAttributes,
// cudaGetLastError and cudaDeviceGetAttribute behave as the runtime's, so the launchers' logic runs as
// written. Several devices (cudaSetDevice; the kernels' attributes are per device), streams and events
// (kernels run at their launch; work that only completes later, such as the fake NCCL's transfers, is
// an item queued with enqueue_pending), mapped pinned host memory.
//
// A kernel that deadlocks, diverges at a barrier or a collective, reads a lane outside the mask,
// makes a misaligned vector load, overflows shared memory or a fiber stack, or touches a guard
// page of cudaMalloc'd memory is reported (kernel, block, thread, site, options().context) and the
// process exits with status 3. The thread order is selectable (Order). What it cannot find:
// races within an interval between two sync points, memory-ordering bugs, the GPU's float
// rounding (the math functions are libm's), anything about speed. See docs/cuda_emulator.md.
#pragma once

#define TORCHSPEC_CUDA_EMULATOR 1

#include <math.h>  // ::exp2f, ::isfinite, INFINITY ... as device code calls them
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <source_location>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(CUEMU_UCONTEXT)
#include <ucontext.h>
#define CUEMU_USE_UCONTEXT 1
#endif

// ---- what the kernel files spell differently for the emulator (see kernels/cuda_common.cuh) ----
// A static __shared__ variable: one object per block (the fibers of a block share it), keyed by
// the declaration (a function-local static's address is unique per template instance).
#define TORCHSPEC_SHARED(type, name) \
  static char name##_cuemu_key_;     \
  type& name = ::cuemu::detail::static_shared<type>(&name##_cuemu_key_)
#define TORCHSPEC_EXTERN_SHARED(type, name) type* name = ::cuemu::detail::dynamic_shared<type>()
#define TORCHSPEC_LAUNCH(kernel, grid, block, smem, stream) ::cuemu::Launch(kernel, #kernel, grid, block, smem, stream)

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- runtime API types (the subset the kernels and the tests use; values as in the runtime) ----
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = struct CUstream_st*;
using cudaEvent_t = struct CUevent_st*;
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaHostAllocMapped 0x02
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// ---- half and bfloat16 (as bits; conversions round to nearest even) ----
struct __half {
  uint16_t bits_;
};
struct __nv_bfloat16 {
  uint16_t bits_;
};

inline uint32_t __float_as_uint(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
inline float __uint_as_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits_, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // GCC's conversion rounds to nearest even
  __half h;
  std::memcpy(&h.bits_, &f, 2);
  return h;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const uint32_t b = __float_as_uint(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFFu};  // NaN: the canonical one, as CUDA's
  return {static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits_; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.bits_) << 16); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

// CUDA's min / max overloads for one type (mixed types do not compile, as they would be ambiguous).
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// The built-in variables: set by the scheduler before it resumes a thread.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace cuemu {

enum class Order {
  kForward,  // sweeps over the ready threads, lowest index first; a rendezvous completes, all wait
  kReverse,  // the same, highest index first
  kRandom,  // each sweep in a random order (options().seed)
  // Depth first: the thread that completes a rendezvous runs on at once, then the threads it
  // released (lowest first) before any other, so that a warp runs ahead of the block as far as
  // it can, as a fast warp does on a GPU: a missing barrier before a warp's next write shows.
  kEager,
};

inline const char* order_name(Order o) {
  switch (o) {
    case Order::kForward:
      return "forward";
    case Order::kReverse:
      return "reverse";
    case Order::kRandom:
      return "random";
    case Order::kEager:
      return "eager";
  }
  return "?";
}

struct Options {
  Order order = Order::kForward;
  uint64_t seed = 1;
  unsigned char poison = 0xFF;  // shared memory's bytes at block start (0xFF: NaN floats, -1 ints)
  // Which blocks run (linear index, x fastest); all when empty. For huge grids: some first and last.
  std::function<bool(uint64_t block, uint64_t blocks)> run_block;
  std::string context;  // printed with every fault: what the test was doing
  // Called at the start of every launch, before its configuration is checked: a test can make
  // another host thread's launch happen "in between" (the launchers' shared-memory race).
  std::function<void()> before_launch;
  // Called by the stream and event functions with their name: an error other than cudaSuccess is
  // returned instead of doing the call (fault injection for the pipeline's tests).
  std::function<cudaError_t(const char* api)> fail_call;
  // A launch that takes more CPU seconds than this is reported as a fault (an endless loop: a walk
  // up a tree with a cycle, say) instead of hanging the test.
  double launch_cpu_limit_s = 120.0;
};

inline Options& options() {
  static Options o;
  return o;
}

// Counts, for the tests' summary.
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, rendezvous = 0;
  // The last launch's stream and current device (the op layer must launch on the current stream
  // of the tensors' device).
  cudaStream_t last_stream = nullptr;
  int last_device = -1;
  uint64_t streams_created = 0, streams_destroyed = 0, events_created = 0, events_destroyed = 0;
};
inline Stats& stats() {
  static Stats s;
  return s;
}

namespace detail {

constexpr size_t kDefaultSmem = 48 * 1024;  // per block without the attribute, static included
constexpr size_t kStaticArena = 48 * 1024;  // the most static shared memory a kernel may declare
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

inline size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
inline size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

[[noreturn]] inline void fault(const std::string& message);

// ---- fibers ----
struct Context {
#if defined(CUEMU_USE_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

#if !defined(CUEMU_USE_UCONTEXT)
// Saves the callee-saved registers and the x87 / SSE control words on the current stack, stores
// the stack pointer in *save and resumes the stack `load` (saved here, or made by make_context).
// swapcontext would do, but it makes a system call per switch (it saves the signal mask), and the
// kernels switch at every shuffle.
extern "C" __attribute__((naked, noinline)) inline void cuemu_switch(void** /*save*/, void* /*load*/) {
  asm("pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $16, %rsp\n\tfnstcw (%rsp)\n\tstmxcsr 8(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "fldcw (%rsp)\n\tldmxcsr 8(%rsp)\n\taddq $16, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}
#endif

// A context that starts `entry` (which must never return) on the stack [lo, lo + size).
inline void make_context(Context& c, char* lo, size_t size, void (*entry)()) {
#if defined(CUEMU_USE_UCONTEXT)
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#else
  // The frame cuemu_switch pops: control words, six registers, then `entry` as the return
  // address, above it a null one (entry sees the stack as just after a call: rsp = 8 mod 16).
  const uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t{15};
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 10;
  uint16_t fcw;
  uint32_t mxcsr;
  asm volatile("fnstcw %0" : "=m"(fcw));
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  std::memset(sp, 0, 10 * sizeof(uint64_t));
  std::memcpy(sp, &fcw, sizeof(fcw));
  std::memcpy(sp + 1, &mxcsr, sizeof(mxcsr));
  sp[8] = reinterpret_cast<uint64_t>(entry);
  c.sp = sp;
#endif
}

inline void switch_context(Context& from, Context& to) {
#if defined(CUEMU_USE_UCONTEXT)
  swapcontext(&from.uc, &to.uc);
#else
  cuemu_switch(&from.sp, to.sp);
#endif
}

// ---- call sites ----
struct Site {
  const char* file = nullptr;
  unsigned line = 0, column = 0;
  Site() = default;
  explicit Site(const std::source_location& l) : file(l.file_name()), line(l.line()), column(l.column()) {}
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column && (file == o.file || std::strcmp(file, o.file) == 0);
  }
  std::string str() const {
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line) + ":" + std::to_string(column);
  }
};

enum class Kind { kShfl, kShflXor, kShflUp, kBallot, kSyncwarp, kMmaBf16, kMmaF16 };
inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kShfl:
      return "__shfl_sync";
    case Kind::kShflXor:
      return "__shfl_xor_sync";
    case Kind::kShflUp:
      return "__shfl_up_sync";
    case Kind::kBallot:
      return "__ballot_sync";
    case Kind::kSyncwarp:
      return "__syncwarp";
    case Kind::kMmaBf16:
      return "mma.sync.m16n8k16 (bf16)";
    case Kind::kMmaF16:
      return "mma.sync.m16n8k16 (f16)";
  }
  return "?";
}

// A copy that cp.async has issued and not yet made (see cp_async).
struct AsyncCopy {
  char* dst;
  const char* src;
  int bytes;  // copied; the rest of the 16 are zeros
  void run() const {
    std::memcpy(dst, src, bytes);
    std::memset(dst + bytes, 0, 16 - bytes);
  }
};

enum class State { kReady, kBarrier, kWarp, kExited };

struct Thread {
  Context ctx;
  uint3 idx{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::kReady;
  uint64_t result = 0;  // of the collective it waited for
  float mma_out[4] = {};  // of the mma it waited for
  std::vector<AsyncCopy> open_copies;  // cp.async since the last commit
  std::vector<std::vector<AsyncCopy>> copy_groups;  // committed, oldest first
};

// The collective a warp's lanes are gathering at (one at a time per warp).
struct WarpOp {
  unsigned lanes = 0;  // the lanes this warp has (all 32 but in a partial last warp)
  unsigned exited = 0;
  bool active = false;
  Kind kind = Kind::kShfl;
  Site site;
  unsigned mask = 0, arrived = 0;
  int width = 32;
  uint64_t value[32] = {};
  int arg[32] = {};
  uint32_t mma_in[32][10] = {};  // each lane's A (4), B (2) and C (4, float bits) registers
};

struct KernelInfo {
  std::string name;
  bool static_known = false;  // a block ran to its end: every static declaration was seen
  size_t static_bytes = 0;
  std::map<const void*, size_t> static_offsets;  // declaration -> offset in the block's arena
  std::map<int, int> max_dynamic;  // per device: cudaFuncAttributeMaxDynamicSharedMemorySize, once set
  bool attribute_before_known = false;  // set while static_bytes was not known yet
};

class Emulator {
 public:
  Emulator() {
    static_arena_ = static_cast<char*>(std::aligned_alloc(64, kStaticArena));
    install_signal_handlers();
  }

  // ---- runtime API ----
  cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) last_error_ = e;
    return e;
  }
  cudaError_t get_last_error() {
    const cudaError_t e = last_error_;
    last_error_ = cudaSuccess;
    return e;
  }
  cudaError_t peek_last_error() const { return last_error_; }

  KernelInfo& kernel(const void* key) { return kernels_[key]; }

  // Largest dynamic shared memory a launch of k may ask for on the current device.
  size_t dynamic_limit(const KernelInfo& k) const {
    auto it = k.max_dynamic.find(device_);
    if (it != k.max_dynamic.end()) return static_cast<size_t>(it->second);
    return k.static_bytes >= kDefaultSmem ? 0 : kDefaultSmem - k.static_bytes;
  }

  cudaError_t set_max_dynamic(const void* key, int value) {
    KernelInfo& k = kernel(key);
    if (value < 0 || static_cast<size_t>(value) + k.static_bytes > optin()) return set_error(cudaErrorInvalidValue);
    k.max_dynamic[device_] = value;
    if (!k.static_known) k.attribute_before_known = true;
    return cudaSuccess;
  }

  bool stream_usable(cudaStream_t s) const;

  // ---- devices ----
  int device() const { return device_; }
  int device_count() const { return static_cast<int>(optin_.size()); }
  size_t optin() const { return static_cast<size_t>(optin_[device_]); }
  int optin_of(int device) const { return optin_[device]; }
  cudaError_t set_device(int d) {
    if (d < 0 || d >= device_count()) return set_error(cudaErrorInvalidDevice);
    device_ = d;
    return cudaSuccess;
  }
  int add_device(int smem_optin, int cc_major) {
    optin_.push_back(smem_optin);
    cc_major_.push_back(cc_major);
    return device_count() - 1;
  }
  int cc_major_of(int device) const { return cc_major_[device]; }

  void get_attributes(const void* key, cudaFuncAttributes* a) {
    KernelInfo& k = kernel(key);
    std::memset(a, 0, sizeof(*a));
    a->sharedSizeBytes = k.static_bytes;  // before its first block ran: what was seen so far (0)
    a->maxThreadsPerBlock = kMaxThreads;
    a->maxDynamicSharedSizeBytes = static_cast<int>(dynamic_limit(k));
  }

  void launch(const void* key, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
              std::function<void()> body);

  // ---- inside a kernel ----
  template <class T>
  T& static_shared(const void* decl);
  char* dynamic_base() const { return dyn_base_; }
  uint64_t collective(Kind kind, unsigned mask, uint64_t value, int arg, int width, const Site& site,
                      const uint32_t* mma_in = nullptr);
  // mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: a full-warp collective (d = a * b + c).
  void mma(Kind kind, const uint32_t* a, const uint32_t* b, const float* c, float* d, const Site& site);
  // cp.async.cg.shared.global of 16 bytes (src_bytes of them read, the rest zeros), its groups.
  void cp_async(void* dst, const void* src, int src_bytes);
  void cp_async_commit();
  void cp_async_wait(int pending);
  // __syncthreads (kind 0), or __syncthreads_or / _and / _count (1, 2, 3) of each thread's predicate.
  int barrier(const Site& site, int kind = 0, int predicate = 0);
  [[noreturn]] void thread_main();

  // ---- faults ----
  std::string where() const;
  bool in_kernel() const { return kinfo_ != nullptr; }
  void describe_address(const void* addr, char* out, size_t n) const;
  // Device memory (see cudaMalloc): the buffer [p, p + n) inside the mapping [map, map + map_size).
  struct Guarded {
    char* map;
    size_t map_size;
    char* p;
    size_t n;
  };
  void add_guarded(const Guarded& g) { guarded_.push_back(g); }
  bool remove_guarded(char* p, Guarded* out) {
    for (size_t i = 0; i < guarded_.size(); ++i) {
      if (guarded_[i].p == p) {
        *out = guarded_[i];
        guarded_.erase(guarded_.begin() + static_cast<std::ptrdiff_t>(i));
        return true;
      }
    }
    return false;
  }

 private:
  void run_block(uint64_t linear);
  void finish_block();
  void resume(Thread& t);
  void to_scheduler(State s);
  void make_ready(Thread& t) {
    t.state = State::kReady;
    if (options().order == Order::kEager) ready_.push_back(t.linear);
  }
  void complete(WarpOp& op);
  std::string describe_waits() const;
  void prepare_dynamic(size_t smem);
  void prepare_stacks(int n);
  static void install_signal_handlers();

  cudaError_t last_error_ = cudaSuccess;
  std::map<const void*, KernelInfo> kernels_;
  std::vector<int> optin_{232448};  // per device: cudaDevAttrMaxSharedMemoryPerBlockOptin (H100 / H200: 227 KiB)
  std::vector<int> cc_major_{9};  // per device: the compute capability's major (sm_90)
  int device_ = 0;

  // The launch being run.
  KernelInfo* kinfo_ = nullptr;
  const char* kname_ = "";
  size_t dyn_bytes_ = 0;
  bool launch_failed_ = false;  // a static declaration took the block over the limit
  std::function<void()> body_;
  dim3 grid_, block_;

  // The block being run.
  std::vector<Thread> threads_;
  std::vector<WarpOp> warps_;
  bool barrier_active_ = false;
  Site barrier_site_;
  int barrier_arrived_ = 0, barrier_count_ = 0, live_ = 0, exited_ = 0;
  Thread* cur_ = nullptr;
  std::vector<int> ready_;  // kEager: the ready threads, the next on top
  Context sched_;
  uint64_t rng_ = 0;

  // Memory.
  char* static_arena_ = nullptr;
  char* dyn_map_ = nullptr;  // [dyn_map_, dyn_guard_) usable, then one guard page
  char* dyn_guard_ = nullptr;
  char* dyn_base_ = nullptr;  // dyn_guard_ - round_up(dyn_bytes_, 16)
  char* stacks_ = nullptr;  // per thread: a guard page, then kStackBytes
  int stack_count_ = 0;
  std::vector<Guarded> guarded_;
};

inline Emulator& emu() {
  static Emulator e;
  return e;
}

inline std::string Emulator::where() const {
  std::string s = std::string("kernel ") + kname_;
  if (kinfo_ != nullptr) {
    s += " block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         ") of (" + std::to_string(grid_.x) + "," + std::to_string(grid_.y) + "," + std::to_string(grid_.z) + ")";
  }
  if (cur_ != nullptr) {
    s += ", thread " + std::to_string(cur_->linear) + " (warp " + std::to_string(cur_->warp) + ", lane " +
         std::to_string(cur_->lane) + ")";
  }
  s += ", order " + std::string(order_name(options().order));
  if (!options().context.empty()) s += "\n  test: " + options().context;
  return s;
}

[[noreturn]] inline void fault(const std::string& message) {
  std::fprintf(stderr, "cuemu: FAULT: %s\n  at %s\n", message.c_str(), emu().where().c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  _exit(3);
}

inline void Emulator::describe_address(const void* addr, char* out, size_t n) const {
  const char* a = static_cast<const char*>(addr);
  if (dyn_guard_ != nullptr && a >= dyn_guard_ && a < dyn_guard_ + page_size()) {
    std::snprintf(out, n, "past the end of dynamic shared memory (%zu bytes asked, byte %td)", dyn_bytes_,
                  a - dyn_base_);
    return;
  }
  if (stacks_ != nullptr) {
    const size_t per = kStackBytes + page_size();
    if (a >= stacks_ && a < stacks_ + per * stack_count_ && static_cast<size_t>(a - stacks_) % per < page_size()) {
      std::snprintf(out, n, "a thread's stack overflowed (%zu bytes)", kStackBytes);
      return;
    }
  }
  for (const Guarded& g : guarded_) {
    if (a >= g.map && a < g.map + g.map_size) {
      std::snprintf(out, n, "outside a cudaMalloc'd buffer of %zu bytes (offset %td)", g.n, a - g.p);
      return;
    }
  }
  std::snprintf(out, n, "an address the kernel does not own");
}

inline void Emulator::install_signal_handlers() {
  // On an alternate stack: the fault may be a fiber's stack overflow.
  static char alt[64 * 1024];
  stack_t ss{};
  ss.ss_sp = alt;
  ss.ss_size = sizeof(alt);
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sa.sa_sigaction = [](int sig, siginfo_t* info, void*) {
    char what[256];
    if (sig == SIGFPE) {
      std::snprintf(what, sizeof(what), "arithmetic exception (an integer division by zero?)");
    } else {
      emu().describe_address(info->si_addr, what, sizeof(what));
    }
    std::fprintf(stderr, "cuemu: FAULT: %s at address %p: %s\n  at %s\n", strsignal(sig), info->si_addr, what,
                 emu().in_kernel() ? emu().where().c_str() : "host code (no kernel running)");
    std::fflush(stderr);
    _exit(3);
  };
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
  struct sigaction slow{};
  slow.sa_flags = SA_ONSTACK;
  slow.sa_handler = [](int) {
    std::fprintf(stderr, "cuemu: FAULT: the launch ran past %.0f s of CPU (an endless loop?)\n  at %s\n",
                 options().launch_cpu_limit_s, emu().in_kernel() ? emu().where().c_str() : "host code");
    std::fflush(stderr);
    _exit(3);
  };
  sigaction(SIGPROF, &slow, nullptr);
}

// Arms (seconds > 0) or disarms the CPU-time limit of a launch.
inline void set_cpu_alarm(double seconds) {
  itimerval t{};
  t.it_value.tv_sec = static_cast<time_t>(seconds);
  t.it_value.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(t.it_value.tv_sec)) * 1e6);
  setitimer(ITIMER_PROF, &t, nullptr);
}

inline void Emulator::prepare_dynamic(size_t smem) {
  const size_t page = page_size();
  const size_t usable = round_up(std::max<size_t>(smem, 1), page);
  if (dyn_map_ == nullptr || static_cast<size_t>(dyn_guard_ - dyn_map_) < usable) {
    if (dyn_map_ != nullptr) munmap(dyn_map_, static_cast<size_t>(dyn_guard_ - dyn_map_) + page);
    void* m = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fault("mmap of dynamic shared memory failed");
    dyn_map_ = static_cast<char*>(m);
    dyn_guard_ = dyn_map_ + usable;
    mprotect(dyn_guard_, page, PROT_NONE);
  }
  dyn_bytes_ = smem;
  dyn_base_ = dyn_guard_ - round_up(smem, 16);  // 16-byte aligned, as the GPU's; the slack is checked
}

inline void Emulator::prepare_stacks(int n) {
  if (n <= stack_count_) return;
  const size_t per = kStackBytes + page_size();
  if (stacks_ != nullptr) munmap(stacks_, per * stack_count_);
  void* m = mmap(nullptr, per * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) fault("mmap of the fiber stacks failed");
  stacks_ = static_cast<char*>(m);
  stack_count_ = n;
  for (int i = 0; i < n; ++i) mprotect(stacks_ + per * i, page_size(), PROT_NONE);
}

inline void Emulator::launch(const void* key, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             std::function<void()> body) {
  if (options().before_launch) {
    const std::function<void()> hook = std::move(options().before_launch);  // once, and not in its own launches
    options().before_launch = nullptr;
    hook();
  }
  KernelInfo& k = kernel(key);
  if (k.name.empty()) k.name = name;
  if (!stream_usable(stream)) {  // destroyed, or created on another device than the current one
    set_error(cudaErrorInvalidResourceHandle);
    return;
  }
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  // A kernel whose static size is not known yet is checked as its declarations run (static_shared).
  if (smem > dynamic_limit(k) || k.static_bytes + smem > optin()) {
    set_error(cudaErrorInvalidValue);
    return;
  }
  ++stats().launches;
  stats().last_stream = stream;
  stats().last_device = device_;
  kinfo_ = &k;
  kname_ = k.name.c_str();
  body_ = std::move(body);
  grid_ = grid;
  block_ = block;
  gridDim = grid;
  blockDim = block;
  launch_failed_ = false;
  prepare_dynamic(smem);
  prepare_stacks(static_cast<int>(nthreads));
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  set_cpu_alarm(options().launch_cpu_limit_s);
  for (uint64_t b = 0; b < blocks && !launch_failed_; ++b) {
    if (options().run_block && !options().run_block(b, blocks)) continue;
    run_block(b);
  }
  set_cpu_alarm(0);
  if (launch_failed_) set_error(cudaErrorInvalidValue);
  kinfo_ = nullptr;
  body_ = nullptr;
  kname_ = "";
}

// One fiber per thread, run by sweeps over the ready ones until all have exited.
inline void Emulator::run_block(uint64_t linear) {
  ++stats().blocks;
  blockIdx = uint3{static_cast<unsigned>(linear % grid_.x), static_cast<unsigned>(linear / grid_.x % grid_.y),
                   static_cast<unsigned>(linear / (uint64_t{grid_.x} * grid_.y))};
  const int n = static_cast<int>(block_.x * block_.y * block_.z);
  stats().threads += n;
  threads_.assign(n, Thread{});
  warps_.assign((n + 31) / 32, WarpOp{});
  for (int w = 0; w < static_cast<int>(warps_.size()); ++w) {
    const int lanes = std::min(32, n - 32 * w);
    warps_[w].lanes = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
  }
  barrier_active_ = false;
  barrier_arrived_ = exited_ = 0;
  live_ = n;
  std::memset(static_arena_, options().poison, kinfo_->static_known ? kinfo_->static_bytes : kStaticArena);
  std::memset(dyn_map_, options().poison, static_cast<size_t>(dyn_guard_ - dyn_map_));
  const size_t per = kStackBytes + page_size();
  for (int i = 0; i < n; ++i) {
    Thread& t = threads_[i];
    t.linear = i;
    t.idx = uint3{static_cast<unsigned>(i % block_.x), static_cast<unsigned>(i / block_.x % block_.y),
                  static_cast<unsigned>(i / (block_.x * block_.y))};
    t.lane = i & 31;
    t.warp = i >> 5;
    make_context(t.ctx, stacks_ + per * i + page_size(), kStackBytes, [] { emu().thread_main(); });
  }
  rng_ = options().seed * 0x9E3779B97F4A7C15ull + linear + 1;
  if (options().order == Order::kEager) {
    ready_.clear();
    for (int i = n - 1; i >= 0; --i) ready_.push_back(i);
    while (live_ > 0 && !launch_failed_) {
      if (ready_.empty()) {
        cur_ = nullptr;
        fault("deadlock: no thread can run\n" + describe_waits());
      }
      const int i = ready_.back();
      ready_.pop_back();
      resume(threads_[i]);
    }
    finish_block();
    return;
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = options().order == Order::kReverse ? n - 1 - i : i;
  while (live_ > 0) {
    if (options().order == Order::kRandom) {
      for (int i = n - 1; i > 0; --i) {
        rng_ ^= rng_ << 13;
        rng_ ^= rng_ >> 7;
        rng_ ^= rng_ << 17;
        std::swap(order[i], order[rng_ % static_cast<uint64_t>(i + 1)]);
      }
    }
    bool progressed = false;
    for (int i : order) {
      if (threads_[i].state != State::kReady) continue;
      progressed = true;
      resume(threads_[i]);
      if (launch_failed_) break;
    }
    if (launch_failed_) break;
    if (!progressed) {
      cur_ = nullptr;
      fault("deadlock: no thread can run\n" + describe_waits());
    }
  }
  finish_block();
}

inline void Emulator::finish_block() {
  cur_ = nullptr;
  if (launch_failed_) return;
  kinfo_->static_known = true;
  // The bytes between the end of the dynamic shared memory and the guard page must be untouched.
  for (const char* c = dyn_base_ + dyn_bytes_; c < dyn_guard_; ++c) {
    if (static_cast<unsigned char>(*c) != options().poison) {
      fault("a write past the end of dynamic shared memory (" + std::to_string(dyn_bytes_) + " bytes asked, byte " +
            std::to_string(c - dyn_base_) + " written)");
    }
  }
}

inline void Emulator::resume(Thread& t) {
  cur_ = &t;
  threadIdx = t.idx;
  switch_context(sched_, t.ctx);
}

inline void Emulator::to_scheduler(State s) {
  Thread& t = *cur_;
  t.state = s;
  switch_context(t.ctx, sched_);
  // Resumed: the scheduler has set cur_ and threadIdx back to this thread.
}

[[noreturn]] inline void Emulator::thread_main() {
  body_();
  Thread& t = *cur_;
  const WarpOp& op = warps_[t.warp];
  if (op.active && (op.mask & (1u << t.lane))) {
    fault("thread exited while named in the mask of a pending " + std::string(kind_name(op.kind)) + " at " +
          op.site.str());
  }
  if (barrier_active_) {
    fault("thread exited while " + std::to_string(barrier_arrived_) + " threads wait at __syncthreads at " +
          barrier_site_.str());
  }
  warps_[t.warp].exited |= 1u << t.lane;
  ++exited_;
  --live_;
  to_scheduler(State::kExited);
  fault("an exited thread was resumed");  // unreachable
}

template <class T>
T& Emulator::static_shared(const void* decl) {
  if (kinfo_ == nullptr) fault("a __shared__ declaration outside a kernel");
  KernelInfo& k = *kinfo_;
  auto it = k.static_offsets.find(decl);
  if (it == k.static_offsets.end()) {
    if (k.static_known) fault("a __shared__ declaration not seen in the kernel's first block (declared in a branch?)");
    const size_t offset = round_up(k.static_bytes, alignof(T));
    k.static_bytes = offset + sizeof(T);
    if (k.static_bytes > kStaticArena) fault("more than 48 KiB of static shared memory: the kernel would not compile");
    it = k.static_offsets.emplace(decl, offset).first;
    const size_t optin = this->optin();
    auto set = k.max_dynamic.find(device_);
    if (k.attribute_before_known && set != k.max_dynamic.end() &&
        static_cast<size_t>(set->second) + k.static_bytes > optin) {
      fault(
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize) was accepted before the kernel's static shared memory "
          "was known, and it is too large for it: launch the kernel once with a small case first");
    }
    if (dyn_bytes_ > dynamic_limit(k) || k.static_bytes + dyn_bytes_ > optin) {
      // The launch would have failed before it ran: give up the launch (its first block ran this far).
      launch_failed_ = true;
      to_scheduler(State::kReady);
      fault("a failed launch resumed");  // unreachable: the scheduler drops the block
    }
  }
  return *reinterpret_cast<T*>(static_arena_ + it->second);
}

inline std::string hex(unsigned mask) {
  char m[16];
  std::snprintf(m, sizeof(m), "%08x", mask);
  return m;
}

inline std::string Emulator::describe_waits() const {
  std::string s;
  int i = 0;
  const int n = static_cast<int>(threads_.size());
  while (i < n) {
    const Thread& t = threads_[i];
    std::string what;
    switch (t.state) {
      case State::kReady:
        what = "ready";
        break;
      case State::kExited:
        what = "exited";
        break;
      case State::kBarrier:
        what = "at __syncthreads " + barrier_site_.str();
        break;
      case State::kWarp: {
        const WarpOp& op = warps_[t.warp];
        what = std::string("at ") + kind_name(op.kind) + " " + op.site.str() + " (mask " + hex(op.mask) + ")";
        break;
      }
    }
    int j = i + 1;
    while (j < n && threads_[j].state == t.state && (t.state != State::kWarp || threads_[j].warp == t.warp)) ++j;
    s += "  threads " + std::to_string(i) + "-" + std::to_string(j - 1) + ": " + what + "\n";
    i = j;
  }
  return s;
}

inline uint64_t Emulator::collective(Kind kind, unsigned mask, uint64_t value, int arg, int width, const Site& site,
                                     const uint32_t* mma_in) {
  if (cur_ == nullptr) fault(std::string(kind_name(kind)) + " outside a kernel");
  ++stats().rendezvous;
  Thread& t = *cur_;
  const unsigned bit = 1u << t.lane;
  const std::string_view what = kind_name(kind);
  if (!(mask & bit)) fault(std::string(what) + " at " + site.str() + ": the calling lane is not in mask " + hex(mask));
  WarpOp& op = warps_[t.warp];
  if (!op.active) {
    // The mask is checked once per collective: every later lane must bring the same one, and a
    // lane that exits while named in it is reported by thread_main.
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
      fault(std::string(what) + ": width " + std::to_string(width));
    if (mask & ~op.lanes) {
      fault(std::string(what) + " at " + site.str() + ": mask " + hex(mask) + " names lanes the block does not have");
    }
    if (mask & op.exited) {
      fault(std::string(what) + " at " + site.str() + ": mask " + hex(mask) + " names lane " +
            std::to_string(__builtin_ctz(mask & op.exited)) + ", which has exited");
    }
    op.active = true;
    op.kind = kind;
    op.site = site;
    op.mask = mask;
    op.arrived = 0;
    op.width = width;
  } else if (op.kind != kind || !(op.site == site) || op.mask != mask || op.width != width) {
    fault("divergent warp collective: this lane is at " + std::string(what) + " " + site.str() + " (mask " + hex(mask) +
          ") while lanes of its warp wait at " + kind_name(op.kind) + " " + op.site.str() + " (mask " + hex(op.mask) +
          ")");
  }
  op.value[t.lane] = value;
  op.arg[t.lane] = arg;
  if (mma_in != nullptr) std::memcpy(op.mma_in[t.lane], mma_in, sizeof(op.mma_in[0]));
  op.arrived |= bit;
  if (op.arrived != op.mask) {
    to_scheduler(State::kWarp);
    return t.result;
  }
  complete(op);
  if (options().order != Order::kEager) to_scheduler(State::kReady);
  return t.result;
}

// The arithmetic of the emulated mma.sync (the "CPU twin" of a tensor core): A 16x16 and B 16x8 as
// the fragments lay them out (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; groupID = lane / 4, t = lane % 4), each product exact in float32 (8- or 11-bit
// significands), summed into C in float32 in the order k = 0..15. A GPU's tensor cores sum in an
// order and with a rounding of their own, which this does not claim to reproduce.
inline void mma_m16n8k16(Kind kind, const uint32_t (*in)[10], float (*out)[4]) {
  const auto element = [kind](uint32_t reg, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
    if (kind == Kind::kMmaBf16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
  };
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {  // a_i: row g (+8 for i in {2,3,6,7}), col 2t + (i & 1) (+8 for i >= 4)
      const int row = g + ((i & 2) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = element(in[lane][i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {  // b_i: row 2t + (i & 1) (+8 for i >= 2), col g
      b[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = element(in[lane][4 + i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) c[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = __uint_as_float(in[lane][6 + i]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float acc = c[row][col];
      for (int k = 0; k < 16; ++k) acc += a[row][k] * b[k][col];
      out[lane][i] = acc;
    }
  }
}

inline void Emulator::complete(WarpOp& op) {
  const int base = 32 * cur_->warp;
  if (op.kind == Kind::kMmaBf16 || op.kind == Kind::kMmaF16) {
    float out[32][4];
    mma_m16n8k16(op.kind, op.mma_in, out);
    for (int l = 31; l >= 0; --l) {
      Thread& t = threads_[base + l];
      std::memcpy(t.mma_out, out[l], sizeof(t.mma_out));
      if (t.state == State::kWarp) make_ready(t);
    }
    op.active = false;
    return;
  }
  unsigned ballot = 0;
  if (op.kind == Kind::kBallot) {
    for (int l = 0; l < 32; ++l) {
      if ((op.mask >> l & 1u) && op.value[l] != 0) ballot |= 1u << l;
    }
  }
  for (int l = 31; l >= 0; --l) {  // released from the highest lane down: the lowest runs first
    if (!(op.mask >> l & 1u)) continue;
    const int seg = l & ~(op.width - 1);
    int src = l;
    switch (op.kind) {
      case Kind::kShfl:
        src = seg + (op.arg[l] & (op.width - 1));
        break;
      case Kind::kShflXor:
        src = l ^ op.arg[l];
        if (src < seg || src >= seg + op.width) src = l;  // outside the lane's segment: its own value
        break;
      case Kind::kShflUp:
        src = (l - seg) >= op.arg[l] ? l - op.arg[l] : l;
        break;
      case Kind::kBallot:
      case Kind::kSyncwarp:
      case Kind::kMmaBf16:
      case Kind::kMmaF16:
        break;
    }
    if (src < 0 || src > 31 || !(op.mask >> src & 1u)) {
      fault(std::string(kind_name(op.kind)) + " at " + op.site.str() + ": lane " + std::to_string(l) + " reads lane " +
            std::to_string(src) + ", which is not in the mask (undefined on a GPU)");
    }
    Thread& t = threads_[base + l];
    t.result = op.kind == Kind::kBallot ? ballot : op.value[src];
    if (t.state == State::kWarp) make_ready(t);
  }
  op.active = false;
}

inline void Emulator::mma(Kind kind, const uint32_t* a, const uint32_t* b, const float* c, float* d, const Site& site) {
  if (cur_ == nullptr) fault(std::string(kind_name(kind)) + " outside a kernel");
  if (warps_[cur_->warp].lanes != 0xFFFFFFFFu) fault(std::string(kind_name(kind)) + " in a partial warp");
  uint32_t in[10];
  std::memcpy(in, a, 16);
  std::memcpy(in + 4, b, 8);
  std::memcpy(in + 6, c, 16);
  collective(kind, 0xFFFFFFFFu, 0, 0, 32, site, in);  // .aligned: every lane, the same instruction
  std::memcpy(d, cur_->mma_out, 16);
}

// The copy is made at the issuing thread's cp.async.wait_group under the forward and random orders
// (a reader that does not wait, or does not wait for the other threads' copies behind a barrier,
// sees the old bytes) and at once under reverse and eager (a copy issued into a buffer that other
// threads still read overwrites it early), as a GPU may do either.
inline void Emulator::cp_async(void* dst, const void* src, int src_bytes) {
  if (cur_ == nullptr) fault("cp.async outside a kernel");
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) {
    fault("cp.async of 16 bytes with a misaligned address (shared " + std::to_string(reinterpret_cast<uintptr_t>(dst)) +
          ", global " + std::to_string(reinterpret_cast<uintptr_t>(src)) + ")");
  }
  if (src_bytes < 0 || src_bytes > 16) fault("cp.async: src-size " + std::to_string(src_bytes) + " not in [0, 16]");
  const AsyncCopy c{static_cast<char*>(dst), static_cast<const char*>(src), src_bytes};
  if (options().order == Order::kReverse || options().order == Order::kEager) {
    c.run();
  } else {
    cur_->open_copies.push_back(c);
  }
}
inline void Emulator::cp_async_commit() {
  if (cur_ == nullptr) fault("cp.async.commit_group outside a kernel");
  cur_->copy_groups.push_back(std::move(cur_->open_copies));
  cur_->open_copies.clear();
}
inline void Emulator::cp_async_wait(int pending) {
  if (cur_ == nullptr) fault("cp.async.wait_group outside a kernel");
  auto& groups = cur_->copy_groups;
  while (static_cast<int>(groups.size()) > pending) {
    for (const AsyncCopy& c : groups.front()) c.run();
    groups.erase(groups.begin());
  }
}

inline int Emulator::barrier(const Site& site, int kind, int predicate) {
  if (cur_ == nullptr) fault("__syncthreads outside a kernel");
  ++stats().rendezvous;
  if (exited_ > 0) {
    fault("__syncthreads at " + site.str() + " after " + std::to_string(exited_) +
          " threads of the block exited (undefined: not every thread reaches it)");
  }
  if (!barrier_active_) {
    barrier_active_ = true;
    barrier_site_ = site;
    barrier_arrived_ = 0;
    barrier_count_ = 0;
  } else if (!(barrier_site_ == site)) {
    fault("divergent __syncthreads: this thread is at " + site.str() + " while " + std::to_string(barrier_arrived_) +
          " threads wait at " + barrier_site_.str());
  }
  barrier_count_ += predicate != 0;
  if (++barrier_arrived_ < static_cast<int>(threads_.size())) {
    to_scheduler(State::kBarrier);
    return static_cast<int>(cur_->result);
  }
  barrier_active_ = false;
  const int n = static_cast<int>(threads_.size());
  const int result = kind == 1 ? barrier_count_ > 0 : kind == 2 ? barrier_count_ == n : barrier_count_;
  for (auto t = threads_.rbegin(); t != threads_.rend(); ++t) {
    t->result = static_cast<uint64_t>(result);  // each thread's own copy: the next barrier may start first
    if (t->state == State::kBarrier) make_ready(*t);
  }
  if (options().order != Order::kEager) to_scheduler(State::kReady);
  return result;
}

template <class T>
T& static_shared(const void* decl) {
  return emu().static_shared<T>(decl);
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(emu().dynamic_base());
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "collectives move values of up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

// kernel<<<grid, block, smem, stream>>>(args...) as TORCHSPEC_LAUNCH(kernel, grid, block, smem, stream)(args...):
// runs the grid (options().run_block's blocks) before it returns; errors as the runtime's.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Launch(void (*k)(P...), const char* n, dim3 g, dim3 b, size_t s, cudaStream_t st)
      : kernel(k), name(n), grid(g), block(b), smem(s), stream(st) {}
  template <class... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(std::forward<A>(args)...);
    detail::emu().launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, stream,
                         [&] { std::apply(kernel, params); });
  }
};

// A new emulated device whose blocks may opt in to `bytes` of shared memory (an H100 or H200:
// 232448, device 0's; an A100: 166912; sm_86 / sm_89: 101376; sm_75: 65536), of compute capability
// `cc_major`.x, no kernel attribute set on it yet; its index. cudaSetDevice makes it current.
inline int add_device(int bytes, int cc_major = 9) { return detail::emu().add_device(bytes, cc_major); }

// Blocks of a huge grid to run: the first `head` and the last `tail` (linear indices).
inline std::function<bool(uint64_t, uint64_t)> first_and_last_blocks(uint64_t head, uint64_t tail) {
  return [=](uint64_t b, uint64_t n) { return b < head || b + tail >= n; };
}

}  // namespace cuemu

// ---- device functions ----
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  cuemu::detail::emu().barrier(cuemu::detail::Site(loc));
}
inline int __syncthreads_or(int predicate, std::source_location loc = std::source_location::current()) {
  return cuemu::detail::emu().barrier(cuemu::detail::Site(loc), 1, predicate);
}
inline int __syncthreads_and(int predicate, std::source_location loc = std::source_location::current()) {
  return cuemu::detail::emu().barrier(cuemu::detail::Site(loc), 2, predicate);
}
inline int __syncthreads_count(int predicate, std::source_location loc = std::source_location::current()) {
  return cuemu::detail::emu().barrier(cuemu::detail::Site(loc), 3, predicate);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  return from_bits<T>(emu().collective(Kind::kShfl, mask, to_bits(var), src_lane, width, Site(loc)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  return from_bits<T>(emu().collective(Kind::kShflXor, mask, to_bits(var), lane_mask, width, Site(loc)));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  return from_bits<T>(emu().collective(Kind::kShflUp, mask, to_bits(var), static_cast<int>(delta), width, Site(loc)));
}
// The tensor-core and asynchronous-copy instructions the kernels wrap (kernels/cuda_common.cuh).
inline void cuemu_mma_bf16_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                                    std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  emu().mma(Kind::kMmaBf16, a, b, c, d, Site(loc));
}
inline void cuemu_mma_f16_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                                   std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  emu().mma(Kind::kMmaF16, a, b, c, d, Site(loc));
}
inline void cuemu_cp_async_16(void* dst, const void* src, int src_bytes) {
  cuemu::detail::emu().cp_async(dst, src, src_bytes);
}
inline void cuemu_cp_async_commit() { cuemu::detail::emu().cp_async_commit(); }
inline void cuemu_cp_async_wait(int pending) { cuemu::detail::emu().cp_async_wait(pending); }

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  emu().collective(Kind::kSyncwarp, mask, 0, 0, 32, Site(loc));
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location loc = std::source_location::current()) {
  using namespace cuemu::detail;
  return static_cast<unsigned>(emu().collective(Kind::kBallot, mask, predicate != 0, 0, 32, Site(loc)));
}

// Atomics: no other thread runs between a read and its write here.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <class T>
T atomicMax(T* address, T value) {
  const T old = *address;
  if (old < value) *address = value;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_system() {}
inline long long __double_as_longlong(double v) {
  long long b;
  std::memcpy(&b, &v, 8);
  return b;
}
inline double __longlong_as_double(long long b) {
  double v;
  std::memcpy(&v, &b, 8);
  return v;
}

// A streaming load: checked for the alignment its type needs on a GPU.
template <class T>
T __ldcs(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    cuemu::detail::fault("misaligned __ldcs of " + std::to_string(sizeof(T)) + " bytes at " +
                         std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
  return *p;
}

// ---- host runtime API ----
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  auto& e = cuemu::detail::emu();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return e.set_error(cudaErrorInvalidValue);
  return e.set_max_dynamic(reinterpret_cast<const void*>(kernel), value);
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  if (attr == nullptr) return cuemu::detail::emu().set_error(cudaErrorInvalidValue);
  cuemu::detail::emu().get_attributes(reinterpret_cast<const void*>(kernel), attr);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cuemu::detail::emu().get_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cuemu::detail::emu().peek_last_error(); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = cuemu::detail::emu().device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return cuemu::detail::emu().set_device(device); }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = cuemu::detail::emu().device_count();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  auto& e = cuemu::detail::emu();
  if (device < 0 || device >= e.device_count()) return e.set_error(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(cuemu::detail::kDefaultSmem);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:  // device 0: an H100 / H200, sm_90
      *value = e.cc_major_of(device);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = e.optin_of(device);
      return cudaSuccess;
  }
  return e.set_error(cudaErrorInvalidValue);
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

// Device memory is host memory here, with a guard page on each side: the allocation ends at the
// second one (rounded up to 16 bytes, so reads past the end fault at once). Pages are reserved, not
// committed: a huge allocation costs only the pages a test writes and the kernels read.
inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  using namespace cuemu::detail;
  const size_t page = page_size(), body = round_up(std::max<size_t>(bytes, 1), page);
  void* m = mmap(nullptr, body + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return emu().set_error(cudaErrorMemoryAllocation);
  char* lo = static_cast<char*>(m);
  mprotect(lo, page, PROT_NONE);
  mprotect(lo + page + body, page, PROT_NONE);
  char* p = lo + page + body - round_up(std::max<size_t>(bytes, 1), 16);
  emu().add_guarded({lo, body + 2 * page, p, bytes});
  *ptr = p;
  return cudaSuccess;
}
// Device memory is host memory: a memset runs at once (stream order is the order of the calls).
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes); }
inline cudaError_t cudaFree(void* ptr) {
  using namespace cuemu::detail;
  if (ptr == nullptr) return cudaSuccess;
  Emulator::Guarded g;
  if (!emu().remove_guarded(static_cast<char*>(ptr), &g)) return emu().set_error(cudaErrorInvalidValue);
  munmap(g.map, g.map_size);
  return cudaSuccess;
}

// ---- streams and events ----
// Kernels run when they are launched; a stream's other work is items: a wait for an event
// (cudaStreamWaitEvent) or work that completes when a test says (enqueue_pending: the fake NCCL's
// transfers). An event is complete when every item on its stream before its record is; a stream
// or event is never freed (a destroyed one answers "invalid resource handle").
struct CUstream_st {
  int device = 0;
  bool destroyed = false;
  struct Item {
    bool done = false;
    const CUstream_st* waits_on = nullptr;  // a cudaStreamWaitEvent: done when its prefix is
    size_t waits_upto = 0;
  };
  std::vector<Item> items;
  bool complete_upto(size_t upto) const {
    for (size_t i = 0; i < upto && i < items.size(); ++i) {
      const Item& it = items[i];
      if (!it.done && !(it.waits_on != nullptr && it.waits_on->complete_upto(it.waits_upto))) return false;
    }
    return true;
  }
};
struct CUevent_st {
  const CUstream_st* stream = nullptr;  // of its last record; null: never recorded (complete)
  size_t upto = 0;
  bool destroyed = false;
};

namespace cuemu {
namespace detail {

// The legacy default stream (null) of each device.
inline CUstream_st* default_stream(int device) {
  static std::map<int, CUstream_st> streams;
  CUstream_st& s = streams[device];
  s.device = device;
  return &s;
}
inline CUstream_st* resolve(cudaStream_t s) { return s != nullptr ? s : default_stream(emu().device()); }
inline cudaError_t injected(const char* api) {
  if (!options().fail_call) return cudaSuccess;
  const cudaError_t e = options().fail_call(api);
  return e == cudaSuccess ? e : emu().set_error(e);
}

}  // namespace detail

// Work on `stream` that completes only when complete_pending(id) is called; its id.
struct PendingId {
  CUstream_st* stream;
  size_t index;
};
inline PendingId enqueue_pending(cudaStream_t stream) {
  CUstream_st* s = detail::resolve(stream);
  s->items.push_back({});
  return {s, s->items.size() - 1};
}
inline void complete_pending(PendingId id) { id.stream->items[id.index].done = true; }

}  // namespace cuemu

inline bool cuemu::detail::Emulator::stream_usable(cudaStream_t s) const {
  return s == nullptr || (!s->destroyed && s->device == device_);
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned /*flags*/) {
  if (const cudaError_t e = cuemu::detail::injected("cudaStreamCreateWithFlags")) return e;
  *stream = new CUstream_st;
  (*stream)->device = cuemu::detail::emu().device();
  ++cuemu::stats().streams_created;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  using namespace cuemu::detail;
  if (stream == nullptr || stream->destroyed) return emu().set_error(cudaErrorInvalidResourceHandle);
  if (const cudaError_t e = injected("cudaStreamDestroy")) return e;
  stream->destroyed = true;  // its items still complete (CUDA finishes a destroyed stream's work)
  ++cuemu::stats().streams_destroyed;
  return cudaSuccess;
}
inline cudaError_t cudaStreamQuery(cudaStream_t stream) {
  using namespace cuemu::detail;
  if (stream != nullptr && stream->destroyed) return emu().set_error(cudaErrorInvalidResourceHandle);
  const CUstream_st* s = resolve(stream);
  // "Not ready" is also left in cudaGetLastError, as the runtime may (torch clears it after a query).
  return s->complete_upto(s->items.size()) ? cudaSuccess : emu().set_error(cudaErrorNotReady);
}
// Nothing else runs while the host waits here: work that is not complete would never be.
inline cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  const cudaError_t e = cudaStreamQuery(stream);
  if (e == cudaErrorNotReady)
    cuemu::detail::fault("cudaStreamSynchronize would wait forever: the stream's work never completes");
  return e;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned /*flags*/) {
  if (const cudaError_t e = cuemu::detail::injected("cudaEventCreateWithFlags")) return e;
  *event = new CUevent_st;
  ++cuemu::stats().events_created;
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
  using namespace cuemu::detail;
  if (event == nullptr || event->destroyed) return emu().set_error(cudaErrorInvalidResourceHandle);
  event->destroyed = true;
  ++cuemu::stats().events_destroyed;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr) {
  using namespace cuemu::detail;
  if (event == nullptr || event->destroyed || !emu().stream_usable(stream)) {
    return emu().set_error(cudaErrorInvalidResourceHandle);
  }
  if (const cudaError_t e = injected("cudaEventRecord")) return e;
  const CUstream_st* s = resolve(stream);
  event->stream = s;
  event->upto = s->items.size();
  return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t event) {
  using namespace cuemu::detail;
  if (event == nullptr || event->destroyed) return emu().set_error(cudaErrorInvalidResourceHandle);
  return event->stream == nullptr || event->stream->complete_upto(event->upto) ? cudaSuccess
                                                                               : emu().set_error(cudaErrorNotReady);
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  const cudaError_t e = cudaEventQuery(event);
  if (e == cudaErrorNotReady)
    cuemu::detail::fault("cudaEventSynchronize would wait forever: the event never completes");
  return e;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned /*flags*/ = 0) {
  using namespace cuemu::detail;
  if (event == nullptr || event->destroyed || !emu().stream_usable(stream)) {
    return emu().set_error(cudaErrorInvalidResourceHandle);
  }
  if (const cudaError_t e = injected("cudaStreamWaitEvent")) return e;
  CUstream_st::Item item;
  item.waits_on = event->stream;
  item.waits_upto = event->upto;
  item.done = event->stream == nullptr;
  resolve(stream)->items.push_back(item);
  return cudaSuccess;
}

// ---- mapped pinned host memory: host memory, the same address on the device ----
inline cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned /*flags*/) {
  *ptr = std::aligned_alloc(64, cuemu::detail::round_up(std::max<size_t>(bytes, 1), 64));
  if (*ptr == nullptr) return cuemu::detail::emu().set_error(cudaErrorMemoryAllocation);
  std::memset(*ptr, 0xCD, bytes);  // not zeroed, as the runtime's
  return cudaSuccess;
}
inline cudaError_t cudaHostGetDevicePointer(void** device_ptr, void* host_ptr, unsigned /*flags*/) {
  *device_ptr = host_ptr;
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
