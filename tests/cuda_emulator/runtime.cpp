// The CUDA emulator's runtime: blocks of fibers, launches, and the emulated device (emu.h).
//
// A block runs as one fiber per thread on the calling host thread. The scheduler
// resumes each live fiber in turn until it finishes or reaches a barrier; when every live fiber
// waits at the same __syncthreads, the next round begins. Live threads at different barriers, or
// at a barrier while another thread has returned, are an error.
//
// An error thrown inside a fiber (a misaligned vector access, say) ends its block, and the launch
// rethrows it on the host, so a Python test sees a RuntimeError rather than a crashed process.
#include "emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // kernels keep arrays of vectors on the stack
constexpr size_t kCanaryBytes = 256;        // at the bottom of each stack: checked after a block

// A fiber stack, whose lowest bytes hold a pattern: a kernel that overflowed its stack has
// overwritten it by the time its block ends. (A guard page per stack would need two memory maps
// per fiber, more than the kernel allows for a cooperative grid of 264 blocks of 256 threads.)
struct Stack {
  std::unique_ptr<char[]> bytes{new char[kStackBytes]};  // moves keep the bytes where they are
  Stack() { std::memset(bytes.get(), 0x5A, kCanaryBytes); }
  bool intact() const {
    for (size_t i = 0; i < kCanaryBytes; ++i) {
      if (bytes[i] != 0x5A) return false;
    }
    return true;
  }
};

// A suspended fiber, or the scheduler while a fiber runs. On x86-64 a switch is a few
// instructions (bn_emu_switch_stacks, below). glibc's swapcontext, used elsewhere, also saves and
// restores the signal mask, a system call each way: 44 million of them in one fit-wave test,
// which spent a third of its time in the kernel.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;  // the callee-saved registers and the FP control words lie there
#else
  ucontext_t uc;
#endif
};

struct Fiber {
  Context context;
  Thread thread;
  bool done = false;
  const char* wait_file = nullptr;  // the __syncthreads it waits at
  int wait_line = 0;
  std::exception_ptr error;
};

struct Block {
  Context scheduler;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::unordered_set<const void*> poisoned;  // the __shared__ variables filled so far
  std::vector<unsigned char> dynamic;        // the launch's dynamic shared memory
};

thread_local Block* tl_block = nullptr;
thread_local std::vector<Stack> tl_stacks;

// Whether a block of the cooperative launch in flight has failed (the others stop spinning at
// their barriers then).
std::atomic<bool> g_grid_failed{false};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

bool reverse_order() {
  const char* v = std::getenv("BN_EXT_EMU_ORDER");
  return v != nullptr && std::string(v) == "reverse";
}

#if defined(__x86_64__)
// bn_emu_switch_stacks(&from, to): pushes the System V callee-saved registers (rbp, rbx,
// r12-r15), then MXCSR and the x87 control word (the FP environment a function may rely on
// keeping), stores the stack pointer in *from, and does the reverse from `to`; its `ret` lands
// where `to` was left.
extern "C" void bn_emu_switch_stacks(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .globl bn_emu_switch_stacks
    .hidden bn_emu_switch_stacks
    .type bn_emu_switch_stacks, @function
bn_emu_switch_stacks:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bn_emu_switch_stacks, .-bn_emu_switch_stacks
)");

void switch_to(Context& from, Context& to) { bn_emu_switch_stacks(&from.sp, to.sp); }
#else
void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// A fiber's first frame: runs the block's body as this thread, then hands the host thread back
// to the scheduler for good (a finished fiber is never resumed).
void fiber_main() {
  Block* b = tl_block;
  Fiber* f = b->running;
  try {
    (*b->body)();
  } catch (...) {
    f->error = std::current_exception();
  }
  f->done = true;
  switch_to(f->context, b->scheduler);
  std::abort();
}

// Readies `f` to start in fiber_main on `stack` at its first switch_to.
void start_context(Fiber& f, Stack& stack) {
#if defined(__x86_64__)
  // The frame bn_emu_switch_stacks pops, below fiber_main's address for its `ret`, and a null
  // return address for fiber_main (which never returns), so that fiber_main starts as if
  // called: its stack pointer 8 past a multiple of 16.
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack.bytes.get()) + kStackBytes) &
                        ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  uint32_t control[2];                           // this thread's MXCSR and x87 control word
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  sp -= 1;
  std::memcpy(sp, control, sizeof(control));
  f.context.sp = sp;
