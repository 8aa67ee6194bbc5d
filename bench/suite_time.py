"""How long the test suite takes, module by module: runs `pytest` (or the arguments given) once
and prints one table, slowest module first, with the wall time of the whole run.

    python bench/suite_time.py                 # the README's `pytest`
    python bench/suite_time.py -m "not slow"   # any pytest arguments

Seconds per module are setup + call + teardown of its tests (session fixtures count where they
are first used), from pytest's JUnit XML; with pytest-xdist's workers (the default, see
pyproject.toml) they add up to more than the wall time. The CPU seconds are those of pytest
and every process it started and waited for (workers, stages, servers): on a machine whose
cores the suite keeps busy they set the wall time, and they vary less from run to run. They
are a lower bound: a process whose parent was killed first (a server's worker, a stage under
a killed `dvc`) is reaped by init, not counted. A measurement, not a test: nothing fails on
time.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_times(junit: Path) -> dict[str, tuple[int, float]]:
    """{module file: (tests, seconds)} from a JUnit XML report."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1] or case.get("file", "?")
        totals[module][0] += 1
        totals[module][1] += float(case.get("time", 0))
    return {m: (int(n), s) for m, (n, s) in totals.items()}


def table(times: dict[str, tuple[int, float]], wall: float, cpu: float) -> str:
    total = sum(s for _, s in times.values())
    lines = ["| module | tests | seconds | share |", "|---|---:|---:|---:|"]
    for module, (tests, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {module} | {tests} | {seconds:.0f} | {seconds / (total or 1):.0%} |")
    lines.append(f"| **all** | {sum(n for n, _ in times.values())} | {total:.0f} | |")
    lines.append("")
    lines.append(f"wall time of the run (collection included): {wall:.0f} s = {wall / 60:.1f} min")
    lines.append(f"CPU time of pytest and the processes it waited for: {cpu:.0f} s")
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        status = subprocess.call([sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}",
                                  "-o", "junit_duration_report=total", *sys.argv[1:]], cwd=ROOT)
        wall = time.perf_counter() - started
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(table(module_times(junit), wall, children.ru_utime + children.ru_stime))
    return status


if __name__ == "__main__":
    sys.exit(main())
