"""What a stage depends on is written down once and kept in step: dvc.yaml's code deps are the
package files each stage script imports, and the fingerprints that guard resumable checkpoints
and shared studies change with exactly the params dvc.yaml gives those stages."""

from __future__ import annotations

import pytest
import yaml

from cifar_alexnet.config import params_from_dict
from cifar_alexnet.sources import module_files
from cifar_alexnet.stages.train import (NOT_WHAT_TRAINING_COMPUTES, TRAINING_CORE,
                                       training_fingerprint)
from cifar_alexnet.tune.study import study_fingerprint
from helpers import ROOT, default_params

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stages_code_deps_are_exactly_the_files_its_script_imports(stage):
    script = ROOT / "pipeline" / f"{stage}.py"
    expected = {f"pipeline/{stage}.py"} | {
        str(p.relative_to(ROOT)) for p in module_files(script)}
    listed = {d for d in STAGES[stage]["deps"] if d.startswith(("pipeline/", "src/"))}
    assert listed == expected, (f"dvc.yaml {stage}: missing {sorted(expected - listed)}, "
                                f"not imported {sorted(listed - expected)}")


def _package_paths(files) -> set[str]:
    return {str(p.relative_to(ROOT / "src" / "cifar_alexnet")) for p in files}


def test_tools_outside_the_pipeline_are_no_stages_dependency():
    used = {d for stage in STAGES.values() for d in stage["deps"]}
    tools = [d for d in used if d.startswith("src/cifar_alexnet/tools/")]
    assert not tools, tools
    assert "src/cifar_alexnet/tune/cli.py" not in used
    optuna_code = [d for d in STAGES["train"]["deps"] if d.startswith("src/cifar_alexnet/tune/")]
    assert not optuna_code, optuna_code


def test_the_import_closure_follows_lazy_subpackage_and_relative_imports(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("from cifar_alexnet import tracking\n"
                      "def f():\n    from cifar_alexnet.tools.bench import main\n")
    names = _package_paths(module_files(script))
    # core/train.py via tracking; the subpackages' __init__.py run on the way
    assert {"__init__.py", "tracking.py", "tools/__init__.py", "tools/bench.py", "core/__init__.py",
            "core/train.py", "core/model.py"} <= names
    assert not {n for n in names if n.startswith("tune/")}
    # the tune package imports its own modules relatively
    assert {"tune/study.py", "tune/report.py", "tune/objective.py", "tune/__init__.py"} <= \
        _package_paths(module_files("tune.cli"))


def _variants(section: str, key: str, value):
    """``value`` changed in a way params validation accepts."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        if key == "lr_low":  # must stay below lr_high
            return value / 2
        if key == "dropout_low":
            return value + 0.05
        return value + 1 if key not in ("dropout", "val_size", "momentum", "label_smoothing",
                                        "dropout_high") else value / 2 + 0.01
    if key == "md5":
        return "f" * 32
    choices = {"arch": "alexnet_small", "norm": "lrn", "optimizer": "sgd", "schedule": "cosine",
               "device": "cuda", "precision": "fp32", "sampler": "random", "pruner": "none",
               "metric": "val_loss", "direction": "minimize"}
    return choices.get(key, f"{value}-other")


def _params_of(stage: str) -> list[tuple[str, str]]:
    """dvc.yaml's params for ``stage``, sections expanded to their keys."""
    raw = default_params()
    keys = []
    for entry in STAGES[stage]["params"]:
        section, _, key = entry.partition(".")
        keys += [(section, key)] if key else [(section, k) for k in raw[section]]
    return keys


def _changed(section: str, key: str) -> dict:
    raw = default_params()
    raw[section][key] = _variants(section, key, raw[section][key])
    if (section, key) == ("tune", "metric"):
        raw["tune"]["direction"] = "minimize"
    if (section, key) == ("tune", "direction"):
        raw["tune"]["metric"] = "val_loss"
    return raw


def test_the_training_fingerprint_changes_with_every_train_stage_param_and_no_other():
    base = training_fingerprint(params_from_dict(default_params()))
    for section, key in _params_of("train"):
        if section == "train" and key in NOT_WHAT_TRAINING_COMPUTES:  # how often it is saved
            continue
        changed = training_fingerprint(params_from_dict(_changed(section, key)))
        assert changed != base, f"{section}.{key} is a train param but not in the fingerprint"
    for section, key in [("tune", "n_trials"), ("evaluate", "flip_tta"), ("data", "url"),
                         ("mlflow", "registered_model"), ("train", "checkpoint_seconds")]:
        assert training_fingerprint(params_from_dict(_changed(section, key))) == base, key


def test_the_training_fingerprint_hashes_the_training_core_code_only():
    hashed = _package_paths(module_files(*TRAINING_CORE))
    assert {"core/train.py", "core/model.py", "core/transforms.py", "core/data.py",
            "config.py"} <= hashed
    outside_the_core = {n for n in hashed if n.startswith(("stages/", "tune/", "tools/"))}
    assert not outside_the_core and not hashed & {"tracking.py", "plots.py"}, hashed


# Settings that change how fast a trial runs (workers on other hardware share a study) or how
# many trials run, not what a trial computes: in the tune stage's params, not in the study's
# identity.
NOT_A_TRIALS_IDENTITY = {("train", k) for k in ("device", "precision", "channels_last",
                                                 "cudnn_benchmark", "fused_optimizer",
                                                 "compile")} | {
    ("tune", k) for k in ("n_trials", "storage", "study_name", "heartbeat_seconds")} | {
    ("model", "dropout"), ("evaluate", "batch_size"), ("mlflow", "experiment")}


def test_the_study_fingerprint_changes_with_every_tune_stage_param_that_defines_a_trial():
    base = study_fingerprint(params_from_dict(default_params()))
    for section, key in _params_of("tune"):
        changed = study_fingerprint(params_from_dict(_changed(section, key)))
        if (section, key) in NOT_A_TRIALS_IDENTITY:
            assert changed == base, f"{section}.{key} should not split the study"
        else:
            assert changed != base, f"{section}.{key} changes trials but not the study"