#else
  getcontext(&f.context.uc);
  f.context.uc.uc_stack.ss_sp = stack.bytes.get();
  f.context.uc.uc_stack.ss_size = kStackBytes;
  f.context.uc.uc_link = nullptr;
  makecontext(&f.context.uc, fiber_main, 0);
#endif
}

std::string where(const Fiber& f) {
  return std::string(f.wait_file) + ":" + std::to_string(f.wait_line);
}

void run_block(const std::function<void()>& body, dim3 grid, dim3 block, uint3 block_idx,
               size_t dynamic_bytes) {
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  TORCH_CHECK(n >= 1 && n <= 1024, "emulated launch: ", n, " threads per block");
  while (tl_stacks.size() < n) tl_stacks.emplace_back();
  Block b;
  b.body = &body;
  b.dynamic.assign(dynamic_bytes, 0xFF);
  b.fibers.resize(n);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    const unsigned int t = static_cast<unsigned int>(i);
    f.thread.thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.thread.block_idx = block_idx;
    f.thread.block_dim = block;
    f.thread.grid_dim = grid;
    start_context(f, tl_stacks[i]);
  }
  Block* outer = tl_block;
  tl_block = &b;
  const bool reverse = reverse_order();
  std::exception_ptr error;
  std::string fault;
  for (;;) {
    // One round: every live thread runs to its next barrier or its end, in thread order or
    // (BN_EXT_EMU_ORDER=reverse) the other way round, so that a shared value that one thread
    // stores and others read without a barrier between is caught in one order or the other.
    for (size_t k = 0; k < n && !error; ++k) {
      Fiber& f = b.fibers[reverse ? n - 1 - k : k];
      if (f.done) continue;
      b.running = &f;
      switch_to(b.scheduler, f.context);
      error = f.error;  // the first error ends the block: its shared data is incomplete
    }
    if (error) break;
    const Fiber* waiting = nullptr;
    const Fiber* ended = nullptr;
    for (const Fiber& f : b.fibers) {
      if (f.done) {
        ended = &f;
      } else if (waiting == nullptr) {
        waiting = &f;
      } else if (f.wait_line != waiting->wait_line || f.wait_file != waiting->wait_file) {
        fault = "threads of one block wait at different __syncthreads: " + where(*waiting) +
                " and " + where(f);
        break;
      }
    }
    if (waiting == nullptr || !fault.empty()) break;
    if (ended != nullptr) {
      // CUDA leaves a barrier that not every thread of the block reaches undefined.
      fault = "a thread of the block has returned while the others wait at __syncthreads " +
              where(*waiting);
      break;
    }
  }
  tl_block = outer;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tl_stacks[i].intact(), "emulated kernel: thread ", i, " of block (",
                block_idx.x, ", ", block_idx.y, ") overflowed its ", kStackBytes, "-byte stack");
  }
  // The suspended fibers of a failed block are abandoned with their stacks (the error ends the
  // test); their stacks are reused by the next block.
  if (error) std::rethrow_exception(error);
  TORCH_CHECK(fault.empty(), "emulated kernel, block (", block_idx.x, ", ", block_idx.y, "): ",
              fault);
}

// Grids run so far, ordinary and cooperative: tests read them (bn_ext_emu_launches, below) to see
// which path an op took, as test_cuda.py reads the profiler on a GPU.
std::atomic<int64_t> g_launches[2];
// The threads per block of the last grid: which of a kernel's block sizes a launch chose; and
// its blocks: how a launch sized its grid (and the blocks of the grid before it).
std::atomic<int64_t> g_last_block_threads{0};
std::atomic<int64_t> g_last_dynamic_bytes{0};
std::atomic<int64_t> g_last_grid_blocks{0};
std::atomic<int64_t> g_previous_grid_blocks{0};
// Launches that asked to overlap the one before them (programmatic dependent launch).
std::atomic<int64_t> g_dependent_launches{0};

