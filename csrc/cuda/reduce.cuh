// The per-channel reduction's value type and its merge, used at every level of every reduction:
// a thread's vector lanes, the threads of a block (cub::BlockReduce), the rows of a channels-last
// tile (column_merge), and the blocks of the grid (the finalize pass over staged partials).
//
// Both reductions are pairs of plain sums with one fixed shift per channel:
//   statistics: s1 = sum(x - k), s2 = sum((x - k)^2), k = the mean of 32 samples of the channel
//               (bn_ext.h), so that
//               mean = k + s1/n and var = s2/n - (s1/n)^2 cancel nothing when |mean| >> std;
//   backward:   s1 = sum(dy),    s2 = sum(dy * (x - mean)).
// With a common shift, merging two partial results is adding them (Welford's merge reduces to this
// when every part is centred on the same k), and it is cheaper than Welford's division per merge.
//
// Determinism: every partial is owned by a fixed set of elements (fixed by the launch geometry,
// which depends only on the shape, dtype, alignment and device), and partials are merged in a fixed
// tree, so the bits are the same from run to run. No sum is an atomic add; the one atomic (a
// counter, under BN_EXT_CUDA_FOLD_FINALIZE=1) picks which block merges, not the order it merges in.
#pragma once

#include <cub/block/block_reduce.cuh>

#include "common.cuh"

namespace bn_ext {
namespace cuda {
namespace detail {

template <typename M>
struct Sums {
  M s1;
  M s2;
};

template <typename M>
__device__ __forceinline__ Sums<M> merge(const Sums<M>& a, const Sums<M>& b) {
  return {a.s1 + b.s1, a.s2 + b.s2};
}

struct Merge {
  template <typename M>
  __device__ __forceinline__ Sums<M> operator()(const Sums<M>& a, const Sums<M>& b) const {
    return merge(a, b);
  }
};

template <typename M, int kBlock = kThreads>
using BlockMerge = cub::BlockReduce<Sums<M>, kBlock, cub::BLOCK_REDUCE_WARP_REDUCTIONS>;

// All kBlock threads of a 1-D block to one value, valid in thread 0. The warp-reductions
// algorithm combines in a fixed order (shuffle tree per warp, then warps in order).
template <typename M, int kBlock = kThreads>
__device__ __forceinline__ Sums<M> block_merge(
    const Sums<M>& v, typename BlockMerge<M, kBlock>::TempStorage& tmp) {
  return BlockMerge<M, kBlock>(tmp).Reduce(v, Merge());
}

// Merges W values per thread down the rows of a (bx, by) layout, by a power of two, as a fixed
// binary tree: afterwards the threads of row 0 hold their column's result. (tx, ty) is this
// thread's place in the layout, which need not be the block's own shape: the reduction's last
// block merges staged partials in the finalize pass's layout, so that both give the same bits.
// `smem` holds (by / 2) * bx * W values. Every thread of the block must call it.
template <typename M, int W>
__device__ __forceinline__ void column_merge_as(Sums<M> (&v)[W], Sums<M>* smem, int bx,
                                                unsigned int by, int tx, int ty) {
  for (int half = by / 2; half > 0; half /= 2) {  // (by unsigned: a shift, as blockDim.y / 2)
    if (ty >= half && ty < 2 * half) {
#pragma unroll
      for (int w = 0; w < W; ++w) smem[((ty - half) * bx + tx) * W + w] = v[w];
    }
    __syncthreads();
    if (ty < half) {
#pragma unroll
      for (int w = 0; w < W; ++w) v[w] = merge(v[w], smem[(ty * bx + tx) * W + w]);
    }
    __syncthreads();
  }
}

// column_merge_as over the block's own (blockDim.x, blockDim.y) shape.
template <typename M, int W>
__device__ __forceinline__ void column_merge(Sums<M> (&v)[W], Sums<M>* smem) {
  column_merge_as<M, W>(v, smem, blockDim.x, blockDim.y, threadIdx.x, threadIdx.y);
}

}  // namespace detail
}  // namespace cuda
}  // namespace bn_ext
