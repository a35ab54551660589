"""Random call sequences on bn_ext's layers against torch.nn's, with a float64 referee.

Each case builds a torch.nn.BatchNorm1d/2d/3d and bn_ext's, with the same random constructor
arguments, parameters and buffers, and drives both through the same random sequence: forwards
(train or eval, with or without grad, in any layout; float32 or float64, or 16-bit input with
float32 parameters; some inputs invalid), backwards, train()/eval(), a new momentum (None too),
track_running_stats flipped after construction, reset_running_stats() and load_state_dict().
After every step it compares: whether each raised, and with which error type; the outputs and
gradients (values, dtype, shape); the state_dict (keys, values, num_batches_tracked exactly); and,
after a rejected call, that bn_ext's state is what it was before the call.

Values are judged against a third layer, torch's in float64 on the same (rounded) input:
bn_ext's error must be within the dtype's tolerance (relative to the reference's magnitude,
widened by 1 + |mean| / std of the input, as in fuzz_float64.py) or at most twice torch's own.

bn_ext differs from torch on purpose in these ways (README, "Semantics"), which this allows:
torch counts a rejected training call in num_batches_tracked (it is then set back), an empty
batch with the wrong channel count is refused (torch returns before its checks), a dense input
in neither layout keeps its strides in the output (not compared), and eps = 0 is taken in eval,
as torch 2.13 takes it (torch 2.11 refuses it).

Not collected by pytest by its name; test_parity.py runs a fixed set of seeds. By hand:
    python tests/fuzz_modules.py --seconds 300 --seed 0
"""
import argparse
import math
import random
import sys
import time

import torch
from torch import nn

import bn_ext

TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CLASSES = {1: (nn.BatchNorm1d, bn_ext.BatchNorm1d), 2: (nn.BatchNorm2d, bn_ext.BatchNorm2d),
           3: (nn.BatchNorm3d, bn_ext.BatchNorm3d)}
RANKS = {1: (2, 3), 2: (4,), 3: (5,)}


class Mismatch(AssertionError):
    pass


def attempt(fn):
    """(result, None) or (None, the exception)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every error is compared with torch's
        return None, e


def same_outcome(theirs, ours, what):
    """True when both raised (of the same type), False when neither did; else a Mismatch."""
    if theirs is None and ours is None:
        return False
    if theirs is None or ours is None or not isinstance(ours, type(theirs)):
        raise Mismatch(f"{what}: torch {theirs!r}, bn_ext {ours!r}")
    return True


def relative_error(t, ref):
    err = (t.double() - ref.double()).abs()
    both_nan = t.double().isnan() & ref.double().isnan()
    same_inf = t.double().isinf() & (t.double() == ref.double())
    err = torch.where(both_nan | same_inf, torch.zeros_like(err), err)
    scale = ref.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item() \
        if ref.numel() else 0.0
    return (err.max().item() if err.numel() else 0.0) / max(1.0, scale)


def check_value(theirs, ours, ref, tol, what):
    """ours against the float64 ref: within tol, or no worse than twice torch's error."""
    if (theirs is None) != (ours is None):
        raise Mismatch(f"{what}: torch gave {theirs is not None}, bn_ext {ours is not None}")
    if ours is None:
        return
    if ref is None:
        raise Mismatch(f"{what}: the float64 layer gave nothing where torch and bn_ext did")
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        raise Mismatch(f"{what}: torch {theirs.dtype} {tuple(theirs.shape)}, "
                       f"bn_ext {ours.dtype} {tuple(ours.shape)}")
    e_ours, e_theirs = relative_error(ours, ref), relative_error(theirs, ref)
    if not (e_ours <= tol or e_ours <= 2 * e_theirs):  # a NaN error fails
        raise Mismatch(f"{what}: error {e_ours:.3g} against float64 (torch's {e_theirs:.3g}, "
                       f"tolerance {tol:.3g})")


