"""bn_ext.batch_norm and an autograd.Function over the C++ ops (their fake kernels: _fake.py).

The C++ ops (csrc/ops.cpp) are the maths, split so that SyncBatchNorm can put collectives between
the phases:

    batch_stats          per-channel mean and biased variance (math type, or float64: dtype=)
    running_stats_update running <- (1 - m) running + m batch (unbiased var), num_batches_tracked += 1
    normalize            y = (x - mean) / sqrt(var + eps) * weight + bias
    train_forward        batch_stats + normalize, fused; and running_stats_update when given the
                         running statistics
    backward_reduce      sum(dy), sum(dy * (x - mean)), grad_weight, grad_bias
    backward_input       grad_input, from those sums (training) or from the running stats (eval)
    train_backward       backward_reduce + backward_input, fused
    normalize_backward   backward_input (eval) with backward_reduce's grad_weight, grad_bias, fused

Autograd is in C++: train_forward and normalize have Autograd kernels (ops.cpp) whose backwards
run train_backward and normalize_backward (or backward_input, backward_reduce), so a layer costs
no Python beyond batch_norm's checks. BatchNormFunction below does the same in Python, and stays
public.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def _torch_built_against() -> Optional[str]:
    """The torch this bn_ext was compiled against, where it is not the one imported (setup.py
    records it in _build_info.py; an editable install or the emulator's build has none)."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return None
    return None if TORCH_VERSION == torch.__version__ else TORCH_VERSION


_BUILT_FOR = _torch_built_against()


def _another_torch() -> str:
    return (f"bn_ext was compiled against torch {_BUILT_FOR}, and torch {torch.__version__} is "
            "installed: rebuild it against the installed torch with `pip install "
            "--no-build-isolation .` (without that flag pip compiles against a torch it fetches "
            "for the build, the newest release)")


try:
    from . import _C  # noqa: F401  (registers torch.ops.bn_ext)
except ImportError as e:  # an install problem, not a code path
    if _BUILT_FOR is not None:
        raise ImportError(f"{_another_torch()}. bn_ext._C could not be loaded: {e}") from e
    raise ImportError(
        "bn_ext's compiled extension (bn_ext._C) could not be imported. Build it with "
        "`pip install --no-build-isolation .` (or `-e .` to work in the source tree); if you did, "
        "you may be importing the source folder from the repository root instead of the "
        f"installed package. Original error: {e}") from e


def _release(version: str) -> list:
    return version.split("+")[0].split(".")[:2]


if _BUILT_FOR is not None and _release(_BUILT_FOR) != _release(torch.__version__):
    # It loaded, but torch's C++ ABI is not kept from one release to the next.
    warnings.warn(_another_torch() + "; a call may crash until then", RuntimeWarning,
                  stacklevel=2)

# importing _fake registers the ops' fake kernels
from ._fake import (_SUPPORTED_DTYPES, _check_backward_args, _check_channel_vector, _check_eps,
                    _check_grad_out, _check_input, _math_dtype, _param_dtype)

ops = torch.ops.bn_ext

# The ops' one overload each, which the Python here calls instead of the packets in `ops`: a
# packet resolves its overload on every call, ~6 us of a small training layer's ~60 (2-core VM).
_ops = types.SimpleNamespace(**{name: getattr(ops, name).default for name in (
    "batch_stats", "normalize", "train_forward", "running_stats_update", "backward_reduce",
    "backward_input", "normalize_backward", "train_backward", "_differentiable_train_backward",
    "_differentiable_normalize_backward")})


# ---- autograd ----------------------------------------------------------------------------

def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """A [C] vector shaped to broadcast against an (N, C, *) tensor."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


class _EvalGradInput(torch.autograd.Function):
    """Eval's grad_input = dy * scale (scale = w * invstd, per channel), taking input as well.

    It does not depend on input, but torch's batch_norm backward takes input as an argument, so
    its grad_input requires grad whenever input does, and a second backward gives input no
    gradient (None) instead of failing for want of a graph when nothing else requires grad (an
    input-gradient penalty through a frozen eval layer).
    """

    @staticmethod
    def forward(ctx, dy, scale, input):
        ctx.save_for_backward(dy, scale)
        return dy * scale

    @staticmethod
    def backward(ctx, g):
        dy, scale = ctx.saved_tensors
        dims = [0] + list(range(2, dy.dim()))
        grad_dy = g * scale if ctx.needs_input_grad[0] else None
        grad_scale = (g * dy).sum(dims, keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_dy, grad_scale, None


def _differentiable_train_backward(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                                   eps: float):
    """Training's backward in torch ops, so that autograd can differentiate it (double backward):
    the op bn_ext::_differentiable_train_backward, which train_forward's C++ autograd runs too.

    With xhat = (x - mean) * invstd over the batch statistics, n values per channel:
        grad_bias   = sum(dy)
        grad_weight = sum(dy * xhat)
        grad_input  = w * invstd / n * (n * dy - grad_bias - xhat * grad_weight)
    The batch statistics are recomputed here from `input`, so their dependence on it is part of
    the graph.
    """
    op = "_differentiable_train_backward"
    _check_input(op, input)
    _check_grad_out(op, input, grad_out)
    _check_channel_vector(op, input, weight, "weight")
    _check_eps(op, eps)
    dims = [0] + list(range(2, input.dim()))
    x = input.to(_math_dtype(input.dtype))
    dy = grad_out.to(x.dtype)
    if x.numel() == 0:
        # no values: mean and var would be 0/0, and NaN * 0 would reach the weight's second
        # derivative through w * invstd; torch's gradients of an empty batch are zeros
        mean = var = x.new_zeros([1, x.shape[1]] + [1] * (x.dim() - 2))
    else:
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
    invstd = (var + eps).rsqrt()
    xhat = (x - mean) * invstd
    grad_bias = dy.sum(dims)
    grad_weight = (dy * xhat).sum(dims)
    scale = invstd if weight is None else _per_channel(weight.to(x.dtype), x.dim()) * invstd
    n = x.numel() // x.shape[1] if x.numel() else 1
    grad_input = scale / n * (n * dy - _per_channel(grad_bias, x.dim())
                              - xhat * _per_channel(grad_weight, x.dim()))
    pt = _param_dtype(input, weight)
    return grad_input.to(input.dtype), grad_weight.to(pt), grad_bias.to(pt)


def _differentiable_normalize_backward(grad_out: Tensor, input: Tensor, mean: Tensor,
                                       var: Tensor, weight: Optional[Tensor], eps: float):
    """normalize's backward in torch ops, for double backward: the op
    bn_ext::_differentiable_normalize_backward, which normalize's C++ autograd runs (eval with
    grad) and BatchNormFunction's eval too. mean and var are given per-channel vectors (in eval,
    the running statistics). With s = w * invstd and xhat = (x - mean) * invstd:
        grad_input = dy * s,  grad_weight = sum(dy * xhat),  grad_bias = sum(dy)
        grad_mean = -s * grad_bias,  grad_var = -s * invstd / 2 * grad_weight
    """
    op = "_differentiable_normalize_backward"
    _check_backward_args(op, grad_out, input, mean, var, weight, eps)
    dims = [0] + list(range(2, input.dim()))
    x = input.to(_math_dtype(input.dtype))
    dy = grad_out.to(x.dtype)
    m = mean.to(x.dtype)
    invstd = (var.to(x.dtype) + eps).rsqrt()
    s = invstd if weight is None else weight.to(x.dtype) * invstd
    grad_bias = dy.sum(dims)
    xhat = (x - _per_channel(m, x.dim())) * _per_channel(invstd, x.dim())
    grad_weight = (dy * xhat).sum(dims)
    grad_input = _EvalGradInput.apply(dy, _per_channel(s, x.dim()), input)
    grad_mean = -s * grad_bias
    grad_var = -s * invstd / 2 * grad_weight
    pt = _param_dtype(input, weight)
    return (grad_input.to(input.dtype), grad_mean.to(mean.dtype), grad_var.to(var.dtype),
            grad_weight.to(pt), grad_bias.to(pt))


# CompositeImplicitAutograd: autograd records the torch ops inside, and fake tensors and
# torch.compile decompose the ops into them (no fake kernel).
_library = torch.library.Library("bn_ext", "IMPL")
for _name, _fn in (("_differentiable_train_backward", _differentiable_train_backward),
                   ("_differentiable_normalize_backward", _differentiable_normalize_backward)):
    _library.impl(_name, _fn, "CompositeImplicitAutograd")


class BatchNormFunction(torch.autograd.Function):
    """Batch normalization over the bn_ext C++ ops.

    apply(input, weight, bias, running_mean, running_var, training, eps, num_batches_tracked,
          momentum)

    Training returns (output, batch_mean, batch_var), the statistics being non-differentiable
    math-type tensors, and updates running_mean/running_var (and num_batches_tracked) when they
    are given; eval returns (output,) and normalizes with running_mean/running_var. The
    first-order backward runs in C++; when a graph is being built (create_graph=True) the
    backward is written in differentiable torch ops instead.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, eps,
                num_batches_tracked=None, momentum=None):
        if training:
            out, mean, var = _ops.train_forward(input, weight, bias, eps, running_mean, running_var,
                                                num_batches_tracked, momentum)
        else:
            mean, var = running_mean, running_var
            out = _ops.normalize(input, mean, var, weight, bias, eps)
        ctx.save_for_backward(input, weight, mean, var)
        ctx.training = training
        ctx.eps = eps
        # The statistics get no gradient; without this autograd would build zeros for them.
        ctx.set_materialize_grads(False)
        if training:
            ctx.mark_non_differentiable(mean, var)
            return out, mean, var
        return (out,)

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        input, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if grad_out is None:
            pass
        elif torch.is_grad_enabled():
            # A graph is being built (double backward): the ops' differentiable backwards
            if ctx.training:
                grad_input, grad_weight, grad_bias = _ops._differentiable_train_backward(
                    grad_out, input, weight, ctx.eps)
            else:
                grad_input, _, _, grad_weight, grad_bias = (
                    _ops._differentiable_normalize_backward(grad_out, input, mean, var, weight,
                                                            ctx.eps))
        elif ctx.training and need_input:
            grad_input, grad_weight, grad_bias = _ops.train_backward(
                grad_out, input, mean, var, weight, ctx.eps)
        elif need_input and (need_weight or need_bias):
            grad_input, grad_weight, grad_bias = _ops.normalize_backward(
                grad_out, input, mean, var, weight, ctx.eps)
        else:
            if need_weight or need_bias:
                _, _, grad_weight, grad_bias = _ops.backward_reduce(
                    grad_out, input, mean, var, weight, ctx.eps)
            if need_input:
                grad_input = _ops.backward_input(grad_out, input, mean, var, weight,
                                                 None, None, None, ctx.eps)
        return (grad_input if need_input else None,
                grad_weight if need_weight else None,
                grad_bias if need_bias else None,
                None, None, None, None, None, None)


