"""Matplotlib figures for reports and MLflow artifacts (Agg backend: no display needed)."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .io import atomic_path  # noqa: E402


def confusion_figure(counts: np.ndarray, normalized: np.ndarray,
                     class_names: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(17, 7.5), constrained_layout=True)
    for ax, matrix, title, fmt in ((axes[0], counts, "counts", "d"),
                                   (axes[1], normalized, "row-normalised", ".2f")):
        image = ax.imshow(matrix, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({title})")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                    color="white" if value > threshold else "black")
    return fig


def history_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, train vs validation."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o",
                    label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_title("Loss")
    acc_ax.set_title("Accuracy")
    return fig


def save(fig: Figure, path) -> None:
    """Write ``fig`` as PNG atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
