// CPU kernels: at::parallel_for over channels or rows, at::vec::Vectorized within a run.
//
// Precision. Sums are accumulated in short float (or double) vector blocks that are flushed into
// double accumulators, so an error cannot grow with the run length. The statistics use sums
// shifted by k, the mean of kShiftSamples elements sampled from the channel (bn_ext.h):
//     mean = k + sum(x - k) / n,   var = (sum((x - k)^2) - sum(x - k)^2 / n) / n,
// which cancels nothing when |mean| >> std (unlike the raw sum of squares). The rounding of the
// shifted sums reaches var amplified by 1 + (k - mean)^2 / var: with k one element, 12x for a
// channel whose first element lay 3.4 std from its mean (1000 channels of 352x7x7 bf16, var off
// by 1.3e-6 relative); with k a mean of 32, that factor is about 1 + 1/32. Outputs are written as
// (x - mean) * scale + shift rather than x * scale + (shift - mean * scale): the latter rounds at
// the magnitude of mean * scale, which for mean = 1e4 and std = 1 costs about 1e-3 in float32.
//
// Determinism. Every partial sum is owned by a fixed run of the input (a row, or a fixed block of
// rows), never by a thread, and partials are combined in index order. The bits do not depend on the
// thread count or on which path (fused or split) ran.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "../bn_ext.h"

namespace bn_ext {
namespace cpu {
namespace {

using at::vec::Vectorized;

template <typename T>
using math_t = at::opmath_type<T>;  // float for float16/bfloat16/float32, double for float64

// Non-temporal ("streaming") stores of one vector register to p, where p is aligned to the
// register's size; false (nothing stored) otherwise, or where the build has no vector ISA. A
// normal store first reads the line into the cache (a read-for-ownership), one more pass over an
// output that is larger than the cache; a streaming store writes it to memory without. Order them
// before other threads read the output with stream_fence().
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
inline void stream_raw(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream_raw(double* p, __m512d v) { _mm512_stream_pd(p, v); }
inline void stream_raw(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kStreamAlign = 32;
inline void stream_raw(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream_raw(double* p, __m256d v) { _mm256_stream_pd(p, v); }
inline void stream_raw(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#endif

// V: a Vectorized<T>, which converts to its register type.
template <typename T, typename V>
inline bool stream_reg(T* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (reinterpret_cast<uintptr_t>(p) % kStreamAlign != 0) return false;
  stream_raw(p, v);
  return true;
#else
  (void)p;
  (void)v;
  return false;
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Loads and stores `kWidth` elements of T as two Vectorized<math_t<T>>, or kHalf = kWidth / 2 of
// them as one (load1/store1: the tail of a run, which matters for 7x7 maps: 49 = 32 + 16 + 1).
template <typename T, typename = void>
struct VecIO {
  using V = Vectorized<T>;
  static constexpr int64_t kWidth = 2 * V::size();
  static constexpr int64_t kHalf = V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
  // store(), with streaming stores when `stream` (and p is aligned).
  static void store(T* p, const V& a, const V& b, bool stream) {
    if (!stream || !stream_reg(p, a)) a.store(p);
    if (!stream || !stream_reg(p + V::size(), b)) b.store(p + V::size());
  }
  static V load1(const T* p) { return V::loadu(p); }
  static void store1(T* p, const V& a) { a.store(p); }
  // The first n < kHalf elements (masked loads and stores where the ISA has them).
  static V load_part(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store_part(T* p, const V& a, int64_t n) { a.store(p, n); }
};

template <typename T>
struct VecIO<T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>> {
  using V = Vectorized<float>;
  static constexpr int64_t kWidth = Vectorized<T>::size();  // == 2 * V::size()
  static constexpr int64_t kHalf = V::size();
  static void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, const V& a, const V& b, bool stream) {
    const Vectorized<T> v = at::vec::convert_from_float<T>(a, b);
    if (!stream || !stream_reg(p, v)) v.store(p);
  }
  static V load1(const T* p) {
    V a;
    at::vec::load_to_float<T>(p, a);
    return a;
  }
  static void store1(T* p, const V& a) { at::vec::convert_from_float<T>(a, a).store(p, kHalf); }
  static V load_part(const T* p, int64_t n) {
    return std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n)));
  }
  static void store_part(T* p, const V& a, int64_t n) {
    at::vec::convert_from_float<T>(a, a).store(p, n);
  }
};

// The first n < kWidth elements of a step (masked where the ISA has masks).
template <typename T>
void load_n(const T* p, int64_t n, typename VecIO<T>::V& a, typename VecIO<T>::V& b) {
  using IO = VecIO<T>;
  if (n >= IO::kHalf) {
    a = IO::load1(p);
    b = n > IO::kHalf ? IO::load_part(p + IO::kHalf, n - IO::kHalf) : typename IO::V(0);
  } else {
    a = IO::load_part(p, n);
    b = typename IO::V(0);
  }
}

template <typename T>
void store_n(T* p, const typename VecIO<T>::V& a, const typename VecIO<T>::V& b, int64_t n) {
  using IO = VecIO<T>;
  if (n >= IO::kHalf) {
    IO::store1(p, a);
    if (n > IO::kHalf) IO::store_part(p + IO::kHalf, b, n - IO::kHalf);
  } else if (n > 0) {
    IO::store_part(p, a, n);
  }
}

// Vector iterations between flushes of a float accumulator into double: keeps the relative
// rounding error of a block sum below ~64 ulp whatever the run length.
constexpr int64_t kFlushEvery = 64;

template <typename M>
double hsum(const Vectorized<M>& v) {
  __at_align__ M buf[Vectorized<M>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<M>::size(); ++i) s += buf[i];
  return s;
}

// Asks for the cache lines of one kWidth step at p, ahead of use.
template <typename T>
inline void prefetch_step(const T* p) {
  constexpr int64_t kBytes = VecIO<T>::kWidth * static_cast<int64_t>(sizeof(T));
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < kBytes; b += 64) __builtin_prefetch(c + b);
}

// The size of one of cpu0's caches as sysfs lists it: the largest (its last level, as one core
// sees it) for level 0, else the data or unified cache of that level; 0 if none is listed. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): on the 2-core EPYC VM glibc reports the whole package's L3
// there, 384 MiB, where the core sees 32 MiB.
int64_t listed_cache_bytes(int level) {
  int64_t best = 0;
  const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index";
  for (int i = 0; i < 16; ++i) {
    std::ifstream size_file(dir + std::to_string(i) + "/size");
    int64_t v = 0;
    char unit = 0;
    if (!(size_file >> v)) continue;
    size_file >> unit;
    const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    if (level != 0) {
      std::ifstream level_file(dir + std::to_string(i) + "/level");
      std::ifstream type_file(dir + std::to_string(i) + "/type");
      int l = 0;
      std::string type;
      if (!(level_file >> l) || l != level || !(type_file >> type) || type == "Instruction") {
        continue;
      }
    }
    best = std::max(best, v << shift);
  }
  return best;
}

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t b = listed_cache_bytes(0);
    return b > 0 ? b : int64_t{8} << 20;
  }();
  return bytes;
}

bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}

// BN_EXT_CPU_STREAM_MB: the threshold of stream_output in MiB, in place of the default below
// (0: every pass streams). Read once.
int64_t stream_threshold_from_env() {
  static const int64_t bytes = [] {
    const char* v = std::getenv("BN_EXT_CPU_STREAM_MB");
    if (v == nullptr || *v == '\0') return int64_t{-1};
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && mb >= 0 && mb < (int64_t{1} << 40),
                "bn_ext: BN_EXT_CPU_STREAM_MB must be a whole number of MiB >= 0, got '", v, "'");
    return static_cast<int64_t>(mb) << 20;
  }();
  return bytes;
}

// Whether an elementwise pass streams its output (stream_reg): when the tensors it reads and
// writes, `bytes` in all, exceed the cache that would still hold the output when the next layer
// reads it.
//  - AMD (and by default): the last-level cache. Regular -> streaming stores, 2-core Zen 5, fp32,
//    32 MiB L3: 32x1024x14x14 NCHW train_forward 1043 -> 634 us, 32x256x56x56 NCHW eval 2.65 ->
//    2.18 ms, 32x64x56x56 NHWC train_backward 2.34 -> 2.00 ms, 4096x1024 train_backward 698 ->
//    575 us. Within the L3 they cost: 32x2048x7x7 NHWC eval (26 MB) 180 -> 305 us.
//  - Intel: the threads' private L2s. On the 2-core Xeon VM (2 MiB L2 per core, a 105 MiB L3
//    shared over the mesh with the rest of the socket) regular stores lost far inside the L3:
//    the threshold at 4 MiB instead of 105, fp32, op level, medians of 11 rotating rounds:
//    32x512x14x14 NCHW eval 2.59 -> 0.79 ms, training forward 1.22 -> 1.02, backward 3.83 ->
//    2.08; 32x64x56x56 NCHW forward 4.81 -> 2.47, backward 6.15 -> 4.68; 32x2048x7x7 NCHW
//    backward 3.66 -> 1.90; 32x256x14x14 NHWC eval 0.56 -> 0.40. Within the L2s streaming still
//    won ~10% at op level (32x64x14x14), but there the next layer finds the output in cache.
bool stream_output(int64_t bytes) {
  static const bool intel = intel_cpu();
  static const int64_t l2 = listed_cache_bytes(2);
  int64_t threshold = stream_threshold_from_env();
  if (threshold < 0) {
    threshold = intel && l2 > 0 ? l2 * at::get_num_threads() : last_level_cache_bytes();
  }
  return bytes > threshold;
}

// ---- vector steps of the two reductions ----------------------------------------------------
//
// Each reduction keeps two sums per channel in four vector accumulators (two per sum, for the two
// halves of a kWidth step). A step adds kWidth elements at offset i; a scalar step adds one
// element into double sums. Shifted moments: s1 = sum(x - k), s2 = sum((x - k)^2). Centered dot
// (backward): s1 = sum(dy), s2 = sum(dy * (x - mu)).

template <typename T>
struct ShiftedMoments {
  using IO = VecIO<T>;
  using V = typename IO::V;
  static constexpr int64_t kInputs = 1;
  const T* x;
  ShiftedMoments advanced(int64_t i) const { return {x + i}; }
  void prefetch(int64_t i) const { prefetch_step(x + i); }
  void step(int64_t i, const V& kv0, const V& kv1, V& a1, V& b1, V& a2, V& b2) const {
    V a, b;
    IO::load(x + i, a, b);
    a = a - kv0;
    b = b - kv1;
    a1 = a1 + a;
    b1 = b1 + b;
    a2 = at::vec::fmadd(a, a, a2);
    b2 = at::vec::fmadd(b, b, b2);
  }
  void half_step(int64_t i, const V& kv, V& a1, V& a2) const {
    const V a = IO::load1(x + i) - kv;
    a1 = a1 + a;
    a2 = at::vec::fmadd(a, a, a2);
  }
  void scalar(int64_t i, math_t<T> k, double& s1, double& s2) const {
    const math_t<T> d = static_cast<math_t<T>>(x[i]) - k;
    s1 += d;
    s2 += static_cast<double>(d) * d;
  }
};

template <typename T>
struct CenteredDot {
  using IO = VecIO<T>;
  using V = typename IO::V;
  static constexpr int64_t kInputs = 2;
  const T* dy;
  const T* x;
  CenteredDot advanced(int64_t i) const { return {dy + i, x + i}; }
  void prefetch(int64_t i) const {
    prefetch_step(dy + i);
    prefetch_step(x + i);
  }
  void step(int64_t i, const V& mu0, const V& mu1, V& a1, V& b1, V& a2, V& b2) const {
    V ga, gb, xa, xb;
    IO::load(dy + i, ga, gb);
    IO::load(x + i, xa, xb);
    a1 = a1 + ga;
    b1 = b1 + gb;
    a2 = at::vec::fmadd(ga, xa - mu0, a2);
    b2 = at::vec::fmadd(gb, xb - mu1, b2);
  }
  void half_step(int64_t i, const V& muv, V& a1, V& a2) const {
    const V ga = IO::load1(dy + i);
    a1 = a1 + ga;
    a2 = at::vec::fmadd(ga, IO::load1(x + i) - muv, a2);
  }
  void scalar(int64_t i, math_t<T> mu, double& s1, double& s2) const {
    const math_t<T> g = static_cast<math_t<T>>(dy[i]);
    s1 += g;
    s2 += static_cast<double>(g) * (static_cast<math_t<T>>(x[i]) - mu);
  }
};