std::mutex g_kernels_mutex;
std::unordered_map<const void*, std::function<void(void**)>>& kernels() {
  static std::unordered_map<const void*, std::function<void(void**)>> table;
  return table;
}

}  // namespace

const Thread& self() {
  TORCH_CHECK(tl_block != nullptr && tl_block->running != nullptr,
              "emulated device code called outside a launch");
  return tl_block->running->thread;
}

void syncthreads(const char* file, int line) {
  Fiber* f = tl_block->running;
  f->wait_file = file;
  f->wait_line = line;
  switch_to(f->context, tl_block->scheduler);
}

std::atomic<int64_t> g_progress{0};

void note_progress() { ++g_progress; }

void note_dependent_launch() { ++g_dependent_launches; }

void spin_wait() {
  // A deadlock: no block has arrived at any barrier (atomicAdd) for the limit.
  thread_local int64_t seen = -1;
  thread_local int64_t since_ns = 0;
  const int64_t progress = g_progress.load();
  if (progress != seen) {
    seen = progress;
    since_ns = now_ns();
  }
  TORCH_CHECK(!g_grid_failed.load(), "emulated cooperative grid: another block failed");
  const int64_t limit_s = env_int("BN_EXT_EMU_DEADLOCK_S", 120);
  TORCH_CHECK(now_ns() - since_ns < limit_s * 1000000000LL,
              "emulated cooperative grid: no block has reached a barrier for ", limit_s,
              " s (deadlock?)");
  std::this_thread::yield();
}

void check_aligned(const void* p, size_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % bytes == 0, "emulated kernel: a ", bytes,
              "-byte vector access at ", p, " is misaligned (it faults on a GPU)");
}

void poison_shared(void* p, size_t bytes) {
  if (tl_block->poisoned.insert(p).second) std::memset(p, 0xFF, bytes);
}

unsigned char* dynamic_shared() {
  return tl_block->dynamic.empty() ? nullptr : tl_block->dynamic.data();
}

int blocks_per_sm() { return env_int("BN_EXT_EMU_BLOCKS_PER_SM", 2); }

// BN_EXT_EMU_BLOCKS_PER_SM_OF=TEXT:N: the occupancy that the runtime reports for the kernels whose
// type (typeid's mangled name of the kernel's function pointer type, so its parameters' types)
// contains TEXT, so that a test can tell which kernel the host asked about; the others get
// BN_EXT_EMU_BLOCKS_PER_SM. Cooperative grids are held to the latter.
int blocks_per_sm(const char* kernel_type) {
  const char* v = std::getenv("BN_EXT_EMU_BLOCKS_PER_SM_OF");
  const char* colon = v != nullptr ? std::strrchr(v, ':') : nullptr;
  if (colon != nullptr && colon != v &&
      std::string(kernel_type).find(std::string(v, colon)) != std::string::npos) {
    return std::atoi(colon + 1);
  }
  return blocks_per_sm();
}

// Launch plans that dispatch_index (common.cuh) sent to the 64-bit kernels by BN_EXT_EMU_INDEX64=1.
std::atomic<int64_t> g_forced_index64{0};

int64_t index32_bound() {
  if (env_int("BN_EXT_EMU_INDEX64", 0) != 1) return int64_t(1) << 31;
  ++g_forced_index64;
  return 0;
}

// Only the checks that consult BN_EXT_MAX_GRID_X see a lowered limit; launches are held to the
// GPU's (run_grid).
int64_t max_grid_x() { return env_int("BN_EXT_EMU_MAX_GRID_X", 0x7FFFFFFF); }

int blocks_with_shared(int blocks, size_t dynamic_bytes) {
  if (dynamic_bytes == 0) return blocks;
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  const size_t fit = p->sharedMemPerMultiprocessor / (dynamic_bytes + p->reservedSharedMemPerBlock);
  return static_cast<int>(std::min<size_t>(blocks, fit));
}

namespace {

std::mutex g_limits_mutex;
std::unordered_map<const void*, int> g_dynamic_limits;  // cudaFuncSetAttribute's, by kernel

// A kernel's dynamic shared memory limit: 48 KB unless cudaFuncSetAttribute set another.
size_t dynamic_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_limits_mutex);
  const auto it = g_dynamic_limits.find(kernel);
  return it == g_dynamic_limits.end() ? 48 * 1024 : static_cast<size_t>(it->second);
}

