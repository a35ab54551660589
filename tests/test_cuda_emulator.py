"""Tests that only the CUDA emulator's build runs (tests/cuda_emulator/build.py; skipped elsewhere).

The rest of the suite already runs on that build, through the CUDA kernels. These add what the
GPU-only tests in test_cuda.py check with the profiler, through the emulator's launch counters:
that BN_EXT_CUDA_PERSISTENT=1 runs the single-pass kernels (one block per channel in an
ordinary launch, or cooperative), that by default only the one-block kernel runs and with =0
none, that they fall back where a channel does not fit, and that the launch plans hold from 1 SM
to an H100's 132.
"""
import ctypes
import math
import os
import subprocess
import sys
import tempfile
from fractions import Fraction

import pytest
import torch

import bn_ext
from conftest import (CUDA_EMULATED, CUDA_SWITCHES, assert_close,
                      assert_training_matches_float64, clear_cuda_switches,
                      float64_training_reference, make_input, run_python, same_bits, train_ops)

pytestmark = pytest.mark.skipif(not CUDA_EMULATED, reason="needs the CUDA emulator's build")

ops = torch.ops.bn_ext


def _emu_counter(name):
    """The emulated runtime's int64 counter function `name` (runtime.cpp), through ctypes."""
    fn = getattr(ctypes.CDLL(bn_ext._C.__file__), name)
    fn.restype = ctypes.c_int64
    return fn


def _launches():
    """(ordinary, cooperative) grids run so far by the emulated device."""
    count = _emu_counter("bn_ext_emu_launches")
    return count(0), count(1)


def _with_grids(fn):
    """fn()'s result, and the (ordinary, cooperative) grids it ran."""
    before = _launches()
    result = fn()
    after = _launches()
    return result, (after[0] - before[0], after[1] - before[1])


def _case(shape, dtype, layout):
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(shape, dtype, "cpu", layout, seed=21, mean=3.0, std=0.5)
    dy = make_input(shape, dtype, "cpu", layout, seed=22)
    w = torch.rand(shape[1], dtype=mt) + 0.5
    b = torch.randn(shape[1], dtype=mt)
    return x, dy, w, b


# (shape, layout): tiles of one channel or of up to 32 channel vectors, on one block or many.
SINGLE_PASS_CASES = [
    ((8, 32, 28, 28), "contiguous"),     # one block a channel, but float64's channels span several
    ((4, 16, 33, 31), "contiguous"),     # one block a channel, masked slots (odd runs)
    ((32, 24, 7, 7), "contiguous"),      # one block of 64 threads a channel (fp32, 16-bit)
    ((12, 16, 16, 16), "contiguous"),    # one block of 128 threads a channel (fp32, 16-bit)
    ((1, 16, 8, 8), "contiguous"),       # one block a channel, whole vectors
    ((3, 17, 7, 7), "contiguous"),       # one block a channel, the tensor ending mid-vector
    ((4, 16, 1, 3), "contiguous"),       # one block a channel, runs shorter than a vector
    ((4, 16, 65, 63), "contiguous"),     # each channel over several blocks, scalar (odd runs)
    ((8, 32, 56, 56), "contiguous"),     # each channel over several blocks, vectorized
    ((2, 3, 64, 64), "contiguous"),      # fewer channels than SMs: several blocks each
    ((8, 32, 28, 28), "channels_last"),  # one tile
    ((300, 6), "channels_last"),         # C not a multiple of the vector width
    ((64, 1000), "channels_last"),       # several tiles, the last one partial
]


def _vectors_a_thread(itemsize, V):
    """kItems, the one-block kernel's vectors a thread: 32 values (16 in float64) over V."""
    return (16 if itemsize == 8 else 32) // V


