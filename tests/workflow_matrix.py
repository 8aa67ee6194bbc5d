"""The workflow matrix's machinery, shared by test_experiments.py and test_workflows.py: each
drives one project through a chain of workflows (the tools' own commands, one after another, on
generated data) and records what each workflow left, as an Outcome. The checks every workflow
and every chain must pass are here, so both projects are held to the same seams.

Every workflow is a whole pipeline run or most of one, so each counts: the README's quick start,
the single `dvc repro` checked as a user checks one and the matrix's first workflows are the same
runs, not three; and the two projects are two modules, so two test workers drive them at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, dvc

README = ROOT / "README.md"


def store(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def all_runs(project: Path) -> list:
    client = store(project)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


Workflow = Callable[[Path], list[subprocess.CompletedProcess]]

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


def is_trial(run) -> bool:
    return "optuna.trial_number" in run.data.tags


def assert_seams_hold(outcome: Outcome) -> None:
    """What must hold after every workflow: each command succeeded, `dvc status` is clean, one
    MLflow store holds every run (all FINISHED, names unique) including the ones models/ and
    reports/ name, and the logged model answers what the evaluate stage scored."""
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


def assert_each_training_is_one_run(chain: Chain) -> None:
    """Every train stage DVC ran, in any workflow, is one training run in the store."""
    before = 0
    for name, outcome in chain.outcomes.items():
        trainings = sum(r.info.run_name.startswith("train ") for r in outcome.runs)
        logs = "".join(r.stdout + r.stderr for r in outcome.results)
        ran = logs.count("Running stage 'train'")
        assert trainings - before == ran, (name, trainings - before, ran)
        before = trainings


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


def assert_registry_holds_every_evaluation(project: Path) -> None:
    """Every evaluation registered one version with its accuracy; @champion is on the best."""
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


def matrix_tests(fixture: str, workflows: dict[str, Workflow]) -> tuple[Callable, ...]:
    """The tests every project of the matrix gets, for the module-scoped ``fixture`` (a Chain)
    that drives ``workflows``: a module assigns them to test_ names, and pytest collects them."""

    @pytest.mark.parametrize("workflow", list(workflows))
    def test_after_each_workflow_the_seams_hold(request, workflow):
        assert_seams_hold(request.getfixturevalue(fixture).outcomes[workflow])

    def test_each_training_dvc_runs_is_one_run_in_the_one_store(request):
        assert_each_training_is_one_run(request.getfixturevalue(fixture))

    def test_the_registry_holds_every_evaluated_model_with_champion_on_the_best(request):
        assert_registry_holds_every_evaluation(request.getfixturevalue(fixture).project)

    return (test_after_each_workflow_the_seams_hold,
            test_each_training_dvc_runs_is_one_run_in_the_one_store,
            test_the_registry_holds_every_evaluated_model_with_champion_on_the_best)
