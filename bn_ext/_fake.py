"""The ops' fake kernels, for torch.compile, FakeTensorMode and meta tensors.

A fake kernel returns what its op would return (shapes, dtypes, strides) without computing it,
and refuses what its op refuses: a fake or meta call that the real op would reject must raise,
not hand back a plausible tensor (torch's own meta kernels raise for a weight of the wrong
size, say). So each kernel first runs the checks of csrc/ops.cpp's front door, mirrored below
check for check, in the same order and with the same exception types; tests/test_ops.py draws
random calls and holds the two to the same outcome. The messages differ only in how they spell
a dtype (torch.float32 here, Float in C++). The two ops written in Python,
_differentiable_train_backward and _differentiable_normalize_backward (functional.py), run
these checks too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 input computes in float64; float32, bfloat16 and float16 in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_dtype(input: Tensor, weight: Optional[Tensor]) -> torch.dtype:
    return weight.dtype if weight is not None else _math_dtype(input.dtype)


# ---- ops.cpp's argument checks, in Python ----------------------------------------------------

def _check(cond, op: str, message: str, error=RuntimeError) -> None:
    if not cond:
        raise error(f"bn_ext.{op}: {message}")


def _check_input(op: str, input: Tensor) -> None:
    _check(input.dim() >= 2, op, f"expected input of shape (N, C, *) with at least 2 dimensions, "
           f"got {input.dim()}D")
    _check(input.dtype in _SUPPORTED_DTYPES, op, f"input has dtype {input.dtype}; supported are "
           f"float64, float32, bfloat16 and float16", NotImplementedError)
    _check(input.layout == torch.strided, op, "input must be a strided (dense) tensor")


def _check_same_device(op: str, input: Tensor, t: Tensor, name: str) -> None:
    _check(t.device == input.device, op, f"{name} is on {t.device} but input is on "
           f"{input.device}; all tensors must be on one device")


def _check_channel_count(op: str, input: Tensor, t: Optional[Tensor], name: str) -> None:
    if t is None:
        return
    C = input.shape[1]
    _check_same_device(op, input, t, name)
    _check(t.numel() == C, op, f"{name} should contain {C} elements (one per channel of the "
           f"input), got {t.numel()}")


def _check_channel_vector(op: str, input: Tensor, t: Optional[Tensor], name: str) -> None:
    """Absent (None), or C elements of the input's dtype or its math dtype (float32 with a
    float16/bfloat16 input)."""
    if t is None:
        return
    _check_channel_count(op, input, t, name)
    reduced = input.dtype in (torch.float16, torch.bfloat16)
    _check(t.dtype in (input.dtype, _math_dtype(input.dtype)), op,
           f"{name} has dtype {t.dtype} which cannot be used with {input.dtype} input; expected "
           f"{input.dtype}{' or float32' if reduced else ''}")


def _check_eps(op: str, eps: float) -> None:
    _check(eps >= 0, op, f"eps must be non-negative, got {eps}")


def _check_grad_out(op: str, input: Tensor, grad_out: Tensor) -> None:
    _check_same_device(op, input, grad_out, "grad_out")
    _check(grad_out.shape == input.shape, op, f"grad_out has shape {list(grad_out.shape)} but "
           f"input has shape {list(input.shape)}")
    _check(grad_out.dtype == input.dtype, op, f"grad_out has dtype {grad_out.dtype} but input "
           f"has dtype {input.dtype}")


def _check_backward_args(op, grad_out, input, mean, var, weight, eps) -> None:
    _check_input(op, input)
    _check_grad_out(op, input, grad_out)
    _check_channel_vector(op, input, mean, "mean")
    _check_channel_vector(op, input, var, "var")
    _check_channel_vector(op, input, weight, "weight")
    _check_eps(op, eps)


def _check_updatable(op: str, t: Tensor, name: str) -> None:
    # 1 is at::MemOverlap::Yes (0 No, 2 TooHard)
    _check(torch._debug_has_internal_overlap(t) != 1, op, f"{name} has elements that share "
           f"memory (an expanded tensor?) and cannot be updated in place; pass a tensor of its "
           f"own, e.g. {name}.clone()")
    _check(not t.is_inference() or torch.is_inference_mode_enabled(), op, f"{name} is an "
           f"inference tensor (made under torch.inference_mode()), and an inplace update to an "
           f"inference tensor outside InferenceMode is not allowed; replace it with a clone made "
           f"outside inference mode")


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_update_args(op, like, num_batches_tracked, momentum, updatable=True) -> None:
    """updatable=False: not _check_updatable (SyncBatchNorm under torch.compile, see there)."""
    if num_batches_tracked is not None:
        _check_same_device(op, like, num_batches_tracked, "num_batches_tracked")
        dt = num_batches_tracked.dtype
        _check(num_batches_tracked.numel() == 1 and (dt.is_floating_point or dt in _INT_DTYPES),
               op,
               f"num_batches_tracked must be a tensor with one element of an integer or floating "
               f"dtype (int64, as in torch's modules), got {num_batches_tracked.numel()} "
               f"element(s) of {dt}")
        if updatable:
            _check_updatable(op, num_batches_tracked, "num_batches_tracked")
    _check(momentum is not None or num_batches_tracked is not None, op,
           "momentum=None (cumulative average) needs num_batches_tracked")


def _check_running_stats(op, like, C, running_mean, running_var, num_batches_tracked,
                         momentum, updatable=True) -> None:
    """running_stats_update's running statistics: C elements of any supported floating dtype
    (the op is fed our own statistics) on like's device, updatable; then the count and
    momentum."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_same_device(op, like, t, name)
        _check(t.numel() == C, op, f"{name} should contain {C} elements, got {t.numel()}")
        _check(t.dtype in _SUPPORTED_DTYPES, op, f"{name} must be floating point, got {t.dtype}")
        if updatable:
            _check_updatable(op, t, name)
    _check_update_args(op, like, num_batches_tracked, momentum, updatable)


