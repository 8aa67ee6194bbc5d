"""Running a study: ``run_study`` tops it up to ``tune.n_trials`` finished trials (the tune
stage; a re-run resumes), or runs a worker's ``n_trials`` more. Every invocation that runs
trials is one parent MLflow run with a nested run per trial.

Torch and MLflow are imported only once there is a trial to run: a `dvc repro` after a worker
or `mlflow run . -e tune` finds the study done and only rewrites tune/, in a fraction of the
time those imports take.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna

from cifar_alexnet.config import Params
from cifar_alexnet.redact import redact_url

from .report import summarize, write_outputs
from .study import Progress, open_study, progress, quiet_optuna, recover, storage_url

log = logging.getLogger(__name__)


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
    from cifar_alexnet import tracking
    from cifar_alexnet.core.trainer import TrainingDiverged

    from .objective import Objective

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
