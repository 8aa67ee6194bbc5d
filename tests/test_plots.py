"""The pictures a user looks at: whole-number epoch and trial axes, nothing cut off at the edge of
a saved PNG, the augmented training samples captioned and large enough to see."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from PIL import Image

from cifar_alexnet.best_params import DROPOUT, LR
from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.plots import history_figure, save
from cifar_alexnet.stages.train import AUGMENTED_SHOWN, augmented_samples_figure
from cifar_alexnet.tune.report import study_figures


def whole_numbers(ticks) -> bool:
    return all(float(t).is_integer() for t in ticks)


def border_is_blank(png) -> bool:
    """No drawn pixel on the outermost rows and columns: nothing was cut off at the edge."""
    pixels = np.asarray(Image.open(png).convert("L"))
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return bool((edges > 245).all())


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_training_curves_tick_whole_epochs(epochs, tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_acc": e / 10,
                "val_acc": e / 11} for e in range(1, epochs + 1)]
    figure = history_figure(history)
    for ax in figure.axes:
        assert whole_numbers(ax.get_xticks()), ax.get_xticks()
    save(figure, tmp_path / "curves.png")
    assert border_is_blank(tmp_path / "curves.png")


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    """A small real study whose parameter names are the long ones the plots must fit."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float(LR, 1e-4, 1e-2, log=True) * 10
                   - t.suggest_float(DROPOUT, 0.0, 0.7), n_trials=6)
    return study


def test_study_plots_tick_whole_trials_and_keep_every_label_inside(study, tmp_path):
    figures = study_figures(study)
    assert set(figures) == {"optimization_history.png", "param_importances.png",
                            "lr_dropout_contour.png"}
    assert whole_numbers(figures["optimization_history.png"].axes[0].get_xticks())
    for name, figure in figures.items():
        save(figure, tmp_path / name)
        assert border_is_blank(tmp_path / name), name


def test_augmented_samples_are_captioned_with_their_class_and_readable(archive, tmp_path):
    train = read_archive(archive.path).train
    names = [f"class {i}" for i in range(10)]
    figure = augmented_samples_figure(train.images, train.labels, names, seed=3)
    (grid,) = figure.axes
    assert [text.get_text() for text in grid.texts] == [names[i] for i in
                                                       train.labels[:AUGMENTED_SHOWN]]
    assert "augmentation" in figure.get_suptitle()
    save(figure, tmp_path / "samples.png")
    width, _ = Image.open(tmp_path / "samples.png").size
    assert width >= 8 * 100  # each 32-pixel sample shown at least 100 pixels wide