# ---- the functional API ------------------------------------------------------------------

def _verify_batch_size(input: Tensor) -> None:
    size = input.size()
    values = size[0]
    for d in size[2:]:
        values *= d
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

# Under torch.jit.trace sizes are tensors, and the argument checks' comparisons of them warn that
# they are traced as constants. So they are, as in torch's own batch_norm, whose warnings the
# tracer filters (TracerWarning.ignore_lib_warnings); the same filter, for bn_ext's modules.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"bn_ext(\.|$)")


# Both ONNX exporters capture the model by tracing it: torch.export (the default exporter) sets
# torch.compiler.is_exporting(), torch.jit.trace (dynamo=False) a tracing state. Those two cost
# ~0.1 us; torch.onnx.is_in_onnx_export() costs ~3 us (two imports a call), so it is asked only
# under one of them. Dynamo folds all three to constants (is_in_onnx_export to False).
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_tracing_state = torch._C._get_tracing_state


def _cumulative_momentum(num_batches_tracked: Tensor, where: str = "bn_ext") -> float:
    """momentum=None's 1 / (num_batches_tracked + 1), the count taken in its own dtype (read on
    the host); a count that wraps to 0 is ops.cpp's prepare_count's ValueError (torch's module:
    ZeroDivisionError)."""
    batches = float(num_batches_tracked + 1)
    if batches == 0:
        raise ValueError(f"{where}: momentum=None averages over num_batches_tracked + 1 batches, "
                         f"which is 0 here ({num_batches_tracked.dtype} counts wrap around): "
                         f"reset num_batches_tracked, or pass a float momentum")
    return 1.0 / batches


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      num_batches_tracked):
    """torch's own batch_norm, for:
    - torch.func transforms (vmap, grad, jacrev, jvp) and forward-mode AD, which bn_ext's ops do
      not support (no batching rules, no jvp; training's autograd is a C++ Function, which
      functorch refuses);
    - MKL-DNN (oneDNN) tensors (x.to_mkldnn()), which bn_ext's kernels do not read;
    - tensor subclasses that wrap others (DTensor, see _wraps_tensors);
    - ONNX export: an ONNX graph runs on the runtime's BatchNormalization, not on bn_ext's
      kernels, and the exporters translate torch's op into it (bn_ext's ops have no ONNX
      translation: the export would fail).
    The module's semantics kept: num_batches_tracked is counted (before the call, taken back if
    it raises), and momentum=None averages over the count it will have."""
    count = training and running_mean is not None and num_batches_tracked is not None
    if count and momentum is None:
        momentum = _cumulative_momentum(num_batches_tracked)
    if not count:
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                0.0 if momentum is None else momentum, eps,
                                torch.backends.cudnn.enabled)
    # Counted first, as torch's module does: grad, vjp, jacrev, jvp and jacfwd refuse the in-place
    # add_ on the captured count, and must do so before torch.batch_norm has written the running
    # statistics. A refusal from torch.batch_norm after it (vmap with tracked statistics) takes
    # the count back, so a call that raises leaves every buffer as it was.
    num_batches_tracked.add_(1)
    try:
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                momentum, eps, torch.backends.cudnn.enabled)
    except BaseException:
        num_batches_tracked.sub_(1)
        raise


