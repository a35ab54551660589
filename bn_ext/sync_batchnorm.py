"""SyncBatchNorm: batch statistics over every rank of a torch.distributed process group.

Training with a world of more than one rank runs the bn_ext ops with two collectives per step:

    forward   batch_stats (local)  ->  ONE all_reduce (float64, 2*C + 3 values)  ->  normalize,
              running_stats_update with the global statistics and count
    backward  backward_reduce (local)  ->  ONE all_reduce of (sum_dy, sum_dy_xmu), 2*C values
              ->  backward_input with the global count

Eval mode, no initialised process group, or a world of one rank run bn_ext's BatchNorm unchanged.

What the forward sends, and why
-------------------------------
torch.nn.SyncBatchNorm all-gathers (mean, invstd, count) from every rank, so each rank receives
world * (2C + 1) values and merges them itself. Here every rank contributes its count n, the sum
n * mean and the raw second moment M2 + n * mean^2 = n * (var + mean^2) of every channel, and
one all_reduce(SUM) adds them up: the buffer does not grow with the world size, and a rank with
no samples (n = 0) simply adds zeros. The global statistics follow from the sums as

    N = sum n,   mean = sum(n * mean) / N,   var = sum(n * (var + mean^2)) / N - mean^2.

That last subtraction cancels: its relative error is about 2^-52 * (1 + mean^2 / var), times a few
for the additions. The sums are therefore kept in float64 whatever the input dtype: a channel
with mean 1e4 and std 1 loses ~1e-8 of its variance there. For float64 input the variance's
relative error is ~1e-16 * (mean / std)^2, e.g. 1e-10 at a ratio of 1e3, against ~1e-15 for
one process. A shifted form (sums of x - K) would cancel less, but needs the same K on every
rank, which only a second collective (or trusting buffers to agree) provides. The price of
float64: for 2 ranks this sends 1.5x torch's bytes; from 4 ranks on, fewer (11x fewer at 64).
bench/bench_sync.py tabulates it.

Each rank's mean and var come from batch_stats(input, dtype=float64), for float32, float16 and
bfloat16 input too: the kernels form mean = k + sum(x - k) / n in double (k: a shift sampled
from the channel), and that is what the sums get. A mean rounded to float32 first, as
torch.nn.SyncBatchNorm gathers it (and as this layer did before), is off by up to
6e-8 * |mean_i|, and that error reaches the variance through the spread of the ranks' means,
sum n_i (mean_i - mean)^2, as about 2 * 6e-8 * |mean| * |mean_i - mean| / var relative: 2.4e-4
at mean 1e4 and std 1 with the ranks' means 1 std apart, where one process errs by 4e-8.
Unrounded, a rank's mean carries only the float sums' error (~6e-8 * std), and the variance
that of one process (4e-8 for 2 ranks there: case_large_mean_ranks_apart_fp32 in
tests/test_sync_batchnorm.py). Float64 input whose |mean| exceeds about 1e154 overflows
n * (var + mean^2) (NaN statistics, where one process's are finite).

Bad input and hangs
-------------------
A rank that raises before a collective that its peers have entered leaves them waiting until the
process group's timeout, and two ranks that send buffers of different sizes crash gloo (or hang
NCCL). So the forward buffer is sized by the module's num_features, never by the input, and it
carries a "rejected" count: a rank whose input is unusable (rank < 2, channel count other than
num_features, unsupported dtype, another device than the layer's, a parameter or running statistic
that BatchNorm or the ops after the collective would refuse, momentum or eps of the wrong type or
value, a failing local kernel) still takes part in the all_reduce, with the flag set, and then
raises its own error; every other rank sees the flag and raises as well. So does a group whose
whole batch has one value per channel (BatchNorm's ValueError), and one whose ranks mix float64
input with other dtypes (the backward's all_reduce, in each rank's math dtype, would differ in
size; float32, float16 and bfloat16 input, all float32 math, may mix). Nothing is written to the
running statistics or num_batches_tracked before that check. The ops that run after the collective
(normalize, running_stats_update) are checked before it, with their fake kernels' mirror of the
C++ checks (_fake.py). An error that only a later step can find (running out of memory in the
backward, say) leaves the peers waiting in the backward's collective, which fails after the
process group's timeout: a bound, not a clean error. As with torch's SyncBatchNorm, the ranks
must agree on what no collective checks: all in training or all in eval, and whether the input
needs a gradient (a rank that skips the backward's all_reduce leaves its peers' to pair with its
next collective). Reading the flag needs no device synchronisation when the buffer is on the CPU
(gloo); on an accelerator it is checked with torch._assert_async, which fails the device stream
instead of stalling the host.

Under torch.compile the layer compiles into the model's graph, fullgraph=True included: the
flag is checked by torch._assert_async on the CPU too (a host read would break the graph), so
the ranks with good input, and every rank for a group batch of one value per channel, get that
assert's RuntimeError. Two of the checks made before the collective are left to
running_stats_update after it, because dynamo cannot trace them: a running statistic that is an
expanded view or an inference tensor. A compiled layer with such a buffer on one rank leaves its
peers waiting until the timeout; so does any rejected input with fullgraph=True, where the
rank's error is a compile error (dynamo cannot compile the raise) before the collective.
Without fullgraph the raise is a graph break and the errors are clean.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.autograd.function import once_differentiable

from . import _fake
from .functional import (_SUPPORTED_DTYPES, _as_float, _check_arg_types,
                         _check_one_param_dtype, _cumulative_momentum, _math_dtype, _ops)
from .modules import _BatchNormForward, _fx_leaf

# Header of the forward buffer: [count, number of ranks that rejected their input, number of
# ranks that compute in float64]. The backward's all_reduce is in each rank's math dtype
# (float64 for float64 input, else float32), so a group that mixes float64 with other input
# sends buffers of two sizes there, which crashes gloo: the forward refuses it on every rank.
_HEADER = 3


def _host_readable(t: Tensor) -> bool:
    """Whether reading t's value on the host is free: no device synchronisation, and not while
    torch.compile traces (a read there breaks the graph; the other branch compiles into it)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _local_check(input: Tensor, num_features: int, **tensors) -> Optional[Exception]:
    """The error this rank's call would raise, found before any collective (None when fine).
    `tensors`: the layer's parameters and buffers (None where absent), on the input's device."""
    if not isinstance(input, Tensor):
        return TypeError(f"SyncBatchNorm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        return ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.size(1) == 0:
        return ValueError("SyncBatchNorm number of input channels should be non-zero")
    if input.size(1) != num_features:  # RuntimeError and NotImplementedError: as BatchNorm's
        return RuntimeError(
            f"SyncBatchNorm: input has {input.size(1)} channels (shape {tuple(input.shape)}) "
            f"but the layer was built for num_features={num_features}")
    if input.dtype not in _SUPPORTED_DTYPES:
        return NotImplementedError(f"SyncBatchNorm: input has dtype {input.dtype}; supported are "
                                   f"float64, float32, bfloat16 and float16")
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            return RuntimeError(f"SyncBatchNorm: input is on {input.device} but the layer's "
                                f"{name} is on {t.device}")
        if name.startswith("running_") and t is not None and t.dim() != 1:
            return RuntimeError(f"SyncBatchNorm: the layer's {name} must be a 1-D tensor of "
                                f"{num_features} elements, got shape {tuple(t.shape)}")
    return None


def _later_ops_check(input, num_features, weight, bias, running_mean, running_var,
                     num_batches_tracked, momentum, eps) -> Optional[Exception]:
    """The error that BatchNorm's training would raise for this rank's arguments, or the ops run
    after the collective (None when none), found before it: momentum and eps of the wrong type
    (TypeError) or eps <= 0 (ValueError); the parameters and running statistics in dtypes that
    BatchNorm refuses (say float32 weights or float64 statistics with float32 input), by the
    checks of train_forward's fake kernel, and for 16-bit input in mixed dtypes; the running
    statistics as running_stats_update wants them (say an expanded tensor); and, for
    momentum=None, a count that wraps to 0 (ops.cpp's prepare_count). Needs _local_check to have
    passed."""
    op = "SyncBatchNorm"
    try:
        _check_arg_types(True, momentum, eps, op)
        if not _as_float(eps) > 0:  # as F.batch_norm in training
            raise ValueError(f"{op}: eps must be positive during training, but got {eps}")
        for name, t in (("weight", weight), ("bias", bias)):
            _fake._check_channel_vector("normalize", input, t, name)
        if running_mean is not None or running_var is not None:
            _fake._check(running_mean is not None and running_var is not None,
                         "running_stats_update", "running_mean and running_var must either "
                         "both be None or neither be None", ValueError)
            # dynamo cannot trace the overlap and inference-tensor checks (module docstring)
            _fake._check_running_stats("running_stats_update", input, num_features,
                                       running_mean, running_var, num_batches_tracked, momentum,
                                       updatable=not torch.compiler.is_compiling())
            for name, t in (("running_mean", running_mean), ("running_var", running_var)):
                _fake._check_channel_vector("train_forward", input, t, name)
        if input.dtype in (torch.bfloat16, torch.float16):
            _check_one_param_dtype(op, input, weight, bias, running_mean, running_var)
        if (momentum is None and num_batches_tracked is not None and running_mean is not None
                and num_batches_tracked.dtype != torch.int64):
            _cumulative_momentum(num_batches_tracked, op)  # only a count made other than int64
    except Exception as exc:  # noqa: BLE001 - returned, for the caller to raise after the flag
        return exc
    return None


class SyncBatchNormFunction(torch.autograd.Function):
    """apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
    process_group, num_features) -> output, normalized with statistics over the whole group.

    running_mean/running_var/num_batches_tracked are updated in place when given (None: not
    tracked); momentum None means the cumulative average; process_group None, the default
    group. Parameter gradients are this rank's own, as in torch.nn.SyncBatchNorm: DDP averages
    them.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, process_group, num_features):
        error = _local_check(input, num_features, weight=weight, bias=bias,
                             running_mean=running_mean, running_var=running_var)
        if error is None:
            error = _later_ops_check(input, num_features, weight, bias, running_mean,
                                     running_var, num_batches_tracked, momentum, eps)
        if error is None:
            momentum, eps = _as_float(momentum), _as_float(eps)
        # The collective's buffer lives where the layer does (the device the backend was set up
        # for), so that even an input on the wrong device cannot keep this rank out of it.
        device = next((t.device for t in (running_mean, weight) if t is not None),
                      input.device if isinstance(input, Tensor) else torch.device("cpu"))
        buf = torch.zeros(_HEADER + 2 * num_features, dtype=torch.float64, device=device)
        if error is None:
            try:
                # float64 whatever the input (module docstring); mean 0, var 0 for N == 0
                mean, var = _ops.batch_stats(input, dtype=torch.float64)
                n = input.numel() // input.size(1)
                buf[0].fill_(n)
                torch.mul(mean, n, out=buf[_HEADER:_HEADER + num_features])
                torch.addcmul(var, mean, mean, out=buf[_HEADER + num_features:])
                buf[_HEADER + num_features:].mul_(n)
                if _math_dtype(input.dtype) == torch.float64:
                    buf[2].fill_(1)
            except Exception as exc:  # the kernel refused: still take part, then raise
                error = exc
        if error is not None:
            buf[1].fill_(1)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
        if error is not None:
            raise error
        world = _group_world_size(process_group)
        if _host_readable(buf):
            rejected = int(buf[1])
            if rejected:
                raise RuntimeError(
                    f"SyncBatchNorm: {rejected} other rank(s) of the process group rejected "
                    f"their input (see their error); this rank's call was abandoned and its "
                    f"running statistics left unchanged")
            in_float64 = int(buf[2])
            if 0 < in_float64 < world:
                raise RuntimeError(
                    f"SyncBatchNorm: {in_float64} of the process group's {world} ranks have "
                    f"float64 input and the others not (this rank: {input.dtype}); the "
                    f"backward's all_reduce would differ in size between them. Give every rank "
                    f"the same dtype (float32, float16 and bfloat16 may mix); the running "
                    f"statistics are unchanged")
            if int(buf[0]) == 1:
                # BatchNorm's ValueError for the batch of the whole group (its unbiased
                # variance would be 0/0, a NaN running_var), raised by every rank alike
                raise ValueError(
                    f"SyncBatchNorm: expected more than 1 value per channel when training, got "
                    f"1 over the whole process group (input size {tuple(input.shape)} on this "
                    f"rank); the running statistics are unchanged")
        else:
            torch._assert_async((buf[1] == 0) & (buf[0] != 1) & ((buf[2] == 0) | (buf[2] == world)),
                                "SyncBatchNorm: another rank rejected its input, or the process "
                                "group's batch has 1 value per channel, or its ranks mix float64 "
                                "input with other dtypes")

        # Global statistics, in float64 until here (see the module docstring).
        total = buf[0]
        sums = buf[_HEADER:].view(2, num_features)
        denom = total.clamp(min=1)  # N == 0 (every rank empty): mean 0, var 0, output empty
        g_mean = sums[0] / denom
        g_var = (sums[1] / denom - g_mean * g_mean).clamp_(min=0)
        math = _math_dtype(input.dtype)
        mean, var = g_mean.to(math), g_var.to(math)
        count = total.to(math)

        out = _ops.normalize(input, mean, var, weight, bias, eps)

        if running_mean is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                  count, momentum)

        ctx.save_for_backward(input, weight, mean, var, count)
        ctx.eps = eps
        ctx.process_group = process_group
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, mean, var, count = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = _ops.backward_reduce(
            grad_out, input, mean, var, weight, ctx.eps)
        grad_input = None
        if need_input:
            # Each rank decides by its own graph, as in torch's SyncBatchNorm: a rank whose input
            # needs no gradient while its peers' do skips this collective, and theirs pairs with
            # its next one (a crash or a hang; module docstring).
            c = sum_dy.numel()
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.process_group)
            grad_input = _ops.backward_input(grad_out, input, mean, var, weight,
                                             both[:c], both[c:], count, ctx.eps)
        return (grad_input,
                grad_weight if need_weight else None,
                grad_bias if need_bias else None,
                None, None, None, None, None, None, None)


def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                          momentum):
    """running_stats_update with the global statistics.

    When the whole group had no samples, torch's BatchNorm over the (empty) concatenated batch
    counts the batch but leaves the statistics alone; the op, fed count 0, would not. On the CPU
    the count is read directly; elsewhere the old values are restored with a where (no host sync).
    """
    if _host_readable(count):
        if float(count) > 0:
            _ops.running_stats_update(running_mean, running_var, num_batches_tracked, mean, var,
                                      count, momentum)
        elif num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    old_mean, old_var = running_mean.clone(), running_var.clone()
    _ops.running_stats_update(running_mean, running_var, num_batches_tracked, mean, var, count,
                              momentum)
    empty = count == 0
    running_mean.copy_(torch.where(empty, old_mean, running_mean))
    running_var.copy_(torch.where(empty, old_var, running_var))


def _group_world_size(process_group) -> int:
    """The group's rank count (None: the default group's); 1 without an initialised default
    process group, or where torch.distributed is not built."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    r"""bn_ext drop-in for torch.nn.SyncBatchNorm, on any torch.distributed backend.

    Same constructor (``bias=`` included, where the installed torch has it), parameters,
    buffers, state_dict, ``_version``, input checks and ``convert_sync_batchnorm`` as torch's.
    Unlike torch's it runs on CPU tensors (gloo) too, a rank with an empty batch costs no host
    synchronisation, and the forward collective is an all_reduce whose size does not grow with
    the world. When synchronising, the input's channel count must equal ``num_features`` (the
    collective's size is derived from it).

    It derives from torch's ``_BatchNorm``, not from ``torch.nn.SyncBatchNorm``: DDP refuses any
    CPU module holding a ``torch.nn.SyncBatchNorm`` ("SyncBatchNorm layers only work with GPU
    modules"), which would rule out DDP on gloo. ``isinstance(m, _BatchNorm)`` holds.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        # kwargs: the keyword-only `bias` of torch >= 2.13, which older torch's _BatchNorm
        # rejects with a TypeError, as its SyncBatchNorm does.
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    __init__.__signature__ = inspect.signature(nn.SyncBatchNorm.__init__)

    # torch.nn.SyncBatchNorm's input checks, verbatim in behaviour.
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        traced = _fx_leaf(self, input)
        if traced is not None:
            return traced
        if not (self.training and _group_world_size(self.process_group) > 1):
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return _BatchNormForward.forward(self, input)

        # Training over a group: every check runs inside SyncBatchNormFunction, after this rank
        # has joined the collective, so that a rejected input cannot leave the others waiting.
        tracking = self.track_running_stats
        momentum = self.momentum
        out = SyncBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.num_batches_tracked if tracking else None,
            momentum, self.eps, self.process_group, self.num_features)
        if tracking and self.num_batches_tracked is not None and self.running_mean is None:
            self.num_batches_tracked.add_(1)  # statistics set to None: torch still counts
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        r"""Replace every BatchNorm layer in ``module`` (nested ones too) with ``cls``.

        Takes torch's BatchNorm1d/2d/3d and SyncBatchNorm, and bn_ext's BatchNorm1d/2d/3d (e.g.
        a model already passed through ``bn_ext.convert_model``). As torch's converter does, the
        new layers share the old ones' Parameter and buffer objects (an optimizer built earlier
        keeps working) and take over the training flag and ``qconfig``. Returns ``module`` with
        its layers replaced, or a new layer when ``module`` itself is a BatchNorm.
        """
        result = module
        if isinstance(module, _BatchNorm):
            no_bias = {"bias": False} if module.affine and module.bias is None else {}
            result = cls(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group, **no_bias)
            if module.affine:
                with torch.no_grad():
                    result.weight = module.weight
                    result.bias = module.bias
            result.running_mean = module.running_mean
            result.running_var = module.running_var
            result.num_batches_tracked = module.num_batches_tracked
            result.training = module.training
            if hasattr(module, "qconfig"):
                result.qconfig = module.qconfig
        for name, child in module.named_children():
            result.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return result


__all__ = ["SyncBatchNorm", "SyncBatchNormFunction"]
