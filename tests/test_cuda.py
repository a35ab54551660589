"""CUDA-only tests of bn_ext's own CUDA kernels (csrc/cuda). Skipped where there is no GPU.

Covered here, beyond the device-parametrized suites:
  * parity with torch.nn.BatchNorm1d/2d/3d, cuDNN on and off, on every layout and dtype, with
    shapes that reach every kernel variant (vectorized and scalar, one block per channel and the
    two-stage grid reduction, both layouts);
  * every raw op against the CPU kernels, misaligned and odd-sized inputs included;
  * gradcheck / gradgradcheck in float64 on the GPU;
  * bit-identical repeat runs, CUDA graph capture and replay, a non-default stream, a non-default
    device, no host synchronisation (torch.cuda.set_sync_debug_mode("error"));
  * a bfloat16 input of more than 2^31 elements (64-bit indexing), marked slow;
  * the persistent (single-pass) training kernels (BN_EXT_CUDA_PERSISTENT=1) against float64 and
    the multi-pass kernels, and their fallback;
  * the experiments' switches (README): which kernels each runs, and its bits.
"""
import copy
import json
import math
import re

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bn_ext
from conftest import (assert_close, assert_training_matches_float64, clear_cuda_switches,
                      make_input, make_pair, run_steps, same_bits, train_ops)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.bn_ext
DEV = "cuda"

# (input dtype, parameter dtype)
DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp64", "fp32", "fp16", "bf16", "fp16-fp32params", "bf16-fp32params"]

LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]

# Shapes chosen to reach each kernel variant:
#   (64, 40)          2-D: channels-last rows, C % 8 == 0
#   (300, 6)          2-D: C not a multiple of any vector width
#   (8, 12, 100)      3-D
#   (4, 16, 33, 31)   odd spatial size: the masked-vector contiguous reduction, vectors
#                     straddling runs in the elementwise map
#   (8, 32, 28, 28)   S % 8 == 0: vectorized everywhere
#   (2, 3, 128, 128)  few channels, large N*S: two-stage grid reduction
#   (2, 8, 6, 10, 12) 5-D
#   (16, 520, 2, 2)   channels-last rows of whole vectors >= 128 bytes in every dtype: the 2-D
#                     elementwise kernel, over several column blocks, the last one part-filled
SHAPES = [(64, 40), (300, 6), (8, 12, 100), (4, 16, 33, 31), (8, 32, 28, 28), (2, 3, 128, 128),
          (2, 8, 6, 10, 12), (16, 520, 2, 2)]


def _ids(shape):
    return "x".join(map(str, shape))


def test_build_has_cuda_kernels():
    assert bn_ext.has_cuda_kernels(), "a GPU is visible but bn_ext was built without CUDA kernels"


# ---- parity with torch.nn, cuDNN on and off --------------------------------------------------

@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "native"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_parity_with_torch(cudnn, dtypes, layout, shape):
    dtype, param_dtype = dtypes
    # With 16-bit input and float32 parameters, torch's parameter gradients on the GPU are not
    # float32-exact: on the H200 (torch 2.11, cuDNN and native alike) grad_weight of
    # 16x520x2x2 fp16 channel 1 was 0.5885 where float64 on the same input gives 0.5974, and
    # bn_ext 0.5974. So they are compared with torch at the input's tolerance (run_steps'
    # default, and the parameters' where they share the input's dtype), and with float64 at
    # float32's, below.
    with torch.backends.cudnn.flags(enabled=cudnn):
        ref, ours = make_pair(len(shape), shape[1], DEV, param_dtype)
        run_steps(ref, ours, shape, dtype, DEV, layout, steps=2, train=True)
        run_steps(ref, ours, shape, dtype, DEV, layout, steps=1, train=False)
    if param_dtype != dtype:
        x = make_input(shape, dtype, DEV, layout, seed=7)
        dy = make_input(shape, dtype, DEV, "contiguous", seed=8)
        w, b = ours.weight.detach(), ours.bias.detach()
        assert_training_matches_float64(train_ops(x, dy, w, b), x, dy, w, b)


@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "native"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("options", [(False, True, None), (True, False, 0.1), (False, False, 0.3)],
                         ids=["plain-cumulative", "affine-untracked", "plain-untracked"])
def test_parity_options(cudnn, layout, options):
    affine, track, momentum = options
    shape = (6, 24, 10, 9)
    with torch.backends.cudnn.flags(enabled=cudnn):
        ref, ours = make_pair(4, shape[1], DEV, torch.float32, affine, track, momentum)
        run_steps(ref, ours, shape, torch.float32, DEV, layout, steps=3, train=True)
        run_steps(ref, ours, shape, torch.float32, DEV, layout, steps=1, train=False)


def test_functional_and_convert_model():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1),
                              torch.nn.BatchNorm2d(8, momentum=None)).to(DEV)
    ours = bn_ext.convert_model(copy.deepcopy(net))
    assert isinstance(ours[1], bn_ext.BatchNorm2d) and isinstance(ours[4], bn_ext.BatchNorm2d)
    # The convolutions in float32, not TF32 (cuDNN's default on the GPU): TF32 rounds the
    # second convolution's input to 10 mantissa bits, which turns the last-bit differences of
    # the two first BatchNorms' outputs into differences of 1e-3 (seen on the H200, 2.7e-3).
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for step in range(3):
            x = make_input((4, 3, 12, 12), torch.float32, DEV, "channels_last", seed=step)
            assert_close(ours(x), net(x), torch.float32)
    sd_ref, sd_ours = net.state_dict(), ours.state_dict()
    for k in sd_ref:
        assert_close(sd_ours[k].float(), sd_ref[k].float(), torch.float32, msg=k)
    x = make_input((4, 6, 7, 5), torch.float32, DEV)
    rm, rv = torch.randn(6, device=DEV), torch.rand(6, device=DEV) + 0.5
    w, b = torch.rand(6, device=DEV) + 0.5, torch.randn(6, device=DEV)
    for training in (True, False):
        r1, r2 = rm.clone(), rv.clone()
        expected = torch.nn.functional.batch_norm(x, r1, r2, w, b, training, 0.2, 1e-3)
        o1, o2 = rm.clone(), rv.clone()
        actual = bn_ext.batch_norm(x, o1, o2, w, b, training, 0.2, 1e-3)
        assert_close(actual, expected, torch.float32)
        assert_close(o1, r1, torch.float32)
        assert_close(o2, r2, torch.float32)


# ---- every raw op against the CPU kernels --------------------------------------------------

