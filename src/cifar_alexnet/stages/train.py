"""The train stage: fit on the train split, select on val, write ``models/``, log to MLflow.

Stages meet at files: train reads ``data/prepared`` (and the tune stage's best params) and writes
``models/``; it never reads the test split.
"""

from __future__ import annotations

import csv
import hashlib
from io import StringIO
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from cifar_alexnet import tracking
from cifar_alexnet.best_params import load_best_params, tuned_params
from cifar_alexnet.config import DATA, TRAINING, Params, identity
from cifar_alexnet.core.archive import Batch
from cifar_alexnet.core.data import DatasetMeta, load_meta, load_split
from cifar_alexnet.core.model import count_parameters, summary
from cifar_alexnet.core.distributed import (World, current_world, process_group,
                                            share_from_main, training_device)
from cifar_alexnet.core.trainer import (HISTORY_FIELDS, Checkpoint, Checkpointer, TrainResult,
                                      fit, initial_model, to_device)
from cifar_alexnet.core.transforms import CROP_PADDING, random_crop_flip
from cifar_alexnet.files import write_json, write_text
from cifar_alexnet.plots import history_figure, image_grid_figure, save as save_figure
from cifar_alexnet.sources import module_files

from .artifacts import RUN_FILE, save_trained_model

log = logging.getLogger(__name__)


def history_csv(history: list[dict[str, float]]) -> str:
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in history)
    return buffer.getvalue()


AUGMENTED_SHOWN = 32


def augmented_samples_figure(images: np.ndarray, labels: np.ndarray,
                             class_names: Sequence[str], seed: int) -> Figure:
    """What the network sees in training: the first training images as augmentation presents
    them (a random crop of the zero-padded image, a random horizontal flip), each captioned
    with its class."""
    shown = min(AUGMENTED_SHOWN, len(images))
    batch = random_crop_flip(torch.from_numpy(images[:shown]), torch.Generator().manual_seed(seed))
    return image_grid_figure(
        batch.numpy(), [class_names[i] for i in labels[:shown]],
        f"Training inputs after augmentation: random crop ({CROP_PADDING}-pixel zero padding) "
        f"and horizontal flip, seed {seed}", columns=8)


def apply_best_params(params: Params, best_params_path: Path | None,
                      keep: Collection[str] = ()) -> tuple[Params, dict[str, str]]:
    """Params with the tune stage's values over params.yaml's (except the keys in ``keep``,
    set explicitly on the command line), and tags saying which values were used."""
    if best_params_path is None:
        return params, {"tune.applied": "none (no best params given)"}
    values, info = load_best_params(best_params_path)
    values = {k: v for k, v in values.items() if k not in keep}
    if not values:
        return params, {"tune.applied": "none (params.yaml and --set values)"}
    applied = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    log.info("using tuned %s from %s (study %s, trial %s) over params.yaml", applied,
             best_params_path, info.get("study_name"), info.get("best_trial"))
    return tuned_params(params, values, source=str(best_params_path)), {
        "tune.applied": applied, "tune.study_name": str(info.get("study_name")),
        "tune.best_trial": str(info.get("best_trial"))}


# The modules whose code decides what training computes (and so whether a checkpoint may be
# resumed); with everything they import (sources.module_files).
TRAINING_CORE = ("core.trainer", "core.model", "core.data")


def training_fingerprint(params: Params) -> str:
    """Hash of what training computes (the params marked DATA or TRAINING in config.py) and of
    the training core's code: a checkpoint is resumed only by the training it came from, and an
    edit elsewhere (tracking, the benchmark, CI tools), a device, a process count or an MLflow
    name does not discard it."""
    digest = hashlib.sha256(json.dumps(identity(params, DATA, TRAINING),
                                       sort_keys=True).encode())
    for source in module_files(*TRAINING_CORE):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def resumable_checkpoint(path: Path | None, fingerprint: str) -> Checkpoint | None:
    """The checkpoint at ``path`` if it belongs to this training, else None (fresh start).
    Read by rank 0 alone and handed to the other ranks (:func:`share_from_main`)."""
    if not current_world().main:
        return share_from_main(None)
    return share_from_main(_own_checkpoint(path, fingerprint))


def _own_checkpoint(path: Path | None, fingerprint: str) -> Checkpoint | None:
    if path is None or not path.is_file():
        return None
    try:
        checkpoint = Checkpoint.load(path)
    except Exception as exc:  # torch.load raises many types for a damaged or foreign file
        log.warning("not resuming: %s cannot be read (%s); starting from epoch 1", path, exc)
        closed = tracking.close_runs_of_checkpoint(path)
        if closed:
            log.info("marked the MLflow run(s) it would have resumed KILLED: %s",
                     ", ".join(closed))
        return None
    if checkpoint.owner.get("fingerprint") != fingerprint:
        log.warning("not resuming: %s was written by a training with other params or code; "
                    "starting from epoch 1", path)
        stale_run = checkpoint.owner.get("mlflow_run_id")
        if stale_run:
            tracking.mark_killed([stale_run])
        return None
    return checkpoint


@dataclass(frozen=True)
class TrainOutputs:
    """Where the train stage writes (dvc.yaml's outs, and the scratch checkpoint)."""
    model_dir: Path
    metrics: Path
    history: Path
    curves: Path | None = None
    checkpoint: Path | None = None   # resumable state; removed once the model is written


