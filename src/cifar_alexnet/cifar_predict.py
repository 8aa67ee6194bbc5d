"""``cifar-predict``: classify image files with the trained model, as evaluation would.

A model is ``models/`` (what the train stage wrote; flip TTA from ``evaluate.flip_tta``, as the
evaluate stage applies it), or any MLflow model URI: ``runs:/<run>/model``, ``models:/m-<id>``,
``models:/cifar10-alexnet@champion`` (the logged model already holds its TTA). Every picture is
decoded as a person would see it (:mod:`cifar_alexnet.pictures`: regular files only, size and
aspect caps, big pictures shrunk while decoding) and fitted to 32 x 32 by
:func:`cifar_alexnet.core.transforms.fit_to_input`. Results stream out a batch at a time.

torch, numpy, Pillow and MLflow are imported where they are used, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TextIO

from cifar_alexnet.stage_runner import parse_params, run_stage, stage_parser
from cifar_alexnet.core.cifar10 import IMAGE_SHAPE
from cifar_alexnet.errors import PipelineError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LOCAL_MODEL_FILE = "model.pt"
INTERRUPTED = ("interrupted; the results printed so far are complete (JSON output is closed, "
               "so it parses), the files after them were not classified: run it again to "
               "classify them")


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
    0.29). Gray is replicated, a palette expanded; transparency is dropped, not composited.
    Decoded at most at twice the input size (:func:`cifar_alexnet.pictures.decode_picture`);
    PictureError (a ValueError) says why a file cannot be classified."""
    import torch

    from cifar_alexnet.core.transforms import fit_to_input
    from cifar_alexnet.pictures import decode_picture

    size = IMAGE_SHAPE[1]
    rgb = decode_picture(path, min_side=2 * size)
    return fit_to_input(torch.from_numpy(rgb).permute(2, 0, 1), size)


Scorer = Callable[["torch.Tensor"], "torch.Tensor"]  # uint8 (N, 3, 32, 32) -> logits (N, C)


def local_model(model_dir: Path, flip_tta: bool, device_name: str,
                batch_size: int) -> tuple[Scorer, list[str]]:
    """The model the train stage wrote, evaluated as the evaluate stage does."""
    from cifar_alexnet.core.model import FlipTTA
    from cifar_alexnet.core.trainer import Accel, batched_logits, resolve_device
    from cifar_alexnet.stages.artifacts import load_trained_model

    model, payload = load_trained_model(model_dir)
    device = resolve_device(device_name)
    evaluated = (FlipTTA(model) if flip_tta else model).to(device)
    accel = Accel(device)
    return (lambda images: batched_logits(evaluated, images.to(device), batch_size, accel).cpu(),
            list(payload["class_names"]))


def mlflow_model(model_uri: str) -> tuple[Scorer, list[str]]:
    import torch

    from cifar_alexnet import tracking

    run, names = tracking.load_logged_model(model_uri)
    if names is None:
        from cifar_alexnet.core.cifar10 import OFFICIAL_CLASS_NAMES

        log.warning("%s was logged without class names; using CIFAR-10's", model_uri)
        names = list(OFFICIAL_CLASS_NAMES)
    return (lambda images: torch.from_numpy(run(images.numpy()))), list(names)


def classify(files: Iterable[Path], model: Scorer, class_names: Sequence[str], top_k: int,
             batch_size: int, problem: Callable[[str], None]) -> Iterator[list[Prediction]]:
    """Top-k predictions, a list per ``batch_size`` readable files, each as soon as it is scored;
    only that batch's pictures are held. Each file that cannot be classified is passed to
    ``problem`` as one line (the file, why) when it is met."""
    import torch

    from cifar_alexnet.pictures import PictureError

    k = min(top_k, len(class_names))

    def scored(paths: list[Path], images: list[torch.Tensor]) -> list[Prediction]:
        probabilities = torch.softmax(model(torch.stack(images)).float(), 1)
        top = probabilities.topk(k, dim=1)
        return [Prediction(str(path), tuple(class_names[i] for i in indices),
                           tuple(float(v) for v in values))
                for path, values, indices in zip(paths, top.values, top.indices)]

    paths: list[Path] = []
    images: list[torch.Tensor] = []
    for path in files:
        try:
            images.append(read_image(path))
        except PictureError as exc:
            problem(f"{path}: {exc}")
            continue
        paths.append(path)
        if len(images) == batch_size:
            yield scored(paths, images)
            paths, images = [], []
    if images:
        yield scored(paths, images)


