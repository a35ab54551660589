// Single-pass (persistent) training forward and backward.
//
// The multi-pass ops read the input twice: once for the per-channel sums, once more for the
// elementwise map (train forward: 3 passes, read x, read x, write y; backward: 5). Here every
// element is loaded once into registers, the sums are merged across the blocks that share a
// channel, and the output is written from the registers: 2 passes forward, 3 backward.
//
// Tiles and blocks. A tile is the set of channels merged together: one channel (contiguous), or
// the bx * V channels of a (bx, by) block's columns (channels-last; bx as wide as fits). G blocks
// share a tile; each holds up to kItems vectors of V elements per thread, item i of block g being
// the tile's (i * G + g)-th group of kThreads vectors (contiguous) or of by rows (channels-last),
// as the multi-pass kernels stride.
// The grid is P * G blocks, all resident at once (a cooperative launch guarantees it or fails);
// block b serves tiles b / G, b / G + P, ... as its g = b % G part.
//
// Per tile: sums as in the multi-pass reduction (same op, same shift, lane sums then
// block_merge / column_merge); each block stores its pair in partial[2][G][C]; the G blocks meet
// at the tile's barrier (a counter in global memory, the pattern of cooperative groups' grid
// sync, scoped to the tile); then every block merges the G pairs in the same fixed order (so all
// hold the same bits), derives the coefficients (Op::finish; block 0 also stores the outputs),
// and maps its registers. No floating-point atomics: the results depend only on the shape, the
// dtype, the alignment and the grid plan (fixed by the shape and the device).
//
// Deadlock freedom: a block waits only at its current tile's barrier, and the tile's other
// G - 1 blocks are resident and (by induction over the tiles before it) reach it too.
//
// Where a contiguous channel fits in one block (G = 1), an ordinary launch of one block per
// channel replaces all this (persistent_channel_block_kernel, below). Where a channels-last
// input's channels fit one tile but its rows do not fit on chip, BN_EXT_CUDA_SEMI_PERSISTENT=1
// (an experiment) holds what fits and reads the rest again (semi_persistent_rows_kernel, below).
//
// Eligibility is decided here (channel_block() and persistent() return false, launching nothing):
// 32-bit indices, cooperative launch (but for one block per channel), and one tile within the
// resident blocks' registers (kItems per thread).
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "channel_ops.cuh"

namespace bn_ext {
namespace cuda {
namespace detail {
namespace {

// Blocks per SM that the register allocation must allow: 2, so at most 128 registers a thread.
constexpr int kMinBlocks = 2;

// Vectors of V held per thread, per input: 32 elements (16 of float64), 32 registers in 32-bit
// types, 16 packed in 16-bit ones (a lane is widened where it is used); 16 when unvectorized, as
// each also holds an address.
template <typename T, int V>
constexpr int kItems = V == 1 ? 16 : (sizeof(math_t<T>) == 8 ? 16 : 32) / V;

// The calling block adds 1 to *count, after what any of its threads stored before (thread 0,
// after a fence). The whole block calls it.
__device__ __forceinline__ void arrive(unsigned int* count) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    atomicAdd(count, 1u);
  }
}

// Waits (the whole block) until *count reaches target; what was stored before the arrivals
// that reached it is then visible (read it with __ldcg: L1 is not coherent).
__device__ __forceinline__ void await_count(const unsigned int* count, unsigned int target) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const volatile unsigned int* c = count;
    while (*c < target) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
      __nanosleep(32);
#endif
    }
    __threadfence();
  }
  __syncthreads();
}

// The blocks of tile t arrive; returns when all G have. Partial sums stored before it (by any
// thread of any of the G blocks) are visible after it.
__device__ __forceinline__ void tile_barrier(unsigned int* arrived, int64_t t, unsigned int G) {
  arrive(arrived + t);
  await_count(arrived + t, G);
}

template <typename M>
__device__ __forceinline__ Sums<M> load_partial(const M* partial, int64_t C, int64_t G, int64_t g,
                                                int64_t c) {
  return Sums<M>{__ldcg(partial + g * C + c), __ldcg(partial + (G + g) * C + c)};
}

template <typename M>
__device__ __forceinline__ void store_partial(M* partial, int64_t C, int64_t G, int64_t g,
                                              int64_t c, const Sums<M>& s) {
  partial[g * C + c] = s.s1;
  partial[(G + g) * C + c] = s.s2;
}

// A channels-last block's sums of its V channels a column: merged down the block's rows, and
// stored by row 0 as block g's pairs (where its channels are in the tensor). Every thread of the
// block calls it.
template <int V, typename M, typename I>
__device__ __forceinline__ void stage_tile_sums(const M (&a1)[V], const M (&a2)[V],
                                                Sums<M>* smem, M* partial, I C, int64_t G,
                                                int64_t g, I c0, bool active) {
  Sums<M> v[V];
#pragma unroll
  for (int w = 0; w < V; ++w) v[w] = Sums<M>{a1[w], a2[w]};
  column_merge<M, V>(v, smem);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int w = 0; w < V; ++w) {
      store_partial(partial, static_cast<int64_t>(C), G, g, c0 + w, v[w]);
    }
  }
}