// ---- elementwise over one contiguous run ----------------------------------------------------

// y = (x - mu) * alpha + beta; with kCentered false, mu is 0 (folded into beta by the caller).
template <bool kCentered, typename T>
void affine_run(const T* x, T* y, int64_t n, math_t<T> mu, math_t<T> alpha, math_t<T> beta,
                bool stream = false) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V muv(mu), av(alpha), bv(beta);
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t i = 0; i < vec_end; i += IO::kWidth) {
    V a, b;
    IO::load(x + i, a, b);
    if constexpr (kCentered) {
      a = a - muv;
      b = b - muv;
    }
    IO::store(y + i, at::vec::fmadd(a, av, bv), at::vec::fmadd(b, av, bv), stream);
  }
  int64_t i = vec_end;
  if (n - i >= IO::kHalf) {
    V a = IO::load1(x + i);
    if constexpr (kCentered) a = a - muv;
    IO::store1(y + i, at::vec::fmadd(a, av, bv));
    i += IO::kHalf;
  }
  if (i < n) {  // one masked step rather than up to kHalf - 1 scalar ones
    V a = IO::load_part(x + i, n - i);
    if constexpr (kCentered) a = a - muv;
    IO::store_part(y + i, at::vec::fmadd(a, av, bv), n - i);
  }
}

// dx = dy * a + (x - mu) * b + d; full steps stream their stores when `stream`.
template <typename T>
void affine2_run(const T* dy, const T* x, T* dx, int64_t n, math_t<T> a, math_t<T> mu,
                 math_t<T> b, math_t<T> d, bool stream) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V av(a), muv(mu), bv(b), dv(d);
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t i = 0; i < vec_end; i += IO::kWidth) {
    V g0, g1, x0, x1;
    IO::load(dy + i, g0, g1);
    IO::load(x + i, x0, x1);
    IO::store(dx + i, at::vec::fmadd(g0, av, at::vec::fmadd(x0 - muv, bv, dv)),
              at::vec::fmadd(g1, av, at::vec::fmadd(x1 - muv, bv, dv)), stream);
  }
  int64_t i = vec_end;
  if (n - i >= IO::kHalf) {
    const V g0 = IO::load1(dy + i), x0 = IO::load1(x + i);
    IO::store1(dx + i, at::vec::fmadd(g0, av, at::vec::fmadd(x0 - muv, bv, dv)));
    i += IO::kHalf;
  }
  if (i < n) {
    const V g0 = IO::load_part(dy + i, n - i), x0 = IO::load_part(x + i, n - i);
    IO::store_part(dx + i, at::vec::fmadd(g0, av, at::vec::fmadd(x0 - muv, bv, dv)), n - i);
  }
}

// ---- the elementwise maps over NCHW runs, as one stream ----------------------------------------
//
// Runs r0..r1 of an NCHW tensor lie back to back: run r is channel r % C, S elements long. Where S
// is not a multiple of kWidth (whole_step_runs, below) and walked run by run, every run ends in
// a partial step, and out of cache those cost ~10 ns each
// (32x1024x14x14 eval, one thread: 1.28-1.38 ms run by run, 1.04-1.07 ms as one stream, torch
// 1.06-1.10 ms; the same map over one flat run, the floor, 1.00 ms).
// So the runs are walked as one stream of kWidth steps, and a step that straddles two runs takes
// the coefficients of its first lanes from one channel and the rest from the next. S >= kWidth,
// so that a step straddles at most two runs. step(full, pos, n, lo, hi) maps elements
// [pos, pos + n), with coefficients lo for the first kHalf lanes and hi for the rest;
// n == kWidth whenever `full` is std::true_type.
template <typename T, size_t K, typename Step>
void for_each_step_of_runs(int64_t r0, int64_t r1, int64_t S, int64_t C,
                           const std::array<const math_t<T>*, K>& coef, const Step& step) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using Coefs = std::array<V, K>;
  constexpr int64_t W = IO::kWidth, h = IO::kHalf;
  const auto of_channel = [&](int64_t c) {
    Coefs v;
    for (size_t j = 0; j < K; ++j) v[j] = V(coef[j][c]);
    return v;
  };
  // Lanes [0, m) from a, the rest from b. A lane-index compare and blends, not V::set(b, a, m):
  // that is a switch over m, an indirect jump that mispredicts as m cycles from run to run.
  const V lane = V::arange(0, 1);
  const auto mix = [&](const Coefs& a, const Coefs& b, int64_t m) {
    const V from_a = lane < V(static_cast<math_t<T>>(m));
    Coefs v;
    for (size_t j = 0; j < K; ++j) v[j] = V::blendv(b[j], a[j], from_a);
    return v;
  };
  int64_t c = r0 % C;
  Coefs cur = of_channel(c);
  int64_t pos = r0 * S;
  const int64_t end = r1 * S;
  for (int64_t run_end = pos + S;; run_end += S) {
    for (; pos + W <= run_end; pos += W) step(std::true_type{}, pos, W, cur, cur);
    if (run_end == end) {
      if (pos < end) step(std::false_type{}, pos, end - pos, cur, cur);
      return;
    }
    c = (c + 1 == C) ? 0 : c + 1;
    const Coefs next = of_channel(c);
    const int64_t m = run_end - pos;  // lanes left in this run; the rest are the next run's
    if (m > 0) {
      const Coefs lo = mix(cur, next, m), hi = mix(cur, next, m - h);
      if (pos + W > end) {
        step(std::false_type{}, pos, end - pos, lo, hi);
        return;
      }
      step(std::true_type{}, pos, W, lo, hi);
      pos += W;
    }
    cur = next;
  }
}

// y = (x - mu) * a + d over runs r0..r1 (mu = 0 when !kCentered); full steps stream their
// stores when `stream`.
template <bool kCentered, typename T>
void affine_runs(const T* x, T* y, int64_t r0, int64_t r1, int64_t S, int64_t C,
                 const math_t<T>* mu, const math_t<T>* a, const math_t<T>* d, bool stream) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  for_each_step_of_runs<T, 3>(r0, r1, S, C, {mu, a, d}, [&](auto full, int64_t p, int64_t n,
                                                            const std::array<V, 3>& lo,
                                                            const std::array<V, 3>& hi) {
    V v0, v1;
    if constexpr (decltype(full)::value) {
      IO::load(x + p, v0, v1);
    } else {
      load_n(x + p, n, v0, v1);
    }
    if constexpr (kCentered) {
      v0 = v0 - lo[0];
      v1 = v1 - hi[0];
    }
    v0 = at::vec::fmadd(v0, lo[1], lo[2]);
    v1 = at::vec::fmadd(v1, hi[1], hi[2]);
    if constexpr (decltype(full)::value) {
      IO::store(y + p, v0, v1, stream);
    } else {
      store_n(y + p, v0, v1, n);
    }
  });
}

// dx = dy * a + (x - mu) * b + d over runs r0..r1; full steps stream when `stream`.
template <typename T>
void affine2_runs(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1, int64_t S, int64_t C,
                  const math_t<T>* a, const math_t<T>* mu, const math_t<T>* b,
                  const math_t<T>* d, bool stream) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  for_each_step_of_runs<T, 4>(r0, r1, S, C, {a, mu, b, d}, [&](auto full, int64_t p, int64_t n,
                                                               const std::array<V, 4>& lo,
                                                               const std::array<V, 4>& hi) {
    V g0, g1, x0, x1;
    if constexpr (decltype(full)::value) {
      IO::load(dy + p, g0, g1);
      IO::load(x + p, x0, x1);
    } else {
      load_n(dy + p, n, g0, g1);
      load_n(x + p, n, x0, x1);
    }
    const V o0 = at::vec::fmadd(g0, lo[0], at::vec::fmadd(x0 - lo[1], lo[2], lo[3]));
    const V o1 = at::vec::fmadd(g1, hi[0], at::vec::fmadd(x1 - hi[1], hi[2], hi[3]));
    if constexpr (decltype(full)::value) {
      IO::store(dx + p, o0, o1, stream);
    } else {
      store_n(dx + p, o0, o1, n);
    }
  });
}

// y = (x - mu) * a + d over NCHW runs [r0, r1) (run r is channel r % C; mu unused when
// !kCentered): run by run when by_run (whole_step_runs), else as one stream of runs. An
// element's value does not depend on r0 and r1.
template <bool kCentered, typename T>
void affine_run_range(const T* x, T* y, const Geometry& g, int64_t r0, int64_t r1,
                      const math_t<T>* mu, const math_t<T>* a, const math_t<T>* d, bool by_run,
                      bool stream) {
  if (!by_run) {
    affine_runs<kCentered>(x, y, r0, r1, g.S, g.C, mu, a, d, stream);
    return;
  }
  for (int64_t i = r0, c = r0 % g.C; i < r1; ++i, c = (c + 1 == g.C) ? 0 : c + 1) {
    affine_run<kCentered>(x + i * g.S, y + i * g.S, g.S, mu[c], a[c], d[c], stream);
  }
}

// dx = dy * a + (x - mu) * b + d over NCHW runs [r0, r1) (run r is channel r % C): run by run
// when by_run (whole_step_runs), else as one stream of runs. An element's value does not depend
// on r0 and r1, so any split of the runs gives the same bits.
template <typename T>
void affine2_run_range(const T* dy, const T* x, T* dx, const Geometry& g, int64_t r0, int64_t r1,
                       const math_t<T>* a, const math_t<T>* mu, const math_t<T>* b,
                       const math_t<T>* d, bool by_run, bool stream) {
  if (!by_run) {
    affine2_runs(dy, x, dx, r0, r1, g.S, g.C, a, mu, b, d, stream);
    return;
  }
  for (int64_t i = r0, c = r0 % g.C; i < r1; ++i, c = (c + 1 == g.C) ? 0 : c + 1) {
    affine2_run(dy + i * g.S, x + i * g.S, dx + i * g.S, g.S, a[c], mu[c], b[c], d[c], stream);
  }
}

// ---- elementwise over one row of positions, a coefficient per position -------------------------
//
// A channels-last row (position = channel), or a tile of short NCHW runs of one n (below).

// y[i] = (x[i] - mu[i]) * a[i] + d[i] for i < n (mu unused when !kCentered): kWidth steps
// (streaming their stores when `stream`), then a scalar tail.
template <bool kCentered, typename T>
void affine_row(const T* x, T* y, int64_t n, const math_t<T>* mu, const math_t<T>* a,
                const math_t<T>* d, bool stream, int64_t ahead = 0) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
    if (ahead != 0) prefetch_step(x + c + ahead);
    V v0, v1;
    IO::load(x + c, v0, v1);
    if constexpr (kCentered) {
      v0 = v0 - V::loadu(mu + c);
      v1 = v1 - V::loadu(mu + c + h);
    }
    IO::store(y + c, at::vec::fmadd(v0, V::loadu(a + c), V::loadu(d + c)),
              at::vec::fmadd(v1, V::loadu(a + c + h), V::loadu(d + c + h)), stream);
  }
  for (int64_t c = vec_end; c < n; ++c) {
    const math_t<T> xc = static_cast<math_t<T>>(x[c]) - (kCentered ? mu[c] : 0);
    y[c] = static_cast<T>(xc * a[c] + d[c]);
  }
}

