"""Hypothesis: random shapes, layouts and options against a float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_ext
from conftest import make_input


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 40))
    spatial = [draw(st.integers(1, 9)) for _ in range(ndim - 2)]
    shape = (n, c, *spatial)
    values = n
    for s in spatial:
        values *= s
    if values == 1:
        shape = (2, *shape[1:])
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced", "transposed"]))
    affine = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, 0.5, 1.0]))
    # No subnormal means: torch 2.4's inductor loads kernels built with -ffast-math, which sets
    # flush-to-zero for the whole process, and hypothesis then refuses to draw subnormals.
    mean = draw(st.floats(-100, 100, allow_subnormal=False))
    std = draw(st.floats(0.01, 10))
    return shape, layout, affine, momentum, mean, std


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_shapes_match_float64_reference(case):
    shape, layout, affine, momentum, mean, std = case
    x = make_input(shape, torch.float32, "cpu", layout, mean=mean, std=std).requires_grad_()
    C = shape[1]
    w = (torch.rand(C) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C).requires_grad_() if affine else None
    rm, rv = torch.zeros(C), torch.ones(C)
    y = bn_ext.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5)

    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if affine else None
    bd = b.detach().double().requires_grad_() if affine else None
    rmd, rvd = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    yd = torch.nn.functional.batch_norm(xd, rmd, rvd, wd, bd, True, momentum, 1e-5)
    assert y.shape == yd.shape and y.dtype == torch.float32
    # The float32 batch mean is off by up to half an ulp of |mean|, which (x - mean) * invstd
    # carries into the output: an error of eps32 * |mean| * w * invstd that grows with
    # |mean| / std (torch has it too, larger: it folds the mean into a shift).
    invstd = (xd.detach().var([0] + list(range(2, xd.dim())), unbiased=False) + 1e-5).rsqrt()
    gain = invstd * (wd.detach() if affine else 1)
    centering = torch.finfo(torch.float32).eps * (abs(mean) + 4 * std) * gain.max().item()
    torch.testing.assert_close(y.double(), yd, rtol=1e-4,
                               atol=5e-5 * max(1, yd.abs().max().item()) + 2 * centering)
    torch.testing.assert_close(rm.double(), rmd, atol=1e-4 * max(1, abs(mean)), rtol=1e-5)
    torch.testing.assert_close(rv.double(), rvd, atol=1e-5, rtol=1e-3)

    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y.backward(g.float())
    yd.backward(g)
    # grad_input = w*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)) cancels (to exactly 0 when
    # there are two values per channel), so its float32 error scales with w*invstd*|dy|, not
    # with its own size; xhat carries the centering error above.
    scale = max(1.0, gain.max().item() * g.abs().max().item()) * (1 + 1e4 * centering)
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-4 * scale, rtol=1e-3)
    if affine:
        # grad_weight = sum(dy * xhat): the centering error of xhat (relative to its unit scale)
        # times sum(|dy|).
        rel = torch.finfo(torch.float32).eps * (abs(mean) + 4 * std) * invstd.max().item()
        dy_l1 = g.abs().sum().item()
        for ours, ref in ((w.grad, wd.grad), (b.grad, bd.grad)):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4,
                                       atol=1e-4 * max(1.0, ref.abs().max().item())
                                       + 2 * rel * dy_l1)
