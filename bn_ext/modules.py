"""Drop-in BatchNorm1d/2d/3d modules (and their lazy forms) and convert_model.

Each module subclasses the installed torch's own class, so the constructor, parameters, buffers,
state_dict keys, _version, checkpoint loading (old ones without num_batches_tracked too) and
input-rank checks are torch's; only forward runs on bn_ext's kernels.
"""
from __future__ import annotations

import functools
import types
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .functional import _batch_norm


def _fx_leaf(module: nn.Module, input) -> object:
    """Under torch.fx symbolic tracing, `module` recorded as one call_module node; else None.

    torch.fx keeps torch.nn's own layers as leaves (Tracer.is_leaf_module looks at __module__)
    and traces into any other layer, where the input checks of forward() would branch on a
    Proxy and fail. Recording the call here makes a bn_ext layer a leaf as torch's is, so that
    symbolic_trace, torchvision's create_feature_extractor and FX passes see the same graph: it
    calls the layer, which checks its input and reads `training` when the graph runs. A layer
    traced as the root itself is traced into, as torch's is (and fails as torch's does). Unlike
    a true leaf, a layer given a real tensor during tracing (not a Proxy) runs then, and its
    output becomes a constant; and a tracer's is_leaf_module still says False for it.
    """
    tracer = input.tracer if isinstance(input, torch.fx.Proxy) else None
    if tracer is None or tracer.root is module:
        return None
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


class _BatchNormForward:
    """forward() of torch's _BatchNorm, on bn_ext.

    torch increments num_batches_tracked before calling F.batch_norm and so counts a call that
    then raises; here the increment is part of the running-stats update, after every check.
    """

    def forward(self, input: Tensor) -> Tensor:
        traced = _fx_leaf(self, input)
        if traced is not None:
            return traced
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        nbt = self.num_batches_tracked if tracking else None
        if nbt is not None and nbt.requires_grad and nbt.is_leaf and torch.is_grad_enabled():
            # torch's forward counts with nbt.add_(1) here, which autograd refuses for such a
            # leaf; bn_ext's count is made inside the op, where autograd would not see it
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation. (bn_ext: the layer's num_batches_tracked requires "
                               "grad; torch's layer refuses to count it too)")
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # as torch: no count to average over, the statistics stay put
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        out = _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, bn_training, momentum, self.eps,
            num_batches_tracked=nbt)
        if nbt is not None and self.running_mean is None:
            nbt.add_(1)  # tracking with the statistics set to None: torch still counts
        return out

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before it compiles any; without it the
        # compiler fails deep in forward()'s Python helpers with "Unknown type name".
        raise RuntimeError(
            f"torch.jit.script cannot compile bn_ext.{type(self).__name__}: its forward runs "
            f"Python (argument checks, torch.fx and torch.func support) that TorchScript, "
            f"deprecated in torch, does not take. torch.compile, torch.export and "
            f"torch.jit.trace run bn_ext's kernels; or script the model before "
            f"bn_ext.convert_model, on torch's BatchNorm.")


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    __doc__ = "bn_ext drop-in for torch.nn.BatchNorm1d (input (N, C) or (N, C, L))."


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    __doc__ = "bn_ext drop-in for torch.nn.BatchNorm2d (input (N, C, H, W))."


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    __doc__ = "bn_ext drop-in for torch.nn.BatchNorm3d (input (N, C, D, H, W))."


# Lazy layers infer num_features from the first input (torch's LazyModuleMixin), run that first
# call on bn_ext already, and then become the class named by cls_to_become: bn_ext's, not torch's.
class LazyBatchNorm1d(_BatchNormForward, nn.LazyBatchNorm1d):
    __doc__ = "bn_ext drop-in for torch.nn.LazyBatchNorm1d; becomes a bn_ext.BatchNorm1d."
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, nn.LazyBatchNorm2d):
    __doc__ = "bn_ext drop-in for torch.nn.LazyBatchNorm2d; becomes a bn_ext.BatchNorm2d."
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, nn.LazyBatchNorm3d):
    __doc__ = "bn_ext drop-in for torch.nn.LazyBatchNorm3d; becomes a bn_ext.BatchNorm3d."
    cls_to_become = BatchNorm3d


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d, nn.LazyBatchNorm1d: LazyBatchNorm1d,
                 nn.LazyBatchNorm2d: LazyBatchNorm2d, nn.LazyBatchNorm3d: LazyBatchNorm3d}


