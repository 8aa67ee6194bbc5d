"""The workflow matrix's ``experiments`` project, driven one command after another: the README's
quick start as written (`make-synthetic-cifar`, then its `dvc exp run -S data.url=… …`), its
second experiment and short `dvc exp show` view, `--queue` ×2 + `dvc queue start -j 2`,
`--temp`; then `mlflow models serve`, `cifar-predict` and an evaluation elsewhere over what they
left. After each workflow the seams in workflow_matrix.py must hold.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from helpers import (dvc, free_port, make_project, run, shell_commands, subprocess_env,
                     tiny_params, wait_for_http)
from workflow_matrix import (README, REGISTERED, Chain, Workflow, drive, evaluated_predictions,
                             is_trial, matrix_tests, read_json, store)

pytestmark = pytest.mark.slow


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


def wait_for_queue(project: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=project)
        if not any(word in status.stdout for word in ("Queued", "Running")):
            return status
        time.sleep(10)  # each look is a DVC process (0.7 s of CPU); the queue takes a minute
    raise AssertionError(f"queue still busy after {timeout} s:\n{status.stdout}")


QUICK_START = "README quick start: make-synthetic-cifar, dvc exp run -S data.url=…"
SECOND_EXPERIMENT = "dvc exp run -S, then the README's dvc exp show view"
WORKFLOWS: dict[str, Workflow] = {
    QUICK_START: readme_quick_start,   # a study of 4 trials (the README's tune.n_trials)
    SECOND_EXPERIMENT: readme_second_experiment,
    "dvc exp run --queue x2 + dvc queue start -j 2": queue_two_and_start,
    # a changed tune.n_trials: the temporary copy tops up the repository's study
    "dvc exp run --temp": lambda p: [dvc("exp", "run", "--temp", "-S", "tune.n_trials=5",
                                         "-S", "train.epochs=5", cwd=p)],
}


@pytest.fixture(scope="module")
def experiments(archive, tmp_path_factory) -> Chain:
    """A fresh project (tiny params) driven through the ``experiments`` workflows."""
    project = make_project(tmp_path_factory.mktemp("experiments") / "project",
                           tiny_params(archive))
    return drive(project, WORKFLOWS)


(test_after_each_workflow_the_seams_hold,
 test_each_training_dvc_runs_is_one_run_in_the_one_store,
 test_the_registry_holds_every_evaluated_model_with_champion_on_the_best) = \
    matrix_tests("experiments", WORKFLOWS)


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
