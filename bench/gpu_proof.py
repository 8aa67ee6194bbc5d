"""The GPU proof's measurements (run by bench/gpu-proof.sh): what "trains AlexNet fast on a GPU"
means here, in one command sized for a 15-minute GPU lease.

Sections, in this order (the figures wanted most first, the slow compile last):

  data           45 000 + 5 000 generated images (in memory), the real dev subset (--dev-archive)
  sweep          the trainer's images/s at batch 128, 256 and 512, compile off
  baseline       the tutorial DataLoader loop at batch 128 (the best trainer row's ratio to it)
  stage          the train stage on the generated images for 10 epochs, split into loop,
                 evaluation, checkpoint and logging
  tta_dev        time to 45 % test accuracy with the params' recipe on the dev subset
  cuda_tests     pytest -m cuda tests/test_cuda.py, in a child process
  compile        the trainer's images/s with torch.compile, at the params' batch size only
                 (each compiled batch size compiles anew: a minute or more)
  alexnet_paper  not by default (--sections default,alexnet_paper): a few epochs at 227 x 227

Each section runs in its own try/except under a time limit, and gpu-proof.json and gpu-proof.md
in --out are rewritten before and after each one, so a failing section, or a command killed
later, keeps what came before. A watchdog stops any section at the proof's deadline
(--budget-seconds from the start), so the command returns what it measured well inside an
outer timeout. The table is printed last.

Imports torch and the training core only (PYTHONPATH=src; PyYAML reads params.yaml and
scikit-learn splits the dev archive as the prepare stage does). --smoke shrinks everything so
the proof runs in seconds on a CPU: tests/test_bench.py rehearses the documented device command
that way, with MLflow, DVC and Optuna made unimportable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from cifar_alexnet.config import Params, load_params
from cifar_alexnet.tools import throughput

log = logging.getLogger("gpu-proof")

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME, MARKDOWN_NAME, CUDA_TESTS_XML = "gpu-proof.json", "gpu-proof.md", "cuda-tests.xml"
# For the rehearsal test only: "SECTION:raise" makes a section fail as it starts; "SECTION:exit"
# ends the process (exit 137, like a kill) right after that section's results are written.
FAULTS_ENV = "GPU_PROOF_FAULTS"
MIN_START_SECONDS = 5.0  # a section starts only with at least this much of the budget left


@dataclass(frozen=True)
class Sizes:
    generated: dict[str, int]      # split sizes of the generated data
    dev_images: dict[str, int] | None  # the first images of the dev subset's splits; None: all
    sweep_batches: tuple[int, ...]
    warmup_steps: int
    steps: int
    stage_epochs: int
    tta_budget_seconds: float
    paper_epochs: int
    budget_seconds: float          # the whole proof: the watchdog's deadline


# The stage on >= 45 000 images over >= 10 epochs: on the 3 700-image dev subset an epoch is a
# fraction of a second and one 0.9 GB checkpoint outweighs the loop (docs/gpu.md).
FULL = Sizes(generated={"train": 45_000, "val": 5_000, "test": 1_000}, dev_images=None,
             sweep_batches=(128, 256, 512), warmup_steps=30, steps=200, stage_epochs=10,
             tta_budget_seconds=60.0, paper_epochs=3, budget_seconds=300.0)
# --smoke: as little work as still runs every code path (2 CPU cores shared with other work).
SMOKE = Sizes(generated={"train": 128, "val": 32, "test": 32},
              dev_images={"train": 128, "val": 32, "test": 64}, sweep_batches=(8, 16, 32),
              warmup_steps=1, steps=2, stage_epochs=2, tta_budget_seconds=30.0, paper_epochs=1,
              budget_seconds=240.0)
# The batch size is the sweep's largest (the compile row is compared with that row);
# checkpoint_seconds=0: a checkpoint after every epoch, so the rehearsal times several.
SMOKE_OVERRIDES = (*throughput.SMOKE_OVERRIDES, f"train.batch_size={SMOKE.sweep_batches[-1]}",
                   "train.checkpoint_seconds=0")


class Skipped(Exception):
    """A section that cannot run here (an input is missing): reported, not a failure."""


class OutOfTime(BaseException):
    """The watchdog's alarm. A BaseException, so that no ``except Exception`` on the way (a
    sweep row's, a library's) swallows it and runs on past the deadline."""


class Terminated(BaseException):
    """SIGTERM (an outer ``timeout``): stop, write what was measured, print the table."""


@dataclass
class Proof:
    args: argparse.Namespace
    sizes: Sizes
    params: Params
    device: torch.device
    started: float
    results: dict[str, Any]
    flops: int | None = None                  # training FLOPs per image of params.model
    peak: float | None = None                 # the device's dense bf16 peak, TFLOP/s
    generated: throughput.BenchData | None = None
    dev: throughput.BenchData | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.params.base.seed

    def need_generated(self) -> throughput.BenchData:
        if self.generated is None:
            raise Skipped("no generated data: the data section did not make it")
        return self.generated

    def write(self) -> None:
        """gpu-proof.json and gpu-proof.md as they stand, each replaced atomically (a kill
        mid-write leaves the previous complete file)."""
        self.results["seconds"] = time.monotonic() - self.started
        self.results["sections"] = self.sections
        try:
            self.results["summary"] = summary(self.results)
        except Exception as exc:  # a summary bug must not cost the figures
            self.results["summary"] = {"error": f"{type(exc).__name__}: {exc}"}
        _write_atomic(self.args.out / JSON_NAME,
                      json.dumps(self.results, indent=2, default=str) + "\n")
        _write_atomic(self.args.out / MARKDOWN_NAME, table(self.results))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The sections: each fills `result` as it goes, so a section stopped half-way keeps its rows.


def section_data(proof: Proof, result: dict[str, Any]) -> None:
    started = time.perf_counter()
    proof.generated = throughput.generated_data(proof.sizes.generated, proof.seed)
    result["generated"] = {"sizes": proof.generated.sizes,
                           "seconds": time.perf_counter() - started}
    if proof.args.dev_archive is None:
        result["dev_subset"] = None
        return
    started = time.perf_counter()
    dev = throughput.load_archive(proof.args.dev_archive, proof.params.data.val_size, proof.seed)
    proof.dev = dev.head(proof.sizes.dev_images) if proof.sizes.dev_images else dev
    result["dev_subset"] = {"source": str(proof.args.dev_archive), "sizes": proof.dev.sizes,
                            "seconds": time.perf_counter() - started}


def trainer_row(proof: Proof, batch: int, compile_: bool) -> dict[str, Any]:
    """One trainer throughput row; an error becomes the row's ``error`` so the other rows run."""
    cfg = dataclasses.replace(proof.params.train, batch_size=batch, compile=compile_)
    started = time.perf_counter()
    try:
        row = throughput.trainer_throughput(proof.params.model, proof.need_generated(), cfg,
                                       proof.device, proof.seed, proof.sizes.warmup_steps,
                                       proof.sizes.steps)
    except Exception as exc:  # e.g. out of memory at one batch size: the row says so
        log.warning("trainer at batch %d, compile %s failed: %s", batch, compile_, exc)
        return {"batch_size": batch, "compile": compile_, "images_per_s": None,
                "error": f"{type(exc).__name__}: {exc}"[:300]}
    # wall_seconds: model set-up, warm-up (cuDNN autotuning, compilation) and the timed steps
    row["wall_seconds"] = time.perf_counter() - started
    return throughput.achieved(row, proof.flops, proof.peak) if proof.flops else row


