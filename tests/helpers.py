"""Helpers the test modules import (`from helpers import ...`): project copies, subprocess
runners, tiny params, ports. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "MLproject", "pipeline", "src", ".dvc/config",
                 ".dvcignore", ".gitignore", "data/.gitignore")


# Tiny CPU settings that still learn the synthetic classes in seconds.
TINY = {
    "model": {"arch": "alexnet", "width": 0.0625, "dropout": 0.1},
    # checkpoint_seconds 0: a checkpoint after every epoch, which the resume tests kill between
    "train": {"epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 0.002,
              "weight_decay": 0.0005, "schedule": "onecycle", "device": "cpu",
              "checkpoint_seconds": 0},
    # A study small enough for the end-to-end tests; tests/test_tune.py varies it.
    "tune": {"n_trials": 2, "epochs_per_trial": 2, "lr_low": 0.0005, "lr_high": 0.005,
             "dropout_low": 0.0, "dropout_high": 0.5, "heartbeat_seconds": 1},
}


@dataclass(frozen=True)
class Archive:
    path: Path
    md5: str

    @property
    def url(self) -> str:
        return self.path.resolve().as_uri()


def default_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params(archive: Archive, **sections: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml pointed at ``archive`` with TINY settings (+ overrides)."""
    raw = default_params()
    raw["data"].update(url=archive.url, md5=archive.md5)
    for section, values in [*TINY.items(), *sections.items()]:
        raw[section].update(values)
    return raw


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# What MLflow exports from set_tracking_uri/set_experiment/start_run in this process.
MLFLOW_EXPORTS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                  "MLFLOW_EXPERIMENT_NAME")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this interpreter's bin first (DVC runs `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in MLFLOW_EXPORTS:
        env.pop(name, None)
    env.update(extra)
    return env


def imported_modules(importtime_log: str) -> set[str]:
    """Top-level package names from `python -X importtime` lines ('import time: … | name')."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:")}


def shell_commands(path: Path) -> list[str]:
    """The commands in a Markdown file's fenced code blocks, continuation lines joined, comments
    cut: what a reader of the README or docs/ would type."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", path.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# The start line of run_together: a `python -c` script defines this, does its slow setup
# (imports, logging a model), then calls start_line(Path(sys.argv[-1])).
START_LINE = """
import os, time
from pathlib import Path


def start_line(go):
    Path(f"{go}.{os.getpid()}").touch()  # ready
    while not go.exists():
        time.sleep(0.01)
"""


def run_together(commands: list[list[str]], go: Path, env: dict[str, str],
                 timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` (each given ``go`` as its last argument) so that their critical parts
    start at one instant: all are started, each waits at its start line (see START_LINE) until
    every one is there, then ``go`` is created. Returns each one's result."""
    processes = [subprocess.Popen([*command, str(go)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for command in commands]
    try:
        deadline = time.monotonic() + timeout
        while not all(Path(f"{go}.{p.pid}").exists() for p in processes):
            exited = [p for p in processes if p.poll() is not None]
            assert not exited, exited[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "not every process reached the start line"
            time.sleep(0.05)
        go.touch()
        # communicate() before the exit status: a full pipe would otherwise block the child
        outputs = [p.communicate(timeout=timeout) for p in processes]
        return [subprocess.CompletedProcess(command, p.returncode, *output)
                for command, p, output in zip(commands, processes, outputs)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def make_project(dest: Path, raw_params: dict[str, Any]) -> Path:
    """A fresh git repository holding the project's pipeline files and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__",
                                                                              "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    write_params(dest / "params.yaml", raw_params)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def dvc(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, timeout=timeout)


def stage_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(ROOT / "pipeline" / f"{name}.py"), *args], cwd=cwd)


# `mlflow server` and `mlflow ui` (3.17) start job workers unless told not to: about 6 s more
# before they answer, and processes that compete for the 2 CPUs of a test machine. Nothing here
# uses MLflow's server-side jobs (docs/team.md sets the same for the team's server).
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, seconds: int, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, f"{what} exited early"
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {seconds} s"
        time.sleep(0.5)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over one sqlite store, in its own process group:
    ``kill()`` is a crash, ``start()`` brings it back, ``with`` stops it cleanly at the end."""

    def __init__(self, store: Path, cwd: Path) -> None:
        self.store, self.cwd, self.port = store, cwd, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.store}", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.cwd, env=subprocess_env(**NO_SERVER_JOBS), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.process, 90, "mlflow server")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)


@dataclass(frozen=True)
class S3Server:
    """An S3-compatible server on 127.0.0.1 (moto) and the test credentials it accepts."""
    endpoint: str
    access_key: str = "team-test-key"
    secret_key: str = "team-test-secret"

    def client(self) -> Any:
        """A boto3 client with the credentials passed in, not taken from the environment."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def credentials_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True, and its children."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
