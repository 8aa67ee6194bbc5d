"""The MLflow tracking store: which one (the repository's SQLite file unless
``MLFLOW_TRACKING_URI`` says otherwise), configured once per process by :func:`connect`, and the
one error a stage reports when it fails."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout

from cifar_alexnet.errors import PipelineError, StopAfterCheckpoint
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


@dataclass(frozen=True)
class Store:
    """The tracking store a process logs to, as :func:`connect` configured it."""
    uri: str
    is_default: bool  # the repository's mlflow.db, used because MLFLOW_TRACKING_URI is unset
    parent_run: str | None = None  # the run new top-level runs nest under (`mlflow run`'s)


_connected: Store | None = None  # this process's store: set by connect() alone


def connect() -> Store:
    """This process's tracking store: configured and checked by the first call, returned as it
    is by later ones. It is configured anew only when ``MLFLOW_TRACKING_URI`` has named
    another store since (an in-process caller switching stores: a test, the benchmark's
    throwaway store).

    Configuring means: the URI is ``MLFLOW_TRACKING_URI``, else the repository's
    ``mlflow.db`` (not the working directory's: a temporary experiment copy is deleted after its
    run), so `mlflow ui` started in the repository shows every run; MLflow's HTTP retries are
    shortened (:data:`HTTP_DEFAULTS`) unless set; a store that cannot be used fails in
    seconds, one line naming it (:func:`_check`); and the run `mlflow run` hands its command
    (``MLFLOW_RUN_ID``) is taken out of the environment into :attr:`Store.parent_run`."""
    global _connected
    configured = os.environ.get("MLFLOW_TRACKING_URI") or None
    if _connected is not None and configured == _connected.uri:
        return _connected
    default = f"sqlite:///{project_root() / DEFAULT_DB}"
    uri = configured or default
    mlflow.set_tracking_uri(uri)  # also exported as MLFLOW_TRACKING_URI, for child processes
    for name, value in HTTP_DEFAULTS:  # MLflow reads them at each request
        os.environ.setdefault(name, value)
    _check(uri)
    # mlflow.start_run() would resume (write into) the run MLFLOW_RUN_ID names; runs nest
    # under it instead (see runs._run).
    parent = os.environ.pop("MLFLOW_RUN_ID", None) or None
    _connected = Store(uri, uri == default, parent)
    return _connected


def nest_under(run_id: str) -> Store:
    """From now on, new top-level runs of this process nest under ``run_id``."""
    global _connected
    _connected = replace(connect(), parent_run=run_id)
    return _connected


def _check(uri: str) -> None:
    """A server must answer /health; an SQLite file must open as an MLflow store (created and
    migrated on first use, one process at a time)."""
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
