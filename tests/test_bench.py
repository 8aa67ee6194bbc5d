"""The GPU benchmark's pieces, checked on CPU: FLOP counts, device peaks, and a baseline that feeds
the network what the trainer feeds it."""

import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optim_module

from cifar_alexnet.tools import throughput
from cifar_alexnet.config import ModelConfig
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.core.model import build_model
from cifar_alexnet.tools.synthetic import write_synthetic_archive
from cifar_alexnet.core.transforms import CROP_PADDING, random_crop_flip

from helpers import ROOT, run


@pytest.fixture(scope="module")
def data(archive):
    return throughput.load_archive(archive.path, val_size=0.1, seed=42)


@pytest.fixture
def small(data):
    """Few images: the training runs below check bookkeeping, not learning."""
    return data.head({"train": 128, "val": 32, "test": 64})


@pytest.fixture
def short(params):
    """The tiny params with two epochs of 4 steps (on ``small``)."""
    return dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=2))


def conv_macs(size_out, c_in, c_out, k):
    return size_out * size_out * c_out * c_in * k * k


def test_flops_per_image_match_the_layer_arithmetic_of_alexnet():
    # 32x32 AlexNet (architectures.ARCHITECTURES["alexnet"]) worked out by hand: output size x MACs each.
    expected = (conv_macs(29, 3, 96, 4)          # 32 - 4 + 1 = 29
                + conv_macs(29, 96, 256, 5)      # padded, then pooled to 14
                + conv_macs(14, 256, 384, 3)
                + conv_macs(14, 384, 384, 3)
                + conv_macs(14, 384, 256, 3)     # pooled to 6
                + 256 * 6 * 6 * 4096 + 4096 * 4096 + 4096 * 10)
    model = build_model(ModelConfig("alexnet", 1.0, 0.5, "batch"))
    assert throughput.multiply_adds(model) == expected
    flops = throughput.flops_per_image(model)
    # forward, then weight and input gradients, except the first layer's input gradient
    assert flops == 2 * (3 * expected - conv_macs(29, 3, 96, 4))
    assert flops == pytest.approx(7.09e9, rel=0.01)  # ~7.1 GFLOP per training image


def test_flop_count_follows_the_width():
    narrow = throughput.multiply_adds(build_model(ModelConfig("alexnet", 0.5, 0.5, "batch")))
    full = throughput.multiply_adds(build_model(ModelConfig("alexnet", 1.0, 0.5, "batch")))
    # All layers but the first (3 input channels) and last (10 outputs) scale with width^2.
    assert 0.25 * full < narrow < 0.3 * full


def test_peak_lookup_tells_device_variants_apart_and_admits_what_it_does_not_know():
    peak = throughput.peak_tflops_for_name
    assert peak("NVIDIA H100 PCIe") < peak("NVIDIA H100 80GB HBM3")  # not the SXM figure
    assert peak("NVIDIA H100 NVL") < peak("NVIDIA H100 80GB HBM3")
    assert peak("NVIDIA L40S") > peak("NVIDIA L4")  # "L4" is a substring of "L40S"
    assert peak("NVIDIA GH200 480GB") == peak("NVIDIA H200") == peak("nvidia h200")
    assert peak("NVIDIA A100-SXM4-80GB") < peak("NVIDIA H100 80GB HBM3")
    assert peak("Tesla T4") is None and peak("") is None  # no figure rather than a wrong one


def test_cpu_has_no_peak():
    assert throughput.device_peak_tflops(torch.device("cpu")) is None


def candidate_crops(image, mean, std):
    """Every crop/flip augmentation can make of one uint8 image, normalised: (162, 3, 32, 32)."""
    p = CROP_PADDING
    padded = F.pad(torch.from_numpy(image).float() / 255, (p, p, p, p))
    crops = [padded[:, y:y + 32, x:x + 32] for y, x in itertools.product(range(2 * p + 1),
                                                                          repeat=2)]
    crops = torch.stack(crops + [c.flip(2) for c in crops])
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (crops - mean) / std


def matches_a_candidate(sample, candidates):
    return bool(((candidates - sample).abs().amax(dim=(1, 2, 3)) < 1e-5).any())


