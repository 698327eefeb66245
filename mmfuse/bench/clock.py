"""The clock the cores actually run at, measured: the clock term of the theoretical peak.

``/proc/cpuinfo``'s ``cpu MHz`` is, in a VM, usually the nominal base clock (2.6 GHz on the Zen 4 VM this
was written on, which ran at 3.63 GHz), and cpufreq is often absent. A peak built on the base clock came out
below the measured GEMM rate, so the clock is measured instead: a chain of dependent integer adds retires
exactly one add per cycle on every x86-64 and AArch64 core, so adds per second is cycles per second. One
copy runs on every usable core at once, since the all-core clock (lower than the single-core boost) is the
one a multi-core peak is built on. It needs a C compiler; without one the caller falls back to cpuinfo.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# 100 dependent adds per loop trip: the loop's own compare-and-branch runs on other ports, in the shadow.
_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__)
#define ADD "add %0, %0\n\t"
#elif defined(__aarch64__)
#define ADD "add %0, %0, %0\n\t"
#endif
#define A10 ADD ADD ADD ADD ADD ADD ADD ADD ADD ADD
int main(int argc, char **argv) {
  long trips = atol(argv[1]), repeats = atol(argv[2]);
  unsigned long x = 1;
  double best = 1e30;
  for (long r = 0; r < repeats; r++) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < trips; i++) __asm__ volatile(A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
    if (s < best) best = s;
  }
  printf("%.3f %lu\n", trips * 100.0 / best / 1e6, x & 1);
  return 0;
}
"""


def _build(workdir: Path) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return None
    src, exe = workdir / "clock.c", workdir / "clock"
    src.write_text(_SOURCE)
    done = subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True)
    return exe if done.returncode == 0 else None


def measured_mhz(cores: int, trips: int = 2_000_000, repeats: int = 5) -> float | None:
    """The all-core clock in MHz: the slowest core's best of ``repeats`` runs while every core runs one.

    Best-of-runs because a busy moment (another process on the core) can only make a run look slower.
    None when no C compiler or a CPU other than x86-64/AArch64 is found.
    """
    with tempfile.TemporaryDirectory(prefix="mmfuse-clock-") as tmp:
        exe = _build(Path(tmp))
        if exe is None:
            return None
        procs = [subprocess.Popen([str(exe), str(trips), str(repeats)], stdout=subprocess.PIPE, text=True)
                 for _ in range(max(1, cores))]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        return None
    return min(float(out.split()[0]) for out in outs)
