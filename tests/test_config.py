"""params.yaml into typed config: every key validated, read as DVC reads it, errors that name the key
and the fix."""

import dataclasses

import pytest

from cifar_alexnet.config import (ARCHS, DEVICES, ConfigError, flatten, load_params, params_from_dict,
                                  split_override_string)

from helpers import ROOT, default_params, stage_script, tiny_params, write_params


def test_project_params_file_loads_into_frozen_typed_config():
    params = load_params(ROOT / "params.yaml")
    assert params.model.arch in ARCHS and params.train.device in DEVICES
    assert isinstance(params.train.lr, float) and isinstance(params.train.epochs, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]
    flat = flatten(params.to_dict())  # the form MLflow params and DVC -S use
    assert flat["train.lr"] == params.train.lr and flat["data.md5"] == params.data.md5


def test_an_override_string_splits_only_where_the_next_key_starts():
    text = "train.lr=0.01, data.url=https://mirror.example/c.tar.gz?a=1,2,model.dropout=0.3"
    assert split_override_string(text) == [
        "train.lr=0.01", "data.url=https://mirror.example/c.tar.gz?a=1,2", "model.dropout=0.3"]
    assert split_override_string("") == split_override_string(None) == []


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "lr", 0, "train.lr = 0 is invalid: must be in (0"),
    ("train", "lr", -0.1, "train.lr = -0.1 is invalid"),
    ("model", "dropout", 1.0, "model.dropout = 1.0 is invalid: must be in [0.0, 1.0)"),
    ("model", "dropout", -0.1, "model.dropout = -0.1 is invalid"),
    ("train", "epochs", 0, "train.epochs = 0 is invalid: must be in [1"),
    ("train", "epochs", 2.5, "train.epochs = 2.5 is invalid: expected an integer"),
    ("train", "epochs", True, "expected an integer"),
    ("data", "val_size", 0.0, "data.val_size = 0.0 is invalid: must be in (0.0, 1.0)"),
    ("data", "val_size", 1, "data.val_size = 1 is invalid"),
    ("model", "arch", "vgg16", "allowed values are alexnet, alexnet_small, alexnet_paper"),
    ("train", "device", "tpu", "allowed values are auto, cpu, cuda"),
    ("train", "lr", "fast", "expected a number"),
    ("data", "md5", "abc", "expected 32 hexadecimal digits"),
])
def test_invalid_values_are_rejected_naming_key_and_allowed_values(section, key, value, message):
    raw = default_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=None) as info:
        params_from_dict(raw, "params.yaml")
    assert message in str(info.value)


def test_unknown_key_lists_allowed_keys():
    raw = default_params()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert "unknown key 'train.learning_rate'" in str(info.value)
    assert "lr" in str(info.value) and "epochs" in str(info.value)


def test_unknown_and_missing_sections_and_keys():
    raw = default_params()
    raw["extra"] = {}
    with pytest.raises(ConfigError, match="unknown section"):
        params_from_dict(raw)
    raw = default_params()
    del raw["model"]
    with pytest.raises(ConfigError, match="missing section 'model'"):
        params_from_dict(raw)
    raw = default_params()
    del raw["train"]["lr"]
    with pytest.raises(ConfigError, match="missing key.*train.lr"):
        params_from_dict(raw)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: [0.1\n")
    with pytest.raises(ConfigError, match="params.yaml is not valid YAML"):
        load_params(path)


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_params(tmp_path / "params.yaml", default_params())
    params = load_params(path, ["train.lr=0.5", "model.arch=alexnet_small"])
    assert params.train.lr == 0.5 and params.model.arch == "alexnet_small"
    with pytest.raises(ConfigError, match="train.lr = -1 is invalid"):
        load_params(path, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(path, ["lr"])


def test_stage_with_invalid_params_exits_nonzero_and_writes_nothing(tmp_path, archive):
    write_params(tmp_path / "params.yaml", tiny_params(archive, train={"lr": -1}))
    result = stage_script("download", "--out", "data/raw/archive.tar.gz", cwd=tmp_path)
    assert result.returncode == 1
    assert "train.lr = -1 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("url", ["https://alice:s3cret@mirror.example.com/cifar.tar.gz",
                                 "https://s3cret@mirror.example.com/cifar.tar.gz",
                                 "https://bucket.example.com/cifar.tar.gz?X-Amz-Signature=s3cret"])
def test_a_data_url_with_a_credential_is_refused_saying_where_credentials_go(url):
    """DVC writes params into dvc.lock verbatim: a password there would be committed."""
    raw = default_params()
    raw["data"]["url"] = url
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw, "params.yaml")
    message = str(info.value)
    assert "s3cret" not in message and "***" in message
    assert "CIFAR_DATA_PASSWORD" in message and "netrc" in message and "CIFAR_DATA_URL" in message


def test_public_params_mask_every_url_like_value():
    raw = default_params()
    raw["tune"]["storage"] = "postgresql+psycopg://optuna:s3cret@db:5432/optuna"
    public = params_from_dict(raw).to_public_dict()
    assert public["tune"]["storage"] == "postgresql+psycopg://optuna:***@db:5432/optuna"
    assert public["data"] == params_from_dict(raw).to_dict()["data"]  # nothing else changes
    assert "s3cret" not in repr(public)


def test_an_invalid_value_is_shown_masked():
    raw = default_params()
    raw["tune"]["storage"] = "postgresql://optuna:s3cret@db/optuna with spaces"
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw, "params.yaml")
    assert "s3cret" not in str(info.value) and "optuna:***@db" in str(info.value)


def test_numbers_are_read_as_dvc_reads_them(tmp_path, archive):
    """YAML 1.2, like DVC: 1e-3 is a number (PyYAML alone reads a string), 010 is refused (PyYAML
    alone reads octal 8, DVC reads 10)."""
    raw = tiny_params(archive)
    text = write_params(tmp_path / "params.yaml", raw).read_text().replace(
        f"lr: {raw['train']['lr']}", "lr: 1e-3")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.lr == 0.001
    assert load_params(tmp_path / "params.yaml", ["train.lr=2E-4"]).train.lr == 0.0002
    with pytest.raises(ConfigError, match="leading zero"):
        load_params(tmp_path / "params.yaml", ["train.epochs=010"])


@pytest.mark.parametrize("text,message", [
    ("base:\n  seed: 1\nbase:\n  seed: 2\n", "key 'base' appears twice (line 3)"),
    # a "billion laughs": nine levels of ten aliases would expand to 10**9 strings
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
     "YAML aliases (*a) are not allowed (line 2)"),
])
def test_duplicate_keys_and_aliases_are_refused(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert message in str(info.value)


@pytest.mark.parametrize("section,key,value,message", [
    ("base", "seed", 2**32, "base.seed = 4294967296 is invalid: must be in [0, 4294967295]"),
    ("tune", "seed", 2**40, "tune.seed"),
    ("mlflow", "experiment", "e" * 600, "at most 256 characters"),
])
def test_values_the_libraries_would_reject_later_are_refused_now(section, key, value, message):
    raw = default_params()
    raw[section][key] = value
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw, "params.yaml")
    assert message in str(info.value)
