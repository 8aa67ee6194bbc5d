import dataclasses

import pytest
import torch

from cifar_alexnet.archive import read_archive
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.model import build_model
from cifar_alexnet.prepare import load_meta, load_split, prepare
from cifar_alexnet.train import (HISTORY_FIELDS, TrainingDiverged, fit, load_checkpoint,
                                 resolve_device, seed_everything, to_device)


@pytest.fixture(scope="module")
def prepared(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(read_archive(archive.path), 0.1, 42, out)
    return out


def train_once(params, prepared, **train_overrides):
    cfg = dataclasses.replace(params.train, **train_overrides)
    device = torch.device("cpu")
    seed_everything(params.base.seed, device)
    meta = load_meta(prepared)
    model = build_model(params.model, meta.mean, meta.std)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    rows = []

    class Recorder:
        def on_epoch_end(self, row):
            rows.append(row)

    result = fit(model, to_device(train.images, train.labels, device),
                 to_device(val.images, val.labels, device), cfg, params.base.seed,
                 callbacks=[Recorder()])
    return model, result, rows


def test_fit_learns_and_returns_best_validation_accuracy(params, prepared):
    model, result, rows = train_once(params, prepared)
    assert result.best_val_acc >= 0.4  # 10 classes: chance is 0.1
    assert result.best_val_acc == max(r["val_acc"] for r in result.history)
    assert result.history[result.best_epoch - 1]["val_acc"] == result.best_val_acc
    assert rows == result.history and len(rows) == params.train.epochs
    assert set(rows[0]) == set(HISTORY_FIELDS)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_cpu_training_is_bit_identical_for_the_same_seed(params, prepared):
    model_a, result_a, _ = train_once(params, prepared, epochs=2)
    model_b, result_b, _ = train_once(params, prepared, epochs=2)
    assert result_a.history[-1]["val_loss"] == result_b.history[-1]["val_loss"]
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_holds_model_optimizer_scheduler_epoch_and_params(params, prepared, tmp_path):
    device = torch.device("cpu")
    meta = load_meta(prepared)
    model = build_model(params.model, meta.mean, meta.std)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    fit(model, to_device(train.images, train.labels, device),
        to_device(val.images, val.labels, device), dataclasses.replace(params.train, epochs=2),
        0, checkpoint_path=tmp_path / "checkpoint.pt",
        checkpoint_extra={"params": params.to_dict()})
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    assert checkpoint["params"]["train"]["lr"] == params.train.lr
    assert checkpoint["optimizer_state"]["state"] and checkpoint["scheduler_state"]["last_epoch"] > 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint["model_state"][name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_diverging_loss_stops_with_epoch_and_advice(params, prepared):
    with pytest.raises(TrainingDiverged) as info:
        train_once(params, prepared, lr=1e6, optimizer="sgd", epochs=3)
    assert "epoch 1" in str(info.value) and "lower train.lr" in str(info.value)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA GPU"):
            resolve_device("cuda")