// The blocks a cooperative grid may have: all resident at once, with its dynamic shared memory.
int64_t resident_blocks(size_t dynamic_bytes = 0) {
  return int64_t(blocks_with_shared(blocks_per_sm(), dynamic_bytes)) *
         at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

}  // namespace

void set_dynamic_limit(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_limits_mutex);
  g_dynamic_limits[kernel] = bytes;
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& block_body, bool cooperative,
              size_t dynamic_bytes) {
  TORCH_CHECK(grid.x <= 0x7FFFFFFFu && grid.y <= 65535 && grid.z <= 65535,
              "emulated launch: grid (", grid.x, ", ", grid.y, ", ", grid.z,
              ") is over the limits of 2^31 - 1 in x and 65535 in y and z");
  std::vector<uint3> ids;
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) ids.push_back({x, y, z});
    }
  }
  ++g_launches[cooperative ? 1 : 0];
  g_last_block_threads = int64_t(block.x) * block.y * block.z;
  g_last_dynamic_bytes = static_cast<int64_t>(dynamic_bytes);
  g_previous_grid_blocks = g_last_grid_blocks.load();
  g_last_grid_blocks = int64_t(grid.x) * grid.y * grid.z;
  if (!cooperative) {
    if (reverse_order()) std::reverse(ids.begin(), ids.end());
    for (const uint3& id : ids) run_block(block_body, grid, block, id, dynamic_bytes);
    return;
  }
  // All blocks at once, a host thread each (their barriers spin until the others arrive).
  g_grid_failed = false;
  std::vector<std::exception_ptr> errors(ids.size());
  std::vector<std::thread> threads;
  std::exception_ptr start_error;
  try {
    for (size_t i = 0; i < ids.size(); ++i) {
      threads.emplace_back([&, i] {
        try {
          run_block(block_body, grid, block, ids[i], dynamic_bytes);
        } catch (...) {
          errors[i] = std::current_exception();
          g_grid_failed = true;
        }
      });
    }
  } catch (...) {  // no host thread for a block: the started ones stop at their barriers
    start_error = std::current_exception();
    g_grid_failed = true;
  }
  for (std::thread& t : threads) t.join();
  if (start_error) std::rethrow_exception(start_error);
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

void register_kernel(const void* key, std::function<void(void**)> call) {
  std::lock_guard<std::mutex> lock(g_kernels_mutex);
  kernels().emplace(key, std::move(call));
}

}  // namespace emu

namespace at {
namespace cuda {

cudaDeviceProp* getCurrentDeviceProperties() {
  static thread_local cudaDeviceProp prop;
  prop.multiProcessorCount = emu::env_int("BN_EXT_EMU_SMS", 4);
  prop.maxThreadsPerMultiProcessor = 2048;
  prop.cooperativeLaunch = 1;
  // An H100's by default: 228 KB an SM, 1 KB of it reserved per block.
  prop.sharedMemPerMultiprocessor = emu::env_int("BN_EXT_EMU_SMEM_PER_SM", 233472);
  prop.reservedSharedMemPerBlock = 1024;
  prop.sharedMemPerBlockOptin = std::max<size_t>(prop.sharedMemPerMultiprocessor, 1024) - 1024;
  return &prop;
}

}  // namespace cuda
}  // namespace at

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorCooperativeLaunchTooLarge: return "cooperative launch too large";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    default: return "invalid value";
  }
}

cudaError_t cudaGetLastError() { return cudaSuccess; }

cudaError_t cudaLaunchCooperativeKernel(const void* kernel, dim3 grid, dim3 block, void** args,
                                        size_t shared_bytes, cudaStream_t) {
  std::function<void(void**)> call;
  {
    std::lock_guard<std::mutex> lock(emu::g_kernels_mutex);
    auto it = emu::kernels().find(kernel);
    if (it == emu::kernels().end()) return cudaErrorInvalidDeviceFunction;
    call = it->second;
  }
  if (shared_bytes > at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin ||
      shared_bytes > emu::dynamic_limit(kernel)) {
    return cudaErrorInvalidValue;
  }
  if (int64_t(grid.x) * grid.y * grid.z > emu::resident_blocks(shared_bytes)) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  emu::run_grid(grid, block, [&] { call(args); }, true, shared_bytes);
  return cudaSuccess;
}

