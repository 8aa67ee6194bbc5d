"""``models/``: the trained model file and the MLflow run that trained it, written by the train
stage and read by evaluate (and anything else that loads the model)."""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from cifar_alexnet.config import ModelConfig
from cifar_alexnet.core.model import Classifier, build_model
from cifar_alexnet.core.trainer import load_tensors, save_tensors
from cifar_alexnet.errors import DataError

MODEL_FILE = "model.pt"
RUN_FILE = "mlflow_run.json"
MODEL_URI_FILE = "mlflow_model.json"  # in reports/: the logged (evaluated) MLflow model
# In torch.load's message when its weights-only unpickler meets something it does not know.
_UNPICKLER_ERROR = "WeightsUnpickler error:"


def save_trained_model(model_dir: Path, model: Classifier, class_names: Sequence[str],
                       epoch: int, val_acc: float, run_id: str) -> None:
    """``models/model.pt``: the weights (a state dict, loadable without unpickling code), the
    config that rebuilds the network, the class names and the run that trained it."""
    save_tensors(model_dir / MODEL_FILE, {
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
        payload = load_tensors(path)  # weights only: a pickled payload is never run
        model = build_model(ModelConfig(**payload["model_config"]))
        model.load_state_dict(payload["model_state"])  # also restores the normalisation buffers
        payload["mlflow_run_id"]  # noqa: B018 (evaluate needs it: fail here, not half-way)
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        message = str(exc).strip()
        called = foreign_callable(path) if isinstance(exc, pickle.UnpicklingError) else None
        if called:
            # The pickle names a function or class to call: torch's weights-only loader
            # refused it. Its advice (weights_only=False) would run that code, so it is not given.
            raise DataError(
                f"{path} is refused: loading it would run code (it references {called}); the "
                "train stage writes weights only. Restore the trained model with "
                "`dvc checkout models` or retrain with `dvc repro --force train`") from None
        if isinstance(exc, pickle.UnpicklingError) and _UNPICKLER_ERROR in message:
            message = message.split(_UNPICKLER_ERROR, 1)[1].strip()  # past the advice
        reason = message.splitlines()[0][:200] if message else ""
        raise DataError(
            f"{path} cannot be loaded as this pipeline's model ({type(exc).__name__}: {reason}): "
            "it is truncated, damaged or not written by the train stage. Restore it with "
            "`dvc checkout models` or retrain with `dvc repro --force train`") from None
    return model, payload


# What a checkpoint's pickle may name: torch's own rebuild functions and storages, and the
# containers torch.save writes. Anything else is code the pickle would call.
_WEIGHTS_ONLY_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def foreign_callable(path: Path) -> str | None:
    """The first function or class outside torch's own that the pickle in ``path`` (a raw
    pickle or a torch.save zip) would call, read from its opcodes without running any; None
    when it names none or cannot be read."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":  # protocols 0-3: "module name" in the argument
                module, _, attribute = str(arg).partition(" ")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4+
                module, attribute = strings[-2], strings[-1]
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if module.split(".")[0] not in _WEIGHTS_ONLY_MODULES:
                return f"{module}.{attribute}"
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile, EOFError):
        return None
    return None