def test_baseline_dataset_gives_the_inputs_the_trainer_gives_the_network(data):
    model = build_model(ModelConfig("alexnet", 0.0625, 0.5, "batch"), data.mean, data.std)
    images = data.train_images[:8]

    # Without augmentation: ToTensor + Normalize == the model's own first layer.
    plain = throughput.TutorialDataset(images, data.train_labels[:8],
                                  throughput.tutorial_transform(data.mean, data.std, augment=False))
    tutorial = torch.stack([plain[i][0] for i in range(len(plain))])
    with torch.no_grad():
        trainer = model.adapter(torch.from_numpy(images))
    assert tutorial.shape == trainer.shape == (8, 3, 32, 32)
    assert tutorial.dtype == trainer.dtype == torch.float32
    torch.testing.assert_close(tutorial, trainer, atol=1e-5, rtol=0)
    assert isinstance(plain[0][1], int)

    # With augmentation: both pipelines only ever produce one of the same 162 crops/flips
    # (zero padding included), so their value ranges agree too.
    augmented = throughput.TutorialDataset(images, data.train_labels[:8],
                                      throughput.tutorial_transform(data.mean, data.std))
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        candidates = candidate_crops(images[i], data.mean, data.std)
        for _ in range(5):
            assert matches_a_candidate(augmented[i][0], candidates)
            with torch.no_grad():
                batch = random_crop_flip(torch.from_numpy(images[i:i + 1]), generator)
                assert matches_a_candidate(model.adapter(batch)[0], candidates)


def test_archive_is_split_like_the_prepare_stage(data):
    assert data.sizes == {"train": 450, "val": 50, "test": 200}
    assert not data.full_size
    assert data.train_images.dtype == np.uint8 and data.train_images.shape[1:] == (3, 32, 32)
    assert data.head({"train": 10, "test": 7}).sizes == {"train": 10, "val": 50, "test": 7}
    with pytest.raises(PipelineError, match="unknown split"):
        data.head({"tset": 7})


def test_trainer_throughput_times_exactly_the_requested_steps(params, small):
    cfg = dataclasses.replace(params.train, batch_size=16)
    result = throughput.trainer_throughput(params.model, small, cfg, torch.device("cpu"), 0,
                                      warmup_steps=2, steps=3)
    assert result["images"] == 3 * 16 and result["images_per_s"] > 0
    assert result["precision"] == "fp32" and not result["fused_optimizer"]
    # The step hook is removed again, whether or not fit() was stopped by it.
    assert not optim_module._global_optimizer_post_hooks


def test_trainer_throughput_repeats_a_short_split(params, small):
    # 128 images at batch 16 are 8 steps per epoch; 12 steps must still run in one epoch
    # (an epoch end inside the window would run the validation pass and fail on it here).
    result = throughput.trainer_throughput(params.model, small,
                                      dataclasses.replace(params.train, batch_size=16),
                                      torch.device("cpu"), 0, warmup_steps=4, steps=8)
    assert result["images"] == 8 * 16


def test_baseline_throughput_runs_through_a_dataloader(params, small):
    result = throughput.baseline_throughput(params.model, small, params.train, torch.device("cpu"), 0,
                                       warmup_steps=1, steps=2, workers=0)
    assert result["images"] == 2 * throughput.BASELINE_BATCH_SIZE and result["images_per_s"] > 0
    assert result["precision"] == "fp32" and result["workers"] == 0


class DiesInWorkers(throughput.TutorialDataset):
    """A dataset whose DataLoader workers die of SIGBUS, as they do when /dev/shm is too small
    for their batches; in the main process it works."""

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGBUS)
        return super().__getitem__(index)


class BrokenInWorkers(throughput.TutorialDataset):
    """A dataset whose code raises in the DataLoader workers (and would work in the main
    process): an error of the data code, not a worker dying."""

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            raise ValueError("a broken image")
        return super().__getitem__(index)


def test_baseline_falls_back_to_no_workers_when_its_workers_die(params, small, monkeypatch):
    monkeypatch.setattr(throughput, "TutorialDataset", DiesInWorkers)
    result = throughput.baseline_throughput(params.model, small, params.train, torch.device("cpu"), 0,
                                       warmup_steps=1, steps=2, workers=1)
    assert result["workers"] == 0 and result["images_per_s"] > 0
    assert result["worker_failure"].startswith("1 workers: RuntimeError: DataLoader worker")