// Contiguous (N, C, S): tile = channel c, its nv = N * S / V vectors; vector j at
// (j / per_run * C + c) * S + (j % per_run) * V. 1-D blocks of kThreads.
template <typename T, typename Op, typename I, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    persistent_contiguous_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy,
                                 T* __restrict__ out, I C, I S,
                                 at::cuda::detail::IntDivider<I> per_run, I nv, int64_t G,
                                 math_t<T>* __restrict__ partial,
                                 unsigned int* __restrict__ arrived) {
  using M = math_t<T>;
  constexpr bool kDy = Op::kNeedsDy;
  constexpr int kN = kItems<T, V>;
  __shared__ typename BlockMerge<M>::TempStorage tmp;
  __shared__ M groups[Op::kSampledShift ? kShiftGroups : 1], shift;
  __shared__ Coefs<M> coefs;
  const int64_t P = gridDim.x / G;
  const int64_t g = blockIdx.x % G;
  const auto offset = [&](I j, I c) {
    const auto qr = per_run.divmod(j);  // (n, vector within the run)
    return (qr.div * C + c) * S + qr.mod * V;
  };
  for (int64_t t = blockIdx.x / G; t < static_cast<int64_t>(C); t += P) {
    const I c = static_cast<I>(t);
    // The shift first, before the tile's registers fill up (channel_shift ends in a barrier).
    channel_shift(op, t, threadIdx.x, groups, &shift);
    const M k0 = shift;
    // Item i of block g: vectors [(i * G + g) * kThreads, + kThreads), so that every block of
    // the tile holds about nv / G of them.
    const I j0 = static_cast<I>(g * kThreads) + threadIdx.x;
    const I step = static_cast<I>(G * kThreads);
    Vec<T, V> xs[kN];
    Vec<T, V> ds[kDy ? kN : 1];
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const I j = j0 + i * step;
      if (j < nv) {
        const I o = offset(j, c);
        xs[i] = load_vec<V>(x + o);
        if constexpr (kDy) ds[i] = load_vec<V>(dy + o);
      }
    }
    M k[V], a1[V], a2[V];
    start_lanes<V>(k0, k, a1, a2);
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      if (j0 + i * step < nv) accumulate_vec<Op, V>(xs[i], ds[kDy ? i : 0], k, a1, a2);
    }
    Sums<M> s = merge_lanes<V>(a1, a2);
    s = block_merge<M>(s, tmp);
    if (threadIdx.x == 0) store_partial(partial, static_cast<int64_t>(C), G, g, t, s);

    tile_barrier(arrived, t, static_cast<unsigned int>(G));

    // Every block of the tile: the G pairs, g ascending per thread, then the block's fixed tree.
    Sums<M> m{0, 0};
    for (int64_t h = threadIdx.x; h < G; h += kThreads) {
      m = merge(m, load_partial(partial, static_cast<int64_t>(C), G, h, t));
    }
    m = block_merge<M>(m, tmp);
    if (threadIdx.x == 0) coefs = op.finish(t, k0, m.s1, m.s2, g == 0);
    __syncthreads();
    const Coefs<M> kc = coefs;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const I j = j0 + i * step;
      if (j < nv) {
        const Vec<T, V> o = map_vec<Op>(xs[i], ds[kDy ? i : 0], kc);
        store_vec<V>(out + offset(j, c), o);
      }
    }
    __syncthreads();  // shift, coefs and tmp are reused by the next tile
  }
}

// Channels-last (rows = N * S rows of C): tile t = channel vectors [t * bx, t * bx + bx), a
// thread's V channels from c0 = (t * bx + tx) * V; item i of block g at row (i * G + g) * by + ty.
template <typename T, typename Op, typename I, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    persistent_channels_last_kernel(const Op op, const T* __restrict__ x,
                                    const T* __restrict__ dy, T* __restrict__ out, I rows, I C,
                                    int64_t tiles, int64_t G, math_t<T>* __restrict__ partial,
                                    unsigned int* __restrict__ arrived) {
  using M = math_t<T>;
  constexpr bool kDy = Op::kNeedsDy;
  constexpr int kN = kItems<T, V>;
  __shared__ Sums<M> smem[kThreads / 2 * V];
  __shared__ M groups[Op::kSampledShift ? kShiftGroups * 32 * V : 1], shifts[32 * V];
  __shared__ Coefs<M> coefs[32 * V];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int tid = ty * bx + tx;
  const int64_t P = gridDim.x / G;
  const int64_t g = blockIdx.x % G;
  for (int64_t t = blockIdx.x / G; t < tiles; t += P) {
    // The tile's shifts first, before its registers fill up (tile_shifts_rows ends in a
    // barrier).
    const int width = bx * V;
    const int64_t first = t * width;
    const int here = static_cast<int>(std::min<int64_t>(width, static_cast<int64_t>(C) - first));
    const I c0 = static_cast<I>((t * bx + tx) * V);
    const bool active = c0 < C;  // V divides C: a thread's channels are all in or all out
    tile_shifts_rows<T, V>(op, first, width, here, tx, ty, tid, active, groups, shifts);
    // Item i of block g: rows [(i * G + g) * by, + by).
    const I r0 = static_cast<I>(g * by) + ty;
    const I step = static_cast<I>(G * by);
    Vec<T, V> xs[kN];
    Vec<T, V> ds[kDy ? kN : 1];
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const I r = r0 + i * step;
      if (active && r < rows) {
        xs[i] = load_vec<V>(x + r * C + c0);
        if constexpr (kDy) ds[i] = load_vec<V>(dy + r * C + c0);
      } else {  // mapped below (all items, which costs fewer registers) but never stored
        xs[i] = Vec<T, V>{};
        if constexpr (kDy) ds[i] = Vec<T, V>{};
      }
    }
    M k[V], a1[V], a2[V];
    start_tile_lanes<V>(shifts + tx * V, active, k, a1, a2);
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      if (active && r0 + i * step < rows) accumulate_vec<Op, V>(xs[i], ds[kDy ? i : 0], k, a1, a2);
    }
    stage_tile_sums<V>(a1, a2, smem, partial, C, G, g, c0, active);

    tile_barrier(arrived, t, static_cast<unsigned int>(G));

    // Every block of the tile: per channel the G pairs, g = ty, ty + by, ... ascending, then the
    // fixed tree down the block's rows.
    Sums<M> v[V];
#pragma unroll
    for (int w = 0; w < V; ++w) v[w] = Sums<M>{0, 0};
    if (active) {
      for (int64_t h = ty; h < G; h += by) {
#pragma unroll
        for (int w = 0; w < V; ++w) {
          v[w] = merge(v[w], load_partial(partial, static_cast<int64_t>(C), G, h, c0 + w));
        }
      }
    }
    column_merge<M, V>(v, smem);
    if (ty == 0 && active) {
#pragma unroll
      for (int w = 0; w < V; ++w) {
        coefs[tx * V + w] = op.finish(c0 + w, k[w], v[w].s1, v[w].s2, g == 0);
      }
    }
    __syncthreads();
    if (active) {
      // Channel by channel (one channel's coefficients live at a time), the results written
      // over the inputs they replace.
#pragma unroll
      for (int w = 0; w < V; ++w) {
        const Coefs<M> kc = coefs[tx * V + w];
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          const M xw = lane_value(xs[i], w);
          const M dw = kDy ? lane_value(ds[kDy ? i : 0], w) : M(0);
          xs[i].v[w] = static_cast<T>(elementwise_value<Op::kMap>(xw, dw, kc));
        }
      }
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const I r = r0 + i * step;
        if (r < rows) store_vec<V>(out + r * C + c0, xs[i]);
      }
    }
    __syncthreads();  // shifts, coefs and smem are reused by the next tile
  }
}