def _misaligned(x):
    """The same values at a storage offset of one element: not 16-byte aligned."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = flat[1:].view(x.shape)
    y.copy_(x)
    return y


OP_CASES = [
    ((8, 32, 28, 28), "contiguous"),
    ((8, 32, 28, 28), "channels_last"),
    ((4, 16, 33, 31), "contiguous"),
    ((4, 6, 33, 31), "channels_last"),
    ((2, 3, 128, 128), "contiguous"),
    ((2048, 24), "channels_last"),
    ((4096, 3), "channels_last"),
    ((3, 5, 7), "transposed"),
    ((2, 4, 5, 6), "sliced"),
    ((16, 64, 2, 2), "misaligned"),
    ((16, 64, 2, 2), "misaligned_cl"),
]


def _case_input(shape, layout, dtype, seed):
    if layout == "misaligned":
        return _misaligned(make_input(shape, dtype, DEV, "contiguous", seed=seed))
    if layout == "misaligned_cl":
        x = make_input(shape, dtype, DEV, "channels_last", seed=seed)
        return _misaligned(x.movedim(1, -1).contiguous()).movedim(-1, 1)
    return make_input(shape, dtype, DEV, layout, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"{_ids(c[0])}-{c[1]}")
def test_ops_match_cpu(dtype, case):
    shape, layout = case
    C = shape[1]
    eps = 1e-4
    x = _case_input(shape, layout, dtype, seed=3)
    dy = _case_input(shape, layout, dtype, seed=4)
    w = torch.rand(C, device=DEV, dtype=dtype) + 0.5
    b = torch.randn(C, device=DEV, dtype=dtype)
    cpu = [t.cpu() for t in (x, dy, w, b)]
    mt = torch.float64 if dtype == torch.float64 else torch.float32

    def both(fn, *args):
        return fn(x, dy, w, b, *args), fn(*cpu, *args)

    def check(got, want, what):
        for i, (g_, w_) in enumerate(zip(got, want)):
            assert g_.device.type == "cuda" and g_.dtype == w_.dtype and g_.shape == w_.shape
            tol = dtype if g_.dtype == dtype else mt
            assert_close(g_.cpu(), w_, tol, msg=f"{what}[{i}]")

    got, want = both(lambda x, dy, w, b: ops.batch_stats(x))
    check(got, want, "batch_stats")
    mean, var = got
    got, want = both(lambda x, dy, w, b: ops.train_forward(x, w, b, eps))
    check(got, want, "train_forward")
    for wb in (True, False):
        got, want = both(lambda x, dy, w, b: (ops.normalize(x, mean.to(x.device), var.to(x.device),
                                                            w if wb else None, b if wb else None,
                                                            eps),))
        check(got, want, f"normalize(affine={wb})")
    got, want = both(lambda x, dy, w, b: ops.backward_reduce(dy, x, mean.to(x.device),
                                                             var.to(x.device), w, eps))
    check(got, want, "backward_reduce")
    sum_dy, sum_dy_xmu = got[0], got[1]
    n = x.numel() // C
    got, want = both(lambda x, dy, w, b: (ops.backward_input(
        dy, x, mean.to(x.device), var.to(x.device), w, sum_dy.to(x.device),
        sum_dy_xmu.to(x.device), torch.tensor(float(n), device=x.device, dtype=mt), eps),))
    check(got, want, "backward_input(train)")
    got, want = both(lambda x, dy, w, b: (ops.backward_input(
        dy, x, mean.to(x.device), var.to(x.device), w, None, None, None, eps),))
    check(got, want, "backward_input(eval)")
    for wb in (True, False):
        got, want = both(lambda x, dy, w, b: ops.normalize_backward(
            dy, x, mean.to(x.device), var.to(x.device), w if wb else None, eps))
        check(got, want, f"normalize_backward(affine={wb})")
    got, want = both(lambda x, dy, w, b: ops.train_backward(dy, x, mean.to(x.device),
                                                            var.to(x.device), w, eps))
    check(got, want, "train_backward")
    got, want = both(lambda x, dy, w, b: ops.train_backward(dy, x, mean.to(x.device),
                                                            var.to(x.device), None, eps))
    check(got, want, "train_backward(no weight)")


# The eval maps derive their coefficients in the kernel where it maps whole vectors with runs at
# least a vector long (aligned contiguous, channels-last rows of whole vectors), and read them from
# a table computed first otherwise (here: the same values at a misaligned address). Both routes
# must give the same bits, and match the CPU.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", [((4, 16, 33, 31), "contiguous"), ((8, 24, 7, 7), "contiguous"),
                                  ((16, 520, 2, 2), "channels_last")],
                         ids=lambda c: f"{_ids(c[0])}-{c[1]}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_eval_coefficient_routes_agree_bitwise(dtype, case, affine):
    shape, layout = case
    C = shape[1]
    eps = 1e-3
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(shape, dtype, DEV, layout, seed=5)
    dy = make_input(shape, dtype, DEV, layout, seed=6)
    mean = torch.randn(C, device=DEV, dtype=mt)
    var = torch.rand(C, device=DEV, dtype=mt) * 3 + 1e-3
    w = torch.rand(C, device=DEV, dtype=mt) + 0.5 if affine else None
    b = torch.randn(C, device=DEV, dtype=mt) if affine else None

    def misaligned(t):
        if layout == "channels_last":
            return _misaligned(t.movedim(1, -1).contiguous()).movedim(-1, 1)
        return _misaligned(t)

    xm, dym = misaligned(x), misaligned(dy)
    y = ops.normalize(x, mean, var, w, b, eps)
    ym = ops.normalize(xm, mean, var, w, b, eps)
    assert torch.equal(y, ym), "normalize: derived and table coefficients differ"
    dx = ops.backward_input(dy, x, mean, var, w, None, None, None, eps)
    dxm = ops.backward_input(dym, xm, mean, var, w, None, None, None, eps)
    assert torch.equal(dx, dxm), "backward_input(eval): derived and table coefficients differ"
    args = [t.cpu() if t is not None else None for t in (x, mean, var, w, b)]
    assert_close(y.cpu(), ops.normalize(*args, eps), dtype, msg="normalize vs CPU")
    want = ops.backward_input(dy.cpu(), x.cpu(), mean.cpu(), var.cpu(), args[3], None, None, None,
                              eps)
    assert_close(dx.cpu(), want, dtype, msg="backward_input(eval) vs CPU")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("mt", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_running_stats_update_matches_cpu(momentum, mt):
    C = 1000
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(C, generator=g, dtype=mt), torch.rand(C, generator=g, dtype=mt)
    state = [torch.randn(C, generator=g, dtype=mt), torch.rand(C, generator=g, dtype=mt) + 1,
             torch.tensor(4)]
    gpu = [t.to(DEV) for t in state]
    for step in range(3):
        count = torch.tensor(7.0 + step, dtype=mt)
        ops.running_stats_update(*state, mean, var, count, momentum)
        ops.running_stats_update(*gpu, mean.to(DEV), var.to(DEV), count.to(DEV), momentum)
    assert gpu[2].item() == state[2].item() == 7
    # One formula (blend_running_stats), its one fused multiply-add written out, no other
    # contraction (nvcc --fmad=false): from the same batch statistics, the same bits.
    assert torch.equal(gpu[0].cpu(), state[0])
    assert torch.equal(gpu[1].cpu(), state[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 2, 1 << 22), (4096, 2, 1, 256), (1 << 20, 4)], ids=_ids)
def test_grid_reduction_against_float64(layout, shape):
    """Channels with millions of values: the two-stage grid reduction, float32 accumulation."""
    x = make_input(shape, torch.float32, DEV, layout, mean=3.0, std=0.5)
    mean, var = ops.batch_stats(x)
    dims = [0] + list(range(2, x.dim()))
    vr, mr = torch.var_mean(x.double(), dims, correction=0)
    torch.testing.assert_close(mean.double(), mr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), vr, rtol=1e-5, atol=1e-6)


# Contiguous runs that are not whole 128-bit vectors (S % V != 0: 7x7, 14x14 in 16-bit types,
# runs shorter than a vector) are reduced in aligned vectors with the lanes outside the run
# masked. The storage around the tensor and the neighbouring channels hold NaN and inf, which a
# lane that is not masked would carry into the sums; the last shape ends within a vector
# (numel % 8 != 0), where only the valid lanes may be read.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(32, 24, 7, 7), (5, 6, 14, 14), (7, 5, 3), (2, 3, 1001),
                                   (3, 5, 7, 7)], ids=_ids)
def test_masked_run_reduction_against_float64(dtype, shape):
    C = shape[1]
    numel = math.prod(shape)
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, len(shape)))
    bshape = [1, C] + [1] * (len(shape) - 2)

    def embedded(seed, fill, **kw):
        # values in an aligned view at the front of a larger storage full of `fill`
        big = torch.full((numel + 64,), fill, dtype=dtype, device=DEV)
        v = big[:numel].view(shape)
        v.copy_(make_input(shape, dtype, DEV, seed=seed, **kw))
        return v

    def check(got, want, scale):
        err = (got[1:].double() - want[1:]).abs()
        bound = 1e-12 if dtype == torch.float64 else 2e-5
        assert torch.isfinite(got[1:]).all()
        assert (err <= bound * scale[1:]).all(), (err / scale[1:]).max()

    # statistics; channel 0 is all inf, which its neighbours' masked lanes must not see
    x = embedded(7, float("nan"), mean=3.0, std=0.5)
    x[:, 0] = float("inf")
    mean, var = ops.batch_stats(x)
    vr, mr = torch.var_mean(x.double(), dims, correction=0)
    assert not torch.isfinite(var[0])
    check(mean, mr, mr.abs() + vr.sqrt())
    check(var, vr, vr)
    xc = x.clone()  # the same values in a storage of their own: the same bits
    again = ops.batch_stats(xc)
    assert torch.equal(again[0][1:], mean[1:]) and torch.equal(again[1][1:], var[1:])

    # the backward's sums; dy's channel 0 is all inf
    x = embedded(9, float("nan"), mean=3.0, std=0.5)
    dy = embedded(8, float("inf"))
    dy[:, 0] = float("inf")
    vr, mr = torch.var_mean(x.double(), dims, correction=0)
    sum_dy, sum_dy_xmu, _, _ = ops.backward_reduce(dy, x, mr.to(mt), vr.to(mt), None, 1e-5)
    xmu = x.double() - mr.to(mt).double().view(bshape)
    dyd = dy.double()
    assert not torch.isfinite(sum_dy[0])
    check(sum_dy, dyd.sum(dims), dyd.abs().sum(dims))
    check(sum_dy_xmu, (dyd * xmu).sum(dims), (dyd * xmu).abs().sum(dims))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_small_std(layout):
    x = make_input((16, 8, 32, 32), torch.float32, DEV, layout, mean=1e4, std=1.0)
    mean, var = ops.batch_stats(x)
    dims = [0, 2, 3]
    vr, mr = torch.var_mean(x.double(), dims, correction=0)
    torch.testing.assert_close(var.double(), vr, rtol=1e-4, atol=0)
    y = ops.normalize(x, mean, var, None, None, 0.0)
    yr = (x.double() - mr[None, :, None, None]) / vr[None, :, None, None].sqrt()
    torch.testing.assert_close(y.double(), yr, rtol=0, atol=1e-3)


def test_nan_stays_in_its_channel():
    x = make_input((4, 3, 8, 8), torch.float32, DEV)
    x[1, 1, 2, 3] = float("nan")
    y, mean, var = ops.train_forward(x, None, None, 1e-5)
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, [0, 2]]).any()
    assert torch.isnan(mean[1]) and not torch.isnan(mean[[0, 2]]).any()


@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (2, 5, 3, 11)])
def test_infinite_mean_backward_sums_match_cpu(shape):
    # float32 values near its largest overflow the channel sums: mean = inf. The masked vector
    # loads of odd runs (S % 4 != 0) once fed their unused lanes x = mean, dy = 0 to the sums,
    # adding 0 * (inf - inf) = NaN where the CPU (and whole vectors) give -inf.
    x = torch.full(shape, 3e38)
    x[:, :, 0, 0] = 1.0
    dy = torch.ones_like(x)
    mean, var = ops.batch_stats(x)
    assert torch.isinf(mean).all()
    want = ops.backward_reduce(dy, x, mean, var, None, 1e-5)
    got = ops.backward_reduce(dy.to(DEV), x.to(DEV), mean.to(DEV), var.to(DEV), None, 1e-5)
    assert torch.isinf(want[1]).all()
    for w, g in zip(want, got):
        torch.testing.assert_close(g.cpu(), w, equal_nan=True)


# ---- the persistent (single-pass) training path -----------------------------------------------

# (shape, layout): tiles of one channel (contiguous) or of up to 32 channel vectors
# (channels-last), held by one block or spread over many, in one wave or several.
PERSISTENT_CASES = [
    ((8, 32, 28, 28), "contiguous"),     # vectorized; float64's channels over several blocks
    ((4, 16, 33, 31), "contiguous"),     # scalar (odd runs)
    ((2, 3, 128, 128), "contiguous"),    # few channels, many blocks each
    ((32, 2048, 7, 7), "contiguous"),    # one block of 64 threads a channel (float64: 128)
    ((32, 256, 14, 14), "contiguous"),   # one block of 256 (16-bit: 8-byte vectors; float64:
                                         # cooperative)
    ((8, 32, 28, 28), "channels_last"),  # one tile
    ((300, 6), "channels_last"),         # C not a multiple of the vector width
    ((64, 1000), "channels_last"),       # partial last tile
    ((16, 512, 14, 14), "channels_last"),  # several tiles
    ((1, 8, 256, 256), "channels_last"),   # one tile over many blocks
]


def _training_case(shape, dtype, layout):
    """x (mean 3, std 0.5), dy, and weight and bias in the math type, on the GPU."""
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(shape, dtype, DEV, layout, seed=21, mean=3.0, std=0.5)
    dy = make_input(shape, dtype, DEV, layout, seed=22)
    w = torch.rand(shape[1], device=DEV, dtype=mt) + 0.5
    b = torch.randn(shape[1], device=DEV, dtype=mt)
    return x, dy, w, b


def _kernels_run(fn):
    """The names of the CUDA kernels that fn launches."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", PERSISTENT_CASES,
                         ids=[f"{_ids(s)}-{lay}" for s, lay in PERSISTENT_CASES])
