"""bench/bench.py's partial results and --resume, without timing anything: a GPU lease that runs
out mid-benchmark must leave a table marked partial, and --resume must take its rows over."""
import json
import os
import sys

import pytest

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
