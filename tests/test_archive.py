"""The official CIFAR-10 archive format, read safely: layout, pickles that must not run, members and
sizes that must not be read."""

import collections
import gzip
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import cifar_alexnet.core.archive as archive_module
from cifar_alexnet.core.archive import ARCHIVE_DIR, read_archive
from cifar_alexnet.core.cifar10 import OFFICIAL_CLASS_NAMES
from cifar_alexnet.errors import DataError
from cifar_alexnet.tools.synthetic import (archive_members, make_images, pickle_batch, python2_batch,
                                           special_member, write_tar_gz)


def test_reads_official_layout_with_class_names(archive):
    data = read_archive(archive.path)
    assert data.train.images.shape == (500, 3, 32, 32) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64 and set(data.train.labels) == set(range(10))
    assert data.test.images.shape == (200, 3, 32, 32)
    assert data.class_names == OFFICIAL_CLASS_NAMES


def test_the_official_python2_pickles_are_read(tmp_path):
    """The official batches were written by Python 2's cPickle: py2 strings, and the array's
    dtype rebuilt as dtype('u1', 0, 1) with integer flags (not Python 3's False/True)."""
    data, labels = make_images(40, np.random.default_rng(1))
    blob = python2_batch(data, labels, "training batch 1 of 5")
    assert b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R" in blob  # the official form
    members = archive_members(per_batch=40, n_test=40)
    members[f"{ARCHIVE_DIR}/data_batch_1"] = blob
    write_tar_gz(tmp_path / "official.tar.gz", members)
    read = read_archive(tmp_path / "official.tar.gz")
    assert np.array_equal(read.train.images[:40].reshape(40, -1), data)
    assert read.train.labels[:40].tolist() == list(labels)
    # align=1 (a padded struct dtype) is not what a CIFAR batch holds
    members[f"{ARCHIVE_DIR}/data_batch_1"] = blob.replace(b"U\x02u1K\x00K\x01", b"U\x02u1K\x01K\x01")
    write_tar_gz(tmp_path / "aligned.tar.gz", members)
    with pytest.raises(DataError, match="refusing dtype"):
        read_archive(tmp_path / "aligned.tar.gz")


def test_batches_of_any_size_and_fewer_training_batches(tmp_path):
    members = archive_members(per_batch=30, n_test=17, n_train_batches=2)
    path = tmp_path / "subset.tar.gz"
    write_tar_gz(path, members)
    data = read_archive(path)
    assert len(data.train.labels) == 60 and len(data.test.labels) == 17


def test_channel_major_rows_become_nchw_images(tmp_path):
    rows, labels = make_images(10, np.random.default_rng(0))
    members = archive_members(per_batch=10, n_test=10)
    members[f"{ARCHIVE_DIR}/test_batch"] = pickle_batch(rows, labels)
    write_tar_gz(tmp_path / "a.tar.gz", members)
    test = read_archive(tmp_path / "a.tar.gz").test
    # The archive stores 1024 red, then 1024 green, then 1024 blue values per image.
    assert np.array_equal(test.images[3, 1].ravel(), rows[3, 1024:2048])
    assert test.labels.tolist() == labels


class _Payload:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_execute_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    members = archive_members(per_batch=10, n_test=10)
    members[f"{ARCHIVE_DIR}/data_batch_2"] = pickle.dumps(
        {b"data": _Payload(marker), b"labels": [0]}, protocol=2)
    write_tar_gz(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "evil.tar.gz")
    assert "data_batch_2" in str(info.value) and "unsafe or invalid pickle" in str(info.value)
    assert "system" in str(info.value)
    assert not marker.exists()


def test_truncated_archive_is_reported(tmp_path, archive):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.path.read_bytes()[: archive.path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or not a gzip'd tar archive"):
        read_archive(truncated)


@pytest.mark.parametrize("mutate,message", [
    (lambda rows, labels: (rows, labels[:-1]), "10 images but 9 labels"),
    (lambda rows, labels: (rows, [12] + labels[1:]), "labels must be in 0..9"),
    (lambda rows, labels: (rows.astype(np.float32), labels), "refusing dtype 'f4'"),
    (lambda rows, labels: (rows[:, :100], labels), "shape (N, 3072)"),
])
def test_malformed_batches_are_rejected(tmp_path, mutate, message):
    rows, labels = make_images(10, np.random.default_rng(0))
    members = archive_members(per_batch=10, n_test=10)
    members[f"{ARCHIVE_DIR}/data_batch_1"] = pickle_batch(*mutate(rows, labels))
    write_tar_gz(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "bad.tar.gz")
    assert message in str(info.value) and "data_batch_1" in str(info.value)


def test_missing_members_are_named(tmp_path):
    members = archive_members(per_batch=10, n_test=10)
    del members[f"{ARCHIVE_DIR}/test_batch"]
    del members[f"{ARCHIVE_DIR}/data_batch_3"]
    write_tar_gz(tmp_path / "incomplete.tar.gz", members)
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "incomplete.tar.gz")
    assert "test_batch" in str(info.value) and "data_batch_3" in str(info.value)


# --- Archives that are refused before anything is read from them ----------------------------

