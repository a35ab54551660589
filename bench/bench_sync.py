"""bn_ext.SyncBatchNorm against torch.nn.SyncBatchNorm: bytes communicated, and time per step.

    python bench/bench_sync.py                 # bytes table, then gloo/CPU timing with 2 ranks
    python bench/bench_sync.py --bytes-only
    python bench/bench_sync.py --world 2 --reps 30 --shapes 8x64x56x56 32x2048x7x7

Bytes (computed from what each collective is handed, per BatchNorm layer and training step):
  bn_ext   forward  all_reduce of 2C + 3 float64: count, rejected flag, float64 ranks, per
                    channel the sums of n * mean and of n * (var + mean^2)
           backward all_reduce of 2C math-type values (sum_dy, sum_dy_xmu)
  torch    forward  all_gather of 2C + 1 values of the input dtype per rank (mean, invstd, count);
                    every rank receives W * (2C + 1) of them
           backward all_reduce of 2C values of the input dtype
"Sent per rank" is what one rank sends with the bandwidth-optimal ring algorithms NCCL and gloo use
for large buffers: all_reduce of S bytes sends 2 (W - 1) / W * S (reduce-scatter + all-gather),
all_gather of S bytes per rank sends (W - 1) * S. Small buffers are latency-bound, where the count
of collectives (two per layer and step for both) matters more than their size.

Timing: torch.nn.SyncBatchNorm refuses CPU input ("SyncBatchNorm expected input tensor to be on
GPU"), and torch.batch_norm_stats/_elemt/_backward_* have no CPU kernels, so on the CPU its
protocol is re-enacted here with torch's CPU ops: batch_norm_update_stats for the local stats,
all_gather of (mean, invstd, count) in the input dtype, the same host-synchronising filter of
empty ranks, the merge of torch.batch_norm_gather_stats_with_counts, the eval-mode batch_norm
kernel for the elementwise pass, and torch ops for the backward (two reductions, the all_reduce
of (sum_dy, sum_dy_xmu), a three-pass elementwise). Its compute is a rough stand-in; the
like-for-like comparison of the two protocols is the "collectives only" pair, which times each
protocol's two collectives alone. "local" is a plain BatchNorm2d with no communication, a floor.
All variants are timed round-robin, with a barrier before every step.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# ResNet-50 (torchvision v1.5): the channel count of each of its 53 BatchNorm layers.
def resnet50_bn_channels():
    channels = [64]  # stem
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for b in range(blocks):
            channels += [width, width, 4 * width]
            if b == 0:
                channels.append(4 * width)  # downsample
    assert len(channels) == 53
    return channels


def bytes_per_layer(C, W, in_bytes=4):
    """{protocol: (forward buffer, backward buffer, sent per rank)} for one layer and step."""
    ours_f, ours_b = (2 * C + 3) * 8, 2 * C * in_bytes
    torch_f_own, torch_b = (2 * C + 1) * in_bytes, 2 * C * in_bytes
    ring_ar = 2 * (W - 1) / W
    return {
        "bn_ext": (ours_f, ours_b, ring_ar * (ours_f + ours_b)),
        "torch": (W * torch_f_own, torch_b, (W - 1) * torch_f_own + ring_ar * torch_b),
    }


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def bytes_table():
    rows = ["| C | W | bn_ext fwd / bwd buffer | torch fwd (received) / bwd buffer | "
            "sent per rank: bn_ext | torch | torch / bn_ext |",
            "|---|---|---|---|---|---|---|"]
    for C in (64, 256, 2048):
        for W in (2, 8, 64, 512):
            b = bytes_per_layer(C, W)
            rows.append(f"| {C} | {W} | {fmt_bytes(b['bn_ext'][0])} / {fmt_bytes(b['bn_ext'][1])}"
                        f" | {fmt_bytes(b['torch'][0])} / {fmt_bytes(b['torch'][1])}"
                        f" | {fmt_bytes(b['bn_ext'][2])} | {fmt_bytes(b['torch'][2])}"
                        f" | {b['torch'][2] / b['bn_ext'][2]:.2f}x |")
    chans = resnet50_bn_channels()
    rows += ["", f"ResNet-50, all 53 BatchNorm layers ({sum(chans)} channels), fp32, per step:",
             "", "| W | sent per rank: bn_ext | torch | torch / bn_ext |", "|---|---|---|---|"]
    for W in (2, 4, 8, 16, 64, 256, 1024):
        ours = sum(bytes_per_layer(C, W)["bn_ext"][2] for C in chans)
        theirs = sum(bytes_per_layer(C, W)["torch"][2] for C in chans)
        rows.append(f"| {W} | {fmt_bytes(ours)} | {fmt_bytes(theirs)} | {theirs / ours:.2f}x |")
    return "\n".join(rows)


# ---- torch's protocol, re-enacted on the CPU -----------------------------------------------

class TorchProtocolSyncBN(torch.autograd.Function):
    """What torch.nn.modules._functions.SyncBatchNorm does, with CPU ops (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):
        x = x.contiguous()
        C = x.shape[1]
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # torch's CPU stats kernel
        invstd = (var + eps).rsqrt()
        count = torch.full((1,), x.numel() // C, dtype=x.dtype)
        combined = torch.cat([mean, invstd, count])
        gathered = [torch.empty_like(combined) for _ in range(world)]
        dist.all_gather(gathered, combined, group)
        allstats = torch.stack(gathered)
        mean_all, invstd_all, count_all = allstats.split(C, dim=1)
        mask = count_all.squeeze(-1) >= 1  # boolean indexing: a host sync in torch too
        mean_all, invstd_all, count_all = mean_all[mask], invstd_all[mask], count_all[mask]
        # batch_norm_gather_stats_with_counts
        n = count_all.double()
        total = n.sum()
        g_mean = (n * mean_all.double()).sum(0) / total
        var_all = invstd_all.double().pow(-2) - eps
        g_var = (n * (var_all + (mean_all.double() - g_mean) ** 2)).sum(0) / total
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * g_mean.to(x.dtype))
            unbiased = g_var * total / (total - 1)
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(x.dtype))
        g_mean, g_var = g_mean.to(x.dtype), g_var.to(x.dtype)
        out = torch.nn.functional.batch_norm(x, g_mean, g_var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, g_mean, (g_var + eps).rsqrt(), total.to(x.dtype))
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        dy = dy.contiguous()
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = (1, C) + (1,) * (x.dim() - 2)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * (x - mean.view(shape))).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        both = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(both, group=ctx.group)
        sum_dy, sum_dy_xmu = both[:C], both[C:]
        # dx = a * dy + b * x + c per channel, in three passes
        a = invstd * weight
        b = -a * invstd * invstd * sum_dy_xmu / total
        c = -a * sum_dy / total - b * mean
        dx = (dy * a.view(shape)).addcmul_(x, b.view(shape)).add_(c.view(shape))
        return dx, grad_weight, grad_bias, None, None, None, None, None, None


