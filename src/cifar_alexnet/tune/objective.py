"""Tuning wraps training: a trial is one ``fit`` of ``tune.epochs_per_trial`` epochs with its
lr and dropout, scored on the validation split, its epochs reported to the pruner, in a nested
MLflow run under the study run (tune/runner.py runs the trials).
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