def test_persistent_path_matches_float64(monkeypatch, dtype, case):
    """BN_EXT_CUDA_PERSISTENT=1: train_forward and train_backward run the single-pass kernels
    (seen in the profiler), agree with float64 and with the multi-pass path within the dtype's
    tolerance, and repeat to the bit."""
    shape, layout = case
    x, dy, w, b = _training_case(shape, dtype, layout)

    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    names = _kernels_run(lambda: train_ops(x, dy, w, b))
    assert not any("persistent" in n for n in names), names
    multi = train_ops(x, dy, w, b)

    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    names = _kernels_run(lambda: train_ops(x, dy, w, b))
    single_pass = ("persistent_contiguous_kernel", "persistent_channel_block_kernel",
                   "persistent_channels_last_kernel")
    assert sum(any(k in n for k in single_pass) for n in names) == 2, names
    single = train_ops(x, dy, w, b)
    assert same_bits(single, train_ops(x, dy, w, b))

    assert_training_matches_float64(single, x, dy, w, b, others=multi)

    # The default (no BN_EXT_CUDA_PERSISTENT): the one-block kernel where it ran above, else the
    # multi-pass kernels, with that path's bits.
    one_block = sum("persistent_channel_block_kernel" in n for n in names)
    assert one_block in (0, 2), names
    monkeypatch.delenv("BN_EXT_CUDA_PERSISTENT")
    names = _kernels_run(lambda: train_ops(x, dy, w, b))
    assert sum("persistent" in n for n in names) == one_block, names
    for a, same in zip(train_ops(x, dy, w, b), single if one_block else multi, strict=True):
        assert torch.equal(a, same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(32, 256, 14, 14), (10, 512, 14, 14)], ids=_ids)
