// Transparent huge pages for large CPU outputs.
//
// A fresh output larger than glibc's largest mmap threshold (32 MiB on 64-bit) is a new mapping on
// every call, and each of its 4 KiB pages is faulted in and zeroed by the kernel on first touch.
// In this project's VM that runs at about 2.5 GB/s, well below the copy bandwidth, so it was the
// whole cost of an out-of-cache eval (32x256x56x56 fp32: ~42 ms, of which ~34 ms faults). Asking
// for huge pages on the 2 MiB-aligned interior of the mapping, before anything touches it, makes
// 512x fewer faults; the same pass then took ~8 ms. This is what torch's own allocator does under
// THP_MEM_ALLOC_ENABLE=1, applied to our outputs only. Smaller blocks come from malloc's heap,
// which recycles them without faults, so they are left alone. Set BN_EXT_HUGE_PAGES=0 to disable.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../bn_ext.h"

namespace bn_ext {
namespace cpu {

namespace {
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
constexpr int64_t kMinBytes = int64_t{32} << 20;

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("BN_EXT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}
}  // namespace

void advise_huge_pages(const Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!fresh.is_cpu() || fresh.nbytes() < static_cast<size_t>(kMinBytes) || !huge_pages_enabled()) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t end = begin + fresh.nbytes();
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = end & ~(kHugePage - 1);
  // Advice only: where the kernel declines (THP "never", no huge page free), nothing changes.
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

}  // namespace cpu
}  // namespace bn_ext
