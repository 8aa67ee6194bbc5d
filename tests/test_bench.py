"""The GPU benchmark's pieces, checked on CPU: FLOP counts, device peaks, and a baseline that feeds
the network what the trainer feeds it."""

import dataclasses
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optim_module

from cifar_alexnet.tools import bench
from cifar_alexnet.config import ModelConfig
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.core.model import build_model
from cifar_alexnet.tools.synthetic import write_synthetic_archive
from cifar_alexnet.core.transforms import CROP_PADDING, random_crop_flip

from helpers import ROOT, run


@pytest.fixture(scope="module")
def data(archive):
    return bench.load_archive(archive.path, val_size=0.1, seed=42)


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
    # 32x32 AlexNet (model.ARCH_SPECS["alexnet"]) worked out by hand: output size x MACs each.
    expected = (conv_macs(29, 3, 96, 4)          # 32 - 4 + 1 = 29
                + conv_macs(29, 96, 256, 5)      # padded, then pooled to 14
                + conv_macs(14, 256, 384, 3)
                + conv_macs(14, 384, 384, 3)
                + conv_macs(14, 384, 256, 3)     # pooled to 6
                + 256 * 6 * 6 * 4096 + 4096 * 4096 + 4096 * 10)
    model = build_model(ModelConfig("alexnet", 1.0, 0.5, "batch"))
    assert bench.multiply_adds(model) == expected
    flops = bench.flops_per_image(model)
    # forward, then weight and input gradients, except the first layer's input gradient
    assert flops == 2 * (3 * expected - conv_macs(29, 3, 96, 4))
    assert flops == pytest.approx(7.09e9, rel=0.01)  # ~7.1 GFLOP per training image


def test_flop_count_follows_the_width():
    narrow = bench.multiply_adds(build_model(ModelConfig("alexnet", 0.5, 0.5, "batch")))
    full = bench.multiply_adds(build_model(ModelConfig("alexnet", 1.0, 0.5, "batch")))
    # All layers but the first (3 input channels) and last (10 outputs) scale with width^2.
    assert 0.25 * full < narrow < 0.3 * full


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_peak_table_matches_device_names(name, peak):
    assert bench.peak_tflops_for_name(name) == peak


def test_cpu_has_no_peak():
    assert bench.device_peak_tflops(torch.device("cpu")) is None


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
    plain = bench.TutorialDataset(images, data.train_labels[:8],
                                  bench.tutorial_transform(data.mean, data.std, augment=False))
    tutorial = torch.stack([plain[i][0] for i in range(len(plain))])
    with torch.no_grad():
        trainer = model.adapter(torch.from_numpy(images))
    assert tutorial.shape == trainer.shape == (8, 3, 32, 32)
    assert tutorial.dtype == trainer.dtype == torch.float32
    torch.testing.assert_close(tutorial, trainer, atol=1e-5, rtol=0)
    assert isinstance(plain[0][1], int)

    # With augmentation: both pipelines only ever produce one of the same 162 crops/flips
    # (zero padding included), so their value ranges agree too.
    augmented = bench.TutorialDataset(images, data.train_labels[:8],
                                      bench.tutorial_transform(data.mean, data.std))
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
    result = bench.trainer_throughput(params.model, small, cfg, torch.device("cpu"), 0,
                                      warmup_steps=2, steps=3)
    assert result["images"] == 3 * 16 and result["images_per_s"] > 0
    assert result["precision"] == "fp32" and not result["fused_optimizer"]
    # The step hook is removed again, whether or not fit() was stopped by it.
    assert not optim_module._global_optimizer_post_hooks


def test_trainer_throughput_repeats_a_short_split(params, small):
    # 128 images at batch 16 are 8 steps per epoch; 12 steps must still run in one epoch
    # (an epoch end inside the window would run the validation pass and fail on it here).
    result = bench.trainer_throughput(params.model, small,
                                      dataclasses.replace(params.train, batch_size=16),
                                      torch.device("cpu"), 0, warmup_steps=4, steps=8)
    assert result["images"] == 8 * 16


