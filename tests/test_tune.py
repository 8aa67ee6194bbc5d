"""The Optuna study: ranges, pruning, NaN trials, resume after SIGKILL, determinism, MLflow runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy.exc
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from cifar_alexnet.config import params_from_dict
from cifar_alexnet.errors import ConfigError, PipelineError
from cifar_alexnet.stages.train import apply_best_params
from cifar_alexnet.best_params import (BEST_PARAMS_FILE, DROPOUT, LR, load_best_params,
                                      write_best_params)
from cifar_alexnet.tune.runner import run_study
from cifar_alexnet.tune.report import STUDY_FILE, SUMMARY_FILE, TRIALS_FILE, write_disabled
from cifar_alexnet.tune.study import open_study, progress, study_name
from helpers import subprocess_env, tiny_params, write_params


@pytest.fixture
def tracking_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def tune_raw(archive, tmp_path, **tune):
    raw = tiny_params(archive)
    raw["tune"].update({"storage": f"sqlite:///{tmp_path / 'study.db'}", **tune})
    return raw


def tune_params(archive, tmp_path, **tune):
    return params_from_dict(tune_raw(archive, tmp_path, **tune))


def test_study_searches_the_ranges_and_writes_best_params_that_train_uses(
        archive, prepared, tmp_path, tracking_uri):
    params = tune_params(archive, tmp_path, n_trials=4, epochs_per_trial=3, pruner="median")
    out = tmp_path / "tune"
    study = run_study(params, prepared, out_dir=out)

    assert len(study.trials) == 4 and progress(study).finished == 4
    for trial in study.trials:
        assert params.tune.lr_low <= trial.params[LR] <= params.tune.lr_high
        assert params.tune.dropout_low <= trial.params[DROPOUT] <= params.tune.dropout_high
    best = yaml.safe_load((out / BEST_PARAMS_FILE).read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["params"] == {"train": {"lr": study.best_params[LR]},
                              "model": {"dropout": study.best_params[DROPOUT]}}
    summary = yaml.safe_load((out / SUMMARY_FILE).read_text())
    # A DVC metric: what the study found, as numbers (strings make `dvc exp show` columns
    # unreadably wide, counters crowd out the results)...
    assert summary == {"best_value": study.best_value, "best_trial": study.best_trial.number,
                       "best_margin": pytest.approx(summary["best_margin"])}
    assert summary["best_margin"] > 0
    # ...and the words and counts beside it
    study_info = yaml.safe_load((out / STUDY_FILE).read_text())
    assert study_info["study_name"] == study.study_name
    assert study_info["direction"] == "maximize" and study_info["storage"].startswith("sqlite")
    assert study_info["trials_complete"] + study_info["trials_pruned"] == 4
    assert study_info["epochs_without_pruning"] == 4 * 3
    assert study_info["epochs_spent"] == sum(t.user_attrs["epochs_run"] for t in study.trials)
    assert len((out / TRIALS_FILE).read_text().splitlines()) == 1 + 4
    assert {p.name for p in (out / "plots").iterdir()} == {
        "optimization_history.png", "param_importances.png", "lr_dropout_contour.png"}

    # Training takes the tuned values over params.yaml's and says where they came from.
    trained, tags = apply_best_params(params, out / BEST_PARAMS_FILE)
    assert trained.train.lr == study.best_params[LR] != params.train.lr
    assert trained.model.dropout == study.best_params[DROPOUT]
    assert tags["tune.study_name"] == study.study_name
    assert tags["tune.best_trial"] == str(study.best_trial.number)

    # MLflow: one parent run for the invocation, one nested run per trial.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment)
                               .experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.data.tags["optuna.study_name"] == study.study_name
    assert parent.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    assert float(parent.data.params[f"best.{LR}"]) == pytest.approx(study.best_params[LR])
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune/plots")}
    assert "tune/plots/optimization_history.png" in artifacts
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.trials]
    for trial in study.trials:
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == trial.state.name
        assert float(run.data.params[LR]) == pytest.approx(trial.params[LR])
        history = client.get_metric_history(run.info.run_id, "val/acc")
        assert [m.step for m in history] == list(range(1, trial.user_attrs["epochs_run"] + 1))


def test_an_architecture_without_dropout_is_tuned_on_the_learning_rate_alone(archive,
                                                                             prepared, tmp_path,
                                                                             tracking_uri):
    params = params_from_dict({**tune_raw(archive, tmp_path, n_trials=2, epochs_per_trial=1),
                               "model": {"arch": "lenet5", "width": 1.0, "dropout": 0.3,
                                         "norm": "none"}})
    out = tmp_path / "tune"
    study = run_study(params, prepared, out_dir=out)
    assert [set(t.params) for t in study.trials] == [{LR}, {LR}]
    best = yaml.safe_load((out / BEST_PARAMS_FILE).read_text())
    assert best["params"] == {"train": {"lr": study.best_params[LR]}}
    trained, _ = apply_best_params(params, out / BEST_PARAMS_FILE)
    assert trained.model.dropout == params.model.dropout  # params.yaml's, unused by LeNet-5


def test_the_median_pruner_stops_a_trial_that_cannot_learn(archive, prepared, tmp_path,
                                                          tracking_uri):
    params = tune_params(archive, tmp_path, n_trials=4, epochs_per_trial=3, pruner="median",
                         lr_low=1e-7)
    study = open_study(params)
    for lr in (3e-3, 3e-3, 3e-3, 1e-7):  # three that learn, then one that cannot
        study.enqueue_trial({LR: lr, DROPOUT: 0.1})
    study = run_study(params, prepared, out_dir=tmp_path / "tune")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED], states
    assert study.trials[3].user_attrs["epochs_run"] < 3  # stopped before its last epoch
    counts = yaml.safe_load((tmp_path / "tune" / STUDY_FILE).read_text())
    assert counts["trials_pruned"] == 1
    assert counts["epochs_spent"] < counts["epochs_without_pruning"] == 12
    client = MlflowClient(tracking_uri)
    (pruned,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.optuna.trial_number = '3'")
    assert pruned.data.tags["optuna.state"] == "PRUNED" and pruned.info.status == "FINISHED"


def test_rerun_tops_the_study_up_instead_of_starting_over(archive, prepared, tmp_path,
                                                          tracking_uri):
    first = run_study(tune_params(archive, tmp_path, n_trials=2, epochs_per_trial=1), prepared)
    values = [t.value for t in first.trials]
    again = run_study(tune_params(archive, tmp_path, n_trials=3, epochs_per_trial=1), prepared)
    assert again.study_name == first.study_name
    assert len(again.trials) == 3 and [t.value for t in again.trials[:2]] == values
    client = MlflowClient(tracking_uri)
    study_runs = lambda: client.search_runs(  # noqa: E731
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.optuna.study_name = '{first.study_name}'")
    before = len(study_runs())
    out = tmp_path / "tune"
    unchanged = run_study(tune_params(archive, tmp_path, n_trials=3, epochs_per_trial=1), prepared,
                          out_dir=out)
    assert len(unchanged.trials) == 3
    assert len(study_runs()) == before  # nothing ran: no empty study run in MLflow...
    best = yaml.safe_load((out / BEST_PARAMS_FILE).read_text())
    assert best["best_trial"] == unchanged.best_trial.number  # ...but the outputs are written
    names = [r.info.run_name for r in study_runs() if "mlflow.parentRunId" not in r.data.tags]
    assert len(names) == 2 and len(set(names)) == 2, names  # one per invocation, distinct


def test_same_seed_gives_the_same_sequence_of_suggestions(archive, prepared, tmp_path,
                                                          tracking_uri):
    def suggestions(folder, seed):
        params = tune_params(archive, tmp_path / folder, n_trials=2, epochs_per_trial=1,
                             pruner="none", seed=seed)
        return [t.params for t in run_study(params, prepared).trials]

    first = suggestions("a", 7)
    assert suggestions("b", 7) == first
    assert suggestions("c", 8) != first


def test_a_resumed_study_suggests_what_the_uninterrupted_one_did(archive, prepared, tmp_path,
                                                                 tracking_uri):
    """Stopped after 2 trials and resumed, or run straight through: the same 4 trials."""
    def params(folder, n_trials):
        return tune_params(archive, tmp_path / folder, n_trials=n_trials, epochs_per_trial=1,
                           pruner="none", sampler="tpe")

    straight = run_study(params("straight", 4), prepared)
    run_study(params("resumed", 2), prepared)
    resumed = run_study(params("resumed", 4), prepared)
    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]
    assert [t.value for t in resumed.trials] == [t.value for t in straight.trials]


def test_concurrent_top_ups_with_one_worker_id_draw_different_trials(archive, tmp_path):
    """`dvc queue start -j 2`: two tune stages top the same study up at once, both as worker 0.
    Each trial is seeded once it exists, so the later one sees the earlier one running."""
    params = tune_params(archive, tmp_path, n_trials=4)
    first, second = open_study(params), open_study(params)  # two processes' views
    drawn = []
    for study in (first, second):
        trial = study.ask()
        drawn.append((trial.suggest_float(LR, params.tune.lr_low, params.tune.lr_high, log=True),
                      trial.suggest_float(DROPOUT, 0.0, 0.5)))
    assert drawn[0] != drawn[1]
    # ...while a trial started alone draws what the first one did: seeds depend on the study's
    # state, not on the process.
    alone = open_study(tune_params(archive, tmp_path / "other", n_trials=4)).ask()
    assert (alone.suggest_float(LR, params.tune.lr_low, params.tune.lr_high, log=True),
            alone.suggest_float(DROPOUT, 0.0, 0.5)) == drawn[0]


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(archive, prepared,
                                                                       tmp_path, tracking_uri):
    raw = tune_raw(archive, tmp_path, n_trials=2, epochs_per_trial=2, lr_low=1e5, lr_high=1e6)
    raw["train"]["optimizer"] = "sgd"
    params = params_from_dict(raw)
    study = run_study(params, prepared)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    for trial in study.trials:
        assert "lower train.lr" in trial.user_attrs["fail_reason"]
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [client.get_experiment_by_name(params.mlflow.experiment).experiment_id],
        filter_string="tags.optuna.state = 'FAIL'")
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    # With no completed trial there are no best params to write: a clear error, no file.
    with pytest.raises(PipelineError, match="no completed trial"):
        run_study(params, prepared, out_dir=tmp_path / "tune")
    assert not (tmp_path / "tune" / BEST_PARAMS_FILE).exists()


def test_a_study_made_for_other_settings_is_refused(archive, tmp_path):
    params = tune_params(archive, tmp_path, study_name="shared")
    open_study(params)
    raw = tune_raw(archive, tmp_path, study_name="shared", epochs_per_trial=5)
    raw["model"]["width"] = 0.125
    with pytest.raises(ConfigError, match=r"model.width, tune.epochs_per_trial"):
        open_study(params_from_dict(raw))
    # `auto` names the study after its settings, so changed settings get their own study.
    auto = params_from_dict({**raw, "tune": {**raw["tune"], "study_name": "auto"}})
    assert study_name(auto) != study_name(tune_params(archive, tmp_path))


@pytest.mark.parametrize("change,message", [
    ({"lr_low": 0.1, "lr_high": 0.01}, "tune.lr_low (0.1) must not exceed tune.lr_high"),
    ({"dropout_high": 1.0}, "tune.dropout_high = 1.0 is invalid"),
    ({"direction": "minimize"}, "does not fit tune.metric = 'val_acc'"),
    ({"pruner": "asha"}, "allowed values are median, hyperband, none"),
    ({"n_trials": -1}, "tune.n_trials = -1 is invalid"),
])
def test_invalid_tune_params_are_named(archive, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tune_params(archive, tmp_path, **change)


def test_tuning_off_leaves_training_params_as_params_yaml_has_them_and_tags_why(archive, tmp_path):
    params = tune_params(archive, tmp_path, n_trials=0)
    write_disabled(tmp_path / "tune")
    trained, tags = apply_best_params(params, tmp_path / "tune" / BEST_PARAMS_FILE)
    assert trained == params
    assert "params.yaml" in tags["tune.applied"]


def test_tuning_off_over_tuned_values_says_what_it_replaces(archive, tmp_path, caplog):
    out = tmp_path / "tune"
    write_best_params(out / BEST_PARAMS_FILE, {LR: 0.003, DROPOUT: 0.2}, "my-study", 7)
    write_disabled(out)
    assert load_best_params(out / BEST_PARAMS_FILE)[0] == {}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "tune.n_trials is 0" in warning and "train.lr=0.003" in warning
    assert "my-study" in warning and "trial 7" in warning


def test_a_study_run_that_the_next_dvc_repro_would_discard_is_refused(archive, prepared,
                                                                      tmp_path):
    params_file = write_params(tmp_path / "params.yaml", tune_raw(archive, tmp_path, n_trials=0))
    worker = cifar_study("run", "--n-trials", "1", "--params", str(params_file), "--data",
                         str(prepared), cwd=tmp_path)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 1
    assert "tune.n_trials is 0" in err and "--no-out" in err and "Traceback" not in err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "study.db").exists()


def cifar_study(*args, cwd, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "cifar_alexnet.tune.cifar_study", *args], cwd=cwd,
                            env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_worker_killed_mid_trial_resumes_keeping_finished_trials_and_retrying_the_lost_one(
        archive, prepared, tmp_path):
    raw = tune_raw(archive, tmp_path, n_trials=3, epochs_per_trial=3, pruner="none",
                   heartbeat_seconds=1)
    params_file = write_params(tmp_path / "params.yaml", raw)
    params = params_from_dict(raw)
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["run", "--params", str(params_file), "--data", str(prepared)]
    reader = optuna.storages.RDBStorage(params.tune.storage)

    def trials():
        try:
            return optuna.load_study(study_name=study_name(params), storage=reader).trials
        except KeyError:
            return []

    def mid_second_trial():
        ts = trials()
        return (len(ts) == 2 and ts[0].state == TrialState.COMPLETE
                and ts[1].state == TrialState.RUNNING and ts[1].user_attrs.get("epochs_run"))

    def paused_mid_second_trial():
        # Look with the worker stopped (SIGSTOP), so the state seen is the state it is killed
        # in: an epoch of the tiny model takes a fraction of a second, less than one look.
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            if mid_second_trial():
                return True
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError):
            pass  # stopped inside a write that holds the database: look again later
        os.killpg(worker.pid, signal.SIGCONT)
        return False

    worker = cifar_study(*args, cwd=tmp_path, env=env, start_new_session=True)
    try:
        wait_until(paused_mid_second_trial, 300, "the second trial to be running")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.communicate()
    before = trials()
    killed = before[1]
    assert killed.state == TrialState.RUNNING  # nobody can tell yet that it is dead

    time.sleep(3 * params.tune.heartbeat_seconds + 1)  # let its heartbeat go stale
    resumed = cifar_study(*args, cwd=tmp_path, env=env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err

    after = trials()
    assert (after[0].state, after[0].value, after[0].params) == (
        before[0].state, before[0].value, before[0].params)
    assert after[1].state == TrialState.FAIL
    retries = [t for t in after
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    state = progress(optuna.load_study(study_name=study_name(params), storage=reader))
    assert (state.complete, state.failed, state.running, state.waiting) == (3, 0, 0, 0)
    assert len(after) == 4  # 3 finished + the killed one, kept as FAIL for the record

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(killed.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"


@pytest.mark.slow
def test_sigterm_mid_trial_stops_with_one_message_and_no_optuna_traceback(archive, prepared,
                                                                         tmp_path):
    raw = tune_raw(archive, tmp_path, n_trials=2, epochs_per_trial=20, pruner="none")
    params = params_from_dict(raw)
    worker = cifar_study("run", "--params", str(write_params(tmp_path / "params.yaml", raw)),
                         "--data", str(prepared), cwd=tmp_path, env=subprocess_env(
                             MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    reader = optuna.storages.RDBStorage(params.tune.storage)

    def mid_trial():
        try:
            trials = optuna.load_study(study_name=study_name(params), storage=reader).trials
        except KeyError:
            return False
        return bool(trials) and trials[0].user_attrs.get("epochs_run")

    wait_until(mid_trial, 300, "the first trial's first epoch")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt()" not in err, err
    assert "the study keeps every finished trial" in err
    assert len(err.strip().splitlines()) < 15, err


@pytest.mark.slow
def test_two_workers_share_a_study_on_postgresql(archive, prepared, tmp_path, postgres_database):
    raw = tune_raw(archive, tmp_path, n_trials=100, epochs_per_trial=2, study_name="shared")
    params_file = write_params(tmp_path / "params.yaml", raw)
    url = postgres_database
    workers = [
        cifar_study("run", "--params", str(params_file), "--data", str(prepared),
                    "--n-trials", "3", "--worker-id", str(i), cwd=tmp_path,
                    env=subprocess_env(CIFAR_TUNE_STORAGE=url,
                                       MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/w{i}.db"))
        for i in (1, 2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.trials
    # The password-free URL is fine to log; MLflow got the masked form either way.
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 6
    parents = {t.user_attrs["mlflow_parent_run_id"] for t in trials}
    assert len(parents) == 2  # each worker ran its 3 trials under its own parent run
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6


def test_storage_passwords_never_reach_mlflow_or_the_summary(archive, tmp_path):
    from cifar_alexnet.tune.study import storage_url

    params = tune_params(archive, tmp_path, storage="postgresql://optuna:s3cret@127.0.0.1/db")
    logged = params.to_public_dict()  # what tracking logs
    assert logged["tune"]["storage"] == "postgresql://optuna:***@127.0.0.1/db"
    assert "s3cret" not in str(logged)
    assert storage_url(params) == "postgresql://optuna:s3cret@127.0.0.1/db"  # used, not shown


@pytest.mark.slow
def test_optuna_cli_and_dashboard_read_the_same_study(archive, prepared, tmp_path, tracking_uri):
    import json as _json
    import socket
    import urllib.request

    params = tune_params(archive, tmp_path, n_trials=2, epochs_per_trial=1)
    study = run_study(params, prepared)
    url, env = params.tune.storage, subprocess_env()
    bin_dir = Path(sys.executable).parent

    listed = subprocess.run([bin_dir / "optuna", "studies", "--storage", url, "-f", "json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert study.study_name in [s["name"] for s in _json.loads(listed.stdout)]
    best = subprocess.run([bin_dir / "optuna", "best-trial", "--study-name", study.study_name,
                           "--storage", url, "-f", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert best.returncode == 0, best.stderr
    assert _json.loads(best.stdout)["number"] == study.best_trial.number

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = subprocess.Popen([bin_dir / "optuna-dashboard", url, "--host", "127.0.0.1",
                                  "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=2) as response:
                    return _json.loads(response.read())["study_summaries"]
            except OSError:
                return None
        wait_until(lambda: studies() is not None, 60, "optuna-dashboard to answer")
        assert study.study_name in [s["study_name"] for s in studies()]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


@pytest.mark.slow
def test_tune_benchmark_script_compares_pruners_side_by_side(archive, prepared, tmp_path):
    params_file = write_params(tmp_path / "params.yaml",
                               tune_raw(archive, tmp_path, n_trials=3, epochs_per_trial=2))
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "bench" / "tune_bench.py"),
         "--params", str(params_file), "--data", str(prepared), "--json",
         str(tmp_path / "rows.json")], capture_output=True, text=True, env=subprocess_env(),
        timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {r["pruner"]: r for r in yaml.safe_load((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"median", "none"}
    assert rows["none"]["epochs_spent"] == rows["none"]["epochs_without_pruning"] == 6
    assert rows["median"]["epochs_spent"] <= 6 and rows["median"]["trials"] == 3
    assert "trials/h" in result.stdout.splitlines()[-3]


def test_hand_edited_best_params_are_validated_like_params_yaml(archive, tmp_path):
    params = tune_params(archive, tmp_path)
    path = tmp_path / BEST_PARAMS_FILE
    path.write_text("params:\n  model:\n    dropout: 1.2\n")
    with pytest.raises(ConfigError, match=r"best_params.yaml: model.dropout = 1.2 is invalid"):
        apply_best_params(params, path)


def test_a_second_worker_replacing_the_plots_does_not_break_this_ones_logging(
        archive, tmp_path, monkeypatch):
    """Two workers in one directory both rewrite tune/plots/: a worker logs the plots it drew,
    not files that the other may delete as soon as they are written."""
    from optuna.distributions import FloatDistribution

    from cifar_alexnet.tune import report

    params = tune_params(archive, tmp_path)
    study = optuna.create_study(direction="maximize")
    space = {LR: FloatDistribution(1e-4, 1e-2, log=True), DROPOUT: FloatDistribution(0.0, 0.5)}
    for lr, dropout, acc in ((0.001, 0.1, 0.5), (0.002, 0.3, 0.6), (0.004, 0.2, 0.55)):
        study.add_trial(optuna.trial.create_trial(params={LR: lr, DROPOUT: dropout},
                                                  distributions=space, value=acc))
    install = report.install_plots

    def installed_then_cleared_by_the_other_worker(files, plot_dir):
        install(files, plot_dir)
        for path in plot_dir.iterdir():
            path.unlink()

    monkeypatch.setattr(report, "install_plots", installed_then_cleared_by_the_other_worker)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("plots")) as run:
            report.write_outputs(study, params, tmp_path / "tune")
        logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "tune/plots")}
    finally:
        mlflow.set_tracking_uri(None)
    assert {"tune/plots/optimization_history.png", "tune/plots/param_importances.png"} <= logged
