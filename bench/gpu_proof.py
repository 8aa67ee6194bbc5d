"""The GPU proof's measurements (run by bench/gpu-proof.sh): one table of what "trains AlexNet on
a GPU" means here, and a JSON with everything.

- throughput of the trainer for `alexnet` width 1: batch 128/256/512, torch.compile off/on;
- the tutorial-style DataLoader loop at batch 128, and the best trainer setting's ratio to it;
- the train stage's wall time against its loop (validation, checkpoints, logging, model file);
- time to accuracy with the default recipe on the real dev subset (`--dev-archive`) and on
  50 000 generated images;
- a few epochs of `alexnet_paper` (227 x 227) on the dev subset.

Imports torch and the training core only (`PYTHONPATH=src`). `--smoke` shrinks everything so the
whole script runs in a minute on a CPU (CI rehearses it that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cifar_alexnet.config import load_params
from cifar_alexnet.tools import bench
from cifar_alexnet.tools.synthetic import write_synthetic_archive

log = logging.getLogger("gpu-proof")

SWEEP_BATCHES = (128, 256, 512)
FULL = {"generated_images": 50_000, "stage_epochs": 5, "paper_epochs": 3,
        "budget_seconds": 120.0, "steps": 200, "warmup_steps": 30}
SMOKE = {"generated_images": 600, "stage_epochs": 2, "paper_epochs": 1,
         "budget_seconds": 20.0, "steps": 3, "warmup_steps": 2}
SMOKE_OVERRIDES = ["model.width=0.0625", "train.epochs=2"]


def generated_data(images: int, val_size: float, seed: int) -> bench.BenchData:
    with tempfile.TemporaryDirectory(prefix="gpu-proof-") as tmp:
        archive = Path(tmp) / "generated.tar.gz"
        write_synthetic_archive(archive, per_batch=images // 5, n_test=max(images // 5, 100),
                                seed=seed)
        return bench.load_archive(archive, val_size, seed)


def sweep(params, data, device, sizes, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    for compile_ in (False, True):
        for batch in SWEEP_BATCHES:
            if compile_ and smoke:  # compiling takes about a minute on a CPU
                rows.append({"batch_size": batch, "compile": True, "images_per_s": None,
                             "error": "skipped in --smoke"})
                continue
            cfg = dataclasses.replace(params.train, batch_size=batch, compile=compile_)
            try:
                rows.append(bench.trainer_throughput(params.model, data, cfg, device,
                                                     params.base.seed, sizes["warmup_steps"],
                                                     sizes["steps"]))
            except Exception as exc:  # e.g. compile unsupported here: a row that says so
                log.warning("batch %d, compile %s failed: %s", batch, compile_, exc)
                rows.append({"batch_size": batch, "compile": compile_, "images_per_s": None,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = SMOKE if args.smoke else FULL
    params = load_params(args.params, [*(SMOKE_OVERRIDES if args.smoke else ()), *args.set])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                     device=device.type))
    started = time.perf_counter()
    results: dict[str, Any] = {"device": bench.device_name(device), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "smoke": args.smoke,
                               "params": params.to_public_dict()}
    generated = generated_data(sizes["generated_images"], params.data.val_size,
                               params.base.seed)
    dev = (bench.load_archive(args.dev_archive, params.data.val_size, params.base.seed)
           if args.dev_archive else None)
    if args.smoke and dev is not None:
        dev = dev.head(bench.SMOKE_IMAGES)

    model = bench.build_model(params.model, generated.mean, generated.std)
    results["model"] = {"arch": params.model.arch, "width": params.model.width,
                        "parameters": bench.count_parameters(model),
                        "flops_per_train_image": bench.flops_per_image(model)}
    peak = bench.device_peak_tflops(device)
    results["sweep"] = [bench.achieved(r, results["model"]["flops_per_train_image"], peak)
                        if r.get("images_per_s") else r
                        for r in sweep(params, generated, device, sizes, args.smoke)]
    baseline = bench.baseline_throughput(params.model, generated, params.train, device,
                                         params.base.seed, sizes["warmup_steps"], sizes["steps"])
    best = max((r for r in results["sweep"] if r.get("images_per_s")),
               key=lambda r: r["images_per_s"])
    results["baseline"] = baseline
    results["best"] = {**best, "vs_baseline": best["images_per_s"] / baseline["images_per_s"]}

    default = next(r for r in results["sweep"] if r.get("batch_size") == params.train.batch_size
                   and not r.get("compile") and r.get("images_per_s"))
    results["stage"] = bench.stage_wall_time(params, dev or generated, device,
                                             sizes["stage_epochs"], default["images_per_s"])

    results["time_to_accuracy"] = {}
    for name, data in (("dev_subset", dev), ("generated", generated)):
        if data is not None:
            results["time_to_accuracy"][name] = bench.time_to_accuracy(
                params, data, device, bench.SUBSET_TARGET_ACC, sizes["budget_seconds"])
    paper = dataclasses.replace(params, model=dataclasses.replace(params.model,
                                                                   arch="alexnet_paper"),
                                train=dataclasses.replace(params.train,
                                                          epochs=sizes["paper_epochs"]))
    results["alexnet_paper"] = bench.time_to_accuracy(paper, dev or generated, device,
                                                      bench.SUBSET_TARGET_ACC,
                                                      sizes["budget_seconds"])
    results["seconds"] = time.perf_counter() - started
    return results


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"### GPU proof: {results['device']} (torch {results['torch']}, CUDA "
             f"{results['cuda']}){' [smoke]' if results['smoke'] else ''}", "",
             f"`{results['model']['arch']}` width {results['model']['width']}, "
             f"{results['model']['parameters']:,} parameters, "
             f"{results['model']['flops_per_train_image'] / 1e9:.2f} GFLOP per training image",
             "", "| setting | images/s | TFLOP/s | % of bf16 peak |", "|---|---:|---:|---:|"]
    for r in results["sweep"]:
        label = f"trainer, batch {r['batch_size']}, compile {'on' if r['compile'] else 'off'}"
        peak = r.get("fraction_of_peak")
        lines.append(f"| {label} | {_fmt(r.get('images_per_s'), ',.0f')} | "
                     f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(peak and 100 * peak, '.1f')} |")
    base = results["baseline"]
    lines.append(f"| tutorial DataLoader loop, batch 128 | {base['images_per_s']:,.0f} | | |")
    stage = results["stage"]
    lines += ["", f"- best trainer setting: {results['best']['vs_baseline']:.1f}x the tutorial "
              "loop",
              f"- train stage, {stage['epochs']} epochs: {stage['wall_seconds']:.1f} s wall "
              f"against {stage['loop_seconds']:.1f} s of loop: overhead "
              f"{100 * stage['overhead']:.0f} % (checkpoint {stage['checkpoint_bytes'] / 1e6:.0f}"
              f" MB every {stage['checkpoint_seconds']:g} s; MLflow logging "
              f"{'on' if stage['mlflow_logging'] else 'not installed'})"]
    for name, tta in results["time_to_accuracy"].items():
        lines.append(f"- time to {tta['target_acc']:.2f} test accuracy on {name}: "
                     f"{_fmt(tta['seconds_to_target'], '.1f')} s (epoch "
                     f"{_fmt(tta['epoch_at_target'], 'd')}); best "
                     f"{_fmt(tta['best_acc_within_budget'], '.3f')} at epoch "
                     f"{_fmt(tta['epoch_of_best'], 'd')} of {tta['epochs_run']}")
    paper = results["alexnet_paper"]
    lines.append(f"- alexnet_paper (227 x 227), {paper['epochs_run']} epochs: best test accuracy "
                 f"{_fmt(paper['best_acc_within_budget'], '.3f')}, "
                 f"{_fmt(paper['seconds_of_best'], '.1f')} s")
    lines.append(f"- the whole proof: {results['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dev-archive", type=Path, help="the real CIFAR-10 dev subset archive")
    parser.add_argument("--device", help="cuda (default where present) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU rehearsal")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in results["device"])
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