def test_baseline_still_fails_on_errors_that_are_not_the_workers(params, small, monkeypatch):
    monkeypatch.setattr(throughput, "TutorialDataset", BrokenInWorkers)
    # Raised, not measured around with 0 workers: the fallback is for dying workers only.
    with pytest.raises(ValueError, match="a broken image"):
        throughput.baseline_throughput(params.model, small, params.train, torch.device("cpu"), 0,
                                  warmup_steps=1, steps=2, workers=1)


def test_stage_wall_time_times_the_real_train_stage_in_a_throwaway_store(short, small,
                                                                          monkeypatch, tmp_path):

    from cifar_alexnet.core import trainer
    from cifar_alexnet.stages import train as stage
    from cifar_alexnet import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    stores = []
    monkeypatch.setattr(tracking.EpochLogger, "on_epoch_end",  # a slow store, seen per epoch
                        lambda self, row, logged=tracking.EpochLogger.on_epoch_end: (
                            stores.append(os.environ["MLFLOW_TRACKING_URI"]), time.sleep(0.2),
                            logged(self, row))[-1])
    patched = (trainer.batched_logits, trainer.Checkpointer.save, stage.fit, stage.load_split,
               tracking.training_run, tracking.log_figure, tracking.EpochLogger.on_epoch_end)
    # short: checkpoint_seconds 0, so a checkpoint after each of the 2 epochs
    result = throughput.stage_wall_time(short, small.head({"train": 64, "val": 16}),
                                        torch.device("cpu"), epochs=2)
    seconds = result["seconds"]
    assert list(seconds) == list(throughput.STAGE_PARTS)
    assert sum(seconds.values()) == pytest.approx(result["wall_seconds"])
    assert all(seconds[part] > 0 for part in ("load", "to_device", "loop", "evaluation",
                                              "checkpoint", "model_file"))
    assert seconds["logging"] >= 0.4  # both epochs' metrics, and not counted as loop
    assert result["overhead"] == pytest.approx(
        (result["wall_seconds"] - seconds["loop"]) / seconds["loop"])
    assert result["checkpoints"] == 2 and result["checkpoint_bytes"] > 0
    assert result["mlflow_logging"] is True
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    # the stage logged to a throwaway store, not the caller's, which is as it was
    assert len(stores) == 2 and "mine.db" not in stores[0]
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mine.db'}"
    assert not (tmp_path / "mine.db").exists()
    assert (trainer.batched_logits, trainer.Checkpointer.save, stage.fit, stage.load_split,
            tracking.training_run, tracking.log_figure,
            tracking.EpochLogger.on_epoch_end) == patched  # put back


def test_stage_wall_time_times_the_training_core_where_the_stage_cannot_run(short, small,
                                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "cifar_alexnet.stages.train", None)  # as without MLflow
    result = throughput.stage_wall_time(short, small.head({"train": 64, "val": 16}),
                                        torch.device("cpu"), epochs=2)
    assert result["mlflow_logging"] is False
    assert result["seconds"]["load"] == result["seconds"]["logging"] == 0
    assert result["checkpoints"] == 2 and result["seconds"]["loop"] > 0
    assert sum(result["seconds"].values()) == pytest.approx(result["wall_seconds"])


