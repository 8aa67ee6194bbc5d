"""The MLflow tracking store: which one (the repository's SQLite file unless
``MLFLOW_TRACKING_URI`` says otherwise), made usable once per store and process, and the one
error a stage reports when it fails."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout

from cifar_alexnet.core.trainer import StopAfterCheckpoint
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.redact import redact_url
from cifar_alexnet.workspace import project_root

# MLflow retries an unreachable server 7 times with exponential backoff (about 4 minutes) per
# call before it gives up. A stage should fail in seconds instead, saying so; set these
# variables yourself to choose other values.
HTTP_DEFAULTS = (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                 ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                 ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"))
HEALTH_TIMEOUT_S = 5
DEFAULT_DB, DEFAULT_ARTIFACTS = "mlflow.db", "mlruns"


class TrackingUnavailable(StopAfterCheckpoint):
    """The tracking store failed or cannot be reached. Training stops once the epoch in progress
    is checkpointed; a tuning trial is queued again; the rerun continues."""


def unavailable(exc: Exception, after: str = "") -> TrackingUnavailable:
    reason = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0]
    # "API request to … failed with exception HTTPConnectionPool(…): Max retries exceeded …
    # (Caused by NewConnectionError(…: [Errno 111] Connection refused"))": the cause is enough.
    cause = re.search(r"\[Errno -?\d+\] [^\"')]+", reason)
    reason = cause[0] if cause else reason[:300]
    return TrackingUnavailable(
        f"the MLflow tracking store {redact_url(mlflow.get_tracking_uri())} failed{after} "
        f"({reason}). Nothing finished is lost: when the store is back, run the stage again "
        "(`dvc repro`): training resumes after its last checkpointed epoch and an interrupted "
        "trial is run again")


_checked: set[str] = set()  # stores this process has already made usable


def check_store() -> None:
    """Make the current store usable, once per store and process (the first call for a store
    is the one that talks to it): MLflow's HTTP retries shortened (:data:`HTTP_DEFAULTS`), and
    a clear failure in seconds, one line naming the store, when it cannot be used: a tracking
    server that does not answer, a damaged or foreign database file."""
    uri = mlflow.get_tracking_uri()
    if uri in _checked:
        return
    for name, value in HTTP_DEFAULTS:  # MLflow reads them at each request
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:"):
        try:
            with _first_open_lock(uri):
                mlflow.MlflowClient().search_experiments(max_results=1)
        except Timeout:
            raise PipelineError(
                f"waited {STORE_LOCK_TIMEOUT_S} s for another process to open the MLflow store "
                f"{redact_url(uri)} ({uri.removeprefix('sqlite:///')}.lock is held); if no other "
                "stage or worker is running, delete that lock file") from None
        except Exception as exc:  # SQLAlchemy/sqlite raise their own types, MLflow wraps some
            reason = str(exc).strip().splitlines()[0][:200]
            raise PipelineError(
                f"cannot open the MLflow store {redact_url(uri)} ({reason}): the database file is "
                "damaged or not an MLflow store. Move it away (a new one is created) or restore "
                "it from a backup, or set MLFLOW_TRACKING_URI to another store") from None
    _checked.add(uri)


STORE_LOCK_TIMEOUT_S = 300


def _first_open_lock(uri: str) -> Any:
    """A lock beside an SQLite store's file, held while this process first opens it. MLflow
    creates its tables and migrates the schema on first open without locking: two stages
    opening a new store at once (`dvc queue start -j 2`, two study workers) both failed, and
    could leave the file half-migrated for good. One opener at a time makes that safe."""
    path = uri.removeprefix("sqlite:///")
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        return contextlib.nullcontext()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S)


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S):  # noqa: S310 (http only)
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an auth layer may refuse /health): let MLflow try
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
    raise PipelineError(
        f"the MLflow tracking server {redact_url(uri)} does not answer ({reason}). Start it "
        "(e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri "
        "sqlite:///mlflow.db`), fix MLFLOW_TRACKING_URI, or unset it to log to the "
        "repository's mlflow.db")


def use_default_store() -> bool:
    """Without MLFLOW_TRACKING_URI, MLflow's default store, but in the repository root rather
    than the working directory (a temporary experiment copy is deleted after the run).
    True when that default store is the one in use."""
    default = f"sqlite:///{project_root() / DEFAULT_DB}"
    # set_tracking_uri also exports MLFLOW_TRACKING_URI (for child processes): ours is the default
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if not configured:
        mlflow.set_tracking_uri(default)
    check_store()
    return configured in (None, "", default)
