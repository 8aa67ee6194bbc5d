"""Everything that talks to MLflow. The only module that imports mlflow.

Tracking store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow.db`` with
artifacts in ``<root>/mlruns``, where ``<root>`` is the repository (also for `dvc exp run
--temp`/`--queue`, which run in a temporary copy: see workspace.py), so ``mlflow ui`` started
from the repository shows every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from .config import Params, flatten
from .errors import PipelineError
from .redact import redact_url
from .workspace import dvc_experiment_tags, project_root

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
DEFAULT_DB, DEFAULT_ARTIFACTS = "mlflow.db", "mlruns"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirtiness of the git tree the stage runs in (empty outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def run_label() -> str:
    """The DVC experiment's name, else the short commit (+ "dirty") and the time: unique and
    readable in `mlflow ui`."""
    exp = dvc_experiment_tags().get("dvc.exp_name")
    if exp:
        return exp
    state = git_state()
    commit = state.get("git.commit", "")[:7] + ("+dirty" if state.get("git.dirty") == "true"
                                                else "")
    return " ".join(filter(None, [commit, time.strftime("%Y-%m-%d %H:%M:%S")]))


def lineage_tags(stage: str, data_md5: str | None) -> dict[str, str]:
    tags = {"dvc.stage": stage, **git_state(), **dvc_experiment_tags()}
    if data_md5:
        tags["data.md5"] = data_md5
    return tags


class EpochLogger:
    """Training callback: one MLflow step per epoch, metrics namespaced by split."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        mlflow.log_metrics({"train/loss": row["train_loss"], "train/acc": row["train_acc"],
                            "val/loss": row["val_loss"], "val/acc": row["val_acc"],
                            "lr": row["lr"], "epoch_seconds": row["seconds"]},
                           step=int(row["epoch"]))


def public_params(params: Params) -> dict[str, Any]:
    """The params as logged: nested, with credentials in the tuning storage URL masked."""
    tree = params.to_dict()
    tree["tune"]["storage"] = redact_url(tree["tune"]["storage"])
    return tree


def _log_params(params: Params) -> None:
    tree = public_params(params)
    mlflow.log_params(flatten(tree))
    mlflow.log_dict(tree, "params/effective_params.json")


def use_default_store() -> bool:
    """Without MLFLOW_TRACKING_URI, MLflow's default store, but in the repository root rather
    than the working directory (a temporary experiment copy is deleted after the run).
    True when that default store is the one in use."""
    default = f"sqlite:///{project_root() / DEFAULT_DB}"
    # set_tracking_uri also exports MLFLOW_TRACKING_URI (for child processes): ours is the default
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if not configured:
        mlflow.set_tracking_uri(default)
    return configured in (None, "", default)


_invocation: list[str] = []  # the run `mlflow run` made for this process, once taken


def invocation_run() -> str | None:
    """The run `mlflow run` created for this command (it hands it over as MLFLOW_RUN_ID).

    Each stage's runs are nested under it, one parent per invocation, instead of written into
    it: with the `main` entry point (`dvc repro`) the tune and train stages would otherwise log
    different values of the same params into one run, which MLflow refuses."""
    if not _invocation and os.environ.get("MLFLOW_RUN_ID"):
        _invocation.append(os.environ.pop("MLFLOW_RUN_ID"))  # start_run() would resume it
    return _invocation[0] if _invocation else None


def _set_experiment(params: Params) -> None:
    default_store = use_default_store()
    parent = invocation_run()
    if parent:  # the experiment `mlflow run` was given
        mlflow.set_experiment(experiment_id=mlflow.get_run(parent).info.experiment_id)
    else:
        name = params.mlflow.experiment
        if default_store and mlflow.get_experiment_by_name(name) is None:
            # MLflow would put artifacts in ./mlruns of the working directory, i.e. inside a
            # temporary experiment copy: name the repository's mlruns/ instead.
            with contextlib.suppress(MlflowException):  # created meanwhile by another stage
                mlflow.create_experiment(
                    name, artifact_location=(project_root() / DEFAULT_ARTIFACTS
                                             / _slug(name)).as_uri())
        mlflow.set_experiment(name)


