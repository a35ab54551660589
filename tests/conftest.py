"""Shared fixtures: devices, dtypes, tolerances and input layouts.

Tests are parametrized over devices; CUDA cases skip where there is no GPU or no CUDA build.
"""
import inspect
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import bn_ext

HAS_CUDA = torch.cuda.is_available() and bn_ext.has_cuda_kernels()

# tests/cuda_emulator/build.py runs this suite on a build whose ops run the CUDA kernels, compiled
# for the host, on CPU tensors; it sets BN_EXT_CUDA_EMULATED=1.
CUDA_EMULATED = os.environ.get("BN_EXT_CUDA_EMULATED") == "1"

# Unless BN_EXT_CUDA_PERSISTENT=0, the CUDA kernels' train_forward and train_backward may take
# the single-pass kernels (by default the one-block kernel, where a channel fits in a block;
# with =1 the cooperative ones too), whose sums are merged in an order of their own (their block
# or grid plan): they agree with the split ops (batch_stats + normalize, backward_reduce +
# backward_input) to rounding, where every other path gives the split ops' bits.
SINGLE_PASS = os.environ.get("BN_EXT_CUDA_PERSISTENT") != "0"


# torch's BatchNorm constructors take a keyword-only `bias` from torch 2.13 on; bn_ext's modules
# have the installed torch's constructor, so the tests of bias=False need it too.
TORCH_HAS_BN_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters
needs_bn_bias = pytest.mark.skipif(not TORCH_HAS_BN_BIAS,
                                   reason="torch's BatchNorm has no bias= before torch 2.13")

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


def assert_same_as_split_path(fused, split, dtype):
    """A fused training op's output against the split ops': the same bits, or, from the
    single-pass CUDA kernels, within the dtype's tolerance."""
    if SINGLE_PASS and (fused.is_cuda or CUDA_EMULATED):
        assert_close(fused, split, dtype)
    else:
        assert torch.equal(fused, split)

def float64_training_reference(x, dy, w, b, eps=1e-5):
    """torch's training batch norm in float64: (y, mean, biased var, dx, grad_weight,
    grad_bias), for the output dy."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True, eps=eps)
    gx64, gw64, gb64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    dims = [0] + list(range(2, x.dim()))
    v64, m64 = torch.var_mean(x.detach().double(), dims, correction=0)
    return y64.detach(), m64, v64, gx64, gw64, gb64


# The CUDA path's run-time switches (README, "At run time, on the GPU"), each read on every call.
CUDA_SWITCHES = ("BN_EXT_CUDA_PERSISTENT", "BN_EXT_CUDA_NARROW_VECTORS",
                 "BN_EXT_CUDA_ONE_BLOCK_THREADS", "BN_EXT_CUDA_TWO_SWEEPS",
                 "BN_EXT_CUDA_FOLD_FINALIZE", "BN_EXT_CUDA_PDL", "BN_EXT_CUDA_REVERSE_MAP",
                 "BN_EXT_CUDA_MERGING_MAP", "BN_EXT_CUDA_NARROW_ROWS", "BN_EXT_CUDA_FIT_WAVE",
                 "BN_EXT_CUDA_SEMI_PERSISTENT")


def clear_cuda_switches(monkeypatch):
    """Unsets every CUDA switch for the test (CI runs the emulated suite under
    BN_EXT_CUDA_PERSISTENT=1 and =0 too): the default path, which a test then changes."""
    for var in CUDA_SWITCHES:
        monkeypatch.delenv(var, raising=False)


def same_bits(ours, theirs):
    """Whether two results (a tensor, or a sequence of them) are equal to the bit, item by item
    (NaNs where both have them excepted: torch.equal)."""
    def items(r):
        return list(r) if isinstance(r, (tuple, list)) else [r]
    ours, theirs = items(ours), items(theirs)
    return len(ours) == len(theirs) and all(torch.equal(a, c) for a, c in zip(ours, theirs))


def train_ops(x, dy, w, b, eps=1e-5):
    """The raw training ops, forward then backward: (y, mean, var, dx, grad_weight, grad_bias)."""
    y, mean, var = torch.ops.bn_ext.train_forward(x, w, b, eps)
    dx, gw, gb = torch.ops.bn_ext.train_backward(dy, x, mean, var, w, eps)
    return y, mean, var, dx, gw, gb


def assert_training_matches_float64(results, x, dy, w, b, others=None):
    """train_ops' results against float64_training_reference (and, when given, another path's
    results), within x's dtype's tolerance, or the math type's for the per-channel ones."""
    math = torch.float64 if x.dtype == torch.float64 else torch.float32
    names = ["y", "mean", "var", "dx", "grad_weight", "grad_bias"]
    refs = float64_training_reference(x, dy, w, b)
    for i, (name, ours, ref) in enumerate(zip(names, results, refs)):
        tol = x.dtype if ours.dtype == x.dtype else math
        assert_close(ours, ref.to(ours.dtype), tol, msg=f"{name} vs float64")
        if others is not None:
            assert_close(ours, others[i], tol, msg=f"{name} vs the other path")