// dx[i] = dy[i] * a[i] + (x[i] - mu[i]) * b[i] + d[i] for i < n: kWidth steps (streaming their
// stores when `stream`), then a scalar tail.
template <typename T>
void affine2_row(const T* dy, const T* x, T* dx, int64_t n, const math_t<T>* a,
                 const math_t<T>* mu, const math_t<T>* b, const math_t<T>* d, bool stream,
                 int64_t ahead = 0) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t h = V::size();
  const int64_t vec_end = n - n % IO::kWidth;
  for (int64_t c = 0; c < vec_end; c += IO::kWidth) {
    if (ahead != 0) {
      prefetch_step(dy + c + ahead);
      prefetch_step(x + c + ahead);
    }
    V g0, g1, x0, x1;
    IO::load(dy + c, g0, g1);
    IO::load(x + c, x0, x1);
    const V o0 = at::vec::fmadd(
        g0, V::loadu(a + c),
        at::vec::fmadd(x0 - V::loadu(mu + c), V::loadu(b + c), V::loadu(d + c)));
    const V o1 = at::vec::fmadd(g1, V::loadu(a + c + h),
                                at::vec::fmadd(x1 - V::loadu(mu + c + h), V::loadu(b + c + h),
                                               V::loadu(d + c + h)));
    IO::store(dx + c, o0, o1, stream);
  }
  for (int64_t c = vec_end; c < n; ++c) {
    const math_t<T> gv = static_cast<math_t<T>>(dy[c]);
    const math_t<T> xv = static_cast<math_t<T>>(x[c]);
    dx[c] = static_cast<T>(gv * a[c] + ((xv - mu[c]) * b[c] + d[c]));
  }
}

// ---- the elementwise maps over short NCHW runs, as rows of positions --------------------------
//
// With runs of a few steps (7x7) the stream of runs above spends much of its time at run
// boundaries: every run ends in a step that blends two channels' coefficients, and the trip
// count of the loop over a run's full steps changes from run to run. Instead, a tile of G
// adjacent channels' runs of one n, which lie back to back, is mapped as one row of G * S
// positions with the tile's coefficients expanded to one per position, as a channels-last row
// is: full steps with per-lane coefficient loads, no boundaries. A tile's rows lie C * S apart;
// a thread expands a tile once and maps it down its N rows. 2-core Zen 3 (AVX2), op level,
// stream of runs -> rows, median of 4 alternating processes: eval 32x512x7x7 bf16 219 -> 124
// us, fp32 163 -> 94 us; 32x1000x7x7 bf16 363 -> 253, fp32 284 -> 200; 32x2048x7x7 bf16 752 ->
// 492; train_backward bf16 32x512x7x7 511 -> 319, 32x1000x7x7 703 -> 563.
// Rows of about 4096 positions rather than 1024: the longer contiguous stretch between two
// C * S jumps outweighs the coefficients leaving L1 for L2 (3 x 4096 floats = 48 KiB). Zen 3,
// module level, 1024 -> 4096 interleaved in one process (40 rotating rounds, medians): bf16
// eval 256x512x7x7 2659 -> 1958 us (another run 2029 -> 1631), 32x1000x7x7 fp32 eval 637 ->
// 513, 32x256x14x14 fp32 training forward 865 -> 628, bf16 256x512x7x7 training forward 3478
// -> 2801, 32x1000x7x7 bf16 forward + backward 2423 -> 2113; 27 of 28 (shape, dtype, pass)
// pairs level or faster (one 0.95x). 8192 against 4096: 0.87-1.21x either way, noise.
// AVX-512 builds differ, from 2-core Zen 4 (32 KiB L1d, 1 MiB L2), alternating in one process
// against the AVX2 values: rows of 2048 positions (eval fp32 32x512x7x7 99 -> 69 us,
// 32x1000x7x7 195 -> 144; bf16 32x2048x7x7 288 -> 260), and bf16/fp16 normalize as rows below
// 4 steps only, as float's, so that 14x14 (6 steps of 32) takes the stream of runs (eval
// 32x1024x14x14 1.09-1.20x, 32x256x14x14 1.00-1.17x, in four processes). Likely cause: the
// per-position coefficients, two 64-byte loads per step beside one of data. Not yet measured
// on Zen 5 or Intel, this project's other AVX-512 hosts.
constexpr int64_t kRowMapSteps = 4;  // runs shorter than this many kWidth steps,
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kRowMapStepsReduced = kRowMapSteps;  // or this many for bf16/fp16 normalize
constexpr int64_t kRowMapSpan = 2048;                  // positions per row, about
#else
constexpr int64_t kRowMapStepsReduced = 16;
constexpr int64_t kRowMapSpan = 4096;
#endif

// Whether a map with K per-channel coefficients runs over short NCHW runs as rows: not when it
// streams (tensors beyond the last-level cache), where the rows' C * S strides lost to one
// sequential stream (256x2048x7x7 fp32 eval 0.88x); nor the training backward's (K = 4) in
// float or double: 8 coefficient loads for 4 data loads per step left it bound by loads, and it
// lost out of L2 (256x512x7x7 fp32 0.85x, 32x1000x7x7 0.92x). bf16/fp16 normalize, bound by the
// conversions, gains up to 16 steps (14x14, eval: 32x256x14x14 1.20x, 32x512x14x14 1.26x,
// 64x256x14x14 1.21x); its backward did not (0.84-1.00x). Nor, in AVX-512 builds, when the
// tensors it reads and writes take more than half the last-level cache: a tile's walk down N
// rows C * S apart lost to the sequential stream there (Zen 4, 32 MiB L3, 26 MB read and
// written, eval: fp32 32x2048x7x7 0.81-0.88x eager as rows, 1.26-1.34x as the stream; bf16
// 256x512x7x7 0.84x -> 1.02x, level in another process), where Zen 3 (AVX2) ran both as rows
// at 1.67x and 1.85x.
template <typename T, size_t K>
bool short_runs_as_rows(const Geometry& g, bool stream) {
  constexpr bool reduced = at::vec::is_reduced_floating_point_v<T>;
  if (g.layout != Layout::kContiguous || stream || (K > 3 && !reduced)) return false;
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t bytes = g.N * g.C * g.S * static_cast<int64_t>(sizeof(T)) * (K > 3 ? 3 : 2);
  if (bytes > last_level_cache_bytes() / 2) return false;
#endif
  const int64_t steps = (reduced && K <= 3) ? kRowMapStepsReduced : kRowMapSteps;
  return g.S < steps * VecIO<T>::kWidth;
}

// Channels per tile: about kRowMapSpan positions, and where possible a whole number of kWidth
// steps, so that rows have no scalar tail.
template <typename T>
int64_t row_map_channels(const Geometry& g) {
  const int64_t unit = VecIO<T>::kWidth / std::gcd(g.S, VecIO<T>::kWidth);
  const int64_t G = std::max(unit, kRowMapSpan / g.S / unit * unit);
  return std::min(G, g.C);
}

// row(offset, P, coefs, ahead) for every tile of channels [c0, c1) and every n: offset =
// (n * C + c0) * S, P = (c1 - c0) * S, coefs[j][p] = coef[j][c0 + p / S], and ahead the offset
// of the next row to prefetch (0: none).
template <typename T, size_t K, typename Row>
void for_each_run_row(const Geometry& g, const std::array<const math_t<T>*, K>& coef,
                      const Row& row) {
  using M = math_t<T>;
  const int64_t G = row_map_channels<T>(g), span = G * g.S, tiles = (g.C + G - 1) / G;
  const int64_t grain = std::max<int64_t>(1, 16384 / span);
  at::parallel_for(0, tiles * g.N, grain, [&](int64_t i0, int64_t i1) {
    std::vector<M> buf(K * span);
    std::array<const M*, K> expanded;
    for (size_t j = 0; j < K; ++j) expanded[j] = buf.data() + j * span;
    int64_t tile = -1, c0 = 0, P = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / g.N, n = i % g.N;
      if (t != tile) {
        tile = t;
        c0 = t * G;
        const int64_t c1 = std::min(g.C, c0 + G);
        P = (c1 - c0) * g.S;
        for (size_t j = 0; j < K; ++j) {
          M* e = buf.data() + j * span;
          for (int64_t c = c0; c < c1; ++c) {
            std::fill(e + (c - c0) * g.S, e + (c - c0 + 1) * g.S, coef[j][c]);
          }
        }
      }
      // The tile's next row lies C * S elements on, beyond the prefetchers' reach: ask for it
      // step for step (without: 256x512x7x7 bf16 1.26x slower, fp32 1.35x).
      row((n * g.C + c0) * g.S, P, expanded, n + 1 < g.N ? g.C * g.S : 0);
    }
  });
}

// Whether the contiguous maps go run by run (affine_run, affine2_run: one channel's coefficients
// in registers and a tight loop of full steps) rather than as one stream of runs: when no run
// ends in a partial step (S a multiple of kWidth), or none has a full step (S < kWidth). The
// stream's generic step was the slower loop even with no run boundary inside a step. 2-core
// Zen 3, run by run vs stream, alternating in one process, eval: 32x128x28x28 fp32 1.12x, bf16
// 1.40x; 32x64x56x56 fp32 1.04x, bf16 1.24x; 32x3x224x224 fp32 1.14x, bf16 1.43x; 4x64x56x56
// fp32 1.95x; train_backward (split path) 32x256x28x28 fp32 1.06x, bf16 1.05x.
template <typename T>
bool whole_step_runs(const Geometry& g) {
  return g.S % VecIO<T>::kWidth == 0 || g.S < VecIO<T>::kWidth;
}

// ---- per-channel coefficients (double, then rounded once to the math type) --------------------

// A channel's mean and biased var from its sums shifted by k, each rounded once to M.
template <typename M>
void store_moments(double k, double s1, double s2, int64_t n, M& mean, M& var) {
  const double m1 = s1 / n;
  const double v = s2 / n - m1 * m1;
  mean = static_cast<M>(k + m1);
  var = static_cast<M>(v < 0 ? 0.0 : v);  // clamps rounding residue; a NaN stays NaN (not max())
}

inline double invstd_of(double var, double eps) { return 1.0 / std::sqrt(var + eps); }

// A per-channel vector's element c, or `fallback` where the vector is absent. Takes the pointer,
// not the Tensor: data_ptr() checks cost ~10 ns a call, which was 30 us of a small normalize.
template <typename M>
const M* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<M>() : nullptr;
}

template <typename M>
M opt_at(const M* p, int64_t c, M fallback) {
  return p != nullptr ? p[c] : fallback;
}

// Training backward, per channel, with w' = w * invstd:
//   dx = w' * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)
//      = dy * a + (x - mean) * b + d,
//   a = w',  b = -w' * invstd^2 * sum_dy_xmu / n,  d = -w' * sum_dy / n.
struct BackwardCoefs {
  double a, b, d;
};

BackwardCoefs backward_coefs(double w, double invstd, double sum_dy, double sum_dy_xmu,
                             double n) {
  const double a = w * invstd;
  return {a, -a * invstd * invstd * sum_dy_xmu / n, -a * sum_dy / n};
}

// A fused backward's step for one channel, from its double sums: grad_bias and grad_weight, and
// the dx coefficients. The sums are first rounded as backward_reduce stores them, so that the
// fused and split paths give the same bits.
template <typename M>
BackwardCoefs fused_channel_backward(double s1, double s2, M var, M w, double eps, double n,
                                     M& grad_bias, M& grad_weight) {
  const double sum_dy = static_cast<M>(s1), sum_dy_xmu = static_cast<M>(s2);
  const double invstd = invstd_of(var, eps);
  grad_bias = static_cast<M>(sum_dy);
  grad_weight = static_cast<M>(sum_dy_xmu * invstd);
  return backward_coefs(w, invstd, sum_dy, sum_dy_xmu, n);
}

// ---- rows of positions: the reduction core both layouts share ---------------------------------
//
// Rows r0..r1 of C positions each, row r starting at element r * stride, position c shifted by
// k[c]: acc1[c], acc2[c] get the float sums down the rows. Channels-last rows are the tensor's
// rows (stride C, position = channel). Short NCHW runs are rows too: a tile of channels' runs of
// one n lie back to back, (c1 - c0) * S positions, and the N of them lie C * S apart.
//
// Rows are summed in fixed blocks of kRowsPerBlock; a block accumulates in float (at most
// kRowsPerBlock values per lane) and leaves a double partial per position; partials are added
// in block order.

constexpr int64_t kRowsPerBlock = kFlushEvery;

// Rows per register tile: 8 measured best of 4, 8, 16 and 64 (64: one strip runs down the whole
// block, 64 strided streams that the prefetchers lose).
constexpr int64_t kTileRows = 8;
// Except for the backward's channels-last sums (two inputs) over more than half the last-level
// cache: there 8 rows are 16 streams from memory, which the prefetchers follow worse than 4
// (2 rows). 2-core Zen 5, backward_reduce channels-last, 8 -> 2 rows: 256x2048x7x7 bf16 3.2 ->
// 2.1 ms, fp32 5.4 -> 4.8 ms, 256x256x28x28 bf16 5.3 -> 4.8 ms, 32x256x56x56 fp32 4.9 -> 4.5 ms;
// within the cache 2 rows lost (32x256x14x14 train_backward 183 -> 213 us), and 1 row was
// mixed. The tile only splits each lane's row loop, so the bits do not change.
constexpr int64_t kStreamingTileRows = 2;
// How far ahead the reductions prefetch, in elements: at least this, and at least one tile.
constexpr int64_t kPrefetchElems = 2048;