def test_baseline_throughput_runs_through_a_dataloader(params, small):
    result = bench.baseline_throughput(params.model, small, params.train, torch.device("cpu"), 0,
                                       warmup_steps=1, steps=2, workers=0)
    assert result["images"] == 2 * bench.BASELINE_BATCH_SIZE and result["images_per_s"] > 0
    assert result["precision"] == "fp32" and result["workers"] == 0


def test_time_to_accuracy_reports_first_epoch_at_target(short, small):
    result = bench.time_to_accuracy(short, small, torch.device("cpu"), target_acc=0.0,
                                    budget_seconds=3600)
    assert result["epoch_at_target"] == 1
    assert result["seconds_to_target"] == result["history"][0]["seconds"] > 0
    assert result["epochs_run"] == 2 and result["stopped_by"] == "recipe finished"
    best = max(result["history"], key=lambda r: r["test_acc"])
    assert result["best_acc_within_budget"] == best["test_acc"]


def test_time_to_accuracy_stops_when_the_budget_is_spent(short, small):
    result = bench.time_to_accuracy(short, small, torch.device("cpu"), target_acc=1.01,
                                    budget_seconds=0.0)
    # The first epoch ends past a zero budget: it stops the run but does not count.
    assert result["epochs_run"] == 1 and result["stopped_by"] == "budget spent"
    assert result["seconds_to_target"] is None and result["best_acc_within_budget"] is None


def test_run_benchmark_reports_every_figure(short, small):
    options = bench.BenchOptions(warmup_steps=1, steps=2, budget_seconds=60, workers=0,
                                 peak_tflops=100.0)
    results = bench.run_benchmark(short, small, torch.device("cpu"), options)
    tp = results["throughput"]
    assert tp["speedup"] == pytest.approx(tp["trainer"]["images_per_s"]
                                          / tp["baseline"]["images_per_s"])
    flops = results["model"]["flops_per_train_image"]
    trainer = tp["trainer"]
    assert trainer["tflops"] == pytest.approx(trainer["images_per_s"] * flops / 1e12)
    assert trainer["fraction_of_peak"] == pytest.approx(trainer["tflops"] / 100.0)
    assert results["time_to_accuracy"]["target_acc"] == bench.SUBSET_TARGET_ACC
    assert results["params"]["model"]["width"] == short.model.width
    json.dumps(results)  # everything is JSON-serialisable
    table = bench.format_table(results)
    assert "speed-up" in table and "[subset]" in table


def test_bench_imports_with_torch_alone():
    code = ("import sys, cifar_alexnet.tools.bench; "
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


@pytest.mark.slow
def test_the_gpu_proof_rehearses_on_a_cpu_with_torch_alone(archive, tmp_path):
    """bench/gpu-proof.sh --smoke: the one command a GPU machine runs, end to end, with
    PYTHONPATH=src (as there) writing its JSON and table."""
    out = tmp_path / "results"
    proc = run(["bash", str(ROOT / "bench" / "gpu-proof.sh"), "--smoke", "--dev-archive",
                str(archive.path), "--params", str(ROOT / "params.yaml")], cwd=ROOT,
               timeout=300, OUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "skipped" in proc.stdout  # the CUDA tests ran (and skipped here: no GPU)
    (result_file,) = out.glob("*.json")
    results = json.loads(result_file.read_text())
    assert [(r["batch_size"], r["compile"]) for r in results["sweep"]] == [
        (b, c) for c in (False, True) for b in (128, 256, 512)]
    assert results["best"]["vs_baseline"] > 0
    stage = results["stage"]
    assert stage["wall_seconds"] > 0 and stage["checkpoint_bytes"] > 0
    assert stage["mlflow_logging"] is True  # installed here
    assert set(results["time_to_accuracy"]) == {"dev_subset", "generated"}
    assert results["alexnet_paper"]["epochs_run"] == 1
    table = result_file.with_suffix(".md").read_text()
    assert "tutorial DataLoader loop" in table and "train stage" in table
    assert (out / "cuda-tests.xml").is_file()


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
