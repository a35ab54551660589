"""bench/bench.py's partial results and --resume, without timing anything: a GPU lease that runs
out mid-benchmark must leave a table marked partial, and --resume must take its rows over."""
import contextlib
import json
import os
import statistics
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench  # noqa: E402  (bench/bench.py)
import shapes  # noqa: E402  (bench/shapes.py)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    args, _ = bench.parse_args(["--device", "cpu", "--quick", "--shape", "4096x1024",
                                "--pass", "fwd,eval", "--out", str(tmp_path)])
    plan = [(s, lay) for s, lay in shapes.quick_plan(args.layouts) if s.label == "4096x1024"]
    meta = dict(device_name="test CPU", torch="x", cuda="none", cudnn=None, bn_ext="x", git="abc",
                build="x", threads=2, date="today", command="bench.py", timer="t",
                copy_gbs=10.0, copy_gbs_start=10.0, copy_gbs_end=10.0, cache_mb=32.0,
                allocation=None, compile_s=0.0, wall_s=1.0)
    monkeypatch.setattr(bench, "META", dict(meta))
    peers = bench.peers_for("cpu")
    rows = []
    for shape, layout in plan:
        for dname in args.dtypes:
            for pas in args.passes:
                r = bench.Row(shape.label, shape.note, shape.group, layout, dname, pas, 16.8,
                              bytes_moved=bench.PASS_COUNTS[pas] * 16_777_216)
                r.times = {p.name: 1e-3 * (2 if p.kind != "bn_ext" else 1) for p in peers}
                r.spread = {p.name: 0.0 for p in peers}
                rows.append(r)
    return args, plan, peers, rows, str(tmp_path / "run")


def test_partial_results_are_marked_and_resumed(setup):
    args, plan, peers, rows, base = setup
    planned = len(rows)
    bench.write_results(base, args, rows[:2], peers, planned, final=False)
    with open(base + ".md") as f:
        assert f"**partial**: 2 of {planned} planned rows" in f.read()
    with open(base + ".json") as f:
        saved = json.load(f)
    assert saved["partial"] is True and len(saved["rows"]) == 2

    # The whole plan written, then resumed: every group is taken over, nothing is timed.
    bench.write_results(base, args, rows, peers, planned, final=True)
    with open(base + ".json") as f:
        assert json.load(f)["partial"] is False
    done = bench.load_earlier(base + ".json", args)
    assert len(done) == planned and "resumed" in bench.META

    def no_timing(fn):
        raise AssertionError("a resumed row was timed again")

    got, compile_s = bench.run(args, plan, peers, no_timing, lambda msg: None, done)
    assert compile_s == 0.0
    assert [(r.shape, r.dtype, r.pas, r.times) for r in got] == \
        [(r.shape, r.dtype, r.pas, r.times) for r in rows]


def test_resume_refuses_another_device(setup):
    args, _, peers, rows, base = setup
    bench.write_results(base, args, rows, peers, len(rows), final=False)
    bench.META["device_name"] = "another CPU"
    with pytest.raises(SystemExit, match="measured on test CPU"):
        bench.load_earlier(base + ".json", args)


def _scripted_timer(times: dict):
    """A timer for bench.interleaved that returns each workload's next scripted time."""
    it = {name: iter(seq) for name, seq in times.items()}
    return lambda fn: next(it[fn])