def train_stage(params: Params, prepared_dir: Path, outputs: TrainOutputs,
                best_params_path: Path | None = None,
                keep: Collection[str] = ()) -> dict[str, Any]:
    """Train on the train split, select on val, write the best model; return train metrics.

    With ``outputs.checkpoint``, the training is checkpointed there (every
    ``train.checkpoint_seconds``, and after its last epoch) and an interrupted training of the
    same params and code resumes from it (and continues its MLflow run).

    Under torchrun every rank runs this: all of them train (:func:`fit`), rank 0 alone writes
    the outputs, the checkpoint and the one MLflow run (tagged with the world size).
    """
    with process_group(params.train.device) as world:
        return _train_stage(params, prepared_dir, outputs, best_params_path, keep, world)


def _train_stage(params: Params, prepared_dir: Path, outputs: TrainOutputs,
                 best_params_path: Path | None, keep: Collection[str],
                 world: World) -> dict[str, Any]:
    params, tune_tags = apply_best_params(params, best_params_path, keep)
    meta = load_meta(prepared_dir)
    train_split, val_split = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    device = training_device(params.train.device, world)
    model = initial_model(params.model, meta.mean, meta.std, seed=params.base.seed,
                          device=device)
    model_summary = summary(model)
    log.info("training %s (width %s, %s parameters) on %s", params.model.arch,
             params.model.width, f"{count_parameters(model):,}", device)
    fingerprint = training_fingerprint(params)
    checkpoint = resumable_checkpoint(outputs.checkpoint, fingerprint)
    # An epoch-0 checkpoint only names the run of a training killed in its first epoch.
    resume = checkpoint if checkpoint and checkpoint.resumable else None
    data = (to_device(train_split.images, train_split.labels, device),
            to_device(val_split.images, val_split.labels, device))
    if not world.main:  # trains its shards; rank 0 writes everything
        fit(model, data, params.train, seed=params.base.seed, resume=resume,
            eval_batch_size=params.evaluate.batch_size)
        return {}

    tags = {**tracking.lineage_tags("train", params.data.md5), **tune_tags,
            "world_size": str(world.size)}
    if outputs.checkpoint is not None:
        tags[tracking.CHECKPOINT_TAG] = str(outputs.checkpoint.resolve())
    if resume is not None:
        tags["resumed_from_epoch"] = str(resume.epoch)
    with tracking.training_run(params, tags, continue_run_id=checkpoint
                               and checkpoint.owner.get("mlflow_run_id")) as run_id:
        checkpointer = None if outputs.checkpoint is None else Checkpointer(
            outputs.checkpoint, {"fingerprint": fingerprint, "mlflow_run_id": run_id,
                                 "params": params.to_public_dict()})
        if checkpointer is not None and resume is None:
            checkpointer.started()
        if resume is not None:  # epochs checkpointed while the store was failing
            tracking.EpochLogger.catch_up(resume.history)
        _log_inputs(params, meta, train_split, model_summary)
        result = fit(model, data, params.train, seed=params.base.seed,
                     callbacks=[tracking.EpochLogger()], checkpointer=checkpointer,
                     resume=resume, eval_batch_size=params.evaluate.batch_size)
        model.load_state_dict(result.best_state)
        save_trained_model(outputs.model_dir, model, meta.class_names, result.best_epoch,
                           result.best_val_acc, run_id)
        metrics = _write_results(params, result, count_parameters(model), outputs)
        # The MLflow model is logged by the evaluate stage: what it evaluated (with TTA).
        write_json(outputs.model_dir / RUN_FILE, {"run_id": run_id,
                                                  "experiment": params.mlflow.experiment})
    if outputs.checkpoint is not None:
        outputs.checkpoint.unlink(missing_ok=True)  # done: nothing left to resume
    return metrics


def _log_inputs(params: Params, meta: DatasetMeta, train: Batch, model_summary: str) -> None:
    """What the training run starts from: the dataset, the model, what augmentation shows it."""
    tracking.log_dataset(params.data.url, params.data.md5, meta.sizes, "training")
    tracking.log_text(model_summary, "model/summary.txt")
    tracking.log_dict({"class_names": list(meta.class_names), "mean": list(meta.mean),
                       "std": list(meta.std), "sizes": meta.sizes}, "data/dataset_meta.json")
    tracking.log_figure(augmented_samples_figure(train.images, train.labels, meta.class_names,
                                                 params.base.seed),
                        "data/augmented_train_samples.png")


def _write_results(params: Params, result: TrainResult, parameters: int,
                   outputs: TrainOutputs) -> dict[str, Any]:
    """metrics/train.json, the per-epoch history and curves, in files and in the run."""
    last = result.history[-1]
    metrics = {"lr": params.train.lr, "dropout": params.model.dropout,
               "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
               "final_train_loss": last["train_loss"], "final_train_acc": last["train_acc"],
               "final_val_loss": last["val_loss"], "final_val_acc": last["val_acc"],
               "seconds_per_epoch": sum(r["seconds"] for r in result.history)
               / len(result.history),
               "parameters": parameters}
    history = history_csv(result.history)
    write_text(outputs.history, history)
    write_json(outputs.metrics, metrics)
    tracking.log_metrics({"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch})
    curves = history_figure(result.history)
    if outputs.curves is not None:  # drawn once: the file is what the run logs
        save_figure(curves, outputs.curves)
        tracking.log_files([outputs.curves], "curves")
    else:
        tracking.log_figure(curves, "curves/training_curves.png")
    tracking.log_text(history, "curves/train_history.csv")
    return metrics
