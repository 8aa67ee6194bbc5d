"""``cifar-predict``: classify image files with the trained model, as evaluation would.

A model is ``models/`` (what the train stage wrote; flip TTA from ``evaluate.flip_tta``, as the
evaluate stage applies it), or any MLflow model URI: ``runs:/<run>/model``, ``models:/m-<id>``,
``models:/cifar10-alexnet@champion`` (the logged model already holds its TTA). Every picture is
decoded to RGB and fitted to 32 x 32 by :func:`cifar_alexnet.core.transforms.fit_to_input`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cifar_alexnet.cli import parse_params, run_stage, stage_parser
from cifar_alexnet.core.cifar10 import IMAGE_SHAPE
from cifar_alexnet.core.model import FlipTTA
from cifar_alexnet.core.train import Accel, predict, resolve_device
from cifar_alexnet.core.transforms import fit_to_input
from cifar_alexnet.errors import PipelineError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LOCAL_MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class Prediction:
    file: str
    classes: tuple[str, ...]          # top-k, most probable first
    probabilities: tuple[float, ...]


def image_files(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The files to classify (a directory: its image files, recursively, sorted), and a problem
    line for each path that does not exist or holds no image."""
    files, problems = [], []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                           and p.is_file())
            if not found:
                problems.append(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            files += found
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems


def read_image(path: Path) -> torch.Tensor:
    """A picture file as the model's input: uint8 (3, 32, 32), RGB, through Pillow (PNG, JPEG,
    GIF's first frame, WebP, BMP, TIFF ...; torchvision's own decoders are deprecated since
    0.29). Gray is replicated, a palette expanded; transparency is dropped, not composited."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            rgb = np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    return fit_to_input(torch.from_numpy(rgb.copy()).permute(2, 0, 1), IMAGE_SHAPE[1])


Scorer = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, 32, 32) -> logits (N, C)


def local_model(model_dir: Path, flip_tta: bool, device_name: str,
                batch_size: int) -> tuple[Scorer, list[str]]:
    """The model the train stage wrote, evaluated as the evaluate stage does."""
    from cifar_alexnet.stages.artifacts import load_trained_model

    model, payload = load_trained_model(model_dir)
    device = resolve_device(device_name)
    evaluated = (FlipTTA(model) if flip_tta else model).to(device)
    accel = Accel(device)
    return (lambda images: predict(evaluated, images.to(device), batch_size, accel).cpu(),
            list(payload["class_names"]))


def mlflow_model(model_uri: str) -> tuple[Scorer, list[str]]:
    from cifar_alexnet import tracking

    run, names = tracking.load_logged_model(model_uri)
    if names is None:
        from cifar_alexnet.core.cifar10 import OFFICIAL_CLASS_NAMES

        log.warning("%s was logged without class names; using CIFAR-10's", model_uri)
        names = list(OFFICIAL_CLASS_NAMES)
    return (lambda images: torch.from_numpy(run(images.numpy()))), list(names)


def classify(files: Sequence[Path], model: Scorer, class_names: Sequence[str], top_k: int,
             batch_size: int) -> tuple[list[Prediction], list[str]]:
    """Top-k predictions for every readable file, and a problem line for each unreadable one."""
    readable, images, problems = [], [], []
    for path in files:
        try:
            images.append(read_image(path))
            readable.append(path)
        except (ValueError, RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{path}: cannot be read as an image ({reason})")
    predictions = []
    k = min(top_k, len(class_names))
    for start in range(0, len(images), batch_size):
        batch = torch.stack(images[start:start + batch_size])
        probabilities = torch.softmax(model(batch).float(), 1)
        top = probabilities.topk(k, dim=1)
        for path, values, indices in zip(readable[start:start + batch_size], top.values,
                                         top.indices):
            predictions.append(Prediction(str(path), tuple(class_names[i] for i in indices),
                                          tuple(float(v) for v in values)))
    return predictions, problems


def render(predictions: Sequence[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"file": p.file, "predictions": [
            {"class": c, "probability": round(v, 6)} for c, v in zip(p.classes, p.probabilities)]}
            for p in predictions], indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "probability"])
        for p in predictions:
            for rank, (c, v) in enumerate(zip(p.classes, p.probabilities), 1):
                writer.writerow([p.file, rank, c, f"{v:.6f}"])
        return buffer.getvalue()
    if not predictions:
        return ""
    width = max(len("file"), *(len(p.file) for p in predictions))
    k = len(predictions[0].classes)
    header = f"{'file':<{width}}  " + "  ".join(f"{f'top-{i}':<18}" for i in range(1, k + 1))
    rows = [f"{p.file:<{width}}  " + "  ".join(f"{f'{c} {v:.3f}':<18}"
                                               for c, v in zip(p.classes, p.probabilities))
            for p in predictions]
    return "\n".join([header.rstrip(), *(r.rstrip() for r in rows)]) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files or directories")
    parser.add_argument("--model", default="models",
                        help="models/ directory or an MLflow model URI, e.g. "
                             "models:/cifar10-alexnet@champion (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (models/ only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise PipelineError("--top-k and --batch-size must be at least 1")
    files, problems = image_files(args.paths)
    if Path(args.model).is_dir() or ":" not in args.model:
        if not (Path(args.model) / LOCAL_MODEL_FILE).is_file():
            raise PipelineError(f"{args.model}/{LOCAL_MODEL_FILE} not found: run `dvc repro` "
                                "first, or pass --model an MLflow model URI such as "
                                "models:/cifar10-alexnet@champion")
        flip_tta = parse_params(args).evaluate.flip_tta
        model, names = local_model(Path(args.model), flip_tta, args.device, args.batch_size)
    else:
        model, names = mlflow_model(args.model)
    predictions, unreadable = classify(files, model, names, args.top_k, args.batch_size)
    sys.stdout.write(render(predictions, args.format))
    for problem in problems + unreadable:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems or unreadable else 0


def cli() -> None:
    def run() -> None:
        status = main()
        if status:
            sys.exit(status)

    run_stage(run)


if __name__ == "__main__":
    cli()
