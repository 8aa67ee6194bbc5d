"""``tune/best_params.yaml``: what the tune stage hands the train stage, read and written here.

Kept apart from the tune package so that training (and its DVC dependencies) does not import Optuna or
the study code: editing how the study runs does not invalidate a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cifar_alexnet.config import Params, params_from_dict
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.files import write_text

# The tuned keys, named as in params.yaml (they are also Optuna's parameter names).
LR, DROPOUT = "train.lr", "model.dropout"
BEST_PARAMS_FILE = "best_params.yaml"


def write_best_params(path: Path, values: Mapping[str, float], study_name: str | None,
                      best_trial: int | None, metric: str | None = None,
                      best_value: float | None = None) -> None:
    """Write the best params (``{"train.lr": …}``; empty when tuning is off) and their origin."""
    import yaml

    tree: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = float(value)
    header = ("# Written by the tune stage; the train stage uses these over params.yaml.\n"
              if values else
              "# tune.n_trials is 0: tuning is off and training uses params.yaml alone.\n")
    data: dict[str, Any] = {"study_name": study_name, "best_trial": best_trial}
    if values:
        data.update(metric=metric, best_value=best_value)
    write_text(path, header + yaml.safe_dump({**data, "params": tree}, sort_keys=False))


def load_best_params(path: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Read tune/best_params.yaml: (flat values to apply, info for tags)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}; run the tune stage "
                            "(dvc repro tune)") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML ({exc}); rerun the tune stage "
                            "(dvc repro --force tune)") from None
    tree = (data or {}).get("params") or {}
    flat = {f"{section}.{key}": value for section, values in tree.items()
            for key, value in values.items()}
    unknown = set(flat) - {LR, DROPOUT}
    if unknown:
        raise PipelineError(f"{path}: unexpected tuned key(s) {', '.join(sorted(unknown))}; "
                            "only train.lr and model.dropout are tuned")
    info = {k: data.get(k) for k in ("study_name", "best_trial", "best_value")} if data else {}
    return flat, info


def tuned_params(params: Params, values: Mapping[str, float],
                 source: str = "tuned params") -> Params:
    """``params`` with the tuned keys (``train.lr``, ``model.dropout``) set from ``values``,
    validated like params.yaml (a hand-edited best-params file cannot smuggle in dropout 1.2)."""
    raw = params.to_dict()
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return params_from_dict(raw, source=source)
