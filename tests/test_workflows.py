"""The workflow matrix's ``pipeline`` project, driven one command after another: `dvc repro`
from scratch, `mlflow run .`, `mlflow run . -e tune` and a `cifar-study run` worker then one
`dvc repro`; then `mlflow ui` over what they left. After each workflow the seams in
workflow_matrix.py must hold. A copy of the project as its first `dvc repro` left it is checked
the way a user checks one reproduction: every output, the MLflow run, `mlflow server`,
`dvc push`/`pull`, which edits rerun what.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import (NO_SERVER_JOBS, MlflowServer, dvc, free_port, make_project, run,
                     subprocess_env, tiny_params, wait_for_http)
from workflow_matrix import Chain, Outcome, Workflow, drive, matrix_tests, read_json, store

pytestmark = pytest.mark.slow


def mlflow_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", *args],
               cwd=project)


def study(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cifar_alexnet.tune.cifar_study", *args], cwd=project)


def study_grown_then_repro(project: Path) -> list[subprocess.CompletedProcess]:
    """The study grown outside DVC both ways a user can, `mlflow run . -e tune` (which also
    refreshes tune/) and a `cifar-study run` worker; then one `dvc repro` takes it in."""
    before = study(project, "best")
    tuned = mlflow_run(project, "-e", "tune", "-P", "overrides=tune.n_trials=2")
    status = dvc("status", "--json", cwd=project)
    worker = study(project, "run", "--n-trials", "2")
    return [before, tuned, status, worker, study(project, "best"), dvc("repro", cwd=project)]


STUDY_GROWN = "mlflow run . -e tune, a cifar-study run worker, then dvc repro"
WORKFLOWS: dict[str, Workflow] = {
    "dvc repro": lambda p: [dvc("repro", cwd=p)],   # a study of 1 trial to start with
    # a new search space: a new study and a training, both nested under one MLflow parent
    "mlflow run .": lambda p: [mlflow_run(p, "-P", "overrides=tune.epochs_per_trial=1")],
    STUDY_GROWN: study_grown_then_repro,
}


@pytest.fixture(scope="module")
def pipeline(archive, tmp_path_factory) -> Chain:
    """A fresh project (a 1-trial study) driven through the ``pipeline`` workflows; a copy of it
    as `dvc repro` left it is ``reproduced``."""
    root = tmp_path_factory.mktemp("pipeline")
    project = make_project(root / "project",
                           tiny_params(archive, tune={"n_trials": 1, "pruner": "none"}))
    return drive(project, WORKFLOWS, copy_after_first=root / "reproduced")


(test_after_each_workflow_the_seams_hold,
 test_each_training_dvc_runs_is_one_run_in_the_one_store,
 test_the_registry_holds_every_evaluated_model_with_champion_on_the_best) = \
    matrix_tests("pipeline", WORKFLOWS)


def invocation_parent(outcome: Outcome):
    """The parent run an `mlflow run` invocation's stages are nested under, in the project's
    experiment, after checking that MLflow Projects' own run (which `mlflow run` makes in the
    Default experiment when no --experiment-name is given) points to it and holds nothing."""
    (projects_id,) = [found[1] for result in outcome.results
                      if (found := re.search(r"Run \(ID '(\w+)'\) succeeded", result.stderr))]
    by_id = {r.info.run_id: r for r in outcome.runs}
    projects_run = by_id[projects_id]
    (parent,) = [r for r in outcome.runs if r.data.tags.get("mlflow_projects.run_id") == projects_id]
    assert parent.info.run_id in projects_run.data.tags["mlflow.note.content"]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("mlflow run ")
    # Default holds MLflow Projects' runs only; everything else is in the project's experiment.
    default = projects_run.info.experiment_id
    assert all("mlflow.project.entryPoint" in r.data.tags
               for r in outcome.runs if r.info.experiment_id == default)
    assert {r.info.experiment_id for r in outcome.runs} == {default, parent.info.experiment_id}
    return parent


def test_mlflow_run_lands_in_the_projects_experiment_with_one_parent(pipeline):
    outcome = pipeline.outcomes["mlflow run ."]
    parent = invocation_parent(outcome)
    assert store(pipeline.project).get_experiment(parent.info.experiment_id).name == \
        "cifar10-alexnet"
    children = [r for r in outcome.runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name.split()[0] for r in children) == ["study", "train"]
    training = next(r for r in children if r.info.run_name.startswith("train"))
    tuning = next(r for r in children if r.info.run_name.startswith("study"))
    assert training.data.params["tune.epochs_per_trial"] == "1"  # the override reached it
    # Each param once, in its own run: the tuned dropout in the training, not params.yaml's.
    assert training.data.params["model.dropout"] == tuning.data.params["best.model.dropout"]
    assert training.data.params["model.dropout"] != tuning.data.params["model.dropout"]
    # `-P overrides` ran as a DVC experiment: params.yaml holds it, dvc.lock agrees.
    params = yaml.safe_load((pipeline.project / "params.yaml").read_text())
    assert params["tune"]["epochs_per_trial"] == 1


def test_tune_entry_point_grows_the_study_and_dvc_status_shows_it(pipeline):
    outcome = pipeline.outcomes[STUDY_GROWN]
    _, tuned, status, *_, repro = outcome.results
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    parent = invocation_parent(outcome)
    (study_run,) = [r for r in outcome.runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert study_run.info.run_name.startswith("study ")
    assert study_run.data.params["tune.n_trials"] == "2"
    trials = [r for r in outcome.runs
              if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert len(trials) == 1  # the study held 1 finished trial; one more tops it up to 2
    # The tune stage's outputs moved (the study has a second trial; train is behind if the best
    # changed); `dvc repro` took it in.
    changed = set(json.loads(status.stdout))
    assert "tune" in changed and changed <= {"tune", "train"}, status.stdout
    assert "Running stage 'tune'" in repro.stdout


def test_a_worker_then_dvc_repro_trains_with_the_studys_new_best(pipeline):
    outcome = pipeline.outcomes[STUDY_GROWN]
    before, _, _, _, after, repro = outcome.results
    old, new = json.loads(before.stdout), json.loads(after.stdout)
    assert new["trials_complete"] == old["trials_complete"] + 1 + 2  # -e tune's, the worker's
    # the train stage reruns exactly when the study's new trials changed the best
    best_changed = new["best_params"] != old["best_params"]
    assert ("Running stage 'train'" in repro.stdout) == best_changed, repro.stdout
    trained = outcome.files["metrics/train.json"]
    assert trained["lr"] == pytest.approx(new["best_params"]["train.lr"])
    assert trained["dropout"] == pytest.approx(new["best_params"]["model.dropout"])
    # Two study runs (the entry point's, the worker's): the rerun of the tune stage ran no
    # trial, so it left no empty study run.
    study_runs = [r for r in outcome.runs if r.info.run_name.startswith("study ")]
    assert len(study_runs) == len([r for r in pipeline.outcomes["mlflow run ."].runs
                                   if r.info.run_name.startswith("study ")]) + 2


# --- one `dvc repro`, checked as a user checks it: the copy of the ``pipeline`` project as its
# first workflow left it -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reproduced(pipeline) -> Path:
    return pipeline.project.parent / "reproduced"


@pytest.fixture(scope="module")
def client(reproduced):
    return MlflowClient(tracking_uri=f"sqlite:///{reproduced / 'mlflow.db'}")


@pytest.fixture(scope="module")
def run_id(reproduced):
    return read_json(reproduced / "models" / "mlflow_run.json")["run_id"]


def test_repro_produces_every_output(reproduced):
    project = reproduced
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


def test_second_repro_is_a_no_op_and_param_change_reruns_only_downstream(reproduced):
    project = reproduced
    again = dvc("repro", cwd=project)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout
    status = dvc("status", "--json", cwd=project)
    assert json.loads(status.stdout) == {}


def test_dvc_metrics_and_plots_read_the_outputs(reproduced):
    project = reproduced
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    data = next(iter(shown.values()))["data"]
    assert "accuracy" in data["metrics/evaluate.json"]["data"]["test"]
    assert "best_val_acc" in data["metrics/train.json"]["data"]
    plots = dvc("plots", "show", "--json", cwd=project)
    assert plots.returncode == 0, plots.stderr
    assert "Confusion matrix" in plots.stdout and "Loss" in plots.stdout


def test_mlflow_run_holds_params_history_metrics_artifacts_and_tags(reproduced, client, run_id):
    project = reproduced
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
    curve_files = {Path(a.path).name for a in client.list_artifacts(run_id, "curves")}
    assert {"training_curves.png", "train_history.csv"} <= curve_files
    curves = client.download_artifacts(run_id, "curves/training_curves.png", str(project / "dl"))
    assert Path(curves).read_bytes() == (project / "metrics/training_curves.png").read_bytes()
    summary = client.download_artifacts(run_id, "model/summary.txt", str(project / "dl"))
    assert "net.features.0" in Path(summary).read_text()


def logged_model(project: Path) -> dict:
    return json.loads((project / "reports/mlflow_model.json").read_text())


def test_logged_model_is_the_evaluated_one_with_flip_tta(reproduced, run_id, monkeypatch):
    import mlflow
    import numpy as np
    import torch

    from cifar_alexnet.core.data import load_split
    from cifar_alexnet.stages.artifacts import load_trained_model

    project = reproduced
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


def test_mlflow_server_serves_the_run_over_rest(reproduced, run_id):
    project = reproduced
    with MlflowServer(project / "mlflow.db", project) as server:
        with urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/runs/get?run_id={run_id}") \
                as reply:
            run = json.load(reply)["run"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert params["model.arch"] == "alexnet"
        assert {"test/accuracy", "val/acc", "train/loss"} <= metrics
    assert server.process.returncode is not None


def test_dvc_push_and_pull_restore_outputs(reproduced, tmp_path):
    project = reproduced
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


def test_editing_a_tool_module_reruns_nothing_and_editing_tune_reruns_only_tune(reproduced):
    project = reproduced
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


def test_single_stage_entry_points_do_not_write_behind_dvcs_back(pipeline):
    project = pipeline.project
    before = (project / "models/model.pt").read_bytes()
    result = mlflow_run(project, "-e", "evaluate")
    assert result.returncode != 0  # no such entry point: stages run through DVC
    assert "evaluate" in result.stderr
    assert (project / "models/model.pt").read_bytes() == before
    assert json.loads(dvc("status", "--json", cwd=project).stdout) == {}


def test_a_bad_override_is_refused_before_dvc_edits_params_yaml(pipeline):
    project = pipeline.project
    before = (project / "params.yaml").read_text()
    result = mlflow_run(project, "-P", "overrides=train.lr=-1")
    assert result.returncode != 0
    assert "train.lr" in result.stderr and "Traceback" not in result.stderr
    assert (project / "params.yaml").read_text() == before


def test_mlflow_ui_in_a_real_browser_lists_the_runs_and_their_dataset(pipeline, tmp_path):
    """`mlflow ui` over the repository's store, rendered by headless Chromium at the link the
    stages log: the runs view (not the GenAI overview) with every training and its dataset."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    if browser is None:
        pytest.skip("no chromium on PATH (.ci/run install installs it)")
    project, outcomes = pipeline.project, pipeline.outcomes
    port = free_port()
    # One worker process, not the default 4: one browser asks, and each worker loads MLflow
    # (about 2 s of CPU apiece) on the test's two cores.
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=project, env=subprocess_env(**NO_SERVER_JOBS), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", ui, 90, "mlflow ui")
        training = store(project).get_run(read_json(project / "models/mlflow_run.json")
                                          ["run_id"])
        link = re.search(r"with `mlflow ui`: (\S+)", outcomes["dvc repro"].results[0].stdout
                         + outcomes["dvc repro"].results[0].stderr).group(1)
        runs_page = re.sub(r"/runs/\w+\?", "/runs?", link).replace("127.0.0.1:5000",
                                                                  f"127.0.0.1:{port}")
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
             "--virtual-time-budget=15000", f"--user-data-dir={tmp_path / 'profile'}",
             "--dump-dom", runs_page], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    # the top-level trainings (the UI folds nested runs, e.g. under `mlflow run .`, into their
    # parent's row)
    trainings = {r.info.run_name for r in outcomes[STUDY_GROWN].runs
                 if r.info.run_name.startswith("train ")
                 and "mlflow.parentRunId" not in r.data.tags}
    assert trainings and all(name in dom for name in trainings), sorted(trainings)
    md5 = training.data.tags["data.md5"]
    assert f"cifar10 ({md5}" in dom  # the Datasets column: name (digest = archive md5)
