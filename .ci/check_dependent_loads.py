"""Reads the sm_90 SASS of the built extension and checks what each kernel that waits for the
kernel before it (griddepcontrol.wait, ACQBULK in SASS: a programmatic dependent launch, common.cuh)
loads before that wait.

A dependent launch starts while the kernel before it still runs, so before its wait it may read
only what no earlier kernel of the op writes (common.cuh, wait_for_prior_grid). In the SASS:
  elementwise_rows_kernel  only its rows of x and dy (ld.global.nc through __restrict__: .CONSTANT),
                           never the coefficient table (coherent loads, LDG.E);
  finalize_kernel          only finish()'s parameters (coherent, LDG.E), and never a .CONSTANT
                           load anywhere: the partial sums, which the reduction writes, are read
                           with coherent loads (ptxas moved an ld.global.nc of them above the wait);
  any other kernel         nothing.
Each of the three families must have a kernel that waits, so that the check cannot pass on a
build without sm_90 code.

    python .ci/check_dependent_loads.py CUOBJDUMP EXTENSION.so
"""
import re
import subprocess
import sys

LOAD = re.compile(r"\b(LDG|LD)\.[A-Z0-9.]*")


def functions(sass):
    """(name, [instruction text, ...]) for each function in cuobjdump -sass output."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        yield name, re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", part)


def family(name):
    for f in ("finalize_kernel", "elementwise_rows_kernel", "elementwise_kernel"):
        if f in name:
            return f
    return "other"


def problems(name, ins):
    """What is wrong with one function's loads, as messages (none if it does not wait)."""
    waits = [i for i, s in enumerate(ins) if "ACQBULK" in s]
    if not waits:
        return []
    fam = family(name)
    out = []
    for s in ins[:waits[0]]:
        m = LOAD.search(s)
        if not m:
            continue
        op = m.group(0)
        constant = ".CONSTANT" in op
        if fam == "elementwise_rows_kernel" and constant:
            continue  # x and dy
        if fam == "finalize_kernel" and not constant:
            continue  # finish()'s parameters
        out.append(f"loads before its wait: {s.strip()}")
    if fam == "finalize_kernel":
        out += [f"a non-coherent load of the partials: {s.strip()}"
                for s in ins if (m := LOAD.search(s)) and ".CONSTANT" in m.group(0)]
    return out


def main():
    cuobjdump, so = sys.argv[1], sys.argv[2]
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", so], capture_output=True,
                          text=True, check=True).stdout
    waiting = {"finalize_kernel": 0, "elementwise_rows_kernel": 0, "elementwise_kernel": 0}
    bad = 0
    for name, ins in functions(sass):
        if any("ACQBULK" in s for s in ins) and family(name) in waiting:
            waiting[family(name)] += 1
        for msg in problems(name, ins):
            bad += 1
            if bad <= 20:
                print(f"{name}: {msg}")
    if bad:
        print(f"{bad} load(s) in all that a dependent launch must not make")
    print("kernels that wait, by family:", waiting)
    missing = [f for f, n in waiting.items() if n == 0]
    if missing:
        print("no kernel that waits in:", ", ".join(missing))
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
