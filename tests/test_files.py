"""Atomic outputs under real OS failures: the previous output survives, nothing half-written stays.

Failures are produced for real (a file where a directory should be, a per-process file size
limit, a process killed mid-write), never by patching the functions under test.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import subprocess_env
from cifar_alexnet.errors import PipelineError
from cifar_alexnet.files import OutputError, atomic_dir, atomic_path, write_json, write_text


def leftovers(directory):
    """Temporary files or directories a writer left beside its outputs."""
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith((".tmp", ".old")))


def python(code: str, *args: str, fsize: int | None = None, **popen) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter, optionally under an RLIMIT_FSIZE of ``fsize`` bytes.

    Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it.
    """
    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            env=subprocess_env(), preexec_fn=limit if fsize else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# --- Single files -------------------------------------------------------------------------------

def test_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    write_json(tmp_path / "out" / "m.json", {"acc": 0.5})
    write_json(tmp_path / "out" / "m.json", {"acc": 0.7})
    assert (tmp_path / "out" / "m.json").read_text() == '{\n  "acc": 0.7\n}\n'
    assert os.listdir(tmp_path / "out") == ["m.json"]


def test_output_error_is_a_pipeline_error_so_stages_exit_cleanly():
    assert issubclass(OutputError, PipelineError)


@pytest.mark.parametrize("relative", ["blocker/m.json", "blocker/deeper/m.json"])
def test_parent_that_is_a_regular_file_is_named(tmp_path, relative):
    (tmp_path / "blocker").write_text("not a directory")
    with pytest.raises(OutputError) as info:
        write_json(tmp_path / relative, {"acc": 0.5})
    assert str(info.value) == (
        f"cannot write {tmp_path / relative}: Not a directory; {tmp_path / 'blocker'} is a file, "
        "not a directory; move it away or choose another output path; "
        "no partial output was left behind")
    assert (tmp_path / "blocker").read_text() == "not a directory"
    assert leftovers(tmp_path) == []


def test_directory_in_the_way_is_reported_and_left_alone(tmp_path):
    (tmp_path / "m.json").mkdir()
    (tmp_path / "m.json" / "keep").write_text("keep")
    with pytest.raises(OutputError) as info:
        write_text(tmp_path / "m.json", "{}")
    assert f"cannot write {tmp_path / 'm.json'}: Is a directory; a directory is in the way" \
        in str(info.value)
    assert (tmp_path / "m.json" / "keep").read_text() == "keep"
    assert leftovers(tmp_path) == []