def test_narrow_vectors(monkeypatch, dtype, shape):
    """By default (14x14: runs on 8-byte boundaries) the one-block kernels with 8-byte vectors
    (V = 4 in the kernel's name) run, repeat to the bit, and agree with float64 and with
    BN_EXT_CUDA_NARROW_VECTORS=0's masked 16-byte ones (V = 8, masked), which run there."""
    C = shape[1]
    x = make_input(shape, dtype, DEV, "contiguous", seed=21, mean=3.0, std=0.5)
    dy = make_input(shape, dtype, DEV, "contiguous", seed=22)
    w = torch.rand(C, device=DEV) + 0.5
    b = torch.randn(C, device=DEV)
    clear_cuda_switches(monkeypatch)

    def one_block_kernels():
        return [n for n in _kernels_run(lambda: train_ops(x, dy, w, b))
                if "persistent_channel_block_kernel" in n]

    monkeypatch.setenv("BN_EXT_CUDA_NARROW_VECTORS", "0")
    names = one_block_kernels()
    # <T, Op, V, block, masked>
    assert len(names) == 2 and all(re.search(r", 8, \d+, true>", n) for n in names), names
    masked = train_ops(x, dy, w, b)
    monkeypatch.delenv("BN_EXT_CUDA_NARROW_VECTORS")
    names = one_block_kernels()
    assert len(names) == 2 and all(re.search(r", 4, \d+, false>", n) for n in names), names
    narrow = train_ops(x, dy, w, b)
    assert same_bits(narrow, train_ops(x, dy, w, b))
    assert_training_matches_float64(narrow, x, dy, w, b, others=masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("threads", [128, 256])
def test_one_block_threads_experiment(monkeypatch, dtype, threads):
    """BN_EXT_CUDA_ONE_BLOCK_THREADS=128|256 on a 7x7 layer at batch 32, whose channel the default
    holds in 64 threads: the one-block kernels run in blocks of that many threads (the block
    size in the kernel's name), repeat to the bit, and agree with float64 and with the
    default's results."""
    shape = (32, 256, 7, 7)
    x = make_input(shape, dtype, DEV, "contiguous", seed=21, mean=3.0, std=0.5)
    dy = make_input(shape, dtype, DEV, "contiguous", seed=22)
    w = torch.rand(shape[1], device=DEV) + 0.5
    b = torch.randn(shape[1], device=DEV)
    clear_cuda_switches(monkeypatch)
    names = [n for n in _kernels_run(lambda: train_ops(x, dy, w, b))
             if "persistent_channel_block_kernel" in n]
    # <T, Op, V, block, masked>: 7x7 runs are masked in every dtype here
    assert len(names) == 2 and all(", 64, true>" in n for n in names), names
    default = train_ops(x, dy, w, b)
    monkeypatch.setenv("BN_EXT_CUDA_ONE_BLOCK_THREADS", str(threads))
    names = [n for n in _kernels_run(lambda: train_ops(x, dy, w, b))
             if "persistent_channel_block_kernel" in n]
    assert len(names) == 2 and all(f", {threads}, true>" in n for n in names), names
    wide = train_ops(x, dy, w, b)
    assert same_bits(wide, train_ops(x, dy, w, b))
    assert_training_matches_float64(wide, x, dy, w, b, others=default)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(32, 256, 14, 14), (256, 256, 7, 7), (32, 256, 8, 8)], ids=_ids)
def test_two_sweeps_experiment(monkeypatch, dtype, shape):
    """BN_EXT_CUDA_TWO_SWEEPS=1: a 14x14 layer at batch 32 (the register kernel's too), a 7x7 one
    at batch 256 (12544 elements a channel, multi-pass by default) and one of whole vectors run
    the two-sweep kernel, one launch a pass, repeat to the bit, and agree with float64 and with
    the default's results."""
    x, dy, w, b = _training_case(shape, dtype, "contiguous")
    clear_cuda_switches(monkeypatch)
    default = train_ops(x, dy, w, b)
    monkeypatch.setenv("BN_EXT_CUDA_TWO_SWEEPS", "1")
    names = _kernels_run(lambda: train_ops(x, dy, w, b))
    assert sum("channel_two_sweep_kernel" in n for n in names) == 2, names
    assert not any("persistent_channel_block_kernel" in n or "reduce" in n for n in names), names
    swept = train_ops(x, dy, w, b)
    assert same_bits(swept, train_ops(x, dy, w, b))
    assert_training_matches_float64(swept, x, dy, w, b, others=default)