template <typename T, typename R, int64_t tile_rows = kTileRows>
void row_block_sums(const R& red, int64_t r0, int64_t r1, int64_t rows, int64_t C,
                    int64_t stride, const math_t<T>* k, math_t<T>* acc1, math_t<T>* acc2) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using M = math_t<T>;
  constexpr int64_t h = V::size();
  std::fill(acc1, acc1 + C, M(0));
  std::fill(acc2, acc2 + C, M(0));
  for (int64_t t0 = r0; t0 < r1; t0 += tile_rows) {
    const int64_t t1 = std::min(r1, t0 + tile_rows);
    // The tile is read strip by strip, down its rows, an order the hardware prefetchers follow
    // poorly; so while one strip is summed, ask for tile_rows kWidth steps of a tile ahead: the
    // matching 1/strips of it when rows are back to back (tile_rows * C contiguous elements),
    // else the same strip of each of its rows.
    const int64_t tiles_ahead = std::max<int64_t>(1, kPrefetchElems / (tile_rows * C));
    const int64_t ahead_row = t0 + tiles_ahead * tile_rows;
    const int64_t ahead = (ahead_row + tile_rows <= rows) ? ahead_row * stride : -1;
    int64_t c = 0;
    for (; c + IO::kWidth <= C; c += IO::kWidth) {
      if (ahead >= 0) {
        for (int64_t m = 0; m < tile_rows; ++m) {
          red.prefetch(stride == C ? ahead + tile_rows * c + m * IO::kWidth
                                   : ahead + m * stride + c);
        }
      }
      const V k0 = V::loadu(k + c), k1 = V::loadu(k + c + h);
      V a1 = V::loadu(acc1 + c), b1 = V::loadu(acc1 + c + h);
      V a2 = V::loadu(acc2 + c), b2 = V::loadu(acc2 + c + h);
      for (int64_t r = t0; r < t1; ++r) red.step(r * stride + c, k0, k1, a1, b1, a2, b2);
      a1.store(acc1 + c);
      b1.store(acc1 + c + h);
      a2.store(acc2 + c);
      b2.store(acc2 + c + h);
    }
    if (C - c >= IO::kHalf) {
      const V k0 = V::loadu(k + c);
      V a1 = V::loadu(acc1 + c), a2 = V::loadu(acc2 + c);
      for (int64_t r = t0; r < t1; ++r) red.half_step(r * stride + c, k0, a1, a2);
      a1.store(acc1 + c);
      a2.store(acc2 + c);
    }
  }
  int64_t c = C - C % IO::kWidth;
  if (C - c >= IO::kHalf) c += IO::kHalf;
  for (; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t r = r0; r < r1; ++r) red.scalar(r * stride + c, k[c], s1, s2);
    acc1[c] = static_cast<M>(s1);
    acc2[c] = static_cast<M>(s2);
  }
}

// ---- contiguous layout: runs of S per (n, c) ---------------------------------------------------
//
// A channel's N runs are cut into chunks of whole runs of about kChunkElems elements. A chunk is
// the unit of a partial sum: its vector accumulators are carried across its runs (no horizontal
// sum per run, which would dominate for short runs such as 7x7) and flushed into double every
// kFlushEvery steps. Chunk boundaries depend on the shape only, and a channel's chunk partials
// are added in order, so the bits do not depend on how channels and chunks are spread over
// threads.

constexpr int64_t kChunkElems = 16384;

int64_t runs_per_chunk(const Geometry& g) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.S, 1));
}

int64_t chunks_per_channel(const Geometry& g) {
  const int64_t r = runs_per_chunk(g);
  return (g.N + r - 1) / r;
}

// One channel's running sums within a chunk: vector accumulators, flushed into double every
// kFlushEvery steps.
template <typename T>
struct ChunkAcc {
  using V = typename VecIO<T>::V;
  V a1{0}, b1{0}, a2{0}, b2{0};
  int64_t steps = 0;
  double s1 = 0, s2 = 0;
};

// Adds one run of S elements at offset `base`, shifted by k, to acc. `next` >= 0: the offset of
// a run to prefetch, step for step, while this one streams.
template <typename T, typename R>
void add_run(const R& red, int64_t base, int64_t S, int64_t next, math_t<T> k, ChunkAcc<T>& acc) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  const V kv(k);
  V a1 = acc.a1, b1 = acc.b1, a2 = acc.a2, b2 = acc.b2;
  int64_t steps = acc.steps;
  const auto tick = [&] {
    if (++steps == kFlushEvery) {
      acc.s1 += hsum(a1 + b1);
      acc.s2 += hsum(a2 + b2);
      a1 = a2 = b1 = b2 = V(0);
      steps = 0;
    }
  };
  const int64_t vec_end = S - S % IO::kWidth;
  for (int64_t i = 0; i < vec_end; i += IO::kWidth) {
    if (next >= 0) red.prefetch(next + i);
    red.step(base + i, kv, kv, a1, b1, a2, b2);
    tick();
  }
  int64_t i = vec_end;
  if (S - i >= IO::kHalf) {
    red.half_step(base + i, kv, a1, a2);
    i += IO::kHalf;
    tick();
  }
  for (; i < S; ++i) red.scalar(base + i, k, acc.s1, acc.s2);
  acc.a1 = a1;
  acc.b1 = b1;
  acc.a2 = a2;
  acc.b2 = b2;
  acc.steps = steps;
}

// Channels are reduced in tiles of adjacent channels: with short runs (7x7: 196 bytes) a
// channel's runs, C * S elements apart, each start a fresh page (a TLB miss, and a cold start for
// the prefetchers); a tile's runs of one n lie back to back, about kTileBytes in a row. Walked run
// by run (for n, for c in the tile), each channel adds its own steps in its own order, so its sums
// do not depend on the tile; as rows of positions (the shortest runs, below) they depend on it
// through where the span's vector steps end, but the tile depends on the shape alone.
constexpr int64_t kTileBytes = 4096;
constexpr int64_t kMaxTile = 16;

int64_t channels_per_tile(const Geometry& g, int64_t itemsize) {
  const int64_t run_bytes = std::max<int64_t>(g.S, 1) * itemsize;
  return std::clamp<int64_t>(kTileBytes / run_bytes, 1, std::min(kMaxTile, g.C));
}

// Runs of at most kSpanRunBytes are summed as rows of positions (tile_span_sums, below): run by
// run, every 7x7 run ended in a half step, a scalar step and a spill of the accumulators, which
// left the reductions at ~0.2 ns an element on 2 threads, twice x.sum(). 2-core Zen 5, before ->
// after: 32x512x7x7 fp32 statistics 53 -> 41 us, backward sums 77 -> 56 us; 256x2048x7x7 fp32
// 2.5 -> 2.0 ms and 5.7 -> 3.7 ms; bf16 32x512x7x7 backward sums 62 -> 41 us. Not for 14x14
// (784 bytes fp32, 392 bf16): 32x1024x14x14 fp32 statistics 285 -> 424 us, bf16 sums 316 ->
// 487 us. There C * S * itemsize is a multiple of 4 KiB, so a tile's rows share L1 sets, and the
// run-by-run path has little tail to save.
constexpr int64_t kSpanRunBytes = 256;

// A tile whose runs of one n are whole 64-byte cache lines, so that, on an aligned tensor whose
// C * S runs are whole lines too, every tile's piece of every n starts on a line: as many
// channels as channels_per_tile or fewer, where that does not change the bits (run by run);
// 0 where there is none.
int64_t line_aligned_tile(const Geometry& g, int64_t itemsize) {
  const int64_t run_bytes = std::max<int64_t>(g.S, 1) * itemsize;
  if ((g.C * run_bytes) % 64 != 0) return 0;
  const int64_t G = channels_per_tile(g, itemsize);
  const int64_t fewest = (G > 1 && run_bytes <= kSpanRunBytes) ? G : 1;
  for (int64_t h = G; h >= fewest; --h) {
    if ((h * run_bytes) % 64 == 0) return h;
  }
  return 0;
}

// s1, s2 of channels [c0, c1) (c1 - c0 <= kMaxTile) over runs [n0, n1), for a reduction R
// (ShiftedMoments or CenteredDot) with per-channel shift k[c - c0].
template <typename T, typename R>
void tile_chunk_sums(const R& red, const Geometry& g, int64_t c0, int64_t c1, int64_t n0,
                     int64_t n1, const math_t<T>* k, double* s1, double* s2) {
  std::array<ChunkAcc<T>, kMaxTile> acc;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t base = (n * g.C + c) * g.S;
      // The channel's next run lies C * S elements on; the hardware prefetchers do not jump
      // there (nor across 4 KiB pages). Ask for it while streaming this one.
      const int64_t next = n + 1 < g.N ? base + g.C * g.S : -1;
      add_run<T>(red, base, g.S, next, k[c - c0], acc[c - c0]);
    }
  }
  for (int64_t j = 0; j < c1 - c0; ++j) {
    s1[j] = acc[j].s1 + hsum(acc[j].a1 + acc[j].b1);
    s2[j] = acc[j].s2 + hsum(acc[j].a2 + acc[j].b2);
  }
}

// s1, s2 of channels [c0, c1) over all runs: chunk partials added in chunk order.
template <typename T, typename R>
void tile_sums(const R& red, const Geometry& g, int64_t c0, int64_t c1, const math_t<T>* k,
               double* s1, double* s2) {
  const int64_t r = runs_per_chunk(g), G = c1 - c0;
  std::fill(s1, s1 + G, 0.0);
  std::fill(s2, s2 + G, 0.0);
  std::array<double, kMaxTile> t1, t2;
  for (int64_t n0 = 0; n0 < g.N; n0 += r) {
    tile_chunk_sums<T>(red, g, c0, c1, n0, std::min(g.N, n0 + r), k, t1.data(), t2.data());
    for (int64_t j = 0; j < G; ++j) {
      s1[j] += t1[j];
      s2[j] += t2[j];
    }
  }
}

// a[0] + ... + a[S - 1], in double, in a fixed order (8 lanes, then the lanes in pairs).
template <typename M>
double fold_positions(const M* a, int64_t S) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= S; p += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(a[p + l]);
  }
  for (int l = 0; p < S; ++p, ++l) lanes[l] += static_cast<double>(a[p]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Channels [c0, c1) whose runs are short, as rows of positions (above): the tile's runs of one n
// are a row of (c1 - c0) * S positions. For each block b in [b0, b1) of kRowsPerBlock rows,
// block(b, j, f1, f2) gets channel c0 + j's S positions folded. No run ends in a partial step,
// and the accumulators stay in registers down kTileRows rows.
template <typename T, typename R, typename Block>
void tile_span_blocks(const R& red, const Geometry& g, int64_t c0, int64_t c1,
                      const math_t<T>* k, int64_t b0, int64_t b1,
                      std::vector<math_t<T>>& scratch, const Block& block) {
  using M = math_t<T>;
  const int64_t G = c1 - c0, P = G * g.S;
  scratch.resize(3 * P);
  M* kp = scratch.data();
  M* acc1 = kp + P;
  M* acc2 = acc1 + P;
  for (int64_t j = 0; j < G; ++j) std::fill(kp + j * g.S, kp + (j + 1) * g.S, k[j]);
  const R tile = red.advanced(c0 * g.S);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = b * kRowsPerBlock, r1 = std::min(g.N, r0 + kRowsPerBlock);
    row_block_sums<T>(tile, r0, r1, g.N, P, g.C * g.S, kp, acc1, acc2);
    for (int64_t j = 0; j < G; ++j) {
      block(b, j, fold_positions(acc1 + j * g.S, g.S), fold_positions(acc2 + j * g.S, g.S));
    }
  }
}

