"""Everything that talks to MLflow; nothing outside this package imports mlflow.

- :mod:`.store`: which tracking store (``MLFLOW_TRACKING_URI`` when set, else
  ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlruns``, where ``<root>`` is the
  repository, also for `dvc exp run --temp`/`--queue`, which run in a temporary copy: see
  workspace.py), so ``mlflow ui`` started from the repository shows every run; configured and
  checked once per process (:func:`.store.connect`).
- :mod:`.runs`: the runs of stages, studies and trials, and what they log.
- :mod:`.registry`: the Model Registry and its promotion gate.

Callers use ``from cifar_alexnet import tracking`` and the names below.
"""

from cifar_alexnet.tracking.registry import (ACCURACY_TAG, CHALLENGER, CHAMPION, PROMOTION_TAG,
                                             SETTLED_BY_TAG, Candidate, Promotion, champion_for,
                                             register_and_gate)
from cifar_alexnet.tracking.runs import (CHECKPOINT_TAG, CLASS_NAMES_KEY, EVALUATE_STATUS_TAG,
                                         MODEL_ARTIFACT, EpochLogger, active_run_id,
                                         close_runs_of_checkpoint, evaluation_run,
                                         experiment_url, git_state, lineage_tags, load_logged_model,
                                         log_dataset, log_dict, log_figure, log_files, log_image,
                                         log_metrics, log_model, log_params, log_text, mark_killed,
                                         project_invocation, run_exists, run_label, set_tags,
                                         study_run, training_run, trial_run)
from cifar_alexnet.tracking.store import (DEFAULT_ARTIFACTS, DEFAULT_DB, Store,
                                          TrackingUnavailable, connect)

__all__ = [
    "ACCURACY_TAG", "CHALLENGER", "CHAMPION", "CHECKPOINT_TAG", "CLASS_NAMES_KEY",
    "DEFAULT_ARTIFACTS", "DEFAULT_DB", "EVALUATE_STATUS_TAG", "MODEL_ARTIFACT", "PROMOTION_TAG",
    "SETTLED_BY_TAG", "Candidate", "EpochLogger", "Promotion", "Store", "TrackingUnavailable",
    "active_run_id", "champion_for", "close_runs_of_checkpoint", "connect",
    "evaluation_run", "experiment_url", "git_state", "lineage_tags", "load_logged_model",
    "log_dataset", "log_dict", "log_figure", "log_files", "log_image", "log_metrics",
    "log_model", "log_params", "log_text", "mark_killed", "project_invocation",
    "register_and_gate", "run_exists", "run_label", "set_tags", "study_run", "training_run",
    "trial_run",
]