def _wraps_tensors(*tensors) -> bool:
    """Whether an argument is a tensor subclass that holds other tensors and runs each op on
    them in its __torch_dispatch__ (DTensor; torch's TwoTensor). bn_ext's ops have no DTensor
    sharding rules, and a subclass that runs an op once per inner tensor would run
    train_forward's running-statistics update, and its count, that many times, where torch's
    module counts a batch once. Asked only where the input is not a plain tensor (DTensor
    refuses to mix with plain tensors)."""
    return any(t is not None and is_traceable_wrapper_subclass(t) for t in tensors)


_TENSOR_OR_NONE = (Tensor, type(None))


def _check_tensor_args(weight, bias, running_mean, running_var) -> None:
    """torch.batch_norm's TypeError for a tensor argument that is not a tensor (a list, say), in
    its parser's order."""
    for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"bn_ext.batch_norm: argument '{name}' must be Tensor, not "
                            f"{_type_name(value)}")


def _is_float_arg(value) -> bool:
    """Whether torch's argument parser takes `value` for a float argument: a Python float or
    int (bool included), a numpy scalar of those kinds or complex (its real part taken, numpy
    warning ComplexWarning, as float() does), a 0-d tensor that does not require grad, or a
    symbolic number (tracing). Not a str, Fraction, Decimal or Python complex."""
    if isinstance(value, (float, int, torch.SymFloat, torch.SymInt)):
        return True
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.requires_grad
    np = sys.modules.get("numpy")  # not imported: value cannot be a numpy scalar
    return np is not None and isinstance(value, np.generic) and value.dtype.kind in "biufc"


