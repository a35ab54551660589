// Per-channel reductions: the batch statistics and the backward's sums.
//
// Two kernels read the input, one per layout, and each block reduces its share of one or more
// channels to a (s1, s2) pair (reduce.cuh). When a channel is split over G > 1 blocks along the
// grid's y axis, the blocks stage their pairs in a [2][G][C] partials buffer (and the channel's
// shift after it) and a second kernel (finalize_kernel) merges the G pairs of each channel in a
// fixed order: a two-stage grid reduction. The pass that merges the last level (the reduction
// kernel itself when G == 1) runs the op's finish() step, which writes the per-channel outputs,
// including the coefficients the elementwise kernel needs next. Under BN_EXT_CUDA_FOLD_FINALIZE=1
// (an experiment) the contiguous kernel's last block of each channel does the finalize pass's
// merge itself (merge_if_last), in the same order, so with the same bits and one launch fewer.
// Under BN_EXT_CUDA_MERGING_MAP=1 (another) the training ops' map merges them instead, each of
// its blocks a channel's pairs (merging_map_kernel), and neither a finalize pass nor a table is
// launched or written.
//
// Contiguous (N, C, S): grid (C, G), 1-D blocks of kThreads. The channel's N runs of S elements
// are cut into vectors of V elements (V = 128 bits when the pointers are 16-byte aligned, else 1);
// vector j of the channel is run j / (S/V), offset j % (S/V), and the blocks of the channel stride
// over j together, so consecutive threads read consecutive addresses. Each thread keeps V lane
// accumulators (shorter float chains), merges them, then the block merges with cub::BlockReduce.
// When S % V != 0 (7x7, and 14x14 in 16-bit types) the runs start anywhere within a vector: run
// n's K = (S + 2V - 2) / V slots are the aligned vectors from the one holding its first element,
// their lanes outside the run masked (kMasked). A scalar loop instead would keep a quarter of the
// bytes in flight per thread that the memory needs, with a division per element.
//
// An op with kWritesDx (eval's backward, GradOp<T, true>) also stores dx = dy * a where the
// kernel has loaded a vector of dy, at the same offset: whole vectors, and in the masked layout
// only the lanes in the run (whole where the slot lies in it). Its channels-last blocks always
// stage their sums for the finalize pass (kStagesAlways).
//
// Channels-last (N*S rows of C): 2-D blocks (bx, by), bx * by = kThreads. A thread owns V
// consecutive channels (128 bits of a row) and walks rows by * G apart; a warp reads whole row
// segments. The block merges down its by rows with column_merge, and the G row-blocks of a channel
// tile merge in the finalize pass.
#include "channel_ops.cuh"

#include <map>
#include <mutex>
#include <utility>