def _single_pass_plan(shape, dtype, layout, sms=16):
    """The single-pass path's kernel for a case on `sms` SMs: the block size (64, 128 or 256)
    where a contiguous channel fits in one block of 256 threads and the channels are at least as
    many as the SMs (persistent_channel_block_kernel, an ordinary launch: the fewest threads that
    hold the channel at kItems vectors a thread), else "cooperative". A channel's slots are S / V
    vectors a run, or (S + 2V - 2) / V where S % V != 0; kItems is 32 values a thread (16 in
    float64) over V. V is 16 bytes, or 8 in 16-bit types whose runs start on 8-byte but not
    16-byte boundaries (the narrow vectors, on by default). (Inputs here are 16-byte aligned,
    which the C++ rule also asks; a 2-D input is channels-last to it.)"""
    if layout != "contiguous" or shape[1] < sms:
        return "cooperative"
    itemsize = torch.empty((), dtype=dtype).element_size()
    V = 16 // itemsize
    S = 1
    for d in shape[2:]:
        S *= d
    if itemsize == 2 and S % V != 0 and S % (V // 2) == 0:
        V //= 2
    slots = shape[0] * (S // V if S % V == 0 else (S + 2 * V - 2) // V)
    items = _vectors_a_thread(itemsize, V)
    return next((block for block in (64, 128, 256) if slots <= block * items), "cooperative")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", SINGLE_PASS_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in SINGLE_PASS_CASES])
def test_single_pass_kernels_run_and_match_float64(monkeypatch, dtype, case):
    """On 16 SMs (32 resident blocks, enough for a tile of each case) the single-pass kernels run
    for train_forward and train_backward, one grid each (one block per channel where a channel
    fits in one, else cooperative), repeat to the bit, and agree with float64 and with the
    multi-pass kernels."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    monkeypatch.delenv("BN_EXT_CUDA_SEMI_PERSISTENT", raising=False)  # (CI's fourth mode's)
    shape, layout = case
    x, dy, w, b = _case(shape, dtype, layout)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    multi, multi_grids = _with_grids(lambda: train_ops(x, dy, w, b))
    assert multi_grids[1] == 0, "the multi-pass path ran a cooperative grid"
    assert multi_grids[0] >= 4, "the multi-pass path: a reduction and a map each way"

    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    single, grids = _with_grids(lambda: train_ops(x, dy, w, b))
    cooperative = _single_pass_plan(shape, dtype, layout) == "cooperative"
    want = (0, 2) if cooperative else (2, 0)
    assert grids == want, "(ordinary, cooperative) grids of train_forward and train_backward"
    assert same_bits(single, train_ops(x, dy, w, b))
    assert_training_matches_float64(single, x, dy, w, b, others=multi)

    # The default: the one-block kernel where it applies, else the multi-pass kernels (the
    # cooperative one is opt-in), with the bits of the path it takes.
    monkeypatch.delenv("BN_EXT_CUDA_PERSISTENT")
    default, grids = _with_grids(lambda: train_ops(x, dy, w, b))
    assert grids == (multi_grids if cooperative else (2, 0)), grids
    for a, same in zip(default, multi if cooperative else single, strict=True):
        assert torch.equal(a, same)


def test_single_pass_cases_reach_every_kernel():
    """SINGLE_PASS_CASES reach, in every dtype, the cooperative kernel and every block size of
    the one-block kernel."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        plans = {_single_pass_plan(s, dtype, lay) for s, lay in SINGLE_PASS_CASES}
        assert plans == {64, 128, 256, "cooperative"}, (dtype, plans)


def _last_block_threads():
    return _emu_counter("bn_ext_emu_last_block_threads")()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("extra", [0, 1], ids=["fills", "one-more"])
def test_one_block_kernel_at_its_block_sizes_edges(monkeypatch, dtype, block, extra):
    """A contiguous channel of exactly as many whole vectors as `block` threads hold (kItems a
    thread) runs in blocks of `block` threads, and one of a vector more in the next size up, where
    every vector is still read, summed and written: results as float64's and as the multi-pass
    kernels'. (An off-by-one in the host's choice would leave the last vector out.)"""
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    V = 16 // itemsize
    slots = block * _vectors_a_thread(itemsize, V) + extra
    shape = (1, 16, slots * V)  # one run a channel, of whole vectors
    assert _single_pass_plan(shape, dtype, "contiguous") == block * (1 + extra)
    x, dy, w, b = _case(shape, dtype, "contiguous")
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    multi = train_ops(x, dy, w, b)
    monkeypatch.delenv("BN_EXT_CUDA_PERSISTENT")
    results, grids = _with_grids(lambda: train_ops(x, dy, w, b))
    assert grids == (2, 0) and _last_block_threads() == block * (1 + extra)
    assert_training_matches_float64(results, x, dy, w, b, others=multi)


# 16-bit channels whose runs start on 8-byte but not 16-byte boundaries (S % 8 == 4), each with
# a batch at which the narrow kernel (8-byte vectors, 8 a thread) holds the channel in 64
# threads where the masked one (16-byte vectors, 4 a thread, (S + 14) / 8 a run) needs 128.
NARROW_CASES = [(10, 16, 14, 14), (200, 16, 1, 4), (100, 17, 2, 6)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", NARROW_CASES, ids=["x".join(map(str, s)) for s in NARROW_CASES])
def test_narrow_vectors(monkeypatch, dtype, shape):
    """By default the one-block kernels read these channels in whole 8-byte vectors (64 threads
    a block here, where BN_EXT_CUDA_NARROW_VECTORS=0's masked 16-byte slots take 128), repeat to
    the bit, and agree with float64 and with the masked kernels' results; any value of the
    switch but 0 leaves the default."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    x, dy, w, b = _case(shape, dtype, "contiguous")
    monkeypatch.setenv("BN_EXT_CUDA_NARROW_VECTORS", "0")
    ops.train_forward(x, w, b, 1e-5)
    assert _last_block_threads() == 128
    masked = train_ops(x, dy, w, b)
    assert _last_block_threads() == 128

    monkeypatch.delenv("BN_EXT_CUDA_NARROW_VECTORS")
    (y, mean, var), grids = _with_grids(lambda: ops.train_forward(x, w, b, 1e-5))
    assert grids == (1, 0) and _last_block_threads() == 64
    (dx, gw, gb), grids = _with_grids(lambda: ops.train_backward(dy, x, mean, var, w, 1e-5))
    assert grids == (1, 0) and _last_block_threads() == 64
    narrow = (y, mean, var, dx, gw, gb)
    assert same_bits(narrow, train_ops(x, dy, w, b))
    assert_training_matches_float64(narrow, x, dy, w, b, others=masked)
    for value in ("1", "no"):
        monkeypatch.setenv("BN_EXT_CUDA_NARROW_VECTORS", value)
        assert same_bits(train_ops(x, dy, w, b), narrow), value


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(32, 24, 7, 7), (12, 16, 16, 16), (1, 16, 8, 8)],
                         ids=["masked", "128-threads", "whole-vectors"])
def test_one_block_threads_experiment(monkeypatch, dtype, shape):
    """BN_EXT_CUDA_ONE_BLOCK_THREADS=64|128|256: the one-block kernels run in blocks of that many
    threads where the channel fits in them, else of the fewest that hold it (the default's
    choice), repeat to the bit, and agree with float64 and with the default's results; any other
    value leaves the default."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    x, dy, w, b = _case(shape, dtype, "contiguous")
    fewest = _single_pass_plan(shape, dtype, "contiguous")
    assert fewest in (64, 128, 256)
    default = train_ops(x, dy, w, b)
    assert _last_block_threads() == fewest
    for value in ("32", "512", "0128", "wide"):
        monkeypatch.setenv("BN_EXT_CUDA_ONE_BLOCK_THREADS", value)
        assert same_bits(train_ops(x, dy, w, b), default)
        assert _last_block_threads() == fewest, value

    for threads in (64, 128, 256):
        monkeypatch.setenv("BN_EXT_CUDA_ONE_BLOCK_THREADS", str(threads))
        (y, mean, var), grids = _with_grids(lambda: ops.train_forward(x, w, b, 1e-5))
        assert grids == (1, 0) and _last_block_threads() == max(threads, fewest)
        (dx, gw, gb), grids = _with_grids(lambda: ops.train_backward(dy, x, mean, var, w, 1e-5))
        assert grids == (1, 0) and _last_block_threads() == max(threads, fewest)
        results = (y, mean, var, dx, gw, gb)
        assert same_bits(results, train_ops(x, dy, w, b))
        if threads == fewest:
            assert same_bits(results, default)
        assert_training_matches_float64(results, x, dy, w, b, others=default)


# (shape, whether the two-sweep kernel takes it): contiguous channels of up to 16384 elements,
# where the channels are at least the SMs (16 here).
TWO_SWEEP_CASES = [
    ((32, 24, 7, 7), True),      # a channel the register kernel holds too (in 64 threads)
    ((256, 16, 7, 7), True),     # 12544 elements (ResNet-50's 7x7 at batch 256): several slots a
                                 # thread, beyond the register kernel (multi-pass by default)
    ((3, 17, 7, 7), True),       # masked slots, the tensor ending mid-vector
    ((10, 16, 14, 14), True),    # 16-bit runs on 8-byte boundaries: the narrow kernel's too
    ((16, 16, 32, 32), True),    # whole vectors, 16384 elements: the largest channel it takes
    ((17, 16, 32, 32), False),   # 17408 elements: the default's path
    ((64, 8, 7, 7), False),      # fewer channels than SMs: the default's path
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", TWO_SWEEP_CASES,
                         ids=["x".join(map(str, s)) for s, _ in TWO_SWEEP_CASES])
def test_two_sweeps_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_TWO_SWEEPS=1: train_forward and train_backward each run one grid of 256-thread
    blocks, one a channel, where a contiguous channel has at most 16384 elements and the
    channels are at least the SMs; they repeat to the bit, agree with float64 and with the
    default's results, and update the running statistics once, as the multi-pass path does.
    Elsewhere, and with any other value, the default's path and bits. It wins over the narrow
    vectors (on by default), and does not depend on them."""
    shape, takes = case
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    x, dy, w, b = _case(shape, dtype, "contiguous")
    default, default_grids = _with_grids(lambda: train_ops(x, dy, w, b))
    monkeypatch.setenv("BN_EXT_CUDA_TWO_SWEEPS", "yes")  # not "1": the default
    assert same_bits(train_ops(x, dy, w, b), default)

    monkeypatch.setenv("BN_EXT_CUDA_TWO_SWEEPS", "1")
    swept, grids = _with_grids(lambda: train_ops(x, dy, w, b))
    if not takes:
        assert grids == default_grids
        assert same_bits(swept, default)
        return
    assert grids == (2, 0) and _last_block_threads() == 256
    assert same_bits(swept, train_ops(x, dy, w, b))
    assert_training_matches_float64(swept, x, dy, w, b, others=default)
    monkeypatch.setenv("BN_EXT_CUDA_NARROW_VECTORS", "0")  # the two sweeps' own vectors either way
    assert same_bits(train_ops(x, dy, w, b), swept)
    monkeypatch.delenv("BN_EXT_CUDA_NARROW_VECTORS")

    # The running statistics, updated in the kernel (its only grid), as the multi-pass path
    # updates them (within rounding), num_batches_tracked counted once.
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    results = {}
    for path in ("multi-pass", "two sweeps"):
        if path == "multi-pass":
            monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
        else:
            monkeypatch.delenv("BN_EXT_CUDA_PERSISTENT")
        rm, rv = torch.full((shape[1],), 0.5, dtype=mt), torch.full((shape[1],), 2.0, dtype=mt)
        nbt = torch.tensor(4, dtype=torch.long)
        _, grids = _with_grids(lambda: ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1))
        results[path] = (rm, rv, nbt, grids)
    assert results["two sweeps"][3] == (1, 0)
    assert int(results["two sweeps"][2]) == 5 and int(results["multi-pass"][2]) == 5
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, c in zip(results["two sweeps"][:2], results["multi-pass"][:2]):
        torch.testing.assert_close(a, c, rtol=tol, atol=tol)


def _default_run(monkeypatch, switch, x, dy, w, b, kept=None):
    """Every op's results on the default path and the grids they ran; the same again with an
    experiment's switch at a value other than "1", which is the default too. `kept` (a list)
    receives the second run's results, held so that no later result lands on their memory."""
    default, default_grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
    monkeypatch.setenv(switch, "on")
    again, grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
    assert grids == default_grids
    assert same_bits(again, default)
    if kept is not None:
        kept.append(again)
    return default, default_grids


def _running_stats_each_way(monkeypatch, switch, x, w, b):
    """{value: (running_mean, running_var, num_batches_tracked)} after one train_forward with
    momentum 0.1 from (0.5, 2.0, 4), with the switch at "0" and at "1"."""
    mt = torch.float64 if x.dtype == torch.float64 else torch.float32
    results = {}
    for value in ("0", "1"):
        monkeypatch.setenv(switch, value)
        C = x.shape[1]
        rm, rv = torch.full((C,), 0.5, dtype=mt), torch.full((C,), 2.0, dtype=mt)
        nbt = torch.tensor(4, dtype=torch.long)
        ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
        results[value] = (rm, rv, nbt)
    return results


# (shape, layout, whether its contiguous reductions split a channel over G > 1 blocks on 16 SMs)
FOLD_CASES = [
    ((8, 32, 56, 56), "contiguous", True),     # G = 4: one thread of the merge adds them all
    ((4, 2, 256, 256), "contiguous", True),    # G = 32-64: rows of the merge, then its tree
    ((4, 16, 65, 63), "contiguous", True),     # masked slots (odd runs)
    ((3, 5, 7, 7), "contiguous", False),       # G = 1: the reduction finishes as before
    ((16, 72, 6, 6), "channels_last", True),   # channels-last: the finalize pass as before
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", FOLD_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay, _ in FOLD_CASES])
def test_fold_finalize_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_FOLD_FINALIZE=1: a contiguous reduction split over G > 1 blocks a channel
    finishes in the channel's last block, one grid fewer than the finalize pass, with the
    finalize pass's bits (same merge order), whichever block is last (the emulator runs blocks in
    index order, or the other way round with BN_EXT_EMU_ORDER=reverse); its counters are left at
    0 for the next call (calls of other shapes between repeat the bits), and the running
    statistics are updated once. Where nothing is staged, or channels-last, or with any other
    value, the default's grids and bits. Multi-pass throughout (BN_EXT_CUDA_PERSISTENT=0)."""
    shape, layout, staged = case
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    monkeypatch.delenv("BN_EXT_EMU_ORDER", raising=False)
    x, dy, w, b = _case(shape, dtype, layout)
    default, default_grids = _default_run(monkeypatch, "BN_EXT_CUDA_FOLD_FINALIZE", x, dy, w, b)

    monkeypatch.setenv("BN_EXT_CUDA_FOLD_FINALIZE", "1")
    other = _case((2, 3, 64, 64), dtype, "contiguous")  # G > 1 on fewer channels
    bigger = _case((2, 40, 64, 64), dtype, "contiguous")  # ... and on more (counters grow)
    folds = staged and layout == "contiguous"
    for order in ("forward", "reverse", "forward"):
        monkeypatch.setenv("BN_EXT_EMU_ORDER", order)
        folded, grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
        # _every_op reduces 7 times (its setup's batch_stats and backward_reduce, then those
        # again, train_forward, normalize_backward and train_backward), a grid fewer each.
        assert grids == (default_grids[0] - (7 if folds else 0), 0), (order, grids)
        assert same_bits(folded, default), order
        train_ops(*other)
        train_ops(*bigger)

    # The running statistics, updated by the channel's last block, to the default's bits.
    results = _running_stats_each_way(monkeypatch, "BN_EXT_CUDA_FOLD_FINALIZE", x, w, b)
    assert int(results["1"][2]) == 5
    assert same_bits(results["1"], results["0"])


# (shape, layout, whether the merging map applies: contiguous, each channel over G > 1 blocks on
# 16 SMs, whole 16-byte vectors; and not float64)
MERGING_MAP_CASES = [
    ((8, 32, 56, 56), "contiguous", True),     # G = 4: one thread of the merge adds them all
    ((4, 2, 256, 256), "contiguous", True),    # G = 32-64: rows of the merge, then its tree
    ((4, 16, 60, 60), "contiguous", True),     # 2 map blocks a channel, unequal rounds
    ((4, 16, 65, 63), "contiguous", False),    # staged, masked slots (odd runs): as by default
    ((8, 32, 56, 56), "misaligned", False),    # staged, scalar: as by default
    ((3, 5, 7, 7), "contiguous", False),       # G = 1: the reduction finishes, as by default
    ((16, 72, 6, 6), "channels_last", False),  # channels-last: as by default
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", MERGING_MAP_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay, _ in MERGING_MAP_CASES])
def test_merging_map_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_MERGING_MAP=1: in train_forward and train_backward, a contiguous reduction
    that stages its sums is followed by one map that merges them itself, in each of its blocks,
    in place of the finalize pass and the flat map: a grid fewer in each of those two ops and
    none fewer in any other, with every op's results at the default's bits (the same merge
    order; the default's and every run's outputs are held, so a skipped element shows whatever
    else the allocator left there, not a copy of the right value), in either block order and
    either sweep direction (BN_EXT_CUDA_REVERSE_MAP=1).
    The running statistics are blended once (one block a channel stores) and num_batches_tracked
    counted once. Elsewhere (float64 too), the default's grids. Multi-pass throughout."""
    shape, layout, merges = case
    merges = merges and dtype != torch.float64  # float64 keeps the finalize pass
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    monkeypatch.delenv("BN_EXT_EMU_ORDER", raising=False)
    x, dy, w, b = _case(shape, dtype, "contiguous" if layout == "misaligned" else layout)
    if layout == "misaligned":
        x, dy = _misaligned(x), _misaligned(dy)
    kept = []  # every run's results held, so that none lands on another's memory
    default, default_grids = _default_run(monkeypatch, "BN_EXT_CUDA_MERGING_MAP", x, dy, w, b,
                                          kept)

    monkeypatch.setenv("BN_EXT_CUDA_MERGING_MAP", "1")
    for order, reverse in (("forward", "1"), ("reverse", "1"), ("forward", "0"),
                           ("reverse", "0")):
        monkeypatch.setenv("BN_EXT_EMU_ORDER", order)
        monkeypatch.setenv("BN_EXT_CUDA_REVERSE_MAP", reverse)
        merged, grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
        kept.append(merged)
        assert grids == (default_grids[0] - (2 if merges else 0), 0), (order, reverse, grids)
        assert same_bits(merged, default), (order, reverse)
    monkeypatch.delenv("BN_EXT_EMU_ORDER")
    monkeypatch.delenv("BN_EXT_CUDA_REVERSE_MAP")

    # The running statistics, updated where the merging map's block 0 of a channel stores its
    # outputs, to the default's bits; with momentum None, in the launch after, as by default.
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    for momentum in (0.1, None):
        results = {}
        for merging in ("0", "1"):
            monkeypatch.setenv("BN_EXT_CUDA_MERGING_MAP", merging)
            rm = torch.full((shape[1],), 0.5, dtype=mt)
            rv = torch.full((shape[1],), 2.0, dtype=mt)
            nbt = torch.tensor(4, dtype=torch.long)
            y = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, momentum)
            results[merging] = (*y, rm, rv, nbt)
        assert int(results["1"][-1]) == 5, momentum
        assert same_bits(results["1"], results["0"]), momentum


PDL_CASES = [((8, 32, 56, 56), "contiguous"), ((3, 5, 7, 7), "contiguous"),
             ((16, 72, 6, 6), "channels_last"), ((6, 520, 2, 2), "channels_last")]


@pytest.mark.parametrize("fold", ["0", "1"], ids=["finalize", "fold"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", PDL_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in PDL_CASES])
def test_dependent_launches(monkeypatch, dtype, case, fold):
    """Programmatic dependent launches (the default; BN_EXT_CUDA_PDL=0 turns them off): in each
    multi-pass training op every launch after the reduction (the finalize pass, the map) asks to
    start before the one before it ends, and nothing else does (an eval map, which may follow
    the kernel that wrote its input, never); the same grids and bits as with the switch at 0
    (here launches run one after another: what it changes on a GPU is when a kernel starts,
    which the GPU tests and the sanitizers check). With BN_EXT_CUDA_FOLD_FINALIZE =0 or =1; any
    value of the switch but 0 leaves them on."""
    shape, layout = case
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    monkeypatch.setenv("BN_EXT_CUDA_FOLD_FINALIZE", fold)
    x, dy, w, b = _case(shape, dtype, layout)
    mean, var = ops.batch_stats(x)
    calls = {"train": lambda: train_ops(x, dy, w, b),
             "eval": lambda: ops.normalize(x, mean, var, w, b, 1e-5),
             "eval_backward": lambda: ops.normalize_backward(dy, x, mean, var, w, 1e-5)}
    dependent = _emu_counter("bn_ext_emu_dependent_launches")
    monkeypatch.setenv("BN_EXT_CUDA_PDL", "0")
    ordinary = {k: _with_grids(call) for k, call in calls.items()}
    for value, asks in ((None, True), ("1", True), ("off", True), ("0", False)):
        if value is None:
            monkeypatch.delenv("BN_EXT_CUDA_PDL")
        else:
            monkeypatch.setenv("BN_EXT_CUDA_PDL", value)
        for name, call in calls.items():
            before = dependent()
            out, grids = _with_grids(call)
            assert grids == ordinary[name][1], (value, name)
            assert same_bits(out, ordinary[name][0]), (value, name)
            # train: two ops, each with one launch in stream order first (its reduction);
            # eval_backward: one op, its reduction (which writes dx), then any finalize pass.
            first = {"train": 2, "eval": grids[0], "eval_backward": 1}[name]
            assert dependent() - before == (grids[0] - first if asks else 0), (value, name)


# (shape, layout): the flat map (whole vectors; vectors straddling runs and a tail; scalar, where
# the input is misaligned; channels-last rows under 128 bytes) and the rows kernel.
REVERSE_CASES = [((8, 32, 56, 56), "contiguous"), ((3, 5, 7, 7), "contiguous"),
                 ((5, 3, 7, 9), "misaligned"), ((7, 6, 5, 3), "channels_last"),
                 ((16, 72, 6, 6), "channels_last"), ((6, 520, 2, 2), "channels_last")]


@pytest.mark.parametrize("sms", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", REVERSE_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in REVERSE_CASES])
def test_reverse_map_experiment(monkeypatch, dtype, case, sms):
    """BN_EXT_CUDA_REVERSE_MAP=1: the training maps (train_forward's, train_backward's,
    backward_input's) sweep the tensor from its end, in one wave of blocks: the same launches and
    the same bits as the default (the default's outputs are held, so a skipped element would
    show whatever else the allocator had left there), with one SM (each thread takes many
    vectors) or four. The flat map's grid is then one wave (the emulated blocks an SM times its
    SMs), the rows kernel's as by default (always one wave). Eval maps never reverse. The order
    itself is not visible in the values; the GPU bench's rev variant times it."""
    shape, layout = case
    monkeypatch.setenv("BN_EXT_EMU_SMS", str(sms))
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")  # the multi-pass maps
    x, dy, w, b = _case(shape, dtype, "contiguous" if layout == "misaligned" else layout)
    if layout == "misaligned":
        x, dy = _misaligned(x), _misaligned(dy)
    mean, var = ops.batch_stats(x)
    sums = ops.backward_reduce(dy, x, mean, var, w, 1e-5)
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=mean.dtype)
    calls = {"train": lambda: train_ops(x, dy, w, b),
             "backward_input": lambda: ops.backward_input(dy, x, mean, var, w, sums[0], sums[1],
                                                          count, 1e-5),
             "eval": lambda: ops.normalize(x, mean, var, w, b, 1e-5)}
    last_grid = _emu_counter("bn_ext_emu_last_grid_blocks")
    default = {k: (*_with_grids(call), last_grid()) for k, call in calls.items()}
    # Each call's last grid is a map: the rows kernel (channels-last rows of whole 16-byte
    # vectors, at least 128 bytes) or the flat one, with V-element vectors where aligned.
    itemsize = x.element_size()
    by_rows = (layout == "channels_last" and shape[1] % (16 // itemsize) == 0
               and shape[1] * itemsize >= 128)
    nv = x.numel() // (1 if layout == "misaligned" else 16 // itemsize)
    one_wave = min(-(-nv // 256), int(os.environ.get("BN_EXT_EMU_BLOCKS_PER_SM", "2")) * sms)
    monkeypatch.setenv("BN_EXT_CUDA_REVERSE_MAP", "1")
    for name, call in calls.items():
        out, grids = _with_grids(call)
        assert grids == default[name][1], name
        assert same_bits(out, default[name][0]), name
        flat_training = name != "eval" and not by_rows
        assert last_grid() == (one_wave if flat_training else default[name][2]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape", [(32, 24, 7, 7), (2, 3, 64, 64)],
                         ids=["one-block", "cooperative"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_single_pass_updates_running_stats_once(monkeypatch, dtype, shape, momentum):
    """train_forward with running statistics: the one-block kernel updates them itself (a fixed
    momentum: no launch besides its own), the cooperative one in a launch after; either way as
    the multi-pass path does (within rounding: the batch statistics are summed in another
    order), with num_batches_tracked counted once."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", "16")
    x, _, w, b = _case(shape, dtype, "contiguous")
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    results = {}
    for path in ("0", "1"):
        monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", path)
        rm, rv = torch.full((C,), 0.5, dtype=mt), torch.full((C,), 2.0, dtype=mt)
        nbt = torch.tensor(4, dtype=torch.long)
        out, grids = _with_grids(lambda: ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, momentum))
        results[path] = (*out, rm, rv, nbt, grids)
    one_block = _single_pass_plan(shape, dtype, "contiguous") != "cooperative"
    grids = results["1"][6]
    if one_block:
        assert grids == ((1, 0) if momentum is not None else (2, 0)), grids
    else:
        assert grids == (1, 1), grids  # the cooperative kernel, then the update
    for name, ours, theirs in zip(["y", "mean", "var", "running_mean", "running_var"],
                                  results["1"][:5], results["0"][:5]):
        assert_close(ours, theirs, dtype if ours.dtype == dtype else mt, msg=name)
    assert int(results["1"][5]) == 5 and int(results["0"][5]) == 5


def test_single_pass_falls_back_where_a_channel_does_not_fit(monkeypatch):
    """On 1 SM with 2 resident blocks, a tile holds 2 * 256 threads * 32 float32 values: a
    channel of 40000 runs the multi-pass kernels, and the result is still right."""
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    monkeypatch.setenv("BN_EXT_EMU_SMS", "1")
    x, dy, w, b = _case((1, 2, 40000), torch.float32, "contiguous")
    results, grids = _with_grids(lambda: train_ops(x, dy, w, b))
    assert grids[1] == 0
    assert_training_matches_float64(results, x, dy, w, b)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("single_pass", ["0", "1"], ids=["multi-pass", "single-pass"])
@pytest.mark.parametrize("case", [((2, 3, 64, 64), "contiguous"), ((4, 16, 33, 31), "contiguous"),
                                  ((16, 72, 6, 6), "channels_last"), ((512, 40), "channels_last")],
                         ids=["few-channels", "odd-runs", "cl", "2d"])
def test_launch_plans_from_1_to_132_sms(monkeypatch, sms, single_pass, case):
    """The grid plans (blocks per channel, two-stage reductions, tiles in flight) scale with the
    SM count; every plan must give the same results within rounding."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", str(sms))
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", single_pass)
    shape, layout = case
    x, dy, w, b = _case(shape, torch.float32, layout)
    assert_training_matches_float64(train_ops(x, dy, w, b), x, dy, w, b)
    mean, var = ops.batch_stats(x)
    y = ops.normalize(x, mean, var, w, b, 1e-5)
    refs = float64_training_reference(x, dy, w, b)
    assert_close(y, refs[0].float(), torch.float32)


def _misaligned(t):
    """t's values at an address one element past a 16-byte boundary, with t's strides."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    out = flat.as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def _rows_grid(C, rows, V, sms):
    """Blocks of the channels-last rows map's grid (elementwise_kernels.cu, launch_map) for V
    channels a thread on `sms` emulated SMs."""
    cv = C // V
    bx = min(32, 1 << (cv - 1).bit_length())
    by = 256 // bx
    blocks_x = -(-cv // bx)
    resident = int(os.environ.get("BN_EXT_EMU_BLOCKS_PER_SM", "2")) * sms
    return blocks_x * max(1, min(-(-rows // by), -(-resident // blocks_x)))


# (shape, layout): channels-last rows maps of one and of several column blocks, and inputs the
# switch leaves alone (16-bit rows under 128 bytes; contiguous).
NARROW_ROWS_CASES = [((16, 72, 6, 6), "channels_last"), ((6, 520, 2, 2), "channels_last"),
                     ((300, 40), "channels_last"), ((8, 32, 14, 14), "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", NARROW_ROWS_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in NARROW_ROWS_CASES])
def test_narrow_rows_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_NARROW_ROWS=1: the 16-bit training backward's rows map (train_backward's and
    backward_input's) takes 8-byte vectors, 4 channels and 4 rows in flight a thread. On 64 SMs
    (the rows, not the wave, set the grid) its grid is that layout's (train_backward's map is
    train_ops' last grid); on 1 SM each thread takes many rows, 4 at a time. Every op's results
    are the default's to the bit (every run's outputs held, so a skipped element shows), in
    either sweep, and nothing else changes (other dtypes and ops, short rows, contiguous
    inputs: the default's last grid)."""
    shape, layout = case
    C = shape[1]
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    x, dy, w, b = _case(shape, dtype, layout)
    by_rows = layout == "channels_last" and C % 8 == 0 and C * x.element_size() >= 128
    narrow = by_rows and x.element_size() == 2
    last_grid = _emu_counter("bn_ext_emu_last_grid_blocks")
    kept = []  # every run's results held, so that none lands on another's memory
    for sms in (64, 1):
        monkeypatch.setenv("BN_EXT_EMU_SMS", str(sms))
        monkeypatch.delenv("BN_EXT_CUDA_NARROW_ROWS", raising=False)
        monkeypatch.delenv("BN_EXT_CUDA_REVERSE_MAP", raising=False)
        default, default_grids = _default_run(monkeypatch, "BN_EXT_CUDA_NARROW_ROWS", x, dy, w, b,
                                              kept)
        for reverse in ("1", "0"):
            monkeypatch.setenv("BN_EXT_CUDA_REVERSE_MAP", reverse)  # (the flat map's grid too)
            monkeypatch.delenv("BN_EXT_CUDA_NARROW_ROWS")
            kept.append(train_ops(x, dy, w, b))
            default_last = last_grid()
            if narrow:
                assert default_last == _rows_grid(C, x.numel() // C, 8, sms)
            monkeypatch.setenv("BN_EXT_CUDA_NARROW_ROWS", "1")
            out, grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
            kept.append(out)
            assert grids == default_grids, (sms, reverse)
            assert same_bits(out, default), (sms, reverse)
            kept.append(train_ops(x, dy, w, b))
            want = _rows_grid(C, x.numel() // C, 4, sms) if narrow else default_last
            assert last_grid() == want, (sms, reverse)


def _semi_persistent_grid(shape, dtype, sms):
    """Where BN_EXT_CUDA_SEMI_PERSISTENT=1 applies (channels-last, 32- or 16-bit, C a multiple
    of the 16-byte vector's V, C / V <= 32), (G, items): its blocks on `sms` emulated SMs and the
    items a thread of block 0, row 0 takes (persistent_kernels.cu: blocks (bx, by), bx = C / V
    rounded up to a power of two, by = 256 / bx; G = min(2 blocks an SM, the row groups); items
    = rows r0 + i * G * by); else None."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    V, C = 16 // itemsize, shape[1]
    if itemsize == 8 or C % V or C // V > 32:
        return None
    rows = math.prod(shape) // C
    by = 256 // (1 << (C // V - 1).bit_length())
    G = min(2 * sms, -(-rows // by))
    return G, -(-rows // (G * by))


def _semi_persistent_items(shape, dtype, sms):
    """The items of _semi_persistent_grid, or None where the switch does not apply."""
    grid = _semi_persistent_grid(shape, dtype, sms)
    return None if grid is None else grid[1]


def _semi_persistent_held(dtype, backward, smem_per_sm=233472):
    """The items a thread holds: kHeld in registers (backward: 3 in float32, 4 in 16-bit;
    forward 8) and what half the emulated SM's shared memory holds less 1 KB reserved (the
    emulator reports no static shared memory), items of 16 bytes of x (and dy) a thread of 256."""
    registers = (3 if dtype == torch.float32 else 4) if backward else 8
    stash = max(0, (smem_per_sm // 2 - 1024) // ((2 if backward else 1) * 16 * 256))
    return registers + stash


# (shape, layout): channels-last inputs with every share of a thread's items (streamed, stashed
# in shared memory, kept in registers), ragged rows, idle columns (C / V not a power of two), one
# block, more channels than blocks; and inputs the switch leaves alone.
SEMI_PERSISTENT_CASES = [
    ((48, 64, 32, 32), "channels_last"),  # 96 items (fp32), 48 (16-bit) on 16 SMs: streamed
    ((8, 32, 28, 28), "channels_last"),   # 7 (fp32), 4 (16-bit): registers and shared memory
    ((64, 16, 16, 16), "channels_last"),  # 32 blocks, 16 channels: blocks that merge none
    ((6, 48, 10, 10), "channels_last"),   # ragged rows; 12 (fp32) or 6 (16-bit) channel vectors
    ((8, 64, 50), "channels_last"),       # a 3-D (N, L, C) input
    ((2, 16, 1, 3), "channels_last"),     # 6 rows: one block
    ((64, 24), "channels_last"),          # 2-D (N, C): 3 channel vectors in 16-bit
    ((4, 256, 16, 16), "channels_last"),  # 16-bit: 32 channel vectors; fp32: 64, left alone
    ((300, 6), "channels_last"),          # C not a multiple of the vector: left alone
    ((8, 32, 28, 28), "contiguous"),      # left alone
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", SEMI_PERSISTENT_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in SEMI_PERSISTENT_CASES])
def test_semi_persistent_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_SEMI_PERSISTENT=1: train_forward and train_backward on a channels-last input
    whose channels fit one tile each run one cooperative grid, on 16 SMs and on 1 (2 blocks:
    each merges several channels); the results repeat to the bit, with other shapes run between
    (the counters are left at 0), and agree with float64 and with the default's; the running
    statistics are updated once. Elsewhere the default's grids and bits."""
    shape, layout = case
    clear_cuda_switches(monkeypatch)
    x, dy, w, b = _case(shape, dtype, layout)
    other = _case((4, 32, 6, 6), dtype, "channels_last")
    applies = layout == "channels_last" and _semi_persistent_items(shape, dtype, 16) is not None
    kept = []
    for sms in ("16", "1"):
        monkeypatch.setenv("BN_EXT_EMU_SMS", sms)
        monkeypatch.delenv("BN_EXT_CUDA_SEMI_PERSISTENT", raising=False)
        default, default_grids = _with_grids(lambda: train_ops(x, dy, w, b))
        monkeypatch.setenv("BN_EXT_CUDA_SEMI_PERSISTENT", "1")
        train_ops(*other)  # (the stream's counters exist from here on)
        semi, grids = _with_grids(lambda: train_ops(x, dy, w, b))
        kept += [default, semi]
        if not applies:
            assert grids == default_grids, sms
            assert same_bits(semi, default), sms
            continue
        assert grids == (0, 2), sms
        for _ in range(2):
            train_ops(*other)
            again = train_ops(x, dy, w, b)
            kept.append(again)
            assert same_bits(again, semi), sms
        assert_training_matches_float64(semi, x, dy, w, b, others=default)

    # The running statistics: updated once (by the launch after the kernel), as by default.
    results = _running_stats_each_way(monkeypatch, "BN_EXT_CUDA_SEMI_PERSISTENT", x, w, b)
    assert int(results["1"][2]) == 5
    for ours, theirs in zip(results["1"][:2], results["0"][:2]):
        assert_close(ours, theirs, ours.dtype, msg="running statistics")


def test_semi_persistent_cases_reach_every_share():
    """SEMI_PERSISTENT_CASES give a thread, on 16 SMs, more items than the registers and shared
    memory hold (forward and backward), fewer than the registers hold, and both layouts the
    switch leaves alone; and grids of more blocks than channels (16 SMs: blocks that merge no
    channel, as every GPU case has) and fewer (1 SM: blocks that merge several)."""
    for dtype in (torch.float32, torch.bfloat16):
        cases = [s for s, lay in SEMI_PERSISTENT_CASES if lay == "channels_last"
                 and _semi_persistent_items(s, dtype, 16) is not None]
        items = [_semi_persistent_items(s, dtype, 16) for s in cases]
        held = max(_semi_persistent_held(dtype, backward) for backward in (True, False))
        assert max(items) > held, dtype
        assert min(items) < 3, dtype
        assert len(cases) < len(SEMI_PERSISTENT_CASES) - 1, dtype  # some left alone
        assert any(_semi_persistent_grid(s, dtype, 16)[0] > s[1] for s in cases), dtype
        assert any(_semi_persistent_grid(s, dtype, 1)[0] < s[1] for s in cases), dtype
    assert "contiguous" in {lay for _, lay in SEMI_PERSISTENT_CASES}


@pytest.mark.parametrize("smem", [0, 2 * (2 * 8192 + 1024)], ids=["registers-only", "stash-2-4"])
def test_semi_persistent_stash_keeps_the_bits(smem):
    """With less shared memory (BN_EXT_EMU_SMEM_PER_SM, in a child process: the stash is sized
    once per process), or none (the registers alone), the semi-persistent kernel streams more of
    a thread's items and holds fewer, with the same bits (a thread adds its items in the same
    order wherever they are held) and the same single cooperative grid each way."""
    code = (
        "import ctypes, torch, bn_ext\n"
        "ops = torch.ops.bn_ext\n"
        "lib = ctypes.CDLL(bn_ext._C.__file__)\n"
        "count, stash = lib.bn_ext_emu_launches, lib.bn_ext_emu_last_dynamic_bytes\n"
        "count.restype = stash.restype = ctypes.c_int64\n"
        "g = torch.Generator().manual_seed(21)\n"
        "outs = []\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    x, dy = (torch.randn(16, 64, 32, 32, generator=g).to(dt)\n"
        "             .contiguous(memory_format=torch.channels_last) for _ in range(2))\n"
        "    w, b = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)\n"
        "    before = count(1)\n"
        "    y, mean, var = ops.train_forward(x, w, b, 1e-5)\n"
        "    outs.append((y, mean, var, *ops.train_backward(dy, x, mean, var, w, 1e-5)))\n"
        "    assert count(1) - before == 2, count(1) - before\n"
        "    print(stash())\n"
        "torch.save(outs, PATH)\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (smem, 233472):
            path = os.path.join(tmp, f"{budget}.pt")
            # every switch of the run's (CI's emulator modes set some) unset in the child
            env = {**{v: "" for v in CUDA_SWITCHES}, "BN_EXT_CUDA_SEMI_PERSISTENT": "1",
                   "BN_EXT_EMU_SMS": "16", "BN_EXT_EMU_BLOCKS_PER_SM": "2",
                   "BN_EXT_EMU_SMEM_PER_SM": str(budget)}
            out = run_python(code.replace("PATH", repr(path)), **env)
            assert out.returncode == 0, out.stderr
            # the backward's stash a block: 8 KB an item of x and dy, (budget / 2 - 1 KB) / 8 KB
            stashed = max(0, (budget // 2 - 1024) // 8192) * 8192
            assert out.stdout.split() == [str(stashed)] * 2, (budget, out.stdout)
            results[budget] = torch.load(path)
    # 32 items a thread (fp32) and 16 (bf16): all but the registers' streamed with no stash;
    # with 2 (backward) or 4 (forward) stashed, more held; by default (14 and 28) none
    # streamed in bf16.
    for ours, default in zip(results[smem], results[233472], strict=True):
        assert same_bits(ours, default)


def _contiguous_split(shape, itemsize, aligned, sms, fit):
    """Blocks a channel of the contiguous reduction (reduce_kernels.cu, contiguous_split) on `sms`
    emulated SMs: ceil(8 * sms / C) by default (8 blocks of 256 an SM), floor(R / C) under
    BN_EXT_CUDA_FIT_WAVE=1 (R = BN_EXT_EMU_BLOCKS_PER_SM * sms, the blocks the device holds), at
    least 1; either way no more than leave each thread 4 vectors."""
    N, C, S = shape[0], shape[1], 1
    for d in shape[2:]:
        S *= d
    V = 16 // itemsize if aligned else 1
    per_run = (S + 2 * V - 2) // V if S % V else S // V
    held = int(os.environ.get("BN_EXT_EMU_BLOCKS_PER_SM", "2")) * sms
    G = max(1, held // C) if fit else -(-8 * sms // C)
    return max(1, min(G, -(-N * per_run // (256 * 4)), 65535))


# (shape, layout): contiguous reductions that split a channel over blocks on 16 SMs, and inputs
# whose split the switch leaves alone.
FIT_WAVE_CASES = [
    ((8, 32, 56, 56), "contiguous"),    # G = 4-10 by default; 1 and 2 fitted
    ((4, 2, 256, 256), "contiguous"),   # 32-128 by default; 16 and 40 (32 in 16-bit: the same)
    ((4, 16, 65, 63), "contiguous"),    # masked slots (odd runs)
    ((8, 32, 56, 56), "misaligned"),    # the scalar kernel
    ((3, 5, 7, 7), "contiguous"),       # G = 1 either way
    ((16, 72, 6, 6), "channels_last"),  # the channels-last reduction: as by default
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", FIT_WAVE_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in FIT_WAVE_CASES])
def test_fit_wave_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_FIT_WAVE=1: the contiguous reduction splits a channel over as many blocks as
    one wave of its own kernel holds, floor(R / C), rather than ceil(8 * SMs / C). Seen through
    the reduction's grid (the last of batch_stats under BN_EXT_CUDA_FOLD_FINALIZE=1), on 16 and
    40 SMs (the blocks an SM are asked once a process, so they stay as the run set them). Every
    op's results: the default's bits where the split is the same, else within rounding of the
    default's (not float64's: on 4x2x256x256, float32's grad_weight is 6e-5 off float64's by
    default, and torch's on the CPU, from the float32 mean's rounding); with the merging map,
    the bits of the fitted split's finalize pass; the running statistics updated once.
    Channels-last: the default's grids and bits. Multi-pass throughout."""
    shape, layout = case
    C = shape[1]
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    x, dy, w, b = _case(shape, dtype, "contiguous" if layout == "misaligned" else layout)
    if layout == "misaligned":
        x, dy = _misaligned(x), _misaligned(dy)
    contiguous = layout != "channels_last"
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    last_grid = _emu_counter("bn_ext_emu_last_grid_blocks")
    kept = []  # every run's results held, so that none lands on another's memory
    for sms in (16, 40):
        monkeypatch.setenv("BN_EXT_EMU_SMS", str(sms))
        monkeypatch.delenv("BN_EXT_CUDA_FIT_WAVE", raising=False)
        default, default_grids = _default_run(monkeypatch, "BN_EXT_CUDA_FIT_WAVE", x, dy, w, b,
                                              kept)
        splits = {}
        for fit in ("0", "1"):
            monkeypatch.setenv("BN_EXT_CUDA_FIT_WAVE", fit)
            monkeypatch.setenv("BN_EXT_CUDA_FOLD_FINALIZE", "1")
            kept.append(ops.batch_stats(x))
            monkeypatch.delenv("BN_EXT_CUDA_FOLD_FINALIZE")
            splits[fit] = last_grid() // C
            if contiguous:
                want = _contiguous_split(shape, x.element_size(), layout == "contiguous", sms,
                                         fit == "1")
                assert splits[fit] == want, (sms, fit)
        fitted, grids = _with_grids(lambda: _every_op(x, dy, w, b)[0])
        kept.append(fitted)
        if splits["1"] == splits["0"]:
            assert grids == default_grids, sms
            assert same_bits(fitted, default), sms
        else:
            assert contiguous
            for i, (ours, theirs) in enumerate(zip(fitted, default, strict=True)):
                assert_close(ours, theirs, dtype if ours.dtype == dtype else mt,
                             msg=f"result {i}, {sms} SMs")
        training = train_ops(x, dy, w, b)
        kept.append(training)
        monkeypatch.setenv("BN_EXT_CUDA_MERGING_MAP", "1")
        merged = train_ops(x, dy, w, b)
        kept.append(merged)
        monkeypatch.delenv("BN_EXT_CUDA_MERGING_MAP")
        assert same_bits(merged, training), sms
        # The running statistics: blended once, counted once, from the fitted split's sums.
        rm, rv = torch.full((C,), 0.5, dtype=mt), torch.full((C,), 2.0, dtype=mt)
        nbt = torch.tensor(4, dtype=torch.long)
        out = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
        assert int(nbt) == 5
        n = x.numel() // C
        assert_close(rm, 0.9 * 0.5 + 0.1 * out[1], mt, msg="running_mean")
        assert_close(rv, 0.9 * 2.0 + 0.1 * out[2] * n / (n - 1), mt, msg="running_var")


# What each launch plan that sizes its grid by a kernel's occupancy asks it of (reduce_kernels.cu):
# (case, the op and input, the grid read, the text of that kernel's mangled type that the emulated
# runtime answers 5 blocks an SM for, where every other kernel gets 2, the same with 64-bit
# indices, the blocks it then runs on 16 SMs, the blocks without that answer). The kernels' types,
# their parameters': the contiguous reduction (IntDivider<uint32_t>, two 32-bit counts, the
# partials), the merging map (IntDivider<uint32_t>, a count, then the partials, a second const
# float*: a substitution, S..._) and the channels-last reduction (two 32-bit counts and the
# partials, last). The reductions ask their
# 32-bit-index kernel with either index type, so that both split a channel alike (the same bits);
# the merging map asks the kernel it launches (its rows do not change its bits).
OCCUPANCY_CASES = [
    # BN_EXT_CUDA_FIT_WAVE=1: 8x32x56x56 fp32 splits a channel over floor(5 * 16 / 32) = 2 blocks
    # (1 on another kernel's answer), the reduction the last grid of batch_stats once folded
    ("fit-wave", "torch.ops.bn_ext.batch_stats(torch.randn(8, 32, 56, 56))", "last",
     "IntDividerIjEEjjP", "IntDividerIjEEjjP", 32 * 2, 32 * 1,
     dict(BN_EXT_CUDA_FIT_WAVE="1", BN_EXT_CUDA_FOLD_FINALIZE="1")),
    # BN_EXT_CUDA_MERGING_MAP=1: train_forward's last grid, the merging map, 2 blocks a channel
    ("merging-map", "torch.ops.bn_ext.train_forward(torch.randn(8, 32, 56, 56), torch.ones(32), "
     "torch.zeros(32), 1e-5)", "last", "IntDividerIjEEjS", "IntDividerImEEmS", 32 * 2, 32 * 1,
     dict(BN_EXT_CUDA_MERGING_MAP="1")),
    # the channels-last reduction (the grid before the finalize pass): one wave, 80 or 32 blocks
    ("channels-last", "torch.ops.bn_ext.batch_stats("
     "torch.randn(16, 64, 28, 28).to(memory_format=torch.channels_last))", "previous", "jjPfE",
     "jjPfE", 80, 32, {}),
]


@pytest.mark.parametrize("case", OCCUPANCY_CASES, ids=[c[0] for c in OCCUPANCY_CASES])
def test_launch_plans_ask_their_own_kernels_occupancy(case):
    """Each launch plan sized by occupancy asks it of its own kernel (OCCUPANCY_CASES). In a
    child process (the answer is asked once a process), the emulated runtime reports 5 blocks an
    SM for that kernel alone and 2 for every other (BN_EXT_EMU_BLOCKS_PER_SM_OF): the grid
    follows the 5, with 32- or 64-bit indices, and the 2 without the report."""
    _, call, which, text, text64, blocks, plain, switches = case
    code = ("import ctypes, torch, bn_ext\n"
            f"grid = ctypes.CDLL(bn_ext._C.__file__).bn_ext_emu_{which}_grid_blocks\n"
            "grid.restype = ctypes.c_int64\n"
            f"{call}\n"
            "print(grid())\n")
    # every switch of the run's (CI's emulator modes set some) unset in the child: "" is the
    # default for each
    env = {**{v: "" for v in CUDA_SWITCHES}, "BN_EXT_EMU_SMS": "16",
           "BN_EXT_CUDA_PERSISTENT": "0", "BN_EXT_EMU_BLOCKS_PER_SM": "2", **switches}
    for index64, of, want in (("0", f"{text}:5", blocks), ("1", f"{text64}:5", blocks),
                              ("0", "", plain)):
        out = run_python(code, BN_EXT_EMU_INDEX64=index64, BN_EXT_EMU_BLOCKS_PER_SM_OF=of, **env)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[-1]) == want, (index64, of)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [((2, 3, 64, 64), "contiguous", False),
                                  ((4, 3, 33, 33), "contiguous", False),
                                  ((4, 8, 7, 7), "contiguous", False),
                                  ((3, 1, 3, 3), "contiguous", False),
                                  ((3, 5, 9, 9), "contiguous", True),
                                  ((8, 64, 7, 7), "channels_last", False),
                                  ((4, 6, 5, 5), "channels_last", False),
                                  ((300, 40), "channels_last", True)],
                         ids=["whole-runs", "masked-runs", "7x7", "runs-shorter-than-a-vector",
                              "misaligned", "cl", "cl-scalar", "2d-misaligned"])
def test_normalize_backward_writes_dx_in_the_reduction(monkeypatch, sms, dtype, case):
    """Eval's dx = dy * w * invstd needs none of the sums, so normalize_backward's reduction
    writes it where it loads dy: the op launches what backward_reduce launches (the reduction,
    and the finalize pass where the blocks split a channel; channels-last always has the
    finalize pass, reduce_kernels.cu) and no elementwise grid, and its three results are the two
    ops' to the bit. The fp32 few-channel inputs split each channel over blocks."""
    monkeypatch.setenv("BN_EXT_EMU_SMS", str(sms))
    shape, layout, misaligned = case
    x, dy, w, _ = _case(shape, dtype, layout)
    if misaligned:
        x, dy = _misaligned(x), _misaligned(dy)
    C = shape[1]
    mean = torch.randn(C, generator=torch.Generator().manual_seed(5)).to(w.dtype)
    var = torch.rand(C, generator=torch.Generator().manual_seed(6)).to(w.dtype) + 0.5
    for weight in (w, None):
        before = _launches()
        reduced = ops.backward_reduce(dy, x, mean, var, weight, 1e-5)
        reduce_grids = _launches()[0] - before[0]
        dx_alone = ops.backward_input(dy, x, mean, var, weight, None, None, None, 1e-5)
        before = _launches()
        got = ops.normalize_backward(dy, x, mean, var, weight, 1e-5)
        assert _launches()[0] - before[0] == (2 if layout == "channels_last" else reduce_grids)
        assert torch.equal(got[0], dx_alone) and got[0].stride() == dx_alone.stride()
        assert torch.equal(got[1], reduced[2]) and torch.equal(got[2], reduced[3])


def _forced_index64():
    """Index dispatches that BN_EXT_EMU_INDEX64=1 has sent to the 64-bit kernels so far."""
    return _emu_counter("bn_ext_emu_forced_index64")()


def _every_op(x, dy, w, b):
    """Each op's results on one input, reductions and maps, training and eval, and for each op
    the index dispatches that BN_EXT_EMU_INDEX64=1 forced to 64 bits."""
    eps = 1e-5
    mean, var = ops.batch_stats(x)
    sums = ops.backward_reduce(dy, x, mean, var, w, eps)
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=mean.dtype)
    calls = [lambda: ops.batch_stats(x),
             lambda: ops.normalize(x, mean, var, w, b, eps),
             lambda: ops.backward_reduce(dy, x, mean, var, w, eps),
             lambda: ops.train_forward(x, w, b, eps),
             lambda: ops.backward_input(dy, x, mean, var, w, sums[0], sums[1], count, eps),
             lambda: ops.backward_input(dy, x, mean, var, w, None, None, None, eps),
             lambda: ops.normalize_backward(dy, x, mean, var, w, eps),
             lambda: ops.train_backward(dy, x, mean, var, w, eps)]
    results, forced = [], []
    for call in calls:
        before = _forced_index64()
        out = call()
        forced.append(_forced_index64() - before)
        results += list(out) if isinstance(out, (tuple, list)) else [out]
    return results, forced


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [((2, 3, 64, 64), "contiguous", False),
                                  ((4, 3, 33, 33), "contiguous", False),
                                  ((3, 5, 3, 3), "contiguous", False),
                                  ((3, 5, 9, 9), "contiguous", True),
                                  ((8, 64, 7, 7), "channels_last", False),
                                  ((4, 6, 5, 5), "channels_last", False),
                                  ((300, 40), "channels_last", True)],
                         ids=["whole-runs", "masked-runs", "runs-shorter-than-a-vector",
                              "misaligned", "cl", "cl-scalar", "2d-misaligned"])
def test_64_bit_index_kernels_give_the_32_bit_kernels_bits(monkeypatch, dtype, case):
    """Tensors of 2^31 elements or more run the kernels indexed in uint64_t (dispatch_index,
    common.cuh), which no test could otherwise run without a GPU and 4 GB tensors:
    BN_EXT_EMU_INDEX64=1 sends these small tensors there. Every op's results must be the 32-bit
    kernels' to the bit, since only the index arithmetic differs. (The single-pass kernels are
    32-bit only: such tensors never take them.)"""
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    shape, layout, misaligned = case
    x, dy, w, b = _case(shape, dtype, layout)
    if misaligned:
        x, dy = _misaligned(x), _misaligned(dy)
    monkeypatch.setenv("BN_EXT_EMU_INDEX64", "0")
    narrow, forced = _every_op(x, dy, w, b)
    assert forced == [0] * 8
    monkeypatch.setenv("BN_EXT_EMU_INDEX64", "1")
    wide, forced = _every_op(x, dy, w, b)
    assert all(n >= 1 for n in forced), f"an op took no 64-bit kernel: {forced}"
    for i, (a, c) in enumerate(zip(narrow, wide, strict=True)):
        assert torch.equal(a, c) and a.stride() == c.stride(), f"result {i} differs"


def test_more_channels_than_the_grid_holds_are_refused(monkeypatch):
    """The NCHW reductions give each channel a block column (blockIdx.x, at most 2^31 - 1 on a
    GPU). An input with more channels (2^31 elements or more) is refused before any launch, with
    the running statistics unchanged, where the launch would fail (2^31 <= C < 2^32) or, its
    grid truncated, reduce only some channels (C >= 2^32). BN_EXT_EMU_MAX_GRID_X lowers the limit
    to 16 here; channels-last input and eval's map have no such column and still run. (Such an
    input never takes the single-pass kernels, which are for fewer than 2^31 elements.)"""
    monkeypatch.setenv("BN_EXT_EMU_MAX_GRID_X", "16")
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    x, dy, w, b = _case((2, 17, 3, 3), torch.float32, "contiguous")
    rm, rv, nbt = torch.zeros(17), torch.ones(17), torch.tensor(3)
    calls = {
        "batch_stats": lambda: ops.batch_stats(x),
        "train_forward": lambda: ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1),
        "backward_reduce": lambda: ops.backward_reduce(dy, x, rm, rv, w, 1e-5),
        "train_backward": lambda: ops.train_backward(dy, x, rm, rv, w, 1e-5),
        "normalize_backward": lambda: ops.normalize_backward(dy, x, rm, rv, w, 1e-5),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="at most 16 channels"):
            call()
    assert torch.equal(rm, torch.zeros(17)) and torch.equal(rv, torch.ones(17))
    assert nbt.item() == 3
    layer = bn_ext.BatchNorm2d(17)
    with pytest.raises(RuntimeError, match="at most 16 channels"):
        layer(x)
    assert layer.num_batches_tracked.item() == 0 and torch.equal(layer.running_var, torch.ones(17))
    # 16 channels, channels-last, and eval's elementwise map run
    x16, dy16, w16, b16 = _case((2, 16, 3, 3), torch.float32, "contiguous")
    assert_training_matches_float64(train_ops(x16, dy16, w16, b16), x16, dy16, w16, b16)
    xc, dyc, _, _ = _case((2, 17, 3, 3), torch.float32, "channels_last")
    assert_training_matches_float64(train_ops(xc, dyc, w, b), xc, dyc, w, b)
    layer.eval()
    assert_close(layer(x), torch.nn.functional.batch_norm(x, rm, rv, layer.weight, layer.bias),
                 torch.float32)


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4],
                         ids=["divergent-barrier", "misaligned-vector", "barrier-orders-shared",
                              "cooperative-too-large", "returned-before-barrier"])
def test_emulator_behaves_as_a_gpu(which):
    """The emulator's own checks (runtime.cpp's self test): faults a GPU would hang or trap on
    raise, and a barrier really orders a block's shared memory."""
    lib = ctypes.CDLL(bn_ext._C.__file__)
    assert lib.bn_ext_emu_self_test(which) == 1


_RUNNING_STATS_CASE = """
import sys, torch, bn_ext
ops = torch.ops.bn_ext
out = []
for mt in (torch.float32, torch.float64):
    for momentum in (0.1, None):
        g = torch.Generator().manual_seed(3)
        mean = torch.randn(4096, generator=g, dtype=mt)
        var = torch.rand(4096, generator=g, dtype=mt)
        state = [torch.randn(4096, generator=g, dtype=mt),
                 torch.rand(4096, generator=g, dtype=mt) + 1, torch.tensor(4)]
        for step in range(3):
            count = torch.tensor(7.0 + step, dtype=mt)
            ops.running_stats_update(*state, mean, var, count, momentum)
        out += state[:2]
"""


def test_running_stats_update_has_the_cpu_builds_bits(tmp_path):
    """The CUDA update kernel and the CPU build's, from the same batch statistics, give the same
    bits: one formula (blend_running_stats) with its fused multiply-add written out, where before
    g++ -mfma fused a product on its own in the CPU build (half the float64 values differed).
    On a GPU, nvcc --fmad=false keeps the same rounding (test_cuda.py compares there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BN_EXT_CUDA_EMULATED")}
    probe = subprocess.run([sys.executable, "-c", "import bn_ext; print(bn_ext._C.__file__)"],
                           env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if probe.returncode != 0 or os.path.samefile(probe.stdout.strip(), bn_ext._C.__file__):
        pytest.skip("no CPU build of bn_ext outside the emulator's (pip install . makes one)")
    saved = tmp_path / "cpu.pt"
    code = _RUNNING_STATS_CASE + "torch.save(out, sys.argv[1])"
    child = subprocess.run([sys.executable, "-c", code, str(saved)], env=env, capture_output=True,
                           text=True, cwd=tempfile.gettempdir())
    assert child.returncode == 0, child.stderr
    namespace = {"__name__": "emulated"}
    exec(_RUNNING_STATS_CASE, namespace)  # noqa: S102 - the same code, on the emulated kernels
    for cpu, emulated in zip(torch.load(saved), namespace["out"], strict=True):
        assert torch.equal(cpu, emulated), f"{int((cpu != emulated).sum())} values differ"


def _not_correctly_rounded(v, f):
    """Which f[i] are not 1/sqrt(v[i]) rounded to the nearest float (v positive and finite).

    f is correct iff 1/sqrt(v) lies between the midpoints m to f's neighbours, and 1/sqrt(v) > m
    iff m^2 v < 1. In double m^2 is exact (m has 25 significant bits) and m^2 v is rounded once
    (2^-53 relative), so only products within 2^-50 of 1 need the exact rational check."""
    inf = torch.tensor(float("inf"))
    f64, v64 = f.double(), v.double()
    up = (f64 + torch.nextafter(f, inf).double()) / 2
    down = (f64 + torch.nextafter(f, torch.tensor(0.0)).double()) / 2
    pu, pd = up * up * v64, down * down * v64
    wrong = (pu < 1 - 2.0**-50) | (pd > 1 + 2.0**-50)
    near = ((pu - 1).abs() <= 2.0**-50) | ((pd - 1).abs() <= 2.0**-50)
    for i in near.nonzero().flatten().tolist():
        x = Fraction(v[i].item())
        wrong[i] = Fraction(up[i].item()) ** 2 * x < 1 or Fraction(down[i].item()) ** 2 * x > 1
    return wrong


def test_frsqrt_rn_is_correctly_rounded_on_every_float():
    """The emulated __frsqrt_rn (1/sqrt in double, rounded to float: two roundings) gives the
    GPU's correctly rounded result for every float: every subnormal and every float in [1, 4),
    the others being these times powers of 4, which 1/sqrt maps to powers of 2, exactly."""
    lib = ctypes.CDLL(bn_ext._C.__file__)
    bits = torch.cat([torch.arange(1, 1 << 23, dtype=torch.int32),
                      torch.arange(127 << 23, 129 << 23, dtype=torch.int32)])
    v = bits.view(torch.float32)
    f = torch.empty_like(v)
    lib.bn_ext_emu_frsqrt_rn(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(f.data_ptr()),
                             ctypes.c_int64(v.numel()))
    assert not _not_correctly_rounded(v, f).any()
    # the check fails a result one float off
    off = f.clone()
    off[::4099] = torch.nextafter(off[::4099], torch.tensor(float("inf")))
    assert torch.equal(_not_correctly_rounded(v, off).nonzero().flatten(),
                       torch.arange(0, v.numel(), 4099))
    # IEEE's special values, as the GPU's: 1/sqrt(+-0) = +-inf, of inf 0, of a negative or NaN NaN
    special = torch.tensor([0.0, -0.0, float("inf"), -1.0, float("nan")])
    out = torch.empty_like(special)
    lib.bn_ext_emu_frsqrt_rn(ctypes.c_void_p(special.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                             ctypes.c_int64(5))
    assert out[:3].tolist() == [float("inf"), float("-inf"), 0.0] and out[3:].isnan().all()
