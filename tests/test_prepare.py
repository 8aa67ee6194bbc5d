"""The prepare stage: seeded stratified split, train-only statistics, reproducible output, degenerate
data refused."""

import json

import numpy as np
import pytest

from cifar_alexnet.core.archive import read_archive
from cifar_alexnet.core.data import load_meta, load_split
from cifar_alexnet.stages.prepare import channel_stats, prepare, stratified_split


@pytest.fixture(scope="module")
def cifar(archive):
    return read_archive(archive.path)


def test_split_is_stratified_seeded_and_disjoint(cifar):
    labels = cifar.train.labels
    train_idx, val_idx = stratified_split(labels, 0.2, seed=7)
    assert len(val_idx) == 100 and len(train_idx) == 400
    assert not set(train_idx) & set(val_idx)
    assert np.bincount(labels[val_idx], minlength=10).tolist() == [10] * 10
    again, _ = stratified_split(labels, 0.2, seed=7)
    other, _ = stratified_split(labels, 0.2, seed=8)
    assert np.array_equal(train_idx, again) and not np.array_equal(train_idx, other)


def test_prepare_writes_arrays_and_train_only_statistics(tmp_path, cifar, archive):
    meta = prepare(cifar, val_size=0.1, seed=42, out_dir=tmp_path, source_md5=archive.md5)
    train, val, test = (load_split(tmp_path, s) for s in ("train", "val", "test"))
    for split in (train, val, test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == np.int64
    assert (len(train.labels), len(val.labels), len(test.labels)) == (450, 50, 200)
    # The test split is the official test batch, untouched.
    assert np.array_equal(test.images, cifar.test.images)
    # Train + val partition the official training set.
    together = np.concatenate([train.images, val.images]).reshape(500, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, cifar.train.images.reshape(500, -1)))
    mean, std = channel_stats(train.images)
    assert np.allclose(meta.mean, mean) and np.allclose(meta.std, std)
    all_mean, _ = channel_stats(cifar.train.images)
    assert not np.allclose(meta.mean, all_mean, atol=1e-9)  # val pixels were not used
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved["class_names"][0] == "airplane" and saved["source_md5"] == archive.md5
    assert load_meta(tmp_path).sizes == {"train": 450, "val": 50, "test": 200}


def test_prepare_is_reproducible_for_a_seed(tmp_path, cifar):
    prepare(cifar, 0.1, 3, tmp_path / "a")
    prepare(cifar, 0.1, 3, tmp_path / "b")
    for split in ("train", "val"):
        assert np.array_equal(load_split(tmp_path / "a", split).labels,
                              load_split(tmp_path / "b", split).labels)
        assert np.array_equal(load_split(tmp_path / "a", split).images,
                              load_split(tmp_path / "b", split).images)


def test_channel_stats_in_unit_range():
    images = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    images[:, 0] = 255
    mean, std = channel_stats(images)
    assert mean == [1.0, 0.0, 0.0] and std == [0.0, 0.0, 0.0]


def test_a_dataset_of_identical_pixels_is_refused(tmp_path, cifar):
    """What a crafted archive of uninitialised (zeroed) arrays decodes to: mean 0, std 0."""
    import dataclasses

    from cifar_alexnet.core.archive import Batch
    from cifar_alexnet.errors import DataError

    flat = dataclasses.replace(cifar, train=Batch(np.zeros_like(cifar.train.images),
                                                  cifar.train.labels))
    with pytest.raises(DataError) as info:
        prepare(flat, 0.1, 0, tmp_path / "prepared")
    assert "no variation in channel(s) R, G, B" in str(info.value)
    assert not (tmp_path / "prepared").exists()