// ---- Semi-persistent channels-last kernel (BN_EXT_CUDA_SEMI_PERSISTENT=1) ---------------------
//
// Where a channels-last input is too big to hold on chip, but its channels fit one tile (C / V
// channel vectors within a warp's 32: up to 128 channels in 32-bit types, 256 in 16-bit), one
// cooperative wave of G blocks (bx, by) covers it: block g's items are the row groups
// q = i * G + g (rows [q * by, + by)), as the multi-pass reduction strides, so item i of every
// block lies in the tensor's i-th G * by rows. A thread reads each of its items once and adds
// them in order: its last kHeld (the tensor's end) stay in registers, up to stash_items before
// them in shared memory, and the ones before those are dropped (streamed). The stash is copied
// in first, with cp.async, all of it in flight at once (through registers alone a thread has
// only its kHeld items in flight: 48-64 KB an SM), while the streamed items go through
// registers kHeld at a time; then the stash is added, then the registers. The blocks stage
// their sums, meet at a grid barrier, block c merges channel c's G pairs (finalize_kernel's
// work, without a launch) and publishes its coefficients, and once all C are published every
// block maps: its items in registers, then in shared memory, then the streamed ones read again,
// last first (what the wave read last, likeliest still in L2: the streamed items are read after
// the stash's copies are issued). Memory sees x (and dy) once, plus the streamed share again,
// and the output once: 3 passes backward (2 forward) where
// everything is held (16-bit 32x64x56x56 on an H100: 12 items a thread, 16 held), 5 (3) at
// worst. cuDNN's channels-last training kernels are of this kind ("semiPersist"), and led
// the multi-pass path on those rows (0.83-0.87x, H100, a6e9ccd).
//
// Determinism: a thread adds its items in order, column_merge and the merge of the G pairs are
// fixed trees; G is one wave of this kernel on the device. The counters (barrier, published
// channels, blocks done) are the stream's zeroed ones; the last block done sets them back to 0,
// when every block is past both waits.
//
// A thread's held items: kHeld in registers (16-byte vectors; 4 of x and dy in the float32
// backward spilled around finish()'s float64 division on sm_80 and sm_90, nvcc 13.0), and up to
// stash_items more in dynamic shared memory, as many as half an SM's holds beside the static
// (two blocks an SM, by the registers: an H100's 228 KB holds 12-13 more of x and dy a thread,
// 23-25 of x; semi_persistent() sizes it).
template <typename T, typename Op>
constexpr int kHeld = Op::kNeedsDy ? (sizeof(T) == 4 ? 3 : 4) : 8;

// The map of vector xv (and dv) with lane w's channel's coefficients kc[w].
template <typename Op, int V, typename T, typename M>
__device__ __forceinline__ Vec<T, V> map_lanes(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                               const Coefs<M> (&kc)[V]) {
  Vec<T, V> o;
#pragma unroll
  for (int w = 0; w < V; ++w) {
    const M dw = Op::kNeedsDy ? lane_value(dv, w) : M(0);
    o.v[w] = static_cast<T>(elementwise_value<Op::kMap>(lane_value(xv, w), dw, kc[w]));
  }
  return o;
}

template <typename T, typename Op, typename I, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    semi_persistent_rows_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy,
                                T* __restrict__ out, I rows, I C, int stash_items,
                                math_t<T>* __restrict__ partial,
                                Coefs<math_t<T>>* __restrict__ coefs,
                                unsigned int* __restrict__ counters) {
  using M = math_t<T>;
  constexpr bool kDy = Op::kNeedsDy;
  constexpr int K = kHeld<T, Op>, D = kDy ? 2 : 1;
  __shared__ Sums<M> smem[kThreads / 2 * V];
  __shared__ M groups[Op::kSampledShift ? kShiftGroups * 32 * V : 1], shifts[32 * V];
  __shared__ Coefs<M> tile[32 * V];
  // Stashed item s of thread tid: x at [s * D * kThreads + tid], dy one kThreads further
  // (stash_items * D * kThreads vectors).
  BN_EXT_DYNAMIC_SHARED(dynamic);
  Vec<T, V>* stash = reinterpret_cast<Vec<T, V>*>(dynamic);
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int tid = ty * bx + tx;
  const int64_t G = gridDim.x, g = blockIdx.x;
  const int width = bx * V;
  const int here = static_cast<int>(std::min<int64_t>(width, static_cast<int64_t>(C)));
  const I c0 = static_cast<I>(tx * V);
  const bool active = c0 < C;  // V divides C: a thread's channels are all in or all out
  tile_shifts_rows<T, V>(op, 0, width, here, tx, ty, tid, active, groups, shifts);

  // This thread's items: rows r0 + i * step, i < n. Items [kept, n) stay in registers,
  // [stashed, kept) in shared memory; those below `stashed` are streamed.
  const I step = static_cast<I>(G * by);
  const I r0 = static_cast<I>(g * by) + ty;
  const auto offset = [&](int i) { return (r0 + static_cast<I>(i) * step) * C + c0; };
  const int n = active && r0 < rows ? static_cast<int>((rows - r0 + step - 1) / step) : 0;
  const int kept = n > K ? n - K : 0;
  const int stashed = kept > stash_items ? kept - stash_items : 0;
  M k[V], a1[V], a2[V];
  start_tile_lanes<V>(shifts + tx * V, active, k, a1, a2);
  Vec<T, V> xs[K] = {};  // (items past n: mapped below with the others, never stored)
  Vec<T, V> ds[kDy ? K : 1] = {};
  // Chunks of K items from i0 up to `end`, in order: loaded and added.
  const auto chunk = [&](int i0, int end) {
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if (i0 + u < end) {
        xs[u] = load_vec<V>(x + offset(i0 + u));
        if constexpr (kDy) ds[u] = load_vec<V>(dy + offset(i0 + u));
      }
    }
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if (i0 + u < end) accumulate_vec<Op, V>(xs[u], ds[kDy ? u : 0], k, a1, a2);
    }
  };
  // The stashed items are copied to shared memory first, all at once and with no register
  // between (cp.async): in flight while the streamed ones are loaded and added through
  // registers. They are added after those, so a thread adds its items in order, 0 to n - 1,
  // whatever the stash holds.
  const auto stashed_vec = [&](int i, int input) -> Vec<T, V>& {
    return stash[((i - stashed) * D + input) * kThreads + tid];
  };
  for (int i = stashed; i < kept; ++i) {
    copy_async_16<V>(&stashed_vec(i, 0), x + offset(i));
    if constexpr (kDy) copy_async_16<V>(&stashed_vec(i, 1), dy + offset(i));
  }
  for (int i0 = 0; i0 < stashed; i0 += K) chunk(i0, stashed);
  copy_async_wait_all();
  for (int i = stashed; i < kept; ++i) {
    accumulate_vec<Op, V>(stashed_vec(i, 0), stashed_vec(i, kDy ? 1 : 0), k, a1, a2);
  }
  chunk(kept, n);
  stage_tile_sums<V>(a1, a2, smem, partial, C, G, g, c0, active);
  tile_barrier(counters, 0, static_cast<unsigned int>(G));  // (row 0 stored the pairs)

  // Block c merges channel c (and c + G, ...): its G pairs over the block's threads, h = tid,
  // tid + kThreads, ... ascending, then a fixed tree; finish() stores its outputs.
  for (int64_t c = g; c < C; c += G) {
    Sums<M> s[1] = {Sums<M>{0, 0}};
    for (int64_t h = tid; h < G; h += kThreads) {
      s[0] = merge(s[0], load_partial(partial, static_cast<int64_t>(C), G, h, c));
    }
    column_merge_as<M, 1>(s, smem, 1, kThreads, 0, tid);
    if (tid == 0) coefs[c] = op.finish(c, shifts[c], s[0].s1, s[0].s2);
  }
  const int64_t mergers = std::min<int64_t>(G, C);
  if (g < mergers) arrive(counters + 1);  // (g < mergers: the same for the whole block)
  await_count(counters + 1, static_cast<unsigned int>(mergers));
  if (tid < here) {
    const M* p = reinterpret_cast<const M*>(coefs + tid);
    tile[tid] = Coefs<M>{__ldcg(p), __ldcg(p + 1), __ldcg(p + 2), __ldcg(p + 3)};
  }
  __syncthreads();
  if (tid == 0 && atomicAdd(counters + 2, 1u) == static_cast<unsigned int>(G - 1)) {
    counters[0] = 0;  // every block is past both waits: the stream's next kernel finds 0s
    counters[1] = 0;
    counters[2] = 0;
  }
  if (!active) return;

  // The items in registers, a channel's coefficients at a time, written over the inputs.
