"""params.yaml -> frozen, typed, validated config. The only place params are read.

Every stage calls :func:`load_params` before it touches any file, so an invalid value stops the
stage before it writes anything.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cifar_alexnet.core.architectures import ARCHITECTURES
from cifar_alexnet.errors import ConfigError
from cifar_alexnet.redact import redact_url

ARCHS = tuple(ARCHITECTURES)  # core/architectures.py: one table of every model.arch
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
NORMS = ("batch", "lrn", "none")
PRECISIONS = ("auto", "bf16", "fp32")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
# Where the download's credentials go (never in params: see DataConfig).
DATA_URL_ENV, DATA_USER_ENV, DATA_PASSWORD_ENV = (
    "CIFAR_DATA_URL", "CIFAR_DATA_USER", "CIFAR_DATA_PASSWORD")
TUNE_METRICS = {"val_acc": "maximize", "val_loss": "minimize"}  # metric -> its direction
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


# What a param affects, marked once on its field. The stages' params in dvc.yaml
# (`python -m cifar_alexnet.sources` writes them), the training fingerprint (may a checkpoint
# resume?) and the study fingerprint (may two trials be compared?) are derived from the marks.
SOURCE = "source"          # which archive is fetched
DATA = "data"              # the prepared splits
TRIAL = "trial"            # what a tuning trial computes
TUNING = "tuning"          # how the study runs: its size, storage, name, liveness checks
TRAINING = "training"      # what the train stage computes
TRAIN_RUN = "train run"    # how the train stage runs (checkpoints, processes), not what it computes
SPEED = "speed"            # how fast tuning, training and evaluation run, not what they compute
EVALUATION = "evaluation"  # what the evaluate stage computes and writes (and registers)
REPORTING = "reporting"    # where the stages report: MLflow's experiment
# The marks each stage's params cover: a param is in a stage's dvc.yaml params when it is marked
# with one of them.
STAGE_READS = {
    "download": {SOURCE},
    "prepare": {DATA},
    "tune": {DATA, TRIAL, TUNING, SPEED, REPORTING},
    "train": {DATA, TRAINING, TRAIN_RUN, SPEED, REPORTING},
    "evaluate": {EVALUATION, SPEED, REPORTING},
}


def _param(*affects: str, **check: Any) -> Any:
    """A config field marked with what it affects, and how its value is checked (``choices``,
    ``range`` or ``pattern``)."""
    return field(metadata={"affects": frozenset(affects), **check})


def _choice(*affects: str, allowed: Sequence[str]) -> Any:
    return _param(*affects, choices=tuple(allowed))


def _range(*affects: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Any:
    return _param(*affects, range=(low, high, low_open, high_open))


def _pattern(*affects: str, regex: str, meaning: str) -> Any:
    return _param(*affects, pattern=(regex, meaning))


@dataclass(frozen=True)
class BaseConfig:
    seed: int = _range(DATA, TRIAL, TRAINING, low=0, high=MAX_SEED)


@dataclass(frozen=True)
class DataConfig:
    url: str = _pattern(SOURCE, regex=r".+", meaning="a URL (https://, file://) or a local path")
    # The archive's identity: a new md5 is new data, whatever the URL.
    md5: str = _pattern(SOURCE, DATA, regex=r"[0-9a-fA-F]{32}", meaning="32 hexadecimal digits")
    val_size: float = _range(DATA, low=0.0, high=1.0, low_open=True, high_open=True)

    def __post_init__(self) -> None:
        shown = redact_url(self.url)
        if shown != self.url:
            raise ConfigError(
                f"data.url = {shown!r} carries a credential (masked here). Params are written "
                "verbatim into dvc.lock, which you commit, and logged to MLflow, so credentials "
                f"do not go there: remove it from data.url and set ${DATA_USER_ENV} and "
                f"${DATA_PASSWORD_ENV} (HTTP basic auth), or add the host to ~/.netrc, or put "
                f"the whole URL (e.g. a presigned link) in ${DATA_URL_ENV}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _choice(TRIAL, TRAINING, allowed=ARCHS)
    width: float = _range(TRIAL, TRAINING, low=0.0, high=4.0, low_open=True)
    dropout: float = _range(TRAINING, low=0.0, high=1.0, high_open=True)  # a trial sets its own
    norm: str = _choice(TRIAL, TRAINING, allowed=NORMS)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _range(TRAINING, low=1)  # a trial runs tune.epochs_per_trial
    batch_size: int = _range(TRIAL, TRAINING, low=1)
    optimizer: str = _choice(TRIAL, TRAINING, allowed=OPTIMIZERS)
    lr: float = _range(TRAINING, low=0.0, low_open=True)  # a trial sets its own
    momentum: float = _range(TRIAL, TRAINING, low=0.0, high=1.0, high_open=True)
    weight_decay: float = _range(TRIAL, TRAINING, low=0.0)
    schedule: str = _choice(TRIAL, TRAINING, allowed=SCHEDULES)
    label_smoothing: float = _range(TRIAL, TRAINING, low=0.0, high=1.0, high_open=True)
    # Speed settings: each is a no-op or exact on CPU, so the defaults can be the fast GPU ones;
    # workers on other hardware share a study, and a checkpoint resumes on another device.
    device: str = _choice(SPEED, allowed=DEVICES)
    precision: str = _choice(SPEED, allowed=PRECISIONS)
    channels_last: bool = _param(SPEED)
    cudnn_benchmark: bool = _param(SPEED)
    fused_optimizer: bool = _param(SPEED)
    compile: bool = _param(SPEED)
    # How often a resumable training (the train stage) writes its checkpoint, at most: each
    # write of the default model costs about a second per GB; 0 = after every epoch.
    checkpoint_seconds: float = _range(TRAIN_RUN, low=0.0)
    # Training processes on this machine (one per GPU): >1 starts them with torchrun's launcher.
    nproc: int = _range(TRAIN_RUN, low=1, high=1024)


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = _range(TUNING, low=0)
    epochs_per_trial: int = _range(TRIAL, low=1)
    lr_low: float = _range(TRIAL, low=0.0, low_open=True)
    lr_high: float = _range(TRIAL, low=0.0, low_open=True)
    dropout_low: float = _range(TRIAL, low=0.0, high=1.0, high_open=True)
    dropout_high: float = _range(TRIAL, low=0.0, high=1.0, high_open=True)
    metric: str = _choice(TRIAL, allowed=TUNE_METRICS)
    direction: str = _choice(TRIAL, allowed=("maximize", "minimize"))
    sampler: str = _choice(TRIAL, allowed=SAMPLERS)
    pruner: str = _choice(TRIAL, allowed=PRUNERS)
    seed: int = _range(TRIAL, low=0, high=MAX_SEED)
    storage: str = _pattern(TUNING, regex=r"\S+",
                            meaning="an SQLAlchemy URL, e.g. sqlite:///tune/optuna.db")
    study_name: str = _pattern(TUNING, regex=r"\S.*", meaning="a study name, or auto")
    heartbeat_seconds: int = _range(TUNING, low=1)

    def __post_init__(self) -> None:
        for name in ("lr", "dropout"):
            low, high = getattr(self, f"{name}_low"), getattr(self, f"{name}_high")
            if low > high:
                raise ConfigError(f"tune.{name}_low ({low}) must not exceed "
                                  f"tune.{name}_high ({high})")
        if TUNE_METRICS[self.metric] != self.direction:
            raise ConfigError(f"tune.direction = {self.direction!r} does not fit tune.metric = "
                              f"{self.metric!r}: {self.metric} is to "
                              f"{TUNE_METRICS[self.metric]}")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = _range(SPEED, low=1)  # validation and test batches: how fast, not what
    flip_tta: bool = _param(EVALUATION)


@dataclass(frozen=True)
class MlflowConfig:
    # MLflow stores at most 256 characters (a longer name fails deep inside its store).
    experiment: str = _pattern(REPORTING, regex=r"\S.{0,255}",
                               meaning="a non-empty experiment name of at most 256 characters")
    # The Model Registry entry the evaluate stage registers each evaluated model under; "" turns
    # registration off. Letters, digits, '.', '_' and '-': safe in a models:/ URI.
    registered_model: str = _pattern(EVALUATION, regex=r"([A-Za-z0-9][A-Za-z0-9._-]{0,255})?",
                                     meaning="a model name of letters, digits, '.', '_' and "
                                             "'-' (at most 256), or \"\" to register nothing")


@dataclass(frozen=True)
class Params:
    base: BaseConfig
    data: DataConfig
    model: ModelConfig
    tune: TuneConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_public_dict(self) -> dict[str, Any]:
        """The params as they may be shown, logged or saved: every URL-like value masked (the
        tuning storage may hold a database password; data.url cannot hold one)."""
        return {section: {k: redact_url(v) if isinstance(v, str) else v
                          for k, v in values.items()}
                for section, values in self.to_dict().items()}


def affecting(*marks: str) -> dict[str, list[str]]:
    """{section: [key, ...]} of the params marked with any of ``marks``, in params.yaml order."""
    found: dict[str, list[str]] = {}
    for section, cls in _SECTIONS.items():
        keys = [f.name for f in dataclasses.fields(cls) if f.metadata["affects"] & set(marks)]
        if keys:
            found[section] = keys
    return found


def identity(params: Params, *marks: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the params marked with any of ``marks``: what a fingerprint
    hashes (the training's: DATA, TRAINING; a study's: DATA, TRIAL)."""
    tree = params.to_dict()
    return {section: {key: tree[section][key] for key in keys}
            for section, keys in affecting(*marks).items()}