def test_file_too_large_keeps_the_previous_file(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("epoch,loss\n1,0.5\n")
    child = python("""
        import sys
        from cifar_alexnet.errors import PipelineError
        from cifar_alexnet.files import write_text
        try:
            write_text(sys.argv[1], "epoch,loss\\n" + "2,0.4\\n" * 100_000)
        except PipelineError as exc:
            sys.exit(f"error: {exc}")
    """, str(target), fsize=64 * 1024)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 1
    assert stderr.strip() == (
        f"error: cannot write {target}: File too large; the file is larger than this file system "
        "or process allows (see `ulimit -f`); raise the limit or choose another output "
        f"directory; the previous {target} is unchanged")
    assert target.read_text() == "epoch,loss\n1,0.5\n"
    assert leftovers(tmp_path) == []


def test_errors_that_are_not_about_the_output_pass_through(tmp_path):
    target = tmp_path / "copy.txt"
    target.write_text("previous")
    with pytest.raises(FileNotFoundError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            open(tmp_path / "missing-input.txt").read()
    assert target.read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_killed_writer_leaves_the_previous_file_or_the_new_one_whole(tmp_path):
    """SIGKILL at arbitrary moments while a file is rewritten over and over."""
    target = tmp_path / "big.txt"
    version = 2_000_000  # bytes per version: each write takes a few milliseconds
    write_text(target, "0" * version)
    for delay in (0.2, 0.4, 0.6):
        child = python("""
            import itertools, sys
            from cifar_alexnet.files import write_text
            for i in itertools.count(1):
                write_text(sys.argv[1], str(i % 10) * int(sys.argv[2]))
        """, str(target), str(version))
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        text = target.read_text()
        assert len(text) == version and len(set(text)) == 1  # one complete version
        # A SIGKILL gives no chance to clean up: at most the one temporary file being written.
        for stale in tmp_path.glob(".big.txt.*.tmp"):
            stale.unlink()


# --- Whole directories --------------------------------------------------------------------------

def test_directory_is_replaced_whole(tmp_path):
    out = tmp_path / "prepared"
    with atomic_dir(out, replaces=("a.txt", "b.txt")) as tmp:
        (tmp / "a.txt").write_text("a1")
        (tmp / "b.txt").write_text("b1")
    with atomic_dir(out, replaces=("a.txt", "b.txt")) as tmp:
        (tmp / "a.txt").write_text("a2")
    assert sorted(os.listdir(out)) == ["a.txt"]  # b.txt belonged to the previous version
    assert (out / "a.txt").read_text() == "a2"
    assert leftovers(tmp_path) == []


def test_failure_half_way_through_a_directory_keeps_the_previous_one(tmp_path):
    out = tmp_path / "prepared"
    with atomic_dir(out, replaces=("train.npz", "meta.json")) as tmp:
        (tmp / "train.npz").write_text("old train")
        (tmp / "meta.json").write_text("old meta")
    with pytest.raises(OutputError) as info:
        with atomic_dir(out, replaces=("train.npz", "meta.json")) as tmp:
            write_text(tmp / "train.npz", "new train")
            (tmp / "meta.json").write_text("")
            write_json(tmp / "meta.json" / "nested.json", {})  # ENOTDIR, for real
    # The message names where the file was going, not the temporary directory.
    assert str(info.value) == (
        f"cannot write {out / 'meta.json' / 'nested.json'}: Not a directory; "
        f"{out / 'meta.json'} is a file, not a directory; move it away or choose another output "
        f"path; the previous {out} is unchanged")
    assert (out / "train.npz").read_text() == "old train"
    assert (out / "meta.json").read_text() == "old meta"
    assert os.listdir(tmp_path) == ["prepared"]


def test_exception_in_the_writer_keeps_the_previous_directory(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "meta.json").write_text("old")
    with pytest.raises(KeyError):
        with atomic_dir(out, replaces=("meta.json",)) as tmp:
            (tmp / "meta.json").write_text("new")
            raise KeyError("interrupted")
    assert (out / "meta.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["prepared"]


def test_directory_with_files_the_stage_did_not_write_is_not_replaced(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "meta.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as info:
        with atomic_dir(out, replaces=("meta.json",)):
            pytest.fail("the writer must not run")
    assert str(info.value) == (
        f"cannot write {out}: it already holds files this stage did not write (notes.txt); this "
        "stage replaces the whole directory, so point it at a new or empty directory, or move "
        "those files away")
    assert (out / "notes.txt").read_text() == "mine" and (out / "meta.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_regular_file_where_the_directory_should_be_is_refused(tmp_path):
    (tmp_path / "prepared").write_text("a file")
    with pytest.raises(OutputError, match="it exists and is not a directory; remove it"):
        with atomic_dir(tmp_path / "prepared", replaces=("meta.json",)):
            pytest.fail("the writer must not run")
    assert (tmp_path / "prepared").read_text() == "a file"


def test_symlinked_output_directory_is_written_where_it_points(tmp_path):
    (tmp_path / "disk" / "prepared").mkdir(parents=True)
    (tmp_path / "prepared").symlink_to(tmp_path / "disk" / "prepared")
    with atomic_dir(tmp_path / "prepared", replaces=("meta.json",)) as tmp:
        (tmp / "meta.json").write_text("new")
    assert (tmp_path / "prepared").is_symlink()
    assert (tmp_path / "disk" / "prepared" / "meta.json").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_killed_directory_writer_never_leaves_a_mix_of_versions(tmp_path):
    """SIGKILL at arbitrary moments while a directory is rewritten over and over."""
    out = tmp_path / "prepared"
    names = ("train.npz", "val.npz", "meta.json")
    for delay in (0.2, 0.35, 0.5):
        child = python("""
            import itertools, sys
            from cifar_alexnet.files import atomic_dir
            for i in itertools.count():
                with atomic_dir(sys.argv[1], replaces=sys.argv[2:]) as tmp:
                    for name in sys.argv[2:]:
                        (tmp / name).write_text(str(i) * 200_000)
        """, str(out), *names)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        # Killed between the two renames, the directory is absent (its previous version is
        # still on disk under a temporary name); otherwise it is one complete version.
        if out.exists():
            assert sorted(os.listdir(out)) == sorted(names)
            contents = {(out / name).read_text() for name in names}
            assert len(contents) == 1
            text = contents.pop()
            width = len(text) // 200_000
            assert text == text[:width] * 200_000  # str(i) * 200_000: complete, not truncated
    # The next run removes the copies the killed ones left (a dataset copy each).
    with atomic_dir(out, replaces=names) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert os.listdir(tmp_path) == ["prepared"]


_WRITER = """
import os, signal, sys, time
from cifar_alexnet.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "train.pt"
    killed = subprocess.run([sys.executable, "-c", _WRITER, str(target), "die"],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    leftover = Path(killed.stdout.strip())
    assert leftover.is_file()  # SIGKILL: no cleanup could run
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert not leftover.exists() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt"]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "train.pt"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "live"],
                              stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip())
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"mine")
        assert live.is_file()  # still being written by a running process
    finally:
        writer.kill()
        writer.wait(timeout=30)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)],
                         ids=["umask-022", "umask-002", "umask-077"])
def test_outputs_get_the_modes_the_users_umask_gives(tmp_path, umask, file_mode, dir_mode):
    # In a child process: the umask is process-wide, and the /proc reading is what is tested.
    writer = python("""
        import os, sys
        from pathlib import Path
        from cifar_alexnet.files import atomic_dir, atomic_path, write_text
        os.umask(int(sys.argv[2], 8))
        out = Path(sys.argv[1])
        write_text(out / "metrics.json", "{}")
        with atomic_path(out / "model.pt") as tmp:
            tmp.write_bytes(b"weights")
        with atomic_dir(out / "prepared", replaces={"a.npz"}) as tmp:
            write_text(tmp / "a.npz", "arrays")
        """, str(tmp_path), oct(umask))
    assert writer.wait(timeout=60) == 0, writer.stderr.read()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"metrics.json": file_mode, "model.pt": file_mode, "prepared": dir_mode,
                     "a.npz": file_mode}
