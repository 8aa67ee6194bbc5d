"""Atomic file output: a stage killed mid-write leaves the previous file or none, never half.

Every output is written to a temporary name beside its destination, flushed to disk (fsync) and
then renamed over it; the directory is fsynced after the rename so the new name survives a crash.
A write that fails (disk full, file too large, read-only or unwritable directory, a file where a
directory should be) becomes an :class:`OutputError` that says what to do, the temporary file is
removed and the previous output is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from cifar_alexnet.errors import PipelineError

log = logging.getLogger(__name__)


class OutputError(PipelineError):
    """An output could not be written; the previous version of it is unchanged."""

    def __init__(self, message: str, path: Path, cause: OSError) -> None:
        super().__init__(message)
        self.path = path        # the file or directory whose write failed
        self.cause = cause      # the OS error, for callers that re-describe the failure


_ELSEWHERE = "or choose another output directory"
# errno -> how to fix it. Errors of these kinds raised while writing an output are about the
# output; other errors (a missing input, say) pass through untouched.
_HINTS = {
    errno.ENOSPC: f"free some disk space {_ELSEWHERE}",
    errno.EDQUOT: f"free some space, raise your disk quota {_ELSEWHERE}",
    errno.EFBIG: "the file is larger than this file system or process allows (see `ulimit -f`); "
                 f"raise the limit {_ELSEWHERE}",
    errno.EACCES: f"make the directory writable {_ELSEWHERE}",
    errno.EPERM: f"make the directory writable {_ELSEWHERE}",
    errno.EROFS: f"the file system is read-only; {_ELSEWHERE.removeprefix('or ')}",
    errno.EIO: f"the disk reported an I/O error; check it {_ELSEWHERE}",
    errno.ENAMETOOLONG: "use a shorter output path",
    errno.EISDIR: "a directory is in the way; remove it or choose another output path",
}
_NOT_A_DIRECTORY = (errno.ENOTDIR, errno.EEXIST)  # EEXIST: mkdir found a file of that name


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a directory, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _write_error(failed: Path, exc: OSError, output: Path, existed: bool,
                 shown: Callable[[Path], Path] = lambda p: p) -> OutputError:
    """Describe a failed write of ``failed`` (part of ``output``) with the fix and what is left.

    ``shown`` maps a temporary path to the name the user knows it by.
    """
    reason = exc.strerror or str(exc)
    blocker = _blocking_file(failed) if exc.errno in _NOT_A_DIRECTORY else None
    if blocker is not None:
        reason = "Not a directory"
        hint = (f"{shown(blocker)} is a file, not a directory; move it away or choose another "
                "output path")
    else:
        hint = _HINTS.get(exc.errno, "check the output path")
    left = (f"the previous {output} is unchanged" if existed
            else "no partial output was left behind")
    return OutputError(f"cannot write {shown(failed)}: {reason}; {hint}; {left}", failed, exc)


def _is_write_failure(exc: OSError) -> bool:
    return exc.errno in _HINTS or exc.errno in _NOT_A_DIRECTORY


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, which is briefly process-wide, so that is the fallback."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, directory: bool = False) -> None:
    """Give a temporary file (mkstemp: 0600) or directory (mkdtemp: 0700) the mode an ordinary
    ``open``/``mkdir`` would have: outputs readable by whoever the user's umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename) - best effort, not every platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    The caller writes the whole file to the yielded path. If that or the rename fails with a
    write error, an :class:`OutputError` is raised, the temporary file is removed and ``path``
    keeps its previous content (or stays absent).
    """
    path = Path(path)
    existed = path.exists()
    remove_dead_writers_files(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The writer's pid in the name: a later run can tell a dead writer's file from a live one.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                                        dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc, path, existed) from None
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as exc:
            if not _is_write_failure(exc):
                raise
            raise _write_error(path, exc, path, existed) from None
        try:
            _as_if_created(tmp)
            _fsync_file(tmp)  # data on disk before the name points at it
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc, path, existed) from None
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_STALE_TEMP = re.compile(r"^\..+\.tmp$")  # left inside an output directory by a killed writer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_dead_writers_files(path: Path) -> None:
    """Delete the temporary files of ``path`` that a killed writer left (a checkpoint is ~1 GB,
    a download up to 170 MB): the ``.<name>.<pid>-<random>.tmp`` files :func:`atomic_path`
    makes whose process no longer exists. A live writer's file (its pid is running) stays."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[A-Za-z0-9_]{{8}}\.tmp$")
    with contextlib.suppress(OSError):
        for stale in path.parent.iterdir():
            match = pattern.match(stale.name)
            if match and not _pid_alive(int(match[1])) and stale.is_file() \
                    and not stale.is_symlink():
                log.info("removing %s, left by an interrupted earlier run", stale)
                stale.unlink(missing_ok=True)


