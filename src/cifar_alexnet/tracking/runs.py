"""MLflow runs: one per stage, study and trial, nested under an `mlflow run` invocation, with
their lineage (git, DVC experiment, data), params, metrics, artifacts and the logged model."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import mlflow
import numpy as np
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from cifar_alexnet.config import Params, flatten
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.redact import redact_url
from cifar_alexnet.tracking.store import (DEFAULT_ARTIFACTS, TrackingUnavailable, connect,
                                          nest_under, unavailable)
from cifar_alexnet.workspace import dvc_experiment_tags, project_root

if TYPE_CHECKING:  # torch and matplotlib load with the stage that has a model or a figure
    import torch
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CLASS_NAMES_KEY = "class_names"  # in the logged model's metadata
# Marks a model-training (not GenAI) experiment. The MLflow 3.17 UI ignores it and opens on the
# GenAI overview unless the link says ?workflowType=machine_learning (see experiment_url); earlier
# MLflow 3 UIs read it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# Files DVC itself changes while it runs: dvc.lock after every stage, and params.yaml in
# `dvc exp run -S` (which records the values in the experiment). With the stages' outputs (which
# `dvc exp run` stages in git's index as it goes), they do not make the code differ from the
# commit, so they do not count as dirty.
DVC_BOOKKEEPING = ("dvc.lock",)
DVC_EXPERIMENT_BOOKKEEPING = ("dvc.lock", "params.yaml")


def _dvc_outputs(project: Path) -> list[str]:
    """The output paths dvc.yaml declares (relative to the project), [] without one."""
    import yaml

    try:
        stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return []
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                paths += list(entry) if isinstance(entry, dict) else [entry]
    return [str(p).rstrip("/") for p in paths]


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirtiness of the git tree the stage runs in (empty outside git): dirty when a
    tracked file other than DVC's own bookkeeping and outputs differs from the commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        project = git("rev-parse", "--show-prefix").strip()  # the DVC project's folder in git
        changed = [line[3:].split(" -> ")[-1]  # "XY path" or "XY old -> new"
                   for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {}
    bookkeeping = DVC_EXPERIMENT_BOOKKEEPING if dvc_experiment_tags() else DVC_BOOKKEEPING
    managed = [project + name for name in (*bookkeeping, *_dvc_outputs(Path(cwd)))]
    dirty = any(path not in managed and not path.startswith(tuple(f"{m}/" for m in managed))
                for path in changed)
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


def _epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    return {"train/loss": row["train_loss"], "train/acc": row["train_acc"],
            "val/loss": row["val_loss"], "val/acc": row["val_acc"],
            "lr": row["lr"], "epoch_seconds": row["seconds"]}


class EpochLogger:
    """Training callback: one MLflow step per epoch, metrics namespaced by split. A store that
    fails stops training after the epoch is checkpointed (TrackingUnavailable)."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        try:
            mlflow.log_metrics(_epoch_metrics(row), step=int(row["epoch"]))
        except MlflowException as exc:
            raise unavailable(exc, f" after epoch {int(row['epoch'])}") from None

    @staticmethod
    def catch_up(history: Sequence[dict[str, float]]) -> None:
        """Log the epochs of a resumed training that never reached the store (it failed)."""
        client = mlflow.MlflowClient()
        run_id = mlflow.active_run().info.run_id
        logged = {m.step for m in client.get_metric_history(run_id, "val/acc")}
        for row in history:
            if int(row["epoch"]) not in logged:
                mlflow.log_metrics(_epoch_metrics(row), step=int(row["epoch"]))


def _log_params(params: Params) -> None:
    tree = params.to_public_dict()  # as logged: credentials in URLs masked
    mlflow.log_params(flatten(tree))
    log_dict(tree, "params/effective_params.json")



def _project_experiment(params: Params, default_store: bool) -> Any:
    """The experiment params.yaml names (``mlflow.experiment``), created when missing."""
    name = params.mlflow.experiment
    if default_store and mlflow.get_experiment_by_name(name) is None:
        # MLflow would put artifacts in ./mlruns of the working directory, i.e. inside a
        # temporary experiment copy: name the repository's mlruns/ instead.
        with contextlib.suppress(MlflowException):  # created meanwhile by another stage
            mlflow.create_experiment(
                name, artifact_location=(project_root() / DEFAULT_ARTIFACTS
                                         / _slug(name)).as_uri())
    return _model_training(mlflow.set_experiment(name))


def _model_training(experiment: Any) -> Any:
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment


def _set_experiment(params: Params) -> None:
    store = connect()
    if store.parent_run:  # the experiment `mlflow run` was given, or project_invocation's
        _model_training(mlflow.set_experiment(
            experiment_id=mlflow.get_run(store.parent_run).info.experiment_id))
    else:
        _project_experiment(params, store.is_default)


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default", where `mlflow run` goes unless told otherwise
PROJECTS_RUN_TAG = "mlflow_projects.run_id"


