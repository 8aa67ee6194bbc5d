"""Tiny pipelines run side by side, with torch's default threads and with one thread each: why
the test suite sets OMP_NUM_THREADS=1 (tests/conftest.py). Prints one table.

    python bench/concurrent_repro.py              # 1 and 2 at once, default and 1 thread
    python bench/concurrent_repro.py --at-once 1 2 4 --threads default 1 2

Each cell is the wall time of N `dvc repro` started together, each in its own fresh project
(git repository) on the same generated archive with the test suite's tiny params (500
training images, width 0.0625, a 2-trial study). The rows run one after another in one
process, so they share the machine's state; rerun to see the noise. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import Archive, make_project, subprocess_env, tiny_params  # noqa: E402

from cifar_alexnet.tools.synthetic import write_synthetic_archive  # noqa: E402


def repro_side_by_side(archive: Archive, workdir: Path, at_once: int, threads: str) -> float:
    """Seconds until ``at_once`` fresh projects have all finished `dvc repro`."""
    projects = [make_project(workdir / f"p{i}", tiny_params(archive)) for i in range(at_once)]
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS", None)
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for project in projects]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"dvc repro failed ({process.returncode}):\n{stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at-once", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", nargs="+", default=["default", "1"],
                        help="OMP_NUM_THREADS values; 'default' leaves it unset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cifar-10-python.tar.gz"
        archive = Archive(path, write_synthetic_archive(path, per_batch=100, n_test=200, seed=0))
        print(f"{os.cpu_count()} CPUs; seconds until every `dvc repro` has finished\n")
        print("| at once | " + " | ".join(f"threads {t}" for t in args.threads) + " |")
        print("|---:|" + "---:|" * len(args.threads))
        for n, at_once in enumerate(args.at_once):
            cells = [repro_side_by_side(archive, Path(tmp) / f"run{n}-{t}", at_once, t)
                     for t in args.threads]
            print(f"| {at_once} | " + " | ".join(f"{s:.1f}" for s in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
