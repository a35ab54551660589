#!/usr/bin/env python
"""Benchmark bn_ext's BatchNorm against torch eager, cuDNN and torch.compile.

    python bench/bench.py --device cpu  --dtype fp32,bf16 --layout nchw,nhwc \
                          --pass fwd,bwd,eval,fwdbwd [--quick] [--max-mb 256] --out bench/results
    python bench/bench.py --device cuda --dtype fp32,bf16,fp16

Peers, timed interleaved in one process on the very same input tensors:
    cpu:  bn_ext | torch eager | torch.compile(nn.BatchNorm*)
    cuda: bn_ext | eager with cuDNN | eager native (cuDNN disabled) | torch.compile(nn.BatchNorm*)
    cuda --cuda-persistent: bn_ext on its single-pass path | bn_ext multi-pass | the same three

For every row (shape, layout, dtype, pass) the peers are timed round-robin for --rounds rounds
(the starting peer rotates); each round gives one median per peer, and a peer's time is the
median of its round medians. Speedups are ratios of those times. A row where some peer is within
--close-band of bn_ext after those rounds gets more, up to --close-rounds in all (on the CPU,
whose noise is larger than such a margin), so that a verdict near 1.0x rests on more samples.

Writes <out>/<device-slug>[-quick][-recheck].md, .json and .png, and prints the table. The .md and
.json are written after every (shape, layout, dtype) group as well, marked partial, so a run that
is stopped keeps what it measured; --resume times only the rows that file lacks.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

T_PROCESS = time.monotonic()  # --deadline-s counts from here (torch's import included)

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes as shapes_mod  # noqa: E402  (bench/shapes.py)

try:
    from tqdm import tqdm
except ImportError:  # degrade to a plain progress line
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
LAYOUTS = ("nchw", "nhwc")
PASSES = ("fwd", "bwd", "eval", "fwdbwd")  # issue 4's, the default
EXTRA_PASSES = ("evalbwd",)                 # only when asked for with --pass
# Passes over the tensor (numel * itemsize each), the "usual" counts of ENGINEERING.md section 4;
# eval's backward reads dy and x and writes dx.
PASS_COUNTS = {"fwd": 3, "bwd": 5, "eval": 2, "fwdbwd": 8, "evalbwd": 3}
PASS_DESC = {
    "fwd": "training forward (grad enabled, running stats updated)",
    "bwd": "training backward only: autograd.grad(y, (x, weight, bias), dy, retain_graph=True) "
           "on a graph built once; the forward is not in the time",
    "eval": "eval forward under torch.no_grad()",
    "fwdbwd": "training forward + autograd.grad(y, (x, weight, bias), dy)",
    "evalbwd": "eval backward only (fine-tuning with frozen statistics): autograd.grad(y, "
               "(x, weight, bias), dy, retain_graph=True) on an eval graph built once",
}
BW_BAR = {"cpu": 70.0, "cuda": 80.0}  # issue 4: % of copy bandwidth for out-of-cache tensors
MB = 1e6


# =============================================================================================
# Device information
# =============================================================================================

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_caches() -> list:
    """(level, type, size as sysfs writes it, bytes) for each cache cpu0 lists in sysfs."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    out = []
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        return out
    for idx in entries:
        try:
            with open(os.path.join(base, idx, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, idx, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, idx, "size")) as f:
                size = f.read().strip()
            n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError, IndexError):
            continue
        out.append((level, kind, size, n))
    return out


def cache_bytes(device: str) -> int:
    """Last-level cache size: L3 (or the largest listed) on the CPU, L2 on the GPU."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    return max((n for *_, n in cpu_caches()), default=32 * 2**20)


def slugify(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def cpu_signature() -> str:
    """CPU family/model and cache sizes: cloud VMs of one model name run on different
    generations (the 2-core "AMD EPYC" has been both Zen 4 and Zen 5), and ratios differ."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    caches = [f"L{level}{'d' if kind == 'Data' else ''} {size}"
              for level, kind, size, _ in cpu_caches() if kind != "Instruction"]
    parts = []
    if fields:
        parts.append(f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}")
    if caches:
        parts.append(", ".join(caches))
    return "; ".join(parts)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    sig = cpu_signature()
    return f"{cpu_model()} ({cpu_count()} cores{'; ' + sig if sig else ''})"


def device_slug(device: str) -> str:
    if device == "cuda":
        return "cuda-" + slugify(torch.cuda.get_device_name(0))
    return f"cpu-{slugify(cpu_model())}-{cpu_count()}c"


def git_rev() -> str:
    # BN_EXT_COMMIT, where the caller sets it, names the tree: the GPU tool's copy of the working
    # tree carried a .git of the session's first commit, so git named a commit the code was not.
    if os.environ.get("BN_EXT_COMMIT"):
        return os.environ["BN_EXT_COMMIT"][:7] + " (BN_EXT_COMMIT)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "bn_ext"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        if not rev:  # a copy of the tree without .git
            return "unknown"
        return rev + ("+dirty (csrc/ or bn_ext/ modified)" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bn_ext_build() -> str:
    """Which compiled bn_ext ran: the extension's sha256 prefix and modification time."""
    import hashlib
    import bn_ext
    path = getattr(bn_ext._C, "__file__", None) if hasattr(bn_ext, "_C") else None
    if not path:
        return "unknown build"
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    built = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return f"{os.path.basename(path)} sha256 {digest}, built {built:%Y-%m-%d %H:%M UTC}"


# =============================================================================================
# Timing
# =============================================================================================

class CpuTimer:
    """torch.utils.benchmark.Timer at torch's thread count; blocked_autorange median, seconds."""

    label = "torch.utils.benchmark.Timer.blocked_autorange, median"

    def __init__(self, min_run_time: float):
        from torch.utils import benchmark
        self._benchmark = benchmark
        self.min_run_time = min_run_time
        self.threads = torch.get_num_threads()

    def __call__(self, fn: Callable) -> float:
        t = self._benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        return t.blocked_autorange(min_run_time=self.min_run_time).median


class CudaTimer:
    """GPU time of one call, seconds: the median over samples of CUDA events around it.

    Before each sample the L2 cache is flushed by reading a 256 MiB buffer (a read leaves clean
    lines; a write, as triton's do_bench flushes, leaves dirty ones that the timed kernels then
    write back), and the GPU is held by torch.cuda._sleep for longer than the host takes to
    launch the call, so that all of its kernels are queued when the start event fires. The time
    is that of the kernels run back to back: without the host's launch gaps, which a network
    hides by running ahead of the GPU and which would otherwise favour the peer with the least
    Python (autograd.grad alone costs 100-200 us of host time, more than a small row's kernels).
    --triton times with triton.testing.do_bench instead (launch gaps included).
    """

    FLUSH_BYTES = 256 * 2**20

    def __init__(self, quick: bool, use_triton: bool, l2_flush: bool):
        self.rep_ms = 30 if quick else 100
        self.warmup_ms = 10 if quick else 25
        self.samples = 20 if quick else 50
        self.l2_flush = l2_flush
        self.do_bench = None
        if use_triton:
            try:
                from triton.testing import do_bench
            except ImportError as e:
                raise SystemExit(f"--triton: triton is not importable ({e})") from None
            self.do_bench = do_bench
            self.label = (f"triton.testing.do_bench (warmup {self.warmup_ms} ms, rep "
                          f"{self.rep_ms} ms, L2 flushed by a write; host launch gaps "
                          f"included), median")
            return
        self.short_holds = 0  # samples dropped because the hold ended too soon
        self.short_kept = 0   # such samples kept, the hold at its cap
        self._hold_scale = 1
        self._flush_buf = torch.empty(self.FLUSH_BYTES // 4, device="cuda") if l2_flush else None
        self._cycles_per_s = self._sleep_rate()
        self.label = (f"CUDA events around one call, {self.samples} samples, median; before "
                      f"each, " + ("L2 flushed by reading 256 MiB, then " if l2_flush else "")
                      + "the GPU held (torch.cuda._sleep) until the host has queued the whole "
                      "call: kernel time without host launch gaps")

    @staticmethod
    def _sleep_rate() -> float:
        """torch.cuda._sleep cycles per second on this GPU (its clock under load)."""
        cycles = 2_000_000
        torch.cuda._sleep(50 * cycles)  # first call (module load), and the clock up to speed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def __call__(self, fn: Callable) -> float:
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                       return_mode="median")) / 1e3
        host = []
        for _ in range(3):  # warm-up, and the host's time to launch one call
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        hold_s = 2 * statistics.median(host) + 50e-6
        pairs = []
        while len(pairs) < self.samples:
            if self._flush_buf is not None:
                self._flush_buf.sum()
            torch.cuda._sleep(int(self._cycles_per_s * hold_s * self._hold_scale))
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            if s.query():
                # The start event fired before the host had queued the whole call (the clock
                # rose after calibration, or the host was slow): this sample could hold launch
                # gaps. Drop it and hold twice as long from now on; with the hold at its cap,
                # keep it, counted.
                if self._hold_scale < 1024:
                    self._hold_scale *= 2
                    self.short_holds += 1
                    continue
                self.short_kept += 1
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def interleaved(fns: dict, timer: Callable, rounds: int, max_rounds: int = 0,
                close: Optional[Callable] = None) -> tuple:
    """Round-robin over the peers, rotating who goes first; per peer the median of its round
    medians plus the spread (max/min of the round medians - 1), and the rounds run. After
    `rounds` rounds, while close(medians so far) holds, more rounds follow, up to max_rounds:
    a verdict near 1.0x gets the samples to settle it, whichever side of 1.0 it is on, and no
    round is ever dropped."""
    names = list(fns)
    samples = {n: [] for n in names}
    r = 0
    while r < rounds or (r < max_rounds and close is not None
                         and close({n: statistics.median(v) for n, v in samples.items()})):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(timer(fns[n]))
        r += 1
    return {n: (statistics.median(v), max(v) / min(v) - 1.0) for n, v in samples.items()}, r


