"""Mutation testing of bn_ext's Python code: does some test fail when the code is wrong?

A mutant is one small edit of one line: a comparison or boolean operator flipped, an `if`
negated, a `not` dropped, a `raise` or a call statement replaced by `pass`, an arithmetic
operator swapped, a constant moved by one. Each runs, in a copy of the installed package, against
the tests (pytest -x) that can see it. One that fails a test is "killed"; one that passes them
all "survived": either no input tells it from the original (equivalent), or a test is missing.

    python tests/mutation.py list [FILE ...]
    python tests/mutation.py run [FILE ...] [--coverage] [--out results.jsonl] [--only 3,17]

FILE: modules of the package (default: all of bn_ext/*.py). Which tests see a mutant:
  - without --coverage, every test under --tests (default: this folder), for every mutant;
  - with --coverage (needs pytest-cov), one coverage run with per-test contexts first, then
    only the tests that executed the mutant's lines ("uncovered" when none did). That is what
    makes a whole-package run feasible: on two cores, the 383 mutants of bn_ext/*.py other than
    sync_batchnorm.py that tests reach took 1.3 hours, a few seconds to a few minutes each.
    SyncBatchNorm's multi-rank tests run in subprocesses that coverage does not follow, so
    sync_batchnorm.py's mutants also always run test_sync_batchnorm.py (162 mutants: 22 min).
Results are appended to --out as JSON lines, one per mutant; a rerun skips those already
there. Not run by CI: reading the survivors is the point, and only a person can.
The compiled extension is copied as it is, so build first (pip install --no-build-isolation .).
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
# Tests that run in subprocesses coverage does not follow, for the modules they exercise.
ALWAYS_RUN = {"sync_batchnorm.py": ["test_sync_batchnorm.py"]}

_FLIP_COMPARE = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
                 ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                 ast.In: ast.NotIn, ast.NotIn: ast.In}
_SWAP_ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
                    ast.FloorDiv: ast.Mult}


@dataclass(frozen=True)
class Mutant:
    file: str       # module file name within the package
    line: int       # 1-based, as ast reports
    col: int        # utf-8 byte offsets of the replaced span, as ast reports
    end_line: int
    end_col: int
    kind: str
    old: str
    new: str

    @property
    def key(self) -> str:
        return f"{self.file}:{self.line}:{self.col}:{self.kind}:{self.new}"


def _span(lines: list[bytes], node) -> str:
    """The source text of node (utf-8 offsets), joined over its lines."""
    if node.lineno == node.end_lineno:
        return lines[node.lineno - 1][node.col_offset:node.end_col_offset].decode()
    text = b"\n".join(lines[node.lineno - 1:node.end_lineno])
    last_len = len(lines[node.end_lineno - 1])
    return text[node.col_offset:len(text) - last_len + node.end_col_offset].decode()


def mutants_of(source: str, file: str) -> list[Mutant]:
    """Every mutant of one module's source, in ast.walk order."""
    lines = source.encode().split(b"\n")
    out: list[Mutant] = []

    def add(node, kind, new):
        out.append(Mutant(file, node.lineno, node.col_offset, node.end_lineno,
                          node.end_col_offset, kind, _span(lines, node), new))

    for node in ast.walk(ast.parse(source)):
        one_line = getattr(node, "lineno", None) == getattr(node, "end_lineno", None)
        if isinstance(node, ast.Raise):
            add(node, "raise -> pass", "pass")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(node, "call -> pass", "pass")
        elif isinstance(node, ast.If) and node.test.lineno == node.test.end_lineno:
            add(node.test, "negate if", f"(not ({ast.unparse(node.test)}))")
        elif not one_line:
            continue
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _FLIP_COMPARE:
                    ops = list(node.ops)
                    ops[i] = _FLIP_COMPARE[type(op)]()
                    new = ast.Compare(left=node.left, ops=ops, comparators=node.comparators)
                    add(node, f"{type(op).__name__} -> {type(ops[i]).__name__}",
                        f"({ast.unparse(new)})")
        elif isinstance(node, ast.BoolOp):
            op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            add(node, f"{type(node.op).__name__} -> {type(op).__name__}",
                f"({ast.unparse(ast.BoolOp(op=op, values=node.values))})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "drop not", f"({ast.unparse(node.operand)})")
        elif isinstance(node, ast.BinOp) and type(node.op) in _SWAP_ARITHMETIC:
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                continue  # "%" formatting and string concatenation
            op = _SWAP_ARITHMETIC[type(node.op)]()
            add(node, f"{type(node.op).__name__} -> {type(op).__name__}",
                f"({ast.unparse(ast.BinOp(left=node.left, op=op, right=node.right))})")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)):
            v = node.value
            if isinstance(v, bool):
                add(node, "flip bool", repr(not v))
            elif isinstance(v, int):
                add(node, "int + 1", repr(v + 1))
            elif isinstance(v, float):
                add(node, "float changed", repr(1.0 if v == 0 else 2 * v))
    return out


def apply(source: str, m: Mutant) -> str | None:
    """source with m applied; None where the edit is not valid Python."""
    lines = source.encode().split(b"\n")
    start = sum(len(x) + 1 for x in lines[:m.line - 1]) + m.col
    end = sum(len(x) + 1 for x in lines[:m.end_line - 1]) + m.end_col
    data = source.encode()
    assert data[start:end].decode() == m.old, f"{m.key}: the source changed since listing"
    new = (data[:start] + m.new.encode() + data[end:]).decode()
    try:
        ast.parse(new)
    except SyntaxError:
        return None
    return new


def numbered(folder: str, files):
    """(index, source, mutant) for every mutant of the modules `files` in `folder`, numbered
    across them in order: the numbers `list` prints and --only takes."""
    index = 0
    for file in files:
        with open(os.path.join(folder, file)) as f:
            source = f.read()
        for m in mutants_of(source, file):
            yield index, source, m
            index += 1


