"""The official CIFAR-10 python archive format, read safely.

The batches are pickles. ``pickle.load`` on a file from the internet can run arbitrary code, so
the archive is read with an unpickler that admits only what a CIFAR batch contains: dicts, lists,
bytes/strings, ints and one uint8 numpy array. Members are read in memory, never extracted; even
so, an archive with links, device files, absolute or ``..`` paths, duplicated or oversized members
is refused outright, because the official archive has none and such an archive is corrupt or
crafted (and would be dangerous to anyone who does extract it).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_alexnet.core.cifar10 import IMAGE_SHAPE, NUM_CLASSES
from cifar_alexnet.errors import DataError

log = logging.getLogger(__name__)

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
# Caps from what CIFAR-10 is: each official batch is 31 035 704 bytes (10 000 rows of 3 072 + the
# pickle's framing), batches.meta 158, all seven members 177 MB. A member or an archive claiming
# more is not CIFAR-10 and would only be read into memory to be rejected (a decompression bomb
# costs nothing to make): refused from the tar headers, before anything is decompressed into RAM.
MAX_MEMBER_BYTES = 64 << 20
MAX_TOTAL_BYTES = 256 << 20
# What to do about any archive that fails these checks.
REPLACE_HINT = ("delete it and run the download stage again, or point data.url and data.md5 at "
                "the official cifar-10-python.tar.gz")

class _NdarrayType:
    """What the unpickler hands out for ``numpy.ndarray``: a name to pass to _reconstruct, not
    a constructor. Calling ``numpy.ndarray((N, 3072), 'u1')`` directly would allocate any amount
    of uninitialised memory from a few bytes of pickle."""

    def __new__(cls, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
        raise pickle.UnpicklingError("refusing a direct numpy.ndarray(...) call, which is not "
                                     "numpy's own pickle format")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """The one call numpy's pickles make: ``_reconstruct(ndarray, (0,), b'b')``, an empty array
    that the pickle's BUILD then fills from its own bytes (numpy checks that their length
    matches the shape, so the array can be no bigger than the member)."""
    if subtype is not _NdarrayType or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError("refusing an array reconstruction other than numpy's own "
                                     "pickle format")
    return np.ndarray((0,), np.uint8)


def _dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if name not in ("u1", b"u1") or align not in (False, 0):  # Python 2 pickles pass 0
        raise pickle.UnpicklingError(f"refusing dtype {name!r}: CIFAR-10 images are uint8")
    return np.dtype("u1")


# The globals a CIFAR batch needs, as the restricted versions above: numpy array reconstruction
# (numpy 1.x and 2.x module paths), and _codecs.encode, which Python 3 protocol-2 pickles use to
# rebuild bytes objects.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): None,  # the real one: it only turns a str into bytes
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _ALLOWED_GLOBALS[module, name] or super().find_class(module, name)


def safe_unpickle(blob: bytes, what: str) -> Any:
    """Unpickle a CIFAR batch without executing anything a batch would not contain."""
    try:
        return _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{what}: unsafe or invalid pickle ({exc}); a CIFAR-10 batch holds only lists, "
            "strings, ints and a uint8 array, so this file was not loaded"
        ) from None
    except Exception as exc:  # truncated or garbled pickle streams raise many types
        raise DataError(f"{what}: cannot unpickle ({type(exc).__name__}: {exc})") from None


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


MAX_CLASS_NAME = 64  # the official names are at most 10 characters ("automobile")


def _check_class_names(names: list[str], what: str) -> None:
    """Names become report rows, plot labels and CSV cells: distinct, printable, short."""
    for name in names:
        if not name or len(name) > MAX_CLASS_NAME or not name.isprintable():
            raise DataError(f"{what}: label name {name[:40]!r} is not a printable name of 1 to "
                            f"{MAX_CLASS_NAME} characters")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{what}: label names repeat ({', '.join(map(repr, repeated))}); the "
                        f"{NUM_CLASSES} classes need {NUM_CLASSES} distinct names")


def _field(batch: Any, key: str, what: str) -> Any:
    if not isinstance(batch, dict):
        raise DataError(f"{what}: expected a dict, found {type(batch).__name__}")
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"{what}: missing key '{key}'")


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (N, 3, 32, 32) uint8
    labels: np.ndarray  # (N,) int64


def parse_batch(blob: bytes, what: str) -> Batch:
    """Decode and validate one batch of any size (mirrors and subsets are smaller than 10 000)."""
    batch = safe_unpickle(blob, what)
    data = _field(batch, "data", what)
    labels = _field(batch, "labels", what)
    row = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != row:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{what}: 'data' must be a uint8 array of shape (N, {row}), "
                        f"found {dtype} {shape}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or \
            not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{what}: 'labels' must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"{what}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{what}: labels must be in 0..{NUM_CLASSES - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    return Batch(np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE)), labels)


@dataclass(frozen=True)
class Cifar10:
    train: Batch        # all official training batches, concatenated in order
    test: Batch         # the official test batch
    class_names: tuple[str, ...]


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What makes ``member`` unacceptable in a CIFAR archive, or None if it is acceptable."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' path component (path traversal)"
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "is a device file"
    if member.isfifo():
        return "is a FIFO"
    if not (member.isfile() or member.isdir()):
        return f"has an unknown member type ({member.type!r})"
    if member.size > MAX_MEMBER_BYTES:
        return (f"claims {member.size} bytes, more than any CIFAR-10 file can be "
                f"({MAX_MEMBER_BYTES})")
    return None


def read_archive(path: str | Path) -> Cifar10:
    """Read and validate the official cifar-10-python.tar.gz layout, without extracting it.

    Needs ``batches.meta``, ``test_batch`` and training batches ``data_batch_1..k`` with no gap;
    the official archive has k = 5, subsets and mirrors may have fewer. Only regular files and
    directories with relative, ``..``-free names are accepted, each file name at most once.
    """
    path = Path(path)
    prefix = f"{ARCHIVE_DIR}/"
    blobs: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                problem = _member_kind(member)
                if problem:
                    raise DataError(f"{path}: member {member.name!r} {problem}; the official "
                                    "archive holds only regular files and directories, so this "
                                    f"archive is corrupt or malicious and was not read; "
                                    f"{REPLACE_HINT}")
                name = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if member.isfile() and re.fullmatch(r"data_batch_[0-9]+", name or "") \
                        and name not in TRAIN_BATCHES:
                    raise DataError(f"{path}: member {member.name!r} is not a CIFAR-10 batch (it "
                                    f"has data_batch_1 to _{len(TRAIN_BATCHES)}); {REPLACE_HINT}")
                if member.isfile() and name in (TEST_BATCH, META_FILE, *TRAIN_BATCHES):
                    if name in blobs:  # a later copy would silently shadow the first
                        raise DataError(f"{path}: member {member.name!r} appears more than once; "
                                        f"the archive is corrupt or tampered with; {REPLACE_HINT}")
                    total += member.size
                    if total > MAX_TOTAL_BYTES:
                        raise DataError(f"{path}: its members claim more than {MAX_TOTAL_BYTES} "
                                        "bytes in all, more than CIFAR-10 can be; the archive "
                                        f"is corrupt or malicious and was not read; "
                                        f"{REPLACE_HINT}")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    blobs[name] = handle.read(member.size + 1)
                    if len(blobs[name]) != member.size:  # the header's size is what counts
                        raise DataError(f"{path}: member {member.name!r} does not hold the "
                                        f"{member.size} bytes its header claims; "
                                        f"{REPLACE_HINT}")
    except FileNotFoundError:
        raise DataError(f"archive not found: {path}; run the download stage first") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not the cifar-10-python.tar.gz archive; "
                        "pass the archive file itself") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path} is truncated or not a gzip'd tar archive ({exc}); "
                        f"{REPLACE_HINT}") from None

    train_names = sorted((n for n in blobs if n.startswith("data_batch_")),
                         key=lambda n: int(n.rsplit("_", 1)[1]))
    expected_train = [f"data_batch_{i}" for i in range(1, len(train_names) + 1)]
    missing = [n for n in (META_FILE, TEST_BATCH) if n not in blobs]
    missing += [n for n in expected_train or ["data_batch_1"] if n not in blobs]
    if missing:
        raise DataError(f"{path} lacks {', '.join(prefix + n for n in missing)}; it is not a "
                        f"complete cifar-10-python archive; {REPLACE_HINT}")
    if len(train_names) < len(TRAIN_BATCHES):
        log.warning("%s has %d training batches (the official archive has %d)",
                    path, len(train_names), len(TRAIN_BATCHES))

    try:
        meta = safe_unpickle(blobs[META_FILE], f"{path}:{META_FILE}")
        names = _field(meta, "label_names", f"{path}:{META_FILE}")
        if not isinstance(names, list) or len(names) != NUM_CLASSES \
                or not all(isinstance(n, (bytes, str)) for n in names):
            raise DataError(f"{path}:{META_FILE}: expected {NUM_CLASSES} label_names (strings)")
        _check_class_names([_text(n) for n in names], f"{path}:{META_FILE}")
        train = [parse_batch(blobs[n], f"{path}:{n}") for n in train_names]
        test = parse_batch(blobs[TEST_BATCH], f"{path}:{TEST_BATCH}")
    except DataError as exc:
        raise DataError(f"{exc}; {REPLACE_HINT}") from None
    return Cifar10(
        train=Batch(np.concatenate([b.images for b in train]),
                    np.concatenate([b.labels for b in train])),
        test=test,
        class_names=tuple(_text(n) for n in names),
    )
