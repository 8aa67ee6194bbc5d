import os
import pickle

import numpy as np
import pytest

from cifar_alexnet.archive import ARCHIVE_DIR, OFFICIAL_CLASS_NAMES, read_archive
from cifar_alexnet.errors import DataError
from cifar_alexnet.synthetic import archive_members, make_images, pickle_batch, write_tar_gz


def test_reads_official_layout_with_class_names(archive):
    data = read_archive(archive.path)
    assert data.train.images.shape == (500, 3, 32, 32) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64 and set(data.train.labels) == set(range(10))
    assert data.test.images.shape == (200, 3, 32, 32)
    assert data.class_names == OFFICIAL_CLASS_NAMES


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
    (lambda rows, labels: (rows.astype(np.float32), labels), "must be a uint8 array"),
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