def _swap(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` that holds the very same parameters, buffers, hooks and flags as `module`.

    The hook dicts are shared. A lazy layer's own two hooks are methods bound to `module`: the
    forward pre-hook initializes the layer it is called on (the new one), but the load hook
    materializes what `module`'s dicts hold, so a lazy layer shares those dicts too, else after
    a .to() (new buffer objects in the new layer's dict) a checkpoint would not load.
    """
    new = cls.__new__(cls)
    # Instance attributes that call the old layer would run it, with its own `training` flag,
    # which model.eval() no longer reaches: an old layer in eval would still update its stats.
    new.__dict__.update({k: _rebound(v, module, new) for k, v in module.__dict__.items()})
    if not isinstance(module, LazyModuleMixin):
        for key in ("_parameters", "_buffers", "_modules"):
            new.__dict__[key] = dict(module.__dict__[key])
    if new.__dict__.get("_compiled_call_impl") is not None:
        # nn.Module.compile() compiled the old layer's bound _call_impl; its options are not
        # recoverable from the compiled function, so the new layer is left uncompiled.
        new._compiled_call_impl = None
        warnings.warn(f"bn_ext: a {type(module).__name__} compiled in place with "
                      f"Module.compile() was replaced by an uncompiled one ({cls.__module__}."
                      f"{cls.__name__}): call .compile() on it, or on the model, again")
    return new


def _rebound(value, old: nn.Module, new: nn.Module):
    """`value` calling `new` where it called `old`: a method bound to `old`, or a
    functools.partial over it or over such a method. accelerate's hooks, for one, install an
    instance-level forward, `module.forward = partial(new_forward, module)`, with the bound
    method kept as `module._old_forward`. A method of old's class is looked up by name on new's
    class, so that a wrapped forward runs new's kernels; a function the user bound is bound to
    `new` as it is."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        func = value.__func__
        name = getattr(func, "__name__", None)
        if name is not None and getattr(type(old), name, None) is func:
            func = getattr(type(new), name)
        return types.MethodType(func, new)
    if isinstance(value, functools.partial):
        func = _rebound(value.func, old, new)
        if func is value.func and not any(
                v is old for v in (*value.args, *value.keywords.values())):
            return value
        args = tuple(new if a is old else a for a in value.args)
        keywords = {k: new if v is old else v for k, v in value.keywords.items()}
        rebuilt = functools.partial(func, *args, **keywords)
        # functools.update_wrapper's attributes (__wrapped__: the old bound forward) as well
        rebuilt.__dict__.update({k: _rebound(v, old, new) for k, v in value.__dict__.items()})
        return rebuilt
    return value


def convert_model(module: nn.Module) -> nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in `module` (nested ones too) with bn_ext's.

    torch's LazyBatchNorm1d/2d/3d are replaced too, by bn_ext's, which become bn_ext's
    BatchNorm on their first call (one already initialized is a torch BatchNorm, converted as such).

    The new layers hold the same Parameter and buffer objects, so an optimizer built before the
    conversion keeps working; the training flag, device, dtype and hooks are kept, and instance
    attributes that call the old layer (a forward wrapper such as accelerate's hooks) call the
    new one; one compiled in place by Module.compile() is not (a warning says so). Subclasses of
    torch's classes (bn_ext's own, for one) are left alone. Returns the converted module, which
    is a new object only when `module` itself is a BatchNorm.
    """
    return _convert(module, _REPLACEMENTS, {})


_REVERSIONS = {ours: theirs for theirs, ours in _REPLACEMENTS.items()}


def revert_model(module: nn.Module) -> nn.Module:
    """convert_model backwards: every bn_ext BatchNorm1d/2d/3d (and lazy layer) in `module`
    becomes torch's, holding the same Parameter and buffer objects, flags and hooks.

    For tools keyed on torch's exact classes (torch.ao.quantization.fuse_modules, FX graph-mode
    quantization): revert, fuse or quantize, and convert back whatever BatchNorm is left.
    Returns the module, a new object only when `module` itself is a bn_ext layer.
    """
    return _convert(module, _REVERSIONS, {})


def _convert(module: nn.Module, table: dict, done: dict) -> nn.Module:
    """Replaces every layer whose exact class `table` maps, with `done` mapping id(old layer)
    -> its replacement, so that a layer reachable under several names (self.bn and self.alias)
    becomes one layer everywhere."""
    cls = table.get(type(module))
    if cls is not None:
        if id(module) not in done:
            done[id(module)] = (module, _swap(module, cls))  # the old layer kept alive: ids stay
        return done[id(module)][1]
    if id(module) in done:
        return module  # a container already walked
    done[id(module)] = (module, module)
    # _modules, not named_children(), which lists a child held under two names only once
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        converted = _convert(child, table, done)
        if converted is not child:
            setattr(module, name, converted)
    return module