def _type_name(value) -> str:
    """The name torch's argument parser gives a refused value's type: CPython's tp_name. That is
    the bare name of a class defined in Python (Fraction, Tensor) and of a builtin, and the name
    an extension declared its type with otherwise: numpy.ndarray, and decimal.Decimal from Python
    3.13 on, where _decimal's types became heap types declared by a spec (in 3.12: Decimal)."""
    t = type(value)
    try:
        import ctypes

        # A type object is a PyVarObject: a PyObject (object's own basic size, the larger
        # free-threaded header included), then ob_size, then tp_name.
        at = id(t) + object.__basicsize__ + ctypes.sizeof(ctypes.c_ssize_t)
        name = ctypes.c_char_p.from_address(at).value.decode()
        if name.rpartition(".")[2] == t.__name__:  # read where CPython keeps it
            return name
    except (ImportError, AttributeError, ValueError, UnicodeDecodeError):
        pass
    # Without a readable tp_name, a guess (wrong for extension heap types: re.Pattern).
    if t.__module__ == "builtins" or t.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"


def _check_arg_types(training, momentum, eps,
                     where: str = "bn_ext.batch_norm") -> None:
    """torch.batch_norm's TypeErrors for arguments of the wrong type (its parser runs after
    F.batch_norm's Python checks of the batch size and eps, and before its kernel's checks).
    momentum=None is the modules' cumulative average here."""
    if not isinstance(training, (bool, torch.SymBool)):
        raise TypeError(f"{where}: argument 'training' must be bool, not "
                        f"{_type_name(training)}")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if not (_is_float_arg(value) or (name == "momentum" and value is None)):
            raise TypeError(f"{where}: argument '{name}' must be float, not "
                            f"{_type_name(value)}")


