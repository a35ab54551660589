#!/usr/bin/env python
"""Where a pass's GPU time goes: each kernel's device time per call, by torch.profiler.

bench.py times whole calls; this splits one call of a pass into its kernels (bn_ext's
reductions, their finalize pass, the elementwise maps; cuDNN's and torch's for the peers), with
the same workloads and inputs (bench.make_workload, bench.group_tensors), so that a slow row says
which kernel to look at. Kernel times are the profiler's CUPTI durations, averaged over --iters
calls after a warm-up; they leave out the launch gaps between kernels. The input is small enough
to stay in L2 on some rows (no flush between calls here), so use bench.py for the times to quote.

    python bench/cuda_profile.py [--rows 32x64x56x56:nhwc,4096x1024] [--dtype fp32,bf16]
                                 [--pass fwd,bwd,eval] [--peers bn_ext,cudnn] [--iters 20]

--ncu: for Nsight Compute instead, which reads each kernel's hardware counters (what bounds it:
issue slots, memory, occupancy, stalls). Each pass is warmed up, then one call is run between
torch.cuda.profiler.start() and stop(), after a line naming it, so that under
    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python bench/cuda_profile.py --ncu --peers bn_ext,compile
ncu profiles exactly those calls, and its "==PROF==" lines follow the line of the pass they
belong to. The compile peer (torch.compile) is allowed here: its kernels are the bar.
--flush-l2 reads 256 MiB before the marked call, as bench.py does before each timed call: under
ncu --cache-control none (ncu otherwise flushes the caches before every kernel it profiles) the
call's first kernel then starts from a cold L2 and its later ones see what the earlier left.

bn_ext's training path follows BN_EXT_CUDA_PERSISTENT (unset: the default path, the one-block
single-pass kernel where a channel fits; 0: multi-pass; 1: every single-pass kernel).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench/bench.py: peers and workloads)

DEFAULT_ROWS = "32x64x56x56:nhwc,32x256x56x56:nhwc,32x64x56x56:nchw,32x2048x7x7:nchw,4096x1024"


def parse_rows(text: str) -> list:
    rows = []
    for item in text.split(","):
        shape, _, layout = item.partition(":")
        dims = tuple(int(d) for d in shape.lower().split("x"))
        rows.append((dims, layout or ("n/a" if len(dims) == 2 else "nchw")))
    return rows


def short(name: str) -> str:
    """A kernel's name without its template arguments' namespaces, at most 90 characters."""
    name = re.sub(r"\(anonymous namespace\)::|bn_ext::cuda::detail::|at::native::|void ", "",
                  name)
    return name if len(name) <= 90 else name[:87] + "..."


def profile_one(fn, iters: int) -> tuple:
    """(device us per call, {kernel: (launches per call, us per call)})."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = collections.OrderedDict()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        n, t = kernels.get(ev.name, (0, 0.0))
        kernels[ev.name] = (n + 1, t + ev.device_time_total)
    per_call = {k: (n / iters, t / iters) for k, (n, t) in kernels.items()}
    return sum(t for _, t in per_call.values()), per_call


def mark_one(fn, label: str, flush=None) -> None:
    """One call of fn in the profiler's range (for ncu --profile-from-start off), warmed up;
    with `flush` (a large CUDA tensor), L2 is flushed by reading it first, as bench.py does
    before each timed call (under ncu --cache-control none, the call then meets L2 as there)."""
    for _ in range(3):
        fn()
    if flush is not None:
        flush.sum()
    torch.cuda.synchronize()
    print(f"\n== pass: {label}", flush=True)
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="comma list of NxCxHxW[:nchw|nhwc] or NxC (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--pass", dest="passes", default="fwd,bwd,eval")
    ap.add_argument("--peers", default="bn_ext,cudnn",
                    help="comma list of bn_ext, cudnn, native, and with --ncu compile "
                         "(default: %(default)s)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ncu", action="store_true",
                    help="one marked call per pass, for ncu --profile-from-start off")
    ap.add_argument("--flush-l2", action="store_true",
                    help="with --ncu: read 256 MiB before the marked call, as bench.py does "
                         "before each timed one (for ncu --cache-control none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import bn_ext
    if not bn_ext.has_cuda_kernels():
        ap.error("this bn_ext was built without CUDA kernels")
    flush = (torch.empty(bench.CudaTimer.FLUSH_BYTES // 4, device="cuda")
             if args.ncu and args.flush_l2 else None)
    peers = {p.name: p for p in bench.peers_for("cuda") if args.ncu or p.kind != "compile"}
    wanted = [peers[p] for p in args.peers.split(",")]
    path = bench.training_path()
    what = ("one marked call per pass (ncu)" if args.ncu else
            f"device time per call, averaged over {args.iters} calls")
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}; bn_ext training path "
          f"{path}; {what}")
    for dims, layout in parse_rows(args.rows):
        for dname in args.dtype.split(","):
            torch._dynamo.reset()  # as bench.run_group: a fresh compile per group
            x, dy, weight, bias, _, _ = bench.group_tensors(dims, layout, bench.DTYPES[dname],
                                                            "cuda")
            for pas in args.passes.split(","):
                for peer in wanted:
                    inst = bench.Instance(peer, len(dims), dims[1], "cuda", weight, bias,
                                          "default")
                    if peer.cudnn and not bench.cudnn_eligible(x, inst.module, pas != "eval"):
                        continue
                    fn = bench.make_workload(pas, inst, x, dy)
                    label = "x".join(map(str, dims))
                    if args.ncu:
                        mark_one(fn, f"{label} {layout} {dname} {pas} {peer.name}", flush)
                        continue
                    total, kernels = profile_one(fn, args.iters)
                    print(f"\n{label} {layout} {dname} {pas} {peer.name}: {total:.1f} us "
                          f"in {sum(n for n, _ in kernels.values()):.0f} kernels")
                    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                        print(f"  {t:8.1f} us  x{n:<4.3g} {short(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