class TorchProtocolModule(torch.nn.BatchNorm2d):
    def forward(self, x):
        return TorchProtocolSyncBN.apply(x, self.weight, self.bias, self.running_mean,
                                         self.running_var, self.eps, self.momentum,
                                         dist.group.WORLD, dist.get_world_size())


# ---- timing ----------------------------------------------------------------------------------

def _median_ms(fns, reps, warmup):
    """{name: median ms} for the callables in fns, timed round-robin (so that load from other
    processes on the machine falls on all of them alike), a barrier before every step."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        t = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        out[name] = statistics.median(t.tolist()) * 1e3
    return out


def _worker(rank, world, store, shapes, reps, warmup, threads, queue):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    import bn_ext
    from bn_ext.sync_batchnorm import SyncBatchNorm

    results = []
    for dims in shapes:
        C = dims[1]
        torch.manual_seed(rank)
        x = (torch.randn(dims) * 2 + 1).requires_grad_()
        gy = torch.randn(dims)
        mods = {
            "bn_ext.SyncBatchNorm": SyncBatchNorm(C),
            "torch protocol (re-enacted)": TorchProtocolModule(C),
            "local bn_ext.BatchNorm2d": bn_ext.BatchNorm2d(C),
            "local torch.nn.BatchNorm2d": torch.nn.BatchNorm2d(C),
        }
        # the re-enactment computes what bn_ext's does (a sanity check of the baseline)
        outs = []
        for m in list(mods.values())[:2]:
            x.grad = None
            y = m(x)
            y.backward(gy)
            outs.append((y.detach(), x.grad.clone()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
        def step(m):
            x.grad = None
            m(x).backward(gy)

        row = _median_ms({name: (lambda m=m: step(m)) for name, m in mods.items()}, reps, warmup)

        # the collectives alone
        ours_f = torch.zeros(2 * C + 3, dtype=torch.float64)
        ours_b = torch.zeros(2 * C)
        theirs = torch.zeros(2 * C + 1)
        theirs_out = [torch.empty_like(theirs) for _ in range(world)]

        def ours_comm():
            dist.all_reduce(ours_f)
            dist.all_reduce(ours_b)

        def theirs_comm():
            dist.all_gather(theirs_out, theirs)
            dist.all_reduce(ours_b)

        row.update(_median_ms({"comm bn_ext": ours_comm, "comm torch": theirs_comm},
                              reps * 3, warmup))
        results.append((dims, row))
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def timing_table(world, shapes, reps, warmup, threads):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), shapes, reps, warmup,
                                          threads, queue),
                           nprocs=world, join=True, start_method="spawn")
    results = queue.get()
    rows = [f"gloo, CPU, {world} processes x {threads} thread(s), fp32 NCHW, training forward + "
            f"backward of one layer; median of {reps} steps (max over ranks per step), ms",
            "",
            "| per-rank shape | bn_ext.SyncBatchNorm | torch protocol (re-enacted) | "
            "local bn_ext BN | local torch BN | collectives only: bn_ext | torch |",
            "|---|---|---|---|---|---|---|"]
    for dims, r in results:
        rows.append(
            f"| {'x'.join(map(str, dims))} | {r['bn_ext.SyncBatchNorm']:.2f} | "
            f"{r['torch protocol (re-enacted)']:.2f} | {r['local bn_ext.BatchNorm2d']:.2f} | "
            f"{r['local torch.nn.BatchNorm2d']:.2f} | {r['comm bn_ext']:.3f} | "
            f"{r['comm torch']:.3f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--shapes", nargs="*", default=["8x64x56x56", "32x256x14x14", "32x2048x7x7",
                                                   "32x64x8x8"])
    p.add_argument("--bytes-only", action="store_true")
    args = p.parse_args(argv)
    print("## Bytes per BatchNorm layer and training step (fp32)\n")
    print(bytes_table())
    if args.bytes_only:
        return
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    print(f"\n## Time per step (torch {torch.__version__})\n")
    print(timing_table(args.world, shapes, args.reps, args.warmup, args.threads))


if __name__ == "__main__":
    sys.exit(main())
