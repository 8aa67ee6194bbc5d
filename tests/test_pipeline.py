"""End to end: `dvc repro` in a fresh git repository made from the project, checked through
DVC's outputs, a real MLflow store (MlflowClient) and a real `mlflow server` over that store."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cifar_alexnet.tools.synthetic import archive_members, write_tar_gz

from helpers import MlflowServer, dvc, make_project, tiny_params

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
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())["test"]
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
    assert "accuracy" in data["metrics/evaluate.json"]["data"]["test"]
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
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())["test"]
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

    from cifar_alexnet.core.data import load_split
    from cifar_alexnet.stages.artifacts import load_trained_model

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


def test_mlflow_server_serves_the_run_over_rest(repro, run_id):
    project, _ = repro
    with MlflowServer(project / "mlflow.db", project) as server:
        with urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/runs/get?run_id={run_id}") \
                as reply:
            run = json.load(reply)["run"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert params["model.arch"] == "alexnet"
        assert {"test/accuracy", "val/acc", "train/loss"} <= metrics
    assert server.process.returncode is not None


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
    from cifar_alexnet.stages.download import md5sum

    raw = tiny_params(archive)
    raw["data"].update(url=bad.as_uri(), md5=md5sum(bad))
    project = make_project(tmp_path / "project", raw)
    result = dvc("repro", cwd=project)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert_nothing_downstream(project)


def test_editing_a_tool_module_reruns_nothing_and_editing_tune_reruns_only_tune(repro):
    project, _ = repro
    package = project / "src/cifar_alexnet"
    tools = ("tools/throughput.py", "tools/synthetic.py", "tools/metrics_check.py", "tune/cifar_study.py")
    originals = {name: (package / name).read_text() for name in (*tools, "tune/objective.py")}
    try:
        for name in tools:
            (package / name).write_text(originals[name] + "\n# edited\n")
        assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}
        (package / "tune/objective.py").write_text(originals["tune/objective.py"] + "\n# edited\n")
        assert set(json.loads(dvc("status", "--json", cwd=project).stdout)) == {"tune"}
    finally:
        for name, text in originals.items():
            (package / name).write_text(text)
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}