namespace bn_ext {
namespace cuda {
namespace detail {
namespace {

// Loads V elements of x (and of dy, for reductions that read it) at offset o and adds them to
// the per-lane sums; store(o, dy's vector) writes what an op makes of them (eval's dx) or nothing.
template <typename Op, int V, typename T, typename I, typename M, typename D>
__device__ __forceinline__ void accumulate_at(const T* __restrict__ x, const T* __restrict__ dy,
                                              I o, const D& store, const M (&k)[V], M (&a1)[V],
                                              M (&a2)[V]) {
  const Vec<T, V> xv = load_vec<V>(x + o);
  Vec<T, V> dv = xv;
  if constexpr (Op::kNeedsDy) dv = load_vec<V>(dy + o);
  accumulate_vec<Op, V>(xv, dv, k, a1, a2);
  store(o, dv);
}

// Op::kWritesDx: the dx scales of a tile's channels first .. first + here - 1 into
// scales[0, here), a thread each, before channel_shift (or tile_shifts_rows), whose closing barrier
// publishes them. At the kernel's start nothing else is live: float64's division is a call, and
// made beside the sums' registers (in the loop's prologue) it spilled.
template <typename Op, typename M>
__device__ __forceinline__ void tile_dx_scales(const Op& op, int64_t first, int here, int tid,
                                               M* scales) {
  if constexpr (Op::kWritesDx) {
    if (tid < here) scales[tid] = op.eval_dx_scale(first + tid);
  }
}

// The `store` of a reduction that writes nothing besides its sums.
struct NoStore {
  template <typename I, typename V>
  __device__ __forceinline__ void operator()(I /*o*/, const V& /*dy*/) const {}
};

// Eval's dx = dy * a for V channels' lanes (contiguous: one channel, a[w] all equal), as the
// eval map computes it (elementwise_value), stored as one vector at offset o.
template <typename T, int V, typename I, typename M>
__device__ __forceinline__ void store_eval_dx(T* __restrict__ dx, I o,
                                              const Vec<T, V>& dv, const M (&a)[V]) {
  Vec<T, V> out;
#pragma unroll
  for (int w = 0; w < V; ++w) out.v[w] = static_cast<T>(lane_value(dv, w) * a[w]);
  store_vec<V>(dx + o, out);
}

// Vectors each thread loads before it adds them: two of 128 bits, or as many narrower ones
// (unvectorized: misaligned, or channels-last with C not a multiple of the vector) as make 16
// bytes, so that a thread keeps at least 16 bytes in flight. A thread still adds its vectors in
// the order it would one at a time, so the bits do not depend on it.
template <typename T, int V>
constexpr int kInFlight = V * sizeof(T) >= 8 ? 2 : 16 / (V * static_cast<int>(sizeof(T)));

// Adds the vectors at offset(i) for i = j, j + step, ... < n, kInFlight<T, V> loads at a time
// (and hands each to store, as accumulate_at). An op that also writes (eval's dx) loads one
// 128-bit vector of x and one of dy at a time, still 32 bytes in flight: two of each took the
// 16-bit channels-last kernels past the 64 registers ptxas gives them, and they spilled.
template <typename Op, int V, typename T, typename I, typename M, typename F, typename D>
__device__ __forceinline__ void accumulate_strided(const T* __restrict__ x,
                                                   const T* __restrict__ dy, I j, I step, I n,
                                                   const F& offset, const D& store,
                                                   const M (&k)[V], M (&a1)[V], M (&a2)[V]) {
  constexpr int U = Op::kWritesDx && V * sizeof(T) == 16 ? 1 : kInFlight<T, V>;
  if constexpr (U == 2) {
    // Kept in this form: the array form below, or a tail loop, cost the 128-bit channels-last
    // GradOp kernels a 4-byte spill around finish()'s double division (ptxas, nvcc 13.0).
    for (; j + step < n; j += 2 * step) {
      accumulate_at<Op, V>(x, dy, offset(j), store, k, a1, a2);
      accumulate_at<Op, V>(x, dy, offset(j + step), store, k, a1, a2);
    }
    if (j < n) accumulate_at<Op, V>(x, dy, offset(j), store, k, a1, a2);
  } else {
    for (; j + (U - 1) * step < n; j += U * step) {
      Vec<T, V> xs[U], ds[U];
      I os[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        os[u] = offset(j + u * step);
        xs[u] = load_vec<V>(x + os[u]);
        ds[u] = xs[u];
        if constexpr (Op::kNeedsDy) ds[u] = load_vec<V>(dy + os[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        accumulate_vec<Op, V>(xs[u], ds[u], k, a1, a2);
        store(os[u], ds[u]);
      }
    }
    for (; j < n; j += step) accumulate_at<Op, V>(x, dy, offset(j), store, k, a1, a2);
  }
}

// Block row g's pair for channel c into partial[2][G][C]; row 0 also stores the channel's shift
// into partial[2G][c], so that the finalize pass reads it rather than sampling it again.
template <typename M>
__device__ __forceinline__ void store_partial(M* partial, int64_t C, int64_t g, int64_t c,
                                              const Sums<M>& s, M shift) {
  const int64_t G = gridDim.y;
  partial[g * C + c] = s.s1;
  partial[(G + g) * C + c] = s.s2;
  if (g == 0) partial[2 * G * C + c] = shift;
}

// The finalize pass's layout for G partials a channel: by (a power of two) threads share a
// channel's partials, at most kFinalizePerThread each, and bx = kThreads / by channels share a
// block. G is large where C is small (the first stage fills the device): with 32 channels a block
// whatever G, a channels-last input of 64 channels (G = 784 on an H200) had 2 blocks whose threads
// each added ~100 pairs, an L2 round trip apart; now 64 blocks add 3 or 4 each, then merge down a
// block.
constexpr int64_t kFinalizePerThread = 4;

__host__ __device__ constexpr int finalize_rows(int64_t G) {
  int by = 1;
  while (by < kThreads && by * kFinalizePerThread < G) by *= 2;
  return by;
}

// Channel c's G staged pairs merged by the threads of a (bx, by) layout of the block (column tx
// holds c where `has`): row ty adds the pairs g = ty, ty + by, ... in ascending order, then
// column_merge_as's tree; row 0 gets the channel's sums. kViaL2: the pairs were stored by other
// blocks of this launch, and are loaded through L2 (__ldcg), since this SM's L1 may hold their
// lines from before they were stored (another channel's pairs share them). Every thread of the
// block calls it.
template <bool kViaL2, typename M>
__device__ __forceinline__ Sums<M> merge_staged(const M* partial, int64_t C, int64_t G, int64_t c,
                                                bool has, int bx, int by, int tx, int ty,
                                                Sums<M>* smem) {
  Sums<M> v[1] = {Sums<M>{0, 0}};
  if (has) {
#pragma unroll 4
    for (int64_t g = ty; g < G; g += by) {
      const int64_t i = g * C + c, j = (G + g) * C + c;
      v[0] = merge(v[0], kViaL2 ? Sums<M>{__ldcg(partial + i), __ldcg(partial + j)}
                                : Sums<M>{partial[i], partial[j]});
    }
  }
  column_merge_as<M, 1>(v, smem, bx, by, tx, ty);
  return v[0];
}

// BN_EXT_CUDA_FOLD_FINALIZE=1: once a block of channel c has stored its pair (thread 0, before
// this), it takes a ticket from the channel's counter; the block with the last ticket (G - 1)
// merges the channel's pairs in finalize_kernel's layout and order into thread 0's `s`, and sets
// the counter back to 0 for the stream's next launch (zeroed_counters). Returns whether this block
// is that one (the same in all its threads). The first fence puts each block's pair before its
// ticket; the second, the last ticket before the merge's loads.
template <typename M>
__device__ __forceinline__ bool merge_if_last(const M* partial, int64_t C, int64_t c,
                                              unsigned int* __restrict__ arrived, Sums<M>& s) {
  __shared__ bool last;
  __shared__ Sums<M> smem[kThreads / 2];
  const int64_t G = gridDim.y;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(arrived + c, 1u) == static_cast<unsigned int>(G - 1);
    if (last) {
      arrived[c] = 0;
      __threadfence();
    }
  }
  __syncthreads();
  if (!last) return false;
  const int by = finalize_rows(G);
  const int bx = kThreads / by;
  const int tx = threadIdx.x % bx;
  s = merge_staged<true>(partial, C, G, c, tx == 0, bx, by, tx, threadIdx.x / bx, smem);
  return true;
}

template <typename T, typename Op, typename I, int V, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    reduce_contiguous_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy, I C,
                             I S, at::cuda::detail::IntDivider<I> per_run, I nv, I numel,
                             math_t<T>* __restrict__ partial, unsigned int* __restrict__ arrived) {
  allow_dependents();  // the finalize pass or the map after it (a dependent launch)
  using M = math_t<T>;
  const I c = blockIdx.x;
  __shared__ M groups[Op::kSampledShift ? kShiftGroups : 1], shift, scale;
  tile_dx_scales(op, static_cast<int64_t>(c), 1, threadIdx.x, &scale);
  channel_shift(op, static_cast<int64_t>(c), threadIdx.x, groups, &shift);
  const M k0 = shift;
  M k[V], a1[V], a2[V];
  start_lanes<V>(k0, k, a1, a2);
  M a[V];  // Op::kWritesDx: the channel's dx scale in every lane
#pragma unroll
  for (int w = 0; w < V; ++w) a[w] = Op::kWritesDx ? scale : M(0);
  const I step = static_cast<I>(gridDim.y) * kThreads;
  I j = static_cast<I>(blockIdx.y) * kThreads + threadIdx.x;
  if constexpr (kMasked) {
    const auto slot = [&](I i) { return masked_slot<V>(i, c, C, S, per_run); };
    const auto load = [&](const T* p, const MaskedSlot<I>& m) {
      return load_masked<V>(p, m, S, numel);
    };
    // dx at the slot's lanes in the run: one vector where they all are (rel <= S - V, which a
    // rel that wrapped below 0 is not), else lane by lane. store_masked's logic, written out:
    // eval_dx's vector built first and handed to it made ptxas (nvcc 13.0) spill in the fp16
    // kernel.
    const auto store = [&](const MaskedSlot<I>& m, const Vec<T, V>& dv) {
      if constexpr (Op::kWritesDx) {
        if (S >= static_cast<I>(V) && m.rel <= S - static_cast<I>(V)) {
          store_eval_dx<T, V>(op.dx, m.o, dv, a);
        } else {
#pragma unroll
          for (int w = 0; w < V; ++w) {
            if (m.rel + static_cast<I>(w) < S) {
              op.dx[m.o + w] = static_cast<T>(lane_value(dv, w) * a[w]);
            }
          }
        }
      }
    };
    // Two slots' loads issued before either is added: two vectors in flight.
    for (; j + step < nv; j += 2 * step) {
      const MaskedSlot<I> m0 = slot(j), m1 = slot(j + step);
      const Vec<T, V> x0 = load(x, m0), x1 = load(x, m1);
      Vec<T, V> d0 = x0, d1 = x1;
      if constexpr (Op::kNeedsDy) {
        d0 = load(dy, m0);
        d1 = load(dy, m1);
      }
      accumulate_vec_masked<Op, V>(x0, d0, m0.rel, S, k, a1, a2);
      accumulate_vec_masked<Op, V>(x1, d1, m1.rel, S, k, a1, a2);
      store(m0, d0);
      store(m1, d1);
    }
    if (j < nv) {
      const MaskedSlot<I> m0 = slot(j);
      const Vec<T, V> x0 = load(x, m0);
      Vec<T, V> d0 = x0;
      if constexpr (Op::kNeedsDy) d0 = load(dy, m0);
      accumulate_vec_masked<Op, V>(x0, d0, m0.rel, S, k, a1, a2);
      store(m0, d0);
    }
  } else {
    const auto offset = [&](I i) {
      const auto qr = per_run.divmod(i);  // (n, vector within the run)
      return (qr.div * C + c) * S + qr.mod * V;
    };
    const auto store = [&](I o, const Vec<T, V>& dv) {
      if constexpr (Op::kWritesDx) store_eval_dx<T, V>(op.dx, o, dv, a);
    };
    accumulate_strided<Op, V>(x, dy, j, step, nv, offset, store, k, a1, a2);
  }
  Sums<M> t = merge_lanes<V>(a1, a2);
  __shared__ typename BlockMerge<M>::TempStorage tmp;
  t = block_merge<M>(t, tmp);
  if (threadIdx.x == 0 && gridDim.y > 1) {
    store_partial(partial, static_cast<int64_t>(C), blockIdx.y, static_cast<int64_t>(c), t, k0);
  }
  // Whether this block finishes the channel: its only block, or (arrived: G > 1 under
  // BN_EXT_CUDA_FOLD_FINALIZE=1) its last, with the merged sums and the shift every block of the
  // channel sampled alike.
  bool finishes = gridDim.y == 1;
  if (arrived != nullptr) finishes = merge_if_last(partial, static_cast<int64_t>(C), c, arrived, t);
  if (threadIdx.x == 0 && finishes) op.finish(c, k0, t.s1, t.s2);
}

// Whether the channels-last kernel leaves finish() to the finalize pass even when G == 1. With
// eval's dx stores in its loop, the calls of finish()'s float64 divisions made ptxas (nvcc 13.0)
// spill 4 to 16 bytes around them in the 16-bit and float64 kernels, on sm_80 and sm_90. Only
// small inputs have G == 1 in that layout (at most 8 rows per thread), for one small launch more.
template <typename Op>
constexpr bool kStagesAlways = Op::kWritesDx;

template <typename T, typename Op, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    reduce_channels_last_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy,
                                I rows, I C, math_t<T>* __restrict__ partial) {
  allow_dependents();  // the finalize pass or the map after it (a dependent launch)
  using M = math_t<T>;
  const I c0 = (static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < C;  // V divides C, so a thread's channels are all in or all out
  // The tile's shifts: its width = blockDim.x * V channels from first.
  const int width = blockDim.x * V;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * width;
  const int here = static_cast<int>(std::min<int64_t>(width, static_cast<int64_t>(C) - first));
  __shared__ M groups[Op::kSampledShift ? kShiftGroups * 32 * V : 1], shifts[32 * V];
  __shared__ M scales[Op::kWritesDx ? 32 * V : 1];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  tile_dx_scales(op, first, here, tid, scales);
  tile_shifts_rows<T, V>(op, first, width, here, threadIdx.x, threadIdx.y, tid, active, groups,
                         shifts);
  M k[V], a1[V], a2[V];
  start_tile_lanes<V>(shifts + threadIdx.x * V, active, k, a1, a2);
  if (active) {
    const I step = static_cast<I>(gridDim.y) * blockDim.y;
    const I r = static_cast<I>(blockIdx.y) * blockDim.y + threadIdx.y;
    const auto offset = [&](I i) { return i * C + c0; };
    if constexpr (Op::kWritesDx) {
      M a[V];  // the thread's V channels' dx scales
#pragma unroll
      for (int w = 0; w < V; ++w) a[w] = scales[threadIdx.x * V + w];
      const auto store = [&](I o, const Vec<T, V>& dv) {
        store_eval_dx<T, V>(op.dx, o, dv, a);
      };
      accumulate_strided<Op, V>(x, dy, r, step, rows, offset, store, k, a1, a2);
    } else {
      accumulate_strided<Op, V>(x, dy, r, step, rows, offset, NoStore{}, k, a1, a2);
    }
  }
  Sums<M> v[V];
#pragma unroll
  for (int w = 0; w < V; ++w) v[w] = Sums<M>{a1[w], a2[w]};
  __shared__ Sums<M> smem[kThreads / 2 * V];
  column_merge<M, V>(v, smem);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int w = 0; w < V; ++w) {
      const int64_t c = static_cast<int64_t>(c0) + w;
      if (!kStagesAlways<Op> && gridDim.y == 1) {
        op.finish(c, k[w], v[w].s1, v[w].s2);
      } else {
        store_partial(partial, static_cast<int64_t>(C), blockIdx.y, c, v[w], k[w]);
      }
    }
  }
}

// Second stage: merges the G partial pairs of each channel (g ascending per thread, then a fixed
// tree over the block's rows) and finishes with the shift the first stage used (partial[2G][c]).
// Blocks (bx, by): bx channels, by = finalize_rows(G) partials at a time.
//
// The map after it waits for this whole pass, so the pass keeps few memory round trips in a row.
// With the shift loaded after the merge and finish()'s parameters (Op::Params) read where it uses
// them (weight and bias, then each running statistic after a store that might alias it), the
// training forward's pass made five dependent round trips after the merge (sm_90 SASS, 12-06).
// Now the shift is loaded beside the partials, and the parameters, the op's inputs, whole before
// the reduction began (which this launch follows), before the wait, into shared memory (held in
// registers across finish()'s float64 divisions, a call, they spilled; in the float64 kernels
// even there, 4 bytes in the division, so those keep the loads in finish()). One round trip is
// left after the merge, channel 0's num_batches_tracked. Same values, same bits.
// `partial` is not __restrict__: see wait_for_prior_grid.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const Op op, const typename Op::M* partial, int64_t C, int64_t G) {
  allow_dependents();  // the map after it
  using M = typename Op::M;
  constexpr bool kAhead = !std::is_same_v<M, double>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool finishes = threadIdx.y == 0 && c < C;
  __shared__ typename Op::Params params[kThreads];
  if (kAhead && finishes) params[threadIdx.x] = op.params(c);
  wait_for_prior_grid();  // the partials (a dependent launch: started before the reduction ends)
  const M shift = finishes ? partial[2 * G * C + c] : M(0);
  __shared__ Sums<M> smem[kThreads / 2];
  const Sums<M> s = merge_staged<false>(partial, C, G, c, c < C, blockDim.x, blockDim.y,
                                        threadIdx.x, threadIdx.y, smem);
  if (finishes) op.finish(c, shift, s.s1, s.s2, true, kAhead ? &params[threadIdx.x] : nullptr);
}

// BN_EXT_CUDA_MERGING_MAP=1 (an experiment, off by default until a GPU has timed it): in
// train_forward and train_backward, a contiguous reduction that staged its sums (G > 1 blocks a
// channel) is followed by this map instead of the finalize pass and the flat map. Each block
// (c, h) of its grid (C, H) merges channel c's G pairs itself, in the finalize pass's layout and
// order (merge_staged over by = finalize_rows(G) rows of one column: the same bits), finishes
// them (the outputs stored by block h = 0 alone, running statistics included), and maps its
// share of the channel with the coefficients from its shared memory. What it removes from the
// chain before the first store: the finalize pass's end (its grid drains and its stores become
// visible before the map's wait returns), the table's round trip through L2, and, for the first
// vectors, the trip to memory (their lines are prefetched into L2 before the wait; loaded into
// registers there, they were live across finish()'s float64 division: 46 registers in the
// float32 backward rather than 38). Every block merges G pairs (G = 5-17 on ResNet-50's 56x56
// layers at batch 32): a few loads from L2 and one finish() a block; so H is one wave of this
// kernel's blocks, not more (a second wave would start that chain again).
// Slots as the reduction's: block (c, h) takes slots h * kThreads + tid + r * H * kThreads,
// round r; with `reverse` (BN_EXT_CUDA_REVERSE_MAP=1) its rounds run from the last, so that what
// the reduction read last, still in L2, is read first. Whole 16-byte vectors only (S % V == 0,
// every pointer aligned), and not float64: there finish()'s float64 division, a call, spilled 16
// bytes on sm_80 (nvcc 13.0), however the kernel was arranged. Before the wait it reads only the
// op's inputs (finish()'s parameters, and the prefetch of x and dy), as the finalize pass and
// the rows map do; `partial` is not __restrict__ (see wait_for_prior_grid).
template <typename T, typename Op, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    merging_map_kernel(const Op op, const T* __restrict__ x, const T* __restrict__ dy,
                       T* __restrict__ out, I C, I S, at::cuda::detail::IntDivider<I> per_run,
                       I nv, const typename Op::M* partial, int64_t G, bool reverse) {
  using M = typename Op::M;
  static_assert(!std::is_same_v<M, double>, "float64 keeps the finalize pass (above)");
  constexpr bool kDy = Op::kNeedsDy;
  const I c = blockIdx.x;
  const int tid = threadIdx.x;
  const I step = static_cast<I>(gridDim.y) * kThreads;
  const I first = static_cast<I>(blockIdx.y) * kThreads;  // the block's first slot
  const I rounds = first < nv ? (nv - first - 1) / step + 1 : 0;
  // Round r's slot of this thread (past nv for some threads of the last round).
  const auto slot = [&](I r) { return first + tid + (reverse ? rounds - 1 - r : r) * step; };
  const auto offset = [&](I j) {
    const auto qr = per_run.divmod(j);  // (n, vector within the run)
    return (qr.div * C + c) * S + qr.mod * V;
  };
  if (rounds > 0 && slot(0) < nv) {
    prefetch_l2(x + offset(slot(0)));
    if constexpr (kDy) prefetch_l2(dy + offset(slot(0)));
  }
  // (Blocks h > 0 load the running statistics too, maybe after block 0 stored them: finish()
  // without its stores never reads them.)
  __shared__ typename Op::Params params;
  if (tid == 0) params = op.params(static_cast<int64_t>(c));
  wait_for_prior_grid();  // the partials (a dependent launch: started before the reduction ends)
  const int64_t cc = static_cast<int64_t>(c);
  const int by = finalize_rows(G);
  const M shift = tid == 0 ? partial[2 * G * static_cast<int64_t>(C) + cc] : M(0);
  __shared__ Sums<M> smem[kThreads / 2];
  const Sums<M> s = merge_staged<false>(partial, static_cast<int64_t>(C), G, cc, tid < by, 1, by,
                                        0, tid, smem);
  __shared__ Coefs<M> coefs;
  if (tid == 0) {
    coefs = op.finish(cc, shift, s.s1, s.s2, blockIdx.y == 0, &params);
  }
  __syncthreads();
  const Coefs<M> kc = coefs;
  for (I r = 0; r < rounds; ++r) {
    const I j = slot(r);
    if (j < nv) {
      const I o = offset(j);
      const Vec<T, V> xv = load_vec<V>(x + o);
      Vec<T, V> dv = xv;
      if constexpr (kDy) dv = load_vec<V>(dy + o);
      store_vec<V>(out + o, map_vec<Op>(xv, dv, kc));
    }
  }
}

// Blocks a channel of the merging map: one wave of them (`wave` blocks), but no more than give
// each thread kMinMapVectors vectors.
constexpr int64_t kMinMapVectors = 4;

int64_t merging_map_rows(int64_t wave, int64_t C, int64_t nv) {
  const int64_t most = ceil_div(nv, kThreads * kMinMapVectors);
  return std::max<int64_t>(1, std::min({wave / C, most, int64_t{65535}}));
}

bool merging_map() { return env_is("BN_EXT_CUDA_MERGING_MAP", "1"); }

dim3 finalize_geometry(int64_t G) {
  const int by = finalize_rows(G);
  return dim3(static_cast<unsigned>(kThreads / by), static_cast<unsigned>(by));
}

// Blocks along the grid's y axis per channel (tile): enough blocks in all to fill the device
// once (`wave` blocks), but at least `min_per_thread` vectors per thread.
int64_t split_count(int64_t wave, int64_t tiles, int64_t work_per_tile,
                    int64_t threads_per_tile, int64_t min_per_thread) {
  int64_t G = ceil_div(wave, tiles);
  G = std::min(G, ceil_div(work_per_tile, threads_per_tile * min_per_thread));
  return std::max<int64_t>(1, std::min<int64_t>(G, 65535));
}

// BN_EXT_CUDA_FIT_WAVE=1 (read on every call; an experiment, off by default until a GPU has timed
// it): the contiguous reduction splits a channel over floor(R / C) blocks, R the blocks of its own
// kernel that the device holds at once, rather than ceil(W / C), W = full_wave_blocks() (8 blocks
// of 256 an SM): one wave, not one and a tail. By default, on an H100 (132 SMs), 32x256x56x56 runs
// 256 x 5 = 1280 blocks where the float32 kernels hold 1056 (32 registers, 8 an SM), and the
// 16-bit backward's 792 (40 registers, 6 an SM: 1.6 waves); 32x64x56x56 runs 64 x 17 = 1088 in
// float32 (1.03 waves). A channel's blocks change, and with them the partials and the sums' bits.
// Asked of the 32-bit index kernel for either index type, as channels_last_wave is.
bool fit_wave() { return env_is("BN_EXT_CUDA_FIT_WAVE", "1"); }

template <typename T, typename Op, int V, bool kMasked>
int64_t contiguous_split(int64_t C, int64_t nv) {
  if (!fit_wave()) return split_count(full_wave_blocks(), C, nv, kThreads, 4);
  static std::array<std::atomic<int>, 64> occupancy{};
  const int64_t held =
      resident_per_sm(reduce_contiguous_kernel<T, Op, uint32_t, V, kMasked>, occupancy) *
      sm_count();
  // split_count rounds up a wave that C divides: C * floor(held / C), at least C.
  return split_count(C * std::max<int64_t>(1, held / C), C, nv, kThreads, 4);
}

// The channels-last kernel's blocks that the device holds at once: its registers allow fewer
// than the 8 an SM that full_wave_blocks assumes (4 or 5 for the 128-bit kernels on sm_90), so a
// grid sized by that ran in more than one wave: 784 blocks where 660 fit, for float32
// 32x64x56x56 on the H200, the second wave's blocks as long as the first's.
// Asked of the 32-bit-index kernel for either index type, so that both split a channel alike
// (the same partials, so the same bits).
template <typename T, typename Op, int V>
int64_t channels_last_wave() {
  static std::array<std::atomic<int>, 64> occupancy{};
  return resident_per_sm(reduce_channels_last_kernel<T, Op, uint32_t, V>, occupancy) *
         sm_count();
}

// BN_EXT_CUDA_FOLD_FINALIZE=1 (read on every call; an experiment, off by default: the first H100
// lease had the default at 0.99-1.00x its speed): a contiguous reduction split over G > 1 blocks a
// channel finishes in its last block (merge_if_last) rather than in a finalize launch. The H200
// profile of 84eae82 had each finalize launch at 2.3-5.3 us, against 10-37 us for the reductions
// before them; the NCHW rows whose reductions stage (56x56 and larger) were within 3% of
// torch.compile at 2671d08. Not the channels-last one: there G is large where a tile is wide (64
// channels by 660 blocks for 32x64x56x56), and one block would merge what the finalize pass spreads
// over 64.
bool fold_finalize() { return env_is("BN_EXT_CUDA_FOLD_FINALIZE", "1"); }

// The op's reduction [+ finalize pass]. With `out` defined (train_forward's y, train_backward's
// dx), where BN_EXT_CUDA_MERGING_MAP=1 applies (above), the merging map instead of the finalize
// pass, writing `out`: returns whether it did, so that the caller's map is then not launched.
template <typename T, typename Op>
bool reduce(const Op& op, const Tensor& x, const Tensor& dy, const Geometry& g,
            const Tensor& out = Tensor()) {
  using M = math_t<T>;
  constexpr int VM = kMaxVec<T>;
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = Op::kNeedsDy ? dy.const_data_ptr<T>() : nullptr;
  bool aligned = is_aligned16(xp) && (dyp == nullptr || is_aligned16(dyp));
  if constexpr (Op::kWritesDx) aligned = aligned && is_aligned16(op.dx);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<M>::value);
  const int64_t C = g.C;
  int64_t G = 1;
  bool staged = false;  // the blocks store partials, which the finalize pass merges
  bool folded = false;  // ... which the reduction's last block of each channel merges instead
  bool mapped = false;  // ... which the merging map merges instead
  Tensor partial, arrived;