def run_python(code, timeout=120, **env):
    """`python -c code` in a child process with extra environment variables, importing the bn_ext
    this process imported (`python -c` puts its working directory first on sys.path, and from the
    repository root that is the unbuilt source folder, so it runs from the temp directory)."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(bn_ext.__file__)))
    path = os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=tempfile.gettempdir())


def make_input(shape, dtype, device, layout="contiguous", seed=0, mean=0.5, std=2.0):
    """An (N, C, *) input in the requested memory layout.

    contiguous: plain; channels_last: C innermost (channels_last(_3d) for 4D/5D, a transposed
    (N, L, C) for 3D, plain for 2D); sliced: a non-dense view (every other element of the last
    dimension); transposed: the last two dimensions swapped (dense, but neither layout; for 2D
    an (N, C) view of a (C, N) tensor); channels_last_batch_sliced: every other sample of a
    channels_last tensor (C innermost and each sample dense, the batch stride doubled);
    channels_last_dim2_sliced: every other index of dim 2 (L, H or D) of a channels_last tensor.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last_batch_sliced":
        big = (2 * shape[0],) + tuple(shape[1:])
        return make_input(big, dtype, device, "channels_last", seed, mean, std)[::2]
    if layout == "channels_last_dim2_sliced":
        big = tuple(shape[:2]) + (2 * shape[2],) + tuple(shape[3:])
        return make_input(big, dtype, device, "channels_last", seed, mean, std)[:, :, ::2]
    if layout == "sliced":
        big = list(shape)
        big[-1] *= 2
        x = torch.randn(big, generator=g, dtype=torch.float64) * std + mean
        x = x.to(dtype).to(device)[..., ::2]
    elif layout == "transposed":
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


TORCH_CLS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
             5: torch.nn.BatchNorm3d}
OURS_CLS = {2: bn_ext.BatchNorm1d, 3: bn_ext.BatchNorm1d, 4: bn_ext.BatchNorm2d,
            5: bn_ext.BatchNorm3d}


def make_pair(ndim, C, device, param_dtype, affine=True, track=True, momentum=0.1):
    """torch's BatchNorm for an ndim-D input and bn_ext's, with the same non-trivial state."""
    ref = TORCH_CLS[ndim](C, momentum=momentum, affine=affine, track_running_stats=track,
                          device=device, dtype=param_dtype)
    if affine:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C, generator=g) + 0.5)
            ref.bias.copy_(torch.linspace(-1, 1, C))
    ours = OURS_CLS[ndim](C, momentum=momentum, affine=affine, track_running_stats=track,
                          device=device, dtype=param_dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_steps(ref, ours, shape, dtype, device, layout, steps=3, train=True, param_tol=None):
    """`steps` calls of both modules on fresh inputs (a drifting mean), comparing after each:
    outputs, input and parameter gradients, running statistics, num_batches_tracked, and that
    the input is untouched.

    Parameter gradients and running statistics are compared at the tolerance of `param_tol`,
    by default the input's dtype: they sum n products of input-dtype values, so the input's
    dtype bounds their precision even with float32 parameters (torch rounds some to bfloat16).
    """
    ptol = param_tol or dtype
    ref.train(train)
    ours.train(train)
    for step in range(steps):
        # Each module gets its own input in the layout asked: clone() would make a non-dense
        # view (sliced, channels_last_batch_sliced) a dense tensor.
        x_before = make_input(shape, dtype, device, layout, seed=10 + step, mean=0.5 * step)
        xr, xo = (make_input(shape, dtype, device, layout, seed=10 + step, mean=0.5 * step)
                  .requires_grad_() for _ in range(2))
        assert xo.stride() == x_before.stride()
        yr, yo = ref(xr), ours(xo)
        assert yo.dtype == yr.dtype and yo.shape == yr.shape
        assert_close(yo, yr, dtype, msg=f"output, step {step}")
        g = make_input(shape, dtype, device, "contiguous", seed=100 + step)
        yr.backward(g)
        yo.backward(g)
        assert_close(xo.grad, xr.grad, dtype, msg=f"grad_input, step {step}")
        if ref.affine:
            assert ours.weight.grad.dtype == ref.weight.grad.dtype
            assert_close(ours.weight.grad, ref.weight.grad, ptol, msg=f"grad_weight, step {step}")
            if ref.bias is not None:
                assert_close(ours.bias.grad, ref.bias.grad, ptol, msg=f"grad_bias, step {step}")
            else:
                assert ours.bias is None
            ref.zero_grad()
            ours.zero_grad()
        assert torch.equal(xo.detach(), x_before), "the input was modified"
        if ref.track_running_stats:
            assert ours.running_mean.dtype == ref.running_mean.dtype
            assert_close(ours.running_mean, ref.running_mean, ptol)
            assert_close(ours.running_var, ref.running_var, ptol)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None


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
