"""The evaluate stage: the trained model on the test split (the only code that reads it), with
accuracy, loss, per-class report and confusion matrices; the evaluated model logged to MLflow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from cifar_alexnet import tracking
from cifar_alexnet.config import Params
from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.core.model import FlipTTA
from cifar_alexnet.core.trainer import Accel, batched_logits, resolve_device, to_device
from cifar_alexnet.files import atomic_dir, atomic_path, write_json, write_text
from cifar_alexnet.plots import (confusion_figure, image_grid_figure, per_class_accuracy_figure,
                                 save)

from .artifacts import MODEL_URI_FILE, load_trained_model

log = logging.getLogger(__name__)

CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_PNG = "per_class_accuracy.png"
MISCLASSIFIED_PNG = "misclassified.png"
MISCLASSIFIED_SHOWN = 24
REPORT_CSV = "classification_report.csv"
# Everything reports/ holds (the stage replaces the directory whole).
REPORT_FILES = (REPORT_CSV, "classification_report.json", "classification_report.txt",
                "confusion_matrix.csv", "confusion_matrix_normalized.csv", "predictions.csv",
                CONFUSION_PNG, PER_CLASS_PNG, MISCLASSIFIED_PNG, MODEL_URI_FILE)
TEST = "test"  # metrics/evaluate.json holds {"test": {"accuracy": ..., ...}}, as MLflow test/*


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    report: dict[str, Any]        # sklearn classification_report(output_dict=True)
    report_text: str
    confusion: np.ndarray         # (C, C) counts, rows = true class
    confusion_normalized: np.ndarray
    predictions: np.ndarray
    confidence: np.ndarray        # softmax probability of each predicted class


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor,
                    class_names: Sequence[str]) -> Evaluation:
    """All test metrics from the model's logits (N, C) and the true labels (N,)."""
    loss = F.cross_entropy(logits.float(), labels).item()
    y_true = labels.cpu().numpy()
    y_pred = logits.argmax(1).cpu().numpy()
    classes = list(range(len(class_names)))
    metrics: dict[str, float] = {"accuracy": float((y_true == y_pred).mean()), "loss": loss}
    for average in ("macro", "weighted"):
        p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                      average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(p), f"{average}_recall": float(r),
                        f"{average}_f1": float(f1)})
    report = classification_report(y_true, y_pred, labels=classes, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    text = classification_report(y_true, y_pred, labels=classes, target_names=list(class_names),
                                 digits=4, zero_division=0)
    counts = confusion_matrix(y_true, y_pred, labels=classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    confidence = torch.softmax(logits.float(), 1).max(1).values.cpu().numpy()
    return Evaluation(metrics, report, text, counts, normalized, y_pred, confidence)


def most_confident_mistakes(evaluation: Evaluation, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` misclassified images, the most confident prediction first."""
    wrong = np.flatnonzero(evaluation.predictions != labels)
    return wrong[np.argsort(-evaluation.confidence[wrong], kind="stable")][:count]


def write_reports(evaluation: Evaluation, labels: np.ndarray, class_names: Sequence[str],
                  reports_dir: str | Path, images: np.ndarray | None = None) -> list[Path]:
    """Write the report files into ``reports_dir``; return their paths (for MLflow)."""
    out = Path(reports_dir)
    names = list(class_names)
    written: list[Path] = []

    def csv(name: str, frame: pd.DataFrame, index: bool = True) -> None:
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=index, float_format="%.6g")
        written.append(out / name)

    csv(REPORT_CSV, pd.DataFrame(evaluation.report).T.rename_axis("class"))
    write_json(out / "classification_report.json", evaluation.report)
    write_text(out / "classification_report.txt", evaluation.report_text)
    written += [out / "classification_report.json", out / "classification_report.txt"]
    csv("confusion_matrix.csv", pd.DataFrame(evaluation.confusion, index=names, columns=names)
        .rename_axis("true\\predicted"))
    csv("confusion_matrix_normalized.csv",
        pd.DataFrame(evaluation.confusion_normalized, index=names, columns=names)
        .rename_axis("true\\predicted"))
    # One row per test image, class names in both columns: DVC's confusion plot template.
    csv("predictions.csv", pd.DataFrame({"actual": np.asarray(names)[labels],
                                         "predicted": np.asarray(names)[evaluation.predictions],
                                         "confidence": evaluation.confidence}),
        index=False)
    figures = {CONFUSION_PNG: confusion_figure(evaluation.confusion,
                                               evaluation.confusion_normalized, names),
               PER_CLASS_PNG: per_class_accuracy_figure(
                   [evaluation.report[name]["recall"] for name in names], names,
                   evaluation.metrics["accuracy"])}
    if images is not None:
        worst = most_confident_mistakes(evaluation, labels, MISCLASSIFIED_SHOWN)
        figures[MISCLASSIFIED_PNG] = image_grid_figure(
            images[worst], [f"true {names[labels[i]]}\npred {names[evaluation.predictions[i]]}"
                            f" {evaluation.confidence[i]:.2f}" for i in worst],
            f"The {len(worst)} most confidently misclassified test images")
    for name, figure in figures.items():
        save(figure, out / name)
        written.append(out / name)
    return written


def evaluate_stage(params: Params, prepared_dir: Path, model_dir: Path, metrics_path: Path,
                   reports_dir: Path) -> dict[str, float]:
    """Score the best model on the test split; write reports; log them to the training run."""
    meta = load_meta(prepared_dir)
    test = load_split(prepared_dir, "test")
    device = resolve_device(params.train.device)
    model, payload = load_trained_model(model_dir)
    # Open the run first: if the store cannot be read, nothing has been written yet.
    with tracking.evaluation_run(params, payload["mlflow_run_id"],
                                 tracking.lineage_tags("evaluate", params.data.md5),
                                 payload["model_config"]) as run_id:
        # One module is evaluated, logged and served: the classifier, with flip TTA inside
        # when evaluate.flip_tta is on, so `mlflow models serve` answers what was scored here.
        tracking.log_dataset(params.data.url, params.data.md5, meta.sizes, "evaluation")
        evaluated = FlipTTA(model) if params.evaluate.flip_tta else model
        evaluated.to(device)
        images, labels = to_device(test.images, test.labels, device)
        logits = batched_logits(evaluated, images, params.evaluate.batch_size,
                         Accel.for_config(params.train, device))
        evaluation = evaluate_logits(logits, labels, meta.class_names)
        log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items()))
        # reports/ appears whole or not at all, with the model's URI in it: an evaluation
        # stopped half-way leaves the previous reports (or none), never a mix.
        with atomic_dir(reports_dir, replaces=REPORT_FILES) as staged:
            files = write_reports(evaluation, test.labels, meta.class_names, staged,
                                  images=test.images)
            model_uri = tracking.log_model(evaluated, test.images[:2], meta.class_names)
            tracking.log_metrics(evaluation.metrics, prefix="test/")
            tracking.log_files(files, "evaluation")
            tracking.log_dict({TEST: evaluation.metrics}, f"evaluation/{metrics_path.name}")
            logged = {"run_id": run_id, "model_uri": model_uri,
                      "trained_by_run_id": payload["mlflow_run_id"],
                      "flip_tta": params.evaluate.flip_tta}
            if params.mlflow.registered_model:
                promotion = tracking.register_and_gate(model_uri, params.mlflow.registered_model,
                                                       evaluation.metrics["accuracy"])
                log.info("%s", promotion.describe())
                logged["registered"] = {"name": promotion.name, "version": promotion.version,
                                        "alias": promotion.alias}
            write_json(staged / MODEL_URI_FILE, logged)
            write_json(metrics_path, {TEST: evaluation.metrics})  # `test.accuracy` in dvc exp show
    return evaluation.metrics
