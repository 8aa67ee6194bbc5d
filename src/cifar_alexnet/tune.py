"""Optuna study over ``train.lr`` and ``model.dropout``, scored on the validation split only.

Tuning wraps training: each trial is one :func:`train.fit` of ``tune.epochs_per_trial`` epochs
whose per-epoch validation metric is reported to the pruner. A study lives in an SQLAlchemy
storage (SQLite file by default, PostgreSQL for many machines) so it survives crashes and can be
shared by any number of worker processes; heartbeats let a later process fail and retry trials
whose worker was killed. Every invocation is one parent MLflow run with a nested run per trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from . import tracking
from .best_params import BEST_PARAMS_FILE, DROPOUT, LR, tuned_params, write_best_params
from .config import Params
from .errors import ConfigError, PipelineError
from .io import write_json, write_text
from .model import build_model
from .plots import save as save_figure
from .prepare import load_meta, load_split
from .redact import redact_url
from .train import TrainingDiverged, fit, resolve_device, seed_everything, to_device
from .workspace import resolve_sqlite_url

log = logging.getLogger(__name__)
# Heartbeats, stale-trial retries and the matplotlib plots are documented Optuna features that
# still carry the "experimental" label (since 2.8/2.9); the warnings say nothing actionable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)



class _OutageWithoutTraceback(logging.Filter):
    """Optuna logs a failed trial's traceback; for a tracking outage the stage's own one-line
    error says everything (what failed, that nothing is lost, what to run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], tracking.TrackingUnavailable):
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_OutageWithoutTraceback())

STORAGE_ENV = "CIFAR_TUNE_STORAGE"
SUMMARY_FILE, STUDY_FILE, TRIALS_FILE, PLOTS_DIR = (
    "summary.json", "study.json", "trials.csv", "plots")
GRACE_HEARTBEATS = 3  # a RUNNING trial whose heartbeat is this many intervals old is dead
MAX_RETRIES = 3
STORAGE_ATTEMPTS = 4

# Settings that change how fast a trial runs, not what it computes; workers on different
# hardware (CPU, GPU) can share one study.
_HARDWARE_KEYS = {"device", "precision", "channels_last", "cudnn_benchmark", "fused_optimizer",
                  "compile"}
# Settings of the tune section that do not change what a trial is.
_RUN_KEYS = {"n_trials", "storage", "study_name", "heartbeat_seconds"}


def storage_url(params: Params) -> str:
    """$CIFAR_TUNE_STORAGE or tune.storage; a relative SQLite path is relative to the project
    root, also when DVC runs the stage in a temporary experiment copy."""
    return resolve_sqlite_url(configured_storage(params))


def configured_storage(params: Params) -> str:
    """The storage as the user gave it ($CIFAR_TUNE_STORAGE or tune.storage), unresolved."""
    return os.environ.get(STORAGE_ENV) or params.tune.storage


def study_fingerprint(params: Params) -> dict[str, Any]:
    """What a trial's result depends on; a study must not mix trials of different ones."""
    tree = params.to_dict()
    return {
        "data": {"md5": params.data.md5, "val_size": params.data.val_size},
        "base": {"seed": params.base.seed},
        "model": {k: v for k, v in tree["model"].items() if k != "dropout"},
        "train": {k: v for k, v in tree["train"].items()
                  if k not in _HARDWARE_KEYS | {"lr", "epochs"}},
        "tune": {k: v for k, v in tree["tune"].items() if k not in _RUN_KEYS},
    }


def _digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]


def study_name(params: Params) -> str:
    """``auto`` names the study after its fingerprint, so a changed search starts a new study."""
    if params.tune.study_name != "auto":
        return params.tune.study_name
    return f"{params.mlflow.experiment}-{params.model.arch}-{_digest(study_fingerprint(params))}"


def make_storage(url: str, heartbeat_seconds: int) -> RDBStorage:
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                grace_period=GRACE_HEARTBEATS * heartbeat_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRIES))
        except Exception as exc:  # SQLAlchemy/driver errors have no common base worth naming
            # Workers started together on an empty database race to create Optuna's tables
            # (PostgreSQL: duplicate key on CREATE TYPE); the loser finds them made on a retry.
            if attempt < STORAGE_ATTEMPTS:
                log.info("opening %s failed (%s); retrying", redact_url(url),
                         type(exc).__name__)
                time.sleep(attempt + random.random())
                continue
            raise PipelineError(f"cannot open the study storage {redact_url(url)}: {exc}. "
                                f"Check tune.storage (or ${STORAGE_ENV}) and that the database "
                                "server is reachable") from None
    raise AssertionError("unreachable")


