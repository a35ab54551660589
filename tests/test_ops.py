"""torch.library.opcheck on every op, the op split against references, and torch.compile."""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import DEVICES, assert_same_as_split_path, make_input, run_python

ops = torch.ops.bn_ext


def _case(device, dtype, layout, shape=(4, 3, 5, 6), param_dtype=None):
    x = make_input(shape, dtype, device, layout)
    C = shape[1]
    pd = param_dtype or dtype
    md = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, device=device, dtype=pd) + 0.5
    b = torch.randn(C, device=device, dtype=pd)
    mean = torch.randn(C, device=device, dtype=md)
    var = torch.rand(C, device=device, dtype=md) + 0.5
    g = make_input(shape, dtype, device, "contiguous", seed=3)
    return x, w, b, mean, var, g


def _op_samples(device, dtype, layout):
    x, w, b, mean, var, g = _case(device, dtype, layout)
    md = mean.dtype
    count = torch.tensor(float(x.numel() // x.shape[1]), device=device, dtype=md)
    nbt = torch.tensor(3, device=device)
    return [
        (ops.batch_stats, (x,)),
        (ops.batch_stats, (x,), {"dtype": torch.float64}),
        (ops.normalize, (x, mean, var, w, b, 1e-5)),
        (ops.normalize, (x, mean, var, None, None, 1e-5)),
        (ops.train_forward, (x, w, b, 1e-5)),
        (ops.train_forward, (x, w, b, 1e-5, mean.clone(), var.clone(), nbt.clone(), 0.1)),
        (ops.train_forward, (x, None, None, 1e-5, mean.clone(), var.clone(), nbt.clone(), None)),
        (ops.running_stats_update, (mean.clone(), var.clone(), nbt, mean, var, count, 0.1)),
        (ops.running_stats_update, (mean.clone(), var.clone(), nbt.clone(), mean, var, count, None)),
        (ops.backward_reduce, (g, x, mean, var, w, 1e-5)),
        (ops.backward_input, (g, x, mean, var, w, mean, var, count, 1e-5)),
        (ops.backward_input, (g, x, mean, var, None, None, None, None, 1e-5)),
        (ops.normalize_backward, (g, x, mean, var, w, 1e-5)),
        (ops.normalize_backward, (g, x, mean, var, None, 1e-5)),
        (ops.train_backward, (g, x, mean, var, w, 1e-5)),
        (ops._differentiable_train_backward, (g, x, w, 1e-5)),
        (ops._differentiable_train_backward, (g, x, None, 1e-5)),
        (ops._differentiable_normalize_backward, (g, x, mean, var, w, 1e-5)),
        (ops._differentiable_normalize_backward, (g, x, mean, var, None, 1e-5)),
        # the Autograd kernels (opcheck's autograd registration and AOT checks take gradients)
        (ops.normalize, _requiring_grad(x, mean, var, w, b) + (1e-5,)),
        (ops.train_forward, _requiring_grad(x, w, b) + (1e-5, mean.clone(), var.clone(),
                                                         nbt.clone(), 0.1)),
    ]


def _requiring_grad(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


@pytest.mark.skipif(os.environ.get("BN_EXT_CUDA_EMULATED") == "1",
                    reason="the emulator's build is made without setup.py's flags")
def test_cpu_kernels_built_with_openmp():
    """setup.py leaves -fopenmp out, with a warning, where the compiler cannot build an OpenMP
    program: at::parallel_for then runs on one thread. CI's compilers can, so a probe that
    wrongly failed would leave every CI build on one thread, silently but for this test."""
    assert bn_ext.ops.built_with_openmp(), (
        "this bn_ext was built without OpenMP (its compiler could not build an OpenMP program "
        "with -fopenmp): its CPU kernels run on one thread")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(device, dtype, layout):
    for op, args, *kwargs in _op_samples(device, dtype, layout):
        torch.library.opcheck(op, args, *kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ops_against_float64_reference(device, layout):
    x, w, b, _, _, g = _case(device, torch.float32, layout)
    xd, gd, wd, bd = x.double(), g.double(), w.double(), b.double()
    dims = [0, 2, 3]
    n = x.numel() // x.shape[1]

    def pc(t):
        return t.view(1, -1, 1, 1)
    mean, var = ops.batch_stats(x)
    torch.testing.assert_close(mean.double(), xd.mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), xd.var(dims, unbiased=False), rtol=1e-5, atol=1e-6)
    y = ops.normalize(x, mean, var, w, b, 1e-5)
    yd = (xd - pc(mean.double())) / (pc(var.double()) + 1e-5).sqrt() * pc(wd) + pc(bd)
    torch.testing.assert_close(y.double(), yd, rtol=1e-5, atol=1e-5)
    assert y.stride() == x.stride()
    sum_dy, sum_dy_xmu, gw, gb = ops.backward_reduce(g, x, mean, var, w, 1e-5)
    xmu = xd - pc(mean.double())
    torch.testing.assert_close(sum_dy.double(), gd.sum(dims), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dy_xmu.double(), (gd * xmu).sum(dims), rtol=1e-5, atol=1e-4)
    invstd = (var.double() + 1e-5).rsqrt()
    torch.testing.assert_close(gw.double(), (gd * xmu).sum(dims) * invstd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, sum_dy)
    count = torch.tensor(float(n), device=device)
    dx = ops.backward_input(g, x, mean, var, w, sum_dy, sum_dy_xmu, count, 1e-5)
    dxd = pc(wd * invstd) * (gd - pc(sum_dy.double()) / n
                             - xmu * pc(invstd ** 2 * sum_dy_xmu.double()) / n)
    torch.testing.assert_close(dx.double(), dxd, rtol=1e-5, atol=1e-5)
    dx2, gw2, gb2 = ops.train_backward(g, x, mean, var, w, 1e-5)
    for fused, split in ((dx2, dx), (gw2, gw), (gb2, gb)):
        assert_same_as_split_path(fused, split, torch.float32)
    y2, mean2, var2 = ops.train_forward(x, w, b, 1e-5)
    for fused, split in ((mean2, mean), (var2, var), (y2, y)):
        assert_same_as_split_path(fused, split, torch.float32)
    # eval's backward: dx = dy * w * invstd, with backward_reduce's grad_weight and grad_bias,
    # to the bit (the same sums and coefficients, whether or not the pass is fused)
    dx3, gw3, gb3 = ops.normalize_backward(g, x, mean, var, w, 1e-5)
    torch.testing.assert_close(dx3.double(), gd * pc(wd * invstd), rtol=1e-5, atol=1e-5)
    assert dx3.stride() == x.stride()
    eval_dx = ops.backward_input(g, x, mean, var, w, None, None, None, 1e-5)
    for fused, split in ((dx3, eval_dx), (gw3, gw), (gb3, gb)):
        assert torch.equal(fused, split)


# normalize_backward's paths: NCHW with enough channels and channels-last rows fused (dx written
# while the reduced data is in cache); few NCHW channels, few channels-last rows (32, 512) and C
# with a flat period split; each must give backward_input's and backward_reduce's bits. In a
# subprocess too with every pass streaming its output (BN_EXT_CPU_STREAM_MB=0, read once per
# process), which takes the fused NCHW path's line-aligned tiles, the split rule for bf16/fp16
# short runs, and the fused long runs (2x16x48x48) of bf16/fp16 beside it.
_EVAL_BACKWARD_CASES = [((8, 256, 7, 7), "contiguous"), ((4, 64, 20, 20), "contiguous"),
                        ((2, 16, 48, 48), "contiguous"), ((2, 3, 9, 9), "contiguous"),
                        ((8, 256, 7, 7), "channels_last"), ((16, 64, 24, 24), "channels_last"),
                        ((4, 3, 9, 9), "channels_last"), ((600, 96), "contiguous"),
                        ((32, 512), "contiguous"), ((64, 100), "contiguous"),
                        ((4, 40, 3, 5, 5), "channels_last")]


def _eval_backward_mismatches(device):
    found = []
    for shape, layout in _EVAL_BACKWARD_CASES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            md = torch.float64 if dtype == torch.float64 else torch.float32
            x = make_input(shape, dtype, device, layout, seed=1)
            g = make_input(shape, dtype, device, layout, seed=2)
            C = shape[1]
            mean = torch.randn(C, device=device, dtype=md)
            var = torch.rand(C, device=device, dtype=md) + 0.5
            for w in (torch.randn(C, device=device, dtype=md), None):
                got = ops.normalize_backward(g, x, mean, var, w, 1e-5)
                want = (ops.backward_input(g, x, mean, var, w, None, None, None, 1e-5),
                        *ops.backward_reduce(g, x, mean, var, w, 1e-5)[2:])
                if not all(torch.equal(a, b) for a, b in zip(got, want)) or \
                        got[0].stride() != want[0].stride():
                    found.append(f"{shape} {layout} {dtype} weight={w is not None}")
    return found


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_backward_is_the_two_ops_to_the_bit(device):
    assert _eval_backward_mismatches(device) == []
    if device == "cpu":  # one thread: tiles and blocks always outnumber the threads
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert _eval_backward_mismatches(device) == []
        finally:
            torch.set_num_threads(threads)


def test_normalize_backward_streaming_is_the_two_ops_to_the_bit():
    here = os.path.dirname(os.path.abspath(__file__))
    proc = run_python(f"import sys; sys.path.insert(0, {here!r}); import test_ops; "
                      "print(test_ops._eval_backward_mismatches('cpu'))", timeout=600,
                      BN_EXT_CPU_STREAM_MB="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# Inputs whose first elements are unlike the rest of their channel, in a channel of N(5, 0.01):
# a border of zeros along the top row or the left column of image 0 (the kernels' shift samples
# come from image 0). The kernels sum x - k for a shift k taken from samples of the channel; a k
# set by such a border would amplify the rounding of the float sums by 1 + (k - mean)^2 / var (up
# to ~1e4x here: var ~2e-3 against a 5.0 offset). (A whole first image unlike the rest does set
# k, by design, for an amplification of up to ~N: bn_ext.h.)
def _unrepresentative_start(kind, shape):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.01 + 5.0
    if kind == "top_row":
        x[0, :, 0, :32] = 0.0
    else:
        x[0, :, :, 0] = 0.0
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", ["0", "1"], ids=["multipass", "persistent"])
@pytest.mark.parametrize("kind", ["top_row", "left_column"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (32, 16, 16, 16), (8, 4, 13, 13)],
                         ids=["8x3x64x64", "32x16x16x16", "8x4x13x13"])
def test_batch_stats_shift_not_set_by_the_first_elements(monkeypatch, device, persistent, kind,
                                                           layout, shape):
    if device == "cpu" and persistent == "1":
        pytest.skip("the single-pass path is CUDA's")
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", persistent)
    xd = _unrepresentative_start(kind, shape)
    x = xd.float().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xd = x.double()  # the float32 values, exactly
    vr, mr = torch.var_mean(xd, [0, 2, 3], correction=0)
    for mean, var in (ops.batch_stats(x), ops.train_forward(x, None, None, 1e-5)[1:]):
        # A float32 sum of well-centred values: a few ulps of var, whatever the first elements.
        torch.testing.assert_close(var.double(), vr, rtol=2e-6, atol=0)
        torch.testing.assert_close(mean.double(), mr, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_batch_stats_float64_statistics(device, dtype, layout):
    """dtype=torch.float64: the kernels' double mean k + sum(x - k) / n and var, unrounded, so
    that rounding them to the math type gives the default call's statistics to the bit, and the
    mean of channels far from 0 is exact to the float sums' error (~1e-7 std), not to float32's
    rounding of the mean itself (up to 4.9e-4 at 1e4). (On CUDA batch_stats is always the
    multi-pass reduction.)"""
    # (offset scale, std): float16's largest is 65504, and bfloat16 has steps of 64 near 1e4
    scale, std = {torch.float16: (1 / 16, 1.0), torch.bfloat16: (1.0, 64.0)}.get(dtype, (1, 1))
    offsets = torch.tensor([1e4, -1e4, 3e3, 0.0], dtype=torch.float64) * scale
    shape = (6, 4, 7, 9)
    sliced = layout == "sliced"
    big = shape[:3] + (2 * shape[3],) if sliced else shape
    x = make_input(big, torch.float64, device, "contiguous" if sliced else layout, mean=0.0,
                   std=std)
    x = (x + offsets.to(device).view(1, -1, 1, 1)).to(dtype)
    if sliced:
        x = x[..., ::2]
        assert not x.is_contiguous() and x.shape == shape
    want_mean, want_var = ops.batch_stats(x)
    mean, var = ops.batch_stats(x, dtype=torch.float64)
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == var.shape == (4,)
    assert torch.equal(mean.to(want_mean.dtype), want_mean)
    assert torch.equal(var.to(want_var.dtype), want_var)
    assert torch.equal(ops.batch_stats(x, dtype=want_mean.dtype)[0], want_mean)
    ref_var, ref_mean = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    # (float64 input: the reference's own sums of values near 1e4 err by ~1e-12 and more)
    tol = 1e-6 if dtype != torch.float64 else 1e-10
    torch.testing.assert_close(var, ref_var, rtol=tol, atol=0)
    mean_err = (mean - ref_mean).abs() / ref_var.sqrt()
    assert mean_err.max().item() < tol, mean_err
    if dtype != torch.float64:  # the point of it: the default, rounded mean is off by more
        rounded_err = (want_mean.double() - ref_mean).abs() / ref_var.sqrt()
        assert rounded_err.max().item() > 3 * tol, rounded_err
    empty = ops.batch_stats(x[:0], dtype=torch.float64)
    for t in empty:
        assert t.dtype == torch.float64 and torch.equal(t, torch.zeros(4, device=device,
                                                                         dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_stats_refuses_other_statistics_dtypes(device, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = make_input((4, 3, 5), dtype, device)
    bad = [torch.float16, torch.bfloat16, torch.int64, torch.complex64]
    if dtype == torch.float64:
        bad.append(torch.float32)
    mode = FakeTensorMode()
    for d in bad:
        for where, arg in (("op", x), ("fake", mode.from_tensor(x))):
            with mode if where == "fake" else torch.no_grad():
                with pytest.raises(ValueError, match=r"^bn_ext\.batch_stats: dtype must be "
                                                     r"None, float64 or the input's math type"):
                    ops.batch_stats(arg, dtype=d)


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_update_semantics(device):
    mean = torch.tensor([1.0, 2.0], device=device)
    var = torch.tensor([4.0, 8.0], device=device)
    count = torch.tensor(5.0, device=device)
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    nbt = torch.tensor(0, device=device)
    ops.running_stats_update(rm, rv, nbt, mean, var, count, 0.25)
    torch.testing.assert_close(rm, 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 + 0.25 * var * 5 / 4)
    assert nbt.item() == 1
    # momentum=None: cumulative average, factor 1 / num_batches_tracked after the increment
    ops.running_stats_update(rm, rv, nbt, mean * 3, var, count, None)
    assert nbt.item() == 2
    torch.testing.assert_close(rm, 0.5 * (0.25 * mean) + 0.5 * mean * 3)
    # bfloat16 buffers are updated in their own dtype
    rmb = torch.zeros(2, device=device, dtype=torch.bfloat16)
    rvb = torch.ones(2, device=device, dtype=torch.bfloat16)
    ops.running_stats_update(rmb, rvb, None, mean, var, count, 1.0)
    assert rmb.dtype == torch.bfloat16
    torch.testing.assert_close(rmb.float(), mean)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_one_value_per_channel_makes_running_var_nan_as_torch(device, layout, momentum):
    """A batch of one value per channel (the modules refuse it; the ops take it): the unbiased
    variance is 0 * 1 / 0, so running_var becomes NaN, as torch.batch_norm's does, and the
    running mean moves to the value."""
    x = make_input((1, 3, 1, 1), torch.float32, device, layout)
    stats = (torch.randn(3, device=device), torch.rand(3, device=device) + 0.5)
    rm, rv = (t.clone() for t in stats)
    nbt = torch.tensor(2, device=device)
    ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, momentum)
    rm_ref, rv_ref = (t.clone() for t in stats)
    torch.batch_norm(x, None, None, rm_ref, rv_ref, True, 1 / 3 if momentum is None else momentum,
                     1e-5, False)
    torch.testing.assert_close(rm, rm_ref)
    assert torch.isnan(rv).all() and torch.isnan(rv_ref).all()
    rm, rv = (t.clone() for t in stats)
    ops.running_stats_update(rm, rv, None, x.flatten(), torch.zeros(3, device=device),
                             torch.tensor(1.0, device=device), 0.1)
    torch.testing.assert_close(rm, 0.9 * stats[0] + 0.1 * x.flatten())
    assert torch.isnan(rv).all()


def _running_buffers(kind, C, device, dtype):
    """(running_mean, running_var, the tensors they view) for one kind of buffer."""
    g = torch.Generator().manual_seed(7)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "math":  # the kernel updates these in place
        rm, rv = torch.randn(C, generator=g, dtype=md), torch.rand(C, generator=g, dtype=md) + 1
        rm, rv = rm.to(device), rv.to(device)
        return rm, rv, (rm, rv)
    if kind == "input_dtype":  # bf16 buffers with bf16 input: updated in float32, written back
        rm = torch.randn(C, generator=g).to(dtype).to(device)
        rv = (torch.rand(C, generator=g) + 1).to(dtype).to(device)
        return rm, rv, (rm, rv)
    # every other element of larger tensors: non-contiguous views, written back through
    big_m = torch.randn(2 * C, generator=g, dtype=md).to(device)
    big_v = (torch.rand(2 * C, generator=g, dtype=md) + 1).to(device)
    return big_m[::2], big_v[::2], (big_m, big_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", ["0", "1"], ids=["multipass", "persistent"])
@pytest.mark.parametrize("dtype,kind", [(torch.float32, "math"), (torch.float64, "math"),
                                        (torch.bfloat16, "math"), (torch.bfloat16, "input_dtype"),
                                        (torch.float32, "strided")],
                         ids=["fp32", "fp64", "bf16-fp32-buffers", "bf16-bf16-buffers",
                              "fp32-strided-buffers"])
@pytest.mark.parametrize("momentum", [0.25, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_forward_updates_running_stats(monkeypatch, device, persistent, dtype, kind,
                                             momentum, layout):
    """train_forward's own update (inside the forward's kernels where the backend can) against
    running_stats_update's formula, in float64 from the batch statistics it returned."""
    if device == "cpu" and persistent == "1":
        pytest.skip("the single-pass path is CUDA's")
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", persistent)
    shape = (5, 6, 7, 3)
    x = make_input(shape, dtype, device, layout)
    n = x.numel() // shape[1]
    rm, rv, owners = _running_buffers(kind, shape[1], device, dtype)
    rm0, rv0 = rm.double().clone(), rv.double().clone()
    owners0 = [t.clone() for t in owners]
    nbt = torch.tensor(3, device=device)
    _, mean, var = ops.train_forward(x, None, None, 1e-5, rm, rv, nbt, momentum)
    assert nbt.item() == 4
    m = 0.25 if momentum is not None else 1 / 4
    want_m = (1 - m) * rm0 + m * mean.double()
    want_v = (1 - m) * rv0 + m * var.double() * n / (n - 1)
    if kind == "input_dtype":  # rounded once, from the float32 result
        want_m, want_v = want_m.float().to(dtype), want_v.float().to(dtype)
        assert torch.equal(rm, want_m) and torch.equal(rv, want_v)
    else:
        tol = dict(rtol=1e-6, atol=1e-7) if rm.dtype == torch.float32 else dict(rtol=1e-14, atol=0)
        torch.testing.assert_close(rm.double(), want_m, **tol)
        torch.testing.assert_close(rv.double(), want_v, **tol)
    if kind == "strided":  # the elements between the buffer's are left alone
        for t, t0 in zip(owners, owners0):
            assert torch.equal(t[1::2], t0[1::2])
    # No num_batches_tracked with a fixed momentum: the same update from the same buffers.
    if momentum is not None:
        rm2, rv2 = rm.clone(), rv.clone()
        rm.copy_(rm0.to(rm.dtype))
        rv.copy_(rv0.to(rv.dtype))
        _, mean2, var2 = ops.train_forward(x, None, None, 1e-5, rm, rv, None, momentum)
        assert torch.equal(mean2, mean) and torch.equal(var2, var)
        assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn_ext.BatchNorm2d(8)
        self.bn1 = bn_ext.BatchNorm1d(8, momentum=None)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1(y.mean((2, 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_no_graph_break(device):
    torch.manual_seed(0)
    eager = _Net().to(device)
    compiled_model = _Net().to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    # two training steps, then eval with grad (frozen statistics, trained parameters:
    # normalize's C++ autograd)
    for training in (True, True, False):
        eager.train(training)
        compiled_model.train(training)
        x = torch.randn(4, 3, 6, 6, device=device)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye)
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(c, b, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor(device):
    """The default backend, as users run it; also counts graph breaks explicitly."""
    import torch._dynamo
    torch._dynamo.reset()
    model = _Net().to(device)
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 6, 6, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ref = _Net().to(device)
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes_one_graph(device):
    """With dynamic=True the graph of the first call serves every later batch and spatial size:
    the fake kernels' checks on symbolic sizes guard only on the channel count. Forward, backward
    and buffers as torch's. (The first call compiles twice, for torch's BatchNorm2d too: dynamo
    traces eps and momentum as symbolic floats, then restarts with them specialized.)"""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    ours, ref = bn_ext.BatchNorm2d(3).to(device), torch.nn.BatchNorm2d(3).to(device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter, dynamic=True, fullgraph=True)
    first = None
    for n, h in [(2, 5), (3, 7), (5, 4)]:
        x = torch.randn(n, 3, h, h + 1, device=device)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = compiled(xo), ref(xr)
        torch.testing.assert_close(yo, yr)
        yo.square().sum().backward()
        yr.square().sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad)
        first = first or counter.frame_count
    torch.testing.assert_close(ours.running_var, ref.running_var)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert counter.frame_count == first, "a new batch or spatial size recompiled"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_runs_the_ops(training):
    """torch.export keeps bn_ext's ops in the graph; the exported program computes what the
    module does, and in training records the running statistics' updates as buffer mutations."""
    torch.manual_seed(0)
    model = _Net().train(training)
    ref = _Net().train(training)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    want = "bn_ext.train_forward.default" if training else "bn_ext.normalize.default"
    assert want in targets, targets
    if training:  # functionalized (run_decompositions): the op's writes become buffer outputs
        mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
        assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= mutated
    exported = ep.module()
    torch.testing.assert_close(exported(x), ref(x))
    torch.testing.assert_close(exported.bn.running_mean, ref.bn.running_mean)
    assert exported.bn1.num_batches_tracked.item() == ref.bn1.num_batches_tracked.item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_dynamic_batch_and_spatial_sizes(training):
    """Exported with the batch and spatial sizes dynamic, the program runs other sizes and
    computes what torch's layer does."""
    from torch.export import Dim
    ours = bn_ext.BatchNorm2d(3).train(training)
    ref = torch.nn.BatchNorm2d(3).train(training)
    dims = {0: Dim("n", min=2), 2: Dim("h"), 3: Dim("w")}
    ep = torch.export.export(ours, (torch.randn(4, 3, 5, 6),), dynamic_shapes={"input": dims})
    exported = ep.module()
    for shape in [(7, 3, 9, 4), (2, 3, 3, 11)]:
        x = torch.randn(shape)
        torch.testing.assert_close(exported(x), ref(x))
    torch.testing.assert_close(exported.running_var, ref.running_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aot_inductor_package(tmp_path, training):
    """An AOTInductor package of an exported model calls bn_ext's ops (the loading process must
    have imported bn_ext, as this one has): in eval normalize with the running statistics, in
    training train_forward with the batch's."""
    torch.manual_seed(0)
    model = _Net()
    model(torch.randn(4, 3, 6, 6))  # running statistics away from their initial values
    model.train(training)
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(copy.deepcopy(model), (x,))
    assert any(f"bn_ext.{'train_forward' if training else 'normalize'}" in str(n.target)
               for n in ep.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-5)


def _non_dense_inputs():
    # dense in no order once sliced: the output takes torch.empty_like's strides (dense, in the
    # input's order of strides), which is what the fake kernels return
    yield "3d-permuted-sliced", torch.randn(6, 5, 4).transpose(0, 2)[::2]
    yield "4d-channels_last-sliced", torch.randn(4, 6, 5, 3).permute(0, 3, 1, 2)[:, :, ::2]
    yield "4d-CNHW-sliced", torch.randn(3, 4, 5, 6).transpose(0, 1)[..., ::2]
    yield "4d-NHCW-sliced", torch.randn(4, 5, 3, 6).transpose(1, 2)[:, :, ::2]
    yield "5d-permuted-sliced", torch.randn(2, 4, 3, 5, 6).permute(0, 2, 4, 1, 3)[..., ::2, :]


@pytest.mark.parametrize("name,x", list(_non_dense_inputs()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_output_strides_of_non_dense_inputs_as_empty_like(name, x):
    C = x.shape[1]
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    g = torch.randn(x.shape)
    expected = torch.empty_like(x).stride()
    assert expected != x.stride()  # x is not dense
    outputs = [ops.normalize(x, mean, var, w, b, 1e-5), ops.train_forward(x, w, b, 1e-5)[0],
               ops.backward_input(g, x, mean, var, w, None, None, None, 1e-5),
               ops.normalize_backward(g, x, mean, var, w, 1e-5)[0],
               ops.train_backward(g, x, mean, var, w, 1e-5)[0]]
    for out in outputs:
        assert out.stride() == expected
    y = ops.normalize(x, mean, var, w, b, 1e-5)
    torch.testing.assert_close(y, (x - mean.view(1, -1, *[1] * (x.dim() - 2)))
                               * ((var + 1e-5).rsqrt() * w).view(1, -1, *[1] * (x.dim() - 2))
                               + b.view(1, -1, *[1] * (x.dim() - 2)))
    for op, args in [(ops.normalize, (x, mean, var, w, b, 1e-5)),
                     (ops.train_forward, (x, w, b, 1e-5)),
                     (ops.backward_input, (g, x, mean, var, w, None, None, None, 1e-5)),
                     (ops.normalize_backward, (g, x, mean, var, w, 1e-5)),
                     (ops.train_backward, (g, x, mean, var, w, 1e-5))]:
        torch.library.opcheck(op, args)


# ---- the fake kernels refuse what the ops refuse ---------------------------------------------
#
# A random call of a random op, each argument drawn right or wrong in one of the ways a caller
# gets it wrong, is made three times: on CPU tensors (the C++ op and its checks), on meta tensors
# and under FakeTensorMode (the fake kernels, bn_ext/_fake.py). All three must raise the same
# type with the same opening words (op, argument, check), or all three return the same shapes,
# dtypes and strides.

_VECTOR_ARGS = {"mean", "var", "weight", "bias", "running_mean", "running_var", "sum_dy",
                "sum_dy_xmu"}
# Per argument: the right kinds, then the wrong ones. A call gets up to two wrong arguments, so
# that checks late in an op's order are reached as often as early ones.
_KINDS = {
    "input": (["ok"], ["1d", "int64"]),
    "vector": (["ok"], ["fewer", "more", "float64", "bfloat16", "float16", "int64", "row",
                        "expanded", "inference"]),
    "grad_out": (["ok"], ["shape", "dtype"]),
    "count": (["ok"], ["two", "int64"]),
    "num_batches_tracked": (["ok", None, "float", "int32"], ["bool", "two", "expanded",
                                                              "inference"]),
    "eps": ([1e-5, 0.0], [-1e-3]),
    "momentum": ([0.1, None], []),
    # batch_stats' statistics dtype ("math": the input's math type)
    "dtype": ([None, torch.float64, "math"], [torch.float16, torch.bfloat16, torch.int64]),
}


def _schema_args(name):
    return getattr(ops, name).default._schema.arguments


_OPS = ["batch_stats", "normalize", "train_forward", "running_stats_update", "backward_reduce",
        "backward_input", "normalize_backward", "train_backward"]


@st.composite
def _op_calls(draw):
    name = draw(st.sampled_from(_OPS))
    wrong = draw(st.sets(st.sampled_from([a.name for a in _schema_args(name)]), max_size=2))
    return (name,) + _draw_arguments(draw, name, wrong)


def _draw_arguments(draw, name, wrong):
    """(shape, input dtype, kind of each argument) for a call of op `name`, the arguments in
    `wrong` of a wrong kind."""
    kinds = {}
    for a in _schema_args(name):
        right, bad = _KINDS["vector" if a.name in _VECTOR_ARGS else a.name]
        if isinstance(a.type, torch.OptionalType) and None not in right:
            right = right + [None]
        kinds[a.name] = draw(st.sampled_from(bad if a.name in wrong and bad else right))
    shape = (draw(st.integers(0, 3)), *[draw(st.integers(1, 3))
                                       for _ in range(draw(st.integers(1, 3)))])
    if kinds.get("input") == "1d":
        shape = shape[:1]
    x_dtype = torch.int64 if kinds.get("input") == "int64" else draw(
        st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    return shape, x_dtype, kinds


def _op_args(name, shape, x_dtype, kinds, device):
    """The call's positional and keyword arguments, made afresh on `device` (the op may write to
    them)."""
    C = shape[1] if len(shape) > 1 else 1
    md = torch.float64 if x_dtype == torch.float64 else torch.float32
    x = torch.rand(shape, device=device).to(x_dtype)

    def make(kind, n, dtype):
        if kind is None:
            return None
        if kind == "inference":
            with torch.inference_mode():
                return torch.rand(n, device=device).to(dtype)
        if kind == "expanded":
            return torch.rand(1, device=device).to(dtype).expand(n)
        if kind == "row":
            return torch.rand(1, n, device=device).to(dtype)
        return torch.rand(n, device=device).to(dtype)

    def vector(kind):
        n = {"fewer": C - 1, "more": C + 1}.get(kind, C)
        dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "int64": torch.int64}.get(kind, md)
        return make(kind, n, dtype)

    args, kwargs = [], {}
    for a in _schema_args(name):
        kind = kinds.get(a.name)
        if a.name == "input":
            value = x
        elif a.name in _VECTOR_ARGS:
            value = vector(kind)
        elif a.name == "grad_out":
            g_shape = (shape[0] + 1, *shape[1:]) if kind == "shape" else shape
            g_dtype = (torch.float64 if x_dtype != torch.float64 else torch.float32) \
                if kind == "dtype" else x_dtype
            value = torch.rand(g_shape, device=device).to(g_dtype)
        elif a.name == "count":
            value = None if kind is None else torch.full(
                (2,) if kind == "two" else (), 4.0, device=device,
                dtype=torch.int64 if kind == "int64" else md)
        elif a.name == "num_batches_tracked":
            n = 2 if kind == "two" else 1
            t = make(kind, n, {"float": torch.float32, "int32": torch.int32,
                               "bool": torch.bool}.get(kind, torch.int64))
            value = None if t is None else t.reshape(()) if n == 1 and kind != "expanded" else t
        elif a.name == "dtype":
            value = md if kind == "math" else kind
        else:  # eps, momentum
            value = kind
        if a.kwarg_only:
            kwargs[a.name] = value
        else:
            args.append(value)
    return args, kwargs


def _op_outcome(op, args, kwargs):
    try:
        out = op(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type and wording are what is compared
        return type(e), " ".join(str(e).split()[:4])
    outs = out if isinstance(out, tuple) else (out,)
    return [None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in outs]


_UPDATE_OK = {"num_batches_tracked": "ok", "momentum": 0.1}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_op_calls())
# expanded, inference and integer running statistics and counts: the draws above rarely make a
# wrong one (the inference num_batches_tracked of train_forward: a mutation run, 2026-12-06)
@example(("train_forward", (2, 3, 2), torch.float32,
          {"input": "ok", "weight": "ok", "bias": None, "eps": 1e-5, "running_mean": "expanded",
           "running_var": "ok", **_UPDATE_OK}))
@example(("train_forward", (2, 3, 2), torch.bfloat16,
          {"input": "ok", "weight": None, "bias": "ok", "eps": 1e-5, "running_mean": "ok",
           "running_var": "inference", **_UPDATE_OK}))
@example(("running_stats_update", (2, 3, 2), torch.bfloat16,
          {"running_mean": "ok", "running_var": "expanded", "mean": "ok", "var": "ok",
           "count": "ok", **_UPDATE_OK}))
@example(("running_stats_update", (2, 3, 2), torch.float32,
          {"running_mean": "int64", "running_var": "ok", "mean": "ok", "var": "ok",
           "count": "ok", **_UPDATE_OK}))
@example(("train_forward", (2, 3, 2), torch.float32,
          {"input": "ok", "weight": "ok", "bias": "ok", "eps": 1e-5, "running_mean": "ok",
           "running_var": "ok", "num_batches_tracked": "inference", "momentum": 0.1}))
def test_fake_kernels_refuse_what_the_ops_refuse(call):
    from torch._subclasses.fake_tensor import FakeTensorMode
    name, shape, x_dtype, kinds = call
    op = getattr(ops, name).default
    real = _op_outcome(op, *_op_args(name, shape, x_dtype, kinds, "cpu"))
    meta = _op_outcome(op, *_op_args(name, shape, x_dtype, kinds, "meta"))
    assert meta == real, f"{name} {kinds}: the op gave {real}, its meta kernel {meta}"
    mode = FakeTensorMode()
    args, kwargs = _op_args(name, shape, x_dtype, kinds, "cpu")
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = _op_outcome(op, fake_args, kwargs)
    assert fake == real, f"{name} {kinds}: the op gave {real}, its fake kernel {fake}"


@pytest.mark.parametrize("name", _OPS)
def test_fake_kernels_refuse_a_second_device(name):
    # ops.cpp's check_same_device, mirrored by the fake kernels: a CPU tensor with a meta one
    # reaches the meta kernel, so the other device is a fake CUDA tensor, which FakeTensorMode
    # makes without a GPU. Each tensor argument but the one the others are compared with
    # (input, or running_stats_update's mean) is moved alone.
    from torch._subclasses.fake_tensor import FakeTensorMode
    kinds = {a.name: _KINDS["vector" if a.name in _VECTOR_ARGS else a.name][0][0]
             for a in _schema_args(name)}  # every argument of its first right kind
    names = list(kinds)
    reference = "input" if "input" in kinds else "mean"
    cpu_args, kwargs = _op_args(name, (3, 2, 2), torch.float32, kinds, "cpu")
    moved = [n for n, a in zip(names, cpu_args) if isinstance(a, torch.Tensor) and n != reference]
    assert moved or name == "batch_stats"
    op = getattr(ops, name).default
    for arg in moved:
        mode = FakeTensorMode()  # fake copies: the op never writes to cpu_args
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in cpu_args]
        i = names.index(arg)
        with mode:
            # (Tensor.to("cuda") needs torch built with CUDA; a factory does not)
            args[i] = torch.empty(args[i].shape, dtype=args[i].dtype, device="cuda")
            with pytest.raises(RuntimeError) as info:
                op(*args, **kwargs)
        assert str(info.value) == (f"bn_ext.{name}: {arg} is on cuda:0 but input is on cpu; "
                                   f"all tensors must be on one device"), arg


# The differentiable backwards (Python, for double backward) check their arguments as the C++
# backwards they stand in for do: same error type and words, after the op's name.
_DIFFERENTIABLE = {"_differentiable_train_backward": "train_backward",
                   "_differentiable_normalize_backward": "normalize_backward"}


@st.composite
def _differentiable_calls(draw):
    name = draw(st.sampled_from(sorted(_DIFFERENTIABLE)))
    # arguments of the C++ op's call, only the differentiable op's own ones wrong
    wrong = draw(st.sets(st.sampled_from([a.name for a in _schema_args(name)]), max_size=2))
    return (name,) + _draw_arguments(draw, _DIFFERENTIABLE[name], wrong)


def _refusal(op, args):
    """The error's type and words after the op's name, or None where the op returns."""
    try:
        op(*args)
    except Exception as e:  # noqa: BLE001 - the type and wording are what is compared
        return type(e), str(e).split(":", 1)[-1].split()[:3]
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_differentiable_calls())
def test_differentiable_backwards_refuse_what_the_ops_refuse(call):
    name, shape, x_dtype, kinds = call
    cpp = _DIFFERENTIABLE[name]
    args, kwargs = _op_args(cpp, shape, x_dtype, kinds, "cpu")
    assert not kwargs
    own = {a.name for a in _schema_args(name)}
    mine = [a for a, s in zip(args, _schema_args(cpp)) if s.name in own]
    expected = _refusal(getattr(ops, cpp).default, args)
    got = _refusal(getattr(ops, name).default, mine)
    assert got == expected, f"{name} {kinds}: {cpp} gave {expected}, {name} {got}"
