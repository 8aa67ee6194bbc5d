"""Tiny CIFAR-10 look-alike archives in the official layout, for tests, CI and offline smoke runs.

Each class has its own colour and vertical gradient (both survive crops and horizontal flips),
plus a per-image colour shift and per-pixel noise, so a small network learns it in a few epochs
but not perfectly. Archives are byte-for-byte
reproducible for a given seed (fixed tar and gzip timestamps), so their md5 is stable.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from cifar_alexnet.core.archive import ARCHIVE_DIR, META_FILE, TEST_BATCH, TRAIN_BATCHES
from cifar_alexnet.core.cifar10 import IMAGE_SHAPE, NUM_CLASSES, OFFICIAL_CLASS_NAMES
from cifar_alexnet.stages.download import md5sum


def make_images(n: int, rng: np.random.Generator, noise: float = 48.0) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 rows (channel-major, like the archive) and balanced int labels."""
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    proto_rng = np.random.default_rng(1234)  # the same class look in every split
    colours = proto_rng.uniform(40, 215, size=(NUM_CLASSES, 3, 1, 1))
    slopes = proto_rng.uniform(-3, 3, size=(NUM_CLASSES, 1, 1, 1))
    rows = np.arange(IMAGE_SHAPE[1], dtype=np.float64).reshape(1, 1, -1, 1) - IMAGE_SHAPE[1] / 2
    # Per-image colour shifts do not average out over pixels, so classes overlap for real.
    shifts = rng.normal(0, noise / 2, size=(n, 3, 1, 1))
    images = (colours[labels] + slopes[labels] * rows + shifts
              + rng.normal(0, noise, size=(n, *IMAGE_SHAPE)))
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1)
    return images, labels.tolist()


def _py2_string(value: bytes) -> bytes:
    """A Python 2 ``str``: SHORT_BINSTRING or BINSTRING (what the official pickles hold)."""
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value
    return b"T" + struct.pack("<I", len(value)) + value


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def python2_batch(data: np.ndarray, labels: list[int], batch_label: str = "synthetic") -> bytes:
    """A batch byte for byte in the official files' form: written by Python 2's cPickle
    (protocol 2), so strings are py2 ``str`` and the uint8 array is rebuilt from
    ``_reconstruct(ndarray, (0,), 'b')`` with a ``dtype('u1', 0, 1)`` (align and copy as ints),
    which Python 3's pickle never writes."""
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError("python2_batch writes (N, 3072) uint8 rows")
    dtype = (b"cnumpy\ndtype\n" + _py2_string(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_string(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2
             + _py2_int(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_int(0)
             + b"\x85" + _py2_string(b"b") + b"\x87R"
             + b"(" + _py2_int(1) + _py2_int(data.shape[0]) + _py2_int(data.shape[1]) + b"\x86"
             + dtype + b"\x89" + _py2_string(data.tobytes()) + b"tb")
    items = [(b"batch_label", _py2_string(batch_label.encode())),
             (b"labels", b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"),
             (b"data", array),
             (b"filenames", b"](" + b"".join(_py2_string(f"img_{i}.png".encode())
                                             for i in range(len(labels))) + b"e")]
    return (b"\x80\x02}(" + b"".join(_py2_string(k) + v for k, v in items) + b"u.")


def pickle_batch(data: object, labels: object, batch_label: str = "synthetic") -> bytes:
    """A batch as Python 3 pickles it (protocol 2, bytes keys): any ``data`` object, for the
    tests that craft batches the reader must refuse. Archives use :func:`python2_batch`."""
    return pickle.dumps({b"batch_label": batch_label.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]},
                        protocol=2)


def meta_pickle(num_cases_per_batch: int) -> bytes:
    return pickle.dumps({b"num_cases_per_batch": num_cases_per_batch,
                         b"label_names": [name.encode() for name in OFFICIAL_CLASS_NAMES],
                         b"num_vis": int(np.prod(IMAGE_SHAPE))}, protocol=2)


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A data-less tar header (``tarfile.SYMTYPE``, ``LNKTYPE``, ``CHRTYPE``, ``DIRTYPE``...).

    The official archive has none but a directory; tests use these to build archives that must be
    refused (a link or device file where a batch should be).
    """
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, linkname, 0, 0o644
    return info


def write_tar_gz(path: str | Path, members: dict[str, bytes],
                 extra: tuple[tarfile.TarInfo, ...] = ()) -> str:
    """Write ``{member name: bytes}`` (then ``extra`` headers) as a reproducible .tar.gz.

    Returns the archive's md5.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            tar.addfile(info, io.BytesIO(blob))
        for info in extra:
            tar.addfile(info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh, gzip.GzipFile(filename="", fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return md5sum(path)


def archive_members(per_batch: int, n_test: int, seed: int = 0,
                    n_train_batches: int = len(TRAIN_BATCHES),
                    noise: float = 48.0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    members = {f"{ARCHIVE_DIR}/{META_FILE}": meta_pickle(per_batch)}
    for name in TRAIN_BATCHES[:n_train_batches]:
        data, labels = make_images(per_batch, rng, noise)
        members[f"{ARCHIVE_DIR}/{name}"] = python2_batch(data, labels, name)
    data, labels = make_images(n_test, rng, noise)
    members[f"{ARCHIVE_DIR}/{TEST_BATCH}"] = python2_batch(data, labels, TEST_BATCH)
    return members


def write_synthetic_archive(path: str | Path, per_batch: int = 100, n_test: int = 200,
                            seed: int = 0, noise: float = 48.0) -> str:
    """Write a learnable CIFAR-10-format archive with 5 training batches; return its md5.

    ``noise`` is the per-pixel standard deviation: higher makes the classes harder to tell apart.
    """
    return write_tar_gz(path, archive_members(per_batch, n_test, seed, noise=noise))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the .tar.gz")
    parser.add_argument("--per-batch", type=int, default=100, help="images per training batch")
    parser.add_argument("--test", type=int, default=200, help="images in test_batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=48.0,
                        help="per-pixel noise std; higher is harder (default: %(default)s)")
    args = parser.parse_args(argv)
    md5 = write_synthetic_archive(args.output, args.per_batch, args.test, args.seed, args.noise)
    print(f"url: file://{args.output.resolve()}\nmd5: {md5}")


if __name__ == "__main__":
    main()
