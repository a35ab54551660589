"""tests/mutation.py, the mutation runner: its mutants, and a run over a toy package."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import textwrap

import pytest

import mutation

SOURCE = textwrap.dedent('''\
    """Docstring: 'x < 1' is text, not code."""


    def f(x, flag=True):
        if x < 1 and not flag:
            raise ValueError(f"x = {x}")
        print(x)
        return (x + 2.5) // 3 is None


    def g(items):
        return [i for i in items if i in (0, 1)]
    ''')


def test_mutants_of_each_kind():
    mutants = mutation.mutants_of(SOURCE, "m.py")
    found = {(m.kind, m.old, m.new) for m in mutants}
    expected = {
        ("negate if", "x < 1 and not flag", "(not (x < 1 and (not flag)))"),
        ("Lt -> LtE", "x < 1", "(x <= 1)"),
        ("And -> Or", "x < 1 and not flag", "(x < 1 or not flag)"),
        ("drop not", "not flag", "(flag)"),
        ("raise -> pass", 'raise ValueError(f"x = {x}")', "pass"),
        ("call -> pass", "print(x)", "pass"),
        ("Add -> Sub", "x + 2.5", "(x - 2.5)"),
        ("FloorDiv -> Mult", "(x + 2.5) // 3", "((x + 2.5) * 3)"),
        ("Is -> IsNot", "(x + 2.5) // 3 is None", "((x + 2.5) // 3 is not None)"),
        ("flip bool", "True", "False"),
        ("int + 1", "1", "2"),
        ("float changed", "2.5", "5.0"),
        ("In -> NotIn", "i in (0, 1)", "(i not in (0, 1))"),
        ("int + 1", "0", "1"),
    }
    assert expected <= found, expected - found
    assert not [m for m in mutants if m.line == 1], "a mutant in the docstring"
    for m in mutants:
        new = mutation.apply(SOURCE, m)
        assert new is not None and new != SOURCE, m
        ast.parse(new)
        # one edit, at the recorded place
        lines, new_lines = SOURCE.split("\n"), new.split("\n")
        assert lines[:m.line - 1] == new_lines[:m.line - 1], m
        assert new_lines[m.line - 1][:m.col] == lines[m.line - 1][:m.col], m
        assert m.new in new_lines[m.line - 1], m


def test_multiline_statement_replaced_whole():
    source = "def h(a):\n    raise TypeError(\n        'a' +\n        str(a))\n"
    (m,) = [m for m in mutation.mutants_of(source, "h.py") if m.kind == "raise -> pass"]
    assert (m.line, m.end_line) == (2, 4)
    assert mutation.apply(source, m) == "def h(a):\n    pass\n"


def test_apply_refuses_a_changed_source():
    (m,) = [m for m in mutation.mutants_of("y = 1\n", "k.py") if m.kind == "int + 1"]
    with pytest.raises(AssertionError, match="source changed"):
        mutation.apply("y = 7\n", m)


def _toy(tmp_path):
    pkg = tmp_path / "pkg" / "toy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''\
        def clamp(x, lo, hi):
            if x < lo:
                raise ValueError("below")
            return min(x, hi)


        def half(x):
            return x // 2


        def unused():
            return 7
        '''))
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_toy.py").write_text(textwrap.dedent('''\
        import pytest
        from toy import clamp, half


        def test_clamp():
            assert clamp(5, 0, 10) == 5
            with pytest.raises(ValueError):
                clamp(-1, 0, 10)


        def test_half():
            assert half(0) == 0  # x * 2 and x // 3 pass this too
        '''))
    return str(pkg), str(tests)


def _statuses(records):
    return {(r["kind"], r["old"]): r["status"] for r in records}


@pytest.mark.parametrize("coverage", [False, True])
def test_run_over_a_toy_package(tmp_path, coverage):
    if coverage and importlib.util.find_spec("pytest_cov") is None:
        pytest.skip("needs pytest-cov")
    pkg, tests = _toy(tmp_path)
    out = str(tmp_path / "results.jsonl")
    records = mutation.run(["__init__.py"], package_dir=pkg, tests=[tests], out=out,
                           coverage=coverage, timeout=120)
    got = _statuses(records)
    assert got[("negate if", "x < lo")] == "killed"
    assert got[("raise -> pass", 'raise ValueError("below")')] == "killed"
    assert got[("FloorDiv -> Mult", "x // 2")] == "survived"
    assert got[("int + 1", "2")] == "survived"
    assert got[("int + 1", "7")] == ("uncovered" if coverage else "survived")
    killed = [r for r in records if r["status"] == "killed"]
    assert all("test_clamp" in r["by"][0] for r in killed), killed
    with open(out) as f:
        assert [json.loads(line)["key"] for line in f] == [r["key"] for r in records]
    # the package itself is untouched, and a rerun skips what the file holds
    with open(os.path.join(pkg, "__init__.py")) as f:
        assert "x // 2" in f.read()
    assert mutation.run(["__init__.py"], package_dir=pkg, tests=[tests], out=out,
                        coverage=coverage, timeout=120) == []