#pragma unroll
  for (int w = 0; w < V; ++w) {
    const Coefs<M> kc = tile[tx * V + w];
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const M dw = kDy ? lane_value(ds[kDy ? u : 0], w) : M(0);
      xs[u].v[w] = static_cast<T>(elementwise_value<Op::kMap>(lane_value(xs[u], w), dw, kc));
    }
  }
#pragma unroll
  for (int u = 0; u < K; ++u) {
    if (kept + u < n) store_vec<V>(out + offset(kept + u), xs[u]);
  }
  // Then, with the thread's V channels' coefficients in registers (the items' are free now),
  // the stashed items, and the streamed ones read again, last first, two in flight.
  Coefs<M> kc[V];
#pragma unroll
  for (int w = 0; w < V; ++w) kc[w] = tile[tx * V + w];
  for (int i = stashed; i < kept; ++i) {
    store_vec<V>(out + offset(i),
                 map_lanes<Op, V>(stashed_vec(i, 0), stashed_vec(i, kDy ? 1 : 0), kc));
  }
  constexpr int kBack = 2;
  for (int i = stashed - 1; i >= 0; i -= kBack) {
    Vec<T, V> xb[kBack] = {};
    Vec<T, V> db[kDy ? kBack : 1] = {};
#pragma unroll
    for (int u = 0; u < kBack; ++u) {
      if (i - u >= 0) {
        xb[u] = load_vec<V>(x + offset(i - u));
        if constexpr (kDy) db[u] = load_vec<V>(dy + offset(i - u));
      }
    }
#pragma unroll
    for (int u = 0; u < kBack; ++u) {
      if (i - u >= 0) {
        store_vec<V>(out + offset(i - u), map_lanes<Op, V>(xb[u], db[kDy ? u : 0], kc));
      }
    }
  }
}

// ---- One block per channel ------------------------------------------------------------------
//
// Where a contiguous channel's slice fits in one block's registers, that block does the whole
// channel and waits on no other: no partials, no tile barrier, no cooperative launch. The grid is
// an ordinary one of C blocks, so the hardware overlaps one block's loads with other blocks'
// merges and stores; the cooperative kernel, with G = 1, took the channels in rounds of its P
// resident blocks, each round as long as its slowest load. ResNet-50's 7x7 and 14x14 layers at
// batch 32 have this shape: 512 to 2048 channels of 1568 or 6272 values.
//
// Slots as the multi-pass contiguous reduction's: S / V whole vectors a run, or (kMasked, S % V
// != 0) the aligned vectors that cover a run starting anywhere within one, their lanes outside the
// run neither summed nor stored. Slot j is item j / kBlock of thread j % kBlock, so that a warp
// reads consecutive vectors.
//
// Block size. Such a kernel waits on memory most of its time (a round trip for the slice, then
// the block merge and the coefficients before any store), so its speed is the number of channels
// resident at once, and that is the register file over the registers a channel takes. Every thread
// holds kItems vectors (the registers go mostly to them; each thread's fixed cost, its indices
// and lane sums, is spread over kItems), and the block is the fewest of 64, 128 or 256 threads
// that hold the channel: a 7x7 channel at batch 32 takes 64 threads
// (fp32, bf16, fp16), where the first version took 256 threads of a quarter of the items each,
// 2.2-2.6x the registers a channel. The bound keeps the 128-register cap of two 256-thread blocks.
//
// finish()'s per-channel parameters (weight, bias, running statistics; var and weight backward)
// are loaded by thread 0 right after the slice, so that their round trip overlaps it rather than
// following the block merge. The statistics op also updates the running statistics (a fixed
// momentum).
// Only where the channels are at least as many as the SMs: with fewer, one block a channel
// would leave SMs idle, and the multi-pass kernels (or, under BN_EXT_CUDA_PERSISTENT=1, the
// cooperative plan) spread each channel over several blocks.

// Slot j of contiguous channel c (S / V vectors a run, or the masked layout's slots) and its
// loads and stores, whole vectors or masked lanes: the one-block kernels' access to a channel.
template <int V, bool kMasked, typename I>
__device__ __forceinline__ MaskedSlot<I> channel_slot(
    I j, I c, I C, I S, const at::cuda::detail::IntDivider<I>& per_run) {
  if constexpr (kMasked) {
    return masked_slot<V>(j, c, C, S, per_run);
  } else {
    const auto qr = per_run.divmod(j);  // (n, vector within the run)
    return MaskedSlot<I>{(qr.div * C + c) * S + qr.mod * V, 0};
  }
}

template <int V, bool kMasked, typename T, typename I>
__device__ __forceinline__ Vec<T, V> load_slot(const T* __restrict__ p, const MaskedSlot<I>& m,
                                               I S, I numel) {
  if constexpr (kMasked) {
    return load_masked<V>(p, m, S, numel);
  } else {
    return load_vec<V>(p + m.o);
  }
}