def _raise_row_errors(rows: list[dict[str, Any]]) -> None:
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} row(s) failed; first: "
                           f"{failed[0]['error']}")


def section_sweep(proof: Proof, result: dict[str, Any]) -> None:
    proof.need_generated()
    rows = result.setdefault("rows", [])
    for batch in proof.sizes.sweep_batches:
        rows.append(trainer_row(proof, batch, compile_=False))
    _raise_row_errors(rows)


def section_baseline(proof: Proof, result: dict[str, Any]) -> None:
    row = throughput.baseline_throughput(proof.params.model, proof.need_generated(),
                                    proof.params.train, proof.device, proof.seed,
                                    proof.sizes.warmup_steps, proof.sizes.steps,
                                    proof.args.workers)
    result.update(throughput.achieved(row, proof.flops, proof.peak) if proof.flops else row)


def section_stage(proof: Proof, result: dict[str, Any]) -> None:
    result.update(throughput.stage_wall_time(proof.params, proof.need_generated(), proof.device,
                                        proof.sizes.stage_epochs))


def section_tta_dev(proof: Proof, result: dict[str, Any]) -> None:
    if proof.dev is None:
        raise Skipped("no dev subset (--dev-archive not given, or it did not load)")
    result.update(throughput.time_to_accuracy(proof.params, proof.dev, proof.device,
                                         throughput.SUBSET_TARGET_ACC,
                                         proof.sizes.tta_budget_seconds))


