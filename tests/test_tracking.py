"""The tracking store as stages meet it: what a run records about where it came from (the git
commit, and whether the code differed from it: DVC's own edits to dvc.lock and, in `dvc exp run`,
params.yaml do not count), and a new SQLite store opened by several stages at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from cifar_alexnet.tracking import git_state
from helpers import START_LINE, run_together, subprocess_env

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


@pytest.fixture
def repo(tmp_path):
    project = tmp_path / "repo" / "project"  # a DVC project in a subfolder of its git repo
    project.mkdir(parents=True)
    for name in ("dvc.lock", "params.yaml", "train.py"):
        (project / name).write_text("v1\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "v1"], cwd=project, check=True)
    return project


def edit(project, name):
    (project / name).write_text("v2\n")


def test_a_clean_tree_and_dvcs_own_lock_file_are_not_dirty(repo, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    state = git_state(repo)
    assert len(state["git.commit"]) == 40 and state["git.dirty"] == "false"
    edit(repo, "dvc.lock")  # DVC rewrites it after every stage of a `dvc repro`
    assert git_state(repo)["git.dirty"] == "false"


@pytest.mark.parametrize("name", ["params.yaml", "train.py"])
def test_edits_outside_an_experiment_are_dirty(repo, monkeypatch, name):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    edit(repo, name)
    assert git_state(repo)["git.dirty"] == "true"


def test_in_dvc_exp_run_the_params_dvc_set_are_not_dirty_but_code_edits_are(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-kite")  # as `dvc exp run` sets it for its stages
    edit(repo, "params.yaml")
    edit(repo, "dvc.lock")
    # ...and the outputs it stages in git's index for the experiment's commit
    (repo / "dvc.yaml").write_text("stages:\n  tune:\n    cmd: x\n    outs:\n      - tune\n"
                                   "    metrics:\n      - tune.json:\n          cache: false\n")
    subprocess.run(["git", "add", "-f", "dvc.yaml"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "pipeline"], cwd=repo, check=True)
    (repo / "tune").mkdir()
    for name in ("tune/best_params.yaml", "tune.json"):
        (repo / name).write_text("{}\n")
    subprocess.run(["git", "add", "tune", "tune.json"], cwd=repo, check=True)
    assert git_state(repo)["git.dirty"] == "false"
    edit(repo, "train.py")
    assert git_state(repo)["git.dirty"] == "true"


def test_outside_git_nothing_is_claimed(tmp_path):
    assert git_state(tmp_path) == {}


OPEN_STORE = START_LINE + """
import sys
from cifar_alexnet import tracking  # mlflow imported before the start line
start_line(Path(sys.argv[-1]))
tracking.connect()  # MLFLOW_TRACKING_URI: a store nobody opened yet
"""


@pytest.mark.slow
def test_stages_that_open_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """`dvc queue start -j 2` or two study workers on a fresh project: MLflow creates and
    migrates the database on first open; without a lock one of them failed, or several,
    leaving the file half-migrated. Four openers released at one instant race for it."""
    store = tmp_path / "mlflow.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    for opened in run_together([[sys.executable, "-c", OPEN_STORE]] * 4, tmp_path / "go", env):
        assert opened.returncode == 0, opened.stderr[-2000:]
    assert MlflowClient(f"sqlite:///{store}").search_experiments()  # usable afterwards


def test_importing_tracking_changes_no_environment_and_the_first_store_check_configures_it(
        tmp_path):
    """A library import leaves the process alone, and loads MLflow without torch or matplotlib
    (a store check or a registry gate needs no model); the stage that uses a store gets
    MLflow's HTTP retries shortened (a lost server fails in seconds), unless the user set
    them."""
    code = ("import os, sys, mlflow\n"
            "names = ('MLFLOW_HTTP_REQUEST_MAX_RETRIES', 'MLFLOW_HTTP_REQUEST_TIMEOUT')\n"
            "from cifar_alexnet import tracking\n"
            "assert not {'torch', 'matplotlib'} & set(sys.modules), 'a heavy import'\n"
            "print([os.environ.get(n) for n in names])\n"
            f"os.environ['MLFLOW_TRACKING_URI'] = 'sqlite:///{tmp_path / 'mlflow.db'}'\n"
            "tracking.connect()\n"
            "print([os.environ.get(n) for n in names])\n")
    for user_timeout, expected in ((None, "['2', '20']"), ("7", "['2', '7']")):
        extra = {"MLFLOW_HTTP_REQUEST_TIMEOUT": user_timeout} if user_timeout else {}
        env = subprocess_env(**extra)
        env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        if not user_timeout:
            env.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        before, after = result.stdout.splitlines()
        assert before == f"[None, {user_timeout!r}]" and after == expected


def test_a_process_configures_its_store_once_and_again_only_for_another_uri(tmp_path,
                                                                            monkeypatch):
    """`connect()` is what every tracking call asks for the store: the first call configures
    and checks it (an SQLite store is created then), later ones return it without touching
    the store, and a changed MLFLOW_TRACKING_URI (a test, the benchmark's throwaway store)
    gets the other store configured and checked in its turn."""
    from cifar_alexnet import tracking

    first, other = tmp_path / "first.db", tmp_path / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first}")
    store = tracking.connect()
    assert store == tracking.Store(f"sqlite:///{first}", is_default=False, parent_run=None)
    assert first.is_file()  # checked: MLflow made its tables
    first.unlink()
    assert tracking.connect() is store and not first.exists()  # not configured again

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.connect().uri == f"sqlite:///{other}" and other.is_file()


def test_without_a_uri_the_store_is_the_repositorys_and_mlflow_runs_run_is_taken_as_parent(
        tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: the repository's mlflow.db, also from inside a temporary DVC
    experiment copy; the run `mlflow run` hands over (MLFLOW_RUN_ID) becomes the parent of the
    process's runs and leaves the environment, where mlflow.start_run would resume it."""
    from cifar_alexnet import tracking

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpcopy"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123abcd")
    store = tracking.connect()
    assert store.uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}" and store.is_default
    assert store.parent_run == "0123abcd" and "MLFLOW_RUN_ID" not in os.environ
    assert (tmp_path / "repo" / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
