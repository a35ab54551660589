// Where large CPU outputs come from: a small cache of freed blocks, and huge pages.
//
// Every call returns a fresh output. A block larger than malloc keeps on its heap (glibc trims
// or unmaps big free blocks) comes back from the OS on the next call, and each of its 4 KiB pages
// is faulted in and zeroed on first touch. In this project's VM that runs at ~2.5 GB/s, far below
// the copy bandwidth, so it used to be most of an out-of-cache pass (32x256x56x56 fp32 eval:
// ~34 of ~42 ms). Two measures, both for outputs only:
//
//  - Block cache. Outputs of kMinCachedBytes and more are taken from a list of blocks that
//    earlier outputs freed, by exact size (rounded up to 2 MiB, or to 64 KiB below that). A
//    training loop asks for the same sizes every step, so after the first step the pages are
//    already mapped: the same idea as torch's CUDA caching allocator, kept small. Down to
//    256 KiB: glibc serves a 1 MB block from its heap or from a fresh mapping, depending on its
//    history; with mappings (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072 forces them) a
//    256x1000 module backward took 515-570 us with a malloc'd dx and 73-112 us from the cache.
//    The cache holds at most a limit of bytes (BN_EXT_CPU_CACHE_MB; default min(2 GiB,
//    RAM / 8); 0 disables it) and drops its oldest blocks first. bn_ext.empty_cpu_cache() gives everything back.
//  - Huge pages. A new block of kMinHugeBytes and more gets madvise(MADV_HUGEPAGE) before
//    anything touches it, so it faults in 2 MiB at a time (512x fewer faults). Smaller blocks are
//    left alone: with THP, fresh 25 MB blocks faulted in slower here, not faster.
//    BN_EXT_HUGE_PAGES=0 disables the advice.
//
// Tensors keep a pointer to this allocator, so resize_() on an output also goes through it.
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <thread>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#ifndef _WIN32
#include <pthread.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include "../bn_ext.h"

// Under AddressSanitizer (.ci/sanitize.sh) a cached block is poisoned while it waits in the
// cache, and an output's bytes past its tensor's (the rounding up to a granule) while it is in
// use, so that a kernel writing past its output or into a freed one is reported as it would be in
// a block of malloc's own.
#if defined(__SANITIZE_ADDRESS__)
#define BN_EXT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BN_EXT_ASAN 1
#endif
#endif
#ifdef BN_EXT_ASAN
#include <sanitizer/asan_interface.h>
#define BN_EXT_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define BN_EXT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define BN_EXT_POISON(p, n) ((void)(p), (void)(n))
#define BN_EXT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace bn_ext {
namespace cpu {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSmallGranule = size_t{64} << 10;  // blocks below kHugePage round up to this
constexpr size_t kMinCachedBytes = size_t{256} << 10;
constexpr size_t kMinHugeBytes = size_t{32} << 20;

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  return v == nullptr ? fallback : std::strcmp(v, "0") != 0;
}

bool huge_pages_enabled() {
  static const bool enabled = env_flag("BN_EXT_HUGE_PAGES", true);
  return enabled;
}

// Advice only: where the kernel declines (THP "never", no huge page free), nothing changes.
void advise_huge_pages(void* begin, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kMinHugeBytes || !huge_pages_enabled()) return;
  const auto b = reinterpret_cast<uintptr_t>(begin);
  const uintptr_t lo = (b + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (b + bytes) & ~(kHugePage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)begin;
  (void)bytes;
#endif
}

size_t default_limit_bytes() {
  size_t limit = size_t{2} << 30;
#if defined(__linux__) && defined(_SC_PHYS_PAGES)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min(limit, static_cast<size_t>(pages) * page / 8);
#endif
  return limit;
}

