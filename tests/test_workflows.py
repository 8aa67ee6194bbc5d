"""The workflow matrix: two projects, each driven one command after another by the tools' own
commands, on generated data.

- ``experiments``: the README's quick start as written (`make-synthetic-cifar`, then its
  `dvc exp run -S data.url=… …`), its second experiment and short `dvc exp show` view,
  `--queue` ×2 + `dvc queue start -j 2`, `--temp`;
- ``pipeline``: `dvc repro` from scratch, `mlflow run .`, `mlflow run . -e tune` and a
  `cifar-study run` worker then one `dvc repro`; then `mlflow models serve`, `cifar-predict`
  and `mlflow ui` over what they left.

After each workflow the seams must hold: one MLflow store (the repository's) holds every run, run
names are unique, `dvc status` is clean, and the model MLflow serves answers exactly what the
evaluate stage scored (reports/predictions.csv). A copy of the ``pipeline`` project as its first
`dvc repro` left it is checked the way a user checks one reproduction: every output, the MLflow
run, `mlflow server`, `dvc push`/`pull`, which edits rerun what.

Every workflow is a whole pipeline run or most of one, so each counts: the quick start, the
single `dvc repro` and the matrix's first workflow are the same runs, not three.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import (NO_SERVER_JOBS, ROOT, MlflowServer, dvc, free_port, make_project, run,
                     shell_commands, subprocess_env, tiny_params, wait_for_http)

pytestmark = pytest.mark.slow

README = ROOT / "README.md"


def mlflow_run(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", *args],
               cwd=project)


def study(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cifar_alexnet.tune.cifar_study", *args], cwd=project)


def wait_for_queue(project: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=project)
        if not any(word in status.stdout for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status.stdout}")


def store(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project: Path) -> list:
    client = store(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- the workflows, in the order a user might run them ----------------------------------------

def readme_quick_start(project: Path) -> list[subprocess.CompletedProcess]:
    """The README's commands for trying everything without CIFAR-10, as written (the archive's
    path and printed md5 filled in), then plain `dvc exp show`."""
    make, exp_run = [c for c in shell_commands(README) if c.startswith("make-synthetic-cifar")
                     or (c.startswith("dvc exp run") and "synthetic" in c)]
    made = run([str(Path(sys.executable).parent / make.split()[0]),
                str(project.parent / "synthetic.tar.gz")], cwd=project)
    printed = dict(line.split(": ", 1) for line in made.stdout.splitlines() if ": " in line)
    command = exp_run.replace("<printed md5>", printed.get("md5", "?")).replace(
        "file:///tmp/synthetic.tar.gz", printed.get("url", "?"))
    return [made, dvc(*shlex.split(command)[1:], cwd=project),
            dvc("exp", "show", "--csv", cwd=project)]


def readme_second_experiment(project: Path) -> list[subprocess.CompletedProcess]:
    """A second experiment, then the README's short view of both."""
    (view,) = [c for c in shell_commands(README) if c.startswith("dvc exp show")]
    return [dvc("exp", "run", "-S", "train.epochs=2", cwd=project),
            dvc(*shlex.split(view)[1:], "--csv", cwd=project)]


def queue_two_and_start(project: Path) -> list[subprocess.CompletedProcess]:
    results = [dvc("exp", "run", "--queue", "-S", "train.epochs=3", cwd=project),
               # tuning off: training takes train.lr from params.yaml
               dvc("exp", "run", "--queue", "-S", "train.epochs=1", "-S", "train.lr=0.001",
                   "-S", "tune.n_trials=0", cwd=project)]
    results.append(dvc("queue", "start", "-j", "2", cwd=project))  # both at once
    status = wait_for_queue(project)
    results.append(status)
    # A queued experiment's stages log to `dvc queue logs`, one per task that ran.
    tasks = [line.split()[0] for line in status.stdout.splitlines()
             if line.split() and line.split()[-1] in ("Success", "Failed")]
    results += [dvc("queue", "logs", task, cwd=project) for task in tasks]
    return results


def study_grown_then_repro(project: Path) -> list[subprocess.CompletedProcess]:
    """The study grown outside DVC both ways a user can, `mlflow run . -e tune` (which also
    refreshes tune/) and a `cifar-study run` worker; then one `dvc repro` takes it in."""
    before = study(project, "best")
    tuned = mlflow_run(project, "-e", "tune", "-P", "overrides=tune.n_trials=2")
    status = dvc("status", "--json", cwd=project)
    worker = study(project, "run", "--n-trials", "2")
    return [before, tuned, status, worker, study(project, "best"), dvc("repro", cwd=project)]