def _remove_stale_versions(path: Path) -> None:
    """Delete temporary copies of directory ``path`` that a killed earlier run left beside it.

    A dataset directory can be large, so each SIGKILL would otherwise leak a copy. The names are
    the ones :func:`atomic_dir` makes (``.<name>.<8 random characters>.tmp`` or ``.old``).
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)$")
    with contextlib.suppress(OSError):
        for stale in path.parent.iterdir():
            if pattern.match(stale.name) and stale.is_dir() and not stale.is_symlink():
                log.info("removing %s, left by an interrupted earlier run", stale)
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, replaces: Collection[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole.

    A stage that writes several files that belong together (arrays plus the metadata describing
    them) writes them into the yielded directory, so readers never see a mix of old and new files.
    An existing ``path`` is replaced only if it holds nothing but files named in ``replaces`` (or
    stale temporary files): pointing an output at a directory with other files in it is refused
    rather than deleting them. A failed write raises :class:`OutputError` naming the final path.
    """
    path = Path(path)
    if path.is_symlink():  # write where the link points, on that file system
        path = path.resolve()
    existed = path.exists()
    if existed and not path.is_dir():
        raise OutputError(f"cannot write {path}: it exists and is not a directory; remove it or "
                          "choose another output directory", path, NotADirectoryError(path))
    if existed:
        foreign = sorted(entry.name for entry in path.iterdir()
                         if entry.name not in replaces and not _STALE_TEMP.match(entry.name))
        if foreign:
            raise OutputError(
                f"cannot write {path}: it already holds files this stage did not write "
                f"({', '.join(foreign[:5])}); this stage replaces the whole directory, so point "
                "it at a new or empty directory, or move those files away",
                path, FileExistsError(path))
    _remove_stale_versions(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        _as_if_created(tmp, directory=True)
    except OSError as exc:
        raise _write_error(path, exc, path, existed) from None

    def inside(failed: Path) -> Path:
        """Name a file in the temporary directory by where it was meant to end up."""
        with contextlib.suppress(ValueError):
            return path / Path(failed).relative_to(tmp)
        return failed

    old = tmp.with_suffix(".old")
    try:
        try:
            yield tmp
        except OutputError as exc:
            raise _write_error(exc.path, exc.cause, path, existed, inside) from None
        except OSError as exc:
            if not _is_write_failure(exc):
                raise
            raise _write_error(Path(exc.filename or tmp), exc, path, existed, inside) from None
        try:
            for file in sorted(tmp.rglob("*")):  # files written without atomic_path, too
                if file.is_file() and not file.is_symlink():
                    _fsync_file(file)
            _fsync_dir(tmp)
            if existed:
                os.replace(path, old)  # two renames: a kill in between leaves no `path`, never half
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc, path, existed) from None
        _fsync_dir(path.parent)
    finally:
        if existed and not path.exists():  # failed or interrupted between the renames: undo
            with contextlib.suppress(OSError):
                os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
