"""End to end: `dvc repro` in a fresh git repository made from the project, checked through
DVC's outputs, a real MLflow store (MlflowClient) and a real `mlflow server` over that store."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_alexnet.synthetic import archive_members, write_tar_gz

from conftest import dvc, make_project, run, subprocess_env, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repro(archive, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("e2e") / "project", tiny_params(archive))
    result = dvc("repro", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    return project, result


@pytest.fixture(scope="module")
def client(repro):
    project, _ = repro
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="module")
def run_id(repro):
    return json.loads((repro[0] / "models" / "mlflow_run.json").read_text())["run_id"]


def test_repro_produces_every_output(repro):
    project, _ = repro
    for path in ("data/raw/cifar-10-python.tar.gz", "data/prepared/train.npz",
                 "data/prepared/meta.json", "models/model.pt",
                 "metrics/train.json", "metrics/train_history.csv", "metrics/evaluate.json",
                 "reports/confusion_matrix.png", "reports/classification_report.csv",
                 "reports/classification_report.txt", "reports/predictions.csv", "dvc.lock",
                 "tune/best_params.yaml", "tune/summary.json", "tune/trials.csv",
                 "tune/study.json", "tune/plots/optimization_history.png",
                 "metrics/training_curves.png"):
        assert (project / path).is_file(), path
    assert not (project / "checkpoints/train.pt").exists()  # finished: nothing to resume
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert {"accuracy", "loss", "macro_f1", "weighted_f1"} <= set(evaluation)
    assert evaluation["accuracy"] > 0.4  # 4x chance: the synthetic classes are learnable
    history = pd.read_csv(project / "metrics/train_history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    report = pd.read_csv(project / "reports/classification_report.csv", index_col="class")
    assert "airplane" in report.index and "truck" in report.index


def test_second_repro_is_a_no_op_and_param_change_reruns_only_downstream(repro):
    project, _ = repro
    again = dvc("repro", cwd=project)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    status = dvc("status", "--json", cwd=project)
    assert json.loads(status.stdout) == {}


def test_dvc_metrics_and_plots_read_the_outputs(repro):
    project, _ = repro
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    data = next(iter(shown.values()))["data"]
    assert "accuracy" in data["metrics/evaluate.json"]["data"]
    assert "best_val_acc" in data["metrics/train.json"]["data"]
    plots = dvc("plots", "show", "--json", cwd=project)
    assert plots.returncode == 0, plots.stderr
    assert "Confusion matrix" in plots.stdout and "Loss" in plots.stdout


def test_mlflow_run_holds_params_history_metrics_artifacts_and_tags(repro, client, run_id):
    project, _ = repro
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = yaml.safe_load((project / "params.yaml").read_text())
    # Training used the tuned lr and dropout, and says so.
    best = yaml.safe_load((project / "tune/best_params.yaml").read_text())
    assert run.data.params["train.lr"] == str(best["params"]["train"]["lr"])
    assert run.data.params["model.dropout"] == str(best["params"]["model"]["dropout"])
    assert run.data.params["train.lr"] != str(params["train"]["lr"])
    assert run.data.tags["tune.study_name"] == best["study_name"]
    assert run.data.tags["tune.best_trial"] == str(best["best_trial"])
    train_metrics = json.loads((project / "metrics/train.json").read_text())
    assert train_metrics["lr"] == best["params"]["train"]["lr"]
    assert run.data.params["model.arch"] == "alexnet"
    assert run.data.params["data.md5"] == params["data"]["md5"]
    history = client.get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == [1, 2, 3, 4]
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert run.data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"])
    assert run.data.metrics["test/macro_f1"] == pytest.approx(evaluation["macro_f1"])
    tags = run.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                            text=True).stdout.strip()
    assert tags["git.commit"] == commit and tags["git.dirty"] in ("true", "false")
    assert tags["data.md5"] == params["data"]["md5"]
    assert tags["dvc.stage"] == "train"  # the run is the training's...
    assert tags["dvc.stages"] == "train,evaluate"  # ...and evaluation wrote into it too
    # named after the commit and the time (after the DVC experiment in `dvc exp run`)
    assert re.fullmatch(rf"train {commit[:7]}(\+dirty)? \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d",
                        run.info.run_name), run.info.run_name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"evaluation", "curves", "model", "params", "data"} <= artifacts
    evaluation_files = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    assert {"confusion_matrix.png", "classification_report.csv", "evaluate.json"} <= \
        evaluation_files
    data_files = {Path(a.path).name for a in client.list_artifacts(run_id, "data")}
    assert {"augmented_train_samples.png", "dataset_meta.json"} <= data_files
    summary = client.download_artifacts(run_id, "model/summary.txt", str(project / "dl"))
    assert "net.features.0" in Path(summary).read_text()


def logged_model(project: Path) -> dict:
    return json.loads((project / "reports/mlflow_model.json").read_text())


def test_logged_model_is_the_evaluated_one_with_flip_tta(repro, run_id, monkeypatch):
    import mlflow
    import numpy as np
    import torch

    from cifar_alexnet.prepare import load_split
    from cifar_alexnet.stages import load_trained_model

    project, _ = repro
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    info = logged_model(project)
    assert info["run_id"] == run_id and info["flip_tta"] is True
    logged = mlflow.pyfunc.load_model(info["model_uri"])
    images = load_split(project / "data/prepared", "test").images[:5]
    served = np.asarray(logged.predict(images))
    model, _ = load_trained_model(project / "models")
    with torch.no_grad():
        batch = torch.from_numpy(images)
        plain = model.eval()(batch).numpy()
        expected = (plain + model(batch.flip(3)).numpy()) / 2
    assert served.shape == (5, 10)
    assert np.allclose(served, expected, atol=1e-4)
    assert not np.allclose(served, plain, atol=1e-4)  # the mirror images do count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, seconds: int, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, f"{what} exited early"
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {seconds} s"
        time.sleep(0.5)


def test_mlflow_models_serve_answers_exactly_the_evaluated_predictions(repro):
    from cifar_alexnet.prepare import load_meta, load_split

    project, _ = repro
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged_model(project)["model_uri"],
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=project, env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 120, "mlflow models serve")
        test = load_split(project / "data/prepared", "test")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": test.images.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            logits = json.load(reply)["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    names = load_meta(project / "data/prepared").class_names
    served = [names[max(range(len(row)), key=row.__getitem__)] for row in logits]
    evaluated = pd.read_csv(project / "reports/predictions.csv")["predicted"].tolist()
    assert len(served) == len(evaluated) == len(test.labels)
    assert served == evaluated  # every test image: served = evaluated


def test_mlflow_server_serves_the_run_over_rest(repro, run_id):
    project, _ = repro
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=project, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, 90, "mlflow server")
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as reply:
            run = json.load(reply)["run"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert params["model.arch"] == "alexnet"
        assert {"test/accuracy", "val/acc", "train/loss"} <= metrics
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert server.returncode is not None


def test_dvc_push_and_pull_restore_outputs(repro, tmp_path):
    project, _ = repro
    remote = tmp_path / "remote"
    assert dvc("remote", "modify", "--local", "local", "url", str(remote), cwd=project) \
        .returncode == 0
    pushed = dvc("push", cwd=project)
    assert pushed.returncode == 0, pushed.stderr
    model = (project / "models/model.pt").read_bytes()
    subprocess.run(["rm", "-rf", "models", "data/prepared", ".dvc/cache"], cwd=project, check=True)
    pulled = dvc("pull", cwd=project)
    assert pulled.returncode == 0, pulled.stderr
    assert (project / "models/model.pt").read_bytes() == model
    assert (project / "data/prepared/train.npz").is_file()


def test_dvc_exp_run_with_a_param_change_is_tracked_by_dvc_and_mlflow(repro, client):
    project, _ = repro
    # Trials do not depend on train.epochs: the study is reused, training reruns.
    result = dvc("exp", "run", "-S", "train.epochs=1", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'tune'" not in result.stdout
    # tune.n_trials=0 switches tuning off, so training takes train.lr from params.yaml.
    result = dvc("exp", "run", "-S", "train.epochs=2", "-S", "train.lr=0.001",
                 "-S", "tune.n_trials=0", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'tune'" in result.stdout
    assert "Running stage 'train'" in result.stdout
    assert "Running stage 'prepare'" not in result.stdout  # unchanged upstream is reused
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    params = [exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]
              for exp in experiments]
    assert {"epochs": 2, "lr": 0.001} in [{k: p[k] for k in ("epochs", "lr")} for p in params]
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).data.params["train.lr"] == "0.001"
    assert "params.yaml" in client.get_run(run_id).data.tags["tune.applied"]
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2]


# --- rejections through the real pipeline: clear error, non-zero exit, nothing downstream ---

def assert_nothing_downstream(project: Path) -> None:
    for path in ("data/prepared", "models", "metrics", "reports"):
        assert not (project / path).exists(), path


def test_wrong_md5_stops_the_pipeline(archive, tmp_path):
    raw = tiny_params(archive)
    raw["data"]["md5"] = "f" * 32
    project = make_project(tmp_path / "project", raw)
    result = dvc("repro", cwd=project)
    assert result.returncode != 0
    assert f"expected {'f' * 32}" in result.stderr and f"found {archive.md5}" in result.stderr
    assert not any((project / "data/raw").glob("*"))  # no archive, no partial download
    assert_nothing_downstream(project)


@pytest.mark.parametrize("kind", ["truncated", "code-executing pickle"])
def test_bad_archive_with_matching_md5_stops_prepare(archive, tmp_path, kind):
    bad = tmp_path / "bad.tar.gz"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        bad.write_bytes(archive.path.read_bytes()[:5000])
        expected = "truncated or not a gzip'd tar archive"
    else:
        members = archive_members(per_batch=20, n_test=20)
        members["cifar-10-batches-py/test_batch"] = (
            b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
            + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
        write_tar_gz(bad, members)
        expected = "unsafe or invalid pickle"
    from cifar_alexnet.download import md5sum

    raw = tiny_params(archive)
    raw["data"].update(url=bad.as_uri(), md5=md5sum(bad))
    project = make_project(tmp_path / "project", raw)
    result = dvc("repro", cwd=project)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert_nothing_downstream(project)


def test_mlflow_project_entry_point_trains_with_overrides_in_its_own_run(repro, client):
    project, _ = repro
    result = run([sys.executable, "-m", "mlflow", "run", ".", "-e", "train", "--env-manager",
                  "local", "-P", "overrides=train.epochs=1,model.dropout=0.2"],
                 cwd=project, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    parent_id = re.search(r"Run \(ID '(\w+)'\) succeeded", result.stderr).group(1)
    logged = client.get_run(run_id)
    assert logged.data.tags["mlflow.parentRunId"] == parent_id  # nested under `mlflow run`'s
    assert logged.data.params["train.epochs"] == "1"
    assert logged.data.params["model.dropout"] == "0.2"
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1]


def test_evaluate_against_a_store_without_the_training_run_fails_clearly(repro, tmp_path):
    project, _ = repro
    other_store = f"sqlite:///{tmp_path / 'other.db'}"
    result = run([sys.executable, "pipeline/stage.py", "evaluate", "--metrics",
                  str(tmp_path / "evaluate.json")], cwd=project, MLFLOW_TRACKING_URI=other_store)
    assert result.returncode == 1
    assert "is not in the tracking store" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "evaluate.json").exists()


def test_mlflow_project_tune_entry_point_tops_the_study_up_under_its_run(repro, client):
    project, _ = repro
    result = run([sys.executable, "-m", "mlflow", "run", ".", "-e", "tune", "--env-manager",
                  "local", "-P", "overrides=tune.n_trials=3"], cwd=project, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    parent_id = re.search(r"Run \(ID '(\w+)'\) succeeded", result.stderr).group(1)
    parent = client.get_run(parent_id)
    (study,) = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert study.data.params["tune.n_trials"] == "3"  # the study run, under `mlflow run`'s
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{study.info.run_id}'")
    assert len(children) == 1  # the study had 2 finished trials; one more tops it up to 3
    summary = json.loads((project / "tune/summary.json").read_text())
    assert summary["trials_complete"] + summary["trials_pruned"] == 3
