"""What a study hands on: best params, summary, trials CSV and plots, rewritten from its state."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from cifar_alexnet.best_params import (BEST_PARAMS_FILE, DROPOUT, LR, load_best_params,
                                      write_best_params)
from cifar_alexnet.config import Params
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.files import atomic_path, write_json, write_text
from cifar_alexnet.plots import integer_x_axis, save as save_figure
from cifar_alexnet.redact import redact_url

from .study import retried_trial_numbers, configured_storage, progress

log = logging.getLogger(__name__)

SUMMARY_FILE, STUDY_FILE, TRIALS_FILE, PLOTS_DIR = (
    "summary.json", "study.json", "trials.csv", "plots")
TUNING_OFF_NOTE = "tuning_off.txt"  # what plots/ holds while tuning is off


def summarize(study: optuna.Study, params: Params) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    state = progress(study)
    retried = retried_trial_numbers(trials)
    counted = [t for t in trials if t.state.is_finished()
               and not (t.state == TrialState.FAIL and t.number in retried)]
    epochs_spent = sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials)
    best = _best_trial(study)
    return {
        "study_name": study.study_name,
        "storage": redact_url(configured_storage(params)),
        "metric": params.tune.metric,
        "direction": params.tune.direction,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        # How far the best trial leads the runner-up: a lead within the noise of the metric
        # (a few validation images) means another run could pick the other trial.
        "best_margin": best_margin(study),
        "trials_complete": state.complete,
        "trials_pruned": state.pruned,
        "trials_failed": state.failed,
        "trials_retried": len(retried),
        "trials_running": state.running,
        "epochs_per_trial": params.tune.epochs_per_trial,
        # every epoch any trial ran, including trials that failed or were retried
        "epochs_spent": epochs_spent,
        "epochs_without_pruning": len(counted) * params.tune.epochs_per_trial,
    }


def best_margin(study: optuna.Study) -> float | None:
    """|best - runner-up| over the COMPLETE trials; None with fewer than two."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = sorted((t.value for t in complete),
                    reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    return abs(values[0] - values[1]) if len(values) >= 2 else None


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None


def write_outputs(study: optuna.Study, params: Params, out_dir: Path,
                  log_to_mlflow: bool = True) -> dict[str, Any]:
    """best_params.yaml, summary.json, study.json, trials.csv and plots/ under ``out_dir``, all
    rewritten from the study's current state; logged to the active MLflow run."""
    summary = summarize(study, params)
    if summary["best_trial"] is None:  # raised inside the study run: it is marked FAILED
        state = progress(study)
        raise PipelineError(
            f"study {study.study_name} has no completed trial ({state.pruned} pruned, "
            f"{state.failed} failed; `cifar-study export trials.csv` lists them with their "
            "fail_reason). Lower tune.lr_high if losses diverged, or raise tune.n_trials or "
            "tune.epochs_per_trial")
    write_trials_csv(study, out_dir / TRIALS_FILE)
    # Each plot is drawn once, into a directory of this process's own: the run logs those
    # files and plots/ gets copies. (A second worker in the same directory may be replacing
    # plots/ at any moment: logging from there could miss a file.)
    with tempfile.TemporaryDirectory(prefix="study-plots-") as drawn:
        plots = draw_plots(study_figures(study), Path(drawn))
        if log_to_mlflow:
            # imported here, not above: reading a study (`cifar-study best`) needs no MLflow
            from cifar_alexnet import tracking

            tracking.log_files(plots, "tune/plots")
        install_plots(plots, out_dir / PLOTS_DIR)
    write_best_params(out_dir / BEST_PARAMS_FILE, summary["best_params"],
                      summary["study_name"], summary["best_trial"], summary["metric"],
                      summary["best_value"])
    write_summary(out_dir, summary)
    if log_to_mlflow:
        tracking.log_files([out_dir / BEST_PARAMS_FILE, out_dir / SUMMARY_FILE,
                            out_dir / STUDY_FILE, out_dir / TRIALS_FILE], "tune")
    return summary


