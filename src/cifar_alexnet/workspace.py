"""Where the user's repository is, even when DVC runs a stage in a copy of it.

`dvc exp run --temp`, `--queue` + `dvc queue start` run the pipeline in a temporary copy under
``<repository>/.dvc/tmp/exps/``, deleted afterwards. Stores that must outlive one run (the
default MLflow store, the default Optuna study) therefore resolve against the repository the
copy was made from, so queued, temporary and plain runs share one `mlflow ui` and one study.
"""

from __future__ import annotations

import os
from pathlib import Path

EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def project_root(start: str | Path | None = None) -> Path:
    """The repository the user works in: the one holding ``.dvc/tmp/exps/<copy>`` when
    ``start`` (default: the working directory) is inside such a copy, else ``start``."""
    here = Path(start or os.getcwd()).resolve()
    for parent in [here, *here.parents]:
        if parent.parts[-3:] == EXPERIMENT_COPIES:
            return parent.parents[2]
    return here


def resolve_sqlite_url(url: str, root: Path | None = None) -> str:
    """``sqlite:///relative/path`` made absolute against the project root; other URLs as given."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix + ":memory:":
        return url
    path = Path(url.removeprefix(prefix))
    if path.is_absolute():
        return url
    return prefix + str((root or project_root()) / path)


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment a stage runs in (DVC sets these variables for `dvc exp run`)."""
    tags = {"dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {k: v for k, v in tags.items() if v}
