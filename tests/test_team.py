"""A team's shared engines, started for real on 127.0.0.1: an `mlflow server` on PostgreSQL with
its artifacts in S3 (moto's S3-compatible server) that every command logs to unchanged, a
registry gate that racing evaluations cannot break, and a DVC remote on the same S3 that moves
the pipeline's outputs, run cache and experiments between two clones without retraining."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from cifar_alexnet.core.data import load_split
from helpers import (ROOT, START_LINE, free_port, make_project, run_together,
                     stop_process_group, subprocess_env, tiny_params, wait_for_http)

pytestmark = pytest.mark.slow
MODEL = "cifar10-alexnet"  # mlflow.registered_model


def client_env(team_server, **extra: str) -> dict[str, str]:
    """What a teammate's shell holds: the server's URL and no cloud credentials at all."""
    env = {k: v for k, v in subprocess_env(MLFLOW_TRACKING_URI=team_server.uri, **extra).items()
           if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    return env


def command(args: list[str], cwd: Path, env: dict[str, str],
            timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"$ {' '.join(args)}\n{result.stdout[-3000:]}" \
                                   f"{result.stderr[-3000:]}"
    return result


def dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return command([sys.executable, "-m", "dvc", *args], project, env)


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], cwd=project, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def team(archive, team_server, tmp_path_factory):
    """A project whose `dvc repro` logged to the shared server, pushed with its run cache to a
    DVC remote on S3, and committed to a git origin that teammates clone."""
    root = tmp_path_factory.mktemp("team")
    raw = tiny_params(archive, tune={"n_trials": 2, "epochs_per_trial": 1, "pruner": "none"},
                      train={"epochs": 2})
    project = make_project(root / "alice", raw)
    env = client_env(team_server)
    dvc(project, env, "repro")
    bucket = "dvc-store"
    team_server.s3.client().create_bucket(Bucket=bucket)
    # The remote is committed; where it is served and the credentials are this clone's own.
    dvc(project, env, "remote", "add", "-d", "team", f"s3://{bucket}/cifar")
    connect_remote(project, env, team_server.s3)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline run, team remote")
    dvc(project, env, "push", "--run-cache")
    origin = root / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(project), str(origin)], check=True)
    git(project, "remote", "add", "origin", str(origin))
    # An experiment shared with its run cache: only evaluate reruns (flip TTA off).
    ran = dvc(project, env, "exp", "run", "-n", EXPERIMENT, "-S", "evaluate.flip_tta=false")
    assert "Running stage 'evaluate'" in ran.stdout and "Running stage 'train'" not in ran.stdout
    dvc(project, env, "exp", "push", "--run-cache", "origin", EXPERIMENT)
    return project, origin, env, bucket


EXPERIMENT = "no-tta"


def connect_remote(project: Path, env: dict[str, str], s3) -> None:
    for key, value in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key),
                       ("secret_access_key", s3.secret_key)):
        dvc(project, env, "remote", "modify", "--local", "team", key, value)


def teammate(team, team_server, name: str) -> Path:
    project, origin, env, _ = team
    clone = project.parent / name
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    connect_remote(clone, env, team_server.s3)
    return clone


def test_every_part_logs_to_the_shared_server_and_artifacts_land_in_s3(team, team_server):
    project, _, env, _ = team
    assert not [k for k in env if k.startswith("AWS_")]  # the client has no cloud credentials
    client = MlflowClient(team_server.uri)
    experiment = client.get_experiment_by_name("cifar10-alexnet")
    runs = client.search_runs([experiment.experiment_id])
    (training,) = [r for r in runs if r.info.run_name.startswith("train ")]
    (study,) = [r for r in runs if r.info.run_name.startswith("study ")]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert len(trials) == 2 and "test/accuracy" in training.data.metrics
    lineage = json.loads((project / "models/mlflow_run.json").read_text())
    served = json.loads((project / "reports/mlflow_model.json").read_text())
    assert lineage["run_id"] == served["run_id"] == training.info.run_id
    # the pipeline's evaluation and the experiment's (flip TTA off), each a version
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert served["registered"]["version"] == "2"
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert float(champion.tags["test_accuracy"]) == max(float(v.tags["test_accuracy"])
                                                        for v in versions)
    # Artifacts are objects in the bucket, written by the server (proxied), not by the client.
    assert training.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = team_server.s3.keys(team_server.bucket, team_server.prefix)
    assert any(k.endswith("evaluation/confusion_matrix.png") for k in keys), keys[:20]
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]


def test_predict_and_serve_the_champion_from_the_shared_registry(team, team_server, tmp_path):
    project, _, env, _ = team
    test = load_split(project / "data/prepared", "test")
    for i in range(3):
        Image.fromarray(np.transpose(test.images[i], (1, 2, 0))).save(tmp_path / f"{i}.png")
    predicted = command([sys.executable, "-m", "cifar_alexnet.cifar_predict", str(tmp_path),
                         "--model", f"models:/{MODEL}@champion", "--format", "json"],
                        project, env)
    assert len(json.loads(predicted.stdout)) == 3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               f"models:/{MODEL}@champion", "--env-manager", "local", "--host",
                               "127.0.0.1", "--port", str(port)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 180, "mlflow models serve")
        body = json.dumps({"inputs": test.images[:2].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            logits = np.asarray(json.loads(response.read())["predictions"])
    finally:
        stop_process_group(server)
    assert logits.shape == (2, 10)


GATE = START_LINE + """
import sys
import mlflow
from cifar_alexnet import tracking
model_uri, name, accuracy = sys.argv[1], sys.argv[2], float(sys.argv[3])
mlflow.set_experiment("registry race")
with mlflow.start_run():
    start_line(Path(sys.argv[-1]))
    print(tracking.register_and_gate(model_uri, name, accuracy).alias)
