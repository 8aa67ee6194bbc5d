"""``models/``: the trained model file and the MLflow run that trained it, written by the train
stage and read by evaluate (and anything else that loads the model)."""

from __future__ import annotations

from pathlib import Path
from dataclasses import asdict
from typing import Any, Sequence

from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.model import Classifier, build_model
from cifar_alexnet.core.train import load_checkpoint, save_checkpoint
from cifar_alexnet.errors import DataError

MODEL_FILE = "model.pt"
RUN_FILE = "mlflow_run.json"
MODEL_URI_FILE = "mlflow_model.json"  # in reports/: the logged (evaluated) MLflow model


def save_trained_model(model_dir: Path, model: Classifier, class_names: Sequence[str],
                       epoch: int, val_acc: float, run_id: str) -> None:
    """``models/model.pt``: the weights (a state dict, loadable without unpickling code), the
    config that rebuilds the network, the class names and the run that trained it."""
    save_checkpoint(model_dir / MODEL_FILE, {
        "model_state": model.state_dict(), "model_config": asdict(model.config),
        "class_names": list(class_names), "epoch": epoch, "val_acc": val_acc,
        "mlflow_run_id": run_id,
    })


def load_trained_model(model_dir: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the exact trained model from the config stored beside its weights."""
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run the train stage first (dvc repro train)")
    try:
        payload = load_checkpoint(path)  # weights only: a pickled payload is never run
        model = build_model(ModelConfig(**payload["model_config"]))
        model.load_state_dict(payload["model_state"])  # also restores the normalisation buffers
        payload["mlflow_run_id"]  # noqa: B018 (evaluate needs it: fail here, not half-way)
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(
            f"{path} cannot be loaded as this pipeline's model ({type(exc).__name__}: {reason}): "
            "it is truncated, damaged or not written by the train stage. Restore it with "
            "`dvc checkout models` or retrain with `dvc repro --force train`") from None
    return model, payload