def _reductions(x, dy, w, b, eps=1e-5):
    """Every op that reduces, training and eval: train_ops, then batch_stats, backward_reduce and
    normalize_backward on train_forward's statistics."""
    out = train_ops(x, dy, w, b, eps)
    mean, var = out[1], out[2]
    return (*out, *ops.batch_stats(x), *ops.backward_reduce(dy, x, mean, var, w, eps),
            *ops.normalize_backward(dy, x, mean, var, w, eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (4, 2, 256, 256), (32, 256, 28, 27)],
                         ids=_ids)
def test_fold_finalize_experiment(monkeypatch, dtype, shape):
    """BN_EXT_CUDA_FOLD_FINALIZE=1 on the multi-pass path: contiguous reductions split over
    several blocks a channel run no finalize kernel, and give the finalize pass's bits, call
    after call (each launch leaves its counters at 0) and on two streams at once (a buffer of
    counters a stream)."""
    x, dy, w, b = _training_case(shape, dtype, "contiguous")
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    names = _kernels_run(lambda: _reductions(x, dy, w, b))
    assert sum("finalize_kernel" in n for n in names) == 5, names  # every reduction stages
    default = _reductions(x, dy, w, b)
    monkeypatch.setenv("BN_EXT_CUDA_FOLD_FINALIZE", "1")
    _reductions(x, dy, w, b)  # the stream's counters made (zeroed once) before the count
    folded_names = _kernels_run(lambda: _reductions(x, dy, w, b))
    assert not any("finalize_kernel" in n for n in folded_names), folded_names
    assert len(folded_names) == len(names) - 5
    # Results kept, so that each call writes fresh memory (not the last call's, which holds
    # the same bits where a launch did not finish a channel).
    for out in [_reductions(x, dy, w, b) for _ in range(3)]:
        assert same_bits(out, default)
    # Two streams at once, each with a copy of the input, so neither waits for the other.
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    inputs = [(x.clone(), dy.clone()) for _ in streams]
    torch.cuda.synchronize()
    results = [[], []]
    for _ in range(8):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                results[i].append(_reductions(inputs[i][0], inputs[i][1], w, b))
    torch.cuda.synchronize()
    for out in results[0] + results[1]:
        assert same_bits(out, default)


PDL_CASES = [((32, 64, 56, 56), "contiguous"), ((32, 64, 56, 56), "channels_last"),
             ((32, 256, 28, 27), "contiguous"), ((4096, 1024), "channels_last"),
             ((6, 520, 2, 2), "channels_last")]


