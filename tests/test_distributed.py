"""Training on several processes with torchrun (gloo on these CPUs): DDP's sharded global batch
computes what one process computes, the ranks end with identical weights, and the train stage
with `train.nproc: 2` is one MLflow run that survives kill -9 of a rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from cifar_alexnet.core.distributed import PEER_LOST, World, failing_rank
from cifar_alexnet.core.trainer import Checkpoint
from cifar_alexnet.stages.artifacts import load_trained_model
from helpers import ROOT, dvc, make_project, run, subprocess_env, tiny_params

pytestmark = pytest.mark.slow


def test_the_rank_named_is_the_one_killed_not_those_stopped_after_it():
    def failure(exitcode, timestamp):
        return type("Failure", (), {"exitcode": exitcode, "timestamp": timestamp})()

    # rank 1 killed; the agent then stops rank 0 with SIGTERM, seen in the same tick or before
    for stopped_at in (99, 100):
        rank, _ = failing_rank({0: failure(-signal.SIGTERM, stopped_at), 1: failure(-9, 100)})
        assert rank == 1
    # rank 0 noticed its peer was gone before the agent did
    assert failing_rank({0: failure(PEER_LOST, 5), 1: failure(-9, 6)})[0] == 1
    # a rank that failed with its own error, another that stopped because of it
    assert failing_rank({0: failure(PEER_LOST, 1), 1: failure(1, 2)})[0] == 1


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_ranks_shards_cover_a_global_batch_exactly_once(size):
    for batch in (1, 7, 32, 33):
        covered = [i for rank in range(size) for i in range(batch)[World(rank, size).shard(batch)]]
        assert covered == list(range(batch))


def test_two_ranks_compute_what_one_process_computes_and_end_identical(archive, tmp_path):
    """Without the parts that must differ (BatchNorm's per-rank statistics on the CPU, dropout
    masks), one epoch of DDP equals one process to float rounding: the global batch, its
    augmentation and the gradient average are the same. The ranks' weights agree bit for bit."""
    out = tmp_path / "spread.json"
    result = run([sys.executable, str(ROOT / "bench/ddp_spread.py"), "--archive",
                  str(archive.path), "--params", str(ROOT / "params.yaml"), "--nproc", "2",
                  "--seeds", "0", "--json", str(out), "--set", "model.width=0.0625",
                  "--set", "model.norm=none", "--set", "model.dropout=0", "--set",
                  "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.device=cpu"],
                 cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["rank_weight_gap"] == 0
    # measured: 7e-8 relative (1.95990858 vs 1.95990845)
    assert row["ddp"]["final_train_loss"] == pytest.approx(row["one"]["final_train_loss"],
                                                           rel=1e-5)
    assert row["ddp"]["best_val_acc"] == row["one"]["best_val_acc"]
    assert "| max weight gap between ranks |" in result.stdout  # the table is printed


def rank_pids(project: Path, rank: int) -> list[int]:
    """The train stage's rank ``rank`` processes under ``project`` (torchrun sets RANK)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue
        if (any(part.endswith(b"pipeline/train.py") for part in cmdline)
                and f"RANK={rank}".encode() in env and cwd == str(project)):
            found.append(int(entry.name))
    return found


EPOCHS = 8


def kill_rank_1_after_epoch(project: Path, checkpoint: Path, epoch: int) -> bool:
    """SIGKILL rank 1 once rank 0's checkpoint holds ``epoch``; look with both ranks stopped
    (SIGSTOP), so training cannot finish between the look and the kill (a tiny epoch takes
    less time than one look)."""
    rank_0, rank_1 = rank_pids(project, 0), rank_pids(project, 1)
    if (len(rank_0), len(rank_1)) != (1, 1):
        return False
    ranks = rank_0 + rank_1
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        ready = checkpoint.is_file() and Checkpoint.load(checkpoint).epoch >= epoch
        if ready:
            os.kill(ranks[1], signal.SIGKILL)
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return ready


def test_two_process_stage_is_one_run_and_resumes_after_a_rank_is_killed(archive, tmp_path):
    raw = tiny_params(archive, tune={"n_trials": 0},
                      train={"nproc": 2, "epochs": EPOCHS, "checkpoint_seconds": 0})
    project = make_project(tmp_path / "project", raw)
    # `dvc repro train`: up to the stage that runs the ranks (what evaluate needs of their
    # model is that it loads as any other does: checked below, without evaluating it).
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project,
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpoint = project / "checkpoints/train.pt"
    deadline = time.monotonic() + 300
    try:
        while not kill_rank_1_after_epoch(project, checkpoint, 2):
            assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read()
            time.sleep(0.2)
        output = repro.communicate(timeout=120)[0]
    finally:
        if repro.poll() is None:
            os.killpg(repro.pid, signal.SIGKILL)
    assert repro.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: training rank 1 of 2 was killed by SIGKILL, so every rank was "
                      "stopped; rank 0's last checkpoint keeps the finished epochs: run the "
                      "stage again to resume"], output[-3000:]
    assert "Traceback" not in output
    stopped_at = Checkpoint.load(checkpoint).epoch

    again = dvc("repro", "train", cwd=project)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming after epoch {stopped_at} of {EPOCHS}" in again.stderr + again.stdout
    assert json.loads(dvc("status", "--json", "train", cwd=project).stdout) == {}
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (training,) = [r for r in runs if r.info.run_name.startswith("train ")]  # one run
    assert training.info.status == "FINISHED" and training.data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(training.info.run_id, "val/acc")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))  # every epoch, from both invocations
    history = yaml.safe_load((project / "metrics/train.json").read_text())
    assert history["best_val_acc"] > 0.4  # it learned: 4x chance
    _, saved = load_trained_model(project / "models")  # what evaluate loads
    assert saved["mlflow_run_id"] == training.info.run_id