Workflow = Callable[[Path], list[subprocess.CompletedProcess]]
QUICK_START = "README quick start: make-synthetic-cifar, dvc exp run -S data.url=…"
SECOND_EXPERIMENT = "dvc exp run -S, then the README's dvc exp show view"
STUDY_GROWN = "mlflow run . -e tune, a cifar-study run worker, then dvc repro"
CHAINS: dict[str, dict[str, Workflow]] = {
    "experiments": {
        QUICK_START: readme_quick_start,   # a study of 4 trials (the README's tune.n_trials)
        SECOND_EXPERIMENT: readme_second_experiment,
        "dvc exp run --queue x2 + dvc queue start -j 2": queue_two_and_start,
        # a changed tune.n_trials: the temporary copy tops up the repository's study
        "dvc exp run --temp": lambda p: [dvc("exp", "run", "--temp", "-S", "tune.n_trials=5",
                                             "-S", "train.epochs=5", cwd=p)],
    },
    "pipeline": {
        "dvc repro": lambda p: [dvc("repro", cwd=p)],   # a study of 1 trial to start with
        # a new search space: a new study and a training, both nested under one MLflow parent
        "mlflow run .": lambda p: [mlflow_run(p, "-P", "overrides=tune.epochs_per_trial=1")],
        STUDY_GROWN: study_grown_then_repro,
    },
}
CHAIN_OF = {workflow: chain for chain, workflows in CHAINS.items() for workflow in workflows}
# What a workflow leaves in the workspace that later tests read as it was then.
KEPT_FILES = ("models/mlflow_run.json", "reports/mlflow_model.json", "metrics/train.json",
              "metrics/evaluate.json", "tune/study.json")


@dataclass
class Outcome:
    results: list[subprocess.CompletedProcess]
    dvc_status: dict
    runs: list
    stray_stores: list[Path]
    served_vs_evaluated: tuple[list[str], list[str]] | None
    files: dict[str, dict]

    def log(self) -> str:
        return "\n".join(f"$ {' '.join(map(str, r.args))}\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
                         for r in self.results)


def logged_predictions(project: Path) -> tuple[list[str], list[str]]:
    """The logged model's classes for every test image, and the evaluate stage's."""
    import mlflow

    from cifar_alexnet.core.data import load_meta, load_split

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(read_json(project / "reports/mlflow_model.json")
                                         ["model_uri"])
        logits = np.asarray(model.predict(load_split(project / "data/prepared", "test").images))
    finally:
        mlflow.set_tracking_uri(None)
    names = load_meta(project / "data/prepared").class_names
    served = [names[i] for i in logits.argmax(1)]
    return served, pd.read_csv(project / "reports/predictions.csv")["predicted"].tolist()


def observe(project: Path, results: list[subprocess.CompletedProcess]) -> Outcome:
    stray = [p for p in project.rglob("mlflow.db") if p != project / "mlflow.db"]
    stray += [p for p in project.rglob("optuna.db") if p != project / "tune/optuna.db"]
    served = (logged_predictions(project) if (project / "reports/mlflow_model.json").is_file()
              else None)
    return Outcome(results, json.loads(dvc("status", "--json", cwd=project).stdout or "{}"),
                   all_runs(project), stray, served,
                   {path: read_json(project / path) for path in KEPT_FILES
                    if (project / path).is_file()})


@dataclass
class Chain:
    project: Path
    outcomes: dict[str, Outcome]


def drive(project: Path, workflows: dict[str, Workflow],
          copy_after_first: Path | None = None) -> Chain:
    outcomes: dict[str, Outcome] = {}
    for name, workflow in workflows.items():
        outcomes[name] = observe(project, workflow(project))
        if copy_after_first is not None and len(outcomes) == 1:
            # Its mlflow.db names artifact directories in the original's mlruns/ (absolute
            # paths): the later workflows only add runs there, so what it points to stays.
            shutil.copytree(project, copy_after_first, symlinks=True)
    return Chain(project, outcomes)


@pytest.fixture(scope="module")
def experiments(archive, tmp_path_factory) -> Chain:
    """A fresh project (tiny params) driven through the ``experiments`` workflows."""
    project = make_project(tmp_path_factory.mktemp("experiments") / "project",
                           tiny_params(archive))
    return drive(project, CHAINS["experiments"])


