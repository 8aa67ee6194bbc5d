"""The prepare stage: seeded stratified train/val split, train-only statistics, compact arrays
written in the format that :mod:`cifar_alexnet.core.data` reads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cifar_alexnet.core.archive import REPLACE_HINT, Batch, Cifar10
from cifar_alexnet.core.cifar10 import NUM_CLASSES
from cifar_alexnet.core.data import META_NAME, SPLITS, DatasetMeta
from cifar_alexnet.errors import DataError
from cifar_alexnet.files import atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)

OUTPUT_FILES = (*(f"{split}.npz" for split in SPLITS), META_NAME)


def stratified_split(labels: np.ndarray, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with class proportions kept; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=val_size, random_state=seed,
                                              stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified split with data.val_size={val_size} of "
                        f"{len(labels)} images: {exc}") from None
    return np.sort(train_idx), np.sort(val_idx)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    pixels = images.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def prepare(data: Cifar10, val_size: float, seed: int, out_dir: str | Path,
            source_md5: str | None = None) -> DatasetMeta:
    """Split, measure and write the prepared dataset; statistics come from the train split only."""
    train_idx, val_idx = stratified_split(data.train.labels, val_size, seed)
    splits = {
        "train": Batch(data.train.images[train_idx], data.train.labels[train_idx]),
        "val": Batch(data.train.images[val_idx], data.train.labels[val_idx]),
        "test": data.test,
    }
    return write_prepared(out_dir, splits, data.class_names,
                          {"val_size": val_size, "seed": seed, "source_md5": source_md5})


def write_prepared(out_dir: str | Path, splits: dict[str, Batch], class_names: Sequence[str],
                   provenance: dict[str, Any]) -> DatasetMeta:
    """The prepared directory :mod:`cifar_alexnet.core.data` reads: the splits' arrays and a
    meta.json with the train split's statistics, class counts and ``provenance``."""
    out_dir = Path(out_dir)
    mean, std = channel_stats(splits["train"].images)
    flat = [channel for channel, s in zip("RGB", std) if s == 0]
    if flat:  # normalising by a zero std divides by zero; no real photograph set is this
        raise DataError(f"the training images have no variation in channel(s) "
                        f"{', '.join(flat)} (every pixel the same): not real images; the archive "
                        f"is corrupt or crafted; {REPLACE_HINT}")
    meta = DatasetMeta(tuple(class_names), tuple(mean), tuple(std),
                       {name: int(len(b.labels)) for name, b in splits.items()})
    # The arrays and the meta.json describing them are replaced together: a failed or killed
    # run leaves the previous prepared directory (or none), never new arrays with old statistics.
    with atomic_dir(out_dir, replaces=OUTPUT_FILES) as tmp_dir:
        for name, batch in splits.items():
            with atomic_path(tmp_dir / f"{name}.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=batch.images, labels=batch.labels)
        write_json(tmp_dir / META_NAME, {
            "class_names": list(meta.class_names),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "sizes": meta.sizes,
            "class_counts": {name: np.bincount(b.labels, minlength=NUM_CLASSES).tolist()
                             for name, b in splits.items()},
            **provenance,
        })
    log.info("prepared %s -> %s (mean %s, std %s)", meta.sizes, out_dir,
             np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return meta
