"""Matplotlib figures for reports and MLflow artifacts.

Figures are made as ``matplotlib.figure.Figure`` objects, not through pyplot: they need no GUI
backend and no display, and making them changes no process-wide matplotlib state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifar_alexnet.files import atomic_path


def confusion_figure(counts: np.ndarray, normalized: np.ndarray,
                     class_names: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    fig = Figure(figsize=(17, 7.5), layout="constrained")
    axes = fig.subplots(1, 2)
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
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
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
    integer_x_axis(fig)
    return fig


def per_class_accuracy_figure(accuracies: Sequence[float], class_names: Sequence[str],
                              overall: float) -> Figure:
    """Accuracy on each true class (its recall) as bars, the overall accuracy as a line."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(class_names)), accuracies, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.2f}" for a in accuracies], fontsize=8)
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.3f}")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy (recall)")
    ax.set_title("Test accuracy per class")
    ax.legend(loc="lower right")
    return fig


# The image grid in inches: each cell is this wide, its image square, its caption below it.
_CELL_INCHES = 1.8
_CAPTION_INCHES = 0.45
_TITLE_INCHES = 0.4


def image_grid_figure(images: np.ndarray, captions: Sequence[str], title: str,
                      columns: int = 6) -> Figure:
    """uint8 images (N, 3, H, W) in a grid, each with its caption below; an empty grid says so.

    One axes shows one mosaic of the images, the captions are text on it: with an axes per
    image (and the layout engine placing each), saving a grid of 32 took 0.7 s, most of what
    a stage spends on its figures."""
    rows = max(1, -(-len(images) // columns))
    height, width = images.shape[2:] if len(images) else (32, 32)
    gap = max(1, width // 8)  # pixels between images
    cell_w = width + gap
    caption_px = round(cell_w * _CAPTION_INCHES / _CELL_INCHES)
    cell_h = height + caption_px
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, np.uint8)
    fig = Figure(figsize=(columns * _CELL_INCHES,
                          rows * _CELL_INCHES * cell_h / cell_w + _TITLE_INCHES))
    ax = fig.add_axes((0, 0, 1, 1 - _TITLE_INCHES / fig.get_figheight()))
    ax.axis("off")
    for i, (image, caption) in enumerate(zip(images, captions)):
        top, left = (i // columns) * cell_h, (i % columns) * cell_w + gap // 2
        mosaic[top:top + height, left:left + width] = np.transpose(image, (1, 2, 0))
        ax.text(left + width / 2, top + height + 1, caption, ha="center", va="top", fontsize=8)
    ax.imshow(mosaic, interpolation="nearest")
    if not len(images):
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return fig


def integer_x_axis(fig: Figure) -> None:
    """Ticks at whole numbers only on every x axis of ``fig`` (epochs, trial numbers)."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig: Figure, path) -> None:
    """Write ``fig`` as PNG atomically and free it (also a pyplot figure, such as Optuna's).

    ``bbox_inches="tight"`` grows the saved area to every label: Optuna's figures lay
    themselves out for their own size, and long parameter names were cut off at the edge."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    if fig.canvas.manager is not None:  # made by pyplot, which keeps it until closed
        import matplotlib.pyplot as plt

        plt.close(fig)
