"""The rules of .ci/check_dependent_loads.py (run by .ci/cuda_build.sh on the built extension's
sm_90 SASS), on hand-written function bodies in cuobjdump's format."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, ".ci", "check_dependent_loads.py")
_spec = importlib.util.spec_from_file_location("check_dependent_loads", _PATH)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

PRE = "        /*0000*/                   PREEXIT ;"
WAIT = "        /*0010*/                   ACQBULK ;"
X_VEC = "        /*0020*/                   LDG.E.128.CONSTANT R8, desc[UR8][R8.64] ;"
COHERENT = "        /*0030*/               @P1 LDG.E R10, desc[UR8][R16.64] ;"
NC_SCALAR = "        /*0040*/               @P0 LDG.E.CONSTANT R4, desc[UR8][R4.64] ;"
STORE = "        /*0050*/                   STG.E desc[UR8][R2.64], R4 ;"


def sass(*functions):
    """cuobjdump -sass text for (name, [instruction lines]) pairs."""
    out = ["Fatbin elf code:", "================", "arch = sm_90"]
    for name, lines in functions:
        out += [f"\t\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""] + list(lines)
    return "\n".join(out) + "\n"


def found(name, lines):
    [(n, ins)] = list(check.functions(sass((name, lines))))
    assert n == name
    return check.problems(n, ins)


ROWS = "_ZN6bn_ext4cuda6detail23elementwise_rows_kernelIfLi1EjLi4ENS1_9CoefTableIfEEEEvv"
FLAT = "_ZN6bn_ext4cuda6detail18elementwise_kernelIfLi1EjLi4ENS1_9CoefTableIfEEEEvv"
FINALIZE = "_ZN6bn_ext4cuda6detail15finalize_kernelINS1_7StatsOpIfLb1EEEEEvT_PKNS6_1MEll"


@pytest.mark.parametrize("name,before,after,bad", [
    # the rows map may load its rows of x and dy (.CONSTANT) before the wait, not the table
    (ROWS, [X_VEC], [COHERENT], 0),
    (ROWS, [COHERENT], [X_VEC], 1),
    # the flat map loads nothing before its wait
    (FLAT, [], [X_VEC, COHERENT], 0),
    (FLAT, [X_VEC], [], 1),
    # the finalize pass: parameters (coherent) before; never a .CONSTANT load, before or after
    (FINALIZE, [COHERENT, COHERENT], [COHERENT, STORE], 0),
    (FINALIZE, [NC_SCALAR], [COHERENT], 2),
    (FINALIZE, [COHERENT], [NC_SCALAR], 1),
])
def test_loads_before_the_wait(name, before, after, bad):
    assert len(found(name, [PRE] + before + [WAIT] + after)) == bad


def test_a_kernel_that_does_not_wait_is_not_judged():
    assert found(FLAT, [X_VEC, NC_SCALAR, STORE]) == []
    assert found(FINALIZE, [NC_SCALAR]) == []


def test_families_and_function_split():
    text = sass((ROWS, [PRE, WAIT]), (FLAT, [PRE, X_VEC]), (FINALIZE, [WAIT, NC_SCALAR]))
    got = [(check.family(n), len(ins)) for n, ins in check.functions(text)]
    assert got == [("elementwise_rows_kernel", 2), ("elementwise_kernel", 2),
                   ("finalize_kernel", 2)]