def _as_float(value):
    """A float argument (checked) as the ops take it: a Python float, or symbolic when traced."""
    if value is None or isinstance(value, (float, torch.SymFloat, torch.SymInt)):
        return value
    return float(value)


def _check_input_batch_and_eps(input, training, eps) -> None:
    """The checks torch's F.batch_norm makes in Python, before its argument parser and C++ kernel
    check the rest: with several arguments wrong, the error is the one torch raises first."""
    if not isinstance(input, Tensor):
        raise TypeError(f"bn_ext.batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"bn_ext.batch_norm: expected input of shape (N, C, *) with at least "
                         f"2 dimensions, got {input.dim()}D input")
    if training:
        _verify_batch_size(input)
        if not eps > 0:  # as torch's F.batch_norm (>= 2.11), after the batch-size check
            raise ValueError(f"bn_ext.batch_norm: eps must be positive during training, but "
                             f"got {eps}")
    elif not eps >= 0:
        raise ValueError(f"bn_ext.batch_norm: eps must be non-negative, but got {eps}")


def _check_one_param_dtype(where: str, input: Tensor, weight, bias, running_mean,
                           running_var) -> None:
    """For a float16/bfloat16 input: the ops take weight, bias and the running statistics each in
    the input's dtype or in float32; torch's CPU kernel wants them all in the same one of the two.
    (Other dtypes the ops refuse themselves.)"""
    given = [(n, t) for n, t in (("weight", weight), ("bias", bias),
                                 ("running_mean", running_mean),
                                 ("running_var", running_var)) if t is not None]
    dtypes = {t.dtype for _, t in given}
    if len(dtypes) > 1 and dtypes <= {input.dtype, torch.float32}:  # else the op says
        listed = ", ".join(f"{n} {t.dtype}" for n, t in given)
        raise RuntimeError(f"{where}: with {input.dtype} input, weight, bias and the running "
                           f"statistics must share one dtype (all float32, or all "
                           f"{input.dtype}); got {listed}")


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: Optional[float], eps: float,
                num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """batch_norm, plus the module's num_batches_tracked and momentum=None (cumulative average).

    Nothing is written before every check has passed: the ops check their arguments before they
    touch a buffer, and the running-stats update (which also bumps num_batches_tracked) runs last.
    """
    _check_input_batch_and_eps(input, training, eps)
    # torch's argument parser: the tensors, then training, momentum and eps
    if not (isinstance(weight, _TENSOR_OR_NONE) and isinstance(bias, _TENSOR_OR_NONE) and
            isinstance(running_mean, _TENSOR_OR_NONE) and isinstance(running_var, _TENSOR_OR_NONE)):
        _check_tensor_args(weight, bias, running_mean, running_var)
    if type(training) is not bool or type(eps) is not float or not (
            momentum is None or type(momentum) is float):
        _check_arg_types(training, momentum, eps)  # off the common path: ~0.3 us
        momentum, eps = _as_float(momentum), _as_float(eps)
    if not training and (running_mean is None or running_var is None):
        # torch's RuntimeError (its C++ kernel's check), the missing one named
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"bn_ext.batch_norm: {missing} must be defined in evaluation mode")
    # The ops check everything again, but under their own argument names (mean, var); these are
    # the caller's names, and in training they fail before any work is done. One statistic
    # without the other is train_forward's ValueError, after it has checked weight and bias:
    # torch's order (its kernel checks the channel counts, then the pairing).
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            if t.numel() != C:
                raise RuntimeError(f"bn_ext.batch_norm: {name} should contain {C} elements (one "
                                   f"per channel of the input), got {t.numel()}")
            if t.device != input.device:
                raise RuntimeError(f"bn_ext.batch_norm: {name} is on {t.device} but input is on "
                                   f"{input.device}; all tensors must be on one device")
            if t.requires_grad and torch.is_grad_enabled():
                # torch's native_batch_norm refuses it too (RuntimeError), in training and eval:
                # nothing differentiates with respect to the running statistics.
                raise RuntimeError(f"bn_ext.batch_norm: {name} requires grad, but batch norm is "
                                   f"not differentiable with respect to the running statistics; "
                                   f"pass {name}.detach() or run under torch.no_grad()")
    # Two checks of torch's kernel that come after its pairing check (an unpaired statistic is
    # train_forward's ValueError) and its dtype dispatch (NotImplementedError), left to the op.
    if (running_mean is None) == (running_var is None) and input.dtype in _SUPPORTED_DTYPES:
        # It reads the running statistics through a 1-D accessor; weight and bias need only C
        # elements.
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.dim() != 1:
                raise RuntimeError(f"bn_ext.batch_norm: {name} must be a 1-D tensor of {C} "
                                   f"elements (one per channel of the input), got shape "
                                   f"{tuple(t.shape)}")
        if input.dtype in (torch.bfloat16, torch.float16):
            _check_one_param_dtype("bn_ext.batch_norm", input, weight, bias, running_mean,
                                   running_var)
    if (input.is_mkldnn or _functorch_active() or _forward_ad._current_level >= 0 or (
            (_is_exporting() or _tracing_state() is not None) and
            torch.onnx.is_in_onnx_export()) or (
            type(input) is not Tensor and
            _wraps_tensors(input, weight, bias, running_mean, running_var))):
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, num_batches_tracked)
    if training:
        # train_forward also updates the running statistics (and counts an empty batch in
        # num_batches_tracked, leaving the statistics alone, as torch does). Its autograd is in
        # C++ (ops.cpp), with or without grad.
        out, _, _ = _ops.train_forward(input, weight, bias, eps, running_mean, running_var,
                                       num_batches_tracked, momentum)
        return out
    # Eval, with or without grad: normalize's autograd is in C++ too (ops.cpp).
    return _ops.normalize(input, running_mean, running_var, weight, bias, eps)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalization with the signature and semantics of torch.nn.functional.batch_norm.

    In training the batch statistics normalize the input and, when running_mean/running_var are
    given, update them in place: running = (1 - momentum) * running + momentum * batch, with the
    unbiased batch variance. Otherwise the running statistics normalize the input.
    """
    if momentum is None:
        # torch's argument parser refuses it, after F.batch_norm's own checks
        _check_input_batch_and_eps(input, training, eps)
        raise TypeError("bn_ext.batch_norm: momentum must be a float; the cumulative average "
                        "(momentum=None) is available through the BatchNorm modules")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