@pytest.fixture(scope="module")
def pipeline(archive, tmp_path_factory) -> Chain:
    """A fresh project (a 1-trial study) driven through the ``pipeline`` workflows; a copy of it
    as `dvc repro` left it is ``reproduced``."""
    root = tmp_path_factory.mktemp("pipeline")
    project = make_project(root / "project",
                           tiny_params(archive, tune={"n_trials": 1, "pruner": "none"}))
    return drive(project, CHAINS["pipeline"], copy_after_first=root / "reproduced")


def is_trial(run) -> bool:
    return "optuna.trial_number" in run.data.tags


@pytest.mark.parametrize("workflow", list(CHAIN_OF))
def test_after_each_workflow_the_seams_hold(request, workflow):
    outcome = request.getfixturevalue(CHAIN_OF[workflow]).outcomes[workflow]
    for result in outcome.results:
        assert result.returncode == 0, outcome.log()
    assert outcome.dvc_status == {}, outcome.dvc_status
    # One store: the repository's; none left in DVC's temporary copies.
    assert not outcome.stray_stores, outcome.stray_stores
    ids = {r.info.run_id for r in outcome.runs}
    assert outcome.files["models/mlflow_run.json"]["run_id"] in ids  # trained models/
    assert outcome.files["reports/mlflow_model.json"]["run_id"] in ids  # holds the served model
    assert all(r.info.status == "FINISHED" for r in outcome.runs), \
        [(r.info.run_name, r.info.status) for r in outcome.runs if r.info.status != "FINISHED"]
    # Unique names: trials are unique within their study, every other run everywhere.
    names = Counter(r.info.run_name for r in outcome.runs if not is_trial(r))
    names.update(f"{r.data.tags['optuna.study_name']}/{r.info.run_name}"
                 for r in outcome.runs if is_trial(r))
    assert [n for n, c in names.items() if c > 1] == []
    served, evaluated = outcome.served_vs_evaluated
    assert served == evaluated


@pytest.mark.parametrize("chain", list(CHAINS))
def test_each_training_dvc_runs_is_one_run_in_the_one_store(request, chain):
    before = 0
    for name, outcome in request.getfixturevalue(chain).outcomes.items():
        trainings = sum(r.info.run_name.startswith("train ") for r in outcome.runs)
        logs = "".join(r.stdout + r.stderr for r in outcome.results)
        ran = logs.count("Running stage 'train'")
        assert trainings - before == ran, (name, trainings - before, ran)
        before = trainings