def _describe(r: dict) -> str:
    """One line for a mutant (asdict) or its result record."""
    return f"{r['file']}:{r['line']} {r['kind']}: {r['old'][:60]!r} -> {r['new'][:60]!r}"


def _package_dir() -> str:
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(HERE)]
    import bn_ext  # the installed package, with its compiled _C
    return os.path.dirname(os.path.abspath(bn_ext.__file__))


def _pytest(args, tests, root, work, timeout, **env) -> tuple[str, float, list[str]]:
    """pytest -x over `tests` (paths or node ids relative to `root`, pytest's rootdir), with the
    package copy in `work` first on the path."""
    listing = os.path.join(work, "tests.txt")  # node ids can be many: pytest's @file argument
    with open(listing, "w") as f:
        f.write("\n".join(os.path.join(root, t) for t in tests))
    env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(
        [work] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        PYTHONDONTWRITEBYTECODE="1")  # a stale .pyc of the same size and second would hide one
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            f"--rootdir={root}", *args, f"@{listing}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, []
    seconds = time.monotonic() - start
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if p.returncode == 0:
        return "survived", seconds, []
    if p.returncode == 5:
        return "no tests", seconds, []
    return "killed", seconds, failed[:1] or p.stdout.splitlines()[-1:]


def _root(tests: list[str]) -> str:
    """The folder that node ids are relative to: the tests' common folder."""
    common = os.path.commonpath([os.path.abspath(t.split("::")[0]) for t in tests])
    return common if os.path.isdir(common) else os.path.dirname(common)


def _covering_tests(pkg_copy: str, tests: list[str], root: str, work: str, timeout: float):
    """{file: {line: [test node ids]}} from one pytest-cov run with per-test contexts."""
    data_file = os.path.join(work, ".coverage")
    status, seconds, by = _pytest([f"--cov={pkg_copy}", "--cov-context=test", "--cov-report=",
                                   "-p", "pytest_cov"], tests, root, work, timeout,
                                  COVERAGE_FILE=data_file)
    if status != "survived":  # the unmutated package must pass
        raise SystemExit(f"the coverage run on the unmutated package: {status} {by}")
    print(f"coverage run: {seconds:.0f} s", flush=True)
    import coverage
    data = coverage.CoverageData(data_file)
    data.read()
    return {os.path.basename(f): {ln: sorted({c.rsplit("|", 1)[0] for c in ctxs if c})
                                  for ln, ctxs in data.contexts_by_lineno(f).items()}
            for f in data.measured_files()}


def run(files, *, package_dir, tests, out, coverage=False, only=None, timeout=900.0):
    """Runs each mutant of `files` (module names in package_dir) and appends its result to
    `out`. Returns the list of result records of this call."""
    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {json.loads(ln)["key"] for ln in f if ln.strip()}
    tests = [os.path.abspath(t) for t in tests]
    root = _root(tests)
    tests = [os.path.relpath(t, root) for t in tests]
    records = []
    work = tempfile.mkdtemp(prefix="mutation-")
    try:
        pkg_copy = os.path.join(work, os.path.basename(package_dir))
        shutil.copytree(package_dir, pkg_copy, ignore=shutil.ignore_patterns("__pycache__"))
        covering = _covering_tests(pkg_copy, tests, root, work, timeout) if coverage else None
        for i, source, m in numbered(pkg_copy, files):
            if (only is not None and i not in only) or m.key in done:
                continue
            rec = dict(index=i, key=m.key, **asdict(m))
            selected = list(tests)
            if covering is not None:
                lines = covering.get(m.file, {})
                ids = {t for ln in range(m.line, m.end_line + 1) for t in lines.get(ln, [])}
                selected = sorted(ids) + [os.path.relpath(os.path.join(HERE, name), root)
                                          for name in ALWAYS_RUN.get(m.file, [])]
            mutated = apply(source, m)
            if mutated is None:
                rec.update(status="not valid Python")
            elif not selected:
                rec.update(status="uncovered")
            else:
                path = os.path.join(pkg_copy, m.file)
                with open(path, "w") as f:
                    f.write(mutated)
                try:
                    status, seconds, by = _pytest([], selected, root, work, timeout)
                finally:
                    with open(path, "w") as f:
                        f.write(source)
                rec.update(status=status, seconds=round(seconds, 1), tests=len(selected), by=by)
            records.append(rec)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{i:4d} {rec['status']:9s} {_describe(rec)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["list", "run"])
    parser.add_argument("files", nargs="*", help="modules of the package (default: all)")
    parser.add_argument("--package", help="the package folder (default: the installed bn_ext)")
    parser.add_argument("--tests", nargs="+", default=[HERE], help="test files or folders")
    parser.add_argument("--coverage", action="store_true",
                        help="run each mutant only against the tests that execute its lines")
    parser.add_argument("--out", default="mutation-results.jsonl")
    parser.add_argument("--only", help="comma-separated mutant indices (from `list`)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args(argv)
    package_dir = args.package or _package_dir()
    files = args.files or sorted(f for f in os.listdir(package_dir) if f.endswith(".py"))
    if args.command == "list":
        for i, _, m in numbered(package_dir, files):
            print(f"{i:4d} {_describe(asdict(m))}")
        return 0
    only = {int(i) for i in args.only.split(",")} if args.only else None
    records = run(files, package_dir=package_dir, tests=args.tests, out=args.out,
                  coverage=args.coverage, only=only, timeout=args.timeout)
    counts = collections.Counter(r["status"] for r in records)
    print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in records:
        if r["status"] == "survived":
            print(f"survived {r['index']}: {_describe(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
