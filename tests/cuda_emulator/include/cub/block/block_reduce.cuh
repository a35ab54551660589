// CUDA emulator shim (tests/cuda_emulator): cub::BlockReduce with the warp-reductions algorithm,
// combining in CUB's order: within each warp of 32 a shuffle-down tree (offsets 1, 2, 4, 8, 16:
// lane 0 ends with ((v0 + v1) + (v2 + v3)) + ...), then the warps' results in warp order.
// As in CUB, the result is valid in thread 0 only, and TempStorage may be reused after a barrier.
#pragma once

#include "emu.h"

#include <c10/util/Exception.h>

#include <cstring>

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
    // CUB's default block is 1-D: a 2-D launch would index its storage wrongly on a GPU.
    TORCH_CHECK(blockDim.x == kBlockThreads && blockDim.y == 1 && blockDim.z == 1,
                "emulated cub::BlockReduce<", kBlockThreads, "> in a block of (", blockDim.x,
                ", ", blockDim.y, ", ", blockDim.z, ")");
    const unsigned int tid = threadIdx.x;
    storage_.values[tid] = value;
    __syncthreads();
    if (tid != 0) {
      // Undefined outside thread 0 in CUB: all-ones bits (NaN for floats) make a use show.
      std::memset(static_cast<void*>(&value), 0xFF, sizeof(T));
      return value;
    }
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