def section_cuda_tests(proof: Proof, result: dict[str, Any]) -> None:
    """The CUDA tests in a child pytest (they skip themselves where no GPU is visible).
    -o addopts=: the project's options assume the dev install; no plugin autoloading: the GPU
    machine's many pytest plugins cost start-up time and none is needed."""
    xml = proof.args.out / CUDA_TESTS_XML
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH"))))}
    sys.stdout.flush()
    sys.stderr.flush()
    # Its output goes to this process's (the log); the watchdog's alarm kills it if need be.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p",
                           "no:cacheprovider", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py",
                           "--junitxml", str(xml)], cwd=ROOT, env=env)
    result["returncode"] = proc.returncode
    result.update(junit_counts(xml))
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m cuda exited with {proc.returncode}: "
                           f"{result.get('failed')} failed, {result.get('errors')} errors")


def junit_counts(path: Path) -> dict[str, Any]:
    """Passed/failed/errors/skipped counts, failing test names and skip reasons of a JUnit XML."""
    counts: dict[str, Any] = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
                              "failures": [], "skip_reasons": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        outcome = next((child.tag for child in case
                        if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome,
                                                                                "passed")
        counts[key] += 1
        if outcome in ("failure", "error"):
            counts["failures"].append(case.get("name"))
        elif outcome == "skipped":
            reason = case.find("skipped").get("message", "")
            if reason not in counts["skip_reasons"]:
                counts["skip_reasons"].append(reason)
    return counts


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """fit() calls torch.compile with its default backend (inductor). A CPU rehearsal names a
    cheaper one ("eager": dynamo still traces the training step, nothing is code-generated,
    which takes minutes on 2 cores); the row records which."""
    if backend == "inductor":
        yield
        return
    original = torch.compile

    def compile_with(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


def section_compile(proof: Proof, result: dict[str, Any]) -> None:
    batch = proof.params.train.batch_size
    proof.need_generated()
    with compile_backend(proof.args.compile_backend):
        result.update(trainer_row(proof, batch, compile_=True))
    result["backend"] = proof.args.compile_backend
    _raise_row_errors([result])
    plain = next((r for r in proof.sections.get("sweep", {}).get("result", {}).get("rows", [])
                  if r["batch_size"] == batch and r.get("images_per_s")), None)
    if plain:
        result["vs_compile_off"] = result["images_per_s"] / plain["images_per_s"]


def section_alexnet_paper(proof: Proof, result: dict[str, Any]) -> None:
    data = proof.dev or proof.need_generated()
    params = dataclasses.replace(
        proof.params, model=dataclasses.replace(proof.params.model, arch="alexnet_paper"),
        train=dataclasses.replace(proof.params.train, epochs=proof.sizes.paper_epochs))
    result["data"] = data.source
    result.update(throughput.time_to_accuracy(params, data, proof.device, throughput.SUBSET_TARGET_ACC,
                                         proof.sizes.tta_budget_seconds))


@dataclass(frozen=True)
class Section:
    run: Callable[[Proof, dict[str, Any]], None]
    estimate_seconds: float   # on an H100/H200: docs/gpu.md derives it from FLOPs and bytes
    limit_seconds: float      # the most it may take; the proof's deadline may cut it shorter


SECTIONS = {
    "data": Section(section_data, 10, 120),
    "sweep": Section(section_sweep, 14, 120),
    "baseline": Section(section_baseline, 8, 90),
    "stage": Section(section_stage, 17, 120),
    "tta_dev": Section(section_tta_dev, 6, 90),
    "cuda_tests": Section(section_cuda_tests, 45, 180),
    "compile": Section(section_compile, 120, 240),
    "alexnet_paper": Section(section_alexnet_paper, 25, 120),
}
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name != "alexnet_paper")


# ---------------------------------------------------------------------------------------------
# Running the sections


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise OutOfTime in this (the main) thread after ``seconds``. Python runs the handler
    between bytecodes, so a section is stopped within moments of its limit unless it sits in
    one long C call; a child process (the CUDA tests) is killed by subprocess.run on the way
    out."""
    def expire(_signum: int, _frame: Any) -> None:
        raise OutOfTime(f"stopped by the watchdog after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_faults(text: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition(":")
        if name not in SECTIONS or action not in ("raise", "exit"):
            raise SystemExit(f"${FAULTS_ENV}: {item!r} is not SECTION:raise or SECTION:exit")
        faults[name] = action
    return faults


def run_section(proof: Proof, name: str, deadline: float, faults: dict[str, str]) -> None:
    section = SECTIONS[name]
    entry: dict[str, Any] = {"status": "running", "estimate_seconds": section.estimate_seconds}
    proof.sections[name] = entry
    left = deadline - time.monotonic()
    if left < MIN_START_SECONDS:
        entry.update(status="skipped", reason=f"budget: {max(left, 0):.0f} s of "
                                              f"{proof.results['budget_seconds']:.0f} s left")
        proof.write()
        return
    proof.write()  # the JSON names the section running, should the process be killed in it
    limit = min(section.limit_seconds, left)
    log.info("section %s (limit %.0f s)", name, limit)
    result: dict[str, Any] = {}
    started = time.monotonic()
    try:
        with time_limit(limit):
            if faults.get(name) == "raise":
                raise RuntimeError(f"injected fault (${FAULTS_ENV})")
            section.run(proof, result)
        entry["status"] = "ok"
    except Skipped as exc:
        entry.update(status="skipped", reason=str(exc))
    except OutOfTime as exc:
        entry.update(status="timed_out", error=str(exc))
    except Exception as exc:
        log.exception("section %s failed", name)
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500],
                     traceback=traceback.format_exc()[-3000:])
    except Terminated:
        entry.update(status="terminated", error="SIGTERM")
        raise
    finally:
        entry.update(seconds=time.monotonic() - started, result=result)
        gc.collect()  # what a failed section left on the device
        if proof.device.type == "cuda":
            torch.cuda.empty_cache()
        proof.write()
        log.info("section %s: %s in %.1f s", name, entry["status"], entry["seconds"])
    if faults.get(name) == "exit":
        os._exit(137)


# ---------------------------------------------------------------------------------------------
# Set-up and report


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": throughput.device_name(device), "device_type": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "peak_bf16_tflops": throughput.device_peak_tflops(device)}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    with contextlib.suppress(OSError):  # small /dev/shm: DataLoader workers die (baseline)
        info["dev_shm_free_bytes"] = shutil.disk_usage("/dev/shm").free
    if device.type == "cuda":
        started = time.perf_counter()
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
        info["cuda_init_seconds"] = time.perf_counter() - started
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}")
    return info


def start(args: argparse.Namespace) -> Proof:
    started = time.monotonic()
    sizes = SMOKE if args.smoke else FULL
    params = load_params(args.params, [*(SMOKE_OVERRIDES if args.smoke else ()), *args.set])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                     device=device.type))
    budget = args.budget_seconds if args.budget_seconds is not None else sizes.budget_seconds
    results: dict[str, Any] = {"smoke": args.smoke, "argv": sys.argv[1:], "budget_seconds": budget,
                               "complete": False}
    proof = Proof(args, sizes, params, device, started, results)
    try:
        results.update(environment(device))
    except Exception as exc:  # the sections say more; this is the header
        results["environment_error"] = f"{type(exc).__name__}: {exc}"
        results.setdefault("device", str(device))
    try:
        model = throughput.build_model(params.model)
        proof.flops = throughput.flops_per_image(model)
        proof.peak = throughput.device_peak_tflops(device)
        results["model"] = {"arch": params.model.arch, "width": params.model.width,
                            "parameters": throughput.count_parameters(model),
                            "flops_per_train_image": proof.flops}
        del model
    except Exception as exc:
        results["model"] = {"error": f"{type(exc).__name__}: {exc}"}
    results["params"] = params.to_public_dict()
    return proof


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Figures derived from several sections: the best trainer row and its ratio to the
    tutorial loop."""
    sections = results.get("sections", {})
    rows = [*sections.get("sweep", {}).get("result", {}).get("rows", []),
            sections.get("compile", {}).get("result", {})]
    rows = [r for r in rows if r.get("images_per_s")]
    best = max(rows, key=lambda r: r["images_per_s"], default=None)
    baseline = sections.get("baseline", {}).get("result", {}).get("images_per_s")
    return {"best": best and {k: best.get(k) for k in ("batch_size", "compile", "images_per_s",
                                                        "tflops", "fraction_of_peak")},
            "best_vs_baseline": best and baseline and best["images_per_s"] / baseline}


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)