  dispatch_index(x.numel(), [&](auto itag) {
    using I = decltype(itag);
    if (g.layout == Layout::kContiguous) {
      // A block column per channel (blockIdx.x). Checked before any launch, so a refused call
      // leaves the running statistics as they were.
      const int64_t most = BN_EXT_MAX_GRID_X;
      TORCH_CHECK(C <= most, "bn_ext (CUDA): a contiguous (N, C, *) input may have at most ", most,
                  " channels, one block column of the reduction's grid each; got ", C);
      // Slots per run: S / V whole vectors, or (masked) enough for a run starting anywhere.
      const auto launch = [&](auto vtag, auto mtag) {
        constexpr int V = decltype(vtag)::value;
        constexpr bool kMasked = decltype(mtag)::value;
        const int64_t per_run = kMasked ? (g.S + 2 * V - 2) / V : g.S / V;
        const int64_t nv = g.N * per_run;
        G = contiguous_split<T, Op, V, kMasked>(C, nv);
        staged = G > 1;
        if (staged) partial = at::empty({(2 * G + 1) * C}, opts);
        folded = staged && fold_finalize();
        if (folded) arrived = zeroed_counters(C, x);
        reduce_contiguous_kernel<T, Op, I, V, kMasked>
            <<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(G)), kThreads, 0, stream>>>(
                op, xp, dyp, static_cast<I>(C), static_cast<I>(g.S),
                at::cuda::detail::IntDivider<I>(static_cast<I>(per_run)), static_cast<I>(nv),
                static_cast<I>(x.numel()), staged ? partial.mutable_data_ptr<M>() : nullptr,
                folded ? reinterpret_cast<unsigned int*>(arrived.mutable_data_ptr<int>())
                       : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // The merging map, where it may apply (whole 16-byte vectors; an op with a map; not
        // float64).
        constexpr bool kMayMerge =
            !kMasked && V == VM && !Op::kWritesDx && !std::is_same_v<M, double>;
        if constexpr (kMayMerge) {
          if (staged && !folded && out.defined() && is_aligned16(out.const_data_ptr<T>()) &&
              merging_map()) {
            Op mop = op;
            mop.coef = nullptr;  // no table: the map holds its coefficients
            const auto kernel = merging_map_kernel<T, Op, I, V>;
            static std::array<std::atomic<int>, 64> occupancy{};
            const int64_t H =
                merging_map_rows(resident_per_sm(kernel, occupancy) * sm_count(), C, nv);
            const at::cuda::detail::IntDivider<I> runs(static_cast<I>(per_run));
            launch_after(dependent_launch_on(), kernel,
                         dim3(static_cast<unsigned>(C), static_cast<unsigned>(H)),
                         dim3(kThreads), stream, mop, xp, dyp, out.mutable_data_ptr<T>(),
                         static_cast<I>(C), static_cast<I>(g.S), runs, static_cast<I>(nv),
                         partial.const_data_ptr<M>(), G, reverse_map());
            mapped = true;
          }
        }
      };
      using Vmax = std::integral_constant<int, VM>;
      if (!aligned) {
        launch(std::integral_constant<int, 1>{}, std::false_type{});
      } else if (g.S % VM == 0) {
        launch(Vmax{}, std::false_type{});
      } else {
        launch(Vmax{}, std::true_type{});
      }
    } else {
      dispatch_vec<T>(aligned && C % VM == 0, [&](auto vtag) {
        constexpr int V = decltype(vtag)::value;
        const int64_t cv = C / V;  // channel vectors per row
        // bx <= 32, so by >= 8: tile_shifts_rows takes one group of shift samples a block row.
        const int bx = static_cast<int>(std::min<int64_t>(32, next_pow2(cv)));
        const int by = kThreads / bx;
        const int64_t blocks_x = ceil_div(cv, bx);
        const int64_t rows = g.N * g.S;
        G = split_count(channels_last_wave<T, Op, V>(), blocks_x, rows, by, 8);
        staged = G > 1 || kStagesAlways<Op>;
        if (staged) partial = at::empty({(2 * G + 1) * C}, opts);
        reduce_channels_last_kernel<T, Op, I, V>
            <<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(G)), dim3(bx, by), 0,
               stream>>>(op, xp, dyp, static_cast<I>(rows), static_cast<I>(C),
                         staged ? partial.mutable_data_ptr<M>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });

  // The reductions above are ordinary launches, and must stay so: the finalize pass (and the
  // training map after it) starts before the reduction ends and reads the op's inputs before its
  // wait (finish()'s parameters; the rows map's x and dy), which only a first kernel that waited
  // for everything before it makes safe.
  if (staged && !folded && !mapped) {
    const dim3 block = finalize_geometry(G);
    launch_after(dependent_launch_on(), finalize_kernel<Op>,
                 dim3(static_cast<unsigned>(ceil_div(C, block.x))), block, stream, op,
                 partial.const_data_ptr<M>(), C, G);
  }
  return mapped;
}

}  // namespace

// n counters at 0 (common.cuh), in a buffer of the device and stream's own that every launch
// leaves at 0 again (each channel's last block resets its counter), so no launch zeroes it first;
// launches on one stream run one after another, so they never share it at once. A stream being
// captured into a CUDA graph gets a fresh zeroed tensor instead (a graph may replay on another
// stream while this one runs). The map is never freed (freeing at exit could come after CUDA's
// teardown). A larger request replaces the stream's buffer: the caching allocator hands the old
// one's memory only to later work on this stream, which runs after the launches that used it.
// Streams are told apart by handle: two streams that run at once with one handle (a build with a
// per-thread default stream; a stream destroyed with work in flight and its handle reused) would
// share counters, which torch's own streams never do.
Tensor zeroed_counters(int64_t n, const Tensor& like) {
  const auto opts = like.options().dtype(at::kInt);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, opts);
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& b = (*buffers)[{static_cast<int>(like.get_device()), stream}];
  if (!b.defined() || b.numel() < n) {
    b = at::zeros({std::max<int64_t>(n, b.defined() ? 2 * b.numel() : 0)}, opts);
  }
  return b;
}

bool launch_batch_stats(const Tensor& x, const Geometry& g, const Tensor& weight,
                        const Tensor& bias, double eps, const Tensor& mean, const Tensor& var,
                        const Tensor& coef, const RunningStats* running, const Tensor& y) {
  bool mapped = false;
  BN_EXT_CUDA_DISPATCH(x.scalar_type(), "bn_ext::cuda::batch_stats", [&] {
    mapped = reduce<scalar_t>(
        stats_op<scalar_t, true>(x, g, weight, bias, eps, mean, var, coef, running), x, Tensor(),
        g, y);
  });
  return mapped;
}

bool launch_grad_sums(const Tensor& dy, const Tensor& x, const Geometry& g, const Tensor& mean,
                      const Tensor& var, const Tensor& weight, double eps, const Tensor& sum_dy,
                      const Tensor& sum_dy_xmu, const Tensor& grad_weight,
                      const Tensor& grad_bias, const Tensor& coef, const Tensor& dx) {
  bool mapped = false;
  BN_EXT_CUDA_DISPATCH(x.scalar_type(), "bn_ext::cuda::backward_reduce", [&] {
    mapped = reduce<scalar_t>(grad_op<scalar_t>(g, mean, var, weight, eps, sum_dy, sum_dy_xmu,
                                                grad_weight, grad_bias, coef),
                              x, dy, g, dx);
  });
  return mapped;
}

void launch_grad_sums_eval_dx(const Tensor& dy, const Tensor& x, const Geometry& g,
                              const Tensor& mean, const Tensor& var, const Tensor& weight,
                              double eps, const Tensor& grad_weight, const Tensor& grad_bias,
                              const Tensor& dx) {
  BN_EXT_CUDA_DISPATCH(x.scalar_type(), "bn_ext::cuda::normalize_backward", [&] {
    reduce<scalar_t>(grad_op<scalar_t, true>(g, mean, var, weight, eps, Tensor(), Tensor(),
                                             grad_weight, grad_bias, Tensor(), dx),
                     x, dy, g);
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