template <int V, bool kMasked, typename T, typename I>
__device__ __forceinline__ void store_slot(T* __restrict__ p, const MaskedSlot<I>& m, I S,
                                           const Vec<T, V>& v) {
  if constexpr (kMasked) {
    store_masked<V>(p, m, S, v);
  } else {
    store_vec<V>(p + m.o, v);
  }
}

// Adds slot m's vectors to the sums (L pairs: accumulate_vec): every lane, or (masked) those in
// the run.
template <typename Op, int V, bool kMasked, typename T, typename M, typename I, int L>
__device__ __forceinline__ void accumulate_slot(const Vec<T, V>& xv, const Vec<T, V>& dv,
                                                const MaskedSlot<I>& m, I S, const M (&k)[L],
                                                M (&a1)[L], M (&a2)[L]) {
  if constexpr (kMasked) {
    accumulate_vec_masked<Op, V>(xv, dv, m.rel, S, k, a1, a2);
  } else {
    accumulate_vec<Op, V>(xv, dv, k, a1, a2);
  }
}

template <typename T, typename Op, int V, int kBlock, bool kMasked>
__global__ void __launch_bounds__(kBlock, kMinBlocks * kThreads / kBlock)
    persistent_channel_block_kernel(const Op op, const T* __restrict__ x,
                                    const T* __restrict__ dy, T* __restrict__ out, uint32_t C,
                                    uint32_t S, at::cuda::detail::IntDivider<uint32_t> per_run,
                                    uint32_t slots, uint32_t numel) {
  using I = uint32_t;
  using M = math_t<T>;
  constexpr bool kDy = Op::kNeedsDy;
  constexpr int K = kItems<T, V>;
  __shared__ typename BlockMerge<M, kBlock>::TempStorage tmp;
  __shared__ M groups[Op::kSampledShift ? kShiftGroups : 1], shift;
  __shared__ Coefs<M> coefs;
  const I c = blockIdx.x;
  const int tid = threadIdx.x;
  const auto slot = [&](I j) { return channel_slot<V, kMasked>(j, c, C, S, per_run); };
  // The slice's loads first, then finish()'s parameters and the shift's samples (channel_shift):
  // those are independent of the slice, so the three round trips overlap.
  Vec<T, V> xs[K];
  Vec<T, V> ds[kDy ? K : 1];
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const I j = static_cast<I>(i * kBlock + tid);
    if (j < slots) {
      const MaskedSlot<I> m = slot(j);
      xs[i] = load_slot<V, kMasked>(x, m, S, numel);
      if constexpr (kDy) ds[i] = load_slot<V, kMasked>(dy, m, S, numel);
    }
  }
  typename Op::Params params{};
  if (tid == 0) params = op.params(static_cast<int64_t>(c));
  channel_shift(op, static_cast<int64_t>(c), tid, groups, &shift);
  const M k0 = shift;
  M k[V], a1[V], a2[V];
  start_lanes<V>(k0, k, a1, a2);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const I j = static_cast<I>(i * kBlock + tid);
    if (j < slots) accumulate_slot<Op, V, kMasked>(xs[i], ds[kDy ? i : 0], slot(j), S, k, a1, a2);
  }
  Sums<M> s = merge_lanes<V>(a1, a2);
  s = block_merge<M, kBlock>(s, tmp);
  if (tid == 0) coefs = op.finish(static_cast<int64_t>(c), k0, s.s1, s.s2, true, &params);
  __syncthreads();
  const Coefs<M> kc = coefs;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const I j = static_cast<I>(i * kBlock + tid);
    if (j < slots) store_slot<V, kMasked>(out, slot(j), S, map_vec<Op>(xs[i], ds[kDy ? i : 0], kc));
  }
}

// BN_EXT_CUDA_TWO_SWEEPS=1 (read on every call; an experiment, off by default: the first H100 lease
// had it 9% slower forward, level backward, on the bf16 one-block rows): one block of kThreads a
// channel, as above, but holding nothing: a first sweep over the channel sums it, a second loads it
// again, maps it and stores the output. Registers then bound neither the channels resident (the
// kernel above: 3 blocks of 256 an SM in the 16-bit 14x14 backward, so 32x1024x14x14 runs in 2.6
// waves on an H200; here 5) nor the channel's size (here up to kTwoSweepMaxElems: 7x7 layers at
// batch 256, 12544 elements, which the kernel above leaves to the multi-pass path). Memory sees 2
// and 3 passes, as above, where the second sweep finds the channel still in L2: the resident
// channels' inputs are 16.5 MB in the 16-bit 14x14 backward at batch 32 (660 blocks on an H200),
// but 66 MB, more than its L2, in the float32 7x7 backward at batch 256. torch.compile is ahead of
// the kernel above on those 16-bit backwards (cuda-nvidia-h200-onepass.md). A thread has
// kSweepVectors vectors of each input in flight and one pair of sums: ptxas (sm_90, nvcc 13.0) fits
// that in 48 registers, 5 blocks an SM, with no spill (4 vectors took 64-78 registers; a pair of
// sums a lane, as above, spilled at 48).
constexpr int kSweepVectors = 2;
constexpr int kSweepBlocksPerSm = 5;
constexpr int64_t kTwoSweepMaxElems = 16384;

