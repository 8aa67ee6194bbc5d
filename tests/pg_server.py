"""A throwaway PostgreSQL server for tests.

``postgres_server(tmp_dir)`` runs ``initdb`` + ``pg_ctl start`` on a free 127.0.0.1 port, creates
the database ``optuna`` and yields its SQLAlchemy URL; on exit it stops the server
(``pg_ctl stop -m fast``) and deletes the cluster. ``postgres_unavailable_reason()`` says why that
cannot work on this machine (or ``None``), for ``pytest.skip``.

PostgreSQL refuses to run as root, so when the effective uid is 0 the server programs run as an
unprivileged system user (``postgres`` if it exists, else ``nobody``) through subprocess's
``user=``/``group=``. The cluster therefore lives in a short directory of its own under the
system temp dir, owned by that user: pytest's ``tmp_path`` is under a 0700 root-owned directory
the user cannot enter, and Unix socket paths are limited to ~107 bytes. ``tmp_dir`` receives a
copy of the server log (``postgres.log``) when the server stops, for post-mortems.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "optuna"
DB_USER = "postgres"  # the cluster's superuser (a database role, not an OS user)
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
UNPRIVILEGED_USERS = ("postgres", "nobody")
# SQLAlchemy dialect suffix for each driver module, in order of preference. SQLAlchemy 2.1's
# default driver for plain ``postgresql://`` is psycopg (3); psycopg2 still works when named.
DRIVERS = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))

INITDB_TIMEOUT = 60
START_TIMEOUT = 30
STOP_TIMEOUT = 30
LOG_TAIL_LINES = 40


class PostgresError(RuntimeError):
    """Starting, using or stopping the test server failed; the message holds the log tail."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: via PATH first, then Debian's layout."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:  # /usr/local/bin/initdb may be a symlink into /usr/lib/postgresql/N/bin
        candidates += [Path(initdb).parent, Path(os.path.realpath(initdb)).parent]

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name))

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=version, reverse=True)]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in SERVER_PROGRAMS):
            return directory
    return None


def find_driver() -> tuple[str, str] | None:
    """(module, SQLAlchemy dialect suffix) of the first installed PostgreSQL driver."""
    for module, dialect in DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return module, dialect
    return None


