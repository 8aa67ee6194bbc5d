"""The MLflow tracking server down or lost: a real `mlflow server` on 127.0.0.1 that the tests
start, SIGKILL mid-run and start again. A stage fails in seconds with a message naming the URI,
keeps every finished epoch or trial, and the rerun continues as if nothing had happened."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.stages.prepare import prepare
from cifar_alexnet.core.trainer import Checkpoint
from helpers import (ROOT, MlflowServer, free_port, imported_modules, subprocess_env,
                     tiny_params, write_params)

pytestmark = pytest.mark.slow

# The server is killed once epoch 2's line is logged; each epoch's metrics go to the server
# synchronously, so training stops at the next epoch's logging at the latest: 6 epochs leave the
# rerun epochs to catch up without a long race.
EPOCHS = 6
KILL_AFTER = 2


@pytest.fixture
def workdir(tmp_path, archive):
    write_params(tmp_path / "params.yaml",
                 tiny_params(archive, train={"epochs": EPOCHS}, tune={"n_trials": 0}))
    prepare(read_archive(archive.path), 0.1, 0, tmp_path / "data" / "prepared")
    return tmp_path


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with MlflowServer(root / "server.db", root) as server:
        yield server


@pytest.fixture
def server(shared_server):
    """The module's server, up: a test kills it and starts it again (a server's start is 5 s
    of CPU here, so the tests share one)."""
    if shared_server.process.poll() is not None:
        shared_server.start()
    return shared_server


TRAIN = [sys.executable, str(ROOT / "pipeline/train.py"), "--data", "data/prepared", "--out",
         "models", "--metrics", "metrics/train.json", "--history", "metrics/history.csv",
         "--checkpoint", "checkpoints/train.pt"]


def kill_server_when(log_line: str, command: list[str], cwd: Path, env: dict[str, str],
                     server: MlflowServer) -> tuple[int, str, float]:
    """Run ``command``; SIGKILL the server once its log shows ``log_line``. Return the exit
    status, the whole stderr, and the seconds from the kill to the exit."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stderr, killed = [], None
    for line in process.stderr:
        stderr.append(line)
        if killed is None and log_line in line:
            server.kill()
            killed = time.monotonic()
    process.wait(timeout=120)
    assert killed is not None, "".join(stderr)[-3000:]
    return process.returncode, "".join(stderr), time.monotonic() - killed


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_nothing_listening_fails_in_seconds_naming_the_uri(workdir):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run([TRAIN[0], "-X", "importtime", *TRAIN[1:]], cwd=workdir,
                            capture_output=True, text=True, timeout=300,
                            env=subprocess_env(MLFLOW_TRACKING_URI=uri))
    seconds = time.monotonic() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert f"the MLflow tracking server {uri} does not answer" in line
    assert "mlflow server" in line and "MLFLOW_TRACKING_URI" in line
    assert seconds < 30, seconds  # MLflow alone retries for about 4 minutes
    imported = imported_modules(result.stderr)
    assert "mlflow" in imported and "torch" not in imported  # told before torch loads
    assert not (workdir / "models").exists() and not (workdir / "checkpoints/train.pt").exists()


def test_a_server_lost_mid_training_keeps_the_epoch_and_the_rerun_resumes(workdir, server):
    env = subprocess_env(MLFLOW_TRACKING_URI=server.uri)
    returncode, stderr, seconds = kill_server_when(f"epoch {KILL_AFTER}/{EPOCHS}", TRAIN, workdir,
                                                   env, server)
    assert returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert f"the MLflow tracking store {server.uri} failed after epoch" in line
    assert "dvc repro" in line and "resumes" in line
    assert seconds < 60, seconds
    checkpoint = Checkpoint.load(workdir / "checkpoints/train.pt")
    lost_at = int(line.split("failed after epoch ")[1].split()[0])
    assert EPOCHS > checkpoint.epoch == lost_at >= KILL_AFTER  # the failed epoch is kept
    assert not (workdir / "models").exists()

    server.start()  # the server is back, with everything it had stored
    result = subprocess.run(TRAIN, cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"epoch {lost_at + 1}/{EPOCHS}" in result.stderr
    assert f"epoch {lost_at}/{EPOCHS}" not in result.stderr  # not trained again
    client = MlflowClient(server.uri)
    run = client.get_run(checkpoint.owner["mlflow_run_id"])  # the same run, continued
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(lost_at)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc"))
    assert steps == list(range(1, EPOCHS + 1))  # every epoch once, the lost one caught up


def test_a_server_lost_mid_study_retries_the_trial_and_the_study_ends_as_if_uninterrupted(
        workdir, server, archive, monkeypatch):
    import optuna

    from cifar_alexnet.config import params_from_dict
    from cifar_alexnet.tune.runner import run_study

    study_params = tiny_params(archive, tune={"n_trials": 3, "epochs_per_trial": 2,
                                              "pruner": "none"})
    write_params(workdir / "params.yaml", study_params)
    tune = [sys.executable, str(ROOT / "pipeline/tune.py"), "--data", "data/prepared",
            "--out", "tune"]
    env = subprocess_env(MLFLOW_TRACKING_URI=server.uri)
    returncode, stderr, _ = kill_server_when("trial 0: val_acc", tune, workdir, env, server)
    assert returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert f"the MLflow tracking store {server.uri} failed" in line and "trial" in line
    assert not (workdir / "tune/best_params.yaml").exists()

    server.start()
    result = subprocess.run(tune, cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    storage = f"sqlite:///{workdir / 'tune/optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    resumed = optuna.load_study(study_name=summary.study_name, storage=storage)
    failed = [t for t in resumed.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["interrupted"]  # the lost trial...
    counted = [t for t in resumed.trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(counted) == 3  # ...did not count toward tune.n_trials: it was run again

    # The same study, never interrupted (its own storage and MLflow store).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'straight.db'}")
    study_params["tune"]["storage"] = f"sqlite:///{workdir / 'straight-optuna.db'}"
    straight = run_study(params_from_dict(study_params), workdir / "data/prepared")
    assert [t.params for t in counted] == [t.params for t in straight.trials]
    assert [t.value for t in counted] == [t.value for t in straight.trials]
    # No MLflow run stays RUNNING (the lost trial's, if it got one, was closed by the rerun).
    client = MlflowClient(server.uri)  # the module's server: the study's runs only
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.optuna.study_name = '{summary.study_name}'")
    assert runs and [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