@pytest.mark.parametrize("peer_times, expect_rounds", [
    ([2.0] * 9, 3),                             # clearly faster: --rounds only
    ([1.05] * 9, 9),                            # near parity throughout: up to --close-rounds
    ([1.05, 1.05, 1.05, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 6),  # stops once the median moves off
])
def test_close_rows_get_more_rounds(peer_times, expect_rounds):
    # Workloads are keyed by name; the timer is handed the workload, so the names are the fns.
    fns = {"bn_ext": "bn_ext", "eager": "eager", "copy": "copy"}
    timer = _scripted_timer({"bn_ext": [1.0] * 9, "eager": peer_times, "copy": [5.0] * 9})
    res, rounds = bench.interleaved(fns, timer, 3, 9, bench.near_parity(0.15))
    assert rounds == expect_rounds
    assert res["eager"][0] == pytest.approx(statistics.median(peer_times[:rounds]))
    assert res["bn_ext"][0] == 1.0


def test_copy_is_not_a_peer_for_closeness():
    close = bench.near_parity(0.15)
    assert not close({"bn_ext": 1.0, "copy": 1.0, "eager": 3.0})
    assert close({"bn_ext": 1.0, "copy": 9.0, "eager": 0.9})   # slower than a peer is close too
    assert not close({"bn_ext": 1.0, "eager": 0.8})


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--close-band", "-0.5"]])
def test_bad_round_arguments_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu"] + argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_resume_refuses_rows_timed_another_way(setup):
    args, _, peers, rows, base = setup
    bench.write_results(base, args, rows, peers, len(rows), final=True)
    args.compile_mode = "max-autotune"
    with pytest.raises(SystemExit, match="--compile-mode 'default'"):
        bench.load_earlier(base + ".json", args)


@pytest.mark.parametrize("key,other", [
    ("git", "def"), ("build", "_C.abi3.so sha256 999, built today"), ("torch", "y"),
    ("switches", {"BN_EXT_CUDA_PERSISTENT": "1"})])
def test_resume_refuses_rows_of_other_code_or_switches(setup, key, other):
    # The header states one repo, build, torch and set of switches for every row.
    args, _, peers, rows, base = setup
    bench.META["build"] = "_C.abi3.so sha256 123, built yesterday"
    bench.META["switches"] = {}
    bench.write_results(base, args, rows, peers, len(rows), final=True)
    bench.META["build"] = "_C.abi3.so sha256 123, built today"  # the same build: resumed
    assert len(bench.load_earlier(base + ".json", args)) == len(rows)
    bench.META[key] = other
    with pytest.raises(SystemExit, match=f"measured with {'repo' if key == 'git' else key} "):
        bench.load_earlier(base + ".json", args)


def test_a_peer_that_sets_nothing_times_no_context(monkeypatch):
    # Patching the whole environment in every timed call cost ~85 us a call (a putenv per
    # variable); a peer that sets nothing enters nothing, and a variant's switch is set and
    # taken back alone.
    args, _ = bench.parse_args(["--device", "cpu", "--variant", "v:BN_EXT_TEST_SWITCH=1"])
    peers = {p.name: p for p in bench.selected_peers(args)}
    w, b = torch.ones(3), torch.zeros(3)
    for name in ("bn_ext", "eager"):
        inst = bench.Instance(peers[name], 4, 3, "cpu", w, b, "default")
        assert type(inst.context()) is type(contextlib.nullcontext())
    inst = bench.Instance(peers["v"], 4, 3, "cpu", w, b, "default")
    monkeypatch.setenv("BN_EXT_OTHER", "kept")
    monkeypatch.delenv("BN_EXT_TEST_SWITCH", raising=False)
    before = dict(os.environ)
    with inst.context():
        assert os.environ["BN_EXT_TEST_SWITCH"] == "1" and os.environ["BN_EXT_OTHER"] == "kept"
    assert dict(os.environ) == before


def _fake_groups(monkeypatch, seconds: float, timed: list):
    """run_group replaced by one that takes `seconds` and records which group it was."""
    def fake(args, shape, layout, dtype, peers, group_rows, timer, bar, log, copy_fn=None):
        time.sleep(seconds)
        timed.append((shape.label, layout, dtype))
        for r in group_rows:
            r.times = {p.name: 1e-3 for p in peers}
            bar.update(1)
        return 0.0
    monkeypatch.setattr(bench, "run_group", fake)
    monkeypatch.setattr(bench, "copy_workload", lambda device: None)  # 0.1-0.3 s of a 256 MB copy


def test_groups_run_dtype_major_and_stop_at_the_deadline(setup, monkeypatch):
    args, plan, peers, _, _ = setup
    assert len(plan) == 1 and args.dtypes == ["fp32", "bf16"]
    plan = plan * 3  # three groups per dtype
    timed = []
    _fake_groups(monkeypatch, 0.0, timed)
    bench.run(args, plan, peers, None, lambda msg: None)
    assert [t[2] for t in timed] == [bench.torch.float32] * 3 + [bench.torch.bfloat16] * 3

    # A group takes 0.4 s; the deadline leaves room for 3 of them, but the third, judged with a
    # 25% margin (0.8 + 0.5 s), would end past it: it and the rest are listed as not timed. The
    # second starts with 0.3 s to spare (0.4 + 0.5 < 1.2), for a slow machine's overheads.
    timed.clear()
    _fake_groups(monkeypatch, 0.4, timed)
    args.deadline_s = time.monotonic() - bench.T_PROCESS + 1.2
    got, _ = bench.run(args, plan, peers, None, lambda msg: None)
    assert len(timed) == 2
    assert [r.status == "ok" for r in got] == [True] * 4 + [False] * 8
    assert all(r.status.startswith("not timed: --deadline-s") for r in got[4:])


def test_peers_option_selects_columns():
    args, _ = bench.parse_args(["--device", "cpu", "--peers", "compile"])
    assert [p.name for p in bench.selected_peers(args)] == ["bn_ext", "compile"]
    args, _ = bench.parse_args(["--device", "cpu"])
    assert [p.name for p in bench.selected_peers(args)] == ["bn_ext", "eager", "compile"]
    with pytest.raises(SystemExit):
        bench.selected_peers(bench.parse_args(["--device", "cpu", "--peers", "cudnn"])[0])


def test_single_pass_run_times_the_multi_pass_path_beside_it(monkeypatch):
    # --cuda-persistent: bn_ext's multi-pass path is a column of its own, timed in the same
    # rounds, left out of 'vs best' (torch's peers) and with its own geometric mean and list.
    args, _ = bench.parse_args(["--device", "cuda", "--cuda-persistent", "--peers", "cudnn",
                                "--pass", "fwd"])
    peers = bench.selected_peers(args)
    assert [p.name for p in peers] == ["bn_ext", "multi-pass", "cudnn"]
    assert [p.name for p in bench.selected_peers(bench.parse_args(["--device", "cuda"])[0])] \
        == ["bn_ext", "cudnn", "native", "compile"]
    inst = bench.Instance(peers[1], 4, 3, "cpu", torch.ones(3), torch.zeros(3), "default")
    monkeypatch.setenv("BN_EXT_CUDA_PERSISTENT", "1")
    with inst.context():
        assert os.environ["BN_EXT_CUDA_PERSISTENT"] == "0"
    assert os.environ["BN_EXT_CUDA_PERSISTENT"] == "1"
    monkeypatch.delenv("BN_EXT_CUDA_PERSISTENT")
    with inst.context():
        assert os.environ["BN_EXT_CUDA_PERSISTENT"] == "0"
    assert "BN_EXT_CUDA_PERSISTENT" not in os.environ

    def row(shape, ours, multi, cudnn):
        return bench.Row(shape=shape, note="", group="g", layout="nchw", dtype="fp32", pas="fwd",
                         mb=1.0, bytes_moved=10**6,
                         times={"bn_ext": ours, "multi-pass": multi, "cudnn": cudnn})
    rows = [row("8x8x8x8", 1.0, 2.0, 4.0), row("9x9x9x9", 2.0, 1.0, 3.0)]
    monkeypatch.setitem(bench.META, "copy_gbs", 1.0)
    monkeypatch.setitem(bench.META, "cache_mb", 1e9)
    head, sep, *cells = bench.table(rows, peers)
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[6:12] == ["bn_ext ms", "multi-pass ms", "cudnn ms", "vs cudnn", "vs best",
                          "vs multi-pass"]
    first = [c.strip() for c in cells[0].strip("|").split("|")]
    second = [c.strip() for c in cells[1].strip("|").split("|")]
    assert first[9:12] == ["4.00x", "4.00x", "2.00x"]
    assert second[9:12] == ["1.50x", "1.50x", "**0.50x**"]
    text = "\n".join(bench.summary(rows, peers, args))
    assert "| fp32 | fwd | 2 | 2.45x | 2.45x | 1.00x |" in text
    rows[1].times["cudnn"] = None  # timed on one row of the two: its count in brackets
    assert "| fp32 | fwd | 2 | 4.00x (1) | 4.00x (1) | 1.00x |" in "\n".join(
        bench.summary(rows, peers, args))
    rows[1].times["cudnn"] = 3.0
    assert "Rows below 1.0x against at least one peer: 0 of 2" in text
    assert "Rows where bn_ext is slower than its multi-pass path: 1 of 2" in text
    assert "- 9x9x9x9 nchw fp32 fwd: 2000.0 vs 1000.0 ms (0.50x)" in text


def test_summary_weighs_each_variant_as_the_default(monkeypatch):
    # With --variant peers, the summary counts the rows each of bn_ext's paths would leave below
    # the best torch peer if it ran on every row, and the same for the fastest path of each row.
    args, _ = bench.parse_args(["--device", "cuda", "--peers", "cudnn,compile", "--pass", "bwd",
                                "--variant", "fit:BN_EXT_CUDA_FIT_WAVE=1",
                                "--variant", "rev:BN_EXT_CUDA_REVERSE_MAP=1"])
    peers = bench.selected_peers(args)
    assert [p.name for p in peers] == ["bn_ext", "fit", "rev", "cudnn", "compile"]

    def row(shape, **times):
        return bench.Row(shape=shape, note="", group="g", layout="nchw", dtype="fp32", pas="bwd",
                         mb=1.0, bytes_moved=10**6, times=times)
    rows = [row("1x1x1x1", bn_ext=1.0, fit=0.8, rev=1.2, cudnn=0.9, compile=2.0),
            row("2x2x2x2", bn_ext=1.0, fit=1.1, rev=1.0, cudnn=1.5, compile=1.2),
            row("3x3x3x3", bn_ext=2.0, fit=2.5, rev=2.2, cudnn=1.0),
            row("4x4x4x4", bn_ext=1.0, rev=1.0, cudnn=0.9, compile=0.9)]  # fit not timed
    monkeypatch.setitem(bench.META, "copy_gbs", 1.0)
    monkeypatch.setitem(bench.META, "cache_mb", 1e9)
    text = "\n".join(bench.summary(rows, peers, args))
    # best peer: 0.9, 1.2, 1.0; bn_ext 0.90x, 1.20x, 0.50x; fit 1.125x, 1.09x, 0.40x;
    # rev 0.75x, 1.20x, 0.45x; each row's fastest 1.125x, 1.20x, 0.50x
    assert "| bn_ext | 3 | 2 | **0.81x** |" in text
    assert "| fit | 3 | 1 | **0.79x** |" in text
    assert "| rev | 3 | 2 | **0.74x** |" in text
    assert "| fastest | 3 | 1 | **0.88x** |" in text
    assert "Rows below the best peer on every path:\n- 3x3x3x3 nchw fp32 bwd: 0.50x" in text
    # 4x4x4x4 (0.90x on both of its paths) is left out with its untimed variant
    assert "4x4x4x4" not in text.split("Had bn_ext run")[1]


def test_variants_are_timed_on_their_passes_only(setup, monkeypatch, tmp_path):
    # --variant-passes: the --variant peers run on those passes and are n/a on the others (a
    # training kernel's switch changes nothing in eval); bn_ext and torch run on every pass.
    _, plan, _, _, _ = setup
    argv = ["--device", "cpu", "--quick", "--shape", "4096x1024", "--dtype", "fp32",
            "--pass", "fwd,eval", "--peers", "eager", "--rounds", "1", "--close-rounds", "1",
            "--out", str(tmp_path),
            "--variant", "v:BN_EXT_TEST_UNUSED=1"]
    with pytest.raises(SystemExit):
        bench.parse_args(argv + ["--variant-passes", "bwd"])  # not a pass of the run
    args, _ = bench.parse_args(argv)
    assert args.variant_passes == ["fwd", "eval"]
    args, _ = bench.parse_args(argv + ["--variant-passes", "fwd"])
    peers = bench.selected_peers(args)
    assert [(p.name, p.variant) for p in peers] == [("bn_ext", False), ("v", True),
                                                    ("eager", False)]
    monkeypatch.setattr(bench, "copy_workload", lambda device: None)
    calls = []

    def timer(fn):
        calls.append(fn)
        fn()
        return 1e-3
    rows, _ = bench.run(args, plan, peers, timer, lambda msg: None)
    assert [(r.pas, r.status) for r in rows] == [("fwd", "ok"), ("eval", "ok")]
    assert len(calls) == 3 + 2
    fwd, ev = rows
    assert fwd.times["v"] == 1e-3 and fwd.times["bn_ext"] == 1e-3 and fwd.times["eager"] == 1e-3
    assert ev.times["v"] is None and ev.na["v"] == "not in --variant-passes"
    assert ev.times["bn_ext"] == 1e-3 and ev.times["eager"] == 1e-3
    assert "on fwd only (n/a elsewhere)" in "\n".join(bench.header(args, bench.META))
    # A run with its variants on other passes does not resume this one.
    base = str(tmp_path / "run")
    bench.write_results(base, args, rows, peers, len(rows), final=True)
    again, _ = bench.parse_args(argv)
    with pytest.raises(SystemExit, match="--variant-passes"):
        bench.load_earlier(base + ".json", again)
    assert bench.load_earlier(base + ".json", args)


def test_eval_backward_pass_is_opt_in_and_times_the_eval_backward():
    # --pass evalbwd: eval's backward alone (a graph built once), asked for by name only; issue
    # 4's four passes stay the default.
    default, _ = bench.parse_args(["--device", "cpu", "--quick"])
    assert default.passes == list(bench.PASSES) and "evalbwd" not in default.passes
    args, _ = bench.parse_args(["--device", "cpu", "--quick", "--pass", "evalbwd,eval"])
    assert args.passes == ["evalbwd", "eval"]
    import torch
    torch.manual_seed(0)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    x, dy = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    grads = {}
    for peer in bench.peers_for("cpu")[:2]:  # bn_ext, eager
        inst = bench.Instance(peer, 4, 3, "cpu", w, b, "default")
        inst.set_running_stats(mean, var)
        fn = bench.make_workload("evalbwd", inst, x, dy)
        assert not inst.module.training
        grads[peer.name] = fn()
        again = fn()  # retain_graph: the same graph runs every sample
        assert all(torch.equal(a, c) for a, c in zip(grads[peer.name], again))
    gx = dy * (w * (var + 1e-5).rsqrt()).view(1, 3, 1, 1)
    torch.testing.assert_close(grads["bn_ext"][0], gx)
    for a, c in zip(grads["bn_ext"], grads["eager"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_cuda_profile_parses_rows_and_refuses_without_a_gpu(monkeypatch, capsys):
    """bench/cuda_profile.py, which needs a GPU to profile, at least imports and reads its
    arguments on a machine without one, and says why it cannot run rather than failing later."""
    import cuda_profile  # noqa: E402  (bench/cuda_profile.py)
    assert cuda_profile.parse_rows("32x64x56x56:nhwc,4096x1024,8x3x7x7") == [
        ((32, 64, 56, 56), "nhwc"), ((4096, 1024), "n/a"), ((8, 3, 7, 7), "nchw")]
    name = "void bn_ext::cuda::detail::(anonymous namespace)::finalize_kernel<Op>(Op)"
    assert cuda_profile.short(name) == "finalize_kernel<Op>(Op)"
    monkeypatch.setattr(cuda_profile.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cuda_profile.main(["--rows", "4096x1024"])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