def stage_params(stage: str) -> list[str]:
    """``section.key`` of every param ``stage`` reads (dvc.yaml's params for it)."""
    return [f"{section}.{key}" for section, keys in affecting(*STAGE_READS[stage]).items()
            for key in keys]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _check_value(section: str, f: dataclasses.Field, expected: type, value: Any,
                 source: str) -> Any:
    key = f"{section}.{f.name}"

    given = redact_url(value) if isinstance(value, str) else value  # no password in a message

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"{source}: {key} = {given!r} is invalid: {reason}")

    # bool is an int subclass in Python; `epochs: true` is a typo, not 1.
    if expected is bool:
        if not isinstance(value, bool):
            raise fail("expected true or false")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("expected an integer")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise fail("expected a finite number")
    elif expected is str:
        if not isinstance(value, str):
            raise fail("expected a string")

    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise fail("allowed values are " + ", ".join(meta["choices"]))
    if "pattern" in meta:
        regex, meaning = meta["pattern"]
        if not re.fullmatch(regex, value):
            raise fail(f"expected {meaning}")
    if "range" in meta:
        low, high, low_open, high_open = meta["range"]
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open or high is None else "]"
            raise fail(f"must be in {left}{'-inf' if low is None else low}, "
                       f"{'inf' if high is None else high}{right}")
    return value