def _check_count(op: str, like: Tensor, count: Tensor) -> None:
    _check_same_device(op, like, count, "count")
    _check(count.numel() == 1 and count.dtype.is_floating_point, op,
           "count must be a floating tensor with one element")


# ---- the fake kernels ----------------------------------------------------------------------

def _channel_vector(input: Tensor, dtype: torch.dtype) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=dtype)


@torch.library.register_fake("bn_ext::batch_stats")
def _batch_stats_fake(input, *, dtype=None):
    _check_input("batch_stats", input)
    math = _math_dtype(input.dtype)
    _check(dtype in (None, torch.float64, math), "batch_stats",
           f"dtype must be None, float64 or the input's math type {math} (for {input.dtype} "
           f"input), got {dtype}", ValueError)
    dt = math if dtype is None else dtype
    return _channel_vector(input, dt), _channel_vector(input, dt)


@torch.library.register_fake("bn_ext::normalize")
def _normalize_fake(input, mean, var, weight, bias, eps):
    op = "normalize"
    _check_input(op, input)
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        _check_channel_vector(op, input, t, name)
    _check_eps(op, eps)
    return torch.empty_like(input)


@torch.library.register_fake("bn_ext::train_forward")
def _train_forward_fake(input, weight, bias, eps, running_mean=None, running_var=None,
                        num_batches_tracked=None, momentum=None):
    op = "train_forward"
    _check_input(op, input)
    # torch's order: channel counts, the statistics' pairing (ValueError), dtypes
    _check_channel_count(op, input, weight, "weight")
    _check_channel_count(op, input, bias, "bias")
    _check((running_mean is None) == (running_var is None), op, "running_mean and running_var "
           "must either both be None or neither be None", ValueError)
    _check_channel_vector(op, input, weight, "weight")
    _check_channel_vector(op, input, bias, "bias")
    _check_eps(op, eps)
    if running_mean is not None:
        _check_channel_vector(op, input, running_mean, "running_mean")
        _check_channel_vector(op, input, running_var, "running_var")
        _check_updatable(op, running_mean, "running_mean")
        _check_updatable(op, running_var, "running_var")
        _check_update_args(op, input, num_batches_tracked, momentum)
    dt = _math_dtype(input.dtype)
    return torch.empty_like(input), _channel_vector(input, dt), _channel_vector(input, dt)


@torch.library.register_fake("bn_ext::running_stats_update")
def _running_stats_update_fake(running_mean, running_var, num_batches_tracked, mean, var, count,
                               momentum):
    op = "running_stats_update"
    _check(mean.dim() == 1 and mean.dtype in _SUPPORTED_DTYPES, op,
           "mean must be a 1-D floating tensor")
    C = mean.numel()
    _check_same_device(op, mean, var, "var")
    _check(var.numel() == C, op, f"var should contain {C} elements, got {var.numel()}")
    _check(var.dtype in _SUPPORTED_DTYPES, op, f"var must be floating point, got {var.dtype}")
    _check_count(op, mean, count)
    _check_running_stats(op, mean, C, running_mean, running_var, num_batches_tracked, momentum)
    return None


@torch.library.register_fake("bn_ext::backward_reduce")
def _backward_reduce_fake(grad_out, input, mean, var, weight, eps):
    _check_backward_args("backward_reduce", grad_out, input, mean, var, weight, eps)
    dt, pt = _math_dtype(input.dtype), _param_dtype(input, weight)
    return (_channel_vector(input, dt), _channel_vector(input, dt),
            _channel_vector(input, pt), _channel_vector(input, pt))


@torch.library.register_fake("bn_ext::backward_input")
def _backward_input_fake(grad_out, input, mean, var, weight, sum_dy, sum_dy_xmu, count, eps):
    op = "backward_input"
    _check_backward_args(op, grad_out, input, mean, var, weight, eps)
    _check_channel_vector(op, input, sum_dy, "sum_dy")
    _check_channel_vector(op, input, sum_dy_xmu, "sum_dy_xmu")
    training = sum_dy is not None
    _check(training == (sum_dy_xmu is not None) == (count is not None), op,
           "sum_dy, sum_dy_xmu and count come together (training) or not at all (eval)")
    if training:
        _check_count(op, input, count)
    return torch.empty_like(input)


@torch.library.register_fake("bn_ext::normalize_backward")
def _normalize_backward_fake(grad_out, input, mean, var, weight, eps):
    _check_backward_args("normalize_backward", grad_out, input, mean, var, weight, eps)
    pt = _param_dtype(input, weight)
    return torch.empty_like(input), _channel_vector(input, pt), _channel_vector(input, pt)


@torch.library.register_fake("bn_ext::train_backward")
def _train_backward_fake(grad_out, input, mean, var, weight, eps):
    _check_backward_args("train_backward", grad_out, input, mean, var, weight, eps)
    pt = _param_dtype(input, weight)
    return torch.empty_like(input), _channel_vector(input, pt), _channel_vector(input, pt)
