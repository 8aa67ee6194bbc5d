"""The command lines users type: `--help` of every stage script and console script answers
without importing torch, MLflow or Optuna (seconds each), so help and argument errors are instant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_alexnet.best_params import load_best_params
from helpers import ROOT, imported_modules, subprocess_env, tiny_params, write_params

HEAVY = ("torch", "mlflow", "optuna", "dvc", "PIL", "matplotlib", "sklearn", "pandas")
COMMANDS = {
    **{f"pipeline/{stage}.py": [f"pipeline/{stage}.py"]
       for stage in ("download", "prepare", "tune", "train", "evaluate", "experiment")},
    "cifar-study run": ["-m", "cifar_alexnet.tune.cifar_study", "run"],
    "cifar-study best": ["-m", "cifar_alexnet.tune.cifar_study", "best"],
    "cifar-predict": ["-m", "cifar_alexnet.cifar_predict"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_imports_no_heavy_library(command):
    result = subprocess.run([sys.executable, "-X", "importtime", *COMMANDS[command], "--help"],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
    modules = imported_modules(result.stderr)
    assert "argparse" in modules  # the log was read
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


def traced(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS``; its result and the packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, imported_modules(result.stderr)


def study_of_one_trial(archive, tmp_path: Path) -> Path:
    """params.yaml for a study of one finished trial (lr 0.001, dropout 0.2), added to its
    storage directly (no training); tune.n_trials is 1, so the study is done."""
    import optuna

    from cifar_alexnet.config import params_from_dict
    from cifar_alexnet.tune.study import open_study

    raw = tiny_params(archive, tune={"n_trials": 1})
    raw["tune"]["storage"] = f"sqlite:///{tmp_path / 'study.db'}"
    lr, dropout = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True), \
        optuna.distributions.FloatDistribution(0.0, 0.5)
    open_study(params_from_dict(raw)).add_trial(optuna.trial.create_trial(
        params={"train.lr": 0.001, "model.dropout": 0.2},
        distributions={"train.lr": lr, "model.dropout": dropout}, value=0.5))
    return write_params(tmp_path / "params.yaml", raw)


def test_reading_a_study_imports_neither_torch_nor_mlflow(archive, tmp_path):
    """`cifar-study best`, `export` and `storage` only read the study (what a user checks
    often, and what the tests' workflows ask twice): Optuna, not torch and MLflow (5 s)."""
    params_file = study_of_one_trial(archive, tmp_path)
    for command in (["best"], ["export", str(tmp_path / "trials.csv")], ["storage"]):
        result, modules = traced(["-m", "cifar_alexnet.tune.cifar_study", *command, "--params",
                                  str(params_file)], tmp_path)
        assert "optuna" in modules and modules.isdisjoint({"torch", "mlflow"}), command
        if command == ["best"]:  # the answer is on stdout; -X importtime writes to stderr
            best = json.loads(result.stdout)
            assert best["best_params"] == {"train.lr": 0.001, "model.dropout": 0.2}


def test_the_tune_stage_finding_the_study_done_imports_neither_torch_nor_mlflow(archive,
                                                                                tmp_path):
    """Every `dvc repro` after a `cifar-study run` worker or `mlflow run . -e tune` reruns the
    tune stage with no trial left to run: it rewrites tune/ from the study, nothing else."""
    params_file = study_of_one_trial(archive, tmp_path)
    _, modules = traced([str(ROOT / "pipeline/tune.py"), "--params", str(params_file),
                         "--data", "data/prepared", "--out", "tune"], tmp_path)
    assert "optuna" in modules and modules.isdisjoint({"torch", "mlflow"})
    values, _ = load_best_params(tmp_path / "tune/best_params.yaml")
    assert values == {"train.lr": 0.001, "model.dropout": 0.2}
    assert json.loads((tmp_path / "tune/summary.json").read_text())["best_value"] == 0.5


def test_the_tune_stage_with_tuning_off_imports_neither_torch_nor_mlflow(archive, tmp_path):
    """`tune.n_trials: 0` writes empty best params: no study, no training, no MLflow run."""
    params_file = write_params(tmp_path / "params.yaml", tiny_params(archive))
    _, modules = traced([str(ROOT / "pipeline/tune.py"), "--params", str(params_file), "--set",
                         "tune.n_trials=0", "--data", "data/prepared", "--out", "tune"], tmp_path)
    assert modules.isdisjoint({"torch", "mlflow"})
    assert (tmp_path / "tune/best_params.yaml").is_file()


def test_a_stage_that_is_leaving_ends_on_sigterm_without_a_traceback():
    """After the stage's work, SIGTERM (torchrun's agent stopping a rank that is already
    leaving) ends the process at once: no KeyboardInterrupt raised from the interpreter's
    shutdown."""
    code = ("import signal\n"
            "from cifar_alexnet.stage_runner import run_stage\n"
            "seen = []\n"
            "run_stage(lambda: seen.append(signal.getsignal(signal.SIGTERM)))\n"
            "print(seen[0] is signal.default_int_handler,\n"
            "      signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n")
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "True True"), result.stderr