def make_sampler(params: Params, seed: int) -> optuna.samplers.BaseSampler:
    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    if params.tune.pruner == "median":
        # Judge a trial only after its one-cycle warm-up (a quarter of its epochs): while the
        # lr is still rising, a trial that will end well can look poor. Needs 3 finished trials.
        return optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=math.ceil(params.tune.epochs_per_trial / 4))
    if params.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource=params.tune.epochs_per_trial)
    return optuna.pruners.NopPruner()


def open_study(params: Params, worker_id: int = 0, create: bool = True) -> optuna.Study:
    """Create or load the study; refuse a study that was made for different settings. Its
    sampler is seeded for the next trial (:func:`reseed`)."""
    url, name = storage_url(params), study_name(params)
    storage = make_storage(url, params.tune.heartbeat_seconds)
    fingerprint = study_fingerprint(params)
    if create:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    direction=params.tune.direction, pruner=make_pruner(params))
    else:
        try:
            study = optuna.load_study(study_name=name, storage=storage,
                                      pruner=make_pruner(params))
        except KeyError:
            raise PipelineError(f"no study named {name!r} in {redact_url(url)}; start it with "
                                "`cifar-study run`") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        changed = sorted(f"{section}.{key}" for section in fingerprint
                         for key in set(fingerprint[section]) | set(stored.get(section, {}))
                         if fingerprint[section].get(key) != stored.get(section, {}).get(key))
        raise ConfigError(
            f"study {name!r} in {redact_url(url)} was created with different settings "
            f"({', '.join(changed)}); its trials would not be comparable. Set tune.study_name "
            "to a new name (or `auto`), or delete the study with "
            f"`optuna delete-study --study-name {name} --storage <url>`")
    reseed(study, params, worker_id)
    return study


def reseed(study: optuna.Study, params: Params, worker_id: int = 0) -> None:
    """Seed the sampler for the study's next trial from (``tune.seed``, the number of trials
    finished so far, the worker id) alone. The suggestion then depends only on those and the
    finished trials TPE learns from, so a study that crashed and was resumed suggests what an
    uninterrupted one would have (a retried trial reruns its own params), and concurrent
    workers, seeded apart, do not draw the same values."""
    finished = progress(study).finished
    seed = (params.tune.seed + finished + 1_000_003 * worker_id) % 2**32  # numpy: 32 bits
    study.sampler = make_sampler(params, seed)


# --- trial bookkeeping -------------------------------------------------------------------------

def _retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Failed trials that a later trial re-runs (heartbeat retry or interrupted-trial retry)."""
    numbers = set()
    for t in trials:
        # A retry of a retry records the whole chain in retry_history, not only the original.
        numbers.update(int(n) for n in t.system_attrs.get("retry_history", []))
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        if original is None:
            original = t.user_attrs.get("retry_of")
        if original is not None:
            numbers.add(int(original))
    return numbers


@dataclass(frozen=True)
class Progress:
    complete: int
    pruned: int
    failed: int       # failed for good (diverged, or out of retries), not the retried ones
    running: int
    waiting: int      # queued retries

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    count = {state: 0 for state in TrialState}
    for t in trials:
        if not (t.state == TrialState.FAIL and t.number in retried):
            count[t.state] += 1
    return Progress(count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                    count[TrialState.RUNNING], count[TrialState.WAITING])


def recover(study: optuna.Study, handled: set[int]) -> None:
    """Fail trials of dead workers (stale heartbeat) and retry them; close their MLflow runs.

    Trials interrupted by Ctrl-C/SIGTERM are marked failed by Optuna itself; they are retried
    here too, since nothing was wrong with their parameters. ``handled`` holds the numbers of
    failed trials this process has already dealt with, so each costs MLflow calls only once.
    """
    optuna.storages.fail_stale_trials(study)  # its heartbeat callback enqueues the retry
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    for t in trials:
        if t.state != TrialState.FAIL or "fail_reason" in t.user_attrs or t.number in handled:
            continue  # not failed, failed for its own reason (diverged), or already seen
        handled.add(t.number)
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.info("trial %d was interrupted; queued again", t.number)
        runs = [t.user_attrs.get("mlflow_run_id"), t.user_attrs.get("mlflow_parent_run_id")]
        killed = tracking.mark_killed([r for r in runs if r])
        if killed:
            log.info("trial %d's worker died; marked MLflow run(s) %s KILLED", t.number,
                     ", ".join(killed))


# --- the objective -----------------------------------------------------------------------------

class _TrialReporter:
    """fit() callback: report each epoch's metric to the trial and stop it when pruned."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        self.trial.set_user_attr("epochs_run", epoch)
        self.trial.report(row[self.metric], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric} "
                                     f"{row[self.metric]:.4f} is below the pruner's bar")


