"""The rules of .ci/check_dependent_loads.py (run by .ci/cuda_build.sh on the built extension's
sm_90 SASS), on hand-written function bodies in cuobjdump's format."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, ".ci", "check_dependent_loads.py")
_spec = importlib.util.spec_from_file_location("check_dependent_loads", _PATH)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def ins(text, at=0):
    return f"        /*{at:04x}*/                   {text} ;          /* 0x000fe20000000000 */"


PRE, WAIT = ins("PREEXIT"), ins("ACQBULK", 0x10)
ROW = ins("LDG.E.128.CONSTANT R8, desc[UR8][R8.64]", 0x20)
NARROW_NC = ins("@P0 LDG.E.CONSTANT R4, desc[UR8][R4.64]", 0x30)
COHERENT = ins("@P1 LDG.E R10, desc[UR8][R16.64]", 0x40)
ASYNC = ins("LDGSTS.E.BYPASS.128 [R3], desc[UR8][R4.64]", 0x50)
ATOMIC = ins("ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR8][R2.64], R5", 0x60)
STORE = ins("STG.E desc[UR8][R2.64], R4", 0x70)

# Real names (sm_90, nvcc 13.0): the anonymous namespace's name carries the file's.
NS = "_ZN6bn_ext4cuda6detail50_GLOBAL__N__2a7dec8f_22_elementwise_kernels_cu_f724262"
ROWS = NS + "23elementwise_rows_kernelIfLNS1_11ElementwiseE1EjLi4ENS1_9CoefTableIfEEEEvPKT_"
FLAT = NS + "18elementwise_kernelIfLNS1_11ElementwiseE1EjLi4ENS1_9CoefTableIfEEEEvPKT_"
# BN_EXT_CUDA_NARROW_ROWS=1's 16-bit backward rows map: 4 channels a thread, 8-byte row vectors
ROWS_NARROW = (NS + "23elementwise_rows_kernelIN3c104HalfELNS1_11ElementwiseE1EjLi4ENS1_9CoefTable"
               "IfEEEEvPKT_SB_PS9_T3_T1_SE_b")
ROWS_HALF = (NS + "23elementwise_rows_kernelIN3c104HalfELNS1_11ElementwiseE1EjLi8ENS1_9CoefTable"
             "IfEEEEvPKT_SB_PS9_T3_T1_SE_b")
ROW64 = ins("LDG.E.64.CONSTANT R8, desc[UR8][R8.64]", 0x28)
COEFS = NS + "21backward_coefs_kernelIfEEvPKT_S7_S7_S7_S7_S7_dPS5_l"
RNS = "_ZN6bn_ext4cuda6detail50_GLOBAL__N__afb2d38e_17_reduce_kernels_cu_f7242625"
STATS = RNS + "15finalize_kernelINS1_7StatsOpIfLb1EEEEEvT_PKNS6_1MEll"
GRAD = RNS + "15finalize_kernelINS1_6GradOpIN3c104HalfELb0EEEEEvT_PKNS8_1MEll"
STATS64 = RNS + "15finalize_kernelINS1_7StatsOpIdLb1EEEEEvT_PKNS6_1MEll"
MAP_GRAD = (RNS + "18merging_map_kernelIN3c104HalfENS1_6GradOpIS5_Lb0EEEjLi8EEEvT0_PKT_SB_PS9_"
            "T1_SD_N2at4cuda6detail10IntDividerISD_EESD_PKNS8_1MElb")
MAP_ARGS = "EEEvT0_PKT_S9_PS7_T1_SB_N2at4cuda6detail10IntDividerISB_EESB_PKNS6_1MElb"
MAP_STATS = RNS + "18merging_map_kernelIfNS1_7StatsOpIfLb1EEEjLi4" + MAP_ARGS
PREFETCH = ins("CCTL.E.PF2 desc[UR8][R2.64]", 0x80)


def sass(*functions):
    """cuobjdump -sass text for (name, [instruction lines]) pairs."""
    out = ["Fatbin elf code:", "================", "arch = sm_90"]
    for name, lines in functions:
        out += [f"\t\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""] + list(lines)
    return "\n".join(out) + "\n"


def found(name, lines):
    [(n, body)] = list(check.functions(sass((name, lines))))
    assert n == name and len(body) == len(lines)
    return check.problems(n, body)


@pytest.mark.parametrize("name,before,after,bad", [
    # the rows map: whole rows of x and dy before the wait; the table, coherent, after it
    (ROWS, [ROW, ROW], [COHERENT, ROW, STORE], 0),
    (ROWS, [COHERENT], [ROW], 1),
    (ROWS, [NARROW_NC], [ROW], 2),      # before the wait, and a narrow .nc load at all
    (ROWS, [ROW], [NARROW_NC], 1),      # a table read through __ldg, after the wait
    (ROWS, [ROW, ASYNC], [], 1),
    # ... whose row vectors are 8 bytes in the narrow 16-bit kernel, and 16 in the others
    (ROWS_NARROW, [ROW64, ROW64], [COHERENT, ROW64, STORE], 0),
    (ROWS_NARROW, [ROW64], [NARROW_NC], 1),
    (ROWS_NARROW, [ROW], [ROW64], 2),   # a 16-byte .nc load is not this kernel's row vector
    (ROWS_HALF, [ROW64], [ROW], 2),
    # the flat map loads nothing before its wait
    (FLAT, [], [ROW, COHERENT, NARROW_NC], 0),
    (FLAT, [ROW], [], 1),
    (FLAT, [ATOMIC], [], 1),
    # the finalize pass: exactly finish()'s parameters before (4, 2, float64 none), coherent;
    # no .nc load anywhere
    (STATS, [COHERENT] * 4, [COHERENT, STORE], 0),
    (STATS, [COHERENT] * 5, [], 1),     # a partial's load moved above the wait
    (STATS, [COHERENT] * 3, [], 1),
    (STATS, [COHERENT] * 3 + [NARROW_NC], [], 2),
    (STATS, [COHERENT] * 4, [NARROW_NC], 1),
    (GRAD, [COHERENT] * 2, [COHERENT], 0),
    (GRAD, [COHERENT] * 4, [COHERENT], 1),
    (STATS64, [], [COHERENT, COHERENT], 0),
    (STATS64, [COHERENT], [], 1),
    # the merging map: finish()'s parameters before its wait as the finalize pass, beside the
    # prefetches of x and dy; x and dy as row vectors after it, the partials coherent
    (MAP_STATS, [PREFETCH] + [COHERENT] * 4, [COHERENT, ROW, STORE], 0),
    (MAP_STATS, [PREFETCH] + [COHERENT] * 4 + [ROW], [COHERENT], 1),  # x loaded before the wait
    (MAP_STATS, [COHERENT] * 5, [], 1),  # a partial's load moved above the wait
    (MAP_STATS, [COHERENT] * 4, [NARROW_NC], 1),  # a partial read through __ldg
    (MAP_GRAD, [PREFETCH, PREFETCH] + [COHERENT] * 2, [COHERENT, ROW, ROW, STORE], 0),
    (MAP_GRAD, [COHERENT] * 4, [], 1),
])
def test_loads_around_the_wait(name, before, after, bad):
    assert len(found(name, [PRE] + before + [WAIT] + after)) == bad


def test_every_kernel_of_the_families_waits():
    assert found(FLAT, [ROW, STORE]) == ["does not wait"]
    assert found(STATS, [COHERENT]) == ["does not wait"]
    assert found(MAP_GRAD, [COHERENT, ROW, STORE]) == ["does not wait"]
    assert found(COEFS, [NARROW_NC, STORE]) == []  # not a dependent launch


def test_families_by_mangled_identifier():
    # the file tag (elementwise_kernels_cu) is not the flat map's name
    assert [check.family(n) for n in (ROWS, FLAT, COEFS, STATS, GRAD, STATS64)] == [
        "elementwise_rows_kernel", "elementwise_kernel", "other", "finalize_kernel",
        "finalize_kernel", "finalize_kernel"]
    assert [check.finalize_parameters(n) for n in (STATS, GRAD, STATS64)] == [4, 2, 0]
    assert [check.row_vector(n) for n in (ROWS, ROWS_HALF, ROWS_NARROW)] == [
        "LDG.E.128.CONSTANT", "LDG.E.128.CONSTANT", "LDG.E.64.CONSTANT"]
    # the merging map's (never float64): its own family, finish()'s parameters as the finalize
    # pass's
    assert {check.family(n) for n in (MAP_GRAD, MAP_STATS)} == {"merging_map_kernel"}
    assert [check.finalize_parameters(n) for n in (MAP_STATS, MAP_GRAD)] == [4, 2]