def dvc_warnings(result: subprocess.CompletedProcess) -> list[str]:
    """DVC's WARNING lines, but for the one the README explains: the first `dvc exp run` in a
    fresh clone has nothing to check out yet ("No file hash info found")."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("WARNING") and "No file hash info found" not in line]


def test_the_readme_quick_start_runs_as_written_then_the_short_view_compares(experiments):
    quick_start = experiments.outcomes[QUICK_START]
    made, ran, shown = quick_start.results
    assert ran.returncode == 0, quick_start.log()
    # the small study the example sets, not params.yaml's 20 trials x 8 epochs
    study = quick_start.files["tune/study.json"]
    assert study["trials_complete"] + study["trials_pruned"] == 4
    assert study["epochs_per_trial"] == 2
    assert quick_start.files["metrics/evaluate.json"]["test"]["accuracy"] > 0.2
    assert dvc_warnings(ran) == []  # no "is empty", no other noise on the quick start
    # The default view lists the test metrics before every other metric.
    plain = shown.stdout.splitlines()[0].split(",")
    assert plain[plain.index("Created") + 2] == "test.accuracy", plain[:10]

    second = experiments.outcomes[SECOND_EXPERIMENT]
    ran, view = second.results
    assert ran.returncode == 0 and dvc_warnings(ran) == [], second.log()
    assert view.returncode == 0, view.stderr
    rows = list(csv.DictReader(io.StringIO(view.stdout)))
    columns = list(rows[0])
    assert len(columns) <= 15 and "test.accuracy" in columns[:5], columns
    shown = [r for r in rows if r["Experiment"]]
    assert len(shown) == 2 and all(float(r["test.accuracy"]) > 0.2 for r in shown)
    assert {r["train.epochs"] for r in shown} == {"4", "2"}
    # DVC's own edits (params.yaml by -S, dvc.lock) do not make the runs look uncommitted.
    dirty = {r.data.tags["git.dirty"] for r in second.runs if "git.dirty" in r.data.tags}
    assert dirty == {"false"}


def test_queued_and_temporary_experiments_are_named_and_tagged_in_the_repositorys_store(
        experiments):
    project, outcomes = experiments.project, experiments.outcomes
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    names = {e["name"] for commit in shown for e in commit.get("experiments") or []}
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                              text=True, check=True).stdout.strip()
    runs = outcomes["dvc exp run --temp"].runs
    trainings = {r.data.tags.get("dvc.exp_name"): r for r in runs
                 if r.info.run_name.startswith("train ")}
    queued_and_temp = [r for r in runs if r.info.run_name.startswith("train ")][:3]
    assert len(names) >= 5, names  # the README's two, 2 queued, --temp
    mlruns = (project / "mlruns").as_uri()
    for training in queued_and_temp:
        name = training.data.tags["dvc.exp_name"]
        assert name in names and trainings[name] is training
        assert training.info.run_name == f"train {name}"
        assert training.data.tags["dvc.baseline_rev"] == baseline
        assert "test/accuracy" in training.data.metrics  # evaluate wrote into its run
        assert training.info.artifact_uri.startswith(mlruns)  # not in the deleted copy
    (tuning_off,) = [r for r in queued_and_temp if r.data.params["tune.n_trials"] == "0"]
    assert tuning_off.data.params["train.lr"] == "0.001"
    assert "params.yaml" in tuning_off.data.tags["tune.applied"]
    assert [m.step for m in store(project).get_metric_history(tuning_off.info.run_id,
                                                               "val/acc")] == [1]
    # Trials do not depend on train.epochs: `dvc exp run -S train.epochs=2` reused the study.
    second = outcomes[SECOND_EXPERIMENT].results[0].stdout
    assert "Running stage 'tune'" not in second and "Running stage 'train'" in second
    # The --temp run topped the repository's study up from 4 trials to 5: one trial more.
    temp = outcomes["dvc exp run --temp"]
    assert "Running stage 'tune'" in temp.results[0].stdout, temp.results[0].stdout
    queued = outcomes["dvc exp run --queue x2 + dvc queue start -j 2"]
    assert sum(map(is_trial, temp.runs)) == sum(map(is_trial, queued.runs)) + 1


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


REGISTERED = "cifar10-alexnet"  # mlflow.registered_model in params.yaml


def registered_versions(project: Path) -> list:
    return sorted(store(project).search_model_versions(f"name = '{REGISTERED}'"),
                  key=lambda v: int(v.version))


def evaluated_predictions(project: Path, run_id: str) -> pd.DataFrame:
    """reports/predictions.csv as the evaluation in ``run_id`` logged it."""
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation/predictions.csv",
        tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return pd.read_csv(path)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_the_registry_holds_every_evaluated_model_with_champion_on_the_best(request, chain):
    project = request.getfixturevalue(chain).project
    versions = registered_versions(project)
    client = store(project)
    evaluations = [r for r in all_runs(project) if "registry.version" in r.data.tags]
    # every evaluation registered one version, and says which
    assert sorted(int(r.data.tags["registry.version"]) for r in evaluations) == \
        [int(v.version) for v in versions]
    accuracy = {str(v.version): float(v.tags["test_accuracy"]) for v in versions}
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    best = max(accuracy.values())
    # the best, and of equally good ones the first (a tie keeps the champion)
    assert str(champion.version) == min((v for v, a in accuracy.items() if a == best), key=int)
    for evaluation in evaluations:  # each version carries the accuracy its evaluation measured
        assert accuracy[evaluation.data.tags["registry.version"]] == \
            pytest.approx(evaluation.data.metrics["test/accuracy"])
    workspace = read_json(project / "reports/mlflow_model.json")["registered"]
    assert workspace["name"] == REGISTERED and workspace["version"] in accuracy


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_mlflow_models_serve_of_the_champion_answers_what_its_evaluation_scored(experiments):
    """`mlflow models serve -m models:/cifar10-alexnet@champion`, as the README shows it."""
    from cifar_alexnet.core.data import load_meta, load_split

    project = experiments.project
    champion = store(project).get_model_version_by_alias(REGISTERED, "champion")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         f"models:/{REGISTERED}@champion", "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=project, env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 120, "mlflow models serve")
        test = load_split(project / "data/prepared", "test")
        status, reply = post(url, json.dumps({"inputs": test.images.tolist()}).encode())
        # JSON has no dtype: 0-255 written as floats are the same request
        as_floats = post(url, json.dumps({"inputs": test.images[:4].astype(float).tolist()})
                         .encode())
        # what the README says is refused: another shape (NHWC, 16 x 16), not a tensor
        refused = [post(url, json.dumps({"inputs": body}).encode()) for body in
                   (test.images[:2].transpose(0, 2, 3, 1).tolist(),
                    test.images[:2, :, :16, :16].tolist())]
        refused.append(post(url, b'{"instances": "a cat"}'))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert status == 200, reply
    names = load_meta(project / "data/prepared").class_names
    served = [names[int(np.argmax(row))] for row in reply["predictions"]]
    evaluated = evaluated_predictions(project, champion.run_id)["predicted"].tolist()
    assert len(served) == len(evaluated) == len(test.labels)
    assert served == evaluated  # every test image: served = evaluated
    assert as_floats[0] == 200, as_floats  # the same logits (another batch size: to 1e-4)
    assert np.allclose(as_floats[1]["predictions"], reply["predictions"][:4], atol=1e-4)
    for code, body in refused:
        assert code == 400, (code, body)
        assert body.get("message") and "Traceback" not in body["message"], body


def test_cifar_predict_classifies_picture_files_as_the_evaluate_stage_did(experiments, tmp_path):
    from PIL import Image

    from cifar_alexnet.core.data import load_split

    project = experiments.project
    test = load_split(project / "data/prepared", "test")
    evaluated = pd.read_csv(project / "reports/predictions.csv")
    shown = range(0, len(test.labels), 10)
    for i in shown:
        Image.fromarray(test.images[i].transpose(1, 2, 0)).save(tmp_path / f"{i:03d}.png")
    Image.fromarray(test.images[0].transpose(1, 2, 0)).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "readme.txt").write_text("not a picture")
    pictures = [str(tmp_path / f"{i:03d}.png") for i in shown]
    result = run(["cifar-predict", *pictures, str(tmp_path / "photo.jpg"),
                  str(tmp_path / "readme.txt"), "--format", "json"], cwd=project)
    assert result.returncode == 1  # the text file
    assert f"error: {tmp_path / 'readme.txt'}: cannot be read as an image" in result.stderr
    rows = {Path(r["file"]).name: r["predictions"] for r in json.loads(result.stdout)}
    assert "photo.jpg" in rows and len(rows) == len(pictures) + 1
    for i in shown:  # lossless files: exactly the evaluated class and probability
        top = rows[f"{i:03d}.png"][0]
        assert top["class"] == evaluated["predicted"][i]
        assert top["probability"] == pytest.approx(evaluated["confidence"][i], abs=2e-5)

    # the champion from the registry, by its alias: what its own evaluation scored
    champion = store(project).get_model_version_by_alias(REGISTERED, "champion")
    by_alias = run(["cifar-predict", *pictures, "--model", f"models:/{REGISTERED}@champion",
                    "--format", "csv", "--top-k", "1"], cwd=project,
                   MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    assert by_alias.returncode == 0, by_alias.stderr
    champion_scored = evaluated_predictions(project, champion.run_id)
    predicted = pd.read_csv(io.StringIO(by_alias.stdout))
    assert predicted["class"].tolist() == [champion_scored["predicted"][i] for i in shown]


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


def test_evaluating_a_model_whose_training_run_is_elsewhere_links_to_it(experiments, tmp_path):
    """Outputs from DVC's run cache or a `dvc pull` name a training run this store may not hold:
    evaluation gets a run of its own that links to it, and nothing is retrained."""
    project = experiments.project
    other = f"sqlite:///{tmp_path / 'other.db'}"
    trained_by = read_json(project / "models/mlflow_run.json")["run_id"]
    reports = tmp_path / "reports"
    result = run([sys.executable, "pipeline/evaluate.py", "--data", "data/prepared", "--model",
                  "models", "--metrics", str(tmp_path / "evaluate.json"), "--reports",
                  str(reports)], cwd=project, MLFLOW_TRACKING_URI=other)
    assert result.returncode == 0, result.stderr
    info = read_json(reports / "mlflow_model.json")
    assert info["trained_by_run_id"] == trained_by != info["run_id"]
    evaluation = MlflowClient(tracking_uri=other).get_run(info["run_id"])
    assert evaluation.info.run_name.startswith("evaluate ")
    assert evaluation.data.tags["trained_by.run_id"] == trained_by
    assert evaluation.data.tags["dvc.stage"] == "evaluate"
    assert "test/accuracy" in evaluation.data.metrics


def test_mlflow_ui_in_a_real_browser_lists_the_runs_and_their_dataset(pipeline, tmp_path):
    """`mlflow ui` over the repository's store, rendered by headless Chromium at the link the
    stages log: the runs view (not the GenAI overview) with every training and its dataset."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    if browser is None:
        pytest.skip("no chromium on PATH (.ci/run install installs it)")
    project, outcomes = pipeline.project, pipeline.outcomes
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
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