size_t limit_from_env() {
  const char* v = std::getenv("BN_EXT_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return default_limit_bytes();
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  // the largest limit whose bytes an int64 holds (2^43 - 1 MiB; cpu_cache_stats reports it as
  // one): beyond 2^44 - 1, mb << 20 wrapped (2^44 MiB to a limit of 0, the cache silently off)
  constexpr unsigned long long kMaxMb = std::numeric_limits<int64_t>::max() >> 20;
  TORCH_CHECK(end != v && *end == '\0' && errno != ERANGE && mb >= 0 &&
                  static_cast<unsigned long long>(mb) <= kMaxMb,
              "bn_ext: BN_EXT_CPU_CACHE_MB must be a whole number of MiB from 0 to ", kMaxMb,
              ", got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

// Whole 2 MiB blocks are 2 MiB-aligned (huge-page candidates); smaller ones page-aligned.
void* aligned_block(size_t bytes) {
  const size_t align = bytes >= kHugePage ? kHugePage : size_t{4096};
  void* p = nullptr;
#ifdef _WIN32
  p = _aligned_malloc(bytes, align);
#else
  if (posix_memalign(&p, align, bytes) != 0) p = nullptr;
#endif
  return p;
}

struct Block {
  void* ptr;
  size_t bytes;  // rounded up to kHugePage, or to kSmallGranule below it
};

void free_block(const Block& b) {
  BN_EXT_UNPOISON(b.ptr, b.bytes);
  void* p = b.ptr;
#ifdef _WIN32
  _aligned_free(p);
#else
  std::free(p);
#endif
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {
#ifndef _WIN32
    // A fork while another thread is in take() or put() would leave the child a mutex locked
    // for ever. The forking thread takes it first, and both sides release it (the child's one
    // thread is the one that took it), as glibc's malloc does with its arenas.
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
#endif
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::kCPU)};
    const size_t granule = n >= kHugePage ? kHugePage : kSmallGranule;
    const size_t bytes = (n + granule - 1) / granule * granule;
    auto* block = take(bytes);
    if (block == nullptr) block = fresh(bytes);
    BN_EXT_UNPOISON(block->ptr, n);
    BN_EXT_POISON(static_cast<char*>(block->ptr) + n, bytes - n);
    return {block->ptr, block, &release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::list<Block> gone;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gone.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : gone) free_block(b);
#ifdef __GLIBC__
    // free() keeps blocks below glibc's mmap threshold on its heap: without a trim the process
    // would hold most of what was just given back (200 blocks of 384 KiB: none of it returned)
    malloc_trim(0);
#endif
  }

  void hold_lock(double seconds) {
    TORCH_CHECK_VALUE(seconds >= 0 && seconds <= 3600, "bn_ext: _hold_cpu_cache_lock takes 0 to "
                      "3600 seconds, got ", seconds);  // NaN too
    std::lock_guard<std::mutex> lock(mutex_);
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(limit_), hits_, misses_};
  }

 private:
  // The newest free block of exactly `bytes`, or null.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      auto* b = new Block(*it);
      cached_ -= bytes;
      free_.erase(std::next(it).base());
      ++hits_;
      return b;
    }
    ++misses_;
    return nullptr;
  }

  Block* fresh(size_t bytes) {
    void* p = aligned_block(bytes);
    if (p == nullptr) {  // what we hold may be what is missing
      empty();
      p = aligned_block(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "bn_ext: out of CPU memory allocating ",
                     bytes, " bytes for an output");
    advise_huge_pages(p, bytes);
    return new Block{p, bytes};
  }

  // Keeps the block unless it alone exceeds the limit; drops the oldest blocks to stay within it.
  void put(Block* b) {
    std::list<Block> gone;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // a block below kMinCachedBytes is an output that resize_() shrank and grew again through
      // this allocator: not worth a place
      if (b->bytes >= kMinCachedBytes && b->bytes <= limit_) {
        BN_EXT_POISON(b->ptr, b->bytes);
        free_.push_back(*b);
        cached_ += b->bytes;
        while (cached_ > limit_) {
          cached_ -= free_.front().bytes;
          gone.splice(gone.end(), free_, free_.begin());
        }
      } else {
        gone.push_back(*b);
      }
    }
    delete b;
    for (const Block& g : gone) free_block(g);
  }

  static void release(void* ctx);
  static void lock_for_fork();
  static void unlock_after_fork();

  const size_t limit_;
  std::mutex mutex_;
  std::list<Block> free_;  // oldest first
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: outputs may outlive static destruction at exit.
OutputCache& cache() {
  static auto* c = new OutputCache();
  return *c;
}

void OutputCache::release(void* ctx) {
  if (ctx != nullptr) cache().put(static_cast<Block*>(ctx));
}

void OutputCache::lock_for_fork() { cache().mutex_.lock(); }
void OutputCache::unlock_after_fork() { cache().mutex_.unlock(); }
}  // namespace

Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  const size_t bytes = at::detail::computeStorageNbytes(sizes, strides,
                                                        c10::elementSize(dtype));
  if (bytes < kMinCachedBytes || !cache().enabled()) {
    Tensor t = at::empty_strided(sizes, strides, at::TensorOptions().dtype(dtype));
    advise_huge_pages(t.data_ptr(), t.nbytes());
    return t;
  }
  return Tensor(at::detail::empty_strided_generic(
      sizes, strides, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype));
}

void empty_output_cache() { cache().empty(); }

std::vector<int64_t> output_cache_stats() { return cache().stats(); }

void hold_output_cache_lock(double seconds) { cache().hold_lock(seconds); }

}  // namespace cpu
}  // namespace bn_ext