class Report:
    """Predictions written to ``out`` in a format as they come, flushed a batch at a time. What
    is written is final: a batch is written whole (Ctrl-C and SIGTERM wait for it), and close()
    ends the document (JSON's closing bracket) even after an interruption."""

    def __init__(self, out: TextIO, fmt: str, top_k: int, width: int) -> None:
        self.out, self.fmt, self.top_k, self.width = out, fmt, top_k, width
        self.written = 0
        if fmt == "csv":
            self._emit("file,rank,class,probability\n")

    def write(self, predictions: Sequence[Prediction]) -> None:
        if not predictions:
            return
        text = "".join(self._item(p, self.written + i) for i, p in enumerate(predictions))
        self.written += len(predictions)
        self._emit(text)

    def close(self) -> None:
        if self.fmt == "json":
            self._emit("\n]\n" if self.written else "[]\n")

    def _item(self, p: Prediction, index: int) -> str:
        if self.fmt == "json":  # the text json.dumps(all, indent=2) gives, an item at a time
            item = {"file": p.file, "predictions": [
                {"class": c, "probability": round(v, 6)} for c, v in zip(p.classes,
                                                                         p.probabilities)]}
            return ("[\n" if index == 0 else ",\n") + textwrap.indent(
                json.dumps(item, indent=2), "  ")
        if self.fmt == "csv":
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(
                [p.file, rank, c, f"{v:.6f}"]
                for rank, (c, v) in enumerate(zip(p.classes, p.probabilities), 1))
            return buffer.getvalue()
        header = ""
        if index == 0:
            header = (f"{'file':<{self.width}}  " + "  ".join(
                f"{f'top-{i}':<18}" for i in range(1, self.top_k + 1))).rstrip() + "\n"
        row = f"{p.file:<{self.width}}  " + "  ".join(
            f"{f'{c} {v:.3f}':<18}" for c, v in zip(p.classes, p.probabilities))
        return header + row.rstrip() + "\n"

    def _emit(self, text: str) -> None:
        # An interruption inside a large write would drop the rest of it (and leave half a JSON
        # item): the signals wait until the text is out, then interrupt between batches.
        signals = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals) \
            if hasattr(signal, "pthread_sigmask") else None
        try:
            self.out.write(text)
            self.out.flush()
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files or directories")
    parser.add_argument("--model", default="models",
                        help="models/ directory or an MLflow model URI, e.g. "
                             "models:/cifar10-alexnet@champion (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="pictures decoded and scored at a time; results are printed after "
                             "each batch (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (models/ only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise PipelineError("--top-k and --batch-size must be at least 1")
    files, problems = image_files(args.paths)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    if Path(args.model).is_dir() or ":" not in args.model:
        if not (Path(args.model) / LOCAL_MODEL_FILE).is_file():
            raise PipelineError(f"{args.model}/{LOCAL_MODEL_FILE} not found: run `dvc repro` "
                                "first, or pass --model an MLflow model URI such as "
                                "models:/cifar10-alexnet@champion")
        flip_tta = parse_params(args).evaluate.flip_tta
        model, names = local_model(Path(args.model), flip_tta, args.device, args.batch_size)
    else:
        model, names = mlflow_model(args.model)

    from tqdm import tqdm

    unreadable = []

    def report_problem(line: str) -> None:
        unreadable.append(line)
        tqdm.write(f"error: {line}", file=sys.stderr)  # above the progress bar, if one is shown

    width = max([len("file"), *(len(str(f)) for f in files)])
    report = Report(sys.stdout, args.format, min(args.top_k, len(names)), width)
    try:
        # The bar (on stderr) only where stderr is a terminal: disable=None.
        with tqdm(files, desc="classifying", unit="file", file=sys.stderr,
                  disable=None) as progress:
            for batch in classify(progress, model, names, args.top_k, args.batch_size,
                                  report_problem):
                report.write(batch)
    finally:
        report.close()
    return 1 if problems or unreadable else 0


def cli() -> None:
    def run() -> None:
        try:
            status = main()
        except BrokenPipeError:
            # The reader went away (`cifar-predict … | head`): stop quietly, as other shell
            # tools do, with the rest of stdout going nowhere (Python flushes it at exit).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        if status:
            sys.exit(status)

    run_stage(run, interrupted=INTERRUPTED)


if __name__ == "__main__":
    cli()