template <typename T, typename Op, int V, bool kMasked>
__global__ void __launch_bounds__(kThreads, kSweepBlocksPerSm)
    channel_two_sweep_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy,
                             T* __restrict__ out, uint32_t C, uint32_t S,
                             at::cuda::detail::IntDivider<uint32_t> per_run, uint32_t slots,
                             uint32_t numel) {
  using I = uint32_t;
  using M = math_t<T>;
  constexpr bool kDy = Op::kNeedsDy;
  constexpr int U = kSweepVectors;
  __shared__ typename BlockMerge<M, kThreads>::TempStorage tmp;
  __shared__ M groups[Op::kSampledShift ? kShiftGroups : 1], shift;
  __shared__ Coefs<M> coefs;
  const I c = blockIdx.x;
  const int tid = threadIdx.x;
  const I tid_i = static_cast<I>(tid);
  const auto slot = [&](I j) { return channel_slot<V, kMasked>(j, c, C, S, per_run); };
  // Slots j0 + u * kThreads of this thread, u < U: loaded together, then used.
  Vec<T, V> xs[U];
  Vec<T, V> ds[kDy ? U : 1];
  const auto load = [&](I j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I j = j0 + static_cast<I>(u * kThreads);
      if (j < slots) {
        const MaskedSlot<I> m = slot(j);
        xs[u] = load_slot<V, kMasked>(x, m, S, numel);
        if constexpr (kDy) ds[u] = load_slot<V, kMasked>(dy, m, S, numel);
      }
    }
  };
  constexpr I kStep = static_cast<I>(U * kThreads);
  // The first vectors' loads before the parameters' and the shift's, as above.
  load(tid_i);
  typename Op::Params params{};
  if (tid == 0) params = op.params(static_cast<int64_t>(c));
  channel_shift(op, static_cast<int64_t>(c), tid, groups, &shift);
  // One pair of sums a thread, every lane into it (the kernel above keeps a pair a lane: 16
  // registers in 16-bit types, which here would cost blocks resident).
  const M k[1] = {shift};
  M a1[1] = {0}, a2[1] = {0};
  for (I j0 = tid_i; j0 < slots; j0 += kStep) {
    if (j0 != tid_i) load(j0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I j = j0 + static_cast<I>(u * kThreads);
      if (j < slots) accumulate_slot<Op, V, kMasked>(xs[u], ds[kDy ? u : 0], slot(j), S, k, a1, a2);
    }
  }
  Sums<M> s = block_merge<M, kThreads>(Sums<M>{a1[0], a2[0]}, tmp);
  if (tid == 0) coefs = op.finish(static_cast<int64_t>(c), k[0], s.s1, s.s2, true, &params);
  __syncthreads();
  const Coefs<M> kc = coefs;
  for (I j0 = tid_i; j0 < slots; j0 += kStep) {
    load(j0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const I j = j0 + static_cast<I>(u * kThreads);
      if (j < slots) {
        store_slot<V, kMasked>(out, slot(j), S, map_vec<Op>(xs[u], ds[kDy ? u : 0], kc));
      }
    }
  }
}

bool two_sweeps() { return env_is("BN_EXT_CUDA_TWO_SWEEPS", "1"); }

// Narrow vectors (the default; BN_EXT_CUDA_NARROW_VECTORS=0, read on every call, turns them
// off): a 16-bit channel whose runs start on 8-byte but not 16-byte boundaries (S % 8 == 4, as
// 14x14) is read in 8-byte vectors, whole, instead of 16-byte ones with masked lanes. Built for
// sm_90 (nvcc 13.0, bf16, 256 threads) that kernel is 1168 instructions and 76 registers in the
// backward (masked: 1976 and 71), 1376 and 62 in the forward (1992 and 56): no per-lane
// predicates and one store path, at twice the slots a thread (bench/results/README.md). On an
// H100, side by side, 3-7% faster on the six bf16 14x14 rows at batch 32 (forward, backward).
bool narrow_vectors() { return !env_is("BN_EXT_CUDA_NARROW_VECTORS", "0"); }

// BN_EXT_CUDA_ONE_BLOCK_THREADS=64|128|256 (read on every call; an experiment, unset by default:
// the first H100 lease had 128 level with the default, 256 2-4% slower, on the bf16 one-block
// rows): the one-block kernel's block where the channel fits in it, else the fewest threads that
// hold it (the default's choice). A wider block gives each thread fewer slots: a shorter chain of
// loads, sums and stores a thread, for fewer channels resident. In two leases' tables (a92f479,
// 2671d08), the first kernel (256 threads, a quarter of the slots a thread) was the faster on the
// row with the fewest channels an SM, 32x512x7x7 16-bit backward (8.8-8.9 us against 10.3-10.4; 3.9
// channels an SM on an H200), and the slower on 32x2048x7x7 (20.6-20.7 against 19.9-20.0); both
// kernels took 102-104 registers in the masked 16-bit backward (70-71 since ad1e18d).
int one_block_threads() {
  constexpr const char* kName = "BN_EXT_CUDA_ONE_BLOCK_THREADS";
  if (env_is(kName, "64")) return 64;
  if (env_is(kName, "128")) return 128;
  return env_is(kName, "256") ? kThreads : 0;
}

// Whether x, out and (for an op that reads it) dy start on 16-byte boundaries.
template <typename T, typename Op>
bool aligned16(const Tensor& x, const Tensor& dy, const Tensor& out) {
  return is_aligned16(x.const_data_ptr<T>()) && is_aligned16(out.const_data_ptr<T>()) &&
         (!Op::kNeedsDy || is_aligned16(dy.const_data_ptr<T>()));
}

