"""Tuning wraps training: a trial is one ``fit`` of ``tune.epochs_per_trial`` epochs with its
lr and dropout, scored on the validation split, its epochs reported to the pruner; ``run_study``
tops a study up to ``tune.n_trials``. Every invocation is one parent MLflow run with a nested run
per trial.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import optuna

from cifar_alexnet import tracking
from cifar_alexnet.best_params import DROPOUT, LR, tuned_params
from cifar_alexnet.config import Params
from cifar_alexnet.core.architectures import ARCHITECTURES
from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.core.trainer import (TrainingDiverged, fit, initial_model, resolve_device,
                                        to_device)
from cifar_alexnet.redact import redact_url

from .report import summarize, write_outputs
from .study import Progress, open_study, progress, quiet_optuna, recover, storage_url

log = logging.getLogger(__name__)

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
        values = {LR: trial.suggest_float(LR, tune.lr_low, tune.lr_high, log=True)}
        if ARCHITECTURES[self.params.model.arch].dropout:  # no search where it changes nothing
            values[DROPOUT] = trial.suggest_float(DROPOUT, tune.dropout_low, tune.dropout_high)
        params = tuned_params(self.params, values)
        cfg = dataclasses.replace(params.train, epochs=tune.epochs_per_trial)
        outcome: BaseException | None = None
        # Before the trial's run starts: if the store fails, the next run closes the parent.
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        with tracking.trial_run(self.study_name, trial.number, values) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            model = initial_model(params.model, self.meta.mean, self.meta.std,
                                  seed=params.base.seed, device=self.device)  # same init each
            try:
                result = fit(model, (self.train, self.val), cfg, seed=params.base.seed,
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


def run_study(params: Params, prepared_dir: Path, out_dir: Path | None = None,
              n_trials: int | None = None, worker_id: int = 0,
              create: bool = True) -> optuna.Study:
    """Run trials until the study holds ``tune.n_trials`` finished trials (a top-up, so a
    re-run resumes), or exactly ``n_trials`` more when given (one worker among several).

    With ``out_dir``, write best params, summary, trials CSV and plots there (the tune stage).
    """
    with quiet_optuna():
        return _run_study(params, prepared_dir, out_dir, n_trials, worker_id, create)


def _run_study(params: Params, prepared_dir: Path, out_dir: Path | None, n_trials: int | None,
               worker_id: int, create: bool) -> optuna.Study:
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


