"""Test-split metrics and reports: accuracy, loss, per-class report, confusion matrices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from .io import atomic_path, write_json, write_text
from .plots import confusion_figure, save

CONFUSION_PNG = "confusion_matrix.png"
REPORT_CSV = "classification_report.csv"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    report: dict[str, Any]        # sklearn classification_report(output_dict=True)
    report_text: str
    confusion: np.ndarray         # (C, C) counts, rows = true class
    confusion_normalized: np.ndarray
    predictions: np.ndarray


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
    return Evaluation(metrics, report, text, counts, normalized, y_pred)


def write_reports(evaluation: Evaluation, labels: np.ndarray, class_names: Sequence[str],
                  reports_dir: str | Path) -> list[Path]:
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
                                         "predicted": np.asarray(names)[evaluation.predictions]}),
        index=False)
    save(confusion_figure(evaluation.confusion, evaluation.confusion_normalized, names),
         out / CONFUSION_PNG)
    written.append(out / CONFUSION_PNG)
    return written
