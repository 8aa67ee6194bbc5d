"""tests/pg_server.py: a real PostgreSQL server holding an Optuna study shared across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from sqlalchemy.engine import make_url

from pg_server import port_accepts_connections, postgres_server, postgres_unavailable_reason

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sys.argv[2], storage=optuna.storages.RDBStorage(sys.argv[1]))
    study.optimize(lambda t: t.suggest_float("x", -1.0, 1.0) ** 2, n_trials=2)
""")


@pytest.fixture
def pg_available() -> None:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def test_optuna_study_on_postgres_then_server_gone(pg_available, tmp_path):
    started = time.monotonic()
    with postgres_server(tmp_path) as url:
        print(f"postgres up in {time.monotonic() - started:.2f} s at {url}")
        parsed = make_url(url)
        assert parsed.host == "127.0.0.1" and parsed.database == "optuna"
        port = parsed.port
        assert port_accepts_connections(port)

        storage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(study_name="shared", storage=storage, direction="minimize")
        study.optimize(_objective, n_trials=2)
        storage.engine.dispose()

        fresh = optuna.storages.RDBStorage(url)
        trials = optuna.load_study(study_name="shared", storage=fresh).trials
        assert len(trials) == 2
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert all(t.value == pytest.approx(t.params["x"] ** 2) for t in trials)
        fresh.engine.dispose()
        stopping = time.monotonic()
    print(f"postgres stopped in {time.monotonic() - stopping:.2f} s")

    assert not port_accepts_connections(port)
    assert "database system is shut down" in (tmp_path / "postgres.log").read_text()


def test_two_worker_processes_share_a_study(pg_available, tmp_path):
    with postgres_server(tmp_path) as url:
        storage = optuna.storages.RDBStorage(url)
        optuna.create_study(study_name="workers", storage=storage)
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, url, "workers"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(2)]
        for worker in workers:
            out, _ = worker.communicate(timeout=120)
            assert worker.returncode == 0, out
        trials = optuna.load_study(study_name="workers", storage=storage).trials
        assert len(trials) == 4
        assert len({t.number for t in trials}) == 4
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        storage.engine.dispose()