class Objective:
    """Train on the train split with a trial's lr and dropout; return the best val metric."""

    def __init__(self, params: Params, prepared_dir: Path, study_name: str,
                 parent_run_id: str) -> None:
        self.params, self.study_name, self.parent_run_id = params, study_name, parent_run_id
        self.device = resolve_device(params.train.device)
        self.meta = load_meta(prepared_dir)
        train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
        # Loaded onto the device once for the whole study.
        self.train = to_device(train.images, train.labels, self.device)
        self.val = to_device(val.images, val.labels, self.device)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._train(trial)
        except (KeyboardInterrupt, SystemExit, tracking.TrackingUnavailable):
            # Not the trial's fault: the next run queues it again before counting (recover), so
            # it never counts as a finished trial toward tune.n_trials.
            trial.set_user_attr("interrupted", True)
            raise

    def _train(self, trial: optuna.Trial) -> float:
        tune = self.params.tune
        values = {LR: trial.suggest_float(LR, tune.lr_low, tune.lr_high, log=True),
                  DROPOUT: trial.suggest_float(DROPOUT, tune.dropout_low, tune.dropout_high)}
        params = tuned_params(self.params, values)
        cfg = dataclasses.replace(params.train, epochs=tune.epochs_per_trial)
        outcome: BaseException | None = None
        # Before the trial's run starts: if the store fails, the next run closes the parent.
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        with tracking.trial_run(self.study_name, trial.number, values) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            seed_everything(params.base.seed, self.device)  # same init for every trial
            model = build_model(params.model, self.meta.mean, self.meta.std).to(self.device)
            try:
                result = fit(model, self.train, self.val, cfg, params.base.seed,
                             callbacks=[tracking.EpochLogger(), _TrialReporter(trial, tune.metric)],
                             eval_batch_size=params.evaluate.batch_size)
            except optuna.TrialPruned as exc:
                tracking.set_tags({"optuna.state": "PRUNED", "optuna.reason": str(exc)})
                outcome = exc
            except TrainingDiverged as exc:
                trial.set_user_attr("fail_reason", str(exc))
                tracking.set_tags({"optuna.state": "FAIL", "optuna.reason": str(exc)})
                raise
            except (KeyboardInterrupt, SystemExit):
                tracking.set_tags({"optuna.state": "INTERRUPTED"})
                raise
            else:
                history = result.history
                value = (result.best_val_acc if tune.metric == "val_acc"
                         else min(r["val_loss"] for r in history))
                tracking.set_tags({"optuna.state": "COMPLETE"})
                tracking.log_metrics({"best_val_acc": result.best_val_acc,
                                      "best_epoch": result.best_epoch})
        if outcome is not None:
            raise outcome  # outside the MLflow run: a pruned trial's run is FINISHED, not FAILED
        log.info("trial %d: %s %.4f with %s", trial.number, tune.metric, value, values)
        return value


# --- running and reporting ---------------------------------------------------------------------