def check_state(theirs, ours, ref, tol, what):
    a, b, r = theirs.state_dict(), ours.state_dict(), ref.state_dict()
    if list(a) != list(b):
        raise Mismatch(f"{what}: state_dict keys {list(a)} vs {list(b)}")
    for key in a:
        if key == "num_batches_tracked":
            if not torch.equal(a[key], b[key]):
                raise Mismatch(f"{what}: num_batches_tracked {a[key]} vs {b[key]}")
        else:
            check_value(a[key], b[key], r[key], tol, f"{what}: {key}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if (getattr(theirs, name) is None) != (getattr(ours, name) is None):
            raise Mismatch(f"{what}: {name} is None in one layer only")


def _clone_state(state):
    """A copy of a state_dict with its _metadata: without the version it holds, torch's loading
    takes it for an old checkpoint and adds num_batches_tracked."""
    copy = type(state)((k, v.clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", None)
    return copy


def _check_unchanged(before, layer):
    after = layer.state_dict()
    for k, v in before.items():
        if not torch.equal(v.nan_to_num(), after[k].nan_to_num()):
            raise Mismatch(f"a rejected call changed bn_ext's {k}: {v} -> {after[k]}")


def draw_input(rng, rank, C, dtype, device):
    """An input of BatchNorm{rank}d's ranks (sometimes empty), and its conditioning
    1 + |mean| / std."""
    ndim = rng.choice(RANKS[rank])
    N = 0 if rng.random() < 0.05 else rng.choice([1, 2, 3, 4, 7])
    shape = [N, C] + [rng.choice([1, 2, 3, 5, 8]) for _ in range(ndim - 2)]
    mean, std = rng.choice([0.0, 0.0, 3.0, -50.0]), rng.choice([1.0, 1e-3, 100.0])
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    if x.numel() and rng.random() < 0.1:
        x.select(1, rng.randrange(C)).fill_(2.5)  # a constant channel: var 0
    if x.numel() and rng.random() < 0.03:
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([math.inf, -math.inf, math.nan])
    x = x.to(dtype)
    layout = rng.random()
    if layout < 0.2 and ndim >= 3:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels-last
    elif layout < 0.3 and ndim >= 3:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # dense, neither layout
    elif layout < 0.4:
        x = torch.cat([x, x], dim=-1)[..., ::2]  # strided, not dense
    return x.to(device), 1 + abs(mean) / std


def run_sequence(seed, device="cpu"):
    """One case; returns its log, or raises Mismatch with the log in the message."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    log = []
    try:
        _run(rng, device, log)
    except Mismatch as e:
        raise Mismatch(f"seed {seed}: {e}\n  " + "\n  ".join(log)) from None
    return log


def _run(rng, device, log):
    rank = rng.choice([1, 2, 3])
    torch_cls, ours_cls = CLASSES[rank]
    C = rng.choice([1, 2, 3, 5, 8])
    pdtype = rng.choice([torch.float32, torch.float32, torch.float64])
    kw = dict(eps=rng.choice([1e-5, 1e-3, 0.1, 0.0]),
              momentum=rng.choice([0.1, None, 0.0, 1.0, 0.5]), affine=rng.random() < 0.7,
              track_running_stats=rng.random() < 0.75, device=device)
    log.append(f"{torch_cls.__name__}({C}, dtype={pdtype}, {kw})")
    theirs = torch_cls(C, dtype=pdtype, **kw)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(-2, 2)
            theirs.bias.uniform_(-1, 1)
        if theirs.running_mean is not None:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours = ours_cls(C, dtype=pdtype, **kw)
    ref = torch_cls(C, dtype=torch.float64, **kw)
    layers = (theirs, ours, ref)
    for layer in layers[1:]:
        layer.load_state_dict(theirs.state_dict())

    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.12:
            mode = rng.random() < 0.5
            log.append(f"train({mode})")
            for layer in layers:
                layer.train(mode)
        elif r < 0.16:
            m = rng.choice([0.1, None, 0.3])
            log.append(f"momentum = {m}")
            for layer in layers:
                layer.momentum = m
        elif r < 0.19:
            flag = rng.random() < 0.5
            log.append(f"track_running_stats = {flag}")
            for layer in layers:
                layer.track_running_stats = flag
        elif r < 0.22:
            log.append("reset_running_stats()")
            outcomes = [attempt(layer.reset_running_stats)[1] for layer in layers]
            same_outcome(outcomes[0], outcomes[1], "reset_running_stats")
        elif r < 0.25:
            log.append("load_state_dict(torch's)")
            state = theirs.state_dict()
            for layer in layers[1:]:
                layer.load_state_dict(state)
        else:
            _forward_backward(rng, device, layers, rank, C, pdtype, log)


def _forward_backward(rng, device, layers, rank, C, pdtype, log):
    theirs, ours, ref = layers
    dtype = pdtype
    if pdtype == torch.float32 and rng.random() < 0.3:
        dtype = rng.choice([torch.bfloat16, torch.float16])
    wrong_c = rng.random() < 0.05
    x, cond = draw_input(rng, rank, C + wrong_c, dtype, device)
    if rng.random() < 0.03:
        x = x.flatten()  # a wrong rank
    grad = x.numel() > 0 and rng.random() < 0.6
    log.append(f"forward {tuple(x.shape)} {x.dtype} strides {x.stride()} "
               f"training={theirs.training} grad={grad}")
    xs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_(grad)
          for _ in range(2)]
    xr = x.detach().double().requires_grad_(grad)
    before = _clone_state(ours.state_dict())
    y_ref, _ = attempt(lambda: ref(xr))
    y_theirs, e_theirs = attempt(lambda: theirs(xs[0]))
    y_ours, e_ours = attempt(lambda: ours(xs[1]))
    if e_ours is not None and e_theirs is None and x.numel() == 0 and wrong_c:
        log.append("  an empty batch with the wrong channel count: refused (torch takes it)")
        e_theirs = e_ours
    if (isinstance(e_theirs, ValueError) and theirs.eps == 0
            and "eps must be positive, but got" in str(e_theirs)):
        # torch before 2.13 refuses eps = 0 in eval too, before any other check; bn_ext takes
        # it, as 2.13 does (and may then refuse something else, leaving its state as it was)
        log.append(f"  eps = 0 in eval: torch {torch.__version__} refuses it; bn_ext "
                   f"{'takes it' if e_ours is None else f'raised {e_ours!r}'}")
        _check_unchanged(before, ours)
        return
    if same_outcome(e_theirs, e_ours, "forward"):
        log.append(f"  both raised {type(e_ours).__name__}: {e_ours}")
        _check_unchanged(before, ours)
        for layer in (theirs, ref):  # torch counted the call before it raised
            layer.load_state_dict(before)
        return
    tol = TOL[dtype] * (cond if dtype != torch.float64 else 1)
    check_value(y_theirs, y_ours, y_ref, tol, "output")
    check_state(theirs, ours, ref, tol, "state after the forward")
    if y_ours.requires_grad != y_theirs.requires_grad:
        raise Mismatch(f"output requires_grad: torch {y_theirs.requires_grad}, bn_ext "
                       f"{y_ours.requires_grad}")
    if not y_ours.requires_grad or y_ours.numel() == 0:
        return
    dy = torch.randn(y_ours.shape, dtype=torch.float64, device=device)
    names = (["input"] if grad else []) + [n for n in ("weight", "bias")
                                           if getattr(ours, n) is not None]

    def grads(layer, xin, y, g):
        return torch.autograd.grad(y, [xin if n == "input" else getattr(layer, n)
                                       for n in names], g)

    g_ref, _ = attempt(lambda: grads(ref, xr, y_ref, dy))
    g_theirs, e_theirs = attempt(lambda: grads(theirs, xs[0], y_theirs, dy.to(dtype)))
    g_ours, e_ours = attempt(lambda: grads(ours, xs[1], y_ours, dy.to(dtype)))
    if same_outcome(e_theirs, e_ours, "backward"):
        return
    for name, a, b, c in zip(names, g_theirs, g_ours, g_ref or [None] * 3):
        scale = 10 if name == "input" else max(1, x.numel() // x.shape[1]) ** 0.5
        check_value(a, b, c, tol * scale, f"grad of {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t_end = time.time() + args.seconds
    seed, failures = args.seed, 0
    while time.time() < t_end:
        try:
            run_sequence(seed, args.device)
        except Mismatch as e:
            failures += 1
            print("FAIL", e, flush=True)
        seed += 1
    print(f"{seed - args.seed} cases, {failures} failures ({args.device}, seeds {args.seed}.."
          f"{seed - 1})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