// s1, s2 of channels [c0, c1) whose runs are short: their blocks' folds, added in block order.
template <typename T, typename R>
void tile_span_sums(const R& red, const Geometry& g, int64_t c0, int64_t c1, const math_t<T>* k,
                    std::vector<math_t<T>>& scratch, double* s1, double* s2) {
  std::fill(s1, s1 + (c1 - c0), 0.0);
  std::fill(s2, s2 + (c1 - c0), 0.0);
  const int64_t blocks = (g.N + kRowsPerBlock - 1) / kRowsPerBlock;
  tile_span_blocks<T>(red, g, c0, c1, k, 0, blocks, scratch,
                      [&](int64_t, int64_t j, double f1, double f2) {
                        s1[j] += f1;
                        s2[j] += f2;
                      });
}

// Whole channels (tiles of them) per thread when there are enough of them; else a few channels'
// chunks spread over the threads.
bool parallel_over_channels(const Geometry& g) {
  return g.C >= 4 * static_cast<int64_t>(at::get_num_threads());
}

// finish(c, k, s1, s2) for every channel, shift(c) giving the channel's k (called once each).
// With whole channels per thread, tile_done(c0, c1) follows the finish of a tile's channels on
// the thread that reduced them, while their runs are still in its cache; `tile` channels to a
// tile if given (one that gives the same bits: channels_per_tile's where runs are spans).
struct NoTileDone {
  void operator()(int64_t, int64_t) const {}
};

template <typename T, typename R, typename Shift, typename Finish, typename TileDone = NoTileDone>
void contiguous_reduce(const R& red, const Geometry& g, const Shift& shift, const Finish& finish,
                       const TileDone& tile_done = {}, int64_t tile = 0) {
  using M = math_t<T>;
  // Tiles and the way runs are summed depend on the shape alone, not on the branch below.
  const int64_t G = tile > 0 ? tile : channels_per_tile(g, sizeof(T));
  const int64_t tiles = (g.C + G - 1) / G;
  const bool spans = G > 1 && g.S * static_cast<int64_t>(sizeof(T)) <= kSpanRunBytes;
  if (parallel_over_channels(g)) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::array<M, kMaxTile> k;
      std::array<double, kMaxTile> s1, s2;
      std::vector<M> scratch;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * G, c1 = std::min(g.C, c0 + G);
        for (int64_t c = c0; c < c1; ++c) k[c - c0] = shift(c);
        if (spans) {
          tile_span_sums<T>(red, g, c0, c1, k.data(), scratch, s1.data(), s2.data());
        } else {
          tile_sums<T>(red, g, c0, c1, k.data(), s1.data(), s2.data());
        }
        for (int64_t c = c0; c < c1; ++c) finish(c, k[c - c0], s1[c - c0], s2[c - c0]);
        tile_done(c0, c1);
      }
    });
    return;
  }
  // Few channels: spread their chunks over the threads (tile_done is not called here: the fused
  // paths ask for whole channels per thread), then add each channel's partials in order. These
  // are the partials whole channels per thread add, in the same order, so the bits do not depend
  // on which branch the thread count picked.
  std::vector<M> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) k[c] = shift(c);
  if (spans) {
    // tile_span_sums' blocks, each a task: block b of tile t leaves its folds, which are then
    // added in block order, as tile_span_sums adds them.
    const int64_t blocks = (g.N + kRowsPerBlock - 1) / kRowsPerBlock;
    std::vector<double> folds(static_cast<size_t>(tiles * blocks * G) * 2);
    at::parallel_for(0, tiles * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<M> scratch;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / blocks, b = i % blocks, c0 = t * G, c1 = std::min(g.C, c0 + G);
        tile_span_blocks<T>(red, g, c0, c1, &k[c0], b, b + 1, scratch,
                            [&](int64_t, int64_t j, double f1, double f2) {
                              folds[2 * (i * G + j)] = f1;
                              folds[2 * (i * G + j) + 1] = f2;
                            });
      }
    });
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t t = c / G, j = c % G;
      double s1 = 0, s2 = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        s1 += folds[2 * ((t * blocks + b) * G + j)];
        s2 += folds[2 * ((t * blocks + b) * G + j) + 1];
      }
      finish(c, k[c], s1, s2);
    }
    return;
  }
  const int64_t chunks = chunks_per_channel(g), r = runs_per_chunk(g);
  std::vector<double> partial(static_cast<size_t>(g.C * chunks) * 2);
  at::parallel_for(0, g.C * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / chunks, n0 = (i % chunks) * r;
      tile_chunk_sums<T>(red, g, c, c + 1, n0, std::min(g.N, n0 + r), &k[c], &partial[2 * i],
                         &partial[2 * i + 1]);
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      s1 += partial[2 * (c * chunks + j)];
      s2 += partial[2 * (c * chunks + j) + 1];
    }
    finish(c, k[c], s1, s2);
  }
}

// ---- channels-last layout: runs of C per row (n, s) --------------------------------------------
//
// Elementwise maps stream the rows one at a time, the per-channel coefficient vectors being
// reloaded from L1 for each row. Reusing them across tiles of 8 or 32 rows measured 1.5-2.5x
// slower on the 2-core EPYC (Zen 4): for C = 1024 the rows are 4 KiB apart, so loads and stores
// alias.
//
// Reductions run the rows of positions above over fixed blocks of rows, spread over the threads.

// Few channels. A row of C < kWidth elements (C = 3: RGB input) would run entirely in the scalar
// tail. Instead the tensor is read as a flat array cut into period rows of P = lcm(C, kWidth)
// elements: element j of every period row belongs to channel j % C, so per-channel vectors
// replicated to length P turn it into a channels-last tensor of P "channels" with no tail. The
// rows left over after the last whole period row (fewer than P / C) run as plain rows of C.
constexpr int64_t kMaxPeriod = 1024;

template <typename T>
int64_t flat_period(int64_t rows, int64_t C) {
  using IO = VecIO<T>;
  if (C % IO::kHalf == 0) return 0;
  const int64_t P = std::lcm(C, IO::kWidth);
  return (P <= kMaxPeriod && rows * C >= P) ? P : 0;
}

template <typename M>
std::vector<M> replicate(const M* v, int64_t C, int64_t P) {
  std::vector<M> out(P);
  for (int64_t j = 0; j < P; ++j) out[j] = v[j % C];
  return out;
}

// s1[c], s2[c] for every channel, from fixed blocks of rows combined in block order;
// block_done(r0, r1) after each block's sums, on the thread that summed it, while its rows are
// still in that thread's cache.
// Each block sums straight into its slot of `partial`: 2 * C values of the math type, as its
// float accumulators are, widened to double only when added (the same bits as double slots), and
// not zeroed first (row_block_sums starts a slot from 0). The slots then cost a write and a read,
// 1/16 of a float32 input's bytes (1/8 of a 16-bit one's), where zeroed double slots copied from
// per-thread accumulators cost 3/16 (3/8). batch_stats, 2-core Zen 4 VM, medians of 9 alternating
// rounds in one process, zeroed -> unzeroed double slots: fp32 4096x1024 364 -> 288 us,
// 32x2048x7x7 NHWC 291 -> 223, 32x512x14x14 269 -> 234, bf16 4096x1024 298 -> 227; then
// copied -> in place, math-type slots: fp32 4096x1024 353 -> 302, 32x512x14x14 296 -> 251,
// 32x64x56x56 745 -> 620, bf16 4096x1024 290 -> 235.
template <typename T, typename R, typename BlockDone = NoTileDone>
void channels_last_row_sums(const R& red, int64_t rows, int64_t C, const math_t<T>* k,
                            double* s1, double* s2, const BlockDone& block_done = {}) {
  using M = math_t<T>;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const std::unique_ptr<M[]> partial(new M[static_cast<size_t>(blocks) * 2 * C]);
  const int64_t bytes = R::kInputs * rows * C * static_cast<int64_t>(sizeof(T));
  const bool streaming = R::kInputs == 2 && bytes > last_level_cache_bytes() / 2;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowsPerBlock, r1 = std::min(rows, r0 + kRowsPerBlock);
      M* acc1 = partial.get() + b * 2 * C;
      M* acc2 = acc1 + C;
      if (streaming) {
        row_block_sums<T, R, kStreamingTileRows>(red, r0, r1, rows, C, C, k, acc1, acc2);
      } else {
        row_block_sums<T>(red, r0, r1, rows, C, C, k, acc1, acc2);
      }
      block_done(r0, r1);
    }
  });
  // Block partials are added in block order; the loop runs across channels so that it
  // vectorizes (channel by channel it was a chain of dependent scalar adds, ~15% of the stats).
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    double* __restrict t1 = s1;
    double* __restrict t2 = s2;
    std::fill(t1 + c0, t1 + c1, 0.0);
    std::fill(t2 + c0, t2 + c1, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      const M* __restrict p = partial.get() + b * 2 * C;
      for (int64_t c = c0; c < c1; ++c) {
        t1[c] += static_cast<double>(p[c]);
        t2[c] += static_cast<double>(p[C + c]);
      }
    }
  });
}

// finish(c, s1, s2) for every channel.
template <typename T, typename R, typename Finish>
void channels_last_reduce(const R& red, int64_t rows, int64_t C, const math_t<T>* k,
                          const Finish& finish) {
  std::vector<double> s1(C), s2(C);
  const int64_t P = flat_period<T>(rows, C);
  if (P == 0) {
    channels_last_row_sums<T>(red, rows, C, k, s1.data(), s2.data());
  } else {
    const int64_t period_rows = rows * C / P, done = period_rows * P / C;
    std::vector<double> p1(P), p2(P);
    channels_last_row_sums<T>(red, period_rows, P, replicate(k, C, P).data(), p1.data(),
                              p2.data());
    // The left-over rows, as plain rows of C: red's indices are flat, so offset its pointers.
    channels_last_row_sums<T>(red.advanced(done * C), rows - done, C, k, s1.data(), s2.data());
    for (int64_t j = 0; j < P; ++j) {
      s1[j % C] += p1[j];
      s2[j % C] += p2[j];
    }
  }
  for (int64_t c = 0; c < C; ++c) finish(c, s1[c], s2[c]);
}

// Per-channel coefficients of an elementwise map, in the math type.
template <typename M>
struct ChannelCoefs {
  std::vector<M> mu, a, b, d;  // out = in * a + (x - mu) * b + d, or (in - mu) * a + d
  bool centered = true;        // false: mu is all zeros, folded into d
};

// y[r, c] = (x[r, c] - mu[c]) * a[c] + d[c]  (normalize; eval backward with mu = d = 0);
// with kCentered false, mu is 0 (folded into d by normalize_coefs).
template <bool kCentered, typename T>
void affine_rows_vec(const T* x, T* y, int64_t rows, int64_t C,
                     const ChannelCoefs<math_t<T>>& k, bool stream) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      affine_row<kCentered>(x + r * C, y + r * C, C, k.mu.data(), k.a.data(), k.d.data(), stream);
    }
    if (stream) stream_fence();
  });
}

// dx[r, c] = dy[r, c] * a[c] + (x[r, c] - mu[c]) * b[c] + d[c]  (training backward)
template <typename T>
void affine2_rows_vec(const T* dy, const T* x, T* dx, int64_t rows, int64_t C,
                      const ChannelCoefs<math_t<T>>& k, bool stream) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      affine2_row(dy + r * C, x + r * C, dx + r * C, C, k.a.data(), k.mu.data(), k.b.data(),
                  k.d.data(), stream);
    }
    if (stream) stream_fence();
  });
}

template <typename M>
ChannelCoefs<M> replicate(const ChannelCoefs<M>& k, int64_t C, int64_t P) {
  const auto rep = [&](const std::vector<M>& v) {
    return v.empty() ? v : replicate(v.data(), C, P);
  };
  return {rep(k.mu), rep(k.a), rep(k.b), rep(k.d), k.centered};
}

// The elementwise maps over channels-last rows, through period rows when C is small (above).
template <bool kCentered, typename T>
void affine_rows(const T* x, T* y, int64_t rows, int64_t C, const ChannelCoefs<math_t<T>>& k,
                 bool stream) {
  const int64_t P = flat_period<T>(rows, C);
  if (P == 0) return affine_rows_vec<kCentered>(x, y, rows, C, k, stream);
  const int64_t period_rows = rows * C / P, off = period_rows * P;
  affine_rows_vec<kCentered>(x, y, period_rows, P, replicate(k, C, P), stream);
  affine_rows_vec<kCentered>(x + off, y + off, rows - off / C, C, k, stream);
}

template <typename T>
void affine2_rows(const T* dy, const T* x, T* dx, int64_t rows, int64_t C,
                  const ChannelCoefs<math_t<T>>& k, bool stream) {
  const int64_t P = flat_period<T>(rows, C);
  if (P == 0) return affine2_rows_vec(dy, x, dx, rows, C, k, stream);
  const int64_t period_rows = rows * C / P, off = period_rows * P;
  affine2_rows_vec(dy, x, dx, period_rows, P, replicate(k, C, P), stream);
  affine2_rows_vec(dy + off, x + off, dx + off, rows - off / C, C, k, stream);
}

// ---- whole-tensor kernels ---------------------------------------------------------------------

// One channel's y = (x - mu) * a + d: a = w * invstd, and either mu = mean, d = b, or, folded,
// mu = 0, d = b - mean * a. (x - mean) * a + b rounds once at the output's scale; the folded
// x * a + (b - mean * a) saves a subtraction per vector but rounds x * a at the scale of
// |mean * a|, which costs up to ~1e-3 in float32 when |mean| / std reaches 1e4. A channel is
// folded only while |mean * a| stays within kFoldLimit of the output's own scale max(1, |b|):
// then both forms err by a few ulp. A folded channel's x - 0 is x, so the centered kernels give
// it the folded form's bits.
template <typename M>
struct NormalizeCoef {
  M mu, a, d;
  bool folded;
};

template <typename M>
NormalizeCoef<M> normalize_coef(M mean, M var, M w, M b, double eps) {
  constexpr double kFoldLimit = 4.0;
  const M a = static_cast<M>(w * invstd_of(var, eps));
  const double shift = static_cast<double>(mean) * a;
  if (std::abs(shift) <= kFoldLimit * std::max(1.0, std::abs(static_cast<double>(b)))) {
    return {M(0), a, static_cast<M>(static_cast<double>(b) - shift), true};
  }
  return {mean, a, b, false};  // also for NaN
}

template <typename M>
ChannelCoefs<M> normalize_coefs(const Tensor& mean, const Tensor& var, const Tensor& weight,
                                const Tensor& bias, double eps) {
  const int64_t C = mean.numel();
  ChannelCoefs<M> k{std::vector<M>(C), std::vector<M>(C), std::vector<M>(), std::vector<M>(C)};
  const M *mp = mean.const_data_ptr<M>(), *vp = var.const_data_ptr<M>();
  const M *wp = ptr_or_null<M>(weight), *bp = ptr_or_null<M>(bias);
  bool all_folded = true;
  for (int64_t c = 0; c < C; ++c) {
    const NormalizeCoef<M> e =
        normalize_coef<M>(mp[c], vp[c], opt_at<M>(wp, c, 1), opt_at<M>(bp, c, 0), eps);
    k.mu[c] = e.mu;
    k.a[c] = e.a;
    k.d[c] = e.d;
    all_folded = all_folded && e.folded;
  }
  k.centered = !all_folded;
  return k;
}

// The statistics' shift k of a channel: the mean of its kShiftSamples samples, added as
// bn_ext.h says (as the CUDA kernels do). Sample j of channel c lies at base[j] + c * S (NCHW)
// or base[j] + c (channels-last).
template <typename T>
struct ChannelShift {
  using M = math_t<T>;
  int64_t base[kShiftSamples];

  explicit ChannelShift(const ShiftSamples& samples) {
    for (int64_t j = 0, e = samples.group_start(0); j < kShiftSamples; ++j, e = samples.next(e)) {
      base[j] = samples.offset(e, 0);
    }
  }
  // Group i of the channel whose samples lie at p + base[4i .. 4i + 3].
  M group(const T* p, int i) const {
    const int64_t* b = base + 4 * i;
    auto v = [&](int j) { return shift_sample(static_cast<M>(p[b[j]])); };
    return (v(0) + v(1)) + (v(2) + v(3));
  }
  // k of the channel whose samples lie at p + base[j].
  M operator()(const T* p) const {
    M groups[kShiftGroups];
    for (int i = 0; i < kShiftGroups; ++i) groups[i] = group(p, i);
    return add_shift_groups(groups);
  }
};

// O: the statistics' type, M or double (store_moments rounds the double moments once to it).
template <typename T, typename O = math_t<T>>
void batch_stats_impl(const Tensor& xt, const Geometry& g, Tensor& mean, Tensor& var) {
  using M = math_t<T>;
  const T* x = xt.const_data_ptr<T>();
  O* mean_p = mean.data_ptr<O>();
  O* var_p = var.data_ptr<O>();
  const ShiftedMoments<T> red{x};
  const ShiftSamples samples = shift_samples(g);
  const ChannelShift<T> shift(samples);
  if (!samples.channels_last) {
    // k once per channel, inside the reduction's parallel loop.
    contiguous_reduce<T>(red, g, [&](int64_t c) { return shift(x + c * g.S); },
                         [&](int64_t c, M k, double s1, double s2) {
                           store_moments(k, s1, s2, g.count(), mean_p[c], var_p[c]);
                         });
    return;
  }
  // The same sums, a group of 4 sample rows (runs of C) at a time.
  std::vector<M> group(kShiftGroups * g.C);
  for (int i = 0; i < kShiftGroups; ++i) {
    M* out = group.data() + i * g.C;
    for (int64_t c = 0; c < g.C; ++c) out[c] = shift.group(x + c, i);
  }
  std::vector<M> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    M gc[kShiftGroups];
    for (int i = 0; i < kShiftGroups; ++i) gc[i] = group[i * g.C + c];
    k[c] = add_shift_groups(gc);
  }
  channels_last_reduce<T>(red, g.N * g.S, g.C, k.data(), [&](int64_t c, double s1, double s2) {
    store_moments(k[c], s1, s2, g.count(), mean_p[c], var_p[c]);
  });
}

template <typename T>
void normalize_impl(const Tensor& xt, const Geometry& g, const ChannelCoefs<math_t<T>>& k,
                    Tensor& yt) {
  const T* x = xt.const_data_ptr<T>();
  T* y = yt.data_ptr<T>();
  const bool stream = stream_output(2 * xt.nbytes());
  if (short_runs_as_rows<T, 3>(g, stream)) {
    using M = math_t<T>;
    if (k.centered) {
      for_each_run_row<T, 3>(g, {k.mu.data(), k.a.data(), k.d.data()},
                             [&](int64_t off, int64_t P, const std::array<const M*, 3>& e,
                                 int64_t ahead) {
                               affine_row<true>(x + off, y + off, P, e[0], e[1], e[2], false,
                                                ahead);
                             });
    } else {
      for_each_run_row<T, 2>(g, {k.a.data(), k.d.data()},
                             [&](int64_t off, int64_t P, const std::array<const M*, 2>& e,
                                 int64_t ahead) {
                               affine_row<false>(x + off, y + off, P, nullptr, e[0], e[1], false,
                                                 ahead);
                             });
    }
    return;
  }
  if (g.layout == Layout::kContiguous) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1));
    const bool by_run = whole_step_runs<T>(g);
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t i0, int64_t i1) {
      if (k.centered) {
        affine_run_range<true>(x, y, g, i0, i1, k.mu.data(), k.a.data(), k.d.data(), by_run,
                               stream);
      } else {
        affine_run_range<false>(x, y, g, i0, i1, k.mu.data(), k.a.data(), k.d.data(), by_run,
                                stream);
      }
      if (stream) stream_fence();
    });
    return;
  }
  if (k.centered) {
    affine_rows<true>(x, y, g.N * g.S, g.C, k, stream);
  } else {
    affine_rows<false>(x, y, g.N * g.S, g.C, k, stream);
  }
}

// The tile of a tile-fused pass that reads `inputs` tensors (x; or dy and x), 0 for none: NCHW
// beyond the cache (its output streams), whole channels per thread, a line-aligned tile, and
// every thread's tile of the inputs within its share of half the last-level cache.
template <typename T>
int64_t fused_tile(const Geometry& g, bool stream, int64_t inputs) {
  if (!stream || g.layout != Layout::kContiguous || !parallel_over_channels(g)) return 0;
  const int64_t G = line_aligned_tile(g, sizeof(T));
  const int64_t tile_bytes = inputs * g.N * G * g.S * static_cast<int64_t>(sizeof(T));
  return tile_bytes * at::get_num_threads() <= last_level_cache_bytes() / 2 ? G : 0;
}

// Tile-fused training forward (NCHW beyond the cache), as tile_fused_backward: the statistics'
// reduction tile by tile, each tile normalized by the thread that reduced it while its runs are
// still in its cache: x comes from memory once, 2 passes instead of 3. Same sums, mean, var and
// per-channel coefficients as the split path, so the same bits. 2-core Zen 3, split ->
// tile-fused, paired medians of 15 alternating rounds: fp32 32x1024x14x14 1.29x, 32x512x28x28
// 1.42x, 256x2048x7x7 1.57x, 256x512x7x7 1.01x, 32x256x56x56 1.38x, 32x64x112x112 1.46x,
// 8x32x256x256 1.42x; fp64 1.24-1.42x; bf16 1.02-1.13x. Tiles as the backward's (whole cache
// lines per piece, one channel for runs of 4 KiB and more).
template <typename T>
void tile_fused_forward_impl(const T* x, T* y, const Geometry& g, int64_t tile,
                             const math_t<T>* wp, const math_t<T>* bp, double eps,
                             math_t<T>* mean_p, math_t<T>* var_p) {
  using M = math_t<T>;
  const ChannelShift<T> shift(shift_samples(g));
  std::vector<M> mu(g.C), a(g.C), d(g.C);
  const bool by_run = whole_step_runs<T>(g);
  contiguous_reduce<T>(
      ShiftedMoments<T>{x}, g, [&](int64_t c) { return shift(x + c * g.S); },
      [&](int64_t c, M k, double s1, double s2) {
        store_moments(k, s1, s2, g.count(), mean_p[c], var_p[c]);
        const NormalizeCoef<M> e = normalize_coef<M>(mean_p[c], var_p[c], opt_at<M>(wp, c, 1),
                                                     opt_at<M>(bp, c, 0), eps);
        mu[c] = e.mu;
        a[c] = e.a;
        d[c] = e.d;
      },
      [&](int64_t c0, int64_t c1) {
        for (int64_t n = 0; n < g.N; ++n) {
          affine_run_range<true>(x, y, g, n * g.C + c0, n * g.C + c1, mu.data(), a.data(),
                                 d.data(), by_run, /*stream=*/true);
        }
        stream_fence();
      },
      tile);
}

// Statistics, then the elementwise pass (three passes over x), or tile-fused beyond the cache.
// An earlier fused variant, a channel at a time for every tensor, measured slower on every
// shape tried on the 2-core EPYC (Zen 5): 32x64x56x56 2.0 vs 1.2 ms, 32x2048x7x7 0.84 vs
// 0.63 ms, 32x256x56x56 13.9 vs 13.5 ms; within the cache the split path's second read is a
// cache hit, so only tensors beyond it take the tile-fused path.
template <typename T>
void train_forward_impl(const Tensor& xt, const Geometry& g, const Tensor& weight,
                        const Tensor& bias, double eps, Tensor& yt, Tensor& mean, Tensor& var) {
  using M = math_t<T>;
  if (const int64_t tile = fused_tile<T>(g, stream_output(2 * xt.nbytes()), 1)) {
    tile_fused_forward_impl<T>(xt.const_data_ptr<T>(), yt.data_ptr<T>(), g, tile,
                               ptr_or_null<M>(weight), ptr_or_null<M>(bias), eps,
                               mean.data_ptr<M>(), var.data_ptr<M>());
    return;
  }
  batch_stats_impl<T>(xt, g, mean, var);
  normalize_impl<T>(xt, g, normalize_coefs<M>(mean, var, weight, bias, eps), yt);
}