@pytest.mark.parametrize("fold", ["0", "1"], ids=["finalize", "fold"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", PDL_CASES, ids=[f"{_ids(s)}-{lay}" for s, lay in PDL_CASES])
def test_dependent_launches(monkeypatch, dtype, case, fold):
    """Programmatic dependent launches on the multi-pass path (the default; the finalize pass and
    the training maps may start before the kernel before them ends, and wait for it before
    reading what it wrote): the same kernels and the same bits as with BN_EXT_CUDA_PDL=0, over
    many calls queued back to back with no synchronisation between them (a map that read its
    table early would differ), with the finalize pass or the fold."""
    shape, layout = case
    x, dy, w, b = _training_case(shape, dtype, layout)
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    monkeypatch.setenv("BN_EXT_CUDA_FOLD_FINALIZE", fold)
    monkeypatch.setenv("BN_EXT_CUDA_PDL", "0")
    _reductions(x, dy, w, b)  # the stream's counters made before the count
    names = _kernels_run(lambda: _reductions(x, dy, w, b))
    ordinary = _reductions(x, dy, w, b)
    monkeypatch.delenv("BN_EXT_CUDA_PDL")
    assert sorted(_kernels_run(lambda: _reductions(x, dy, w, b))) == sorted(names)
    assert same_bits(_reductions(x, dy, w, b), ordinary)
    # Inputs that change from call to call, each result against the same call without overlap.
    xs = [x * (1 + i / 8) for i in range(12)]
    torch.cuda.synchronize()
    overlapped = [_reductions(xi, dy, w, b) for xi in xs]
    monkeypatch.setenv("BN_EXT_CUDA_PDL", "0")
    for xi, out in zip(xs, overlapped, strict=True):
        ref = _reductions(xi, dy, w, b)
        assert same_bits(out, ref)


# PDL_CASES, and the flat map's scalar tail (7x7 runs) and scalar path (a misaligned input).
REVERSE_CASES = PDL_CASES + [((3, 5, 7, 7), "contiguous"), ((5, 3, 7, 9), "misaligned")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", REVERSE_CASES,
                         ids=[f"{_ids(s)}-{lay}" for s, lay in REVERSE_CASES])
def test_reverse_map_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_REVERSE_MAP=1 on the multi-pass path (the training maps sweep from the end,
    one wave of blocks): the same kernels and the same bits as the default, with dependent
    launches (the default) and without."""
    shape, layout = case
    x, dy, w, b = _training_case(shape, dtype, "contiguous" if layout == "misaligned" else layout)
    if layout == "misaligned":
        x, dy = _misaligned(x), _misaligned(dy)
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    for pdl in ("1", "0"):
        monkeypatch.setenv("BN_EXT_CUDA_PDL", pdl)
        monkeypatch.delenv("BN_EXT_CUDA_REVERSE_MAP", raising=False)
        names = _kernels_run(lambda: _reductions(x, dy, w, b))
        default = _reductions(x, dy, w, b)
        monkeypatch.setenv("BN_EXT_CUDA_REVERSE_MAP", "1")
        assert sorted(_kernels_run(lambda: _reductions(x, dy, w, b))) == sorted(names)
        assert same_bits(_reductions(x, dy, w, b), default)


def _training_forward_each_way(monkeypatch, switch, x, w, b):
    """{value: (y, mean, var, running_mean, running_var, num_batches_tracked)} of one
    train_forward with momentum 0.1 from (0.5, 2.0, 4), with the switch at "0" and at "1"."""
    mt = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = {}
    for value in ("0", "1"):
        monkeypatch.setenv(switch, value)
        rm = torch.full((x.shape[1],), 0.5, device=DEV, dtype=mt)
        rv = torch.full((x.shape[1],), 2.0, device=DEV, dtype=mt)
        nbt = torch.tensor(4, device=DEV, dtype=torch.long)
        y = ops.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1)
        stats[value] = (*y, rm, rv, nbt)
    return stats


# (shape, layout, whether the merging map applies: contiguous, staged, whole 16-byte vectors; and
# not float64)
MERGING_CASES = [((32, 64, 56, 56), "contiguous", True), ((4, 2, 256, 256), "contiguous", True),
                 ((32, 256, 27, 27), "contiguous", False), ((32, 64, 56, 56), "misaligned", False),
                 ((32, 64, 56, 56), "channels_last", False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", MERGING_CASES,
                         ids=[f"{_ids(s)}-{lay}" for s, lay, _ in MERGING_CASES])
def test_merging_map_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_MERGING_MAP=1 on the multi-pass path: where a contiguous reduction stages its
    sums, train_forward and train_backward run the merging map in place of the finalize pass
    and the flat map (two kernels fewer in _reductions' calls, and no finalize pass in the
    training ops), with the default's bits, over many calls queued back to back with inputs
    that change (a map that read the partials before the reduction ended would differ), in
    either sweep direction, with dependent launches (the default) and without; the running
    statistics updated once. Elsewhere (float64 too), the default's kernels."""
    shape, layout, merges = case
    merges = merges and dtype != torch.float64  # float64 keeps the finalize pass
    x, dy, w, b = _training_case(shape, dtype, "contiguous" if layout == "misaligned" else layout)
    if layout == "misaligned":
        x, dy = _misaligned(x), _misaligned(dy)
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    names = _kernels_run(lambda: _reductions(x, dy, w, b))
    xs = [x * (1 + i / 8) for i in range(8)]
    defaults = [_reductions(xi, dy, w, b) for xi in xs]
    monkeypatch.setenv("BN_EXT_CUDA_MERGING_MAP", "1")
    kept = []  # every run's results held, so that none lands on another's memory
    for pdl, reverse in (("1", "1"), ("1", "0"), ("0", "0")):
        monkeypatch.setenv("BN_EXT_CUDA_PDL", pdl)
        monkeypatch.setenv("BN_EXT_CUDA_REVERSE_MAP", reverse)
        merged = _kernels_run(lambda: _reductions(x, dy, w, b))
        if merges:
            assert sum("merging_map_kernel" in n for n in merged) == 2, merged
            assert len(merged) == len(names) - 2, (names, merged)
            assert sum("finalize_kernel" in n for n in merged) == 3, merged  # the other ops'
        else:
            assert sorted(merged) == sorted(names)
        torch.cuda.synchronize()
        results = [_reductions(xi, dy, w, b) for xi in xs]
        kept.append(results)
        for out, default in zip(results, defaults, strict=True):
            assert same_bits(out, default), (pdl, reverse)
    # The running statistics: blended once (block 0 of a channel stores them), counted once.
    stats = _training_forward_each_way(monkeypatch, "BN_EXT_CUDA_MERGING_MAP", x, w, b)
    assert int(stats["1"][-1]) == 5
    assert same_bits(stats["1"], stats["0"])


def _reduction_grids(fn, tmp_path):
    """The grids (x, y, z) of the contiguous reductions that fn launches, from the profiler's
    trace (its kernel events carry their launch's grid)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"
               and "reduce_contiguous_kernel" in e.get("name", "")]
    assert kernels and all("grid" in e.get("args", {}) for e in kernels), kernels[:1]
    return [tuple(e["args"]["grid"]) for e in kernels]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (32, 256, 56, 56)], ids=_ids)
def test_fit_wave_experiment(monkeypatch, tmp_path, dtype, shape):
    """BN_EXT_CUDA_FIT_WAVE=1 on the multi-pass path: contiguous reductions split a channel over
    one wave of their own blocks. The reductions' grids: by default C x ceil(W / C) blocks
    (W = 8 blocks of 256 an SM on sm_80 and sm_90, at most 4 vectors a thread); under the switch
    no more blocks than a wave of the thread limit (W) and at most as many a channel, fewer on
    32x256x56x56 (W / C = 4.1, rounded up by default). Every reducing op's results within
    rounding of the default's (the partials differ, so the bits may), to the bit over many calls
    queued back to back with inputs that change, and with the merging map as without it (its
    merge is the finalize pass's)."""
    mt = torch.float64 if dtype == torch.float64 else torch.float32
    x, dy, w, b = _training_case(shape, dtype, "contiguous")
    N, C, S = shape[0], shape[1], shape[2] * shape[3]
    props = torch.cuda.get_device_properties(DEV)
    wave = props.multi_processor_count * (props.max_threads_per_multi_processor // 256)
    cap = -(-N * (S // (16 // x.element_size())) // (256 * 4))
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    grids = _reduction_grids(lambda: _reductions(x, dy, w, b), tmp_path)
    assert set(grids) == {(C, min(-(-wave // C), cap), 1)}, grids
    default = _reductions(x, dy, w, b)
    monkeypatch.setenv("BN_EXT_CUDA_FIT_WAVE", "1")
    fitted_grids = _reduction_grids(lambda: _reductions(x, dy, w, b), tmp_path)
    for gx, gy, gz in fitted_grids:
        assert gx == C and gz == 1 and 1 <= gy <= min(wave // C, cap), fitted_grids
    if C == 256:
        assert all(g[1] < -(-wave // C) for g in fitted_grids), fitted_grids
    fitted = _reductions(x, dy, w, b)
    for i, (ours, theirs) in enumerate(zip(fitted, default, strict=True)):
        assert_close(ours, theirs, dtype if ours.dtype == dtype else mt, msg=f"result {i}")
    xs = [x * (1 + i / 8) for i in range(4)]
    kept = []  # every run's results held, so that none lands on another's memory
    first = [_reductions(xi, dy, w, b) for xi in xs]
    for merging in ("0", "1"):
        monkeypatch.setenv("BN_EXT_CUDA_MERGING_MAP", merging)
        torch.cuda.synchronize()
        again = [_reductions(xi, dy, w, b) for xi in xs]
        kept.append(again)
        for out, want in zip(again, first, strict=True):
            assert same_bits(out, want), merging


# (shape, layout, whether BN_EXT_CUDA_SEMI_PERSISTENT=1 applies in 32-bit and in 16-bit types:
# channels-last with C / V <= 32 channel vectors of 16 bytes)
SEMI_PERSISTENT_CASES = [((32, 64, 56, 56), "channels_last", True, True),
                         ((8, 128, 28, 28), "channels_last", True, True),
                         ((32, 256, 56, 56), "channels_last", False, True),
                         ((4096, 64), "channels_last", True, True),
                         ((32, 64, 56, 56), "contiguous", False, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", SEMI_PERSISTENT_CASES,
                         ids=[f"{_ids(s)}-{lay}" for s, lay, _, _ in SEMI_PERSISTENT_CASES])
def test_semi_persistent_experiment(monkeypatch, dtype, case):
    """BN_EXT_CUDA_SEMI_PERSISTENT=1: where it applies, train_forward and train_backward each run
    semi_persistent_rows_kernel alone; over many calls queued back to back with inputs that
    change, each result repeats to the bit (a barrier passed early, or counters not left at 0,
    would differ) and agrees with float64 and with the default's; the running statistics are
    updated once. Elsewhere (float64 too), the default's kernels and bits."""
    shape, layout, in32, in16 = case
    applies = in16 if dtype in (torch.bfloat16, torch.float16) else in32
    applies = applies and dtype != torch.float64
    x, dy, w, b = _training_case(shape, dtype, layout)
    clear_cuda_switches(monkeypatch)
    names = _kernels_run(lambda: train_ops(x, dy, w, b))
    default = train_ops(x, dy, w, b)
    monkeypatch.setenv("BN_EXT_CUDA_SEMI_PERSISTENT", "1")
    train_ops(x, dy, w, b)  # (the stream's counters made before the count)
    semi_names = _kernels_run(lambda: train_ops(x, dy, w, b))
    if not applies:
        assert sorted(semi_names) == sorted(names)
        assert same_bits(train_ops(x, dy, w, b), default)
        return
    assert len(semi_names) == 2, semi_names
    assert all("semi_persistent_rows_kernel" in n for n in semi_names), semi_names
    semi = train_ops(x, dy, w, b)
    assert_training_matches_float64(semi, x, dy, w, b, others=default)
    xs = [x * (1 + i / 8) for i in range(8)]
    torch.cuda.synchronize()
    rounds = [[train_ops(xi, dy, w, b) for xi in xs] for _ in range(2)]
    for first, second in zip(*rounds, strict=True):
        assert same_bits(first, second)
    stats = _training_forward_each_way(monkeypatch, "BN_EXT_CUDA_SEMI_PERSISTENT", x, w, b)
    assert int(stats["1"][-1]) == 5
    for ours, theirs in zip(stats["1"][:-1], stats["0"][:-1], strict=True):
        assert_close(ours, theirs, ours.dtype)  # y, mean, var and the running statistics


@pytest.mark.parametrize("channels", [16, 256], ids=["cooperative", "one-block"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_persistent_path_through_the_module(monkeypatch, layout, channels):
    """The module's training step with the persistent path: output, gradients and running stats
    as torch.nn.BatchNorm2d's. 256 contiguous channels (at least the SMs of an H100 or H200)
    take the one-block kernel, which updates the running statistics itself."""
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    ref, ours = make_pair(4, channels, DEV, torch.float32)
    run_steps(ref, ours, (8, channels, 12, 12), torch.float32, DEV, layout, steps=2, train=True,
              param_tol=torch.float32)


def test_persistent_path_falls_back_when_a_channel_does_not_fit(monkeypatch):
    """One channel of 2^25 values is more than the device holds on chip: the multi-pass kernels
    run, and the result is still right."""
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    x = make_input((1, 2, 1 << 25), torch.float32, DEV, seed=3)
    names = _kernels_run(lambda: ops.train_forward(x, None, None, 1e-5))
    assert not any("persistent" in n for n in names), names
    y, mean, var = ops.train_forward(x, None, None, 1e-5)
    v64, m64 = torch.var_mean(x.double(), [0, 2], correction=0)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=1e-6)


# ---- gradcheck / gradgradcheck on the GPU ---------------------------------------------------

def _grad_fn(training, C):
    rm = torch.randn(C, dtype=torch.float64, device=DEV)
    rv = torch.rand(C, dtype=torch.float64, device=DEV) + 0.5

    def f(x, w, b):
        return bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
    return f


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (6, 4), (3, 2, 5)], ids=_ids)
def test_gradcheck_cuda(training, layout, shape):
    x = _case_input(shape, layout, torch.float64, seed=5).requires_grad_()
    C = shape[1]
    w = (torch.rand(C, dtype=torch.float64, device=DEV) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, device=DEV).requires_grad_()
    f = _grad_fn(training, C)
    assert gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- determinism, graphs, streams, devices, synchronisation --------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (32, 64, 14, 14), (4096, 32)], ids=_ids)
def test_bitwise_deterministic(dtype, layout, shape):
    x = make_input(shape, dtype, DEV, layout, seed=7)
    dy = make_input(shape, dtype, DEV, layout, seed=8)
    C = shape[1]
    w = torch.rand(C, device=DEV) + 0.5
    b = torch.randn(C, device=DEV)

    def run():
        y, mean, var = ops.train_forward(x, w, b, 1e-5)
        s = ops.backward_reduce(dy, x, mean, var, w, 1e-5)
        dx, gw, gb = ops.train_backward(dy, x, mean, var, w, 1e-5)
        return (y, mean, var, dx, gw, gb) + tuple(s)

    first = run()
    for _ in range(3):
        again = run()
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def _kernel_spans(fn):
    """(name, start, end) in microseconds of each CUDA kernel that fn launches, by start."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(spans, key=lambda s: s[1])


@pytest.mark.skipif(torch.cuda.get_device_capability() < (9, 0) if torch.cuda.is_available()
                    else True, reason="programmatic dependent launch needs sm_90")
def test_dependent_launches_do_overlap(monkeypatch):
    """On sm_90 or later, by default: some kernel of a multi-pass training op starts before the
    kernel before it has ended (the finalize pass or the map during the reduction's last
    blocks), in at least one of five calls; with BN_EXT_CUDA_PDL=0, none does. Else the
    launches would not be dependent ones at all (a build without sm_90 code, or a gate that
    never opens), and the bits tests above would pass without testing anything."""
    x, dy, w, b = _training_case((32, 256, 56, 56), torch.float32, "contiguous")
    clear_cuda_switches(monkeypatch)
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "0")
    ops.train_forward(x, w, b, 1e-5)  # warm-up

    def overlaps():
        spans = _kernel_spans(lambda: [ops.train_forward(x, w, b, 1e-5) for _ in range(5)])
        return sum(later[1] < earlier[2] for earlier, later in zip(spans, spans[1:]))

    assert overlaps() > 0
    monkeypatch.setenv("BN_EXT_CUDA_PDL", "0")
    assert overlaps() == 0


GRAPH_PATHS = {"multipass": {"BN_EXT_CUDA_PERSISTENT": "0"},
               "persistent": {"BN_EXT_CUDA_PERSISTENT": "1"},
               "fold": {"BN_EXT_CUDA_PERSISTENT": "0", "BN_EXT_CUDA_FOLD_FINALIZE": "1"},
               "staged": {"BN_EXT_CUDA_PERSISTENT": "0"}}


@pytest.mark.parametrize("path", list(GRAPH_PATHS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_graph_capture_and_replay(monkeypatch, layout, path):
    """A training step captured once and replayed on new data; with persistent=1 the
    single-pass kernels (a cooperative launch) are what is captured; with "fold", the multi-pass
    path under BN_EXT_CUDA_FOLD_FINALIZE=1 on a shape whose contiguous reductions stage (the
    captured launches get counters of their own, zeroed in the graph); with "staged", the
    multi-pass path on that shape (its warm-up calls overlap launches, captured ones do not)."""
    clear_cuda_switches(monkeypatch)
    for var, value in GRAPH_PATHS[path].items():
        monkeypatch.setenv(var, value)
    torch.manual_seed(0)
    shape = (8, 16, 64, 64) if path in ("fold", "staged") else (8, 16, 12, 10)
    model = bn_ext.BatchNorm2d(16, momentum=None, device=DEV)  # momentum None: 1/nbt on device
    model2 = bn_ext.BatchNorm2d(16, momentum=0.1, device=DEV)
    with torch.no_grad():
        model.weight.uniform_(0.5, 1.5)
        model.bias.uniform_(-1, 1)
    static_x = make_input(shape, torch.float32, DEV, layout).requires_grad_()
    static_gy = make_input(shape, torch.float32, DEV, layout, seed=1)

    def step(m1, m2, x, gy):
        y = m2(m1(x))
        y.backward(gy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up, as torch.cuda.graph asks
            step(model, model2, static_x, static_gy)
    torch.cuda.current_stream().wait_stream(side)
    for m in (model, model2):
        m.zero_grad(set_to_none=True)
    static_x.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(model, model2, static_x, static_gy)

    ref, ref2 = copy.deepcopy(model), copy.deepcopy(model2)  # capture ran nothing
    for i in range(4):
        x = make_input(shape, torch.float32, DEV, layout, seed=10 + i)
        gy = make_input(shape, torch.float32, DEV, layout, seed=20 + i)
        with torch.no_grad():
            static_x.copy_(x)
            static_gy.copy_(gy)
        graph.replay()
        xr = x.clone().requires_grad_()
        ref.zero_grad(set_to_none=True)
        ref2.zero_grad(set_to_none=True)
        yr = step(ref, ref2, xr, gy)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, yr)
        torch.testing.assert_close(static_x.grad, xr.grad)
        torch.testing.assert_close(model.weight.grad, ref.weight.grad)
        torch.testing.assert_close(model.bias.grad, ref.bias.grad)
        for m, r in ((model, ref), (model2, ref2)):
            torch.testing.assert_close(m.running_mean, r.running_mean)
            torch.testing.assert_close(m.running_var, r.running_var)
            assert torch.equal(m.num_batches_tracked, r.num_batches_tracked)
    assert model.num_batches_tracked.item() == 3 + 4


def test_eval_forward_in_cuda_graph():
    model = bn_ext.BatchNorm2d(8, device=DEV).eval()
    with torch.no_grad():
        model.running_mean.uniform_(-1, 1)
        model.running_var.uniform_(0.5, 2)
    static_x = make_input((4, 8, 9, 9), torch.float16, DEV)
    model.half()
    with torch.no_grad():
        model(static_x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        x = make_input((4, 8, 9, 9), torch.float16, DEV, seed=3)
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_y, model(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_default_stream(layout):
    """Every kernel must run on the current stream: the input is written on a side stream after a
    long sleep, so a kernel on any other stream would read it too early."""
    shape = (16, 32, 24, 24)
    src = make_input(shape, torch.float32, DEV, layout)
    gsrc = make_input(shape, torch.float32, DEV, layout, seed=1)
    w = torch.rand(32, device=DEV) + 0.5
    b = torch.randn(32, device=DEV)
    expected = ops.train_forward(src, w, b, 1e-5)
    expected_bwd = ops.train_backward(gsrc, src, expected[1], expected[2], w, 1e-5)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    x = torch.zeros_like(src)
    gy = torch.zeros_like(gsrc)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        gy.copy_(gsrc)
        got = ops.train_forward(x, w, b, 1e-5)
        got_bwd = ops.train_backward(gy, x, got[1], got[2], w, 1e-5)
    s.synchronize()
    for a, e in zip(got + got_bwd, expected + expected_bwd):
        assert torch.equal(a, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_non_default_device():
    x = make_input((4, 6, 10, 10), torch.float32, "cuda:1", "channels_last")
    m = bn_ext.BatchNorm2d(6, device="cuda:1")
    ref = torch.nn.BatchNorm2d(6)
    with torch.cuda.device(0):
        xo = x.clone().requires_grad_()
        y = m(xo)
        y.sum().backward()
    assert y.device == torch.device("cuda:1") and xo.grad.device == torch.device("cuda:1")
    xr = x.cpu().requires_grad_()
    yr = ref(xr)
    yr.sum().backward()
    assert_close(y.cpu(), yr, torch.float32)
    assert_close(xo.grad.cpu(), xr.grad, torch.float32)
    assert_close(m.running_var.cpu(), ref.running_var, torch.float32)


def test_no_host_synchronisation():
    """torch raises on any synchronising CUDA call (e.g. .item()) under sync debug mode."""
    m = bn_ext.BatchNorm2d(16, momentum=None, device=DEV)
    x = make_input((8, 16, 10, 10), torch.float32, DEV).requires_grad_()
    gy = make_input((8, 16, 10, 10), torch.float32, DEV, seed=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for train in (True, False):
            m.train(train)
            y = m(x)
            y.backward(gy)
            mean, var = ops.batch_stats(x.detach())
            ops.backward_reduce(gy, x.detach(), mean, var, m.weight.detach(), 1e-5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- 64-bit indexing -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements_bf16(layout):
    """2^31 + 2^7 bfloat16 elements (about 4.3 GB per tensor): the 64-bit index path."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip("needs about 30 GB of free GPU memory")
    N, C, S = 4, 2, (1 << 28) + 16
    g = torch.Generator(device=DEV).manual_seed(0)
    if layout == "contiguous":
        x = torch.randn((N, C, S), device=DEV, dtype=torch.bfloat16, generator=g)
    else:
        x = torch.randn((N, S, C), device=DEV, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    assert x.numel() > 2**31
    x.mul_(2).add_(1)
    w = torch.tensor([0.5, 2.0], device=DEV)
    b = torch.tensor([1.0, -1.0], device=DEV)
    y, mean, var = ops.train_forward(x, w, b, 1e-5)
    for c in range(C):
        xc = x[:, c].float()
        vr, mr = torch.var_mean(xc, correction=0)
        torch.testing.assert_close(mean[c], mr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(var[c], vr, rtol=1e-4, atol=1e-4)
        del xc
    invstd = (var + 1e-5).rsqrt()
    # The last elements sit beyond index 2^31: check the tail and a head slice of each channel.
    for sl in (slice(0, 4096), slice(S - 4096, S)):
        xs = x[:, :, sl].float()
        yr = (xs - mean[None, :, None]) * (w * invstd)[None, :, None] + b[None, :, None]
        torch.testing.assert_close(y[:, :, sl].float(), yr, rtol=2e-2, atol=3e-2)
    del y
    dy = torch.ones_like(x)
    dx, gw, gb = ops.train_backward(dy, x, mean, var, w, 1e-5)
    torch.testing.assert_close(gb, torch.full((C,), float(N * S), device=DEV), rtol=1e-4, atol=0)
    # dy constant: dx = 0 exactly up to rounding of the coefficients.
    assert dx[:, :, -4096:].float().abs().max().item() < 1e-2
    assert dx[:, :, :4096].float().abs().max().item() < 1e-2