def _child_environment(parent_run: str | None) -> dict[str, str]:
    """The environment for a child process whose runs nest under ``parent_run``."""
    return {**os.environ, **({"MLFLOW_RUN_ID": parent_run} if parent_run else {})}


@contextlib.contextmanager
def project_invocation(params: Params) -> Iterator[dict[str, str]]:
    """Run an MLproject entry point's work in the project's experiment; yields the environment
    for the entry point's child processes (`dvc repro`, whose stages nest their runs under the
    same parent).

    `mlflow run` hands its command a run (MLFLOW_RUN_ID); each stage's runs nest under a parent
    rather than write into it: with the `main` entry point the tune and train stages would
    otherwise log different values of the same params into one run, which MLflow refuses.
    Without ``--experiment-name`` that run is in MLflow's Default experiment, which would take
    every stage's run with it, away from ``mlflow.experiment``. Then this makes a parent run in
    the project's experiment instead (tagged with the Projects run's id, which gets a note
    pointing to it) and ends it with the entry point's outcome. An experiment chosen with
    ``--experiment-name`` (or $MLFLOW_EXPERIMENT_NAME) is kept, and so is everything outside
    `mlflow run`."""
    store = connect()
    projects_run_id = store.parent_run
    if not projects_run_id:
        yield _child_environment(None)
        return
    client = mlflow.MlflowClient()
    projects_run = client.get_run(projects_run_id)
    if projects_run.info.experiment_id != DEFAULT_EXPERIMENT_ID:
        yield _child_environment(projects_run_id)
        return
    experiment = _project_experiment(params, store.is_default)
    entry_point = projects_run.data.tags.get("mlflow.project.entryPoint", "main")
    inherited = {k: v for k, v in projects_run.data.tags.items()
                 if k.startswith(("mlflow.source.", "mlflow.project.", "mlflow.user"))}
    parent = client.create_run(
        experiment.experiment_id, run_name=f"mlflow run {entry_point} {run_label()}",
        tags={**inherited, PROJECTS_RUN_TAG: projects_run_id})
    client.log_batch(parent.info.run_id, params=[
        mlflow.entities.Param(k, v) for k, v in projects_run.data.params.items()])
    client.set_tag(projects_run_id, "mlflow.note.content",
                   f"This `mlflow run` logged to experiment {experiment.name!r}: run "
                   f"{parent.info.run_id}. Pass --experiment-name to choose another.")
    nest_under(parent.info.run_id)
    log.info("`mlflow run` made its run in the Default experiment; logging to experiment %s "
             "under run %s instead", experiment.name, parent.info.run_id)
    status = "FAILED"
    try:
        yield _child_environment(parent.info.run_id)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as exc:
        status = "FINISHED" if exc.code in (0, None) else "FAILED"
        raise
    finally:
        client.set_terminated(parent.info.run_id, status)
        nest_under(projects_run_id)  # as before the invocation


def experiment_url(experiment_id: str, run_id: str | None = None,
                   ui: str = "http://127.0.0.1:5000") -> str:
    """Where `mlflow ui` shows the experiment's runs (or one run) in its model-training view."""
    run = f"/{run_id}" if run_id else ""
    return f"{ui}/#/experiments/{experiment_id}/runs{run}?workflowType=machine_learning"