// The one-block-per-channel launch where it applies: contiguous, 16-byte aligned, fewer than
// 2^31 elements, at least as many channels as SMs, and a channel's slots within kThreads * kItems
// (under BN_EXT_CUDA_TWO_SWEEPS=1, its elements within kTwoSweepMaxElems). Returns whether it
// launched.
template <typename T, typename Op, int V = kMaxVec<T>>
bool channel_block(const Op& op, const Tensor& x, const Tensor& dy, const Tensor& out,
                   const Geometry& g) {
  if constexpr (V == kMaxVec<T> && sizeof(T) == 2) {
    // (BN_EXT_CUDA_TWO_SWEEPS=1 wins: its kernel takes 16-byte vectors only.)
    if (g.S % V != 0 && g.S % (V / 2) == 0 && narrow_vectors() && !two_sweeps()) {
      return channel_block<T, Op, V / 2>(op, x, dy, out, g);  // which checks the rest
    }
  }
  constexpr int K = kItems<T, V>;
  if (g.layout != Layout::kContiguous || x.numel() == 0 || x.numel() >= (int64_t(1) << 31) ||
      g.C < sm_count()) {
    return false;
  }
  if (!aligned16<T, Op>(x, dy, out)) return false;
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = Op::kNeedsDy ? dy.const_data_ptr<T>() : nullptr;
  T* outp = out.mutable_data_ptr<T>();
  const bool masked = g.S % V != 0;
  TORCH_INTERNAL_ASSERT(V == kMaxVec<T> || !masked);
  const int64_t per_run = masked ? (g.S + 2 * V - 2) / V : g.S / V;
  const int64_t slots = g.N * per_run;
  const auto divider = at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(per_run));
  if constexpr (V == kMaxVec<T>) {
    if (two_sweeps() && g.N * g.S <= kTwoSweepMaxElems) {
      const auto kernel = masked ? channel_two_sweep_kernel<T, Op, V, true>
                                 : channel_two_sweep_kernel<T, Op, V, false>;
      kernel<<<static_cast<unsigned>(g.C), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          op, xp, dyp, outp, static_cast<uint32_t>(g.C), static_cast<uint32_t>(g.S), divider,
          static_cast<uint32_t>(slots), static_cast<uint32_t>(x.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    }
  }
  if (slots > int64_t{kThreads} * K) return false;
  const auto launch = [&](auto btag, auto mtag) {
    constexpr int kBlock = decltype(btag)::value;
    constexpr bool kMasked = decltype(mtag)::value;
    persistent_channel_block_kernel<T, Op, V, kBlock, kMasked>
        <<<static_cast<unsigned>(g.C), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
            op, xp, dyp, outp, static_cast<uint32_t>(g.C), static_cast<uint32_t>(g.S), divider,
            static_cast<uint32_t>(slots), static_cast<uint32_t>(x.numel()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto with_mask = [&](auto btag) {
    if constexpr (V == kMaxVec<T>) {  // the narrow vectors are only ever whole
      if (masked) {
        launch(btag, std::true_type{});
        return;
      }
    }
    launch(btag, std::false_type{});
  };
  const int wanted = one_block_threads();  // 0: the fewest that hold the channel
  if (slots <= int64_t{64} * K && wanted <= 64) {
    with_mask(std::integral_constant<int, 64>{});
  } else if (slots <= int64_t{128} * K && wanted <= 128) {
    with_mask(std::integral_constant<int, 128>{});
  } else {
    with_mask(std::integral_constant<int, kThreads>{});
  }
  return true;
}

// Grid shape: G blocks per tile, P tiles in flight, P * G <= resident. G is the fewest blocks
// that hold a tile (`items` vectors per thread), raised while tiles are too few to fill the
// device; P is balanced over the waves. Returns false when one tile does not fit.
bool plan_grid(int64_t tiles, int64_t work, int64_t per_item, int64_t items, int64_t resident,
               int64_t& G, int64_t& P) {
  const int64_t fewest = ceil_div(work, per_item * items);
  if (tiles == 0 || fewest > resident) return false;
  G = fewest;
  if (tiles * fewest <= resident) {
    // One wave: spread each tile over more blocks, down to one vector per thread.
    G = std::max(fewest, std::min(resident / tiles, ceil_div(work, per_item)));
  }
  P = std::min(tiles, resident / G);
  P = ceil_div(tiles, ceil_div(tiles, P));
  return true;
}

// A cooperative launch of kernel(args...); false (and nothing launched) where the device cannot
// hold the grid at once after all (a partitioned device, say). The runtime copies each parameter
// from its pointer by the parameter's size, so each argument must have its parameter's type
// exactly: checked here at compile time.
template <typename... P, typename... A>
bool launch_cooperative(void (*kernel)(P...), int64_t blocks, dim3 block, size_t shared_bytes,
                        cudaStream_t stream, const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A) && (std::is_same_v<std::remove_cv_t<P>, A> && ...),
                "a cooperative launch's arguments must have its parameters' types");
  void* arg_ptrs[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                  dim3(static_cast<unsigned>(blocks)), block, arg_ptrs,
                                  shared_bytes, stream);
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the multi-pass path runs instead
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

template <typename T, typename Op>
bool persistent(const Op& op, const Tensor& x, const Tensor& dy, const Tensor& out,
                const Geometry& g) {
  using M = math_t<T>;
  using I = uint32_t;  // a tensor of 2^31 elements or more takes the multi-pass path
  constexpr int VM = kMaxVec<T>;
  if (x.numel() == 0 || x.numel() >= (int64_t(1) << 31) ||
      !at::cuda::getCurrentDeviceProperties()->cooperativeLaunch) {
    return false;
  }
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = Op::kNeedsDy ? dy.const_data_ptr<T>() : nullptr;
  T* outp = out.mutable_data_ptr<T>();
  const bool aligned = aligned16<T, Op>(x, dy, out);
  const bool cl = g.layout == Layout::kChannelsLast;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<M>::value);
  const int64_t C = g.C;
  const I Ci = static_cast<I>(C);
  bool launched = false;
  dispatch_vec<T>(aligned && (cl ? C % VM == 0 : g.S % VM == 0), [&](auto vtag) {
    constexpr int V = decltype(vtag)::value;
    int64_t G = 0, P = 0;
    if (!cl) {
      const auto kernel = persistent_contiguous_kernel<T, Op, I, V>;
      static std::array<std::atomic<int>, 64> occupancy{};
      const int64_t resident = resident_per_sm(kernel, occupancy) * sm_count();
      const int64_t per_run = g.S / V;
      const int64_t nv = g.N * per_run;
      if (!plan_grid(C, nv, kThreads, kItems<T, V>, resident, G, P)) return;
      const Tensor partial = at::empty({2 * G * C}, opts);
      const Tensor arrived = at::zeros({C}, x.options().dtype(at::kInt));
      I Si = static_cast<I>(g.S), nvi = static_cast<I>(nv);
      at::cuda::detail::IntDivider<I> div(static_cast<I>(per_run));
      M* pp = partial.mutable_data_ptr<M>();
      auto* ap = reinterpret_cast<unsigned int*>(arrived.mutable_data_ptr<int>());
      launched = launch_cooperative(kernel, P * G, dim3(kThreads), 0, stream, op, xp, dyp, outp,
                                    Ci, Si, div, nvi, G, pp, ap);
    } else {
      const auto kernel = persistent_channels_last_kernel<T, Op, I, V>;
      static std::array<std::atomic<int>, 64> occupancy{};
      const int64_t resident = resident_per_sm(kernel, occupancy) * sm_count();
      // The widest tile that fits: bx channel vectors, from 32 (a warp reads 512 contiguous
      // bytes of a row) down to 32 bytes (one memory sector) a row.
      const int64_t cv = C / V;
      const int64_t rows = g.N * g.S;
      const int narrowest = static_cast<int>(std::max<int64_t>(1, 32 / (V * sizeof(T))));
      // bx <= 32, so by >= 8: tile_shifts_rows takes one group of shift samples a block row.
      int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cv)));
      int64_t tiles = 0;
      for (;; bx /= 2) {
        tiles = ceil_div(cv, bx);
        if (plan_grid(tiles, rows, kThreads / bx, kItems<T, V>, resident, G, P)) break;
        if (bx <= narrowest) return;
      }
      const int by = kThreads / bx;
      const Tensor partial = at::empty({2 * G * C}, opts);
      const Tensor arrived = at::zeros({tiles}, x.options().dtype(at::kInt));
      I rowsi = static_cast<I>(rows);
      M* pp = partial.mutable_data_ptr<M>();
      auto* ap = reinterpret_cast<unsigned int*>(arrived.mutable_data_ptr<int>());
      launched = launch_cooperative(kernel, P * G, dim3(bx, by), 0, stream, op, xp, dyp, outp,
                                    rowsi, Ci, tiles, G, pp, ap);
    }
  });
  return launched;
}

