"""Reads the sm_90 SASS of the built extension and checks what each dependent launch's kernel
(common.cuh: launch_after, wait_for_prior_grid; griddepcontrol.wait is ACQBULK in SASS) loads
before its wait, and how it reads what the kernel before it writes.

Such a kernel starts while the kernel before it still runs. That kernel is the first of its op
and an ordinary launch (so every earlier op has ended), so before the wait a dependent kernel may
read the op's inputs, but nothing the op's earlier kernel writes; and it reads that with coherent
loads (an ld.global.nc, .CONSTANT in SASS, declares its data read-only for the kernel's life, and
ptxas moved one above the wait). In the SASS:
  elementwise_rows_kernel  before the wait, only whole row vectors of x and dy
                           (LDG.E.128.CONSTANT; LDG.E.64.CONSTANT in the 16-bit kernels of 4
                           channels a thread, BN_EXT_CUDA_NARROW_ROWS=1); no narrower .CONSTANT
                           load anywhere (the table is read coherently);
  finalize_kernel          before the wait, exactly finish()'s parameters: 4 coherent loads for
                           StatsOp, 2 for GradOp, none in float64 (which keeps them in finish());
                           no .CONSTANT load anywhere (the partial sums are read coherently);
  merging_map_kernel       before the wait, finish()'s parameters as the finalize pass (it has
                           no float64 kernels; its prefetches of x and dy, CCTL.E.PF2, load
                           nothing into a register);
                           no .CONSTANT load narrower than a row vector anywhere (x and dy may
                           be read so after the wait; the partial sums are read coherently);
  elementwise_kernel       nothing before the wait.
Every kernel of the four families must wait, and each family must have one, so that the check
cannot pass on a build without sm_90 code. A load is any global-memory read: LDG, generic LD,
LDGSTS (cp.async), atomics (ATOMG, RED), TMA and texture fetches.

    python .ci/check_dependent_loads.py CUOBJDUMP EXTENSION.so
"""
import re
import subprocess
import sys

LOAD = re.compile(r"\b(LDGSTS|LDG|LD|ATOMG|ATOM|RED|UTMALDG|UBLKCP|TLD|TEX)(\.[A-Z0-9_.]*)?\b")
# The kernels' mangled identifiers (length-prefixed), not bare words: the anonymous namespace's
# name carries the file's, elementwise_kernels_cu, which a bare "elementwise_kernel" matches.
FAMILIES = {"15finalize_kernelI": "finalize_kernel",
            "18merging_map_kernelI": "merging_map_kernel",
            "23elementwise_rows_kernelI": "elementwise_rows_kernel",
            "18elementwise_kernelI": "elementwise_kernel"}
ROW_VECTOR = "LDG.E.128.CONSTANT"
# A rows map's element type and vector width, from its mangled template arguments (T, the op,
# the index type, V): ...23elementwise_rows_kernelIN3c104HalfELNS1_11ElementwiseE1EjLi4E...
ROWS_ARGS = re.compile(r"23elementwise_rows_kernelI(f|d|N3c104HalfE|N3c108BFloat16E)"
                       r"LNS\d+_11ElementwiseE\dE[jm]Li(\d+)E")
ELEMENT_BYTES = {"f": 4, "d": 8, "N3c104HalfE": 2, "N3c108BFloat16E": 2}


def row_vector(name):
    """The load of one row vector (V elements of x or dy) in a rows map's SASS."""
    m = ROWS_ARGS.search(name)
    if m is None:
        return ROW_VECTOR
    return f"LDG.E.{8 * ELEMENT_BYTES[m.group(1)] * int(m.group(2))}.CONSTANT"


def functions(sass):
    """(name, [instruction text, ...]) for each function in cuobjdump -sass output."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        yield name, re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", part)


def family(name):
    for key, fam in FAMILIES.items():
        if key in name:
            return fam
    return "other"


def finalize_parameters(name):
    """How many loads finish()'s parameters take before the wait of a finalize pass or a
    merging map."""
    if re.search(r"(7StatsOp|6GradOp)Id", name):
        return 0  # float64 keeps them in finish()
    return 4 if "7StatsOp" in name else 2


def loads(ins):
    return [(s.strip(), m.group(0)) for s in ins if (m := LOAD.search(s))]


def problems(name, ins):
    """What is wrong with one function's loads, as messages."""
    fam = family(name)
    waits = [i for i, s in enumerate(ins) if "ACQBULK" in s]
    if not waits:
        return [] if fam == "other" else ["does not wait"]
    before, every = loads(ins[:waits[0]]), loads(ins)
    out = []
    if fam == "elementwise_rows_kernel":
        row = row_vector(name)
        out += [f"loads before its wait: {s}" for s, op in before if op != row]
        out += [f"a narrow non-coherent load (the table?): {s}" for s, op in every
                if ".CONSTANT" in op and op != row]
    elif fam in ("finalize_kernel", "merging_map_kernel"):
        want = finalize_parameters(name)
        coherent = [s for s, op in before if op.startswith("LDG.E") and ".CONSTANT" not in op]
        if len(before) != want or len(coherent) != want:
            out.append(f"{len(before)} loads before its wait, {len(coherent)} of them coherent "
                       f"LDG; finish()'s parameters are {want}: " + "; ".join(s for s, _ in before))
        if fam == "finalize_kernel":
            out += [f"a non-coherent load: {s}" for s, op in every if ".CONSTANT" in op]
        else:
            out += [f"a narrow non-coherent load (a partial?): {s}" for s, op in every
                    if ".CONSTANT" in op and op != ROW_VECTOR]
    else:
        out += [f"loads before its wait: {s}" for s, _ in before]
    return out


def main():
    cuobjdump, so = sys.argv[1], sys.argv[2]
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", so], capture_output=True,
                          text=True, check=True).stdout
    waiting = {fam: 0 for fam in FAMILIES.values()}
    bad = 0
    for name, ins in functions(sass):
        if family(name) in waiting and any("ACQBULK" in s for s in ins):
            waiting[family(name)] += 1
        for msg in problems(name, ins):
            bad += 1
            if bad <= 20:
                print(f"{name}: {msg}")
    print("kernels that wait, by family:", waiting)
    if bad:
        print(f"{bad} problem(s) in all")
    missing = [f for f, n in waiting.items() if n == 0]
    if missing:
        print("no kernel that waits in:", ", ".join(missing))
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