def run_study(params: Params, prepared_dir: Path, out_dir: Path | None = None,
              n_trials: int | None = None, worker_id: int = 0,
              create: bool = True) -> optuna.Study:
    """Run trials until the study holds ``tune.n_trials`` finished trials (a top-up, so a
    re-run resumes), or exactly ``n_trials`` more when given (one worker among several).

    With ``out_dir``, write best params, summary, trials CSV and plots there (the tune stage).
    """
    study = open_study(params, worker_id, create=create)
    name = study.study_name
    target = params.tune.n_trials if n_trials is None else None
    handled: set[int] = set()
    recover(study, handled)
    if _is_done(progress(study), target, n_trials, ran=0):
        # Nothing to run: no MLflow run (it would be an empty study run), outputs refreshed.
        log.info("study %s in %s already holds %d finished trials (tune.n_trials %d): no trial "
                 "to run", name, redact_url(storage_url(params)), progress(study).finished,
                 target)
        if out_dir is not None:
            write_outputs(study, params, out_dir, log_to_mlflow=False)
        return study
    log.info("study %s in %s: %s", name, redact_url(storage_url(params)),
             f"topping up to {target} finished trials" if target is not None
             else f"running {n_trials} trials in this worker")
    tags = tracking.lineage_tags("tune", params.data.md5)
    first = progress(study).finished
    with tracking.study_run(params, name, tags, worker_id, first_trial=first):
        objective = Objective(params, prepared_dir, name, tracking.active_run_id())
        tracking.log_dataset(params.data.url, params.data.md5, objective.meta.sizes, "tuning")
        ran = 0
        while True:
            if ran:
                recover(study, handled)
            if _is_done(progress(study), target, n_trials, ran):
                break
            reseed(study, params, worker_id)
            study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
            ran += 1
        summary = summarize(study, params)
        tracking.log_metrics({k: summary[k] for k in
                              ("trials_complete", "trials_pruned", "trials_failed",
                               "epochs_spent", "epochs_without_pruning")})
        if summary["best_trial"] is not None:
            tracking.log_metrics({"best_value": summary["best_value"]})
            tracking.set_tags({"optuna.best_trial": summary["best_trial"]})
            tracking.log_params({f"best.{k}": v for k, v in summary["best_params"].items()})
        if out_dir is not None and (target is not None or summary["best_trial"] is not None):
            write_outputs(study, params, out_dir)  # a top-up without a completed trial fails
        elif out_dir is not None:
            log.warning("study %s has no completed trial yet: %s not written", name, out_dir)
    return study


def _is_done(state: Progress, target: int | None, n_trials: int | None, ran: int) -> bool:
    """A top-up is done when the study holds ``target`` finished trials (a RUNNING one may
    belong to a worker that died less than its grace period ago; concurrent top-ups may
    overshoot by a trial each); a worker is done after its ``n_trials``."""
    if target is not None:
        return state.finished >= target
    return ran >= n_trials


def summarize(study: optuna.Study, params: Params) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    state = progress(study)
    retried = _retried_numbers(trials)
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
    plots = write_plots(study, out_dir / PLOTS_DIR)
    write_best_params(out_dir / BEST_PARAMS_FILE, summary["best_params"],
                      summary["study_name"], summary["best_trial"], summary["metric"],
                      summary["best_value"])
    write_summary(out_dir, summary)
    if log_to_mlflow:
        tracking.log_files([out_dir / BEST_PARAMS_FILE, out_dir / SUMMARY_FILE,
                            out_dir / STUDY_FILE, out_dir / TRIALS_FILE], "tune")
        tracking.log_files(plots, "tune/plots")
    return summary


def write_disabled(out_dir: Path) -> None:
    """tune.n_trials: 0. Empty best params (training uses params.yaml), a summary that says so."""
    write_best_params(out_dir / BEST_PARAMS_FILE, {}, None, None)
    write_summary(out_dir, {"study_name": None, "trials_complete": 0,
                            "note": "tune.n_trials is 0; tuning skipped"})
    write_text(out_dir / TRIALS_FILE, "")
    _clear_plots(out_dir / PLOTS_DIR)


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    """summary.json (a DVC metric) gets the numbers; study.json the words (name, storage,
    metric, direction, notes): strings in a DVC metric become columns thousands of characters
    wide in `dvc exp show`."""
    numbers = {k: v for k, v in summary.items() if not isinstance(v, str) and k != "study_name"}
    words = {k: v for k, v in summary.items() if isinstance(v, str) or k == "study_name"}
    write_json(out_dir / SUMMARY_FILE, numbers)
    write_json(out_dir / STUDY_FILE, words)


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs",
                                          "datetime_start", "datetime_complete", "duration"))
    write_text(path, frame.to_csv(index=False))


def _clear_plots(plot_dir: Path) -> None:
    """An empty plots/: it persists across runs (dvc.yaml), and a plot that cannot be drawn
    now must not be left from an earlier study."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        stale.unlink()


def write_plots(study: optuna.Study, plot_dir: Path) -> list[Path]:
    """History, importances and an lr x dropout contour as PNG; skipped with a log line when
    the study is too small for one (importances need 2+ completed trials)."""
    from optuna.visualization import matplotlib as optuna_plots

    _clear_plots(plot_dir)
    makers = {"optimization_history.png": lambda: optuna_plots.plot_optimization_history(study),
              "param_importances.png": lambda: optuna_plots.plot_param_importances(study),
              "lr_dropout_contour.png": lambda: optuna_plots.plot_contour(
                  study, params=[LR, DROPOUT])}
    written = []
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
        save_figure(figure, plot_dir / name)
        written.append(plot_dir / name)
    return written