// BN_EXT_CUDA_SEMI_PERSISTENT=1 (read on every call; an experiment, off by default until a GPU
// has timed it): the training ops on a channels-last input whose channels fit one tile run
// semi_persistent_rows_kernel (above), before any other single-pass kernel.
bool semi_persistent_on() { return env_is("BN_EXT_CUDA_SEMI_PERSISTENT", "1"); }

// Launches the semi-persistent kernel where it applies: channels-last, 32- or 16-bit, 16-byte
// aligned with C a multiple of the vector, C / V <= 32, fewer than 2^31 elements, and a device
// with cooperative launches. G is one wave of the kernel (no more than the row groups). Returns
// whether it launched.
template <typename T, typename Op>
bool semi_persistent(const Op& op, const Tensor& x, const Tensor& dy, const Tensor& out,
                     const Geometry& g) {
  using M = math_t<T>;
  using I = uint32_t;
  constexpr int V = kMaxVec<T>;
  if constexpr (std::is_same_v<M, double>) {
    return false;
  } else {
    if (g.layout != Layout::kChannelsLast || x.numel() == 0 ||
        x.numel() >= (int64_t(1) << 31) || g.C % V != 0 || g.C / V > 32 ||
        !at::cuda::getCurrentDeviceProperties()->cooperativeLaunch ||
        !aligned16<T, Op>(x, dy, out)) {
      return false;
    }
    const T* xp = x.const_data_ptr<T>();
    const T* dyp = Op::kNeedsDy ? dy.const_data_ptr<T>() : nullptr;
    T* outp = out.mutable_data_ptr<T>();
    const auto kernel = semi_persistent_rows_kernel<T, Op, I, V>;
    // The stash: what half an SM's shared memory holds beside the kernel's static shared
    // memory, in items of x (and dy) for each thread; asked once per device (cached plus one,
    // as per_device keeps no 0), as is the occupancy with it, which sizes the grid (none
    // resident: not launched).
    constexpr int64_t kItemBytes = (Op::kNeedsDy ? 2 : 1) * int64_t{sizeof(Vec<T, V>)} * kThreads;
    static std::array<std::atomic<int>, 64> stash_cache{}, occupancy{};
    const int stash_items = per_device(stash_cache, [&] {
      const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
      cudaFuncAttributes attr;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      const int64_t half = static_cast<int64_t>(p->sharedMemPerMultiprocessor) / kMinBlocks;
      const int64_t room = std::min<int64_t>(half, p->sharedMemPerBlockOptin) -
                           static_cast<int64_t>(attr.sharedSizeBytes) -
                           static_cast<int64_t>(p->reservedSharedMemPerBlock);
      const int items = static_cast<int>(std::max<int64_t>(0, room / kItemBytes));
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(items * kItemBytes)));
      return items + 1;
    }) - 1;
    const size_t stash_bytes = static_cast<size_t>(stash_items * kItemBytes);
    const int64_t per_sm = per_device(occupancy, [&] {
      int n = 0;
      C10_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, stash_bytes));
      return n;
    });
    if (per_sm < 1) return false;
    const int64_t C = g.C;
    const int bx = next_pow2(C / V);
    const int by = kThreads / bx;
    const int64_t rows = g.N * g.S;
    const int64_t G = std::min(per_sm * sm_count(), ceil_div(rows, by));
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<M>::value);
    const Tensor partial = at::empty({2 * G * C}, opts);
    const Tensor coefs = at::empty({4 * C}, opts);  // Coefs<M> a channel
    const Tensor counters = zeroed_counters(3, x);
    Op mop = op;
    mop.coef = nullptr;  // the kernel keeps its coefficients
    I rowsi = static_cast<I>(rows), Ci = static_cast<I>(C);
    M* pp = partial.mutable_data_ptr<M>();
    auto* cp = reinterpret_cast<Coefs<M>*>(coefs.mutable_data_ptr<M>());
    auto* ap = reinterpret_cast<unsigned int*>(counters.mutable_data_ptr<int>());
    return launch_cooperative(kernel, G, dim3(bx, by), stash_bytes,
                              at::cuda::getCurrentCUDAStream(), mop, xp, dyp, outp, rowsi, Ci,
                              stash_items, pp, cp, ap);
  }
}

}  // namespace

SinglePass single_pass_mode() {
  if (env_is("BN_EXT_CUDA_PERSISTENT", "0")) return SinglePass::kOff;
  if (env_is("BN_EXT_CUDA_PERSISTENT", "1")) return SinglePass::kAll;
  return SinglePass::kOneBlock;
}

bool launch_persistent_forward(SinglePass mode, const Tensor& x, const Geometry& g,
                               const Tensor& weight, const Tensor& bias, double eps,
                               const Tensor& y, const Tensor& mean, const Tensor& var,
                               const RunningStats* running, bool& running_updated) {
  TORCH_INTERNAL_ASSERT(running == nullptr || running->momentum.has_value());
  bool launched = false;
  running_updated = false;
  BN_EXT_CUDA_DISPATCH(x.scalar_type(), "bn_ext::cuda::persistent_forward", [&] {
    if (channel_block<scalar_t>(
            stats_op<scalar_t, true>(x, g, weight, bias, eps, mean, var, Tensor(), running), x,
            Tensor(), y, g)) {
      launched = true;
      running_updated = running != nullptr;
      return;
    }
    const auto op = stats_op<scalar_t>(x, g, weight, bias, eps, mean, var, Tensor());
    launched = (semi_persistent_on() && semi_persistent<scalar_t>(op, x, Tensor(), y, g)) ||
               (mode == SinglePass::kAll && persistent<scalar_t>(op, x, Tensor(), y, g));
  });
  return launched;
}

bool launch_persistent_backward(SinglePass mode, const Tensor& dy, const Tensor& x,
                                const Geometry& g, const Tensor& mean, const Tensor& var,
                                const Tensor& weight, double eps, const Tensor& dx,
                                const Tensor& grad_weight, const Tensor& grad_bias) {
  bool launched = false;
  BN_EXT_CUDA_DISPATCH(x.scalar_type(), "bn_ext::cuda::persistent_backward", [&] {
    const auto op = grad_op<scalar_t>(g, mean, var, weight, eps, Tensor(), Tensor(), grad_weight,
                                      grad_bias, Tensor());
    launched = channel_block<scalar_t>(op, x, dy, dx, g) ||
               (semi_persistent_on() && semi_persistent<scalar_t>(op, x, dy, dx, g)) ||
               (mode == SinglePass::kAll && persistent<scalar_t>(op, x, dy, dx, g));
  });
  return launched;
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
