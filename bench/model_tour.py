"""The seeds' model tour: every `model.arch` trained for the same budget on the same data, split
and recipe, and one table: parameters, forward MFLOP per image, training images/s (per-epoch validation
included), epochs, test accuracy (flip TTA per params) and macro F1.

    python bench/model_tour.py --archive cifar10-real-dev-subset.tar.gz --set model.width=0.25 \\
        --set train.epochs=3 --set train.device=cpu

Each arch trains with params.yaml's recipe (tuned values are not applied: one lr for all, so the
table compares architectures under one recipe, not each at its best). Torch, torchvision and
scikit-learn only (`PYTHONPATH=src` works).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from cifar_alexnet.config import ARCHS, load_params
from cifar_alexnet.core.model import count_parameters, forward_flops
from cifar_alexnet.core.trainer import Accel, batched_logits, fit, initial_model, resolve_device, \
    to_device
from cifar_alexnet.stages.evaluate import evaluate_logits
from cifar_alexnet.tools import throughput

log = logging.getLogger("model-tour")


def tour(params, data: throughput.BenchData, archs: list[str]) -> list[dict]:
    device = resolve_device(params.train.device)
    train = to_device(data.train_images, data.train_labels, device)
    val = to_device(data.val_images, data.val_labels, device)
    test_images, test_labels = to_device(data.test_images, data.test_labels, device)
    rows = []
    for arch in archs:
        run = dataclasses.replace(params, model=dataclasses.replace(params.model, arch=arch))
        model = initial_model(run.model, data.mean, data.std, seed=run.base.seed,
                              device=device)
        gflop = forward_flops(model) / 1e9
        started = time.perf_counter()
        result = fit(model, (train, val), run.train, seed=run.base.seed,
                     eval_batch_size=run.evaluate.batch_size)
        seconds = time.perf_counter() - started
        model.load_state_dict(result.best_state)
        logits = batched_logits(model, test_images, run.evaluate.batch_size,
                                Accel.for_config(run.train, device), flip_tta=run.evaluate.flip_tta)
        metrics = evaluate_logits(logits, test_labels, [str(i) for i in range(10)]).metrics
        epochs = len(result.history)
        rows.append({"arch": arch, "parameters": count_parameters(model), "gflop": gflop,
                     "images_per_s": epochs * len(data.train_labels) / seconds,
                     "epochs": epochs, "best_epoch": result.best_epoch,
                     "test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        log.info("%s: %s", arch, rows[-1])
    return rows


def table(rows: list[dict], params, data: throughput.BenchData) -> str:
    lines = [f"model tour: width {params.model.width}, {params.train.epochs} epochs, "
             f"lr {params.train.lr}, batch {params.train.batch_size}, {params.train.device}; "
             f"data {data.source} {data.sizes}", "",
             "| arch | parameters | MFLOP/image | images/s | epochs | test accuracy | macro F1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['arch']} | {r['parameters']:,} | {1000 * r['gflop']:.1f} | {r['images_per_s']:.0f} "
              f"| {r['epochs']} | {r['test_accuracy']:.3f} | {r['macro_f1']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", type=Path, help="an official-format archive")
    source.add_argument("--data", type=Path, help="a prepared dataset directory")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help="comma-separated (default: every model.arch)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    params = load_params(args.params, args.set)
    data = (throughput.load_archive(args.archive, params.data.val_size, params.base.seed)
            if args.archive else throughput.load_prepared(args.data))
    rows = tour(params, data, [a.strip() for a in args.archs.split(",") if a.strip()])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write(table(rows, params, data))


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
