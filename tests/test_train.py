"""The training core: learning, bit-identical CPU runs, checkpoints, divergence, resume equal to an
uninterrupted run."""

import dataclasses
import functools
import shutil
import subprocess
import sys

import pytest
import torch

from cifar_alexnet.errors import PipelineError, StopAfterCheckpoint
from cifar_alexnet.core.model import build_model
from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.core.trainer import (HISTORY_FIELDS, Accel, Checkpoint, Checkpointer,
                                        TrainingDiverged, batched_logits, fit, kernel_settings,
                                        resolve_device, seed_everything, to_device)


def train_once(params, prepared, **train_overrides):
    cfg = dataclasses.replace(params.train, **train_overrides)
    device = torch.device("cpu")
    seed_everything(params.base.seed)
    meta = load_meta(prepared)
    model = build_model(params.model, meta.mean, meta.std)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    rows = []

    class Recorder:
        def on_epoch_end(self, row):
            rows.append(row)

    result = fit(model, (to_device(train.images, train.labels, device),
                         to_device(val.images, val.labels, device)), cfg, seed=params.base.seed,
                 callbacks=[Recorder()])
    return model, result, rows


def test_deterministic_cpu_kernels_hold_while_fitting_and_are_restored_after(params, prepared):
    assert not torch.are_deterministic_algorithms_enabled()
    seen = []

    class Probe:
        def on_epoch_end(self, row):
            seen.append(torch.are_deterministic_algorithms_enabled())

    model = build_model(params.model)
    split = load_split(prepared, "val")
    data = to_device(split.images, split.labels, torch.device("cpu"))
    fit(model, (data, data), dataclasses.replace(params.train, epochs=1), seed=0,
        callbacks=[Probe()])
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    batched_logits(model, data[0], 64)
    assert not torch.are_deterministic_algorithms_enabled()