def test_generated_data_has_the_sizes_and_statistics_asked_for(monkeypatch):
    from cifar_alexnet.stages.prepare import channel_stats

    monkeypatch.setattr(throughput, "GENERATED_CHUNK", 64)  # several chunks per split
    sizes = {"train": 150, "val": 20, "test": 30}
    data = throughput.generated_data(sizes, seed=3)
    assert data.sizes == sizes and data.train_images.dtype == np.uint8
    assert data.train_images.shape[1:] == (3, 32, 32) and data.test_labels.dtype == np.int64
    assert set(np.unique(data.train_labels)) == set(range(10))
    mean, std = channel_stats(data.train_images)  # what prepare computes
    np.testing.assert_allclose(data.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(data.std, std, rtol=1e-4)
    # Chunks draw from their own seeds: no chunk repeats another...
    assert not np.array_equal(data.train_images[:64], data.train_images[64:128])
    # ...and the same seed gives the same images, whatever thread drew them.
    again = throughput.generated_data(sizes, seed=3)
    assert np.array_equal(again.train_images, data.train_images)
    assert np.array_equal(again.val_labels, data.val_labels)
    with pytest.raises(PipelineError, match="sizes >= 1"):
        throughput.generated_data({"train": 10, "val": 0, "test": 5}, seed=3)


def test_time_to_accuracy_reports_first_epoch_at_target(short, small):
    result = throughput.time_to_accuracy(short, small, torch.device("cpu"), target_acc=0.0,
                                    budget_seconds=3600)
    assert result["epoch_at_target"] == 1
    assert result["seconds_to_target"] == result["history"][0]["seconds"] > 0
    assert result["epochs_run"] == 2 and result["stopped_by"] == "recipe finished"
    best = max(result["history"], key=lambda r: r["test_acc"])
    assert result["best_acc_within_budget"] == best["test_acc"]


def test_time_to_accuracy_stops_when_the_budget_is_spent(short, small):
    result = throughput.time_to_accuracy(short, small, torch.device("cpu"), target_acc=1.01,
                                    budget_seconds=0.0)
    # The first epoch ends past a zero budget: it stops the run but does not count.
    assert result["epochs_run"] == 1 and result["stopped_by"] == "budget spent"
    assert result["seconds_to_target"] is None and result["best_acc_within_budget"] is None


def test_run_benchmark_reports_every_figure(short, small):
    options = throughput.BenchOptions(warmup_steps=1, steps=2, budget_seconds=60, workers=0,
                                 peak_tflops=100.0)
    results = throughput.run_benchmark(short, small, torch.device("cpu"), options)
    tp = results["throughput"]
    assert tp["speedup"] == pytest.approx(tp["trainer"]["images_per_s"]
                                          / tp["baseline"]["images_per_s"])
    flops = results["model"]["flops_per_train_image"]
    trainer = tp["trainer"]
    assert trainer["tflops"] == pytest.approx(trainer["images_per_s"] * flops / 1e12)
    assert trainer["fraction_of_peak"] == pytest.approx(trainer["tflops"] / 100.0)
    assert results["time_to_accuracy"]["target_acc"] == throughput.SUBSET_TARGET_ACC
    assert results["params"]["model"]["width"] == short.model.width
    json.dumps(results)  # everything is JSON-serialisable
    table = throughput.format_table(results)
    assert "speed-up" in table and "[subset]" in table


def test_bench_imports_with_torch_alone():
    code = ("import sys, cifar_alexnet.tools.throughput; "
            "print(sorted({'mlflow', 'dvc', 'optuna', 'yaml', 'sklearn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_synthetic_archive(archive, per_batch=60, n_test=150, seed=1)
    out = tmp_path / "results.json"
    proc = run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--archive",
                str(archive), "--params", str(ROOT / "params.yaml"), "--json", str(out)],
               cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert {"device", "torch", "peak_bf16_tflops", "data", "model", "params", "throughput",
            "time_to_accuracy", "smoke"} <= set(results)
    tp = results["throughput"]
    assert tp["baseline"]["images_per_s"] > 0 and tp["trainer"]["images_per_s"] > 0
    assert tp["speedup"] > 0
    assert results["params"]["model"]["width"] == 0.0625  # the smoke override
    assert results["time_to_accuracy"]["epochs_run"] >= 1
    assert proc.stdout.rstrip().splitlines()[-1].startswith("  (")  # the table comes last
    assert "speed-up (b)/(a)" in proc.stdout


@functools.cache
def load_gpu_proof():
    """bench/gpu_proof.py as a module (bench/ holds scripts, not a package); registered in
    sys.modules because its dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "bench" / "gpu_proof.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The one device call docs/gpu.md tells a GPU lease to make.
DEVICE_CALL = re.compile(r'run\(command="(?P<command>[^"]+)",\s*carry=(?P<carry>\[[^\]]*\]),'
                         r'\s*timeout_s=(?P<timeout>\d+)\)')


def documented_device_call():
    match = DEVICE_CALL.search((ROOT / "docs" / "gpu.md").read_text())
    assert match, "docs/gpu.md no longer holds the device call run(command=..., carry=..., ...)"
    return shlex.split(match["command"]), json.loads(match["carry"]), int(match["timeout"])


def test_the_documented_device_call_fits_the_lease():
    command, carry, timeout_s = documented_device_call()
    gpu_proof = load_gpu_proof()
    assert command[:2] == ["bash", "bench/gpu-proof.sh"]
    # The dev subset must travel: it lies in a carried folder.
    archive = Path(command[command.index("--dev-archive") + 1])
    assert any(archive.is_relative_to(folder) for folder in carry)
    # The watchdog ends the proof at its budget; the timeout leaves time to write and return,
    # and one command may run 10 minutes at most.
    assert gpu_proof.FULL.budget_seconds + 30 <= timeout_s <= 600


@pytest.fixture
def gpu_machine(tmp_path, archive):
    """What the GPU machine has: the working tree alone (tracked and untracked-not-ignored
    files, as the device tool sends it) plus the carried dev-archive folder; `python3` but no
    `python`; torch but no MLflow, DVC or Optuna. Returns (checkout, env, out)."""
    checkout = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree does not travel
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    command, _, _ = documented_device_call()
    dev_archive = checkout / command[command.index("--dev-archive") + 1]
    dev_archive.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive.path, dev_archive)

    blocked = tmp_path / "blocked"
    for package in ("mlflow", "dvc", "optuna"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not installed on the GPU machine')\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").write_text("#!/bin/sh\necho 'python called; only python3 is "
                                    "guaranteed' >&2\nexit 97\n")
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(blocked),
           "OUT": str(out)}
    for package in ("mlflow", "dvc", "optuna"):  # the shims work, or this proves nothing
        probe = run(["python3", "-c", f"import {package}"], cwd=checkout, **env)
        assert probe.returncode == 1 and "not installed on the GPU machine" in probe.stderr
    return checkout, env, out


def assert_finite(value, where="results"):
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_finite(item, f"{where}[{i}]")


@pytest.mark.slow
def test_the_documented_gpu_proof_rehearses_on_a_cpu_with_torch_alone(gpu_machine):
    """The device call of docs/gpu.md, with --smoke, where the GPU machine's limits hold: every
    default section runs and reports positive, finite figures into $OUT; the table comes last."""
    checkout, env, out = gpu_machine
    gpu_proof = load_gpu_proof()
    command, _, _ = documented_device_call()
    proc = run([*command, "--smoke"], cwd=checkout, timeout=600, **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu-proof.json").read_text())
    sections = results["sections"]
    assert {name: entry["status"] for name, entry in sections.items()} == {
        name: "ok" for name in gpu_proof.DEFAULT_SECTIONS}
    assert list(sections) == list(gpu_proof.DEFAULT_SECTIONS)  # alexnet_paper is opt-in
    assert results["complete"] and results["smoke"] and results["torch"] == torch.__version__
    assert_finite(results)
    result = {name: entry["result"] for name, entry in sections.items()}

    assert result["data"]["generated"]["sizes"] == gpu_proof.SMOKE.generated
    rows = result["sweep"]["rows"]
    assert [(r["batch_size"], r["compile"]) for r in rows] == [
        (b, False) for b in gpu_proof.SMOKE.sweep_batches]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert result["baseline"]["images_per_s"] > 0
    assert results["summary"]["best_vs_baseline"] > 0

    stage = result["stage"]
    assert stage["epochs"] == gpu_proof.SMOKE.stage_epochs
    assert stage["checkpoints"] == stage["epochs"]  # smoke: checkpoint_seconds=0
    assert stage["seconds"]["loop"] > 0 and stage["seconds"]["evaluation"] > 0
    assert stage["seconds"]["checkpoint"] > 0 and stage["checkpoint_bytes"] > 0
    assert sum(stage["seconds"].values()) == pytest.approx(stage["wall_seconds"])
    # MLflow could not be imported: the stage ran without it, as on the GPU machine
    assert stage["mlflow_logging"] is False

    assert result["tta_dev"]["epochs_run"] >= 1
    assert 0 <= result["tta_dev"]["best_acc_within_budget"] <= 1
    cuda_tests = result["cuda_tests"]
    test_count = (ROOT / "tests" / "test_cuda.py").read_text().count("\ndef test_")
    assert cuda_tests["skipped"] == cuda_tests["tests"] == test_count > 0  # no GPU here
    assert (out / "cuda-tests.xml").is_file()
    compiled = result["compile"]
    assert compiled["compile"] and compiled["backend"] == "eager"
    assert compiled["images_per_s"] > 0 and compiled["vs_compile_off"] > 0

    table = (out / "gpu-proof.md").read_text()
    assert "tutorial DataLoader loop" in table and "train stage" in table
    assert proc.stdout.endswith(table)  # the table is printed last
    assert (out / "gpu-proof.log").read_text() == proc.stdout  # everything printed is kept


@pytest.mark.slow
def test_the_gpu_proof_keeps_every_section_written_before_a_failure_or_a_kill(gpu_machine):
    """A section that raises is reported and the next one still runs; the results are on disk
    after each section, so a command killed later (a fault ends it with exit 137 after `sweep`)
    still returns them."""
    checkout, env, out = gpu_machine
    command, _, _ = documented_device_call()
    proc = run([*command, "--smoke", "--sections", "data,baseline,sweep,tta_dev"], cwd=checkout,
               timeout=600, GPU_PROOF_FAULTS="baseline:raise,sweep:exit", **env)
    assert proc.returncode == 137, proc.stdout[-4000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu-proof.json").read_text())
    sections = results["sections"]
    assert {name: entry["status"] for name, entry in sections.items()} == {
        "data": "ok", "baseline": "failed", "sweep": "ok"}  # tta_dev never started
    assert "injected fault" in sections["baseline"]["error"]
    assert all(r["images_per_s"] > 0 for r in sections["sweep"]["result"]["rows"])
    assert not results["complete"]
    table = (out / "gpu-proof.md").read_text()
    assert "| baseline | failed: RuntimeError: injected fault" in table
    assert "trainer, batch 8, compile off" in table


def test_the_watchdog_stops_a_section_at_its_limit_and_keeps_its_partial_result(monkeypatch,
                                                                                tmp_path):
    gpu_proof = load_gpu_proof()

    def slow(proof, result):
        result["rows"] = [1]
        for _ in range(500):  # 25 s at most; the limit is 0.3 s
            try:
                time.sleep(0.05)
            except Exception:  # what a sweep row does: the alarm must not end here
                pass
        result["rows"].append(2)

    monkeypatch.setitem(gpu_proof.SECTIONS, "slow", gpu_proof.Section(slow, 1, 0.3))
    proof = gpu_proof.start(gpu_proof.parse_args(
        ["--smoke", "--device", "cpu", "--params", str(ROOT / "params.yaml"), "--out",
         str(tmp_path)]))
    gpu_proof.run_section(proof, "slow", time.monotonic() + 60, {})
    entry = json.loads((tmp_path / "gpu-proof.json").read_text())["sections"]["slow"]
    assert entry["status"] == "timed_out" and entry["result"] == {"rows": [1]}
    assert entry["seconds"] < 10
    # Less than a section's minimum left: skipped, not started.
    gpu_proof.run_section(proof, "sweep", time.monotonic() + 1, {})
    assert proof.sections["sweep"]["status"] == "skipped"
    assert "budget" in proof.sections["sweep"]["reason"]


@pytest.mark.slow
def test_the_model_tour_prints_one_row_per_arch(archive, tmp_path):
    rows_file = tmp_path / "tour.json"
    proc = run([sys.executable, str(ROOT / "bench" / "model_tour.py"), "--archive",
                str(archive.path), "--params", str(ROOT / "params.yaml"), "--set",
                "model.width=0.0625", "--set", "train.epochs=1", "--set", "train.device=cpu",
                "--archs", "lenet5,resnet18", "--json", str(rows_file)], cwd=tmp_path,
               timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [r["arch"] for r in rows] == ["lenet5", "resnet18"]
    for row in rows:
        assert row["parameters"] > 0 and row["gflop"] > 0 and row["epochs"] == 1
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    table = proc.stdout.splitlines()
    assert table[2].startswith("| arch | parameters | MFLOP/image")
    assert [line.split("|")[1].strip() for line in table[4:]] == ["lenet5", "resnet18"]
