"""The model tour: every `model.arch` (LeNet-5, AlexNet, ZFNet, VGG, GoogLeNet, ResNet) takes
CIFAR images to 10 logits, honours model.width (and model.dropout where the net has dropout),
states its size in the model summary, learns in 2 epochs, and its logged MLflow model serves."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from cifar_alexnet import tracking
from cifar_alexnet.config import ARCHS, ModelConfig
from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.core.architectures import ARCHITECTURES
from cifar_alexnet.core.model import build_model, count_parameters, summary
from cifar_alexnet.core.trainer import fit, seed_everything, to_device

TOUR = [a for a in ARCHS if a != "alexnet_paper"]  # 227 x 227: its own tests in test_model.py
SMALL = 0.125


def config(arch: str, width: float = SMALL, dropout: float = 0.3) -> ModelConfig:
    return ModelConfig(arch, width, dropout, "batch")


def test_every_arch_params_accept_is_one_the_registry_builds_one_way():
    assert ARCHS == tuple(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():
        assert (arch.spec is None) != (arch.zoo is None), name


@pytest.mark.parametrize("arch", TOUR)
def test_shapes_size_and_summary(arch):
    model = build_model(config(arch)).eval()
    logits = model(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    text = summary(model)
    assert f"{count_parameters(model):,}" in text.splitlines()[-2]  # the total row
    assert "GFLOP per image" in text.splitlines()[-1]
    gflop = float(text.splitlines()[-1].split()[0])
    assert gflop > 0
    # width scales the channels: a wider net has clearly more parameters
    assert count_parameters(build_model(config(arch, width=2 * SMALL))) > \
        2 * count_parameters(model)


@pytest.mark.parametrize("arch", TOUR)
def test_model_dropout_and_norm_act_exactly_where_the_registry_says(arch):
    """What tuning relies on (it searches model.dropout only where it is used) and the docs
    say: the registry's flags are the networks' truth."""
    rates = {m.p for m in build_model(config(arch, dropout=0.37)).modules()
             if isinstance(m, nn.Dropout)}
    assert rates == ({0.37} if ARCHITECTURES[arch].dropout else set()), rates
    lrn = any(isinstance(m, nn.LocalResponseNorm)
              for m in build_model(dataclasses.replace(config(arch), norm="lrn")).modules())
    assert lrn == ARCHITECTURES[arch].norm


@pytest.mark.slow
@pytest.mark.parametrize("arch", TOUR)
def test_each_arch_learns_in_two_epochs_on_the_cpu(arch, params, prepared):
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    device = torch.device("cpu")
    seed_everything(0)
    # LeNet-5 is small at full width (62 k parameters); an eighth of it cannot learn
    width = 1.0 if arch == "lenet5" else SMALL
    model = build_model(config(arch, width, dropout=0.1), meta.mean, meta.std)
    cfg = dataclasses.replace(params.train, epochs=2)
    result = fit(model, (to_device(train.images, train.labels, device),
                         to_device(val.images, val.labels, device)), cfg, seed=0)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_acc >= 0.2, result.history  # 10 classes: chance is 0.1


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(a for a, spec in ARCHITECTURES.items() if spec.zoo)
                         + ["zfnet"])
def test_the_logged_model_of_each_arch_serves_what_the_network_computes(arch, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("zoo")
    torch.manual_seed(0)
    model = build_model(config(arch)).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    with mlflow.start_run():
        uri = tracking.log_model(model, images[:2], [str(i) for i in range(10)])
    predict, names = tracking.load_logged_model(uri)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.allclose(predict(images), expected, atol=1e-4)
    assert names == [str(i) for i in range(10)]