template <typename T>
// sum_dy, sum_dy_xmu, and from them grad_bias = sum_dy, grad_weight = sum_dy_xmu * invstd.
void backward_reduce_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                          const Tensor& mean, const Tensor& var, double eps, Tensor& sum_dy,
                          Tensor& sum_dy_xmu, Tensor& grad_weight, Tensor& grad_bias) {
  using M = math_t<T>;
  const M* mu = mean.const_data_ptr<M>();
  const M* vp = var.const_data_ptr<M>();
  M* s1p = sum_dy.data_ptr<M>();
  M* s2p = sum_dy_xmu.data_ptr<M>();
  M* gw = grad_weight.data_ptr<M>();
  M* gb = grad_bias.data_ptr<M>();
  const auto store = [&](int64_t c, double s1, double s2) {
    s1p[c] = gb[c] = static_cast<M>(s1);
    s2p[c] = static_cast<M>(s2);
    gw[c] = static_cast<M>(s2p[c] * invstd_of(vp[c], eps));
  };
  const CenteredDot<T> red{dyt.const_data_ptr<T>(), xt.const_data_ptr<T>()};
  if (g.layout == Layout::kContiguous) {
    contiguous_reduce<T>(red, g, [&](int64_t c) { return mu[c]; },
                         [&](int64_t c, M, double s1, double s2) { store(c, s1, s2); });
    return;
  }
  channels_last_reduce<T>(red, g.N * g.S, g.C, mu, store);
}

// dx = dy * a + (x - mu) * b + d with per-channel a, mu, b, d.
template <typename T>
void affine2_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                  const ChannelCoefs<math_t<T>>& k, Tensor& dxt) {
  const T* dy = dyt.const_data_ptr<T>();
  const T* x = xt.const_data_ptr<T>();
  T* dx = dxt.data_ptr<T>();
  const bool stream = stream_output(3 * xt.nbytes());
  if (short_runs_as_rows<T, 4>(g, stream)) {
    using M = math_t<T>;
    for_each_run_row<T, 4>(g, {k.a.data(), k.mu.data(), k.b.data(), k.d.data()},
                           [&](int64_t off, int64_t P, const std::array<const M*, 4>& e,
                               int64_t ahead) {
                             affine2_row(dy + off, x + off, dx + off, P, e[0], e[1], e[2], e[3],
                                         false, ahead);
                           });
    return;
  }
  if (g.layout == Layout::kContiguous) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.S, 1));
    const bool by_run = whole_step_runs<T>(g);
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t i0, int64_t i1) {
      affine2_run_range(dy, x, dx, g, i0, i1, k.a.data(), k.mu.data(), k.b.data(), k.d.data(),
                        by_run, stream);
      if (stream) stream_fence();
    });
    return;
  }
  affine2_rows(dy, x, dx, g.N * g.S, g.C, k, stream);
}

// Eval's dx = dy * a, a = w * invstd: normalize's map of dy with mean 0 and no bias, with the
// coefficients normalize_coefs gives it (folded: mu = d = 0), without a tensor of zeros to build.
template <typename M>
ChannelCoefs<M> eval_grad_coefs(const Tensor& var, const Tensor& weight, double eps) {
  const int64_t C = var.numel();
  ChannelCoefs<M> k{std::vector<M>(C), std::vector<M>(C), std::vector<M>(), std::vector<M>(C)};
  const M *vp = var.const_data_ptr<M>(), *wp = ptr_or_null<M>(weight);
  for (int64_t c = 0; c < C; ++c) {
    k.a[c] = static_cast<M>(opt_at<M>(wp, c, 1) * invstd_of(vp[c], eps));
  }
  k.centered = false;
  return k;
}

template <typename T>
void backward_input_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                         const Tensor& mean, const Tensor& var, const Tensor& weight,
                         const Tensor& sum_dy, const Tensor& sum_dy_xmu, double n, double eps,
                         Tensor& dxt) {
  using M = math_t<T>;
  const int64_t C = g.C;
  if (!sum_dy.defined()) {
    // Eval: dx = dy * w * invstd, which is normalize() applied to dy with mean 0 and no bias.
    // x is not read, so an inf in x cannot turn into a NaN gradient (as in torch).
    normalize_impl<T>(dyt, g, eval_grad_coefs<M>(var, weight, eps), dxt);
    return;
  }
  ChannelCoefs<M> k{std::vector<M>(C), std::vector<M>(C), std::vector<M>(C), std::vector<M>(C)};
  const M *mp = mean.const_data_ptr<M>(), *vp = var.const_data_ptr<M>();
  const M *s1p = sum_dy.const_data_ptr<M>(), *s2p = sum_dy_xmu.const_data_ptr<M>();
  const M* wp = ptr_or_null<M>(weight);
  for (int64_t c = 0; c < C; ++c) {
    const BackwardCoefs b =
        backward_coefs(opt_at<M>(wp, c, 1), invstd_of(vp[c], eps), s1p[c], s2p[c], n);
    k.mu[c] = mp[c];
    k.a[c] = static_cast<M>(b.a);
    k.b[c] = static_cast<M>(b.b);
    k.d[c] = static_cast<M>(b.d);
  }
  affine2_impl<T>(dyt, xt, g, k, dxt);
}

// Runs of at least this many bytes are long: the fused backward streams whole pages of them.
constexpr int64_t kLongRunBytes = 4096;

// Fused: a thread reduces one channel's runs, then writes its dx while they are still in cache
// (L2 or the last level), so dy and x come from memory once: three passes, not five. Worth it
// for long runs while every thread's channel fits in half the last-level cache (2 threads,
// 32 MiB: 32x256x56x56 14.5 -> 10.0 ms, 32x64x112x112 13.1 -> 9.3, 256x64x56x56 21.9 -> 19.7,
// 8x32x256x256 7.5 -> 5.3). With short runs a channel's dx is written in scattered 7x7 pieces,
// each starting on cold lines, and the split path was faster (32x2048x7x7: 2.37 vs 1.62 ms;
// 14x14 and 28x28 even); out of cache, tiles of adjacent channels do gain (tile_fused_backward).
bool fused_backward(const Geometry& g, int64_t itemsize) {
  const int64_t channel_bytes = 2 * g.N * g.S * itemsize;  // dy and x
  return g.layout == Layout::kContiguous && parallel_over_channels(g) &&
         g.S * itemsize >= kLongRunBytes &&
         channel_bytes * at::get_num_threads() <= last_level_cache_bytes() / 2;
}

// Channels-last tensors of few rows and many channels (256x1000, 32x4096) leave the split path
// little to spread over the threads (a few row blocks each) and as much to spend on its three
// parallel regions, block partials and two serial passes over the channels as on the arithmetic.
// There, and within kSmallFusedBytes (dy, x and dx together), each thread instead takes a strip
// of whole channels, kWidth-aligned: it sums them down every row block (row_block_sums with the
// tensor's row stride), makes their coefficients, and writes their dx while the strip is in its
// cache. Aligned strips see the same vector steps, row blocks and rounding as the split path, so
// the bits are the same. 2-core Zen 5, train_backward, split -> strips: 32x4096 84 -> 37 us,
// 128x2048 69 -> 54 us, 256x1000 58 -> 54 us; with many rows the strips lost (1024x256 44 -> 52).
// A thread's share is cut into strips of at most kStripBytes of dy and x, so that the map reads
// them from L2 rather than the last level (256x1000: 46 -> 43 us, 32x4096: 34 -> 31 us; 128 KiB
// and 512 KiB were no better).
constexpr int64_t kSmallFusedBytes = int64_t{4} << 20;
constexpr int64_t kStripBytes = int64_t{256} << 10;

template <typename T>
bool channel_strips_backward(const Geometry& g) {
  const int64_t rows = g.N * g.S;
  return g.layout == Layout::kChannelsLast && flat_period<T>(rows, g.C) == 0 &&
         rows <= 2 * kRowsPerBlock * at::get_num_threads() &&
         3 * rows * g.C * static_cast<int64_t>(sizeof(T)) <= kSmallFusedBytes;
}

template <typename T>
void channel_strips_backward_impl(const T* dy, const T* x, T* dx, const Geometry& g,
                                  const math_t<T>* mu, const math_t<T>* vp, const math_t<T>* wp,
                                  double eps, math_t<T>* gw, math_t<T>* gb) {
  using M = math_t<T>;
  constexpr int64_t W = VecIO<T>::kWidth;
  const int64_t rows = g.N * g.S, C = g.C;
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = ((C + threads - 1) / threads + W - 1) / W * W;
  const int64_t fits = kStripBytes / (2 * rows * static_cast<int64_t>(sizeof(T))) / W * W;
  const int64_t width = std::min(per_thread, std::max(W, fits));
  const CenteredDot<T> red{dy, x};
  at::parallel_for(0, (C + width - 1) / width, 1, [&](int64_t t0, int64_t t1) {
    std::vector<M> acc1(width), acc2(width), a(width), b(width), d(width);
    std::vector<double> s1(width), s2(width);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * width, n = std::min(C, c0 + width) - c0;
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerBlock) {
        row_block_sums<T>(red.advanced(c0), r0, std::min(rows, r0 + kRowsPerBlock), rows, n, C,
                          mu + c0, acc1.data(), acc2.data());
        for (int64_t j = 0; j < n; ++j) {
          s1[j] += acc1[j];
          s2[j] += acc2[j];
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t c = c0 + j;
        const BackwardCoefs k = fused_channel_backward<M>(s1[j], s2[j], vp[c],
                                                          opt_at<M>(wp, c, 1), eps, g.count(),
                                                          gb[c], gw[c]);
        a[j] = static_cast<M>(k.a);
        b[j] = static_cast<M>(k.b);
        d[j] = static_cast<M>(k.d);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t base = r * C + c0;
        affine2_row(dy + base, x + base, dx + base, n, a.data(), mu + c0, b.data(), d.data(),
                    false);
      }
    }
  });
}

// Tile-fused (short runs, out of cache): the split path's reduction, tile by tile
// (contiguous_reduce), each tile's dx written by the thread that reduced it, right after. A tile
// is a few adjacent channels (~4 KiB of each n's runs, back to back), N such pieces C * S apart;
// its dy and x are still in the thread's cache when the map reads them, so they come from memory
// once: 3 passes, not 5. 2-core Zen 3, split -> tile-fused, paired medians of 15-21 alternating
// rounds: fp32 32x2048x7x7 1.24x, 256x512x7x7 1.14x, 256x2048x7x7 1.06x, 32x128x28x28 1.47x,
// 32x512x28x28 1.28x, 256x256x28x28 1.30x, 32x1024x14x14 1.36x, 256x256x14x14 1.42x; fp64
// 32x512x14x14 1.31x, 256x512x7x7 1.44x.
// Only where every piece starts on a cache line (line_aligned_tile): fp32 14x14 in tiles of 5
// channels (3920 bytes), whose vectors straddle lines and whose stores cannot stream, lost
// (32x512x14x14 0.84x, 256x256x14x14 0.97x); in tiles of 4 it gains (above). Not within the
// cache (dy, x and dx below it: the split path's second read is a cache hit too): 32x512x7x7
// 0.88x, 32x64x28x28 0.91x. Not bf16/fp16, bound by the conversions: 256x512x7x7 0.91x.
template <typename T>
int64_t tile_fused_backward(const Geometry& g, bool stream) {
  const bool short_runs = g.S * static_cast<int64_t>(sizeof(T)) < kLongRunBytes;
  return !at::vec::is_reduced_floating_point_v<T> && short_runs ? fused_tile<T>(g, stream, 2) : 0;
}

// dx, grad_weight and grad_bias, as train_backward, for both fused paths: `tile` channels
// reduced, then their dx written (run by run when by_run).
template <typename T>
void fused_backward_impl(const T* dy, const T* x, T* dx, const Geometry& g, int64_t tile,
                         bool by_run, bool stream, const math_t<T>* mu, const math_t<T>* vp,
                         const math_t<T>* wp, double eps, math_t<T>* gw, math_t<T>* gb) {
  using M = math_t<T>;
  std::vector<M> a(g.C), b(g.C), d(g.C);
  contiguous_reduce<T>(
      CenteredDot<T>{dy, x}, g, [&](int64_t c) { return mu[c]; },
      [&](int64_t c, M, double s1, double s2) {
        const BackwardCoefs k = fused_channel_backward<M>(s1, s2, vp[c], opt_at<M>(wp, c, 1), eps,
                                                          g.count(), gb[c], gw[c]);
        a[c] = static_cast<M>(k.a);
        b[c] = static_cast<M>(k.b);
        d[c] = static_cast<M>(k.d);
      },
      [&](int64_t c0, int64_t c1) {
        for (int64_t n = 0; n < g.N; ++n) {
          affine2_run_range(dy, x, dx, g, n * g.C + c0, n * g.C + c1, a.data(), mu, b.data(),
                            d.data(), by_run, stream);
        }
        if (stream) stream_fence();
      },
      tile);
}