def test_inference_on_the_cpu_is_deterministic_without_loading_the_compiler():
    """`cifar-predict` and evaluate run the model eagerly: the deterministic kernels are on
    while it runs and the setting comes back after, without importing torch's compiler (1.2 s
    of a 3.8 s `cifar-predict`, for a flag only compiled code reads). Code to be compiled
    (``compiling``, as fit passes for train.compile) gets the compiler's flag too."""
    code = """
import sys, torch
from torch import nn
from cifar_alexnet.core.trainer import batched_logits, kernel_settings
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
seen = []
model.register_forward_hook(lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
batched_logits(model, torch.zeros(4, 3, 32, 32), batch_size=2)
print(seen, torch.are_deterministic_algorithms_enabled(), "torch._inductor" in sys.modules)
with kernel_settings(torch.device("cpu"), compiling=True):
    import torch._inductor.config as compiler
    print(torch.are_deterministic_algorithms_enabled(), compiler.deterministic)
print(torch.are_deterministic_algorithms_enabled(), compiler.deterministic)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    eager, compiling, after = result.stdout.splitlines()
    assert eager == "[True, True] False False"
    assert compiling == "True True" and after == "False False"


def test_batched_logits_on_cuda_keeps_the_users_cudnn_autotuning_setting():
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with kernel_settings(torch.device("cuda")):  # batched_logits's (flags only, no GPU)
            assert torch.backends.cudnn.benchmark is True
        with kernel_settings(torch.device("cuda"), cudnn_benchmark=False):  # fit, when asked
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = previous


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

    class StopAfterEpoch1:
        def on_epoch_end(self, row):
            if row["epoch"] == 1:
                raise StopAfterCheckpoint("stopped for the test")

    with pytest.raises(StopAfterCheckpoint):
        fit(model, (to_device(train.images, train.labels, device),
                    to_device(val.images, val.labels, device)),
            dataclasses.replace(params.train, epochs=2), seed=0, callbacks=[StopAfterEpoch1()],
            checkpointer=Checkpointer(tmp_path / "checkpoint.pt", {"params": params.to_dict()}))
    checkpoint = Checkpoint.load(tmp_path / "checkpoint.pt")
    assert checkpoint.epoch == 1 and checkpoint.resumable and not checkpoint.finished
    assert checkpoint.owner["params"]["train"]["lr"] == params.train.lr  # the caller's, kept
    assert checkpoint.optimizer_state["state"] and checkpoint.scheduler_state["last_epoch"] > 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint.model_state[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_diverging_loss_stops_with_epoch_and_advice(params, prepared):
    with pytest.raises(TrainingDiverged) as info:
        train_once(params, prepared, lr=1e6, optimizer="sgd", epochs=3)
    assert "epoch 1" in str(info.value) and "lower train.lr" in str(info.value)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_asking_for_cuda_without_a_gpu_names_the_problem():
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_checkpoints_are_written_by_time_and_after_the_last_epoch(params, prepared, tmp_path):
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    data = (to_device(train.images, train.labels, torch.device("cpu")),
            to_device(val.images, val.labels, torch.device("cpu")))
    path = tmp_path / "c.pt"
    written = []

    class Watcher:  # runs before the epoch's checkpoint: sees the previous one
        def on_epoch_end(self, row):
            written.append(Checkpoint.load(path).epoch if path.exists() else None)

    cfg = dataclasses.replace(params.train, epochs=3, checkpoint_seconds=3600)
    fit(build_model(params.model, meta.mean, meta.std), data, cfg, seed=0,
        callbacks=[Watcher()], checkpointer=Checkpointer(path))
    assert written == [None, None, None]  # an hour between writes: none before the end
    written.clear()
    path.unlink()
    fit(build_model(params.model, meta.mean, meta.std), data,
        dataclasses.replace(cfg, checkpoint_seconds=0), seed=0, callbacks=[Watcher()],
        checkpointer=Checkpointer(path))
    assert written == [None, 1, 2]  # 0: after every epoch


def test_the_checkpoint_after_the_last_epoch_holds_only_what_is_left_to_do(params, prepared,
                                                                          tmp_path):
    """What follows the last epoch (writing the model, logging it) needs the best weights only:
    the final checkpoint leaves out the optimizer state and the current weights, and resuming
    from it trains nothing and returns the same result."""
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    data = (to_device(train.images, train.labels, torch.device("cpu")),
            to_device(val.images, val.labels, torch.device("cpu")))
    cfg = dataclasses.replace(params.train, epochs=3, checkpoint_seconds=0)
    full, final = tmp_path / "full.pt", tmp_path / "final.pt"

    class Keep:  # the epoch-2 checkpoint, full
        def on_epoch_end(self, row):
            if row["epoch"] == 3:
                shutil.copy(final, full)

    result = fit(build_model(params.model, meta.mean, meta.std), data, cfg, seed=0,
                 callbacks=[Keep()], checkpointer=Checkpointer(final))
    last = Checkpoint.load(final)
    assert last.finished and last.epoch == 3
    assert last.optimizer_state is None and final.stat().st_size < full.stat().st_size / 2
    for name, tensor in result.best_state.items():
        assert torch.equal(last.model_state[name], tensor), name

    def boom(self, row):
        raise AssertionError("a finished training ran an epoch again")

    resumed_model = build_model(params.model, meta.mean, meta.std)
    resumed = fit(resumed_model, data, cfg, seed=0, resume=last,
                  callbacks=[type("Boom", (), {"on_epoch_end": boom})()])
    assert (resumed.best_epoch, resumed.best_val_acc, resumed.history) == (
        result.best_epoch, result.best_val_acc, result.history)
    for name, tensor in result.best_state.items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


def test_a_started_checkpoint_names_its_owner_and_resumes_nothing_and_other_files_are_refused(
        params, prepared, tmp_path):
    path = tmp_path / "c.pt"
    Checkpointer(path, {"mlflow_run_id": "abc"}).started()
    started = Checkpoint.load(path)
    assert started.owner == {"mlflow_run_id": "abc"} and not started.resumable
    model = build_model(params.model)
    split = load_split(prepared, "val")
    data = to_device(split.images, split.labels, torch.device("cpu"))
    result = fit(model, (data, data), dataclasses.replace(params.train, epochs=1), seed=0,
                 resume=started)
    assert result.resumed_from_epoch == 0 and [r["epoch"] for r in result.history] == [1]
    torch.save({"model_state": model.state_dict(), "class_names": []}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by fit"):
        Checkpoint.load(tmp_path / "model.pt")


def test_resume_from_a_checkpoint_is_bit_identical_to_an_uninterrupted_run(params, prepared,
                                                                           tmp_path):
    device = torch.device("cpu")
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    data = (to_device(train.images, train.labels, device), to_device(val.images, val.labels, device))
    cfg = dataclasses.replace(params.train, epochs=3)

    def fresh_model():
        seed_everything(params.base.seed)
        return build_model(params.model, meta.mean, meta.std)

    straight_model = fresh_model()
    straight = fit(straight_model, data, cfg, seed=params.base.seed)

    class StopAfter2(Exception):
        pass

    class Kill:
        def on_epoch_end(self, row):
            if row["epoch"] == 2:
                raise StopAfter2  # callbacks run before the checkpoint: epoch 1's is the last

    with pytest.raises(StopAfter2):
        fit(fresh_model(), data, cfg, seed=params.base.seed, callbacks=[Kill()],
            checkpointer=Checkpointer(tmp_path / "c.pt"))
    # A new process: different global RNG state until the checkpoint restores it.
    torch.manual_seed(12345)
    resumed_model = build_model(params.model, meta.mean, meta.std)
    resumed = fit(resumed_model, data, cfg, seed=params.base.seed,
                  resume=Checkpoint.load(tmp_path / "c.pt"))
    assert resumed.resumed_from_epoch == 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
    assert (resumed.best_epoch, resumed.best_val_acc) == (straight.best_epoch, straight.best_val_acc)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


def test_label_smoothing_bounds_the_training_loss(params, prepared):
    # With smoothing eps the target keeps eps/10 on every class, so the cross-entropy can never
    # drop below that target's entropy; unsmoothed training goes well below it.
    eps = 0.5
    target = torch.full((10,), eps / 10)
    target[0] += 1 - eps
    floor = float(-(target * target.log()).sum())
    _, smoothed, _ = train_once(params, prepared, label_smoothing=eps)
    _, plain, _ = train_once(params, prepared, label_smoothing=0.0)
    assert min(r["train_loss"] for r in smoothed.history) >= floor
    assert plain.history[-1]["train_loss"] < floor


def test_flip_tta_averages_the_logits_of_image_and_mirror(params):
    model = build_model(params.model)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    tta = batched_logits(model, images, batch_size=4, flip_tta=True)
    model.eval()
    with torch.no_grad():
        expected = (model(images) + model(images.flip(3))) / 2
    assert torch.allclose(tta, expected, atol=1e-6)
    assert not torch.allclose(batched_logits(model, images, batch_size=4), expected, atol=1e-6)


def test_speed_settings_resolve_to_exact_fp32_on_cpu_and_bf16_when_asked(params, prepared):
    cpu = torch.device("cpu")
    auto = Accel.for_config(params.train, cpu)
    assert auto.autocast_dtype is None and not auto.channels_last  # CPU stays exact
    cuda = Accel.for_config(params.train, torch.device("cuda"))
    assert cuda.autocast_dtype == torch.bfloat16 and cuda.channels_last
    forced = Accel.for_config(dataclasses.replace(params.train, precision="bf16"), cpu)
    assert forced.autocast_dtype == torch.bfloat16
    # bf16 autocast runs the same code path on CPU; logits come back as float32.
    model, result, _ = train_once(params, prepared, precision="bf16", epochs=2)
    val = load_split(prepared, "val")
    logits = batched_logits(model, torch.from_numpy(val.images), 64, forced)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert result.best_val_acc > 0.2


@pytest.mark.slow
def test_compiled_training_checkpoints_load_into_an_uncompiled_model(params, prepared, tmp_path,
                                                                    monkeypatch):
    # What is checked here is dynamo's part (the graphs captured, the wrapped module's state
    # dict): the code generator behind it does not change either. Inductor's C++ code generation
    # takes a minute per CPU with a cold cache, so the graphs go to AOTAutograd's eager backend
    # (forward and backward traced as inductor would get them); tests/test_cuda.py compiles
    # with inductor on a GPU.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    device = torch.device("cpu")
    meta = load_meta(prepared)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    model = build_model(params.model, meta.mean, meta.std)
    assert len(train.labels) % params.train.batch_size  # a last, shorter batch
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = fit(model, (to_device(train.images, train.labels, device),
                         to_device(val.images, val.labels, device)),
                 dataclasses.replace(params.train, epochs=2, compile=True), seed=0,
                 checkpointer=Checkpointer(tmp_path / "c.pt"))
    # The training step only, one graph per batch shape (the full one and the last, shorter
    # one), compiled once for both epochs; validation (eval mode, its own batch sizes) runs
    # uncompiled and adds none.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    fresh = build_model(params.model, meta.mean, meta.std)
    fresh.load_state_dict(Checkpoint.load(tmp_path / "c.pt").model_state)
    fresh.load_state_dict(result.best_state)
    assert torch.isfinite(batched_logits(fresh, torch.from_numpy(val.images), 64)).all()