def near_parity(band: float) -> Callable:
    """close() for interleaved: some peer's time is within a factor (1 + band) of bn_ext's."""
    def close(med: dict) -> bool:
        ours = med["bn_ext"]
        return any(n not in ("bn_ext", "copy") and abs(math.log(t / ours)) < math.log1p(band)
                   for n, t in med.items())
    return close


COPY_BYTES = 256 * 2**20


def copy_workload(device: str) -> Callable:
    """dst.copy_(src) on a 256 MB buffer: the device's copy, read + write = 2 * COPY_BYTES."""
    src = torch.rand(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)
    fn()
    return fn


def copy_bandwidth(device: str, timer: Callable) -> float:
    """Bytes/s of the 256 MB copy, counting read + write."""
    fn = copy_workload(device)
    times = [timer(fn) for _ in range(3)]
    return 2 * COPY_BYTES / statistics.median(times)


# =============================================================================================
# Peers
# =============================================================================================

@dataclass
class Peer:
    name: str                      # column name
    kind: str                      # "bn_ext" | "eager" | "compile"
    cudnn: Optional[bool] = None   # cuda only: torch.backends.cudnn.enabled while it runs
    env: Optional[dict] = None     # environment variables set while it runs
    variant: bool = False          # a --variant peer (timed on --variant-passes only)


# --cuda-persistent's second bn_ext: the multi-pass path, timed in the same rounds as the
# single-pass one, so that the single-pass speedup over it is a side-by-side ratio.
MULTI_PASS = "multi-pass"


def peers_for(device: str, persistent: bool = False) -> list:
    if device == "cuda":
        own = [Peer(MULTI_PASS, "bn_ext", env={"BN_EXT_CUDA_PERSISTENT": "0"})] if persistent \
            else []
        return [Peer("bn_ext", "bn_ext")] + own + [
            Peer("cudnn", "eager", cudnn=True), Peer("native", "eager", cudnn=False),
            Peer("compile", "compile")]
    return [Peer("bn_ext", "bn_ext"), Peer("eager", "eager"), Peer("compile", "compile")]


def variant_peers(specs: list, taken=()) -> list:
    """--variant NAME:VAR=VALUE[,VAR=VALUE...]: bn_ext again under those environment variables
    (an experiment's switch, read by the C++ on every call), as the peer NAME, which must differ
    from the `taken` names, the other variants' and "copy" (the copy-bandwidth workload's)."""
    peers = []
    for spec in specs or []:
        name, _, assigns = spec.partition(":")
        pairs = [a.split("=", 1) for a in assigns.split(",")]
        if not name or not all(len(p) == 2 and p[0] for p in pairs):
            raise SystemExit(f"--variant {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE...]")
        if name in [*taken, "copy", *(p.name for p in peers)]:
            raise SystemExit(f"--variant: the name {name!r} is taken")
        peers.append(Peer(name, "bn_ext", env=dict(pairs), variant=True))
    return peers


def selected_peers(args) -> list:
    """peers_for(args.device) and the --variant peers, less those that --peers leaves out
    (bn_ext always stays, and so do the other bn_ext paths: --cuda-persistent's multi-pass and
    the variants)."""
    peers = peers_for(args.device, getattr(args, "cuda_persistent", False))
    variants = variant_peers(getattr(args, "variant", None), [p.name for p in peers])
    peers = peers[:1] + [p for p in peers[1:] if p.kind == "bn_ext"] + variants + [
        p for p in peers[1:] if p.kind != "bn_ext"]
    if getattr(args, "peers", None):
        own = {p.name for p in peers if p.kind == "bn_ext"}
        wanted = set(split(args.peers, [p.name for p in peers])) | own
        peers = [p for p in peers if p.name in wanted]
    return peers


def torch_peers(peers: list) -> list:
    """The names of the peers that are torch (the bar's 'best of'), in column order."""
    return [p.name for p in peers if p.kind != "bn_ext"]


def own_peers(peers: list) -> list:
    """The names of the other bn_ext paths timed beside bn_ext (--cuda-persistent's multi-pass,
    the --variant peers)."""
    return [p.name for p in peers if p.kind == "bn_ext" and p.name != "bn_ext"]


@contextlib.contextmanager
def cudnn_enabled(flag: Optional[bool]):
    if flag is None:
        yield
        return
    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = flag
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = old


@contextlib.contextmanager
def environment(values: Optional[dict]):
    """`values` set in os.environ while it runs, and those keys alone put back after. (Patching
    the whole environment, mock.patch.dict, puts it back by clear() and update(), a putenv per
    variable: ~85 us with 35 variables, which was timed in every CPU sample of every peer.)"""
    if not values:
        yield
        return
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cudnn_eligible(x: torch.Tensor, module: nn.Module, training: bool) -> bool:
    """Whether torch's batch_norm picks cuDNN for this input (not for bfloat16, nor for an (N, C)
    input): where it does not, the cudnn column would time the native kernel a second time."""
    select = getattr(torch._C, "_select_batch_norm_backend", None)
    if select is None:
        return True
    with cudnn_enabled(True):
        backend = select(x, module.weight, module.bias, module.running_mean, module.running_var,
                         training, module.eps)
    return "cudnn" in str(backend).lower()