REPLACE = "run the download stage again"  # every bad-archive message says how to get a good one


def _archive_with(tmp_path, member: str, blob: bytes):
    members = archive_members(per_batch=10, n_test=10)
    members[f"{ARCHIVE_DIR}/{member}"] = blob
    write_tar_gz(tmp_path / "bad.tar.gz", members)
    return tmp_path / "bad.tar.gz"


def _rows_labels():
    return make_images(10, np.random.default_rng(0))


@pytest.mark.parametrize("name,message", [
    (f"{ARCHIVE_DIR}/../../etc/cron.d/evil", "'..' path component (path traversal)"),
    ("../outside.txt", "'..' path component (path traversal)"),
    ("/etc/cron.d/evil", "absolute path"),
    ("C:/Windows/evil.dll", "absolute path"),
])
def test_member_paths_outside_the_archive_are_refused(tmp_path, name, message):
    members = archive_members(per_batch=10, n_test=10)
    members[name] = b"* * * * * root touch /pwned\n"
    write_tar_gz(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "evil.tar.gz")
    assert f"member {name!r} has a" in str(info.value) and message in str(info.value)
    assert "corrupt or malicious" in str(info.value) and REPLACE in str(info.value)


@pytest.mark.parametrize("kind,linkname,message", [
    (tarfile.SYMTYPE, "/etc/passwd", "is a symbolic link (to '/etc/passwd')"),
    (tarfile.LNKTYPE, "/etc/shadow", "is a hard link (to '/etc/shadow')"),
    (tarfile.CHRTYPE, "", "is a device file"),
    (tarfile.BLKTYPE, "", "is a device file"),
    (tarfile.FIFOTYPE, "", "is a FIFO"),
])
def test_links_and_device_members_are_refused(tmp_path, kind, linkname, message):
    # The link sits where a real batch is expected, after the genuine one has been dropped.
    members = archive_members(per_batch=10, n_test=10)
    del members[f"{ARCHIVE_DIR}/data_batch_5"]
    name = f"{ARCHIVE_DIR}/data_batch_5"
    write_tar_gz(tmp_path / "evil.tar.gz", members, extra=(special_member(name, kind, linkname),))
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "evil.tar.gz")
    assert f"member {name!r} {message}" in str(info.value)
    assert "only regular files and directories" in str(info.value) and REPLACE in str(info.value)


def test_directory_members_like_the_official_archive_are_accepted(tmp_path):
    members = archive_members(per_batch=10, n_test=10)
    write_tar_gz(tmp_path / "a.tar.gz", members,
                 extra=(special_member(ARCHIVE_DIR, tarfile.DIRTYPE),))
    assert len(read_archive(tmp_path / "a.tar.gz").test.labels) == 10


def test_duplicate_batch_member_is_refused(tmp_path):
    # A second test_batch after the genuine one would silently replace it if read last-wins.
    members = archive_members(per_batch=10, n_test=10)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, blob in [*members.items(),
                           (f"{ARCHIVE_DIR}/test_batch", pickle_batch(*_rows_labels()))]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "dup.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "dup.tar.gz")
    assert f"member '{ARCHIVE_DIR}/test_batch' appears more than once" in str(info.value)
    assert REPLACE in str(info.value)


def test_member_larger_than_any_cifar_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_MEMBER_BYTES", 1000)  # instead of a 1 GiB member
    members = archive_members(per_batch=10, n_test=10)
    write_tar_gz(tmp_path / "big.tar.gz", members)
    with pytest.raises(DataError) as info:
        read_archive(tmp_path / "big.tar.gz")
    # batches.meta is small; the first batch is the first member over the limit.
    assert re.search(rf"member '{ARCHIVE_DIR}/data_batch_1' claims \d+ bytes, more than any "
                     r"CIFAR-10 file can be \(1000\)", str(info.value))


# --- Files that are not a gzip'd tar at all ----------------------------------------------------

# Named ids: pytest-xdist's workers must collect the same ids, and gzip's header holds the time
# it was compressed.
@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),  # an interrupted copy
    pytest.param(b"<html>404 Not Found</html>\n", id="error-page"),  # saved under its name
    pytest.param(gzip.compress(b"not a tar archive at all" * 100), id="gzip-without-tar"),
])
def test_files_that_are_not_a_gzipped_tar_are_reported(tmp_path, content):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_archive(path)
    assert f"{path} is truncated or not a gzip'd tar archive" in str(info.value)
    assert REPLACE in str(info.value)


def test_missing_archive_and_directory_instead_of_archive(tmp_path):
    with pytest.raises(DataError, match="archive not found: .*nope.tar.gz; run the download"):
        read_archive(tmp_path / "nope.tar.gz")
    with pytest.raises(DataError, match="is a directory, not the cifar-10-python.tar.gz archive"):
        read_archive(tmp_path)


# --- Batches whose pickle is not what a CIFAR batch holds -------------------------------------

