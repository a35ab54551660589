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
// channel replaces all this (persistent_channel_block_kernel, below).
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

// The blocks of tile t arrive; returns when all G have. The whole block calls it. Partial sums
// stored before it (by any thread of any of the G blocks) are visible after it, read with
// __ldcg (L2; L1 is not coherent).
__device__ __forceinline__ void tile_barrier(unsigned int* arrived, int64_t t, unsigned int G) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    atomicAdd(arrived + t, 1u);
    const volatile unsigned int* count = arrived + t;
    while (*count < G) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
      __nanosleep(32);
#endif
    }
    __threadfence();
  }
  __syncthreads();
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
#pragma unroll
    for (int w = 0; w < V; ++w) {
      k[w] = active ? shifts[tx * V + w] : M(0);
      a1[w] = 0;
      a2[w] = 0;
    }
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      if (active && r0 + i * step < rows) accumulate_vec<Op, V>(xs[i], ds[kDy ? i : 0], k, a1, a2);
    }
    Sums<M> v[V];
#pragma unroll
    for (int w = 0; w < V; ++w) v[w] = Sums<M>{a1[w], a2[w]};
    column_merge<M, V>(v, smem);
    if (ty == 0 && active) {
#pragma unroll
      for (int w = 0; w < V; ++w) {
        store_partial(partial, static_cast<int64_t>(C), G, g, c0 + w, v[w]);
      }
    }

    tile_barrier(arrived, t, static_cast<unsigned int>(G));

    // Every block of the tile: per channel the G pairs, g = ty, ty + by, ... ascending, then the
    // fixed tree down the block's rows.
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
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = Op::kNeedsDy ? dy.const_data_ptr<T>() : nullptr;
  T* outp = out.mutable_data_ptr<T>();
  if (!(is_aligned16(xp) && is_aligned16(outp) && (dyp == nullptr || is_aligned16(dyp)))) {
    return false;
  }
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
bool launch_cooperative(void (*kernel)(P...), int64_t blocks, dim3 block, cudaStream_t stream,
                        const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A) && (std::is_same_v<std::remove_cv_t<P>, A> && ...),
                "a cooperative launch's arguments must have its parameters' types");
  void* arg_ptrs[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                  dim3(static_cast<unsigned>(blocks)), block, arg_ptrs, 0, stream);
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
  const bool aligned =
      is_aligned16(xp) && is_aligned16(outp) && (dyp == nullptr || is_aligned16(dyp));
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
      launched = launch_cooperative(kernel, P * G, dim3(kThreads), stream, op, xp, dyp, outp, Ci,
                                    Si, div, nvi, G, pp, ap);
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
      launched = launch_cooperative(kernel, P * G, dim3(bx, by), stream, op, xp, dyp, outp, rowsi,
                                    Ci, tiles, G, pp, ap);
    }
  });
  return launched;
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
    if (mode != SinglePass::kAll) return;
    const auto op = stats_op<scalar_t>(x, g, weight, bias, eps, mean, var, Tensor());
    launched = persistent<scalar_t>(op, x, Tensor(), y, g);
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
               (mode == SinglePass::kAll && persistent<scalar_t>(op, x, dy, dx, g));
  });
  return launched;
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