class Instance:
    """A peer's module for one (shape, layout, dtype): same weights as every other peer."""

    def __init__(self, peer: Peer, ndim: int, channels: int, device: str,
                 weight: torch.Tensor, bias: torch.Tensor, compile_mode: str):
        import bn_ext
        self.peer = peer
        self.error = None           # why this peer is n/a for the whole group
        self.compile_s = 0.0
        ours = {2: bn_ext.BatchNorm1d, 4: bn_ext.BatchNorm2d, 5: bn_ext.BatchNorm3d}
        theirs = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
        cls = (ours if peer.kind == "bn_ext" else theirs)[ndim]
        # Parameters stay fp32 for every input dtype (mixed precision, as under autocast).
        self.module = cls(channels, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.module.weight.copy_(weight)
            self.module.bias.copy_(bias)
        self.call = self.module
        if peer.kind == "compile":
            self.call = torch.compile(self.module, mode=compile_mode, dynamic=False)

    def context(self):
        """What the peer runs under, entered inside every timed call: nothing at all for a peer
        that sets nothing (torch's on the CPU, bn_ext's default)."""
        if self.peer.cudnn is None and not self.peer.env:
            return contextlib.nullcontext()
        return self._switched()

    @contextlib.contextmanager
    def _switched(self):
        with cudnn_enabled(self.peer.cudnn), environment(self.peer.env):
            yield

    def set_running_stats(self, mean: torch.Tensor, var: torch.Tensor):
        """The same running stats in every peer before each pass: the training passes update
        them a different number of times per peer, and eval reads them."""
        with torch.no_grad():
            self.module.running_mean.copy_(mean)
            self.module.running_var.copy_(var)


def make_workload(pas: str, inst: Instance, x: torch.Tensor, dy: torch.Tensor) -> Callable:
    """The callable that one timing sample runs, for pass `pas`, with the module in the mode
    that pass needs. For 'bwd' the forward graph is built here, once."""
    call, mod, ctx = inst.call, inst.module, inst.context
    params = (mod.weight, mod.bias)
    if pas == "eval":
        mod.eval()

        def fn():
            with ctx(), torch.no_grad():
                return call(x)
        return fn
    if pas == "evalbwd":
        mod.eval()
        xg = x.detach().requires_grad_(True)
        with ctx():
            y = call(xg)

        def fn():
            with ctx():
                return torch.autograd.grad(y, (xg,) + params, dy, retain_graph=True)
        return fn
    mod.train()
    xg = x.detach().requires_grad_(True)
    if pas == "fwd":
        def fn():
            with ctx():
                return call(xg)
    elif pas == "fwdbwd":
        def fn():
            with ctx():
                return torch.autograd.grad(call(xg), (xg,) + params, dy)
    elif pas == "bwd":
        with ctx():
            y = call(xg)

        def fn():
            with ctx():
                return torch.autograd.grad(y, (xg,) + params, dy, retain_graph=True)
    else:
        raise ValueError(pas)
    return fn


def max_rel_err(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    worst = 0.0
    for u, v in zip(a, b):
        u, v = u.detach().float(), v.detach().float()
        scale = max(v.abs().max().item(), 1e-6)
        worst = max(worst, (u - v).abs().max().item() / scale)
    return worst


TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# =============================================================================================
# The run
# =============================================================================================

@dataclass
class Row:
    shape: str
    note: str
    group: str
    layout: str
    dtype: str
    pas: str
    mb: float                                   # input tensor size, MB (1e6 bytes)
    bytes_moved: int = 0
    status: str = "ok"                          # "ok" | "skipped: ..." | "error: ..."
    times: dict = field(default_factory=dict)   # peer -> seconds (None: n/a)
    spread: dict = field(default_factory=dict)  # peer -> max/min of round medians - 1
    na: dict = field(default_factory=dict)      # peer -> reason it is n/a
    rel_err: Optional[float] = None             # bn_ext vs the first torch peer, first call
    wall_s: float = 0.0                         # seconds this row took (warm-up + rounds)
    rounds: Optional[int] = None                # rounds timed (more than --rounds when close)
    copy_gbs: Optional[float] = None            # out-of-cache rows: the 256 MB copy, timed
                                                # in the same rounds as the peers

    def pct_copy(self) -> Optional[float]:
        """bn_ext's GB/s as % of the copy timed beside it (else the run's copy figure)."""
        t = self.times.get("bn_ext")
        if not t:
            return None
        return 100 * self.bytes_moved / t / 1e9 / (self.copy_gbs or META["copy_gbs"])

    def speedup(self, peer: str) -> Optional[float]:
        ours, theirs = self.times.get("bn_ext"), self.times.get(peer)
        return theirs / ours if ours and theirs else None

    def best_speedup(self, peers: list) -> Optional[float]:
        s = [self.speedup(p) for p in peers if self.speedup(p) is not None]
        return min(s) if s else None


def run(args, plan: list, peers: list, timer: Callable, log: Callable,
        done: Optional[dict] = None, on_group: Optional[Callable] = None) -> tuple:
    """Times the plan; returns (rows, seconds spent compiling). `done` maps (shape, layout,
    dtype, pass) to rows of an earlier run (--resume): a group whose rows are all there is not
    timed again. on_group(rows, compile seconds) is called after every group (the partial results
    are written)."""
    device = args.device
    done = done or {}
    rows, compile_total = [], 0.0
    nrows = len(plan) * len(args.dtypes) * len(args.passes)
    bar = progress(nrows)
    # Host memory bandwidth drifts within a run on a shared VM (a 256 MB copy measured 46.6 GB/s
    # at the start of one run and 77.3 at its end), so out-of-cache rows time the copy as one
    # more peer in their own rounds, and their % copy is against that.
    copy_fn = copy_workload(device)
    for knob in ("recompile_limit", "cache_size_limit"):  # the name differs across versions
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    longest = 0.0  # the longest group so far, seconds
    # dtype-major: a run cut short (--deadline-s, a lease ending) has every shape in its first
    # dtype (fp32, the bar's) before any in the next.
    for dname, (shape, layout) in itertools.product(args.dtypes, plan):
        dtype = DTYPES[dname]
        size = shape.numel * torch.empty((), dtype=dtype).element_size()
        group_rows = [Row(shape.label, shape.note, shape.group, layout, dname, p, size / MB,
                          bytes_moved=PASS_COUNTS[p] * size) for p in args.passes]
        earlier = [done.get((shape.label, layout, dname, p)) for p in args.passes]
        if all(earlier):
            rows += earlier
            bar.update(len(earlier))
            continue
        if args.max_mb is not None and size / MB > args.max_mb:
            for r in group_rows:
                r.status = f"skipped: {size / MB:.0f} MB > --max-mb {args.max_mb:g}"
            rows += group_rows
            bar.update(len(group_rows))
            continue
        elapsed = time.monotonic() - T_PROCESS
        if args.deadline_s is not None and elapsed + 1.25 * longest > args.deadline_s:
            for r in group_rows:
                r.status = (f"not timed: --deadline-s {args.deadline_s:g} (--resume times "
                            f"it)")
            rows += group_rows
            bar.update(len(group_rows))
            continue
        try:
            compile_total += run_group(args, shape, layout, dtype, peers, group_rows, timer,
                                       bar, log, copy_fn if size > META["cache_mb"] * MB
                                       else None)
        except Exception as e:  # noqa: BLE001  (an OOM or a bn_ext failure: keep the row)
            msg = f"error: {type(e).__name__}: {first_line(e)}"
            for r in group_rows:
                if r.status == "ok" and not r.times:
                    r.status = msg
                    bar.update(1)
            log(f"{shape.label} {layout} {dname}: {msg}")
        rows += group_rows
        longest = max(longest, time.monotonic() - T_PROCESS - elapsed)
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_group is not None:
            on_group(rows, compile_total)
    bar.close()
    return rows, compile_total


def group_tensors(dims: tuple, layout: str, dtype: torch.dtype, device: str) -> tuple:
    """One (shape, layout, dtype)'s tensors, the same on every run: input x and output gradient
    dy in the layout, and the per-channel weight, bias, running mean and running variance (fp32,
    on the CPU; each peer copies them)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    c = dims[1]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(dims, generator=gen).to(device=device, dtype=dtype).contiguous(
        memory_format=fmt)
    dy = torch.randn(dims, generator=gen).to(device=device, dtype=dtype).contiguous(
        memory_format=fmt)
    weight = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen)
    run_mean = 0.1 * torch.randn(c, generator=gen)
    run_var = torch.rand(c, generator=gen) + 0.5
    return x, dy, weight, bias, run_mean, run_var


def run_group(args, shape, layout, dtype, peers, group_rows, timer, bar, log,
              copy_fn: Optional[Callable] = None) -> float:
    """Time every pass of one (shape, layout, dtype); returns seconds spent compiling."""
    device = args.device
    torch._dynamo.reset()  # fresh compile per shape; keeps the recompile count low
    c = shape.dims[1]
    x, dy, weight, bias, run_mean, run_var = group_tensors(shape.dims, layout, dtype, device)
    insts = []
    for p in peers:
        inst = Instance(p, len(shape.dims), c, device, weight, bias, args.compile_mode)
        insts.append(inst)
    compile_s = 0.0
    for row in group_rows:
        bar.set_postfix_str(f"{row.shape} {row.layout} {row.dtype} {row.pas}")
        t_row = time.perf_counter()
        fns, first_out = {}, {}
        for inst in insts:
            name = inst.peer.name
            if inst.error:
                row.na[name] = inst.error
                continue
            if inst.peer.variant and row.pas not in args.variant_passes:
                row.na[name] = "not in --variant-passes"
                continue
            training = row.pas not in ("eval", "evalbwd")
            if inst.peer.cudnn and not cudnn_eligible(x, inst.module, training):
                row.na[name] = "cuDNN not eligible: torch runs its native kernel for this input"
                continue
            inst.set_running_stats(run_mean, run_var)
            t0 = time.perf_counter()
            try:
                fn = make_workload(row.pas, inst, x, dy)
                first_out[name] = fn()      # warm-up; compiles the compile peer
                for _ in range(args.warmup - 1):
                    fn()
                sync(device)
            except Exception as e:  # noqa: BLE001
                if inst.peer.kind == "bn_ext":
                    raise
                reason = f"{type(e).__name__}: {first_line(e)}"
                row.na[name] = reason
                if inst.peer.kind == "compile":
                    inst.error = reason     # don't retry a failed compile for the other passes
                log(f"{row.shape} {row.layout} {row.dtype} {row.pas}: {name} n/a ({reason})")
                continue
            if inst.peer.kind == "compile":
                compile_s += time.perf_counter() - t0
            fns[name] = fn
        # The reference: the first torch peer that ran this row (cudnn is n/a on some rows).
        ref_name = next((p.name for p in peers if p.kind != "bn_ext" and p.name in first_out),
                        None)
        if ref_name is not None:
            row.rel_err = max_rel_err(first_out["bn_ext"], first_out[ref_name])
        del first_out
        if copy_fn is not None:
            fns["copy"] = copy_fn
        res, row.rounds = interleaved(fns, timer, args.rounds, args.close_rounds,
                                      near_parity(args.close_band))
        if "copy" in res:
            row.copy_gbs = 2 * COPY_BYTES / res["copy"][0] / 1e9
        for inst in insts:
            name = inst.peer.name
            row.times[name] = res[name][0] if name in res else None
            row.spread[name] = res[name][1] if name in res else None
        del fns, res
        row.wall_s = time.perf_counter() - t_row
        bar.update(1)
    return compile_s


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:160]


class _PlainBar:
    """What the run shows without tqdm: one line per row on stderr."""

    def __init__(self, total: int):
        self.total, self.n, self.t0, self.postfix = total, 0, time.time(), ""

    def set_postfix_str(self, s: str):
        self.postfix = s

    def update(self, k: int = 1):
        self.n += k
        el = time.time() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else 0
        print(f"[{self.n}/{self.total}] {el:5.0f}s elapsed, ~{eta:4.0f}s left  {self.postfix}",
              file=sys.stderr, flush=True)

    def write(self, s: str):
        print(s, file=sys.stderr, flush=True)

    def close(self):
        pass


_BAR = None


def progress(total: int):
    global _BAR
    _BAR = tqdm(total=total, unit="row", dynamic_ncols=True) if tqdm else _PlainBar(total)
    return _BAR


def log(msg: str):
    if _BAR is not None:
        _BAR.write(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


# =============================================================================================
# Report
# =============================================================================================

def fmt_ms(t: Optional[float]) -> str:
    if t is None:
        return "n/a"
    ms = t * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_x(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return f"**{s:.2f}x**" if s < 1.0 else f"{s:.2f}x"


def geomean(v: list) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


def allocation_settings(device: str) -> Optional[str]:
    """How fresh CPU outputs get their memory, which decides out-of-cache times. bn_ext takes
    outputs of 256 KiB and more from its output cache (freed blocks, reused by size; limit
    BN_EXT_CPU_CACHE_MB, 0 = off) and advises huge pages for new blocks of 32 MiB and more
    (BN_EXT_HUGE_PAGES=0 = off). torch's outputs come from malloc, which unmaps or trims large
    freed blocks; its allocator advises huge pages only under THP_MEM_ALLOC_ENABLE=1."""
    if device != "cpu":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        thp = "unknown"
    import bn_ext

    limit = bn_ext.cpu_cache_stats()["limit_bytes"] >> 20
    cache = f"on, limit {limit} MiB" if limit else "off"
    advice = "off" if os.environ.get("BN_EXT_HUGE_PAGES") == "0" else "on"
    theirs = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return (f"kernel THP mode `{thp}`; bn_ext output cache for outputs >= 256 KiB: {cache}; "
            f"bn_ext huge-page advice for new blocks >= 32 MiB: {advice}; "
            f"torch THP_MEM_ALLOC_ENABLE: {theirs} (torch's outputs come from malloc, "
            f"with 4 KiB pages unless it is 1)")


def kernel_switches() -> dict:
    """The environment variables that choose bn_ext's kernels or its outputs' memory (and
    torch's, THP_MEM_ALLOC_ENABLE), as this process has them."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("BN_EXT_CUDA_", "BN_EXT_CPU_")) or
            k in ("BN_EXT_HUGE_PAGES", "THP_MEM_ALLOC_ENABLE")}


def training_path() -> str:
    """bn_ext's CUDA training path under this process's BN_EXT_CUDA_PERSISTENT (and
    BN_EXT_CUDA_SEMI_PERSISTENT), and whether the multi-pass path's later launches are dependent
    ones (BN_EXT_CUDA_PDL)."""
    mode = os.environ.get("BN_EXT_CUDA_PERSISTENT")
    if mode == "0":
        path = "multi-pass (BN_EXT_CUDA_PERSISTENT=0)"
    elif mode == "1":
        path = ("single-pass kernels (one block per channel, or cooperative) where a channel "
                "fits, multi-pass elsewhere (BN_EXT_CUDA_PERSISTENT=1)")
    else:
        path = ("the default: the one-block single-pass kernel where a contiguous channel fits "
                "in a block, multi-pass elsewhere")
    if mode != "0" and os.environ.get("BN_EXT_CUDA_SEMI_PERSISTENT") == "1":
        path += ("; the semi-persistent kernel for channels-last inputs of one tile "
                 "(BN_EXT_CUDA_SEMI_PERSISTENT=1)")
    if os.environ.get("BN_EXT_CUDA_PDL") == "0":
        return path + "; no dependent launches (BN_EXT_CUDA_PDL=0)"
    return path + "; the multi-pass launches after an op's first are dependent ones (sm_90 on)"


def header(args, meta: dict) -> list:
    lines = [f"# bn_ext benchmark: {meta['device_name']}", ""]
    lines += [f"- device: {meta['device_name']}",
              f"- torch {meta['torch']}, CUDA {meta['cuda']}"
              + (f", cuDNN {meta['cudnn']}" if meta.get("cudnn") else "")
              + f", bn_ext {meta['bn_ext']} (repo {meta['git']}; {meta['build']})",
              f"- threads: {meta['threads']}; date: {meta['date']}",
              f"- command: `{meta['command']}`",
              f"- timing: {meta['timer']}; peers interleaved round-robin in one process on the "
              f"same tensors, {args.rounds} rounds"
              + (f" (up to {args.close_rounds} in all on a row where some peer's time is within "
                 f"a factor {1 + args.close_band:g} of bn_ext's after {args.rounds}; each row's "
                 "count is in the .json)" if args.close_rounds > args.rounds else "")
              + ", each peer's time = median of its round medians; speedup = peer time / "
              "bn_ext time (>1: bn_ext faster; **bold** < 1)",
              f"- copy bandwidth (dst.copy_(src), 256 MB, read+write counted): "
              f"{meta['copy_gbs']:.1f} GB/s (the higher of {meta['copy_gbs_start']:.1f} at the "
              f"start and {meta['copy_gbs_end']:.1f} at the end); last-level cache "
              f"{meta['cache_mb']:.0f} MB",
              "- GB/s is bn_ext's, counting passes of numel*itemsize over the tensor "
              "(ENGINEERING.md section 4, usual counts): "
              + ", ".join(f"{p} {PASS_COUNTS[p]}" for p in args.passes) + "; "
              "% copy = GB/s / copy bandwidth; on rows larger than the last-level cache, the "
              "256 MB copy is timed as one more peer in the row's own rounds and % copy is "
              "against that (the .json keeps it as copy_gbs)",
              "- passes: " + "; ".join(f"**{p}** = {PASS_DESC[p]}" for p in args.passes),
              "- parameters (weight, bias, running stats) are fp32 for every input dtype "
              "(mixed precision, as under autocast); MB = input tensor size (1e6 bytes)",
              ]
    if meta.get("allocation"):
        lines.append(f"- allocation: {meta['allocation']}")
    if meta.get("switches"):
        lines.append("- set in the environment: " + ", ".join(
            f"{k}={v}" for k, v in meta["switches"].items()))
    if meta.get("short_holds") is not None:
        lines.append(f"- samples dropped because the GPU hold ended before the host had queued "
                     f"the call (then held twice as long): {meta['short_holds']}")
    if meta.get("short_kept"):
        lines.append(f"- samples kept although the GPU hold ended before the host had queued "
                     f"the call (the hold at its cap, 1024x; these may include host launch "
                     f"gaps): {meta['short_kept']}")
    if meta.get("resumed"):
        lines.append(f"- resumed: {meta['resumed']}")
    for v in variant_peers(getattr(args, "variant", None)):
        lines.append(f"- variant: {v.name} = bn_ext with "
                     + ", ".join(f"{k}={val}" for k, val in v.env.items())
                     + " while it runs, in the same rounds"
                     + ("" if getattr(args, "variant_passes", args.passes) == args.passes else
                        f", on {','.join(args.variant_passes)} only (n/a elsewhere)"))
    if args.device == "cuda":
        lines.append("- bn_ext CUDA training path: " + training_path()
                     + (f"; {MULTI_PASS} = bn_ext's multi-pass path (BN_EXT_CUDA_PERSISTENT=0 "
                        "while it runs) in the same rounds" if args.cuda_persistent else ""))
        lines.append("- peers: cudnn = eager with torch.backends.cudnn.enabled=True, n/a on "
                     "rows where torch does not pick cuDNN (bf16; BatchNorm1d's (N, C) input) "
                     "and would run native again; native = eager with cuDNN disabled; compile "
                     f"= torch.compile(nn.BatchNorm*, mode={args.compile_mode!r}, "
                     f"dynamic=False), compile time in total {meta['compile_s']:.0f} s")
    else:
        lines.append("- peers: eager = torch.nn.BatchNorm*, compile = torch.compile(nn."
                     f"BatchNorm*, mode={args.compile_mode!r}, dynamic=False), compiled once "
                     f"per (shape, layout, dtype); compile time in total {meta['compile_s']:.0f} s")
    if args.max_mb is not None:
        lines.append(f"- rows whose input exceeds --max-mb {args.max_mb:g} are listed as "
                     "skipped, not timed")
    return lines


def table(rows: list, peers: list) -> list:
    others, own = torch_peers(peers), own_peers(peers)
    head = (["shape", "set", "layout", "dtype", "pass", "MB", "bn_ext ms"]
            + [f"{p} ms" for p in own + others] + [f"vs {p}" for p in others]
            + ["vs best"] + [f"vs {p}" for p in own] + ["GB/s", "% copy"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.shape, r.note, r.layout, r.dtype, r.pas, f"{r.mb:.1f}"]
        if r.status != "ok":
            cells += [r.status] + [""] * (len(head) - len(cells) - 1)
        else:
            t = r.times.get("bn_ext")
            gbs = r.bytes_moved / t / 1e9 if t else None
            cells += [fmt_ms(t)] + [fmt_ms(r.times.get(p)) for p in own + others]
            cells += [fmt_x(r.speedup(p)) for p in others] + [fmt_x(r.best_speedup(others))]
            cells += [fmt_x(r.speedup(p)) for p in own]
            cells += [f"{gbs:.1f}" if gbs else "n/a",
                      f"{r.pct_copy():.0f}%" if gbs else "n/a"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def vs_best_as(r, paths: list, others: list) -> Optional[float]:
    """Row r's speedup over its best torch peer had bn_ext taken the least of `paths`' times
    (bn_ext's own paths: its default, the --variant peers)."""
    t = min((r.times[p] for p in paths if r.times.get(p)), default=None)
    s = [r.times[q] / t for q in others if t and r.times.get(q)]
    return min(s) if s else None


def what_if(ok: list, others: list, own: list) -> list:
    """The bar's view of each of bn_ext's paths as if it were the default: how many rows would
    be below the best torch peer, and the geometric mean over it (rows where every path and a
    peer were timed). "fastest" takes each row's fastest path: the most that a choice made per
    row could reach."""
    sel = [r for r in ok if all(r.times.get(p) for p in own)]
    out = ["Had bn_ext run each of its paths on every row (n = rows where all were timed):", "",
           "| path | n | below the best peer | geomean vs best |", "|---|---|---|---|"]
    for name, paths in [(p, [p]) for p in ["bn_ext"] + own] + [("fastest", ["bn_ext"] + own)]:
        s = [v for v in (vs_best_as(r, paths, others) for r in sel) if v is not None]
        out.append(f"| {name} | {len(s)} | {sum(v < 1.0 for v in s)} | {fmt_x(geomean(s))} |")
    every = ["bn_ext"] + own
    below = [(r, v) for r in sel
             for v in [vs_best_as(r, every, others)] if v is not None and v < 1.0]
    if below:
        out += ["", "Rows below the best peer on every path:"]
        out += [f"- {r.shape} {r.layout} {r.dtype} {r.pas}: {v:.2f}x" for r, v in below]
    return out


def summary(rows: list, peers: list, args) -> list:
    others, own = torch_peers(peers), own_peers(peers)
    ok = [r for r in rows if r.status == "ok" and r.times.get("bn_ext")]
    if not ok:
        return ["## Summary", "", f"No timed rows ({len(rows)} planned; see the statuses above)."]
    lines = ["## Summary", "",
             "Geometric-mean speedup of bn_ext over each peer (rows where both were timed; "
             "n = rows bn_ext was timed on; a peer timed on fewer, as cudnn, which is n/a on "
             "bf16 and (N, C) rows, has its count in brackets; vs best: the fastest torch peer "
             "timed on each row).", "",
             "| dtype | pass | n | " + " | ".join(f"vs {p}" for p in others) + " | vs best |"
             + "".join(f" vs {p} |" for p in own),
             "|" + "---|" * (4 + len(others) + len(own))]
    for dname in args.dtypes + ["all"]:
        for pas in args.passes:
            sel = [r for r in ok if r.pas == pas and (dname == "all" or r.dtype == dname)]
            if not sel:
                continue
            cells = [dname, pas, str(len(sel))]

            def mean_cell(values):
                values = [v for v in values if v]
                counted = f" ({len(values)})" if 0 < len(values) < len(sel) else ""
                return fmt_x(geomean(values)) + counted
            for p in others:
                cells.append(mean_cell([r.speedup(p) for r in sel]))
            cells.append(mean_cell([r.best_speedup(others) for r in sel]))
            for p in own:
                cells.append(mean_cell([r.speedup(p) for r in sel]))
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    losers = [r for r in ok if any((r.speedup(p) or 1.0) < 1.0 for p in others)]
    lines.append(f"**Rows below 1.0x against at least one peer: {len(losers)} of {len(ok)}**"
                 + (" (bn_ext ms; each peer: speedup, ms):" if losers else "."))
    if losers:
        lines.append("")
        for r in losers:
            vs = ", ".join(f"{r.speedup(p):.2f}x vs {p} {fmt_ms(r.times[p])}" for p in others
                           if r.speedup(p) is not None)
            rounds = f" ({r.rounds} rounds)" if r.rounds else ""
            lines.append(f"- {r.shape} {r.layout} {r.dtype} {r.pas}{rounds}: bn_ext "
                         f"{fmt_ms(r.times['bn_ext'])}; {vs}")
    for p in own:
        slower = [r for r in ok if (r.speedup(p) or 1.0) < 1.0]
        lines += ["", f"**Rows where bn_ext is slower than its {p} path: {len(slower)} of "
                  f"{len(ok)}**" + (":" if slower else ".")]
        lines += [f"- {r.shape} {r.layout} {r.dtype} {r.pas}: {fmt_ms(r.times['bn_ext'])} vs "
                  f"{fmt_ms(r.times[p])} ms ({r.speedup(p):.2f}x)" for r in slower]
    if own:
        lines += [""] + what_if(ok, others, own)
    lines.append("")
    # Bandwidth of out-of-cache rows, against the bar.
    bar = BW_BAR[args.device]
    big = [r for r in ok if r.mb * MB > META["cache_mb"] * MB]
    lines += [f"Out-of-cache rows (input > {META['cache_mb']:.0f} MB cache): bn_ext's % of "
              f"copy bandwidth, and how many fall below the {bar:.0f}% bar.", "",
              "| dtype | pass | n | median % copy | min % copy | below bar |",
              "|---|---|---|---|---|---|"]
    for dname in args.dtypes:
        for pas in args.passes:
            sel = [r for r in big if r.dtype == dname and r.pas == pas]
            if not sel:
                continue
            pct = [r.pct_copy() for r in sel]
            lines.append(f"| {dname} | {pas} | {len(sel)} | {statistics.median(pct):.0f}% | "
                         f"{min(pct):.0f}% | {sum(p < bar for p in pct)} |")
    lines.append("")
    skipped = [r for r in rows if r.status.startswith("skipped")]
    errors = [r for r in rows if r.status.startswith("error")]
    lines.append(f"Rows: {len(rows)} planned, {len(ok)} timed, {len(skipped)} skipped "
                 f"(--max-mb), {len(errors)} errors.")
    for r in errors:
        lines.append(f"- error: {r.shape} {r.layout} {r.dtype} {r.pas}: {r.status}")
    na = {}
    for r in rows:
        for p, why in r.na.items():
            na.setdefault((p, why), []).append(f"{r.shape} {r.layout} {r.dtype} {r.pas}")
    for (p, why), where in na.items():
        lines.append(f"- {p} n/a on {len(where)} rows ({why}), e.g. {where[0]}")
    bad = [r for r in ok if r.rel_err is not None
           and r.rel_err > TOLERANCE[DTYPES[r.dtype]]]
    lines.append(f"- correctness spot check (bn_ext vs torch eager, first call, max error "
                 f"relative to the output's max): {len(bad)} rows over tolerance"
                 + "".join(f"\n  - {r.shape} {r.layout} {r.dtype} {r.pas}: {r.rel_err:.2e}"
                           for r in bad))
    more = [r for r in ok if (r.rounds or 0) > args.rounds]
    if more:
        lines.append(f"- rounds: {len(more)} rows were close to parity after {args.rounds} "
                     f"rounds and got more (up to {max(r.rounds for r in more)})")
    noisy = [r for r in ok if (r.spread.get("bn_ext") or 0) > 0.10]
    lines.append(f"- noise: {len(noisy)} rows where bn_ext's round medians spread by more than "
                 "10% (max/min); see the .json for every peer's spread")
    return lines


def plot(rows: list, peers: list, args, path: str) -> Optional[str]:
    """Dot plot: one panel per pass, one line per (shape, layout, dtype), one dot per peer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written (pip install matplotlib)"
    others = torch_peers(peers) + own_peers(peers)
    keys = []
    for r in rows:
        k = (r.shape, r.layout, r.dtype)
        if k not in keys:
            keys.append(k)
    index = {k: i for i, k in enumerate(keys)}
    passes = [p for p in args.passes if any(r.pas == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), sharey=True, squeeze=False,
                             figsize=(3.2 * len(passes) + 3, 0.18 * len(keys) + 1.8))
    markers = ["o", "s", "^", "D"]
    for ax, pas in zip(axes[0], passes):
        for j, peer in enumerate(others):
            pts = [(r.speedup(peer), index[(r.shape, r.layout, r.dtype)]) for r in rows
                   if r.pas == pas and r.speedup(peer)]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, marker=markers[j % 4],
                           label=f"vs {peer}", alpha=0.8)
        for r in rows:
            if r.pas == pas and r.status != "ok":
                ax.annotate(r.status.split(":")[0], (1.0, index[(r.shape, r.layout, r.dtype)]),
                            fontsize=6, color="gray", va="center", ha="center")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{pas} ({PASS_COUNTS[pas]} passes)")
        ax.set_xlabel("speedup of bn_ext (x)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0][0].set_yticks(range(len(keys)))
    axes[0][0].set_yticklabels([" ".join(k) for k in keys], fontsize=6)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    from matplotlib.ticker import NullFormatter
    for ax in axes[0]:
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones collide
    fig.suptitle(f"bn_ext speedup, {META['device_name']}, torch {META['torch']}", fontsize=10)
    # Leave the top strip to the suptitle (about 0.5 inch whatever the figure's height).
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# =============================================================================================
# CLI
# =============================================================================================

META: dict = {}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default=None,
                    help="comma list of fp32,bf16,fp16 (default: all the device's: cpu "
                         "fp32,bf16; cuda fp32,bf16,fp16)")
    ap.add_argument("--layout", default="nchw,nhwc", help="comma list of nchw,nhwc")
    ap.add_argument("--pass", dest="passes", default=",".join(PASSES),
                    help="comma list of fwd,bwd,eval,fwdbwd (the default), and evalbwd")
    ap.add_argument("--shape", dest="shapes", default=None,
                    help="comma list of shape labels from the plan (e.g. 32x512x7x7,256x1000): "
                         "time only those, to recheck rows with more --rounds")
    ap.add_argument("--quick", action="store_true",
                    help="the engineering notes' 4 rows + BatchNorm1d 4096x1024, fewer repeats")
    ap.add_argument("--max-mb", type=float, default=None,
                    help="skip (and list as skipped) rows whose input tensor exceeds this many "
                         "MB; default 256 on the CPU, no limit on the GPU; <=0 for no limit")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per row (default 3)")
    ap.add_argument("--close-rounds", type=int, default=None,
                    help="rounds, in all, for a row where some peer is within --close-band of "
                         "bn_ext after --rounds (default 9 on cpu, --rounds (off) on cuda)")
    ap.add_argument("--close-band", type=float, default=0.15,
                    help="what counts as close for --close-rounds: a peer's time within a "
                         "factor 1 + this of bn_ext's, either way (default 0.15)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="CPU: blocked_autorange min_run_time per round, s (default 0.05)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed calls per peer and row before the rounds (the first one "
                         "compiles the compile peer and feeds the correctness spot check)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--triton", action="store_true",
                    help="cuda: time with triton.testing.do_bench (host launch gaps included) "
                         "instead of CUDA events after a GPU hold")
    ap.add_argument("--no-l2-flush", action="store_true",
                    help="cuda, events timer: do not flush L2 before every call")
    ap.add_argument("--cuda-persistent", action="store_true",
                    help="cuda: set BN_EXT_CUDA_PERSISTENT=1, so bn_ext's training passes use "
                         "the single-pass kernels where a tile fits, and time bn_ext's "
                         "multi-pass path beside them as the peer 'multi-pass' (adds "
                         "-persistent to the file stem)")
    ap.add_argument("--variant", action="append", default=None,
                    metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="time bn_ext once more in the same rounds, under these environment "
                         "variables, as the peer NAME (repeatable): an experiment's switch "
                         "against the default, e.g. narrow:BN_EXT_CUDA_NARROW_VECTORS=1")
    ap.add_argument("--variant-passes", default=None,
                    help="comma list of the passes on which the --variant peers are timed "
                         "(default: every pass of the run); n/a on the others (a switch for "
                         "the training kernels runs bn_ext's default code in eval)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no (shape, layout, dtype) group that would not end this many "
                         "seconds after the start (judged by the longest group so far); the "
                         "rest are listed as not timed and the final table and plot written "
                         "(for a time-limited GPU lease; --resume times the rest later)")
    ap.add_argument("--peers", default=None,
                    help="comma list of the peers to time (bn_ext always, and with "
                         "--cuda-persistent multi-pass): on cuda of cudnn, native, compile; on "
                         "cpu of eager, compile. Default: all")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    ap.add_argument("--plan", action="store_true",
                    help="print the planned rows (and which --max-mb skips) and exit")
    ap.add_argument("--name", default=None,
                    help="file stem (default: device slug, plus -quick with --quick and "
                         "-recheck with --shape)")
    ap.add_argument("--resume", action="store_true",
                    help="take over the timed rows of the file this run would write (an earlier "
                         "run stopped early: results are written after every group) and time "
                         "only the rest")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="redraw the PNG beside a saved results JSON, and exit (no timing)")
    args = ap.parse_args(argv)

    if args.cuda_persistent and args.device != "cuda":
        ap.error("--cuda-persistent needs --device cuda")
    args.dtypes = split(args.dtype or ",".join(DEVICE_DTYPES[args.device]), DTYPES)
    bad = [d for d in args.dtypes if d not in DEVICE_DTYPES[args.device]]
    if bad:
        ap.error(f"dtype {bad} is not benchmarked on {args.device}")
    args.layouts = split(args.layout, LAYOUTS)
    args.passes = split(args.passes, PASSES + EXTRA_PASSES)
    args.variant_passes = (args.passes if args.variant_passes is None
                           else split(args.variant_passes, args.passes))
    if args.max_mb is None:
        args.max_mb = 256.0 if args.device == "cpu" else None
    elif args.max_mb <= 0:
        args.max_mb = None
    if args.rounds is None:
        args.rounds = 3
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.close_band < 0:
        ap.error(f"--close-band must be 0 or more, got {args.close_band:g}")
    if args.close_rounds is None:
        args.close_rounds = 9 if args.device == "cpu" else args.rounds
    args.close_rounds = max(args.close_rounds, args.rounds)
    if args.min_run_time is None:
        args.min_run_time = 0.05
    args.warmup = max(1, args.warmup)
    return args, ap


def split(s: str, allowed) -> list:
    items = [t.strip().lower() for t in s.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise SystemExit(f"unknown value {t!r}; choose from {', '.join(allowed)}")
    return items


def print_plan(args, plan: list):
    n = skipped = 0
    for shape, layout in plan:
        for dname in args.dtypes:
            mb = shape.numel * DTYPES[dname].itemsize / MB
            skip = args.max_mb is not None and mb > args.max_mb
            n += len(args.passes)
            skipped += len(args.passes) * skip
            print(f"{shape.label:>16} {layout:>4} {dname} {mb:8.1f} MB  {shape.note}"
                  + ("  SKIPPED (--max-mb)" if skip else ""))
    print(f"{n} rows ({len(args.passes)} passes each), {skipped} skipped by --max-mb "
          f"{args.max_mb}")


def load_saved(path: str) -> tuple:
    """A results JSON: (the saved dict, its rows as Row objects)."""
    with open(path) as f:
        saved = json.load(f)
    return saved, [Row(**r) for r in saved["rows"]]


def replot(path: str) -> None:
    """Redraw the PNG of a saved run from its JSON (e.g. after a change to the plot)."""
    saved, rows = load_saved(path)
    META.update(saved["meta"])
    args = argparse.Namespace(**saved["args"])
    png = os.path.splitext(path)[0] + ".png"
    problem = plot(rows, selected_peers(args), args, png)
    print(problem or f"wrote {png}")


def main(argv=None):
    args, ap = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch.cuda.is_available() is False")
        import bn_ext
        if not bn_ext.has_cuda_kernels():
            ap.error("--device cuda: this bn_ext build has no CUDA kernels")
        timer = CudaTimer(args.quick, args.triton, not args.no_l2_flush)
        if args.cuda_persistent:
            os.environ["BN_EXT_CUDA_PERSISTENT"] = "1"
    else:
        timer = CpuTimer(args.min_run_time)
        timer.label = (f"{CpuTimer.label}, num_threads={timer.threads}, "
                       f"min_run_time={args.min_run_time:g} s per round")
    import bn_ext

    plan = (shapes_mod.quick_plan if args.quick else shapes_mod.full_plan)(args.layouts)
    if args.shapes:
        wanted = [t.strip() for t in args.shapes.split(",") if t.strip()]
        known = {shape.label for shape, _ in plan}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            ap.error(f"--shape {unknown} not in the plan; --plan lists its shapes")
        plan = [(shape, layout) for shape, layout in plan if shape.label in wanted]
    peers = selected_peers(args)
    if args.plan:
        print_plan(args, plan)
        return
    t_start = time.time()
    print(f"measuring copy bandwidth on {args.device} ...", file=sys.stderr, flush=True)
    copy_bps = copy_bandwidth(args.device, timer)
    META.update(
        device_name=device_name(args.device), torch=torch.__version__,
        cuda=torch.version.cuda or "none (CPU build)",
        cudnn=(str(torch.backends.cudnn.version()) if args.device == "cuda" else None),
        bn_ext=getattr(bn_ext, "__version__", "?"), git=git_rev(), build=bn_ext_build(),
        threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        timer=timer.label, copy_gbs=copy_bps / 1e9, cache_mb=cache_bytes(args.device) / MB,
        allocation=allocation_settings(args.device), switches=kernel_switches())

    META["copy_gbs_start"] = META["copy_gbs_end"] = META["copy_gbs"]
    os.makedirs(args.out, exist_ok=True)
    # A --shape run never takes the full table's name.
    stem = args.name or (device_slug(args.device) + ("-quick" if args.quick else "")
                         + ("-recheck" if args.shapes else "")
                         + ("-persistent" if args.cuda_persistent else ""))
    base = os.path.join(args.out, stem)
    done = load_earlier(base + ".json", args) if args.resume else {}
    planned = len(plan) * len(args.dtypes) * len(args.passes)

    def write_partial(rows_so_far, compile_s):
        META["compile_s"] = compile_s
        META["wall_s"] = time.time() - t_start
        write_results(base, args, rows_so_far, peers, planned, final=False)

    rows, compile_s = run(args, plan, peers, timer, log, done, write_partial)
    META["compile_s"] = compile_s
    if isinstance(timer, CudaTimer) and timer.do_bench is None:
        META["short_holds"] = timer.short_holds
        META["short_kept"] = timer.short_kept
    # Measured again at the end; the higher of the two is the reference (a loaded machine
    # only ever makes the copy slower).
    META["copy_gbs_end"] = copy_bandwidth(args.device, timer) / 1e9
    META["copy_gbs"] = max(META["copy_gbs_start"], META["copy_gbs_end"])
    META["wall_s"] = time.time() - t_start
    text, written = write_results(base, args, rows, peers, planned, final=True)
    print(text)
    print("wrote " + ", ".join(os.path.relpath(p) for p in written)
          + f" in {META['wall_s']:.0f} s", file=sys.stderr)


def load_earlier(path: str, args) -> dict:
    """--resume: the timed rows of an earlier run written to `path` on the same device, keyed by
    (shape, layout, dtype, pass); {} if there is none."""
    if not os.path.exists(path):
        print(f"--resume: no {os.path.relpath(path)} yet, timing every row", file=sys.stderr)
        return {}
    saved, rows = load_saved(path)
    if saved["meta"].get("device_name") != META["device_name"]:
        raise SystemExit(f"--resume: {path} was measured on {saved['meta'].get('device_name')}, "
                         f"not on {META['device_name']}")
    # Rows timed another way would not compare with this run's: the timer's label names its
    # settings (triton, L2 flush, threads, min_run_time); these are the rest.
    was, now = saved["args"], vars(args)
    if now.get("variant"):
        # (a file from before --variant-passes timed its variants on every pass of its run)
        was = dict(was, variant_passes=was.get("variant_passes", was.get("passes")))
    for key in ("compile_mode", "cuda_persistent", "variant", "peers", "rounds") + (
            ("variant_passes",) if now.get("variant") else ()):
        # (a file from before --variant existed has no key: it was timed with none)
        if (key in was or key == "variant") and was.get(key) != now.get(key):
            raise SystemExit(f"--resume: {path} was measured with --{key.replace('_', '-')} "
                             f"{was.get(key)!r}, this run has {now.get(key)!r}; run it the "
                             f"same way, or under another --name")
    if saved["meta"].get("timer") != META["timer"]:
        raise SystemExit(f"--resume: {path} was timed with {saved['meta'].get('timer')!r}, this "
                         f"run with {META['timer']!r}; run it the same way, or under another "
                         f"--name")
    # Nor would rows of other code, another build of it, another torch, or other switches: the
    # header states this run's for every row. (A file from before "switches" was kept has none.)
    def sha(build):
        return (build or "").split(", built")[0]
    was_meta = saved["meta"]
    for what, before, after in [
            ("repo", was_meta.get("git"), META.get("git")),
            ("build", sha(was_meta.get("build")), sha(META.get("build"))),
            ("torch", was_meta.get("torch"), META.get("torch")),
            ("switches", was_meta.get("switches", META.get("switches")), META.get("switches"))]:
        if before != after:
            raise SystemExit(f"--resume: {path} was measured with {what} {before!r}, this run "
                             f"has {after!r}; rows of both would share one header: time them "
                             f"under another --name")
    done = {(r.shape, r.layout, r.dtype, r.pas): r for r in rows if r.status == "ok"}
    META["resumed"] = (f"{len(done)} timed rows taken over from the run of "
                       f"{saved['meta'].get('date')} (repo {saved['meta'].get('git')}) in this "
                       f"file (--resume); their groups were not timed again")
    print(f"--resume: {META['resumed']}", file=sys.stderr)
    return done


def write_results(base: str, args, rows: list, peers: list, planned: int,
                  final: bool) -> tuple:
    """Writes base.md and base.json (and, when final, base.png); returns (markdown, paths).
    Written after every group too, marked partial, so that a run stopped early (a device lease
    running out) leaves what it measured; --resume continues it."""
    status = [] if final else [f"- **partial**: {len(rows)} of {planned} planned rows so far; "
                               "the run was still going or was stopped (--resume continues it)"]
    md = header(args, META) + status + [f"- wall time of this run: {META['wall_s']:.0f} s", "",
                                        "## Results", ""] + table(rows, peers) + [""] + \
        summary(rows, peers, args)
    text = "\n".join(md) + "\n"
    saved = json.dumps({"meta": META, "args": vars(args), "pass_counts": PASS_COUNTS,
                        "partial": not final, "rows": [r.__dict__ for r in rows]},
                       indent=1, default=str)
    paths = [base + ".md", base + ".json"]
    for path, body in zip(paths, (text, saved)):
        with open(path + ".tmp", "w") as f:  # whole files only, even if killed mid-write
            f.write(body)
        os.replace(path + ".tmp", path)
    if final:
        why_not = plot(rows, peers, args, base + ".png")
        if why_not:
            print(why_not, file=sys.stderr)
        else:
            paths.append(base + ".png")
    return text, paths


if __name__ == "__main__":
    main()
