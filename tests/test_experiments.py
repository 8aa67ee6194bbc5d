"""`dvc exp run --queue` / `--temp` run the pipeline in temporary copies of the repository; their
MLflow runs and trials must land in the repository's own stores, not in the deleted copy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import dvc, make_project, run, tiny_params

pytestmark = pytest.mark.slow


def wait_for_queue(project, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def test_queued_and_temporary_experiments_log_to_the_repositorys_stores(archive, tmp_path):
    project = make_project(tmp_path / "project", tiny_params(archive))
    for lr in ("0.001", "0.003"):
        queued = dvc("exp", "run", "--queue", "-S", f"train.lr={lr}", "-S", "tune.n_trials=0",
                     cwd=project)
        assert queued.returncode == 0, queued.stdout + queued.stderr
    started = dvc("queue", "start", cwd=project)
    assert started.returncode == 0, started.stderr
    status = wait_for_queue(project)
    assert status.count("Success") == 2, status
    temp = dvc("exp", "run", "--temp", "-S", "train.lr=0.002", cwd=project)
    assert temp.returncode == 0, temp.stdout + temp.stderr

    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                              text=True, check=True).stdout.strip()
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    experiments = {exp["name"]: exp for baseline in shown for exp in baseline.get("experiments")
                   or []}
    assert len(experiments) == 3, list(experiments)

    # One store, in the repository: every experiment's training run, tagged with its name,
    # with its artifacts in the repository's mlruns/ (the copies are gone).
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trainings = [r for r in runs if "optuna.study_name" not in r.data.tags]  # not study/trials
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in trainings}
    assert len(by_exp) == len(trainings)  # one training run per experiment
    assert set(experiments) <= set(by_exp), (list(experiments), list(by_exp))
    models = {m.source_run_id: m for m in client.search_logged_models(
        [e.experiment_id for e in client.search_experiments()])}
    mlruns = (project / "mlruns").as_uri()
    for name in experiments:
        run = by_exp[name]
        assert run.info.status == "FINISHED" and run.info.run_name == f"train {name}"
        assert run.data.tags["dvc.baseline_rev"] == baseline
        assert "test/accuracy" in run.data.metrics  # evaluate reopened the same run
        assert run.info.artifact_uri.startswith(mlruns)
        model = models[run.info.run_id]
        assert model.artifact_location.startswith(mlruns)
        assert (Path(model.artifact_location.removeprefix("file://")) / "MLmodel").is_file()
    assert not list((project / ".dvc/tmp").rglob("mlflow.db"))

    # The --temp experiment tuned (n_trials 2) into the repository's study storage.
    storage = f"sqlite:///{project / 'tune/optuna.db'}"
    (study,) = optuna.get_all_study_summaries(storage)
    assert study.n_trials == 2


def test_mlflow_run_main_nests_the_study_and_the_training_under_one_parent(archive, tmp_path):
    project = make_project(tmp_path / "project", tiny_params(archive))
    result = run([sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local"],
                 cwd=project, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parent_id = re.search(r"Run \(ID '(\w+)'\) succeeded", result.stderr).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    names = sorted(r.info.run_name.split()[0] for r in children)
    assert names == ["study", "train"], names
    training = next(r for r in children if r.info.run_name.startswith("train"))
    best = yaml.safe_load((project / "tune/best_params.yaml").read_text())
    # each value once, in its own run: the tuned dropout in the training, not params.yaml's
    assert float(training.data.params["model.dropout"]) == best["params"]["model"]["dropout"]
    assert "test/accuracy" in training.data.metrics
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}
