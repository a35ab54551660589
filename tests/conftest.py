"""Shared fixtures: devices, dtypes, tolerances and input layouts.

Tests are parametrized over devices; CUDA cases skip where there is no GPU or no CUDA build.
"""
import pytest
import torch

import bn_ext

HAS_CUDA = torch.cuda.is_available() and bn_ext.has_cuda_kernels()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")),
]

# (atol, rtol) against torch.nn.BatchNorm*d computing in the same dtype. Low-precision outputs are
# rounded by both sides, so a difference of one or two output ulps is expected.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close(actual, expected, dtype, scale=True, msg=""):
    """assert_close with the dtype's tolerance; atol grows with the reference's magnitude."""
    atol, rtol = TOL[dtype]
    if scale and expected.numel():
        atol = atol * max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual.detach(), expected.detach(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=msg or None)


def make_input(shape, dtype, device, layout="contiguous", seed=0, mean=0.5, std=2.0):
    """An (N, C, *) input in the requested memory layout.

    contiguous: plain; channels_last: C innermost (channels_last(_3d) for 4D/5D, a transposed
    (N, L, C) for 3D, plain for 2D); sliced: a non-dense view (every other element of the last
    dimension); transposed: the last two dimensions swapped (dense, but neither layout).
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        big = list(shape)
        big[-1] *= 2
        x = torch.randn(big, generator=g, dtype=torch.float64) * std + mean
        x = x.to(dtype).to(device)[..., ::2]
    elif layout == "transposed" and len(shape) >= 3:
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        x = (torch.randn(s, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(device)
        x = x.transpose(-1, -2)
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
        x = x.to(device)
        if layout == "channels_last" and len(shape) >= 3:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    assert tuple(x.shape) == tuple(shape)
    return x


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")


# Hypothesis explores randomly on a developer's machine and replays a fixed sequence in CI, so a
# CI run is reproducible.
try:
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