@contextlib.contextmanager
def _run(**start_kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run`` whose end status says how it ended: FINISHED, FAILED (an error) or
    KILLED (Ctrl-C or SIGTERM, which the stage scripts turn into KeyboardInterrupt). A new
    top-level run is nested under the `mlflow run` invocation's run, if there is one."""
    parent = invocation_run()
    if parent and "run_id" not in start_kwargs and not start_kwargs.get("nested"):
        start_kwargs["tags"] = {**start_kwargs.get("tags", {}), "mlflow.parentRunId": parent}
    run = mlflow.start_run(**start_kwargs)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def run_exists(run_id: str) -> bool:
    use_default_store()
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


@contextlib.contextmanager
def training_run(params: Params, tags: dict[str, str],
                 continue_run_id: str | None = None) -> Iterator[str]:
    """Start the pipeline's MLflow run; log flattened and effective params; yield the run id.

    ``continue_run_id``: the run of an interrupted training that this one resumes; it is
    continued when the store still has it, else the new run links to it with a tag.
    """
    _set_experiment(params)
    if continue_run_id and run_exists(continue_run_id):
        start: dict[str, Any] = {"run_id": continue_run_id}
    else:
        # A name of our own: MLflow's random names are drawn after the RNGs are seeded, so
        # every training would be called the same.
        start = {"run_name": f"train {run_label()}",
                 "tags": {**tags, **({"resumes_run_id": continue_run_id}
                                     if continue_run_id else {})}}
    with _run(**start) as run:
        mlflow.set_tags(tags)
        _log_params(params)
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id,
                 run.info.experiment_id, mlflow.get_tracking_uri())
        yield run.info.run_id


@contextlib.contextmanager
def resumed_run(run_id: str, tags: dict[str, str]) -> Iterator[str]:
    """Reopen the training stage's run so evaluation lands in the same run."""
    use_default_store()
    try:
        mlflow.get_run(run_id)
    except MlflowException as exc:
        raise PipelineError(
            f"MLflow run {run_id} (from the train stage) is not in the tracking store "
            f"{mlflow.get_tracking_uri()}: {exc.message}. Use the same MLFLOW_TRACKING_URI for "
            "train and evaluate, or rerun training (dvc repro --force train).") from None
    with _run(run_id=run_id) as run:
        # The run stays the train stage's (dvc.stage); dvc.stages lists every stage that wrote
        # to it.
        stage = tags.pop("dvc.stage", None)
        seen = run.data.tags.get("dvc.stages", run.data.tags.get("dvc.stage", "")).split(",")
        stages = dict.fromkeys(s for s in [*seen, stage] if s)  # ordered, no repeats
        mlflow.set_tags({**tags, "dvc.stages": ",".join(stages)})
        yield run.info.run_id


@contextlib.contextmanager
def study_run(params: Params, study_name: str, tags: dict[str, str]) -> Iterator[str]:
    """The parent run of one tuning invocation (one per worker process)."""
    _set_experiment(params)
    with _run(run_name=f"study {study_name}",
              tags={**tags, "optuna.study_name": study_name}) as run:
        _log_params(params)
        log.info("MLflow parent run %s for study %s (%s)", run.info.run_id, study_name,
                 mlflow.get_tracking_uri())
        yield run.info.run_id


@contextlib.contextmanager
def trial_run(study_name: str, number: int, trial_params: dict[str, Any]) -> Iterator[str]:
    """A nested run for one Optuna trial, under the active study run."""
    with _run(run_name=f"trial {number}", nested=True,
              tags={"optuna.study_name": study_name, "optuna.trial_number": str(number)}) as run:
        mlflow.log_params(trial_params)
        yield run.info.run_id


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def log_params(values: dict[str, Any]) -> None:
    mlflow.log_params(values)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def mark_killed(run_ids: Sequence[str]) -> list[str]:
    """Mark runs left RUNNING by a killed process as KILLED; return the ids changed."""
    use_default_store()
    client = mlflow.MlflowClient()
    changed = []
    for run_id in run_ids:
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:
            continue  # another tracking store; nothing to fix here
        if status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            changed.append(run_id)
    return changed


def log_metrics(metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def log_figure(figure: Figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_image(image: np.ndarray, artifact_file: str) -> None:
    mlflow.log_image(image, artifact_file=artifact_file)


def log_files(paths: Sequence[str | Path], artifact_dir: str) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_dir)


def log_model(model: torch.nn.Module, example_images: np.ndarray) -> str:
    """Log the model (pt2 format: no pickle) with a signature and an input example.

    The model is moved to the CPU (where it is exported). ``example_images`` must hold at least
    2 images: torch.export bakes a batch of 1 into the
    graph as a constant, which would make the served model reject other batch sizes.
    """
    model = model.cpu().eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(example_images)).numpy()
    info = mlflow.pytorch.log_model(
        model, name=MODEL_ARTIFACT, input_example=example_images,
        signature=infer_signature(example_images, logits),
        serialization_format="pt2",
        # An explicit list skips MLflow's slow requirement inference.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri

