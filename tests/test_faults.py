"""Stage scripts given bad input or a failing disk: one clear `error:` line, exit 1, no traceback,
previous outputs intact and no temporary files left.

Each case runs the real pipeline/*.py script in a subprocess. Disk failures are real OS errors:
a file where a directory should be (ENOTDIR), a per-process file size limit (EFBIG: Python
ignores SIGXFSZ, so the write fails instead of the process dying) and, where user namespaces
allow mounting one, a tiny tmpfs that fills up (ENOSPC).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import ROOT, Archive, stage_script, subprocess_env, tiny_params, write_params
from cifar_alexnet.core.archive import ARCHIVE_DIR, read_archive
from cifar_alexnet.stages.prepare import prepare
from cifar_alexnet.tools.synthetic import (archive_members, make_images, pickle_batch, special_member, write_tar_gz)

# Runs inside `unshare -Urm`: mount the tmpfs (writable at first, so the previous outputs can be
# copied in; options ending in ",ro" remount it read-only), run the stage, copy the result out.
_SHELL_ON_SMALL_DISK = """
mount -t tmpfs -o "${OPTIONS%,ro}" tmpfs "$DISK" || exit 99
if [ -n "$SEED" ]; then cp -a "$SEED/." "$DISK/" || exit 98; fi
case "$OPTIONS" in *,ro) mount -o remount,ro "$DISK" || exit 99;; esac
"$@"
rc=$?
cp -a "$DISK/." "$AFTER/"
exit $rc
"""


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with the md5 of its content."""
    return {str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a stage that failed cleanly (exit 1, no traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def run_stage(name: str, *args: str, cwd: Path, fsize: int | None = None
              ) -> subprocess.CompletedProcess:
    """Run pipeline/<name>.py, under an RLIMIT_FSIZE of ``fsize`` bytes if given."""
    if fsize is None:
        return stage_script(name, *args, cwd=cwd)

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, str(ROOT / "pipeline" / f"{name}.py"), *args],
                          cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def make_workdir(directory: Path, archive: Archive) -> Path:
    """A working directory: params.yaml and archive.tar.gz for the test archive, and a dataset
    already prepared from it in data/prepared (the previous output a failed run must keep)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_params(directory / "params.yaml", tiny_params(archive))
    shutil.copy(archive.path, directory / "archive.tar.gz")
    prepare(read_archive(archive.path), 0.1, 0, directory / "data" / "prepared",
            source_md5=archive.md5)
    return directory


@pytest.fixture
def project(tmp_path: Path, archive: Archive) -> Path:
    return make_workdir(tmp_path, archive)


# --- prepare: archives that must not be read ----------------------------------------------------

def _with_member(name: str, blob: bytes):
    def build(path: Path) -> None:
        members = archive_members(per_batch=10, n_test=10)
        members[f"{ARCHIVE_DIR}/{name}"] = blob
        write_tar_gz(path, members)
    return build


def _with_link(path: Path) -> None:
    members = archive_members(per_batch=10, n_test=10)
    del members[f"{ARCHIVE_DIR}/test_batch"]
    write_tar_gz(path, members, extra=(
        special_member(f"{ARCHIVE_DIR}/test_batch", tarfile.SYMTYPE, "/etc/passwd"),))


def _without(name: str):
    def build(path: Path) -> None:
        members = archive_members(per_batch=10, n_test=10)
        del members[f"{ARCHIVE_DIR}/{name}"]
        write_tar_gz(path, members)
    return build


def _truncated(path: Path) -> None:
    write_tar_gz(path, archive_members(per_batch=10, n_test=10))
    path.write_bytes(path.read_bytes()[:3000])


class _Payload:
    """Unpickling this would run a shell command creating ``pwned`` in the working directory."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


_rows, _labels = make_images(10, np.random.default_rng(0))
_REPLACE = ("delete it and run the download stage again, or point data.url and data.md5 at the "
            "official cifar-10-python.tar.gz")
_REFUSED = ("the official archive holds only regular files and directories, so this archive is "
            "corrupt or malicious and was not read; " + _REPLACE)


@pytest.mark.parametrize("build,message", [
    (_with_link, "{path}: member 'cifar-10-batches-py/test_batch' is a symbolic link (to "
                 "'/etc/passwd'); " + _REFUSED),
    (_with_member("../../escape", b"x"), "{path}: member 'cifar-10-batches-py/../../escape' has "
                                         "a '..' path component (path traversal); " + _REFUSED),
    (_with_member("data_batch_1", pickle.dumps({b"data": _Payload()}, protocol=2)),
     "{path}:data_batch_1: unsafe or invalid pickle (refusing to load global posix.system); a "
     "CIFAR-10 batch holds only lists, strings, ints and a uint8 array, so this file was not "
     "loaded; " + _REPLACE),
    # The decompressor's own words in (...) vary between Python versions.
    (_truncated, "{path} is truncated or not a gzip'd tar archive (*); " + _REPLACE),
    (_without("batches.meta"), "{path} lacks cifar-10-batches-py/batches.meta; it is not a "
                               "complete cifar-10-python archive; " + _REPLACE),
    (_with_member("test_batch", pickle_batch(_rows, _labels[:-1])),
     "{path}:test_batch: 10 images but 9 labels; " + _REPLACE),
    (_with_member("test_batch", pickle_batch(_rows, [10] * 10)),
     "{path}:test_batch: labels must be in 0..9, found 10..10; " + _REPLACE),
], ids=["symlink", "path-traversal", "code-in-pickle", "truncated", "missing-meta",
        "label-count", "label-range"])
def test_prepare_refuses_a_bad_archive_and_keeps_the_previous_dataset(project, build, message):
    bad = project / "bad.tar.gz"
    build(bad)
    before = snapshot(project / "data")
    result = run_stage("prepare", "--params", "params.yaml", "--archive", str(bad),
                       "--out", "data/prepared", cwd=project)
    head, star, tail = f"error: {message.format(path=bad)}".partition("(*)")
    line = error_line(result)
    if star:
        assert line.startswith(head + "(") and line.endswith(")" + tail), line
    else:
        assert line == head
    assert snapshot(project / "data") == before
    assert not (project / "pwned").exists()


# --- prepare: the disk refuses the new dataset ---------------------------------------------------

def test_prepare_file_too_large_keeps_the_previous_dataset(project):
    before = snapshot(project / "data")
    result = run_stage("prepare", "--params", "params.yaml", "--archive", "archive.tar.gz",
                       "--set", "data.val_size=0.2", "--out", "data/prepared", cwd=project,
                       fsize=256 * 1024)  # train.npz is 1.2 MB
    assert error_line(result) == (
        "error: cannot write data/prepared/train.npz: File too large; the file is larger than "
        "this file system or process allows (see `ulimit -f`); raise the limit or choose another "
        "output directory; the previous data/prepared is unchanged")
    assert snapshot(project / "data") == before
    assert os.listdir(project / "data") == ["prepared"]  # no temporary directory left beside it


def test_prepare_output_below_a_regular_file_is_explained(project):
    (project / "data" / "blocker").write_text("I am a file")
    result = run_stage("prepare", "--params", "params.yaml", "--archive", "archive.tar.gz",
                       "--out", "data/blocker/prepared", cwd=project)
    assert error_line(result) == (
        "error: cannot write data/blocker/prepared: Not a directory; data/blocker is a file, not "
        "a directory; move it away or choose another output path; no partial output was left "
        "behind")
    assert (project / "data" / "blocker").read_text() == "I am a file"
    assert sorted(os.listdir(project / "data")) == ["blocker", "prepared"]


def test_prepare_will_not_replace_a_directory_holding_other_files(project):
    (project / "results").mkdir()
    (project / "results" / "thesis.tex").write_text("years of work")
    result = run_stage("prepare", "--params", "params.yaml", "--archive", "archive.tar.gz",
                       "--out", "results", cwd=project)
    assert error_line(result) == (
        "error: cannot write results: it already holds files this stage did not write "
        "(thesis.tex); this stage replaces the whole directory, so point it at a new or empty "
        "directory, or move those files away")
    assert os.listdir(project / "results") == ["thesis.tex"]


# --- download: bad data.url and a disk that refuses the archive ----------------------------------

def test_download_file_too_large_keeps_nothing(project):
    result = run_stage("download", "--params", "params.yaml", "--out", "data/raw/archive.tar.gz",
                       cwd=project, fsize=256 * 1024)  # the archive is 2.4 MB
    assert error_line(result) == (
        "error: cannot write data/raw/archive.tar.gz: File too large; the file is larger than "
        "this file system or process allows (see `ulimit -f`); raise the limit or choose another "
        "output directory; no partial output was left behind")
    assert os.listdir(project / "data" / "raw") == []


def test_download_below_a_regular_file_is_explained(project):
    (project / "data" / "raw").write_text("I am a file")
    result = run_stage("download", "--params", "params.yaml",
                       "--out", "data/raw/archive.tar.gz", cwd=project)
    assert error_line(result) == (
        "error: cannot write data/raw/archive.tar.gz: Not a directory; data/raw is a file, not a "
        "directory; move it away or choose another output path; no partial output was left "
        "behind")
    assert (project / "data" / "raw").read_text() == "I am a file"


def test_download_md5_mismatch_keeps_nothing(project, archive):
    result = run_stage("download", "--params", "params.yaml", "--set", f"data.md5={'f' * 32}",
                       "--out", "data/raw/archive.tar.gz", cwd=project)
    assert error_line(result) == (
        f"error: md5 mismatch for {archive.url}: expected {'f' * 32} (data.md5), found "
        f"{archive.md5}. The file is truncated, corrupt or a different archive; nothing was "
        "kept. Check data.url, or update data.md5 if you deliberately use another archive.")
    assert os.listdir(project / "data" / "raw") == []


def test_download_refuses_a_password_in_data_url_without_printing_it(project, archive):
    params = tiny_params(archive)
    params["data"]["url"] = "https://mirror:hunter2@127.0.0.1:9/cifar-10-python.tar.gz"
    write_params(project / "params.yaml", params)
    result = run_stage("download", "--params", "params.yaml", "--out", "data/raw/a.tar.gz",
                       cwd=project)
    assert error_line(result).startswith(
        "error: params.yaml: data.url = 'https://mirror:***@127.0.0.1:9/cifar-10-python.tar.gz'"
        " carries a credential")
    assert "hunter2" not in result.stderr + result.stdout
    assert not (project / "data" / "raw").exists()


def test_download_never_prints_the_password_of_a_secret_url(project, archive):
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline/download.py"), "--out", "data/raw/a.tar.gz"],
        cwd=project, capture_output=True, text=True, timeout=120, env=subprocess_env(
            CIFAR_DATA_URL="https://mirror:hunter2@127.0.0.1:9/cifar-10-python.tar.gz"))
    assert error_line(result).startswith(
        "error: cannot download https://mirror:***@127.0.0.1:9/cifar-10-python.tar.gz: ")
    assert "hunter2" not in result.stderr + result.stdout
    assert not (project / "data" / "raw").exists()


# --- Disk full, for real: a tiny tmpfs in a private mount namespace -------------------------------

@functools.lru_cache(maxsize=1)
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c",
                            'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; '
                            'r=$?; umount "$d" 2>/dev/null; rmdir "$d"; exit $r'],
                           capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(),
                                 reason="needs unshare and user namespaces to mount a small tmpfs")


def run_on_small_disk(work: Path, options: str, seed: Path | None, script: str, *args: str
                      ) -> tuple[subprocess.CompletedProcess, Path]:
    """Run pipeline script ``script`` with ``work/disk`` a tmpfs mounted with ``options``
    (``size=3m``, ``ro``...), filled from ``seed`` first.

    The mount exists only inside the namespace, so its contents are copied to ``work/after``
    before the namespace ends; returns the stage's result and that copy.
    """
    disk, after = work / "disk", work / "after"
    disk.mkdir()
    after.mkdir()
    env = subprocess_env(OPTIONS=options, DISK=str(disk), AFTER=str(after), SEED=str(seed or ""))
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", _SHELL_ON_SMALL_DISK, "sh",
                             sys.executable, str(ROOT / "pipeline" / script), *args],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode not in (98, 99), result.stderr
    return result, after


@needs_tmpfs
def test_prepare_disk_full_keeps_the_previous_dataset(project):
    seed = project / "data"  # the previous prepared dataset, 2.2 MB; the disk holds 3 MB
    before = snapshot(seed)
    result, after = run_on_small_disk(
        project, "size=3m", seed, "prepare.py", "--params", "params.yaml", "--archive",
        "archive.tar.gz", "--set", "data.val_size=0.2", "--out", "disk/prepared")
    assert error_line(result) == (
        "error: cannot write disk/prepared/train.npz: No space left on device; free some disk "
        "space or choose another output directory; the previous disk/prepared is unchanged")
    assert snapshot(after) == before
    assert os.listdir(after) == ["prepared"]


@needs_tmpfs
def test_download_disk_full_keeps_nothing(project):
    result, after = run_on_small_disk(
        project, "size=1m", None, "download.py", "--params", "params.yaml",
        "--out", "disk/cifar-10-python.tar.gz")
    assert error_line(result) == (
        "error: cannot write disk/cifar-10-python.tar.gz: No space left on device; free some "
        "disk space or choose another output directory; no partial output was left behind")
    assert os.listdir(after) == []


@needs_tmpfs
def test_prepare_on_a_read_only_file_system_keeps_the_previous_dataset(project):
    seed = project / "data"
    before = snapshot(seed)
    result, after = run_on_small_disk(
        project, "size=8m,ro", seed, "prepare.py", "--params", "params.yaml", "--archive",
        "archive.tar.gz", "--out", "disk/prepared")
    assert error_line(result) == (
        "error: cannot write disk/prepared: Read-only file system; the file system is read-only; "
        "choose another output directory; the previous disk/prepared is unchanged")
    assert snapshot(after) == before


# --- The tracking store, checkpoints and the model file damaged or unwritable ------------------

TRAIN_ARGS = ("--params", "params.yaml", "--data", "data/prepared", "--out", "models",
              "--metrics", "metrics/train.json", "--history", "metrics/history.csv",
              "--checkpoint", "checkpoints/train.pt")


def test_a_damaged_mlflow_db_is_named_with_the_fix(project):
    (project / "mlflow.db").write_bytes(b"SQLite format 3\0" + b"\xff" * 2000)  # truncated
    result = run_stage("train", *TRAIN_ARGS, cwd=project)
    line = error_line(result)
    assert f"cannot open the MLflow store sqlite:///{project}/mlflow.db" in line
    assert "Move it away" in line
    assert not (project / "models").exists()


def test_an_unwritable_artifact_store_is_named(project):
    (project / "mlruns").write_text("a file where MLflow's artifact directory should be")
    result = run_stage("train", *TRAIN_ARGS, cwd=project)
    line = error_line(result)
    assert f"cannot write MLflow artifacts to file://{project}/mlruns/" in line
    assert not (project / "models").exists()


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_run_closed(project):
    # 2 MB: room for the MLflow database (< 1 MB), not for a 3.7 MB checkpoint
    result = run_stage("train", *TRAIN_ARGS, cwd=project, fsize=2 << 20)
    line = error_line(result)
    assert "cannot write checkpoints/train.pt: torch.save could not write it" in line
    assert "ulimit -f" in line
    assert not list((project / "checkpoints").glob(".*.tmp"))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize("damage", ["truncated", "pickled code"])
def test_a_damaged_model_file_is_named_by_evaluate(project, damage, tmp_path):
    model = project / "models/model.pt"
    model.parent.mkdir()
    marker = tmp_path / "pwned"
    if damage == "truncated":
        import torch

        torch.save({"model_state": {"w": torch.zeros(1000)}}, model)
        model.write_bytes(model.read_bytes()[:300])
    else:
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        model.write_bytes(pickle.dumps({"model_state": Evil()}))
    result = run_stage("evaluate", "--params", "params.yaml", "--data", "data/prepared",
                       "--model", "models", "--metrics", "metrics/evaluate.json", "--reports",
                       "reports", cwd=project)
    line = error_line(result)
    assert ("models/model.pt cannot be loaded as this pipeline's model" in line
            if damage == "truncated" else "models/model.pt is refused: loading it would run code"
            in line)
    assert "dvc checkout models" in line
    assert not marker.exists() and not (project / "reports").exists()


EVALUATE_ARGS = ("--params", "params.yaml", "--data", "data/prepared", "--model", "models",
                 "--metrics", "metrics/evaluate.json", "--reports", "reports")


@pytest.fixture(scope="module")
def trained_once(archive, tmp_path_factory) -> tuple[Path, Path]:
    """A working directory after the train stage, and a copy of it as the stage left it."""
    project = make_workdir(tmp_path_factory.mktemp("trained") / "project", archive)
    result = run_stage("train", *TRAIN_ARGS, cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    pristine = project.parent / "pristine"
    shutil.copytree(project, pristine, symlinks=True)
    return project, pristine


@pytest.fixture
def trained(trained_once):
    """The trained working directory as the train stage left it (restored at the same path:
    mlflow.db holds absolute artifact paths), with models/ and a FINISHED training run."""
    from mlflow import MlflowClient

    project, pristine = trained_once
    for entry in project.iterdir():
        if entry.name != "mlflow.db":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    # mlflow.db is rewritten in place, not replaced: this process's MLflow keeps connections
    # to it open, and SQLite rereads a file whose content changed, not one that was replaced.
    shutil.copytree(pristine, project, symlinks=True, dirs_exist_ok=True)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return project, client, run


def evaluation_left(client, run) -> tuple[str, str | None, list]:
    """The training run's status and evaluate.status tag, and its logged models' statuses."""
    import mlflow

    after = client.get_run(run.info.run_id)
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        models = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    return (after.info.status, after.data.tags.get("evaluate.status"),
            [str(m.status) for m in models])


@pytest.mark.slow
def test_sigterm_during_evaluate_keeps_the_training_run_and_leaves_no_half_reports(trained):
    project, client, run = trained
    evaluation = subprocess.Popen([sys.executable, str(ROOT / "pipeline/evaluate.py"),
                                   *EVALUATE_ARGS], cwd=project, env=subprocess_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in evaluation.stderr:  # scored, now writing reports and logging the model
        seen.append(line)
        if " test: accuracy" in line:
            evaluation.terminate()
            break
    rest = evaluation.stderr.read()
    assert evaluation.wait(timeout=120) == 130, "".join(seen) + rest
    assert "the evaluation did not finish" in rest and "Traceback" not in rest
    assert not (project / "reports").exists() and not (project / "metrics/evaluate.json").exists()
    status, evaluated, models = evaluation_left(client, run)
    assert (status, evaluated) == ("FINISHED", "KILLED")  # the training itself was fine
    assert "LoggedModelStatus.PENDING" not in models and "PENDING" not in models, models


def test_an_unwritable_artifact_directory_stops_evaluate_before_it_logs_anything(trained):
    project, client, run = trained
    artifacts = project / "mlruns" / "cifar10-alexnet" / run.info.run_id / "artifacts"
    shutil.rmtree(artifacts)
    artifacts.write_text("a file where the run's artifact directory should be")
    line = error_line(run_stage("evaluate", *EVALUATE_ARGS, cwd=project))
    assert f"cannot write MLflow artifacts to file://{artifacts}" in line
    status, evaluated, _ = evaluation_left(client, run)
    assert (status, evaluated) == ("FINISHED", None)
    assert "test/accuracy" not in client.get_run(run.info.run_id).data.metrics
    assert not (project / "reports").exists()


@pytest.mark.slow
def test_an_unreadable_checkpoint_closes_the_run_it_would_have_resumed(project):
    from mlflow import MlflowClient

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["epochs"] = 40
    write_params(project / "params.yaml", raw)
    command = [sys.executable, str(ROOT / "pipeline/train.py"), *TRAIN_ARGS]
    training = subprocess.Popen(command, cwd=project, env=subprocess_env(),
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in training.stderr:
        if "epoch 2/40" in line:
            training.kill()  # SIGKILL: the run stays RUNNING, the checkpoint would resume it
            break
    training.wait(timeout=60)
    checkpoint = project / "checkpoints/train.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # and then the checkpoint is damaged
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (killed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed.info.status == "RUNNING"
    raw["train"]["epochs"] = 2
    write_params(project / "params.yaml", raw)
    result = run_stage("train", *TRAIN_ARGS, cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
