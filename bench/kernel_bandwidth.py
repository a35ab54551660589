#!/usr/bin/env python
"""Kernel bandwidth without allocation cost, against dst.copy_(src) on the same tensor (CPU).

bench.py times whole calls: every BatchNorm call (bn_ext's and torch's) gets a fresh output, and
for tensors larger than malloc's mmap threshold that output is a new mapping which the OS faults
in and zeroes page by page. The copy reference writes into a buffer that already exists, so it
pays none of that. This script removes the difference: it re-executes itself with glibc told to
keep freed blocks (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), so outputs come back from
the heap already mapped, and then compares each pass with the copy in one process, interleaved,
minimum over rounds.

    python bench/kernel_bandwidth.py [--shape 32x256x56x56] [--layout nchw|nhwc] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
        "MALLOC_TOP_PAD_": str(1 << 29)}

if any(os.environ.get(k) != v for k, v in _ENV.items()):  # glibc reads these at startup only
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **_ENV})

import torch  # noqa: E402

import bn_ext  # noqa: E402


def best_of(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="32x256x56x56")
    ap.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="calls per peer and round")
    args = ap.parse_args()

    shape = tuple(int(s) for s in args.shape.split("x"))
    x = torch.randn(shape)
    if args.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    dst = torch.empty_like(x)
    dy = torch.randn_like(x)
    ours, ref = bn_ext.BatchNorm2d(C), torch.nn.BatchNorm2d(C)
    ours_eval, ref_eval = bn_ext.BatchNorm2d(C).eval(), torch.nn.BatchNorm2d(C).eval()
    xg = x.detach().clone().requires_grad_()
    y_ours, y_ref = ours(xg), ref(xg)

    def backward(y):
        return lambda: torch.autograd.grad(y, xg, dy, retain_graph=True)

    # (name, passes over the tensor: ENGINEERING.md section 4's usual counts, fn)
    peers = [("copy_", 2, lambda: dst.copy_(x))]
    with torch.no_grad():
        peers += [("bn_ext eval", 2, lambda: ours_eval(x)), ("torch eval", 2, lambda: ref_eval(x))]
    peers += [("bn_ext fwd", 3, lambda: ours(x)), ("torch fwd", 3, lambda: ref(x)),
              ("bn_ext bwd", 5, backward(y_ours)), ("torch bwd", 5, backward(y_ref))]
    best = {name: float("inf") for name, _, _ in peers}
    for _ in range(args.rounds):
        for name, _, fn in peers:
            if "eval" in name:
                with torch.no_grad():
                    best[name] = min(best[name], best_of(fn, args.calls))
            else:
                best[name] = min(best[name], best_of(fn, args.calls))

    gb = x.numel() * x.element_size() / 1e9
    copy_gbs = 2 * gb / best["copy_"]
    print(f"# {args.shape} {args.layout} fp32, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; outputs recycled by malloc (no page faults); best of "
          f"{args.rounds} rounds x {args.calls} calls")
    print(f"{'peer':12s} {'ms':>8s} {'GB/s':>7s} {'% copy':>7s}")
    for name, passes, _ in peers:
        gbs = passes * gb / best[name]
        print(f"{name:12s} {best[name] * 1e3:8.2f} {gbs:7.1f} {100 * gbs / copy_gbs:6.0f}%")


if __name__ == "__main__":
    main()
