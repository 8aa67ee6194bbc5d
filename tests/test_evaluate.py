"""Test-split metrics and reports: values checked against hand computation, files named by class."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cifar_alexnet.core.cifar10 import OFFICIAL_CLASS_NAMES
from cifar_alexnet.stages.evaluate import (evaluate_logits, most_confident_mistakes,
                                           write_reports)

NAMES = OFFICIAL_CLASS_NAMES[:3]


@pytest.fixture
def evaluation():
    # 6 samples, 3 classes: true [0,0,1,1,2,2], predicted [0,1,1,1,2,0].
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(predicted, 3).float() * 4.0
    return labels, logits, evaluate_logits(logits, labels, NAMES)


def test_metrics_match_hand_computed_values(evaluation):
    labels, logits, result = evaluation
    assert result.metrics["accuracy"] == pytest.approx(4 / 6)
    assert result.metrics["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item())
    # precision: class0 1/2, class1 2/3, class2 1/1; recall: 1/2, 1, 1/2
    precision = [1 / 2, 2 / 3, 1.0]
    recall = [1 / 2, 1.0, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert result.metrics["macro_precision"] == pytest.approx(np.mean(precision))
    assert result.metrics["macro_recall"] == pytest.approx(np.mean(recall))
    assert result.metrics["macro_f1"] == pytest.approx(np.mean(f1))
    assert result.metrics["weighted_f1"] == pytest.approx(np.mean(f1))  # balanced classes
    assert result.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert np.allclose(result.confusion_normalized.sum(axis=1), 1.0)
    assert result.report["automobile"]["recall"] == pytest.approx(1.0)


def test_reports_are_written_with_class_names(evaluation, tmp_path):
    labels, logits, result = evaluation
    files = write_reports(result, labels.numpy(), NAMES, tmp_path)
    assert {f.name for f in files} >= {"classification_report.csv", "confusion_matrix.png",
                                      "classification_report.json", "classification_report.txt",
                                      "confusion_matrix.csv", "predictions.csv"}
    report = pd.read_csv(tmp_path / "classification_report.csv", index_col="class")
    assert list(report.index[:3]) == list(NAMES)
    assert report.loc["airplane", "precision"] == pytest.approx(0.5)
    counts = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    assert list(counts.columns) == list(NAMES) and counts.values.tolist() == result.confusion.tolist()
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions.iloc[1][["actual", "predicted"]].tolist() == ["airplane", "automobile"]
    probabilities = torch.softmax(logits, 1)
    assert predictions["confidence"].tolist() == pytest.approx(
        probabilities.max(1).values.tolist(), abs=1e-6)
    assert "automobile" in (tmp_path / "classification_report.txt").read_text()
    assert json.loads((tmp_path / "classification_report.json").read_text())["accuracy"] == \
        pytest.approx(4 / 6)
    png = (tmp_path / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_pictures_show_per_class_accuracy_and_the_most_confident_mistakes(tmp_path):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.tensor([[3.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0], [0, 2.0, 0], [0, 0, 2.0],
                           [5.0, 0, 0]])  # wrong: image 1 (unsure), image 5 (very sure)
    result = evaluate_logits(logits, labels, NAMES)
    assert most_confident_mistakes(result, labels.numpy(), 24).tolist() == [5, 1]
    assert most_confident_mistakes(result, labels.numpy(), 1).tolist() == [5]
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    files = {f.name for f in write_reports(result, labels.numpy(), NAMES, tmp_path, images)}
    assert {"per_class_accuracy.png", "misclassified.png"} <= files
    for name in ("per_class_accuracy.png", "misclassified.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    # without the images there is no grid to draw
    assert "misclassified.png" not in {f.name for f in write_reports(
        result, labels.numpy(), NAMES, tmp_path / "no-images")}
