"""Interrupted training resumes: SIGKILL of a real `dvc repro`, SIGTERM, foreign checkpoints."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from cifar_alexnet.stages.artifacts import load_trained_model
from cifar_alexnet.stages.train import resumable_checkpoint
from cifar_alexnet.core.trainer import Checkpoint
from helpers import dvc, make_project, subprocess_env, tiny_params

pytestmark = pytest.mark.slow

EPOCHS = 6
CHECKPOINT = "checkpoints/train.pt"


def resume_params(archive):
    # Tuning off: this is about training; 6 short epochs leave room to be killed mid-run.
    return tiny_params(archive, train={"epochs": EPOCHS}, tune={"n_trials": 0})


def checkpoint_epoch(project: Path) -> int:
    try:
        return Checkpoint.load(project / CHECKPOINT).epoch
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


# `dvc repro train`: the pipeline up to the stage that resumes (evaluating the finished model
# is the same whether or not its training was interrupted, and is tested elsewhere).
REPRO = ("repro", "train")


def start_repro(project: Path) -> subprocess.Popen:
    # Own session: a kill reaches dvc and the stage process it started, as pre-emption would.
    return subprocess.Popen([sys.executable, "-m", "dvc", *REPRO], cwd=project,
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_epoch(project: Path, process: subprocess.Popen, epoch: int) -> None:
    deadline = time.monotonic() + 300
    while checkpoint_epoch(project) < epoch:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "training never reached the kill point"
        time.sleep(0.05)


def trained(project: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """What training produced: its metrics (less the time per epoch) and the model's weights."""
    metrics = json.loads((project / "metrics/train.json").read_text())
    metrics.pop("seconds_per_epoch")
    return metrics, load_trained_model(project / "models")[0].state_dict()


def training_runs(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-alexnet")
    return client, client.search_runs([experiment.experiment_id])


def test_interrupted_dvc_repro_resumes_and_matches_an_uninterrupted_run(archive, tmp_path):
    project = make_project(tmp_path / "project", resume_params(archive))

    # 1. SIGTERM (what a pre-empting scheduler sends first): a clean stop, the run is KILLED.
    process = start_repro(project)
    wait_for_epoch(project, process, 1)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "interrupted" in output and "Traceback" not in output
    client, runs = training_runs(project)
    assert [r.info.status for r in runs] == ["KILLED"]

    # 2. SIGKILL of the resumed `dvc repro` at a random (seeded) point: nothing can clean up.
    rng = random.Random(2026)
    kill_after, delay = rng.randint(2, EPOCHS - 2), rng.uniform(0.0, 0.3)
    process = start_repro(project)
    wait_for_epoch(project, process, kill_after)
    time.sleep(delay)  # somewhere inside the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reached = checkpoint_epoch(project)
    assert kill_after <= reached < EPOCHS
    assert not (project / "models/model.pt").exists()

    # 3. A plain rerun resumes from the last complete epoch and finishes.
    again = dvc(*REPRO, cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming after epoch {reached} of {EPOCHS}" in again.stderr
    assert not (project / CHECKPOINT).exists()

    client, runs = training_runs(project)
    assert len(runs) == 1  # the interrupted run was continued, not duplicated
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(reached)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert set(steps) == set(range(1, EPOCHS + 1))

    # Bit-identical on CPU: the same numbers and weights as the same training never interrupted
    # (forced again from the same data and params; evaluation depends on the weights alone).
    resumed_metrics, resumed_weights = trained(project)
    straight = dvc("repro", "--force", "--single-item", "train", cwd=project)
    assert straight.returncode == 0 and "resuming" not in straight.stderr, straight.stderr
    straight_metrics, straight_weights = trained(project)
    assert resumed_metrics == straight_metrics
    assert resumed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in resumed_weights)


def test_checkpoint_of_other_params_or_code_is_not_resumed_and_its_run_is_closed(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        left_running = client.create_run(client.create_experiment("e")).info.run_id
        path = tmp_path / "train.pt"
        Checkpoint({"fingerprint": "old", "mlflow_run_id": left_running}, epoch=3,
                   model_state={"w": torch.zeros(1)}).save(path)
        assert resumable_checkpoint(path, "old").epoch == 3
        assert resumable_checkpoint(path, "new") is None
        assert client.get_run(left_running).info.status == "KILLED"
        path.write_bytes(b"not a checkpoint")
        assert resumable_checkpoint(path, "old") is None
    finally:
        mlflow.set_tracking_uri(None)