template <typename T>
void train_backward_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                         const Tensor& mean, const Tensor& var, const Tensor& weight, double eps,
                         Tensor& dxt, Tensor& grad_weight, Tensor& grad_bias) {
  using M = math_t<T>;
  const bool stream = stream_output(3 * xt.nbytes());
  const auto fused = [&](int64_t tile, bool by_run) {
    fused_backward_impl<T>(dyt.const_data_ptr<T>(), xt.const_data_ptr<T>(), dxt.data_ptr<T>(),
                           g, tile, by_run, stream, mean.const_data_ptr<M>(),
                           var.const_data_ptr<M>(), ptr_or_null<M>(weight), eps,
                           grad_weight.data_ptr<M>(), grad_bias.data_ptr<M>());
  };
  if (const int64_t tile = tile_fused_backward<T>(g, stream)) {
    fused(tile, whole_step_runs<T>(g));
    return;
  }
  if (fused_backward(g, sizeof(T))) {
    fused(1, /*by_run=*/true);  // a channel at a time (channels_per_tile's for long runs)
    return;
  }
  if (channel_strips_backward<T>(g)) {
    channel_strips_backward_impl<T>(dyt.const_data_ptr<T>(), xt.const_data_ptr<T>(),
                                    dxt.data_ptr<T>(), g, mean.const_data_ptr<M>(),
                                    var.const_data_ptr<M>(), ptr_or_null<M>(weight), eps,
                                    grad_weight.data_ptr<M>(), grad_bias.data_ptr<M>());
    return;
  }
  Tensor sum_dy = at::empty_like(grad_bias), sum_dy_xmu = at::empty_like(grad_weight);
  backward_reduce_impl<T>(dyt, xt, g, mean, var, eps, sum_dy, sum_dy_xmu, grad_weight,
                          grad_bias);
  backward_input_impl<T>(dyt, xt, g, mean, var, weight, sum_dy, sum_dy_xmu,
                         static_cast<double>(g.count()), eps, dxt);
}

// Eval's backward: dx = dy * a, grad_bias = sum(dy), grad_weight = sum(dy * (x - mean)) * invstd.
// dx needs no sum, so the reduction's threads write dx for what they have just reduced while it
// is still in their cache: NCHW with enough channels, a tile of channels (tiles as the training
// backward's beyond the cache, fused_tile, else contiguous_reduce's); channels-last, a block of
// rows. dy and x are read once: 3 passes instead of the two ops' 4, and one parallel region
// instead of two. Elsewhere (few NCHW channels or tiles, few channels-last rows, or C with a flat
// period) backward_reduce and then the map. The same sums and coefficients either way, so the
// same bits as backward_reduce and backward_input for input dense in either layout (the front
// door reduces other input in the layout of its output, backward_reduce in read_layout's, as
// train_backward does: equal to rounding). 2-core Intel VM, op level, the two ops -> one,
// medians of 7 alternating rounds: NCHW fp32 8x256x7x7 1.10x, 32x512x7x7 1.04x, 256x2048x7x7 1.06x,
// 32x64x56x56 1.11x, 32x256x56x56 1.22x, 32x64x112x112 1.29x; bf16 32x256x56x56 1.34x, 8x256x7x7
// 1.14x; channels-last fp32 8x256x7x7 1.23x, 32x64x56x56 1.18x, 32x256x56x56 1.31x, 32x2048x7x7
// 1.03x, (4096, 1024) 1.09x; bf16 32x256x56x56 1.18x, 32x64x56x56 0.98x, (4096, 1024) 1.00x. Not
// NCHW bf16/fp16 with short runs beyond the cache, where the split map's rows win (as in the
// training backward): 256x512x7x7 bf16 0.82x fused.
template <typename T>
void normalize_backward_impl(const Tensor& dyt, const Tensor& xt, const Geometry& g,
                             const Tensor& mean, const Tensor& var, const Tensor& weight,
                             double eps, Tensor& dxt, Tensor& grad_weight, Tensor& grad_bias) {
  using M = math_t<T>;
  const ChannelCoefs<M> k = eval_grad_coefs<M>(var, weight, eps);
  const bool stream = stream_output(3 * xt.nbytes());
  const bool short_runs = g.S * static_cast<int64_t>(sizeof(T)) < kLongRunBytes;
  const bool split_map = at::vec::is_reduced_floating_point_v<T> && short_runs && stream;
  const int64_t rows = g.N * g.S, threads = at::get_num_threads();
  // Fused, dx is written by the reduction's tasks (tiles, blocks of rows): only where there are
  // at least as many as threads, so that none is left out of the map ((32, 4096) is one block).
  const int64_t tile = fused_tile<T>(g, stream, 2);  // 0: contiguous_reduce's tiles
  const int64_t per_tile = tile > 0 ? tile : channels_per_tile(g, sizeof(T));
  const int64_t tiles = (g.C + per_tile - 1) / per_tile;
  const bool fuse_nchw = g.layout == Layout::kContiguous && parallel_over_channels(g) &&
                         !split_map && tiles >= threads;
  const bool fuse_rows = g.layout == Layout::kChannelsLast && flat_period<T>(rows, g.C) == 0 &&
                         rows >= kRowsPerBlock * threads;
  if (!fuse_nchw && !fuse_rows) {
    Tensor sum_dy = at::empty_like(grad_bias), sum_dy_xmu = at::empty_like(grad_weight);
    backward_reduce_impl<T>(dyt, xt, g, mean, var, eps, sum_dy, sum_dy_xmu, grad_weight,
                            grad_bias);
    normalize_impl<T>(dyt, g, k, dxt);
    return;
  }
  const T* dy = dyt.const_data_ptr<T>();
  T* dx = dxt.data_ptr<T>();
  const M* mu = mean.const_data_ptr<M>();
  const M* vp = var.const_data_ptr<M>();
  M* gw = grad_weight.data_ptr<M>();
  M* gb = grad_bias.data_ptr<M>();
  // backward_reduce_impl's rounding: the sums to M, then grad_weight = M(sum_dy_xmu) * invstd
  const auto finish = [&](int64_t c, double s1, double s2) {
    gb[c] = static_cast<M>(s1);
    gw[c] = static_cast<M>(static_cast<M>(s2) * invstd_of(vp[c], eps));
  };
  const CenteredDot<T> red{dy, xt.const_data_ptr<T>()};
  if (fuse_nchw) {
    const bool by_run = whole_step_runs<T>(g);
    contiguous_reduce<T>(
        red, g, [&](int64_t c) { return mu[c]; },
        [&](int64_t c, M, double s1, double s2) { finish(c, s1, s2); },
        [&](int64_t c0, int64_t c1) {
          for (int64_t n = 0; n < g.N; ++n) {
            affine_run_range<false>(dy, dx, g, n * g.C + c0, n * g.C + c1, k.mu.data(),
                                    k.a.data(), k.d.data(), by_run, stream);
          }
          if (stream) stream_fence();
        },
        tile);
    return;
  }
  // channels-last rows (channels_last_reduce's, without its flat period rows for small C)
  std::vector<double> s1(g.C), s2(g.C);
  channels_last_row_sums<T>(red, rows, g.C, mu, s1.data(), s2.data(),
                            [&](int64_t r0, int64_t r1) {
                              for (int64_t r = r0; r < r1; ++r) {
                                affine_row<false>(dy + r * g.C, dx + r * g.C, g.C, nullptr,
                                                  k.a.data(), k.d.data(), stream);
                              }
                              if (stream) stream_fence();
                            });
  for (int64_t c = 0; c < g.C; ++c) finish(c, s1[c], s2[c]);
}

#define BN_EXT_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// running_stats_update (bn_ext.h) with the batch's count n.
void update_running_stats(const RunningStats& r, const Tensor& mean, const Tensor& var, double n) {
  double m = r.momentum.value_or(0.0);
  if (r.num_batches_tracked.defined()) {
    int64_t* nbt = r.num_batches_tracked.data_ptr<int64_t>();
    *nbt += 1;
    if (!r.momentum.has_value()) m = 1.0 / static_cast<double>(*nbt);
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_ext::running_stats_update", [&] {
    scalar_t* rm = r.mean.data_ptr<scalar_t>();
    scalar_t* rv = r.var.data_ptr<scalar_t>();
    const scalar_t* bm = mean.const_data_ptr<scalar_t>();
    const scalar_t* bv = var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      blend_running_stats(rm[c], rv[c], bm[c], bv[c], m, n / (n - 1));
    }
  });
}

}  // namespace

// ---- entry points (bn_ext.h) ----------------------------------------------------------------

void batch_stats(const Tensor& x, const Geometry& g, Tensor& mean, Tensor& var) {
  BN_EXT_DISPATCH(x, "bn_ext::batch_stats", [&] {
    if (mean.scalar_type() == at::kDouble) {
      batch_stats_impl<scalar_t, double>(x, g, mean, var);
    } else {
      batch_stats_impl<scalar_t>(x, g, mean, var);
    }
  });
}

void normalize(const Tensor& x, const Geometry& g, const Tensor& mean, const Tensor& var,
               const Tensor& weight, const Tensor& bias, double eps, Tensor& y) {
  BN_EXT_DISPATCH(x, "bn_ext::normalize", [&] {
    normalize_impl<scalar_t>(x, g, normalize_coefs<math_t<scalar_t>>(mean, var, weight, bias, eps),
                             y);
  });
}

void train_forward(const Tensor& x, const Geometry& g, const Tensor& weight, const Tensor& bias,
                   double eps, Tensor& y, Tensor& mean, Tensor& var,
                   const RunningStats* running) {
  BN_EXT_DISPATCH(x, "bn_ext::train_forward",
                  [&] { train_forward_impl<scalar_t>(x, g, weight, bias, eps, y, mean, var); });
  if (running != nullptr) update_running_stats(*running, mean, var, static_cast<double>(g.count()));
}

void backward_reduce(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                     const Tensor& var, double eps, Tensor& sum_dy, Tensor& sum_dy_xmu,
                     Tensor& grad_weight, Tensor& grad_bias) {
  BN_EXT_DISPATCH(x, "bn_ext::backward_reduce", [&] {
    backward_reduce_impl<scalar_t>(dy, x, g, mean, var, eps, sum_dy, sum_dy_xmu, grad_weight,
                                   grad_bias);
  });
}

void backward_input(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, const Tensor& sum_dy,
                    const Tensor& sum_dy_xmu, const Tensor& count, double eps, Tensor& dx) {
  BN_EXT_DISPATCH(x, "bn_ext::backward_input", [&] {
    const double n = sum_dy.defined() ? count.item<double>() : 0.0;
    backward_input_impl<scalar_t>(dy, x, g, mean, var, weight, sum_dy, sum_dy_xmu, n, eps, dx);
  });
}

void normalize_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                        const Tensor& var, const Tensor& weight, double eps, Tensor& dx,
                        Tensor& grad_weight, Tensor& grad_bias) {
  BN_EXT_DISPATCH(x, "bn_ext::normalize_backward", [&] {
    normalize_backward_impl<scalar_t>(dy, x, g, mean, var, weight, eps, dx, grad_weight,
                                      grad_bias);
  });
}

void train_backward(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                    const Tensor& var, const Tensor& weight, double eps, Tensor& dx,
                    Tensor& grad_weight, Tensor& grad_bias) {
  BN_EXT_DISPATCH(x, "bn_ext::train_backward", [&] {
    train_backward_impl<scalar_t>(dy, x, g, mean, var, weight, eps, dx, grad_weight, grad_bias);
  });
}

void running_stats_update(Tensor& running_mean, Tensor& running_var,
                          const Tensor& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, const Tensor& count,
                          c10::optional<double> momentum) {
  const RunningStats r{running_mean, running_var, num_batches_tracked, momentum};
  update_running_stats(r, mean, var, count.item<double>());
}

}  // namespace cpu
}  // namespace bn_ext