def write_disabled(out_dir: Path) -> None:
    """tune.n_trials: 0. Empty best params (training uses params.yaml), a summary that says so.

    Tuned values already in ``out_dir`` (from an earlier tune stage or a `cifar-study run`) are
    replaced, as asked, but not silently: the study still holds their trials."""
    previous = out_dir / BEST_PARAMS_FILE
    if previous.is_file():
        with contextlib.suppress(PipelineError):
            values, info = load_best_params(previous)
            if values:
                log.warning(
                    "tune.n_trials is 0: tuning is off, so the tuned %s (study %s, trial %s) in "
                    "%s are replaced by none and training uses params.yaml. The study keeps its "
                    "trials: set tune.n_trials back to at least 1 to train with them again",
                    ", ".join(f"{k}={v:.6g}" for k, v in values.items()),
                    info.get("study_name"), info.get("best_trial"), previous)
    write_best_params(out_dir / BEST_PARAMS_FILE, {}, None, None)
    write_summary(out_dir, {"study_name": None, "trials_complete": 0,
                            "note": "tune.n_trials is 0; tuning skipped"})
    # Not empty files: DVC warns about an empty output ("'tune/plots' is empty").
    write_text(out_dir / TRIALS_FILE, "number,value,state\n")
    _clear_plots(out_dir / PLOTS_DIR)
    write_text(out_dir / PLOTS_DIR / TUNING_OFF_NOTE,
               "No plots: tuning is off (tune.n_trials: 0 in params.yaml).\n")


# summary.json, a DVC metric, holds what the study found; the rest of the summary (names,
# storage, direction, trial and epoch counts) goes to study.json: strings become columns
# thousands of characters wide in `dvc exp show`, and counters would crowd out the results.
STUDY_RESULT = ("best_value", "best_trial", "best_margin")


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    """summary.json (the study's result: best value, trial and lead) and study.json (the
    rest). The best params themselves are in best_params.yaml."""
    write_json(out_dir / SUMMARY_FILE, {k: summary.get(k) for k in STUDY_RESULT})
    write_json(out_dir / STUDY_FILE, {k: v for k, v in summary.items()
                                      if k not in (*STUDY_RESULT, "best_params")})


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs",
                                          "datetime_start", "datetime_complete", "duration"))
    write_text(path, frame.to_csv(index=False))


def _clear_plots(plot_dir: Path) -> None:
    """An empty plots/: it persists across runs (dvc.yaml), and a plot that cannot be drawn
    now must not be left from an earlier study."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*plot_dir.glob("*.png"), plot_dir / TUNING_OFF_NOTE]:
        stale.unlink(missing_ok=True)


def study_figures(study: optuna.Study) -> dict[str, Figure]:
    """History (ticks at whole trial numbers), importances and an lr x dropout contour, by file
    name; a plot the study is too small for is skipped with a log line (importances need 2+
    completed trials)."""
    from optuna.visualization import matplotlib as optuna_plots

    makers = {"optimization_history.png": lambda: optuna_plots.plot_optimization_history(study),
              "param_importances.png": lambda: optuna_plots.plot_param_importances(study)}
    searched = {name for t in study.get_trials(deepcopy=False) for name in t.params}
    if {LR, DROPOUT} <= searched:  # an architecture without dropout searches lr alone
        makers["lr_dropout_contour.png"] = lambda: optuna_plots.plot_contour(
            study, params=[LR, DROPOUT])
    figures = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("skipping %s: %s", name, exc)
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        figure.set_size_inches(8, 6)
        if name == "optimization_history.png":
            integer_x_axis(figure)
        figures[name] = figure
    return figures


def draw_plots(figures: Mapping[str, Figure], directory: Path) -> list[Path]:
    """:func:`study_figures` as PNG files in ``directory``; their paths."""
    for name, figure in figures.items():
        save_figure(figure, directory / name)
    return [directory / name for name in figures]


def install_plots(files: Sequence[Path], plot_dir: Path) -> None:
    """``plot_dir`` holds copies of ``files``, each written whole, and no earlier plot."""
    _clear_plots(plot_dir)
    for file in files:
        with atomic_path(plot_dir / file.name) as tmp:
            shutil.copyfile(file, tmp)