class _ProfiledDataset(MetaDataset):
    """A dataset known by its archive's md5 (the digest) with its split sizes (the profile)."""

    def __init__(self, source: Any, name: str, digest: str, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def log_dataset(url: str, md5: str, sizes: dict[str, int], context: str) -> None:
    """The run's Datasets panel: CIFAR-10 from ``url`` (masked), digest = the archive's md5."""
    public = redact_url(url)
    if public.startswith(("http://", "https://")):
        source: Any = HTTPDatasetSource(url=public)
    else:
        with warnings.catch_warnings():  # "several sources match": the local-file one is meant
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(public.removeprefix("file://"))
    mlflow.log_input(_ProfiledDataset(source, "cifar10", md5, {"splits": sizes}),
                     context=context)


@contextlib.contextmanager
def _run(reopened_status: str | None = None, **start_kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run`` whose end status says how it ended: FINISHED, FAILED (an error) or
    KILLED (Ctrl-C or SIGTERM, which the stage scripts turn into KeyboardInterrupt). A new
    top-level run is nested under the `mlflow run` invocation's run, if there is one.

    ``reopened_status``: the status of a finished run reopened to add to it (the evaluation of
    a training): a failure of the addition leaves the run that status, with the failure in
    the tag ``evaluate.status``, rather than marking a good training KILLED. Models left half
    logged by a failure are marked FAILED, not left PENDING."""
    parent = connect().parent_run
    if parent and "run_id" not in start_kwargs and not start_kwargs.get("nested"):
        start_kwargs["tags"] = {**start_kwargs.get("tags", {}), "mlflow.parentRunId": parent}
    try:
        run = mlflow.start_run(**start_kwargs)
        _check_artifacts_writable()
    except MlflowException as exc:
        raise unavailable(exc) from None
    except TrackingUnavailable:
        _end_run(reopened_status or "FAILED")
        raise

    def stop(status: str) -> None:
        _fail_pending_models(run.info.run_id)
        if reopened_status:
            with contextlib.suppress(MlflowException):
                mlflow.set_tag(EVALUATE_STATUS_TAG, status)
        _end_run(reopened_status or status)

    try:
        yield run
    except KeyboardInterrupt:
        stop("KILLED")
        raise
    except TrackingUnavailable:
        stop("FAILED")  # the store is failing: the rerun continues or closes this run
        raise
    except MlflowException as exc:
        stop("FAILED")
        raise unavailable(exc) from None
    except BaseException:
        stop("FAILED")
        raise
    _end_run("FINISHED")


EVALUATE_STATUS_TAG = "evaluate.status"  # on a training run: how its last evaluation ended


def _check_artifacts_writable() -> None:
    """Fail before anything is logged when the run's local artifact directory cannot be
    written (read-only, full): otherwise a training fails only after its last epoch, and an
    evaluation after it has logged test metrics without the model they belong to."""
    uri = mlflow.get_artifact_uri()
    if uri.startswith("file:"):
        directory = Path(urllib.request.url2pathname(uri.removeprefix("file://")))
    elif uri.startswith("/"):
        directory = Path(uri)
    else:
        return  # a server or object store: its own errors name it
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise TrackingUnavailable(
            f"cannot write MLflow artifacts to {redact_url(uri)}: {exc.strerror or exc}; make "
            "it writable or free space there, then run the stage again") from None


def _fail_pending_models(run_id: str) -> None:
    """Mark FAILED the logged models of ``run_id`` that an interruption left PENDING (created,
    never finished uploading): `mlflow ui` then shows them as failed, not in progress."""
    from mlflow.entities import LoggedModelStatus

    with contextlib.suppress(MlflowException, OSError):
        client = mlflow.MlflowClient()
        for model in mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'",
                                                 output_format="list"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def _end_run(status: str) -> None:
    """End the active run. When the store fails, the run is still ended here (MLflow pops it
    first) and keeps its stored status: the rerun continues it, or marks it KILLED."""
    try:
        mlflow.end_run(status)
    except MlflowException as exc:
        log.warning("could not mark the MLflow run %s: %s", status, exc.message.splitlines()[0])


def _find_run(run_id: str) -> mlflow.entities.Run | None:
    """The run, or None when the store does not hold it; an unreachable store is an error."""
    try:
        return mlflow.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise PipelineError(
            f"cannot read run {run_id} from the tracking store "
            f"{redact_url(mlflow.get_tracking_uri())}: {exc.message}. Check that it is "
            "reachable (MLFLOW_TRACKING_URI)") from None


def run_exists(run_id: str) -> bool:
    connect()
    return _find_run(run_id) is not None


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
        log.info("MLflow run %s in %s; with `mlflow ui`: %s", run.info.run_id,
                 redact_url(mlflow.get_tracking_uri()),
                 experiment_url(run.info.experiment_id, run.info.run_id))
        yield run.info.run_id


@contextlib.contextmanager
def evaluation_run(params: Params, trained_run_id: str, tags: dict[str, str],
                   model_info: dict[str, Any]) -> Iterator[str]:
    """Where evaluation is logged: the training run that produced the model, reopened, so the
    test metrics and the served model sit beside the training curves.

    When this store does not hold that run (the model came from DVC's run cache or a `dvc pull`
    of work tracked elsewhere), a new run `evaluate <label>` records the evaluation and links
    to the training by the tag ``trained_by.run_id``: nothing dangles, nothing is retrained."""
    connect()
    found = _find_run(trained_run_id)
    stage = tags.pop("dvc.stage", "evaluate")
    if found is None:
        log.info("training run %s is not in %s (the model came from DVC's run cache or `dvc "
                 "pull`, or the store was replaced since); logging the evaluation to a new run",
                 trained_run_id, redact_url(mlflow.get_tracking_uri()))
        _set_experiment(params)
        start: dict[str, Any] = {"run_name": f"evaluate {run_label()}", "tags": {
            **tags, "dvc.stage": stage, "trained_by.run_id": trained_run_id}}
    else:
        start = {"run_id": trained_run_id, "reopened_status": found.info.status}
    with _run(**start) as run:
        if found is None:
            mlflow.log_params({f"model.{k}": v for k, v in model_info.items()})
        else:
            # The run stays the train stage's (dvc.stage); dvc.stages lists every stage that
            # wrote to it.
            seen = found.data.tags.get("dvc.stages", found.data.tags.get("dvc.stage", ""))
            stages = dict.fromkeys(s for s in [*seen.split(","), stage] if s)  # ordered, unique
            mlflow.set_tags({**tags, "dvc.stages": ",".join(stages),
                             EVALUATE_STATUS_TAG: "RUNNING"})
        yield run.info.run_id
        if found is not None:
            mlflow.set_tag(EVALUATE_STATUS_TAG, "FINISHED")


@contextlib.contextmanager
def study_run(params: Params, study_name: str, tags: dict[str, str],
              worker_id: int = 0, first_trial: int = 0) -> Iterator[str]:
    """The parent run of one tuning invocation (one per worker process), named after the study
    and the invocation: a study grown by several invocations has one run per invocation."""
    _set_experiment(params)
    # Each invocation runs trials from a different point (and concurrent workers have distinct
    # ids), so the name is unique even for two invocations within one second.
    worker = f" worker {worker_id}" if worker_id else ""
    with _run(run_name=f"study {study_name} {run_label()} from trial {first_trial}{worker}",
              tags={**tags, "optuna.study_name": study_name}) as run:
        _log_params(params)
        log.info("MLflow parent run %s for study %s in %s; with `mlflow ui`: %s",
                 run.info.run_id, study_name, redact_url(mlflow.get_tracking_uri()),
                 experiment_url(run.info.experiment_id, run.info.run_id))
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
    connect()
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


CHECKPOINT_TAG = "checkpoint_path"  # on a training run: the checkpoint that can resume it


def close_runs_of_checkpoint(path: Path) -> list[str]:
    """Mark KILLED the RUNNING training runs that ``path`` was the checkpoint of: when the
    checkpoint cannot be read, nothing will ever resume them."""
    connect()
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, filter_string=(
        f"tags.{CHECKPOINT_TAG} = '{path.resolve()}' and attributes.status = 'RUNNING'"))
    return mark_killed([r.info.run_id for r in runs])


def log_metrics(metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)


def _artifact_write(log_function: Callable[..., Any]) -> Callable[..., Any]:
    """A local artifact store that is read-only or full raises OSError: one line instead."""
    @functools.wraps(log_function)
    def logged(*args: Any, **kwargs: Any) -> Any:
        try:
            return log_function(*args, **kwargs)
        except OSError as exc:
            where = mlflow.get_artifact_uri() if mlflow.active_run() else "the artifact store"
            raise TrackingUnavailable(
                f"cannot write MLflow artifacts to {redact_url(where)}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}; make it writable or free "
                "space there, then run the stage again") from None
    return logged


@_artifact_write
def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


@_artifact_write
def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


@_artifact_write
def log_figure(figure: Figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


@_artifact_write
def log_image(image: np.ndarray, artifact_file: str) -> None:
    mlflow.log_image(image, artifact_file=artifact_file)


@_artifact_write
def log_files(paths: Sequence[str | Path], artifact_dir: str) -> None:
    for path in paths:
        mlflow.log_artifact(str(path), artifact_dir)


@_artifact_write
def log_model(model: torch.nn.Module, example_images: np.ndarray,
              class_names: Sequence[str]) -> str:
    """Log the model (pt2 format: no pickle) with a signature, an input example and the class
    names (model metadata, so a served or loaded model's outputs can be named).

    The model is moved to the CPU (where it is exported). ``example_images`` must hold at least
    2 images: torch.export bakes a batch of 1 into the
    graph as a constant, which would make the served model reject other batch sizes.
    """
    import torch

    model = model.cpu().eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(example_images)).numpy()
    info = mlflow.pytorch.log_model(
        model, name=MODEL_ARTIFACT, input_example=example_images,
        signature=infer_signature(example_images, logits),
        serialization_format="pt2", metadata={CLASS_NAMES_KEY: list(class_names)},
        # An explicit list skips MLflow's slow requirement inference.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri


def load_logged_model(model_uri: str) -> tuple[Callable[[np.ndarray], np.ndarray], list[str] | None]:
    """A logged model (``runs:/<id>/model``, ``models:/<name>@<alias>``, ``models:/m-<id>`` ...)
    as a function of uint8 (N, 3, 32, 32) images to logits, and its class names (None for a
    model logged without them)."""
    connect()
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise PipelineError(f"cannot load the MLflow model {redact_url(model_uri)} from "
                            f"{redact_url(mlflow.get_tracking_uri())}: {exc.message}") from None
    names = (model.metadata.metadata or {}).get(CLASS_NAMES_KEY)
    return (lambda images: np.asarray(model.predict(images))), names


