"""Calls every bn_ext CUDA kernel once or twice on small inputs, for compute-sanitizer
(bench/gpu_proof.sh runs it under memcheck, racecheck and synccheck): every op, both layouts,
every dtype, aligned (vectorized) and misaligned (scalar) inputs, one-block and two-stage
reductions, with the multi-pass kernels (BN_EXT_CUDA_PERSISTENT=0), those of contiguous inputs
once more with BN_EXT_CUDA_FOLD_FINALIZE=1 (the last block of a channel merges), and the
training ops with BN_EXT_CUDA_PDL=0 (no overlapped launches; the default overlaps them on
sm_90 and later), with BN_EXT_CUDA_REVERSE_MAP=1 (maps sweeping from the end) and, for
contiguous inputs, with BN_EXT_CUDA_MERGING_MAP=1 (the map merges the staged sums), and
with BN_EXT_CUDA_FIT_WAVE=1 (a channel split over one wave of the reduction's blocks), and
for channels-last ones, the backward with BN_EXT_CUDA_NARROW_ROWS=1 (8-byte row vectors); the
training ops once more with BN_EXT_CUDA_PERSISTENT=1 (the single-pass kernels: one block per
channel, of 64, 128 and 256 threads where the channels are at least the SMs, and cooperative;
and, for 16-bit 14x14, the masked vectors that the default's 8-byte ones replace,
BN_EXT_CUDA_NARROW_VECTORS=0; for a 7x7 layer, the block-size experiment,
BN_EXT_CUDA_ONE_BLOCK_THREADS=256; for the one-block shapes, the two-sweep kernel,
BN_EXT_CUDA_TWO_SWEEPS=1; for channels-last ones, the semi-persistent kernel,
BN_EXT_CUDA_SEMI_PERSISTENT=1, also on an input large enough to stream some rows; unless
BN_EXT_EXERCISE_SINGLE_PASS=0).

Usage: python bench/cuda_exercise.py   (needs a GPU and a CUDA build of bn_ext)
"""
import os
from unittest import mock

import torch
import bn_ext

ops = torch.ops.bn_ext
# BN_EXT_EXERCISE_SINGLE_PASS=0 leaves out the single-pass kernels (gpu_proof.sh, when the tests
# found them failing or hanging, so that a hang cannot take every sanitizer's time).
SINGLE_PASS = os.environ.get("BN_EXT_EXERCISE_SINGLE_PASS", "1") == "1"
os.environ["BN_EXT_CUDA_PERSISTENT"] = "0"  # the default would take the one-block kernel
dev = "cuda"
torch.manual_seed(0)
launches = 0


def shaped(shape, dtype, layout):
    x = torch.randn(shape, device=dev, dtype=torch.float32).mul_(2).add_(0.5).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "misaligned":
        flat = torch.empty(x.numel() + 1, device=dev, dtype=dtype)
        y = flat[1:].view(shape)
        y.copy_(x)
        x = y
    return x


CASES = [((4, 8, 5, 6), "contiguous"), ((4, 8, 5, 6), "channels_last"),
         ((2, 3, 64, 64), "contiguous"),      # two-stage grid reduction
         ((2, 3, 64, 64), "channels_last"),   # two-stage, channels not a vector multiple
         ((512, 16), "channels_last"), ((3, 5, 7), "misaligned"), ((2, 16, 4, 4), "misaligned"),
         ((6, 520, 2, 2), "channels_last"),  # elementwise by rows, spare lanes in every dtype
         ((3, 5, 7, 7), "contiguous"),  # masked-vector reduction, the tensor ending mid-vector
         ((2, 3, 128, 128), "contiguous"),  # single-pass: channels over several blocks
         # Single-pass, one block a channel (160 channels: more than the SMs of an H100, H200
         # or B200): 64 threads (masked slots), 128 (float64: 256), 256 (16-bit: masked).
         ((4, 160, 7, 7), "contiguous"), ((12, 160, 16, 16), "contiguous"),
         ((32, 160, 14, 14), "contiguous"),
         ((3, 163, 7, 7), "contiguous")]  # one block a channel, the tensor ending mid-vector
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    for shape, layout in CASES:
        C = shape[1]
        x, dy = shaped(shape, dtype, layout), shaped(shape, dtype, layout)
        w = torch.rand(C, device=dev, dtype=mt) + 0.5
        b = torch.randn(C, device=dev, dtype=mt)
        mean, var = ops.batch_stats(x)
        y, mean, var = ops.train_forward(x, w, b, 1e-5)
        ops.train_forward(x, None, None, 1e-5)
        ops.normalize(x, mean, var, w, b, 1e-5)
        ops.normalize(x, mean, var, None, None, 1e-5)
        sdy, sdx, gw, gb = ops.backward_reduce(dy, x, mean, var, w, 1e-5)
        n = torch.tensor(float(x.numel() // C), device=dev, dtype=mt)
        ops.backward_input(dy, x, mean, var, w, sdy, sdx, n, 1e-5)
        ops.backward_input(dy, x, mean, var, None, None, None, None, 1e-5)
        ops.train_backward(dy, x, mean, var, w, 1e-5)
        rm, rv, nbt = torch.zeros(C, device=dev, dtype=mt), torch.ones(C, device=dev, dtype=mt), \
            torch.zeros((), device=dev, dtype=torch.long)
        ops.running_stats_update(rm, rv, nbt, mean, var, n, 0.1)
        ops.running_stats_update(rm, rv, nbt, mean, var, n, None)
        ops.running_stats_update(rm, rv, None, mean, var, n, 0.5)
        ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
        ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, None)
        if layout in ("contiguous", "misaligned"):
            # Multi-pass reductions that stage, finished by each channel's last block
            # (BN_EXT_CUDA_FOLD_FINALIZE=1, an experiment; the others leave it to finalize).
            with mock.patch.dict(os.environ, {"BN_EXT_CUDA_FOLD_FINALIZE": "1"}):
                y, mean, var = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
                ops.backward_reduce(dy, x, mean, var, w, 1e-5)
                ops.normalize_backward(dy, x, mean, var, w, 1e-5)
                ops.train_backward(dy, x, mean, var, w, 1e-5)
        # The training ops' later launches in stream order only (the default overlaps them with
        # the ones before them on sm_90 and later).
        with mock.patch.dict(os.environ, {"BN_EXT_CUDA_PDL": "0"}):
            y, mean, var = ops.train_forward(x, w, b, 1e-5)
            ops.backward_input(dy, x, mean, var, w, sdy, sdx, n, 1e-5)
            ops.train_backward(dy, x, mean, var, w, 1e-5)
            ops.normalize_backward(dy, x, mean, var, w, 1e-5)
        # The training maps sweeping from the end (BN_EXT_CUDA_REVERSE_MAP=1, an experiment).
        with mock.patch.dict(os.environ, {"BN_EXT_CUDA_REVERSE_MAP": "1"}):
            y, mean, var = ops.train_forward(x, w, b, 1e-5)
            ops.backward_input(dy, x, mean, var, w, sdy, sdx, n, 1e-5)
            ops.train_backward(dy, x, mean, var, w, 1e-5)
        # The 16-bit channels-last backward's rows map in 8-byte vectors
        # (BN_EXT_CUDA_NARROW_ROWS=1, an experiment), in either sweep.
        if layout == "channels_last":
            for reverse in ("0", "1"):
                with mock.patch.dict(os.environ, {"BN_EXT_CUDA_NARROW_ROWS": "1",
                                                  "BN_EXT_CUDA_REVERSE_MAP": reverse}):
                    ops.train_backward(dy, x, mean, var, w, 1e-5)
        # Staged contiguous reductions followed by the map that merges their sums
        # (BN_EXT_CUDA_MERGING_MAP=1, an experiment), forward and backward, in either sweep.
        if layout == "contiguous":
            for reverse in ("0", "1"):
                with mock.patch.dict(os.environ, {"BN_EXT_CUDA_MERGING_MAP": "1",
                                                  "BN_EXT_CUDA_REVERSE_MAP": reverse}):
                    y, mean, var = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
                    ops.train_backward(dy, x, mean, var, w, 1e-5)
            # A channel split over one wave of the reduction's own blocks
            # (BN_EXT_CUDA_FIT_WAVE=1, an experiment), every op with a contiguous reduction.
            with mock.patch.dict(os.environ, {"BN_EXT_CUDA_FIT_WAVE": "1"}):
                mean, var = ops.batch_stats(x)
                ops.backward_reduce(dy, x, mean, var, w, 1e-5)
                y, mean, var = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
                ops.train_backward(dy, x, mean, var, w, 1e-5)
                ops.normalize_backward(dy, x, mean, var, w, 1e-5)
        if SINGLE_PASS:
            os.environ["BN_EXT_CUDA_PERSISTENT"] = "1"
            y, mean, var = ops.train_forward(x, w, b, 1e-5)
            ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, 0.1)
            ops.train_backward(dy, x, mean, var, w, 1e-5)
            ops.train_backward(dy, x, mean, var, None, 1e-5)
            # The experiments' switches (README), each on the shapes it is for.
            experiments = []
            if dtype in (torch.float16, torch.bfloat16) and shape[-1] * shape[-2] % 8 == 4:
                # masked vectors (14x14: 16-byte vectors with masked lanes; the default reads
                # 8-byte ones, unmasked)
                experiments.append(("BN_EXT_CUDA_NARROW_VECTORS", "0"))
            if shape == (4, 160, 7, 7):
                # the block size: this channel's few slots in 256 threads, most idle
                experiments.append(("BN_EXT_CUDA_ONE_BLOCK_THREADS", "256"))
            if shape[1] >= 160:
                # two sweeps (masked slots, whole vectors, several slots a thread, the tensor's end)
                experiments.append(("BN_EXT_CUDA_TWO_SWEEPS", "1"))
            if layout == "channels_last":
                # the semi-persistent kernel (where C / V <= 32; else the cooperative one)
                experiments.append(("BN_EXT_CUDA_SEMI_PERSISTENT", "1"))
            for switch, value in experiments:
                with mock.patch.dict(os.environ, {switch: value}):
                    y, mean, var = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
                    ops.train_forward(x, None, None, 1e-5)
                    ops.train_backward(dy, x, mean, var, w, 1e-5)
            os.environ["BN_EXT_CUDA_PERSISTENT"] = "0"
        launches += 1
# The semi-persistent kernel on an input of more rows than the small cases': on 132 SMs (264
# blocks, 16 of x and dy held a thread in registers and shared memory) the float32 backward
# has 17-18 rows a thread and streams 1-2, fp16 holds all of its 8-9.
if SINGLE_PASS:
    with mock.patch.dict(os.environ, {"BN_EXT_CUDA_PERSISTENT": "1",
                                      "BN_EXT_CUDA_SEMI_PERSISTENT": "1"}):
        for dtype in (torch.float32, torch.float16):
            x, dy = (shaped((8, 64, 96, 96), dtype, "channels_last") for _ in range(2))
            w, b = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev)
            y, mean, var = ops.train_forward(x, w, b, 1e-5)
            ops.train_backward(dy, x, mean, var, w, 1e-5)
# The modules end to end, training and eval, forward and backward.
for layout in ("contiguous", "channels_last"):
    m = bn_ext.BatchNorm2d(8, momentum=None, device=dev)
    x = shaped((4, 8, 6, 6), torch.float32, layout).requires_grad_()
    m(x).sum().backward()
    m.eval()
    m(x).sum().backward()
torch.cuda.synchronize()
print(f"exercised every op over {launches} dtype/shape/layout cases"
      + ("" if SINGLE_PASS else ", without the single-pass kernels"))
