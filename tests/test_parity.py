"""Parity with torch.nn.BatchNorm1d/2d/3d over several training steps and an eval step.

Compared after every step: outputs, input and parameter gradients, running statistics and
num_batches_tracked.
"""
import copy
import functools
import math
import types

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bn_ext
from conftest import (CUDA_EMULATED, DEVICES, TORCH_HAS_BN_BIAS, assert_close,
                      assert_same_as_split_path, make_input, make_pair, needs_bn_bias, run_python,
                      run_steps)

ops = torch.ops.bn_ext

SHAPES = {2: (16, 5), 3: (4, 6, 9), 4: (3, 5, 7, 6), 5: (2, 4, 3, 5, 6)}
# Each option set: (affine, track_running_stats, momentum)
OPTIONS = [(True, True, 0.1), (False, True, None), (True, False, 0.1), (False, False, 0.3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "affine{}-track{}-m{}".format(*o))
def test_train_then_eval_matches_torch(device, dtype, layout, ndim, options):
    affine, track, momentum = options
    ref, ours = make_pair(ndim, SHAPES[ndim][1], device, dtype, affine, track, momentum)
    run_steps(ref, ours, SHAPES[ndim], dtype, device, layout, steps=3, train=True)
    run_steps(ref, ours, SHAPES[ndim], dtype, device, layout, steps=1, train=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ndim", [3, 4, 5])
def test_batch_sliced_channels_last_input(device, dtype, ndim):
    """Every other sample of a channels_last tensor: C innermost and each sample dense, but not
    the batch, so it is neither layout the kernels read in place (taking it as channels_last
    read the skipped samples; only a random-shape test found that)."""
    ref, ours = make_pair(ndim, SHAPES[ndim][1], device, dtype)
    run_steps(ref, ours, SHAPES[ndim], dtype, device, "channels_last_batch_sliced", steps=2,
              train=True)
    run_steps(ref, ours, SHAPES[ndim], dtype, device, "channels_last_batch_sliced", steps=1,
              train=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize("N", [1, 3])
def test_channels_last_input_sliced_along_dim_2(device, dtype, ndim, N):
    """Every other index of dim 2 (L, H or D) of a channels_last tensor. With N = 1 only dim 2's
    stride tells it from a dense channels_last tensor (the batch's is not looked at): a layout
    check that skipped dim 2 read the unsliced rows 0..4 for rows 0, 2, .., 8 and passed every
    other test (error 2.9; found by mutating ops.cpp)."""
    shape = (N,) + SHAPES[ndim][1:]
    ref, ours = make_pair(ndim, shape[1], device, dtype)
    run_steps(ref, ours, shape, dtype, device, "channels_last_dim2_sliced", steps=2, train=True)
    run_steps(ref, ours, shape, dtype, device, "channels_last_dim2_sliced", steps=1,
              train=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_input_with_float32_params(device, dtype, layout):
    """As under autocast: half/bf16 activations with float32 weights and running stats."""
    if device == "cpu" and dtype == torch.float16:
        # torch's CPU batch_norm rejects float16 input with float32 params; compare against a
        # float32 computation instead.
        ref, ours = make_pair(4, SHAPES[4][1], device, torch.float32)
        x = make_input(SHAPES[4], dtype, device, layout)
        y = ours(x)
        assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
        assert_close(y, ref(x.float()).to(dtype), dtype)
        assert_close(ours.running_var, ref.running_var, torch.float32)
        return
    ref, ours = make_pair(4, SHAPES[4][1], device, torch.float32)
    run_steps(ref, ours, SHAPES[4], dtype, device, layout, steps=2, train=True)
    run_steps(ref, ours, SHAPES[4], dtype, device, layout, steps=1, train=False)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device):
    x = make_input((6, 4, 5, 5), torch.float64, device)
    w = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(4, dtype=torch.float64, device=device)
    for training in (True, False):
        rm_r = torch.randn(4, dtype=torch.float64, device=device)
        rv_r = torch.rand(4, dtype=torch.float64, device=device) + 0.5
        rm_o, rv_o = rm_r.clone(), rv_r.clone()
        yr = torch.nn.functional.batch_norm(x, rm_r, rv_r, w, b, training, 0.2, 1e-3)
        yo = bn_ext.batch_norm(x, rm_o, rv_o, w, b, training, 0.2, 1e-3)
        assert_close(yo, yr, torch.float64)
        assert_close(rm_o, rm_r, torch.float64)
        assert_close(rv_o, rv_r, torch.float64)
    # training without running statistics
    yr = torch.nn.functional.batch_norm(x, None, None, w, b, True)
    yo = bn_ext.batch_norm(x, None, None, w, b, True)
    assert_close(yo, yr, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    ref, ours = make_pair(4, SHAPES[4][1], device, torch.float32)
    x = torch.randn(0, 5, 7, 6, device=device)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert yo.shape == yr.shape == x.shape
    yo.sum().backward()
    yr.sum().backward()
    assert xo.grad.shape == x.shape
    torch.testing.assert_close(ours.weight.grad, torch.zeros_like(ours.weight))
    torch.testing.assert_close(ours.bias.grad, torch.zeros_like(ours.bias))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_function_returns_batch_statistics(device, training):
    """BatchNormFunction, public, returns (output, batch mean, biased batch var) in training, the
    statistics not differentiable, and (output,) in eval; it updates the running statistics as
    F.batch_norm does."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64).to(device)
    w, b = (torch.randn(3, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    rm = torch.randn(3, generator=gen, dtype=torch.float64).to(device)
    rv = torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 0.5
    for t in (x, w, b):
        t.requires_grad_()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    outs = bn_ext.BatchNormFunction.apply(x, w, b, rm, rv, training, 1e-5, None, 0.2)
    ref = torch.nn.functional.batch_norm(x, rm_ref, rv_ref, w, b, training, 0.2, 1e-5)
    assert isinstance(outs, tuple) and len(outs) == (3 if training else 1)
    torch.testing.assert_close(outs[0], ref)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)
    if training:
        _, mean, var = outs
        torch.testing.assert_close(mean, x.detach().mean((0, 2, 3)))
        torch.testing.assert_close(var, x.detach().var((0, 2, 3), unbiased=False))
        assert not mean.requires_grad and not var.requires_grad
    assert outs[0].requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("path", ["module", "BatchNormFunction"])
def test_empty_batch_double_backward_is_zero(device, training, path):
    # An empty batch's statistics are 0/0; the double backward used to carry that NaN into the
    # weight's gradient through w * invstd. torch's gradients there are zeros.
    def grads(lib):
        torch.manual_seed(0)
        m = lib.BatchNorm1d(3, device=device, dtype=torch.float64).train(training)
        x = torch.randn(0, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
        if path == "module" or lib is torch.nn:
            y = m(x)
        else:
            y = bn_ext.BatchNormFunction.apply(x, m.weight, m.bias, m.running_mean, m.running_var,
                                               training, m.eps, None, 0.1)[0]
        gx, gw = torch.autograd.grad(y, (x, m.weight), torch.randn_like(y), create_graph=True)
        (gw.sum() + gx.sum()).backward()
        return m.weight.grad, m.bias.grad

    ours, ref = grads(bn_ext), grads(torch.nn)
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_stays_in_its_channel(device, layout):
    x = make_input((4, 3, 5, 5), torch.float32, device, layout).clone()
    x[1, 1, 2, 2] = float("nan")
    m = bn_ext.BatchNorm2d(3, device=device)
    y = m(x)
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, 0]).all() and torch.isfinite(y[:, 2]).all()
    assert torch.isfinite(m.running_mean[[0, 2]]).all()
    assert torch.isnan(m.running_mean[1]) and torch.isnan(m.running_var[1])
    assert torch.isfinite(m.running_var[[0, 2]]).all()
    mean, var = torch.ops.bn_ext.batch_stats(x)
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    assert torch.isfinite(var[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_eval_backward_does_not_read_input(device):
    """Eval grad_input is dy * w * invstd: an inf in x must not make it NaN (as in torch)."""
    x = torch.randn(4, 3, 5, 5, device=device)
    x[0, 0, 0, 0] = float("inf")
    ref = torch.nn.BatchNorm2d(3, device=device).eval()
    ours = bn_ext.BatchNorm2d(3, device=device).eval()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    assert torch.isfinite(xo.grad).all()
    torch.testing.assert_close(xo.grad, xr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("means", ["equal", "per_channel"])
def test_large_mean_small_std_no_worse_than_torch(device, layout, means):
    """Per-channel mean 1e4 (or -1e4..1e4, a different one per channel), std 1, float32: error
    against a float64 reference vs torch's. Each channel needs its own shift: channels_last
    taking every channel's from channel 0 passed with equal means (error 1.2e3 with these)."""
    shape = (32, 8, 24, 24)
    x64 = make_input(shape, torch.float64, device, layout, mean=1e4, std=1.0)
    if means == "per_channel":
        x64 = x64 + torch.linspace(-2e4, 0, 8, dtype=torch.float64, device=device).view(8, 1, 1)
        assert x64.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    x = x64.float()
    ref64 = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    ours = bn_ext.batch_norm(x, None, None, training=True)
    torch_out = torch.nn.functional.batch_norm(x, None, None, training=True)
    err_ours = (ours.double() - ref64).abs().max().item()
    err_torch = (torch_out.double() - ref64).abs().max().item()
    if means == "equal":
        assert err_ours <= err_torch, (err_ours, err_torch)
    # Otherwise both are within a float32 ulp of 1e4 (9.8e-4), the input's own rounding, and
    # which is closer depends on how each channel's float32 mean rounds (here 4.4e-4 vs
    # torch's 3.6e-4 contiguous).
    assert err_ours < 1e-3, (err_ours, err_torch)

    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    bn_ext.batch_norm(x, rm, rv, training=True, momentum=1.0)
    dims = [0, 2, 3]
    torch.testing.assert_close(rv.double(), x.double().var(dims), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm.double(), x.double().mean(dims), rtol=1e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mean", [1e2, 1e3, 4e3, 1e4])
def test_eval_normalize_rounds_at_the_outputs_scale(device, layout, mean):
    """Eval with running means far from 0 (|mean| / std = 1e2..1e4): (x - mean) * a + b is exact up
    to the product's rounding, a few float32 ulp of |y|. The folded x * a + (b - mean * a) would
    round at |mean * a|'s scale (6e-5 at 1e3), so the CPU kernels fold a channel only where
    |mean * a| is within 4x of the output's scale; a limit of 4096 passed every other test."""
    gen = torch.Generator().manual_seed(0)
    C = 16
    x = make_input((8, C, 12, 12), torch.float32, device, layout, mean=mean, std=1.0)
    rm = (mean + torch.randn(C, generator=gen)).float().to(device)
    rv = (torch.rand(C, generator=gen) + 0.5).float().to(device)
    w = (torch.rand(C, generator=gen) + 0.5).float().to(device)
    b = (0.1 * torch.randn(C, generator=gen)).float().to(device)
    y = bn_ext.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    per = (None, slice(None), None, None)
    ref = ((x.double() - rm.double()[per]) / (rv.double()[per] + 1e-5).sqrt() * w.double()[per]
           + b.double()[per])
    err = (y.double() - ref).abs().max().item()
    assert err <= 8 * 2.0 ** -24 * ref.abs().max().item(), err


def _shift_sample_elements(count, S, samples):
    """The first `samples` of the 32 elements (in (n, s) order) whose mean is a channel's shift k,
    as bn_ext.h picks them: e_j = (G / 2 + j G) mod W, W = min(count, max(S, 32)), G the largest
    integer <= W * 40503 / 2^16 with no factor in common with W."""
    W = min(count, max(S, 32))
    G = W * 40503 // 65536
    while G > 1 and math.gcd(G, W) != 1:
        G -= 1
    return [(G // 2 + j * G) % W for j in range(samples)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("outliers", ["first_element", "shift_samples"])
def test_variance_with_outliers(device, layout, outliers):
    """The statistics shift their sums by k, the mean of 32 samples of a channel (bn_ext.h); the
    sums' rounding reaches var amplified by 1 + (k - mean)^2 / var. Each channel (mean 1e4, std 1)
    gets outliers 50 std out:
    - first_element: its first element. A one-element shift amplifies ~2000x, missing 2e-5
      relative; a 32-sample one ~3x at most.
    - shift_samples: the first group of 4 of the shift's 32 samples. k is mean + 6.25 std
      (~40x) if the kernel averages all 32, but mean + 50 std (~2500x, missing 2e-5) if its shift
      took any one group for all eight."""
    N, C, H, W = 16, 8, 32, 32
    x = make_input((N, C, H, W), torch.float32, device, layout, mean=1e4, std=1.0)
    elements = [0] if outliers == "first_element" else _shift_sample_elements(N * H * W, H * W, 4)
    for e in elements:  # e < H * W: all in sample 0
        x[0, :, e // W, e % W] += 50
    mean, var = ops.batch_stats(x)
    vr, mr = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    torch.testing.assert_close(var.double(), vr, rtol=2e-5, atol=0)
    torch.testing.assert_close(mean.double(), mr, rtol=1e-7, atol=0)


def test_training_forward_after_an_eval_graph_as_torch():
    """An eval graph saves the running statistics; a training forward then updates them in place.
    torch does not bump their version counters, so the eval backward runs (with the updated
    values) instead of raising; bn_ext's C++ autograd does the same, with the same gradient."""
    grads = []
    for fn in (torch.nn.functional.batch_norm, bn_ext.batch_norm):
        x = make_input((4, 3, 5), torch.float32, "cpu", seed=31).requires_grad_()
        rm, rv = torch.zeros(3), torch.ones(3)
        y = fn(x, rm, rv, training=False)
        fn(x.detach(), rm, rv, training=True, momentum=0.5)
        (g,) = torch.autograd.grad(y.sum(), x)
        grads.append(g)
    assert_close(grads[1], grads[0], torch.float32)


def _size_one_dim_inputs():
    """Dense inputs whose size-1 dims carry strides no layout rule would give them: the layout is
    read off the strides, and a size-1 dim's stride must not matter (as for is_contiguous)."""
    g = torch.Generator().manual_seed(11)
    cl = torch.randn(1, 6, 5, 4, generator=g).contiguous(memory_format=torch.channels_last)
    yield "N=1 channels_last", cl.as_strided(cl.shape, (999,) + cl.stride()[1:])
    h1 = torch.randn(4, 1, 7, 6, generator=g).permute(0, 3, 1, 2)  # (4, 6, 1, 7), C innermost
    yield "H=1 channels_last", h1.as_strided(h1.shape, h1.stride()[:2] + (12345,) + h1.stride()[3:])
    w1 = torch.randn(3, 6, 5, 1, generator=g)
    yield "W=1 contiguous", w1.as_strided(w1.shape, w1.stride()[:3] + (77,))
    yield "L=1 (N, L, C) transposed", torch.randn(5, 1, 6, generator=g).transpose(1, 2)
    yield "N=1, C=1", torch.randn(1, 1, 4, 5, generator=g).as_strided((1, 1, 4, 5), (3, 8, 5, 1))


@pytest.mark.parametrize("name,x", list(_size_one_dim_inputs()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_size_one_dims_with_odd_strides(name, x):
    """Against float64 on a contiguous copy, not against torch on the same tensor: torch 2.13's
    CPU backward gets "H=1 channels_last" wrong (grad_input off by ~4, with a contiguous
    grad_out), in float64 as in float32."""
    C = x.shape[1]
    w = torch.rand(C) + 0.5
    b = torch.randn(C)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    outs = []
    for fn, xx, dt in ((bn_ext.batch_norm, x, torch.float32),
                       (torch.nn.functional.batch_norm, x.contiguous(), torch.float64)):
        xi = xx.detach().to(dt).requires_grad_()
        wi, bi = w.to(dt).requires_grad_(), b.to(dt).requires_grad_()
        rm, rv = torch.zeros(C, dtype=dt), torch.ones(C, dtype=dt)
        y = fn(xi, rm, rv, wi, bi, training=True, momentum=0.1, eps=1e-5)
        outs.append((y,) + torch.autograd.grad(y, (xi, wi, bi), dy.to(dt)) + (rm, rv))
    for got, want in zip(*outs):
        assert_close(got, want.float(), torch.float32)


@pytest.mark.parametrize("shape,fmt", [((3, 4, 1, 1), torch.channels_last),
                                       ((3, 1, 2, 2), torch.channels_last),
                                       ((2, 4, 1, 1, 1), torch.channels_last_3d)],
                         ids=["N,C,1,1", "N,1,H,W", "N,C,1,1,1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_input_in_both_layouts_keeps_its_strides(shape, fmt, training):
    """Size-1 dims can make one tensor both NCHW- and channels_last-contiguous. The output and dx
    keep the input's strides (README: torch's CPU kernel gives the output NCHW ones there); it is
    the same memory either way, so both contiguity checks hold and the values are torch's."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(memory_format=fmt)
    assert x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    C = shape[1]
    ours, theirs = [], []
    for fn, out in ((bn_ext.batch_norm, ours), (torch.nn.functional.batch_norm, theirs)):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y = fn(xi, torch.zeros(C), torch.ones(C), training=training, momentum=0.1, eps=1e-5)
        (dx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        out += [y, dx]
    for t in ours:
        assert t.stride() == x.stride()
        assert t.is_contiguous() and t.is_contiguous(memory_format=fmt)
    for got, want in zip(ours, theirs):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 64, 9, 9), (64, 3, 5, 5), (2, 2, 40, 40)])
def test_bitwise_deterministic(device, layout, shape):
    x = make_input(shape, torch.float32, device, layout).requires_grad_()
    g = make_input(shape, torch.float32, device, layout, seed=5)
    results = []
    for _ in range(3):
        m = bn_ext.BatchNorm2d(shape[1], device=device)
        y = m(x)
        (gx,) = torch.autograd.grad(y, x, g)
        results.append((y, gx, m.running_mean, m.running_var))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [
    (8, 40, 33, 17),
    (8, 64, 33, 17),
    (130, 5, 7, 7),   # NCHW: whole channels per thread on 1 thread, blocks of rows on 2
    (70, 3, 4, 4),
], ids=lambda s: "x".join(map(str, s)))
def test_thread_count_does_not_change_bits(layout, shape):
    x = make_input(shape, torch.float32, "cpu", layout).requires_grad_()
    g = make_input(shape, torch.float32, "cpu", layout, seed=2)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = bn_ext.batch_norm(x, None, None, training=True)
            outs.append((y, torch.autograd.grad(y, x, g)[0]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels", [3, 16, 40, 48, 100, 1000])
def test_channels_last_kernel_paths_match_float64(channels, dtype):
    """Each channels-last code path over many row blocks and prefetch tiles: period rows of
    lcm(C, width) elements for C = 3, 40 and 100, whole vector strips (16), strips plus a
    half-width strip (48), strips plus a scalar tail (1000: its period would be 4000)."""
    shape = (4, channels, 33, 17) if channels < 1000 else (4, channels, 9, 9)
    x = make_input(shape, dtype, "cpu", "channels_last").requires_grad_()
    g = make_input(shape, dtype, "cpu", "channels_last", seed=7)
    w = (torch.rand(channels, dtype=torch.float32) + 0.5).requires_grad_()
    b = torch.randn(channels, dtype=torch.float32).requires_grad_()
    y = bn_ext.batch_norm(x, None, None, w, b, training=True)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True)
    gx64, gw64, gb64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert_close(y, y64.to(dtype), dtype)
    assert_close(gx, gx64.to(dtype), dtype)
    assert_close(gw, gw64.float(), torch.float32 if dtype == torch.float32 else dtype)
    assert_close(gb, gb64.float(), torch.float32 if dtype == torch.float32 else dtype)


TILE_SHAPES = [(3, 37, 7, 7), (400, 16, 7, 7), (5, 100, 2, 3), (4, 21, 14, 14), (64, 9, 33, 17),
               (2, 300, 1, 5), (352, 1000, 7, 7)]


@pytest.mark.parametrize("shape,dtype", [
    *[(s, t) for t in (torch.float32, torch.bfloat16) for s in TILE_SHAPES],
    *[(s, t) for t in (torch.float16, torch.float64) for s in [(3, 37, 7, 7), (70, 24, 3, 3)]],
])
def test_contiguous_channel_tiles_match_float64(shape, dtype):
    """NCHW reductions over tiles of adjacent channels. Runs of at most 256 bytes (7x7 fp32 and
    bf16, 2x3, 1x5, fp64 3x3) are summed as rows of positions (tile_span_sums): tiles of up to 16
    channels, ragged last tiles (37, 100, 300 channels), several blocks of rows (400x7x7, 352x7x7,
    and 70x3x3 whose 64 + 6 rows end in a short block), spans ending in a half step and a scalar
    tail. Longer runs go run by run (tile_chunk_sums): 14x14 in tiles of 5 and a ragged one, long
    runs one channel per tile over several chunks (64x33x17). 352x1000x7x7 is larger than a
    32 MiB last-level cache. batch_stats and backward_reduce against float64, on 2 threads, and
    the same bits on 1 thread."""
    C = shape[1]
    x = make_input(shape, dtype, "cpu", seed=3) * 3 + 1
    g = make_input(shape, dtype, "cpu", seed=4)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            mean, var = ops.batch_stats(x)
            sums = ops.backward_reduce(g, x, mean, var, None, 1e-5)
            outs.append((mean, var) + tuple(sums))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    mean, var, sum_dy, sum_dy_xmu = outs[0][:4]
    xd, gd = x.double(), g.double()
    dims = [0, 2, 3]

    def assert_sum_close(got, terms):
        # float32 sums of signed terms: the error scales with the sum of |terms|, not the result.
        err = (got.double() - terms.sum(dims)).abs()
        assert (err <= 1e-6 * terms.abs().sum(dims) + 1e-30).all(), err.max()

    n = x.numel() // C
    assert_sum_close(mean, xd / n)
    assert_sum_close(var, (xd - xd.mean(dims, keepdim=True)) ** 2 / n)
    assert_sum_close(sum_dy, gd)
    assert_sum_close(sum_dy_xmu, gd * (xd - mean.double().view(1, C, 1, 1)))


@pytest.mark.skipif(CUDA_EMULATED, reason="the CPU kernels' flush to double; the CUDA kernels "
                    "sum shifted floats in many short per-thread chains instead")
@pytest.mark.parametrize("C", [1, 9], ids=["chunks-over-threads", "channels-over-threads"])
def test_long_run_statistics_error_does_not_grow_with_the_run(C):
    """A run of more than a chunk's elements (here 2^18, one run to a chunk) is summed in float
    vector accumulators that are flushed into double every kFlushEvery steps, so the statistics
    stay within a few float32 ulps of float64 however long the run (float accumulators left
    unflushed down the run would err by ~5e-7 in var here, growing with the run). batch_stats
    with float64 statistics, so that the mean's own rounding to float32 does not hide the sums'."""
    x = make_input((2, C, 1, 1 << 18), torch.float32, "cpu", seed=17, mean=3.5)
    mean, var = ops.batch_stats(x, dtype=torch.float64)
    ref_var, ref_mean = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-7, atol=0)
    mean_err = (mean - ref_mean).abs() / ref_var.sqrt()
    assert mean_err.max().item() < 1e-8, mean_err


def _last_level_cache_bytes():
    """The largest cache cpu0 lists in sysfs, as the kernels read it (8 MiB if none is listed)."""
    best = 0
    for i in range(16):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * unit)
    return best or 8 << 20


@pytest.mark.parametrize("layout,dtype,spatial", [
    ("contiguous", torch.float32, (96, 96)),    # whole-step runs: tile-fused forward, fused
    ("contiguous", torch.float32, (28, 28)),    # whole-step runs: tile-fused forward, backward
    ("contiguous", torch.float32, (7, 7)),      # short runs: tile-fused forward and backward
    ("contiguous", torch.bfloat16, (7, 7)),
    ("channels_last", torch.float32, (24, 24)),
    ("channels_last", torch.bfloat16, (24, 24)),
    ("channels_last", torch.float64, (24, 24)),
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_streaming_stores_match_float64(layout, dtype, spatial):
    """Outputs of passes whose tensors exceed the last-level cache are written with streaming
    stores; sized here so that eval, training forward and backward all take that path."""
    C = 64
    shape = _beyond_cache_shape(dtype, spatial, C)  # 2 * input bytes > llc: every pass streams
    x = make_input(shape, dtype, "cpu", layout, seed=21)
    g = make_input(shape, dtype, "cpu", layout, seed=22)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, dtype=pd) + 0.5
    b = torch.randn(C, dtype=pd)
    xr = x.detach().requires_grad_()
    y = bn_ext.batch_norm(xr, None, None, w, b, training=True)
    gx, = torch.autograd.grad(y, xr, g)
    x64 = x.double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w.double(), b.double(), training=True)
    gx64, = torch.autograd.grad(y64, x64, g.double())
    assert_close(y, y64.to(dtype), dtype)
    assert_close(gx, gx64.to(dtype), dtype)
    rm, rv = torch.randn(C, dtype=pd), torch.rand(C, dtype=pd) + 0.5
    ye = bn_ext.batch_norm(x, rm, rv, w, b, training=False)
    ye64 = torch.nn.functional.batch_norm(x.double(), rm.double(), rv.double(), w.double(),
                                          b.double(), training=False)
    assert_close(ye, ye64.to(dtype), dtype)


# Small tensors, each well within any host's caches, so that in this process no pass streams; the
# child process runs them with BN_EXT_CPU_STREAM_MB=0, where every pass streams its output and the
# NCHW training passes take their tile-fused paths. Neither may change a bit.
_STREAM_CASES = """
import torch
import bn_ext  # registers the ops
torch.manual_seed(5)
ops = torch.ops.bn_ext
cases = [((8, 32, 7, 7), torch.float32, False), ((4, 8, 28, 28), torch.float32, False),
         ((4, 6, 14, 14), torch.float64, False), ((4, 16, 12, 12), torch.bfloat16, False),
         ((8, 24, 10, 10), torch.float32, True), ((8, 9, 5, 6), torch.float32, True),
         ((64, 100), torch.float32, False), ((3, 5, 7, 7), torch.float32, False),
         # runs shorter than a vector step: streamed, every map goes run by run (affine_run,
         # affine2_run), each run ending in a masked partial step
         ((16, 8, 3, 3), torch.float32, False), ((6, 4, 1, 5), torch.bfloat16, False),
         ((5, 7, 1, 3), torch.float64, False)]
out = []
for shape, dtype, cl in cases:
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x[:, 0] += 3000  # channel 0 stays centered, the others are folded
    g = torch.randn_like(x)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    w, b = torch.rand(C, dtype=pd) + 0.5, torch.randn(C, dtype=pd)
    rm, rv = torch.randn(C, dtype=pd), torch.rand(C, dtype=pd) + 0.5
    y, mean, var = ops.train_forward(x, w, b, 1e-5)
    dx, gw, gb = ops.train_backward(g, x, mean, var, w, 1e-5)
    # absent weight and bias (1 and 0) in every pass, and weight without bias
    y0, mean0, var0 = ops.train_forward(x, None, None, 1e-5)
    dx0, gw0, gb0 = ops.train_backward(g, x, mean0, var0, None, 1e-5)
    out.append([ops.normalize(x, rm, rv, w, b, 1e-5), y, mean, var, dx, gw, gb,
                ops.normalize(x, rm, rv, None, None, 1e-5), y0, mean0, var0, dx0, gw0, gb0,
                ops.train_forward(x, w, None, 1e-5)[0]])
torch.save(out, OUT)
"""


@pytest.mark.skipif(CUDA_EMULATED, reason="BN_EXT_CPU_STREAM_MB steers the CPU kernels only")
def test_streaming_threshold_from_env_changes_no_bit(tmp_path):
    """BN_EXT_CPU_STREAM_MB=0 makes every pass stream (and the NCHW training passes tile-fuse)
    however small the tensor: the outputs, statistics and gradients must be the default paths'
    bits, for every layout and dtype, with and without weight and bias (the tile-fused passes
    take their own defaults for absent ones)."""
    path = tmp_path / "streamed.pt"
    code = f"OUT = {str(path)!r}\n" + _STREAM_CASES
    r = run_python(code, timeout=300, BN_EXT_CPU_STREAM_MB="0")
    assert r.returncode == 0, r.stderr
    scope = {"OUT": str(tmp_path / "default.pt")}
    exec(_STREAM_CASES, scope)
    streamed = torch.load(path)
    default = torch.load(tmp_path / "default.pt")
    names = ["eval y", "y", "mean", "var", "dx", "grad_weight", "grad_bias"]
    names += [f"{name}, no weight or bias" for name in names] + ["y, no bias"]
    for i, (a, b) in enumerate(zip(streamed, default)):
        assert len(a) == len(b) == len(names), i
        for name, p, q in zip(names, a, b):
            assert p.stride() == q.stride(), (i, name)
            assert torch.equal(p, q), (i, name, (p.double() - q.double()).abs().max())


@pytest.mark.skipif(CUDA_EMULATED, reason="BN_EXT_CPU_STREAM_MB steers the CPU kernels only")
def test_bad_streaming_threshold_is_a_clear_error():
    """A bad BN_EXT_CPU_STREAM_MB fails the first pass that reads it, with the module's running
    statistics and num_batches_tracked left as they were."""
    code = ("import torch, bn_ext\n"
            "m = bn_ext.BatchNorm2d(3)\n"
            "before = {k: v.clone() for k, v in m.state_dict().items()}\n"
            "try:\n"
            "    m(torch.randn(4, 3, 8, 8))\n"
            "except RuntimeError as e:\n"
            "    print(e)\n"
            "print('unchanged', all(torch.equal(v, before[k]) for k, v in m.state_dict().items()))\n")
    r = run_python(code, BN_EXT_CPU_STREAM_MB="lots")
    assert r.returncode == 0, r.stderr
    assert "BN_EXT_CPU_STREAM_MB must be a whole number of MiB" in r.stdout
    assert r.stdout.rstrip().endswith("unchanged True")


def _on_1_and_2_threads(fn, *args):
    """fn(*args) on 1 thread and on 2 (the paths a kernel takes can depend on the count)."""
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(fn(*args))
    finally:
        torch.set_num_threads(old)
    return results


def _beyond_cache_shape(dtype, spatial, C):
    """An NCHW shape whose tensor is more than half the last-level cache: every pass over it
    streams its output (the forward's when 2 * input bytes > llc). Skips where that is too big."""
    llc = _last_level_cache_bytes()
    if llc > 128 << 20:
        pytest.skip(f"a {llc >> 20} MiB last-level cache would need too large a tensor")
    per_n = C * spatial[0] * spatial[1] * torch.tensor([], dtype=dtype).element_size()
    return (llc // (2 * per_n) + 3, C) + spatial


def _train_backward_as_split_path(g, x, w):
    """train_backward's dx and grad_weight, after checking that they, and grad_bias, are the bits
    of the split path (backward_reduce, then backward_input) and the same on 1 thread as on 2."""
    mean, var = ops.batch_stats(x)
    one_thread, (dx, gw, gb) = _on_1_and_2_threads(ops.train_backward, g, x, mean, var, w, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip((dx, gw, gb), one_thread))
    sum_dy, sum_dy_xmu, gw_split, gb_split = ops.backward_reduce(g, x, mean, var, w, 1e-5)
    count = torch.tensor(float(x.numel() // x.shape[1]), dtype=w.dtype)
    dx_split = ops.backward_input(g, x, mean, var, w, sum_dy, sum_dy_xmu, count, 1e-5)
    for fused, split in ((gw, gw_split), (gb, gb_split)):
        assert_same_as_split_path(fused, split, w.dtype)
    assert_same_as_split_path(dx, dx_split, x.dtype)
    return dx, gw


def _train_backward_float64(g, x, w):
    x64 = x.detach().double().requires_grad_()
    w64 = w.double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, None, training=True)
    return torch.autograd.grad(y64, (x64, w64), g.double())


@pytest.mark.parametrize("shape,dtype,layout", [
    ((3, 8, 32, 40), torch.float32, "contiguous"),
    ((4, 9, 1, 1030), torch.float32, "contiguous"),
    ((2, 12, 48, 48), torch.bfloat16, "contiguous"),
    ((3, 10, 16, 40), torch.float64, "contiguous"),
    ((256, 1000), torch.float32, "contiguous"),
    ((100, 2000), torch.bfloat16, "contiguous"),
    ((32, 48, 2, 2), torch.float32, "channels_last"),
    ((64, 1000), torch.float64, "contiguous"),
], ids=["fp32", "fp32-tail", "bf16", "fp64", "cl-fp32", "cl-bf16", "cl-halfstep", "cl-fp64"])
def test_fused_backward_matches_split_and_float64(shape, dtype, layout):
    """The fused train_backward paths: NCHW runs of 4 KiB and more (a channel reduced, then its
    dx written while in cache), and channels-last tensors of few rows (each thread a strip of
    channels; 2-D input is channels-last). Their sums must be the split path's bits
    (backward_reduce), their dx backward_input's, on 2 threads and on 1, and all must match
    float64."""
    C = shape[1]
    x = make_input(shape, dtype, "cpu", layout, seed=8) * 2 + 1
    g = make_input(shape, dtype, "cpu", layout, seed=9)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, dtype=md) + 0.5
    dx, gw = _train_backward_as_split_path(g, x, w)
    gx64, gw64 = _train_backward_float64(g, x, w)
    assert_close(dx, gx64.to(dtype), dtype)
    assert_close(gw, gw64.to(md), md if dtype != torch.bfloat16 else dtype)


# Tile-fused cases: (dtype, spatial, C). The input is about half the last-level cache, so that on
# 2 threads the tiles of dy and x still fit in each thread's share.
TILE_FUSED_CASES = {
    "fp32-7x7": (torch.float32, (7, 7), 256),     # tiles of 16 channels, reduced as rows
    "fp32-28x28": (torch.float32, (28, 28), 32),  # tiles of one channel, whole-step runs
    "fp32-14x14": (torch.float32, (14, 14), 36),  # tiles of 4 (the split path's: 5), run by run
    "fp32-10x10": (torch.float32, (10, 10), 36),  # tiles of 8, the last of 4
    "fp32-12x12": (torch.float32, (12, 12), 36),  # tiles of 7, the last of 1
    "fp64-14x14": (torch.float64, (14, 14), 34),  # tiles of 2
    "fp64-7x7": (torch.float64, (7, 7), 40),      # tiles of 8 (the split path's: 10)
}


@pytest.mark.parametrize("dtype,spatial,C", list(TILE_FUSED_CASES.values()),
                         ids=list(TILE_FUSED_CASES))
def test_tile_fused_backward_matches_split_and_float64(dtype, spatial, C):
    """The tile-fused train_backward (short NCHW runs, tensors beyond the last-level cache, as
    sized here): each tile of channels reduced, then its dx written. Its sums must be the split
    path's bits (backward_reduce), its dx backward_input's, on 2 threads and on 1, and all must
    match float64."""
    shape = _beyond_cache_shape(dtype, spatial, C)
    x = make_input(shape, dtype, "cpu", "contiguous", seed=31)
    g = make_input(shape, dtype, "cpu", "contiguous", seed=32)
    w = torch.rand(C, dtype=dtype if dtype == torch.float64 else torch.float32) + 0.5
    dx, gw = _train_backward_as_split_path(g, x, w)
    gx64, gw64 = _train_backward_float64(g, x, w)
    assert_close(dx, gx64.to(dtype), dtype)
    assert_close(gw, gw64.to(w.dtype), w.dtype)


@pytest.mark.parametrize("dtype,spatial,C", list(TILE_FUSED_CASES.values()) + [
    (torch.float32, (56, 56), 8),    # runs of 12 KiB: a channel to a tile
    (torch.bfloat16, (56, 56), 8),
], ids=list(TILE_FUSED_CASES) + ["fp32-56x56", "bf16-56x56"])
@pytest.mark.parametrize("centered", [False, True], ids=["folded", "one-centered"])
def test_tile_fused_forward_matches_split_and_float64(dtype, spatial, C, centered):
    """The tile-fused train_forward (NCHW beyond the last-level cache, as sized here): each tile
    of channels reduced, then normalized. Its mean and var must be batch_stats' bits, its output
    normalize's, on 2 threads and on 1, and all must match float64. With every channel's mean
    folded into the shift, normalize runs its folded kernels; with channel 0's mean large, that
    channel stays centered and the others are folded."""
    shape = _beyond_cache_shape(dtype, spatial, C)
    x = make_input(shape, dtype, "cpu", "contiguous", seed=33)
    if centered:
        x[:, 0] += 3000
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, dtype=pd) + 0.5
    b = torch.randn(C, dtype=pd)
    one_thread, (y, mean, var) = _on_1_and_2_threads(ops.train_forward, x, w, b, 1e-5)
    assert all(torch.equal(p, q) for p, q in zip((y, mean, var), one_thread))
    mean_split, var_split = ops.batch_stats(x)
    for fused, split in ((mean, mean_split), (var, var_split)):
        assert_same_as_split_path(fused, split, pd)
    assert_same_as_split_path(y, ops.normalize(x, mean, var, w, b, 1e-5), dtype)
    y64 = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(),
                                         training=True)
    assert_close(y, y64.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("spatial", [(2, 8), (4, 8), (1, 33), (7, 7), (8, 16), (14, 14), (17, 33)])
@pytest.mark.parametrize("centered", [False, True], ids=["folded", "centered"])
@pytest.mark.parametrize("C", [7, 37, 197])
def test_contiguous_elementwise_stream_matches_float64(spatial, dtype, centered, C):
    """The NCHW elementwise maps walk a chunk of runs as one stream of vector steps, a step that
    straddles two runs mixing two channels' coefficients (for_each_step_of_runs), or, for runs of
    fewer than 4 steps within the cache (16 for bf16/fp16 normalize), tiles of channels as rows
    of positions with expanded coefficients (for_each_run_row; about 4096 positions a row):
    C = 197 is two whole tiles of 80 7x7 channels and a partial one of 37, whose rows end in a
    scalar tail (bf16 14x14: 9 tiles of 20 and one of 17; 1x33: 112 and 85; 4x8: 128 and 69),
    C = 37 one partial tile; runs of whole steps (8x16) go run by run. Spatial sizes below, at
    and above one step, on 2 threads so that chunks start mid-step; normalize with mean folded
    into the bias and centered (|mean| >> std), and the training backward_input map."""
    N = 5
    shape = (N, C) + spatial
    x = make_input(shape, dtype, "cpu", seed=11)
    g = make_input(shape, dtype, "cpu", seed=12)
    md = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(C, generator=gen, dtype=md) * (1e3 if centered else 0.5)
    var = torch.rand(C, generator=gen, dtype=md) + 0.5
    w = torch.rand(C, generator=gen, dtype=md) + 0.5
    b = torch.randn(C, generator=gen, dtype=md)
    sum_dy = torch.randn(C, generator=gen, dtype=md) * 10
    sum_dy_xmu = torch.randn(C, generator=gen, dtype=md) * 10
    n = N * spatial[0] * spatial[1]
    count = torch.tensor(float(n), dtype=md)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = ops.normalize(x, mean, var, w, b, 1e-5)
        dx = ops.backward_input(g, x, mean, var, w, sum_dy, sum_dy_xmu, count, 1e-5)
    finally:
        torch.set_num_threads(old)

    def pc(t):
        return t.double().view(1, C, 1, 1)

    xd, gd = x.double(), g.double()
    invstd = 1 / (pc(var) + 1e-5).sqrt()
    y_ref = (xd - pc(mean)) * invstd * pc(w) + pc(b)
    dx_ref = pc(w) * invstd * (gd - pc(sum_dy) / n
                               - (xd - pc(mean)) * invstd ** 2 * pc(sum_dy_xmu) / n)
    assert_close(y, y_ref.to(dtype), dtype)
    assert_close(dx, dx_ref.to(dtype), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_above_huge_page_threshold(layout):
    """Outputs of 32 MiB and more get huge-page advice (csrc/cpu/output_cache.cpp) before they are
    written; the results must not change. The reference is float64: over 2^20 rows torch's own
    float32 channels-last statistics drift by ~5e-4 here (ours by ~4e-7)."""
    shape = (4, 9, 512, 512)  # 37.7 MB in float32
    ref, ours = make_pair(4, shape[1], "cpu", torch.float32)
    ref = ref.double()
    x = make_input(shape, torch.float32, "cpu", layout).requires_grad_()
    g = make_input(shape, torch.float32, "cpu", layout, seed=3)
    x64 = x.detach().double().requires_grad_()
    y, y_ref = ours(x), ref(x64)
    assert y.nbytes >= 32 << 20
    assert_close(y, y_ref.float(), torch.float32)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x64, g.double())
    assert_close(gx, gx_ref.float(), torch.float32)
    assert_close(ours.running_var, ref.running_var.float(), torch.float32)
    ours.eval(), ref.eval()
    assert_close(ours(x), ref(x64).float(), torch.float32)


def test_state_dict_both_ways_and_old_checkpoints():
    ref = torch.nn.BatchNorm2d(7)
    ref.train()(torch.randn(4, 7, 3, 3))
    ours = bn_ext.BatchNorm2d(7)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    assert ours._version == ref._version
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(7)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # A checkpoint from before num_batches_tracked existed (version 1 metadata) still loads.
    old = copy.deepcopy(ref.state_dict())
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": 1}}
    fresh = bn_ext.BatchNorm2d(7)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0
    assert torch.equal(fresh.running_mean, ref.running_mean)


def test_constructor_matches_torch():
    for cls, tcls in [(bn_ext.BatchNorm1d, torch.nn.BatchNorm1d),
                      (bn_ext.BatchNorm2d, torch.nn.BatchNorm2d),
                      (bn_ext.BatchNorm3d, torch.nn.BatchNorm3d)]:
        for kwargs in [dict(), dict(affine=False), dict(track_running_stats=False),
                       dict(momentum=None, eps=1e-3), dict(dtype=torch.float64)] + \
                      ([dict(bias=False)] if TORCH_HAS_BN_BIAS else []):
            a, b = cls(5, **kwargs), tcls(5, **kwargs)
            assert isinstance(a, tcls)
            assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
            assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
            assert repr(a).replace("bn_ext.", "") == repr(b)
            for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
                assert p.dtype == q.dtype and p.shape == q.shape


@needs_bn_bias
@pytest.mark.parametrize("device", DEVICES)
def test_bias_false_matches_torch(device):
    ref = torch.nn.BatchNorm2d(5, bias=False, device=device)
    ours = bn_ext.BatchNorm2d(5, bias=False, device=device)
    ours.load_state_dict(ref.state_dict())
    run_steps(ref, ours, SHAPES[4], torch.float32, device, "contiguous", steps=2)


def test_track_running_stats_none():
    ref = torch.nn.BatchNorm2d(5, track_running_stats=None)
    ours = bn_ext.BatchNorm2d(5, track_running_stats=None)
    run_steps(ref, ours, SHAPES[4], torch.float32, "cpu", "contiguous", steps=2, train=True)
    run_steps(ref, ours, SHAPES[4], torch.float32, "cpu", "contiguous", steps=1, train=False)


def test_convert_model_nested():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.BatchNorm1d(8 * 6 * 6, affine=False)),
        torch.nn.ModuleDict({"bn3": torch.nn.BatchNorm3d(2, momentum=None)}),
    ).double()
    model[:3](torch.randn(4, 3, 8, 8, dtype=torch.float64))  # give the buffers something to keep
    model.eval()
    weight = model[1].weight
    state = copy.deepcopy(model.state_dict())
    converted = bn_ext.convert_model(model)
    assert converted is model
    assert type(model[1]) is bn_ext.BatchNorm2d
    assert type(model[2][1]) is bn_ext.BatchNorm1d
    assert type(model[3]["bn3"]) is bn_ext.BatchNorm3d
    assert model[1].weight is weight  # the same Parameter: optimizers keep working
    assert not model[1].training and model[3]["bn3"].momentum is None
    assert model[1].weight.dtype == torch.float64
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # converting again changes nothing; a bare BatchNorm is returned converted
    assert bn_ext.convert_model(model) is model and type(model[1]) is bn_ext.BatchNorm2d
    bn = torch.nn.BatchNorm2d(4)
    assert type(bn_ext.convert_model(bn)) is bn_ext.BatchNorm2d


def test_convert_model_alias_and_shared_layer():
    # One layer under two names of one parent (named_children lists it once), and one layer
    # shared by two parents: each becomes a single bn_ext layer, still shared.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)
            self.alias = self.bn
            self.branch = torch.nn.Sequential(self.bn)

    net = Net()
    assert bn_ext.convert_model(net) is net
    assert type(net.bn) is bn_ext.BatchNorm2d
    assert net.alias is net.bn and net.branch[0] is net.bn


def attach_forward_wrapper(module, log):
    """An instance-level forward, as accelerate's add_hook_to_module installs one: the layer's
    bound forward kept as _old_forward, forward a partial over the layer."""
    module._old_forward = module.forward

    def new_forward(layer, *args, **kwargs):
        log.append(type(layer))
        return layer._old_forward(*args, **kwargs)

    module.forward = functools.update_wrapper(functools.partial(new_forward, module),
                                              module._old_forward)


def test_convert_model_rebinds_instance_attributes_to_the_new_layer(monkeypatch):
    # Copied as they were, the wrapper would call the old torch layer, whose `training` flag
    # model.eval() no longer reaches: an "eval" call updated the running statistics.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    wrapper_calls = []
    attach_forward_wrapper(model[0], wrapper_calls)
    model[0].is_training = types.MethodType(lambda self: self.training, model[0])
    model[0].flag_of = functools.partial(lambda layer: layer.training, layer=model[0])
    model[0].run = functools.partial(model[0]._old_forward)  # over a method bound to it
    bn_ext.convert_model(model)
    model.eval()
    assert not model[0].is_training() and not model[0].flag_of()
    calls = count_bn_ext_calls(monkeypatch)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    y = model(x)
    assert torch.equal(model[0].run(x), y)
    del calls[1]
    assert calls == [x.shape] and wrapper_calls == [bn_ext.BatchNorm2d]
    assert int(model[0].num_batches_tracked) == 0
    assert_close(y, torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3),
                                                   model[0].weight, model[0].bias),
                 torch.float32)
    assert model[0].forward.__wrapped__.__self__ is model[0]
    bn_ext.revert_model(model)  # and back: torch's forward, on the layer that now holds it
    model.train()
    y = model(x)
    assert calls == [x.shape] and wrapper_calls == [bn_ext.BatchNorm2d, torch.nn.BatchNorm2d]
    assert int(model[0].num_batches_tracked) == 1 and model[0].is_training()
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), torch.float32)


def test_convert_model_of_a_layer_compiled_in_place():
    # nn.Module.compile() keeps a compiled call of the old layer; the new one is left uncompiled,
    # with a warning, rather than running the old layer (nothing is compiled here: .compile()
    # compiles on the first call).
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    model[0].compile()
    with pytest.warns(UserWarning, match=r"Module.compile\(\)"):
        bn_ext.convert_model(model)
    assert type(model[0]) is bn_ext.BatchNorm2d and model[0]._compiled_call_impl is None
    model.eval()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    assert_close(model(x), torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3),
                                                          model[0].weight, model[0].bias),
                 torch.float32)
    assert int(model[0].num_batches_tracked) == 0


def test_revert_model_gives_torch_layers_back():
    # Tools keyed on torch's exact classes refuse bn_ext layers (fuse_modules raises);
    # revert_model hands torch's layers back, holding the same objects, and they fuse.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.BatchNorm1d(8 * 6 * 6, affine=False)),
        torch.nn.ModuleDict({"bn3": torch.nn.BatchNorm3d(2, momentum=None)}))
    model[:4](torch.randn(4, 3, 8, 8))  # running statistics worth keeping
    model.eval()
    reference = copy.deepcopy(model)
    hook_calls = []
    model[1].register_forward_hook(lambda m, i, o: hook_calls.append(type(m)))
    bn_ext.convert_model(model)
    weight, running_mean = model[1].weight, model[1].running_mean
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    assert bn_ext.revert_model(model) is model
    assert type(model[1]) is torch.nn.BatchNorm2d
    assert type(model[3][1]) is torch.nn.BatchNorm1d
    assert type(model[4]["bn3"]) is torch.nn.BatchNorm3d and model[4]["bn3"].momentum is None
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert not model[1].training
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model[:4](x), reference[:4](x))
    assert hook_calls == [torch.nn.BatchNorm2d]  # the user's hook came along
    fused = torch.ao.quantization.fuse_modules(model, [["0", "1", "2"]])
    assert_close(fused[:4](x), reference[:4](x), torch.float32)
    # what is left converts again; a bare bn_ext layer comes back as a new torch layer
    assert type(bn_ext.convert_model(fused)[3][1]) is bn_ext.BatchNorm1d
    assert type(bn_ext.revert_model(bn_ext.BatchNorm2d(4))) is torch.nn.BatchNorm2d


def test_revert_model_lazy_layer(monkeypatch):
    model = torch.nn.Sequential(bn_ext.LazyBatchNorm2d())
    bn_ext.revert_model(model)
    assert type(model[0]) is torch.nn.LazyBatchNorm2d
    calls = count_bn_ext_calls(monkeypatch)
    x = torch.randn(4, 3, 2, 2)
    y = model(x)
    assert type(model[0]) is torch.nn.BatchNorm2d and calls == []
    assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), torch.float32)


LAZY = [(torch.nn.LazyBatchNorm1d, bn_ext.LazyBatchNorm1d, bn_ext.BatchNorm1d, (6, 5, 7)),
        (torch.nn.LazyBatchNorm2d, bn_ext.LazyBatchNorm2d, bn_ext.BatchNorm2d, (6, 5, 4, 3)),
        (torch.nn.LazyBatchNorm3d, bn_ext.LazyBatchNorm3d, bn_ext.BatchNorm3d, (3, 5, 2, 4, 3))]


def count_bn_ext_calls(monkeypatch):
    calls = []
    real = bn_ext.modules._batch_norm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(bn_ext.modules, "_batch_norm", spy)
    return calls


@pytest.mark.parametrize("torch_cls,lazy_cls,cls,shape", LAZY,
                         ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("how", ["bn_ext's own", "converted"])
def test_lazy_layers_run_on_bn_ext_from_the_first_call(monkeypatch, torch_cls, lazy_cls, cls,
                                                        shape, how):
    # A lazy layer infers num_features on its first call and then becomes cls_to_become: bn_ext's
    # lazy layers (and torch's, converted) become bn_ext's BatchNorm and run even that first call
    # on bn_ext.
    torch.manual_seed(0)
    ref = torch_cls(momentum=None, dtype=torch.float64)
    if how == "converted":
        model = torch.nn.Sequential(torch.nn.Identity(), torch_cls(momentum=None,
                                                                    dtype=torch.float64))
        hook_calls = []
        model[1].register_forward_hook(lambda m, i, o: hook_calls.append(type(m)))
        assert bn_ext.convert_model(model) is model
        ours = model[1]
    else:
        ours = lazy_cls(momentum=None, dtype=torch.float64)
    assert type(ours) is lazy_cls and ours.has_uninitialized_params()
    calls = count_bn_ext_calls(monkeypatch)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y_ref, y = ref(x), ours(x)
        assert type(ours) is cls and type(ref) is torch_cls.cls_to_become
        assert_close(y, y_ref, torch.float64)
        g_ref = torch.autograd.grad(y_ref.sin().sum(), (x, ref.weight, ref.bias))
        g = torch.autograd.grad(y.sin().sum(), (x, ours.weight, ours.bias))
        for a, b in zip(g, g_ref):
            assert_close(a, b, torch.float64)
    assert len(calls) == 3
    assert ours.num_features == shape[1] and int(ours.num_batches_tracked) == 3
    for k, v in ref.state_dict().items():
        assert_close(ours.state_dict()[k], v, torch.float64)
    if how == "converted":
        assert hook_calls == [cls] * 3  # the user's hook came along


@pytest.mark.parametrize("torch_cls,lazy_cls,cls,shape", LAZY[1:2],
                         ids=lambda v: getattr(v, "__name__", None))
def test_lazy_layer_materialized_by_load_state_dict(torch_cls, lazy_cls, cls, shape):
    # Loading a checkpoint into an uninitialized lazy layer materializes it (torch's load hook);
    # a converted layer's hook still reaches the Parameters the new layer holds.
    src = torch.nn.BatchNorm2d(shape[1])
    src(torch.randn(shape))
    for moved in (False, True):
        converted = bn_ext.convert_model(torch.nn.Sequential(torch_cls()))
        for ours in (lazy_cls(), converted[0]):
            if moved:  # .to() puts new buffer objects in the layer: the load hook must see them
                ours.double()
            ours.load_state_dict(src.state_dict())
            assert not ours.has_uninitialized_params()
            ours.eval(), src.eval()
            x = torch.randn(shape)
            dtype = torch.float64 if moved else torch.float32
            assert ours.running_mean.dtype == ours.weight.dtype == dtype
            assert_close(ours(x.to(dtype)), src.to(dtype)(x.to(dtype)), dtype)
            src.float()
            assert type(ours) is cls


def test_convert_model_initialized_lazy_layer_is_a_torch_batchnorm():
    model = torch.nn.Sequential(torch.nn.LazyBatchNorm2d())
    model(torch.randn(4, 3, 2, 2))
    assert type(model[0]) is torch.nn.BatchNorm2d
    bn_ext.convert_model(model)
    assert type(model[0]) is bn_ext.BatchNorm2d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [1.5, -0.5, 1.0, 0.0])
def test_momentum_outside_unit_interval_as_torch(device, momentum):
    # torch takes any float momentum (outside [0, 1] the average extrapolates), and so do we
    ref, ours = make_pair(4, 3, device, torch.float64, momentum=momentum)
    run_steps(ref, ours, (3, 3, 7, 6), torch.float64, device, "contiguous", steps=2, train=True)
    x = torch.randn(8, 3, dtype=torch.float64, device=device)
    rm, rv = torch.zeros(3, dtype=x.dtype, device=device), torch.ones(3, dtype=x.dtype,
                                                                      device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=momentum)
    bn_ext.batch_norm(x, rm2, rv2, training=True, momentum=momentum)
    assert_close(rm2, rm, torch.float64)
    assert_close(rv2, rv, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch", [4, 0], ids=["batch4", "empty"])
def test_count_that_wraps_to_zero(device, momentum, batch):
    """A uint8 num_batches_tracked of 255 wraps to 0 when counted. momentum=None averages over
    that count: torch's module divides by it (ZeroDivisionError, the count already bumped), and
    bn_ext refuses with a ValueError, every buffer as it was, where the factor 1/0 would have
    written NaN into the running statistics. A float momentum counts on, wrapping as torch's
    add_(1) does. An empty batch only counts, and is refused or counted the same way (it used
    to wrap the count silently with momentum=None)."""
    ref, ours = make_pair(4, 3, device, torch.float32, momentum=momentum)
    for m in (ref, ours):
        m.num_batches_tracked = torch.tensor(255, dtype=torch.uint8, device=device)
    x = make_input((batch, 3, 5, 5), torch.float32, device)
    if momentum is None:
        with pytest.raises(ZeroDivisionError):
            ref(x)
        with pytest.raises(ValueError, match="num_batches_tracked \\+ 1 batches, which is 0"):
            ours(x)
        # the same where torch's batch_norm runs instead of the ops (forward-mode AD here)
        with fwAD.dual_level(), pytest.raises(ValueError, match="which is 0"):
            ours(fwAD.make_dual(x, torch.ones_like(x)))
        assert int(ours.num_batches_tracked) == 255
        assert torch.equal(ours.running_mean, torch.zeros(3, device=device))
        assert torch.equal(ours.running_var, torch.ones(3, device=device))
        return
    assert_close(ours(x), ref(x), torch.float32)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 0
    assert_close(ours.running_mean, ref.running_mean, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [(torch.int32, 5), (torch.int16, 5), (torch.uint8, 5),
                                   (torch.float32, 5), (torch.float64, 5),
                                   (torch.float16, 2047)],
                         ids=lambda c: f"{str(c[0]).split('.')[-1]}-{c[1]}")
def test_count_of_another_dtype_counts_as_torchs(device, momentum, count):
    """A checkpoint loaded with assign=True (or an assignment) can leave num_batches_tracked of
    another dtype than int64. torch counts in it with add_(1), momentum=None averaging over
    float(num_batches_tracked); a float16 count stops at 2048."""
    dtype, start = count
    ref, ours = make_pair(4, 3, device, torch.float64, momentum=momentum)
    state = ref.state_dict()
    state["num_batches_tracked"] = torch.tensor(start, dtype=dtype, device=device)
    ref.load_state_dict(state, assign=True)
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    for step in range(3):
        version = ours.num_batches_tracked._version
        x = make_input((3, 3, 7, 6), torch.float64, device, seed=step, mean=step)
        assert_close(ours(x), ref(x), torch.float64)
        assert_close(ours.running_mean, ref.running_mean, torch.float64)
        assert_close(ours.running_var, ref.running_var, torch.float64)
        assert ours.num_batches_tracked.dtype == dtype
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)
        assert ours.num_batches_tracked._version == version + 1  # as add_(1): one bump
    # running_stats_update (SyncBatchNorm's update) counts the same way
    mean, var = torch.rand(3, dtype=torch.float64, device=device), torch.rand(
        3, dtype=torch.float64, device=device)
    n = torch.tensor(40.0, dtype=torch.float64, device=device)
    rm, rv, nbt = ours.running_mean.clone(), ours.running_var.clone(), ours.num_batches_tracked
    ops.running_stats_update(ours.running_mean, ours.running_var, nbt, mean, var, n, momentum)
    nbt64 = ref.num_batches_tracked.long()
    ops.running_stats_update(rm, rv, nbt64, mean, var, n,
                             momentum if momentum is not None or dtype != torch.float16 else
                             1 / 2048)
    assert torch.equal(ours.running_mean, rm) and torch.equal(ours.running_var, rv)
    assert torch.equal(nbt, (ref.num_batches_tracked + 1).to(dtype))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mkldnn_input_as_torch(training):
    """MKL-DNN (oneDNN) tensors, which torch's layers take: torch's batch_norm runs them."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without MKL-DNN")
    ref, ours = make_pair(4, 3, "cpu", torch.float32)
    ref.train(training), ours.train(training)
    for step in range(2):
        x = make_input((4, 3, 5, 5), torch.float32, "cpu", seed=step, mean=step).to_mkldnn()
        y_ref, y = ref(x), ours(x)
        assert y.is_mkldnn
        assert_close(y.to_dense(), y_ref.to_dense(), torch.float32)
        assert_close(ours.running_mean, ref.running_mean, torch.float32)
        assert_close(ours.running_var, ref.running_var, torch.float32)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def test_count_of_bool_dtype_refused_with_buffers_kept():
    m = bn_ext.BatchNorm2d(3)
    m.num_batches_tracked = torch.tensor(True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="num_batches_tracked must be a tensor with one "
                                           "element of an integer or floating dtype"):
        m(torch.randn(4, 3, 2, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_tracking_with_statistics_set_to_none_still_counts(device, momentum):
    # track_running_stats=True, running_mean/var replaced by None: torch normalizes with the
    # batch statistics and still counts the batch
    ref, ours = make_pair(4, 3, device, torch.float64, momentum=momentum)
    for m in (ref, ours):
        m.running_mean = m.running_var = None
    for step in range(2):
        x = make_input((3, 3, 7, 6), torch.float64, device, seed=step)
        assert_close(ours(x), ref(x), torch.float64)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval(), ours.eval()  # eval without statistics: the batch's, and no count
    assert_close(ours(x), ref(x), torch.float64)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fill", ["+inf", "-inf", "both", "whole channel"])
def test_inf_in_a_channel_gives_torchs_running_mean(device, layout, dtype, fill):
    # An inf among the samples of the shift k once made k inf, every x - k NaN and the mean NaN;
    # torch's mean (and running mean) is +-inf. Small tensors: every element is a sample.
    ref, ours = make_pair(4, 3, device, dtype)
    x = make_input((4, 3, 3, 2), dtype, device, layout).clone()
    if fill == "whole channel":
        x[:, 1] = float("inf")
    else:
        x[2, 1, 1, 1] = float("-inf") if fill == "-inf" else float("inf")
        if fill == "both":
            x[0, 1, 0, 0] = float("-inf")
    # torch's CPU kernels are the reference. On the GPU torch's own kernels disagree here (seen on
    # the H200, torch 2.11, cuDNN 9.19): its native channels-last kernel (float32 and float64) and
    # cuDNN's channels-last float32 one give a NaN running mean where its CPU kernels, its
    # contiguous GPU kernels and the mathematics give +-inf, as bn_ext does on every layout.
    ref = ref.cpu()
    y_ref, y = ref(x.cpu()), ours(x).cpu()
    rm, rv = ours.running_mean.cpu(), ours.running_var.cpu()
    assert torch.equal(rm.isnan(), ref.running_mean.isnan())
    assert torch.equal(rm.isinf(), ref.running_mean.isinf())
    assert rm[1] == ref.running_mean[1] or (ref.running_mean[1].isnan() and rm[1].isnan())
    assert torch.isnan(rv[1]) and torch.isnan(ref.running_var[1])
    assert torch.isnan(y[:, 1]).all() and torch.isnan(y_ref[:, 1]).all()
    assert_close(y[:, [0, 2]], y_ref[:, [0, 2]], dtype)
    mean, _ = ops.batch_stats(x)
    assert mean[1] == x[:, 1].to(mean.dtype).mean() or (fill == "both" and mean[1].isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,value", [(torch.float32, 3e38), (torch.bfloat16, -3e38),
                                         (torch.float64, 1.7e308), (torch.float32, 2e37)],
                         ids=["fp32", "bf16", "fp64", "fp32-2e37"])
@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (8, 3, 40, 40)], ids=["small", "large"])
def test_constant_channel_near_the_largest_finite_value(device, layout, dtype, value, shape):
    # The shift k is the mean of 32 samples. Summed before being scaled, 32 samples of a value
    # above max / 32 overflowed: k was inf (then 0), the sums inf, and a constant channel's mean
    # inf and var NaN. Its statistics are the value and 0 (the float64 reference's).
    ref, ours = make_pair(4, 3, device, torch.float64 if dtype == torch.float64 else torch.float32)
    x = make_input(shape, dtype, device, layout).clone()
    x[:, 1] = value
    mean, var = ops.batch_stats(x)
    assert mean[1].item() == x[0, 1, 0, 0].item() and var[1].item() == 0
    y = ours(x)
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], ours.bias[1].item()))
    rm, rv = ref.running_mean.clone(), ref.running_var.clone()
    rm[1] = 0.9 * rm[1] + 0.1 * x[0, 1, 0, 0].to(rm.dtype)
    rv[1] = 0.9 * rv[1]
    torch.testing.assert_close(ours.running_mean[1], rm[1])
    torch.testing.assert_close(ours.running_var[1], rv[1])
    # the other channels as ever
    y_ref = ref(x)
    assert_close(y[:, [0, 2]], y_ref[:, [0, 2]], dtype)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrapper_subclass_input_counts_a_batch_once(training, momentum):
    """A tensor subclass that holds other tensors and runs each op on every one of them
    (torch's TwoTensor here; DTensor below) would run train_forward, and with it the
    running-statistics update and the count, once per inner tensor. Such input runs torch's
    batch_norm, as under torch.func, so the module counts the batch once, as torch's does."""
    from torch.testing._internal.two_tensor import TwoTensor
    ref, ours = make_pair(4, 3, "cpu", torch.float32, momentum=momentum)
    ref.train(training), ours.train(training)
    for step in range(2):
        a = make_input((4, 3, 5, 5), torch.float32, "cpu", seed=step)
        g = make_input((4, 3, 5, 5), torch.float32, "cpu", seed=step + 10)
        x_ref, x = (TwoTensor(a, a * 2).requires_grad_() for _ in range(2))
        y_ref, y = ref(x_ref), ours(x)
        assert type(y) is TwoTensor
        y_ref.backward(TwoTensor(g, g))
        y.backward(TwoTensor(g, g))
        for got, want in ((y, y_ref), (x.grad, x_ref.grad)):
            assert_close(got.a, want.a, torch.float32)
            assert_close(got.b, want.b, torch.float32)
        counted = (step + 1) * training
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == counted
        assert_close(ours.running_mean, ref.running_mean, torch.float32)
        assert_close(ours.running_var, ref.running_var, torch.float32)


_DTENSOR_CASE = """
import os, tempfile, torch, torch.distributed as dist, bn_ext
from torch.distributed.tensor import (DeviceMesh, Replicate, Shard, distribute_module,
                                      distribute_tensor)
store = tempfile.TemporaryDirectory()  # the group's file store, removed at exit
dist.init_process_group("gloo", init_method="file://" + os.path.join(store.name, "store"),
                        rank=0, world_size=1)
mesh = DeviceMesh("cpu", [0])
for training in (True, False):
    for placement in (Replicate(), Shard(0)):
        results = []
        for cls in (torch.nn.BatchNorm2d, bn_ext.BatchNorm2d):
            torch.manual_seed(0)
            m = distribute_module(cls(3).train(training), mesh)
            x = distribute_tensor(torch.randn(4, 3, 5, 5), mesh, [placement]).requires_grad_()
            try:
                y = m(x)
            except NotImplementedError as e:  # torch 2.11's DTensor has no batch_norm rule
                results.append(type(e))
                continue
            y.square().sum().backward()
            assert type(y).__name__ == "DTensor", type(y)
            results.append([y.full_tensor(), x.grad.full_tensor(), m.weight.grad.full_tensor()]
                           + [b.full_tensor() for b in m.buffers()])
        ref, ours = results
        if ref is NotImplementedError:
            assert ours is NotImplementedError, "torch refused the DTensor, bn_ext took it"
            print("refused as torch")
            continue
        for want, got in zip(ref, ours, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
dist.destroy_process_group()
print("ok")
"""


def test_dtensor_input_runs_as_torchs():
    """DTensor (replicated or sharded over the batch) takes torch's batch_norm, whose sharding
    rules DTensor has (from some torch release after 2.11), where bn_ext's ops would fail for
    want of one: outputs, gradients and buffers are torch's, or, where torch's DTensor has no
    rule, the error is. A one-rank gloo group, in a child process."""
    pytest.importorskip("torch.distributed.tensor")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    proc = run_python(_DTENSOR_CASE)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", range(4))
def test_random_call_sequences_match_torch(device, block):
    """fuzz_modules.py's call sequences (modes, momentum, flags, state loads, bad inputs,
    backwards) on bn_ext's layers and torch's, for a fixed 1000 seeds in four blocks: the same
    outcomes, errors and state, and values no further from float64 than the tolerance or
    torch's own error allow. Longer runs: python tests/fuzz_modules.py --seconds S."""
    import fuzz_modules

    for seed in range(block * 250, (block + 1) * 250):
        fuzz_modules.run_sequence(seed, device)
