"""Random-case fuzzing of bn_ext.batch_norm against torch's F.batch_norm in float64.

Not collected by pytest (the name has no test_ prefix): it runs for a set time rather than a set
number of cases. Each case draws a shape (1D to 3D BatchNorm, odd sizes, up to --max-numel
elements), a dtype, a memory layout (contiguous, channels-last, a strided slice, a transposed
view), train or eval, affine or not, and an input mean far from zero. It compares y, the running
statistics and, in training, dx, dweight and dbias with the float64 reference, and prints every
case past the tolerance. Exits 1 if any case failed.

    python tests/fuzz_float64.py --device cpu --seconds 600 --seed 0
    BN_EXT_CUDA_PERSISTENT=1 python tests/fuzz_float64.py --device cuda --seconds 120

The tolerances are relative to the reference's largest magnitude, widened by 1 + |mean| / std
below float64 (the centering error of a low-precision input scales with it); dx gets 10x (its
three terms cancel), and the parameter gradients, sums over numel / C elements, are judged
relative to sqrt(numel / C).
"""
import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bn_ext  # noqa: E402
from conftest import make_input  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
LAYOUTS = ["contiguous", "contiguous", "channels_last", "sliced", "transposed"]


def draw_case(rng, device, max_numel):
    """One case's settings, or None where the draw is not a valid BatchNorm input."""
    ndim = rng.choice([2, 3, 4, 4, 4, 5])
    N = rng.choice([1, 2, 3, 8, 16, 32, 64])
    C = rng.choice([1, 3, 7, 16, 17, 33, 64, 100, 256, 1000])
    spatial = [rng.choice([1, 2, 3, 5, 7, 8, 13, 14, 16, 28, 31, 56]) for _ in range(ndim - 2)]
    if ndim == 5:
        spatial = [min(s, 8) for s in spatial]
    shape = (N, C, *spatial)
    numel = 1
    for s in shape:
        numel *= s
    if numel > max_numel or numel // C < 2:   # training needs two values per channel
        return None
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float64]
    if device != "cpu":
        dtypes.append(torch.float16)
    return dict(shape=shape, numel=numel, C=C, dtype=rng.choice(dtypes),
                layout=rng.choice(LAYOUTS), training=rng.random() < 0.7,
                affine=rng.random() < 0.8, mean=rng.choice([0.0, 0.5, 10.0, -50.0]),
                std=rng.choice([1.0, 0.1, 3.0]), seed=rng.randrange(1 << 30))


def relative_error(ours, ref):
    return ((ours.double() - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def run_case(case, device):
    """The case's errors by output name, measured against float64."""
    shape, C, dtype, training = case["shape"], case["C"], case["dtype"], case["training"]
    x = make_input(shape, dtype, device, case["layout"], seed=case["seed"],
                   mean=case["mean"], std=case["std"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = b = None
    if case["affine"]:
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt).to(device)
        b = torch.randn(C, generator=g, dtype=torch.float64).to(pdt).to(device)
    rm = (torch.randn(C, generator=g, dtype=torch.float64) * 0.1 + case["mean"]).to(pdt)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    rm, rv = rm.to(device), rv.to(device)

    def leaf(t, dt=None):
        return None if t is None else t.detach().to(dt or t.dtype).requires_grad_(training)

    xs, ws, bs = leaf(x), leaf(w), leaf(b)
    xd, wd, bd = leaf(x, torch.float64), leaf(w, torch.float64), leaf(b, torch.float64)
    rm_ours, rv_ours = rm.clone(), rv.clone()
    rm_ref, rv_ref = rm.double(), rv.double()
    y = bn_ext.batch_norm(xs, rm_ours, rv_ours, ws, bs, training, 0.1, 1e-5)
    yd = F.batch_norm(xd, rm_ref, rv_ref, wd, bd, training, 0.1, 1e-5)
    errs = {"y": relative_error(y, yd)}
    if training:
        errs["running_mean"] = relative_error(rm_ours, rm_ref)
        errs["running_var"] = relative_error(rv_ours, rv_ref)
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
        y.backward(dy.to(dtype))
        yd.backward(dy)
        errs["dx"] = relative_error(xs.grad, xd.grad)
        if case["affine"]:
            scale = max(1, case["numel"] // C) ** 0.5
            errs["dweight"] = relative_error(ws.grad, wd.grad) / scale
            errs["dbias"] = relative_error(bs.grad, bd.grad) / scale
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-numel", type=int, default=6_000_000)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    t_end = time.time() + args.seconds
    cases = failures = 0
    while time.time() < t_end:
        case = draw_case(rng, args.device, args.max_numel)
        if case is None:
            continue
        errs = run_case(case, args.device)
        cases += 1
        tol = TOL[case["dtype"]]
        if case["dtype"] != torch.float64:
            tol *= 1 + abs(case["mean"]) / case["std"]
        bad = {k: v for k, v in errs.items() if not v <= tol * (10 if k == "dx" else 1)}
        if bad:
            failures += 1
            shown = {k: f"{v:.2e}" for k, v in bad.items()}
            print("FAIL", {k: case[k] for k in ("shape", "dtype", "layout", "training", "affine",
                                                "mean", "std", "seed")}, shown, flush=True)
    print(f"{cases} cases, {failures} failures ({args.device}, seed {args.seed}, "
          f"{args.seconds:.0f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
