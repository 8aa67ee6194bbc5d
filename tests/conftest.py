"""Shared fixtures: a generated CIFAR-10-format archive, tiny params, a PostgreSQL cluster."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# One torch (OpenMP) thread per process, set before anything imports torch, and inherited by
# every stage, server and worker the tests start: the suite runs a worker per core
# (pytest-xdist) and many tests run processes side by side, where more threads only compete
# for the cores. `python bench/concurrent_repro.py` measures it. Set OMP_NUM_THREADS yourself
# to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cifar_alexnet.config import params_from_dict  # noqa: E402 (after the thread count)
from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.stages.prepare import prepare
from cifar_alexnet.tools.synthetic import write_synthetic_archive
from helpers import (MLFLOW_EXPORTS, NO_SERVER_JOBS, Archive, S3Server, free_port,
                     stop_process_group, subprocess_env, tiny_params, wait_for_http)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

POSTGRES_ENV = "CIFAR_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def isolated_mlflow_store() -> Iterator[None]:
    """Each test starts with the tracking store the session started with: a store one test set
    in-process (``mlflow.set_tracking_uri``, which also exports ``MLFLOW_TRACKING_URI``) would
    otherwise take precedence over the store the next test names, depending on test order."""
    before = {name: os.environ.get(name) for name in MLFLOW_EXPORTS}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """5 training batches of 100 images and a test batch of 200, official layout."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    return Archive(path, write_synthetic_archive(path, per_batch=100, n_test=200, seed=0))


@pytest.fixture(scope="session")
def prepared(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive through the prepare stage's code (val 10 %, seed 42): read-only for tests."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(read_archive(archive.path), 0.1, 42, out)
    return out


@pytest.fixture
def params(archive: Archive):
    return params_from_dict(tiny_params(archive))




def _debian_cluster_tools_missing() -> str | None:
    if not all(shutil.which(tool) for tool in ("pg_createcluster", "pg_ctlcluster",
                                                "pg_dropcluster")):
        return "Debian's postgresql-common tools are not installed (apt install postgresql)"
    if os.geteuid() != 0:
        return "pg_createcluster needs root"
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 for the whole session, as a SQLAlchemy URL to its
    ``postgres`` database: ``$CIFAR_TEST_POSTGRES_URL`` if set, else a throwaway cluster that
    PostgreSQL's Debian tools make, start and drop (about 3 s)."""
    if os.environ.get(POSTGRES_ENV):
        yield os.environ[POSTGRES_ENV]
        return
    reason = _debian_cluster_tools_missing()
    if reason:
        pytest.skip(f"no PostgreSQL server: {reason}; or set ${POSTGRES_ENV} to the URL of a "
                    "server where the tests may create databases")
    version = max(Path("/usr/lib/postgresql").iterdir(), key=lambda p: int(p.name)).name
    name, port = f"cifar-test-{os.getpid()}", free_port()
    subprocess.run(["pg_createcluster", "--port", str(port), "--start-conf", "manual", version,
                    name, "--", "--auth=trust"], check=True, capture_output=True)
    try:
        subprocess.run(["pg_ctlcluster", version, name, "start"], check=True,
                       capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True)


_database_numbers = itertools.count()


@pytest.fixture
def postgres_database(postgres: str) -> str:
    """A new, empty database on the session's server, as a SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(postgres)
    database = f"test_{os.getpid()}_{next(_database_numbers)}"
    libpq = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    return server.set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3-compatible server on 127.0.0.1 for the whole session (in memory; ready in
    about 2 s). MinIO has no installable server here; the clients are the real ones."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", server, 60, "moto_server")
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        stop_process_group(server)


@dataclass(frozen=True)
class TeamServer:
    """A shared `mlflow server`: PostgreSQL for runs and the registry, S3 for artifacts, which
    it proxies (clients need no cloud credentials)."""
    uri: str
    s3: S3Server
    bucket: str
    prefix: str


@pytest.fixture(scope="session")
def team_server(postgres: str, s3_server: S3Server,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    import psycopg
    from sqlalchemy.engine import make_url

    server_url = make_url(postgres)
    database = f"team_{os.getpid()}"
    libpq = server_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    store = server_url.set(database=database).render_as_string(hide_password=False)
    bucket, prefix = "mlflow-artifacts", "team"
    s3_server.client().create_bucket(Bucket=bucket)
    port = free_port()
    # The server alone holds the S3 credentials; job execution off: MLflow 3.17 otherwise
    # starts 7 job workers and takes over a minute to answer.
    env = subprocess_env(MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint, **NO_SERVER_JOBS,
                         **s3_server.credentials_env())
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
         "--artifacts-destination", f"s3://{bucket}/{prefix}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path_factory.mktemp("team-server"), env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, 180, "mlflow server")
        yield TeamServer(f"http://127.0.0.1:{port}", s3_server, bucket, prefix)
    finally:
        stop_process_group(server)
