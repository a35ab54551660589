// CUDA emulator shim (tests/cuda_emulator): cub::BlockReduce with the warp-reductions algorithm,
// combining in CUB's order: within each warp of 32 a shuffle-down tree (offsets 1, 2, 4, 8, 16:
// lane 0 ends with ((v0 + v1) + (v2 + v3)) + ...), then the warps' results in warp order.
// As in CUB, the result is valid in thread 0 only, and TempStorage may be reused after a barrier.
#pragma once

#include "emu.h"

namespace cub {

enum BlockReduceAlgorithm {
  BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY,
  BLOCK_REDUCE_RAKING,
  BLOCK_REDUCE_WARP_REDUCTIONS,
};

template <typename T, int kBlockThreads, BlockReduceAlgorithm kAlgorithm = BLOCK_REDUCE_WARP_REDUCTIONS>
class BlockReduce {
  static_assert(kAlgorithm == BLOCK_REDUCE_WARP_REDUCTIONS, "the emulator has this one only");
  static_assert(kBlockThreads % 32 == 0, "whole warps");

 public:
  struct TempStorage {
    T values[kBlockThreads];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T value, Op op) {
    const unsigned int tid =
        threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    storage_.values[tid] = value;
    __syncthreads();
    if (tid != 0) return value;
    T block{};
    for (int w = 0; w < kBlockThreads / 32; ++w) {
      T lanes[32];
      for (int l = 0; l < 32; ++l) lanes[l] = storage_.values[w * 32 + l];
      for (int offset = 1; offset < 32; offset *= 2) {
        for (int l = 0; l + offset < 32; l += 2 * offset) lanes[l] = op(lanes[l], lanes[l + offset]);
      }
      block = w == 0 ? lanes[0] : op(block, lanes[0]);
    }
    return block;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
