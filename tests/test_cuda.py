"""The GPU paths (`pytest -m cuda`): bf16 training learns, the speed settings (channels_last,
torch.compile, the fused optimizer) compute what the plain path does within stated tolerances,
resume continues a GPU training, and GPU evaluation agrees with the CPU. Skipped, with the
reason, where no CUDA device is visible. Imports torch and the training core only, so it runs on
a GPU box without MLflow, DVC or Optuna (`PYTHONPATH=src pytest -o addopts= -m cuda`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.core.model import build_model
from cifar_alexnet.core.trainer import (Accel, Checkpoint, Checkpointer, batched_logits, fit,
                                        make_optimizer, seed_everything, to_device)
from cifar_alexnet.errors import StopAfterCheckpoint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device visible (these run on a GPU machine)")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def splits(prepared):
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    return (to_device(train.images, train.labels, CUDA), to_device(val.images, val.labels, CUDA),
            load_meta(prepared))


def gpu_cfg(params, **overrides):
    return dataclasses.replace(params.train, device="cuda", **overrides)


def new_model(params, meta, device=CUDA, seed=0):
    seed_everything(seed)
    return build_model(params.model, meta.mean, meta.std).to(device)


def test_bf16_training_learns_and_reports_its_peak_memory(params, splits, record_property):
    train, val, meta = splits
    torch.cuda.reset_peak_memory_stats()
    result = fit(new_model(params, meta), (train, val), gpu_cfg(params, precision="bf16"), seed=0)
    peak = torch.cuda.max_memory_allocated()
    record_property("peak_gpu_memory_bytes", peak)
    print(f"peak GPU memory {peak / 2**20:.1f} MiB")
    assert result.best_val_acc >= 0.4  # 10 classes: chance is 0.1 (the CPU test's bar)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 0 < peak < torch.cuda.get_device_properties(0).total_memory


@pytest.fixture
def exact_fp32():
    """fp32 without TF32, so that layouts and compilation are compared, not matmul precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_channels_last_compile_and_bf16_forward_agree_with_the_plain_path(params, splits,
                                                                          exact_fp32):
    _, (images, _), meta = splits
    model = new_model(params, meta).eval()
    batch = images[:256]
    plain = batched_logits(model, batch, 256, Accel(CUDA))
    compiled = batched_logits(torch.compile(model), batch, 256, Accel(CUDA))
    bf16 = batched_logits(model, batch, 256, Accel(CUDA, torch.bfloat16))
    channels_last = batched_logits(model.to(memory_format=torch.channels_last), batch, 256,
                            Accel(CUDA, channels_last=True))
    scale = plain.abs().max()
    assert torch.allclose(channels_last, plain, atol=1e-4 * scale, rtol=1e-4)
    assert torch.allclose(compiled, plain, atol=1e-4 * scale, rtol=1e-4)
    # bf16 keeps 8 bits of mantissa: logits within a few per cent, the same classes
    assert (bf16 - plain).abs().max() <= 0.05 * scale
    assert (bf16.argmax(1) == plain.argmax(1)).float().mean() >= 0.98


def test_the_fused_optimizer_takes_the_steps_the_unfused_one_does(params, splits, exact_fp32):
    (images, labels), _, meta = splits
    models = [new_model(params, meta).eval() for _ in range(2)]  # eval: no dropout draws
    for model, fused in zip(models, (True, False)):
        cfg = gpu_cfg(params, fused_optimizer=fused)
        optimizer = make_optimizer(model, cfg, CUDA)
        for step in range(5):
            idx = slice(step * 64, (step + 1) * 64)
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


class _StopAfter:
    """fit() callback: a training killed after ``epoch`` (fit checkpoints it, then stops)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, row: dict[str, float]) -> None:
        if row["epoch"] == self.epoch:
            raise StopAfterCheckpoint("stopped for the test")


def test_a_resumed_gpu_training_continues_where_it_stopped(params, splits, tmp_path):
    train, val, meta = splits
    cfg = gpu_cfg(params, epochs=4)
    straight = fit(new_model(params, meta), (train, val), cfg, seed=0)
    path = tmp_path / "train.pt"
    with pytest.raises(StopAfterCheckpoint):
        fit(new_model(params, meta), (train, val), cfg, seed=0, callbacks=[_StopAfter(2)],
            checkpointer=Checkpointer(path))
    checkpoint = Checkpoint.load(path)
    assert checkpoint.epoch == 2
    resumed = fit(new_model(params, meta, seed=123), (train, val), cfg, seed=0, resume=checkpoint)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    # not bit-identical on a GPU (atomics in the backward), but the same training
    for a, b in zip(resumed.history, straight.history):
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.1
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.15)


def test_gpu_evaluation_agrees_with_the_cpu(params, splits, exact_fp32):
    train, val, meta = splits
    model = new_model(params, meta)
    fit(model, (train, val), gpu_cfg(params, epochs=2), seed=0)
    images = val[0]
    on_gpu = batched_logits(model.eval(), images, 500, Accel(CUDA), flip_tta=True).cpu()
    on_cpu = batched_logits(model.cpu(), images.cpu(), 500, Accel(torch.device("cpu")), flip_tta=True)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean() >= 0.99
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3 * on_cpu.abs().max(), rtol=1e-3)