def _throughput_line(label: str, row: dict[str, Any]) -> str:
    peak = row.get("fraction_of_peak")
    return (f"| {label} | {_fmt(row.get('images_per_s'), ',.0f')} | "
            f"{_fmt(row.get('tflops'), '.1f')} | {_fmt(peak and 100 * peak, '.1f')} |")


def table(results: dict[str, Any]) -> str:
    """The Markdown summary (gpu-proof.md, and the last thing printed). Never raises: a
    formatting bug must not cost the JSON beside it."""
    try:
        return _table(results)
    except Exception as exc:
        return f"(the table failed: {type(exc).__name__}: {exc}; see {JSON_NAME})\n"


def _table(results: dict[str, Any]) -> str:
    sections = results.get("sections", {})

    def ok(name: str) -> dict[str, Any] | None:
        entry = sections.get(name, {})
        return entry.get("result") if entry.get("status") == "ok" else None

    model = results.get("model", {})
    lines = [f"### GPU proof: {results.get('device')} (torch {results.get('torch')}, CUDA "
             f"{results.get('cuda')}, cuDNN {results.get('cudnn')}, Python "
             f"{results.get('python')}){' [smoke]' if results.get('smoke') else ''}", ""]
    if "parameters" in model:
        lines += [f"`{model['arch']}` width {model['width']}: {model['parameters']:,} "
                  f"parameters, {model['flops_per_train_image'] / 1e9:.2f} GFLOP per training "
                  f"image; dense bf16 peak {_fmt(results.get('peak_bf16_tflops'), '.0f')} "
                  "TFLOP/s", ""]
    lines += ["| setting | images/s | TFLOP/s | % of bf16 peak |", "|---|---:|---:|---:|"]
    for row in sections.get("sweep", {}).get("result", {}).get("rows", []):
        lines.append(_throughput_line(f"trainer, batch {row['batch_size']}, compile off", row))
    compiled = sections.get("compile", {}).get("result", {})
    if compiled.get("batch_size"):
        lines.append(_throughput_line(f"trainer, batch {compiled['batch_size']}, compile on "
                                      f"({compiled.get('backend')})", compiled))
    baseline = ok("baseline")
    if baseline:
        lines.append(_throughput_line(f"tutorial DataLoader loop, batch "
                                      f"{baseline['batch_size']}, {baseline['workers']} "
                                      "workers, fp32", baseline))
    lines.append("")
    best, ratio = results.get("summary", {}).get("best"), results.get("summary", {}).get(
        "best_vs_baseline")
    if best and ratio:
        lines.append(f"- best trainer setting (batch {best['batch_size']}, compile "
                     f"{'on' if best['compile'] else 'off'}): {ratio:.1f}x the tutorial loop")
    if baseline and baseline.get("worker_failure"):
        lines.append(f"- tutorial loop measured with 0 workers: {baseline['worker_failure']}")
    stage = ok("stage")
    if stage:
        s = stage["seconds"]
        lines.append(
            f"- train stage, {stage['epochs']} epochs of {stage['train_images']:,} images at "
            f"batch {stage['batch_size']}: {stage['wall_seconds']:.1f} s = loop "
            f"{s['loop']:.1f} ({stage['loop_images_per_s']:,.0f} images/s) + evaluation "
            f"{s['evaluation']:.2f} + checkpoint {s['checkpoint']:.2f} ({stage['checkpoints']} "
            f"x {stage['checkpoint_bytes'] / 1e9:.2f} GB) + logging {s['logging']:.2f} "
            f"({'MLflow' if stage['mlflow_logging'] else 'MLflow not installed'}) + load "
            f"{s['load']:.2f} + to device {s['to_device']:.2f} + model file {s['model_file']:.2f} + other {s['other']:.2f}: "
            f"overhead {100 * stage['overhead']:.0f} % of the loop; best val acc "
            f"{stage['best_val_acc']:.3f}")
    for name, label in (("tta_dev", "the dev subset"), ("alexnet_paper", "alexnet_paper")):
        tta = ok(name)
        if tta:
            lines.append(f"- {label}: time to {tta['target_acc']:.2f} test accuracy "
                         f"{_fmt(tta['seconds_to_target'], '.1f')} s (epoch "
                         f"{_fmt(tta['epoch_at_target'], 'd')}); best "
                         f"{_fmt(tta['best_acc_within_budget'], '.3f')} at epoch "
                         f"{_fmt(tta['epoch_of_best'], 'd')} of {tta['epochs_run']} within "
                         f"{tta['budget_seconds']:.0f} s")
    tests = sections.get("cuda_tests", {}).get("result", {})
    if "tests" in tests:
        lines.append(f"- CUDA tests: {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped"
                     + (f" ({'; '.join(tests['skip_reasons'])})" if tests["skip_reasons"]
                        else "")
                     + (f"; failing: {', '.join(tests['failures'])}" if tests["failures"]
                        else ""))
    lines += ["", "| section | status | seconds | estimate (H100) |", "|---|---|---:|---:|"]
    for name, entry in sections.items():
        status = entry["status"]
        note = entry.get("error") or entry.get("reason")
        if note:
            status += ": " + note.replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {name} | {status} | {_fmt(entry.get('seconds'), '.1f')} | "
                     f"{entry['estimate_seconds']:.0f} |")
    lines += ["", f"- the whole proof: {results.get('seconds', 0):.0f} s of a "
                  f"{results.get('budget_seconds', 0):.0f} s budget"
                  + ("" if results.get("complete") else " (not finished)")]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dev-archive", type=Path, help="the real CIFAR-10 dev subset archive")
    parser.add_argument("--device", help="cuda (default where present) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU rehearsal")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="where the JSON, Markdown and CUDA test results go")
    parser.add_argument("--sections", default="default",
                        help="comma-separated sections to run, in order; 'default' stands for "
                             f"{','.join(DEFAULT_SECTIONS)} (not by default: alexnet_paper)")
    parser.add_argument("--budget-seconds", type=float,
                        help=f"the whole proof's deadline (default {FULL.budget_seconds:.0f}, "
                             f"--smoke {SMOKE.budget_seconds:.0f})")
    parser.add_argument("--workers", type=int, help="the tutorial loop's DataLoader workers")
    parser.add_argument("--compile-backend",
                        help="torch.compile backend of the compile row (default inductor; "
                             "--smoke: eager)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    args.sections = [s for n in names for s in (DEFAULT_SECTIONS if n == "default" else [n])]
    unknown = [n for n in args.sections if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    faults = parse_faults(os.environ.get(FAULTS_ENV, ""))
    args.out.mkdir(parents=True, exist_ok=True)

    def terminate(_signum: int, _frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    proof = start(args)
    deadline = proof.started + proof.results["budget_seconds"]
    proof.write()
    try:
        for name in args.sections:
            run_section(proof, name, deadline, faults)
        proof.results["complete"] = True
    except Terminated:
        log.warning("terminated: writing what was measured")
    finally:
        proof.write()
        sys.stdout.write(table(proof.results))
        sys.stdout.flush()
    statuses = [entry["status"] for entry in proof.sections.values()]
    if "terminated" in statuses:
        return 143
    return 1 if {"failed", "timed_out"} & set(statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
