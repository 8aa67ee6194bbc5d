"""What a stage depends on is written down once: dvc.yaml's code deps are the package files each
stage script imports and its params the fields config.py marks with what the stage reads (one
command writes both), and the fingerprints that guard resumable checkpoints and shared studies
change with exactly the fields marked as changing what training or a trial computes."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from cifar_alexnet import sources
from cifar_alexnet.config import (DATA, TRAINING, TRIAL, Params, params_from_dict,
                                  stage_params)
from cifar_alexnet.sources import module_files
from cifar_alexnet.stages.train import TRAINING_CORE, training_fingerprint
from cifar_alexnet.tune.study import study_fingerprint
from helpers import ROOT, default_params

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_holds_the_derived_deps_and_params_and_the_command_rewrites_them(tmp_path):
    assert sources.main(["--check", str(ROOT / "dvc.yaml")]) == 0
    # an out-of-date copy (a dep dropped, a param added by hand) is rewritten to the derived one
    stale = tmp_path / "dvc.yaml"
    stale.write_text((ROOT / "dvc.yaml").read_text()
                     .replace("      - src/cifar_alexnet/core/model.py\n", "", 1)
                     .replace("      - base.seed\n", "      - base.seed\n      - tune.seed\n", 1))
    (tmp_path / "pipeline").symlink_to(ROOT / "pipeline")
    assert sources.main(["--check", str(stale)]) == 1
    assert sources.main([str(stale)]) == 0
    assert stale.read_text() == (ROOT / "dvc.yaml").read_text()


def _package_paths(files) -> set[str]:
    return {str(p.relative_to(ROOT / "src" / "cifar_alexnet")) for p in files}


def test_tools_outside_the_pipeline_are_no_stages_dependency():
    used = {d for stage in STAGES.values() for d in stage["deps"]}
    tools = [d for d in used if d.startswith("src/cifar_alexnet/tools/")]
    assert not tools, tools
    assert "src/cifar_alexnet/tune/cifar_study.py" not in used
    optuna_code = [d for d in STAGES["train"]["deps"] if d.startswith("src/cifar_alexnet/tune/")]
    assert not optuna_code, optuna_code


def test_a_module_that_does_not_exist_is_an_error_not_an_empty_closure():
    with pytest.raises(ValueError, match="core.renamed_away"):
        module_files("core.trainer", "core.renamed_away")


def test_the_import_closure_follows_lazy_subpackage_and_relative_imports(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("from cifar_alexnet import tracking\n"
                      "def f():\n    from cifar_alexnet.tools.throughput import main\n")
    names = _package_paths(module_files(script))
    # the tracking package's modules through its __init__.py, core/trainer.py through
    # tracking/store.py; the subpackages' __init__.py run on the way
    assert {"__init__.py", "tracking/__init__.py", "tracking/store.py", "tracking/runs.py",
            "tracking/registry.py", "tools/__init__.py", "tools/throughput.py",
            "core/__init__.py", "core/trainer.py", "core/model.py"} <= names
    assert not {n for n in names if n.startswith("tune/")}
    # the tune package imports its own modules relatively
    assert {"tune/study.py", "tune/report.py", "tune/objective.py", "tune/__init__.py"} <= \
        _package_paths(module_files("tune.cifar_study"))


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


def _changed(section: str, key: str) -> dict:
    raw = default_params()
    raw[section][key] = _variants(section, key, raw[section][key])
    if (section, key) == ("tune", "metric"):
        raw["tune"]["direction"] = "minimize"
    if (section, key) == ("tune", "direction"):
        raw["tune"]["metric"] = "val_loss"
    return raw


def _every_param() -> list[tuple[str, str]]:
    return [(section, key) for section, values in default_params().items() for key in values]


def _marks(section: str, key: str) -> frozenset:
    return {f.name: f.metadata["affects"] for f in
            dataclasses.fields(typing.get_type_hints(Params)[section])}[key]


def test_the_training_fingerprint_changes_with_what_training_computes_and_nothing_else():
    base = training_fingerprint(params_from_dict(default_params()))
    for section, key in _every_param():
        changed = training_fingerprint(params_from_dict(_changed(section, key))) != base
        assert changed == bool(_marks(section, key) & {DATA, TRAINING}), f"{section}.{key}"
    # what users change without wanting a checkpoint thrown away
    for section, key in [("mlflow", "experiment"), ("train", "device"), ("train", "nproc"),
                         ("train", "checkpoint_seconds"), ("evaluate", "batch_size")]:
        assert training_fingerprint(params_from_dict(_changed(section, key))) == base, key


def test_the_training_fingerprint_hashes_the_training_core_code_only():
    hashed = _package_paths(module_files(*TRAINING_CORE))
    assert {"core/trainer.py", "core/model.py", "core/transforms.py", "core/data.py",
            "config.py"} <= hashed
    outside_the_core = {n for n in hashed
                        if n.startswith(("stages/", "tune/", "tools/", "tracking/"))}
    assert not outside_the_core and "plots.py" not in hashed, hashed


def test_the_study_fingerprint_changes_with_what_a_trial_computes_and_nothing_else():
    base = study_fingerprint(params_from_dict(default_params()))
    for section, key in _every_param():
        changed = study_fingerprint(params_from_dict(_changed(section, key))) != base
        assert changed == bool(_marks(section, key) & {DATA, TRIAL}), f"{section}.{key}"
    # workers on other hardware, and studies of other sizes, share a study
    for section, key in [("train", "device"), ("train", "precision"), ("tune", "n_trials"),
                         ("tune", "storage"), ("model", "dropout"), ("train", "lr")]:
        assert study_fingerprint(params_from_dict(_changed(section, key))) == base, key


def test_every_param_is_marked_and_read_by_a_stage():
    read = {p for stage in STAGES for p in stage_params(stage)}
    for section, key in _every_param():
        assert _marks(section, key), f"{section}.{key} says nothing of what it affects"
        assert f"{section}.{key}" in read, f"{section}.{key} is read by no stage"