"""


def test_racing_evaluations_leave_the_champion_on_the_best_version(team_server, tmp_path,
                                                                     monkeypatch):
    """Evaluations on several machines finish at once: the registry has no transactions, yet
    no better version is left without @champion, and every version gets a decision."""
    import mlflow

    from cifar_alexnet import tracking
    from cifar_alexnet.config import ModelConfig
    from cifar_alexnet.core.model import build_model

    # What each evaluation registers is a logged model; the race is in registering and gating
    # it, so one model logged here serves every racer (each logging its own took 4 s apiece).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    experiment = MlflowClient(team_server.uri).create_experiment("registry race")
    with mlflow.start_run(experiment_id=experiment):  # (set_experiment would outlive the test)
        model_uri = tracking.log_model(build_model(ModelConfig("lenet5", 0.25, 0.0, "none")),
                                       np.zeros((2, 3, 32, 32), dtype=np.uint8),
                                       [str(i) for i in range(10)])
    # Four evaluations released at one start line (the best started neither first nor last)
    accuracies = (0.60, 0.50, 0.90, 0.75)
    name = "race"
    gates = run_together([[sys.executable, "-c", GATE, model_uri, name, str(a)]
                          for a in accuracies], tmp_path / "go", client_env(team_server))
    for gate in gates:
        assert gate.returncode == 0, gate.stderr[-3000:]
    client = MlflowClient(team_server.uri)
    versions = client.search_model_versions(f"name = '{name}'")
    champion = client.get_model_version_by_alias(name, "champion")
    assert float(champion.tags["test_accuracy"]) == max(accuracies)
    assert len(versions) == len(accuracies)
    assert all("promotion" in v.tags for v in versions)


def test_a_fresh_clone_pulls_everything_and_retrains_nothing_as_ci_does(team, team_server):
    """CI's step (`bash .ci/run team`): the remote from DVC_REMOTE_URL, credentials from the
    environment, `dvc repro --pull` on a clone with an empty cache."""
    project, origin, env, bucket = team
    bob = project.parent / "bob"
    subprocess.run(["git", "clone", "-q", str(origin), str(bob)], check=True)
    (bob / ".ci").mkdir()
    (bob / ".ci/run").write_text((ROOT / ".ci/run").read_text())
    (bob / ".venv").symlink_to(ROOT / ".venv")  # `bash .ci/run install` made it, in CI
    ci_env = {**env, "DVC_REMOTE_URL": f"s3://{bucket}/cifar",
              "DVC_REMOTE_ENDPOINT": team_server.s3.endpoint, **team_server.s3.credentials_env()}
    pulled = command(["bash", ".ci/run", "team"], bob, ci_env)
    assert "Running stage" not in pulled.stdout + pulled.stderr, pulled.stdout[-3000:]
    assert "Data and pipelines are up to date" in pulled.stdout
    assert (bob / "models/model.pt").is_file() and (bob / "reports/mlflow_model.json").is_file()
    assert json.loads(dvc(bob, env, "status", "--json").stdout) == {}
    # Credentials live in the environment or .dvc/config.local, never in the committed config.
    committed = (bob / ".dvc/config").read_text()
    assert "secret" not in committed and "endpointurl" not in committed
    assert "config.local" in git(bob, "check-ignore", "-v", ".dvc/config.local")


def test_evaluating_on_the_pulling_clone_links_to_the_training_run(team, team_server):
    carol = teammate(team, team_server, "carol")
    _, _, env, _ = team
    dvc(carol, env, "pull")
    trained_by = json.loads((carol / "models/mlflow_run.json").read_text())["run_id"]
    # With the shared server: the evaluation goes into the training run itself.
    dvc(carol, env, "repro", "--force", "--single-item", "evaluate")
    assert json.loads((carol / "reports/mlflow_model.json").read_text())["run_id"] == trained_by
    assert MlflowClient(team_server.uri).get_run(trained_by).data.tags["evaluate.status"] == \
        "FINISHED"
    # (Without it, in a store that does not hold the training run, the evaluation is a new run
    # that names the training run: test_experiments.py evaluates so.)


def test_an_experiment_moves_between_clones_with_its_metrics(team, team_server):
    project, _, env, _ = team

    def experiment(clone: Path) -> dict:
        shown = json.loads(dvc(clone, env, "exp", "show", "--json").stdout)
        (found,) = [e for commit in shown for e in commit.get("experiments") or []
                    if e["name"] == EXPERIMENT]
        return found["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]["test"]

    dave = teammate(team, team_server, "dave")
    dvc(dave, env, "exp", "pull", "origin", EXPERIMENT)
    assert experiment(dave) == experiment(project)
    dvc(dave, env, "exp", "apply", EXPERIMENT)  # its outputs come from the remote
    assert json.loads((dave / "metrics/evaluate.json").read_text())["test"] == experiment(project)