@pytest.mark.parametrize("member,blob,message", [
    # A truncated pickle stream (the archive was re-packed from a broken copy).
    ("data_batch_1", pickle_batch(*_rows_labels())[:500], "pickle data was truncated"),
    # Any global beyond numpy array reconstruction is refused, harmless or not.
    ("data_batch_1", pickle.dumps(collections.OrderedDict(data=1), protocol=2),
     "refusing to load global collections.OrderedDict"),
    ("batches.meta", pickle.dumps({b"label_names": [eval]}, protocol=2),
     "refusing to load global __builtin__.eval"),
    ("data_batch_1", pickle.dumps([1, 2, 3], protocol=2), "expected a dict, found list"),
    ("data_batch_1", pickle.dumps({b"data": _rows_labels()[0]}, protocol=2),
     "missing key 'labels'"),
    # An object array is not image data (and its elements would be unpickled objects).
    ("data_batch_1", pickle_batch(_rows_labels()[0].astype(object), _rows_labels()[1]),
     "refusing dtype 'O8'"),
    ("data_batch_1", pickle_batch(_rows_labels()[0], [-1] + _rows_labels()[1][1:]),
     "labels must be in 0..9, found -1..9"),
    ("data_batch_1", pickle_batch(_rows_labels()[0], [True] * 10), "must be a list of ints"),
    ("data_batch_1", pickle_batch(_rows_labels()[0], "0123456789"), "must be a list of ints"),
    ("batches.meta", pickle.dumps({b"label_names": [b"cat"] * 9}, protocol=2),
     "expected 10 label_names"),
    # Names become report rows: ten identical ones would collapse the report to one class.
    ("batches.meta", pickle.dumps({b"label_names": [b"cat"] * 10}, protocol=2),
     "label names repeat ('cat')"),
    ("batches.meta", pickle.dumps({b"label_names": [b"ca\nt"] + [b"c%d" % i for i in range(9)]},
                                  protocol=2), "is not a printable name"),
    ("batches.meta", pickle.dumps({b"label_names": [b"c\0"] + [b"c%d" % i for i in range(9)]},
                                  protocol=2), "is not a printable name"),
    ("batches.meta", pickle.dumps({b"label_names": [b"x" * 100_000]
                                   + [b"c%d" % i for i in range(9)]}, protocol=2),
     "is not a printable name of 1 to 64 characters"),
], ids=["truncated", "other-global", "eval-in-meta", "not-a-dict", "no-labels", "object-array",
        "negative-label", "bool-labels", "string-labels", "nine-class-names",
        "repeated-class-names", "newline-in-name", "nul-in-name", "huge-name"])
def test_batches_that_are_not_plain_cifar_data_are_refused(tmp_path, member, blob, message):
    path = _archive_with(tmp_path, member, blob)
    with pytest.raises(DataError) as info:
        read_archive(path)
    assert f"{path}:{member}" in str(info.value) and message in str(info.value)
    assert REPLACE in str(info.value)


# --- Archives built to exhaust memory: refused under a 2 GiB address-space limit -------------

class _DirectArray:
    """Pickles as a direct call numpy.ndarray(shape, 'u1'): uninitialised memory of any size."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __reduce__(self):
        return np.ndarray, ((self.rows, 3072), "u1")


def _zero_member_archive(path, sizes: dict[str, int]):
    """An archive whose named members are runs of zero bytes (gzip squeezes 1 GiB to ~1 MB)."""
    members = archive_members(per_batch=10, n_test=10)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            size = sizes.get(name.split("/")[-1])
            if size is None:
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            else:
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
    return path


_READ_UNDER_2_GIB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.errors import DataError
try:
    read_archive(sys.argv[1])
except DataError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("build,message", [
    # 10 GiB of uninitialised memory from a 70 KB archive
    (lambda p: _archive_with(p, "data_batch_1", pickle.dumps(
        {b"data": _DirectArray(3_500_000), b"labels": [0]}, protocol=2)),
     "refusing a direct numpy.ndarray(...) call"),
    # small shapes would put uninitialised heap memory into train.npz
    (lambda p: _archive_with(p, "data_batch_1", pickle.dumps(
        {b"data": _DirectArray(10), b"labels": [0] * 10}, protocol=2)),
     "refusing a direct numpy.ndarray(...) call"),
    # members over what any CIFAR-10 file can be, refused from the tar header
    (lambda p: _zero_member_archive(p / "big.tar.gz", {"data_batch_1": 65 << 20}),
     "claims 68157440 bytes, more than any CIFAR-10 file can be"),
    # each member plausible, the sum not
    (lambda p: _zero_member_archive(p / "sum.tar.gz", {f"data_batch_{i}": 60 << 20
                                                       for i in range(1, 6)}),
     "more than CIFAR-10 can be"),
    (lambda p: _archive_with(p, "data_batch_6", pickle_batch(*_rows_labels())),
     "is not a CIFAR-10 batch (it has data_batch_1 to _5)"),
], ids=["direct-ndarray-10GiB", "direct-ndarray-small", "member-over-cap", "total-over-cap",
        "data_batch_6"])
def test_archives_built_to_exhaust_memory_are_refused_in_one_line(tmp_path, build, message):
    path = build(tmp_path)
    result = subprocess.run([sys.executable, "-c", _READ_UNDER_2_GIB, str(path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith("refused:") and message in result.stdout, result.stdout