// For ctypes: the emulated __frsqrt_rn over n floats, for the test that compares it with the
// exact result.
extern "C" void bn_ext_emu_frsqrt_rn(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __frsqrt_rn(in[i]);
}

// For ctypes: the number of grids run so far, cooperative (1) or ordinary (0).
extern "C" int64_t bn_ext_emu_launches(int cooperative) {
  return emu::g_launches[cooperative != 0 ? 1 : 0].load();
}

// For ctypes: the launches so far that asked to overlap the one before them.
extern "C" int64_t bn_ext_emu_dependent_launches() { return emu::g_dependent_launches.load(); }

// For ctypes: the threads per block of the last grid run.
extern "C" int64_t bn_ext_emu_last_block_threads() { return emu::g_last_block_threads.load(); }

// For ctypes: the dynamic shared memory of the last grid run, per block.
extern "C" int64_t bn_ext_emu_last_dynamic_bytes() { return emu::g_last_dynamic_bytes.load(); }

// For ctypes: the blocks of the last grid run.
extern "C" int64_t bn_ext_emu_last_grid_blocks() { return emu::g_last_grid_blocks.load(); }

// For ctypes: the blocks of the grid run before the last.
extern "C" int64_t bn_ext_emu_previous_grid_blocks() {
  return emu::g_previous_grid_blocks.load();
}

// For ctypes: the number of index dispatches that BN_EXT_EMU_INDEX64=1 sent to 64-bit kernels.
extern "C" int64_t bn_ext_emu_forced_index64() { return emu::g_forced_index64.load(); }

namespace {

void cooperative_probe_kernel(int) {}

}  // namespace

// For ctypes (tests/test_cuda_emulator.py): 1 where the emulator behaves as a GPU must, else 0.
//   0  threads of a block that wait at different __syncthreads raise
//   1  a misaligned 16-byte vector access raises
//   2  a barrier orders shared memory: each thread reads what its neighbour stored before it
//   3  a cooperative grid larger than the resident blocks is refused, as the runtime refuses it
//   4  a thread that returns while the others wait at a barrier raises
extern "C" int bn_ext_emu_self_test(int which) {
  try {
    switch (which) {
      case 0:
        emu::run_grid(dim3(1), dim3(64), [] {
          if (threadIdx.x < 32) {
            __syncthreads();
          } else {
            __syncthreads();
          }
        }, false);
        return 0;
      case 1:
        emu::run_grid(dim3(1), dim3(32), [] {
          alignas(16) static float buffer[8];
          emu::check_aligned(buffer + 1, 16);
        }, false);
        return 0;
      case 2: {
        std::atomic<int> wrong{0};
        emu::run_grid(dim3(2), dim3(128), [&] {
          __shared__ unsigned int stored[128];
          const unsigned int t = threadIdx.x;
          stored[t] = t + 1000 * blockIdx.x;
          __syncthreads();
          if (stored[(t + 1) % 128] != (t + 1) % 128 + 1000 * blockIdx.x) ++wrong;
        }, false);
        return wrong.load() == 0 ? 1 : 0;
      }
      case 3: {
        int arg = 0;
        void* args[] = {&arg};
        const cudaError_t err = cudaLaunchCooperativeKernel(
            emu::erase(cooperative_probe_kernel),
            dim3(static_cast<unsigned int>(emu::resident_blocks() + 1)), dim3(32), args, 0,
            nullptr);
        return err == cudaErrorCooperativeLaunchTooLarge ? 1 : 0;
      }
      case 4:
        emu::run_grid(dim3(1), dim3(64), [] {
          if (threadIdx.x == 5) return;
          __syncthreads();
        }, false);
        return 0;
      default:
        return 0;
    }
  } catch (const std::exception&) {
    return which == 0 || which == 1 || which == 4 ? 1 : 0;
  }
}