def find_run_as_user() -> pwd.struct_passwd | None:
    """The OS user to run the server as: ourselves unless root, else an unprivileged user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in UNPRIVILEGED_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    return None


def postgres_unavailable_reason() -> str | None:
    """Why a test PostgreSQL server cannot be started here, or None if it can."""
    if os.name != "posix":
        return "the PostgreSQL test server needs a POSIX system"
    if find_bin_dir() is None:
        return ("PostgreSQL server programs (initdb, pg_ctl, postgres) not found on PATH or in "
                "/usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql`")
    if find_run_as_user() is None:
        return ("running as root and no unprivileged user (" + ", ".join(UNPRIVILEGED_USERS)
                + ") exists to run PostgreSQL, which refuses to run as root")
    if importlib.util.find_spec("sqlalchemy") is None:
        return "SQLAlchemy is not installed"
    if find_driver() is None:
        return ("no PostgreSQL driver for SQLAlchemy is installed; "
                "`pip install 'psycopg[binary]'` (or psycopg2-binary)")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts_connections(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no server log at {log}: {exc})"
    return "\n".join(text[-lines:]) or "(server log is empty)"


class _Cluster:
    """Runs the server programs in ``base`` as ``user``."""

    def __init__(self, bin_dir: Path, base: Path, user: pwd.struct_passwd):
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.user = user
        self.env = {  # a clean environment: no stray PGDATA/PGPORT/PGHOST, no odd locale
            "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
            "HOME": str(base),
            "USER": user.pw_name,
            "LOGNAME": user.pw_name,
            "LC_ALL": "C",
            "LANG": "C",
            "TZ": "UTC",
        }

    def run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / program), *args]
        switch_user = os.geteuid() == 0
        try:
            return subprocess.run(
                cmd, cwd=self.base, env=self.env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout,
                user=self.user.pw_uid if switch_user else None,
                group=self.user.pw_gid if switch_user else None,
                extra_groups=[] if switch_user else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{' '.join(cmd)} did not finish within {timeout} s\n"
                                f"--- server log tail ({self.log}) ---\n"
                                f"{_log_tail(self.log)}") from exc

    def check(self, program: str, *args: str, timeout: float) -> None:
        result = self.run(program, *args, timeout=timeout)
        if result.returncode != 0:
            raise PostgresError(
                f"{program} {' '.join(args)} failed (exit {result.returncode}) as user "
                f"{self.user.pw_name}\n--- stdout ---\n{result.stdout.strip()}\n"
                f"--- stderr ---\n{result.stderr.strip()}\n"
                f"--- server log tail ({self.log}) ---\n{_log_tail(self.log)}")

    def initdb(self) -> None:
        self.check("initdb", "-D", str(self.data), "-U", DB_USER, "--auth=trust",
                   "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
                   timeout=INITDB_TIMEOUT)

    def configure(self, port: int) -> None:
        # Appended settings win over initdb's; written into the conf, not passed via `pg_ctl -o`,
        # so no shell quoting is involved.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "50",
            "fsync": "off",  # throwaway data: trade durability for speed
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/pg_server.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        self.check("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                   "-t", str(START_TIMEOUT), "start", timeout=START_TIMEOUT + 10)

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        if not self.running():
            return
        result = self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w",
                          "-t", str(STOP_TIMEOUT), "stop", timeout=STOP_TIMEOUT + 10)
        if result.returncode != 0 and self.running():
            self.kill()
            raise PostgresError(
                f"pg_ctl stop -m fast failed (exit {result.returncode}); the postmaster was "
                f"killed\n--- stderr ---\n{result.stderr.strip()}\n"
                f"--- server log tail ({self.log}) ---\n{_log_tail(self.log)}")

    def kill(self) -> None:
        """Last resort: SIGQUIT (immediate shutdown), then SIGKILL, the postmaster."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)


def _create_database(admin_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{DB_NAME}"'))
    finally:
        engine.dispose()


@contextmanager
def postgres_server(tmp_dir: str | os.PathLike[str] | None = None,
                    attempts: int = 3) -> Iterator[str]:
    """Run a PostgreSQL server on 127.0.0.1 for the duration of the block; yield its URL.

    The URL (``postgresql+psycopg://postgres@127.0.0.1:PORT/optuna``) needs no password (trust
    auth) and can be handed to other processes on this machine. Raises ``PostgresError`` with
    the server log tail when the server cannot be set up.
    """
    reason = postgres_unavailable_reason()
    if reason:
        raise PostgresError(reason)
    bin_dir, user, (_, dialect) = find_bin_dir(), find_run_as_user(), find_driver()
    assert bin_dir is not None and user is not None

    base = Path(tempfile.mkdtemp(prefix="pgtest-"))  # short: the socket path must fit 107 bytes
    if os.geteuid() == 0:
        os.chown(base, user.pw_uid, user.pw_gid)
    cluster = _Cluster(bin_dir, base, user)
    try:
        cluster.initdb()
        for attempt in range(1, attempts + 1):
            port = free_port()
            if attempt > 1:  # replace the previous attempt's port setting
                conf = cluster.data / "postgresql.conf"
                text = conf.read_text()
                conf.write_text(text[:text.rindex("\n# tests/pg_server.py\n")])
            cluster.configure(port)
            try:
                cluster.start()
                break
            except PostgresError:
                # Another process may have taken the port between free_port() and bind().
                if attempt == attempts or "already in use" not in _log_tail(cluster.log):
                    raise
        url = f"postgresql+{dialect}://{DB_USER}@127.0.0.1:{port}"
        _create_database(f"{url}/postgres")
        yield f"{url}/{DB_NAME}"
    finally:
        try:
            cluster.stop()
        finally:
            if tmp_dir is not None and cluster.log.exists():
                try:
                    shutil.copyfile(cluster.log, Path(tmp_dir) / "postgres.log")
                except OSError:
                    pass
            shutil.rmtree(base, ignore_errors=True)