# Section name -> its config class, in params.yaml order.
_SECTIONS: dict[str, type] = typing.get_type_hints(Params)


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Validate a raw mapping (as read from YAML) into :class:`Params`; raise ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections "
                          f"({', '.join(_SECTIONS)}), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(map(str, unknown))}; "
                          f"allowed sections are {', '.join(_SECTIONS)}")
    sections = {}
    for section, cls in _SECTIONS.items():
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        if section not in raw:
            raise ConfigError(f"{source}: missing section '{section}' (keys: {', '.join(names)})")
        values = raw[section]
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of "
                              f"{', '.join(names)}")
        for key in values:
            if key not in names:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'; allowed keys in "
                                  f"'{section}' are {', '.join(names)}")
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError(f"{source}: missing key(s) "
                              f"{', '.join(f'{section}.{n}' for n in missing)}")
        types = typing.get_type_hints(cls)
        checked = {f.name: _check_value(section, f, types[f.name], values[f.name], source)
                   for f in fields}
        try:
            sections[section] = cls(**checked)
        except ConfigError as exc:  # a rule across keys (e.g. low <= high)
            raise ConfigError(f"{source}: {exc}") from None
    return Params(**sections)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a raw params mapping."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is invalid: expected section.key=value, "
                              "e.g. train.lr=0.01")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        value = parse_yaml(text, f"override {item!r}")
        target = raw.get(section)
        if not isinstance(target, dict):
            raise ConfigError(f"override {item!r}: unknown section '{section}'; allowed sections "
                              f"are {', '.join(_SECTIONS)}")
        target[key] = value
    return raw


def overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` params with the sections of ``top`` laid over it key by key: a variant (CI's
    tiny configuration) names only what it changes and takes every other key from ``base``."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in top.items():
        if not isinstance(values, Mapping) or not isinstance(merged.get(section), dict):
            raise ConfigError(f"section '{section}' of the overlay is not a section of the "
                              f"params it overlays ({', '.join(merged)})")
        merged[section].update(values)
    return merged


# A comma starts a new override only where a ``section.key=`` follows it, so a value may hold
# commas itself (a URL's query, a list).
_NEXT_OVERRIDE = re.compile(r",\s*(?=[A-Za-z_]\w*\.[A-Za-z_]\w*\s*=)")


def split_override_string(text: str | None) -> list[str]:
    """Split ``"train.lr=0.01, model.dropout=0.3"`` (MLproject's single string) into items."""
    return [part.strip() for part in _NEXT_OVERRIDE.split(text or "") if part.strip()]


def parse_yaml(text: str, what: str) -> Any:
    """YAML as DVC reads it (YAML 1.2 numbers: ``1e-3`` is a float, ``010`` is refused rather than
    read as octal 8), without duplicate keys or aliases (which DVC refuses, and which could
    expand a few lines into gigabytes)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(f"{what}: YAML aliases (*{event.anchor}) are not allowed "
                                  f"(line {event.start_mark.line + 1}); write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ConfigError(f"{what}: key {key!r} appears twice (line "
                                      f"{key_node.start_mark.line + 1}); keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node: Any) -> int:
            digits = self.construct_scalar(node).replace("_", "").lstrip("+-")
            if len(digits) > 1 and digits.startswith("0") and digits.isdigit():
                raise ConfigError(f"{what}: {node.value!r} (line {node.start_mark.line + 1}) "
                                  "has a leading zero, which YAML 1.1 reads as octal and DVC as "
                                  "decimal; write it without")
            return super().construct_yaml_int(node)

    StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
    # YAML 1.2 floats that YAML 1.1 (PyYAML) leaves as strings: 1e-3, 5E4, 1.e-3.
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, override and validate params; raise ConfigError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror}") from None
    raw = parse_yaml(text, str(path))
    if isinstance(raw, dict):
        raw = apply_overrides({k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()},
                              overrides)
    return params_from_dict(raw, source=str(path))
