"""The prepared dataset, read: ``data/prepared/`` as the prepare stage writes it.

Format: ``{train,val,test}.npz`` holding ``images`` (N, 3, 32, 32) uint8 and ``labels`` (N,)
int64 - 150 MB for full CIFAR-10, small enough to put on a GPU whole - and ``meta.json`` with
class names, per-channel mean/std (train split only) and split sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_alexnet.core.archive import Batch
from cifar_alexnet.errors import DataError
from cifar_alexnet.files import read_json

SPLITS = ("train", "val", "test")
META_NAME = "meta.json"


@dataclass(frozen=True)
class DatasetMeta:
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sizes: dict[str, int]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DatasetMeta":
        return cls(tuple(raw["class_names"]), tuple(raw["mean"]), tuple(raw["std"]),
                   dict(raw["sizes"]))


def load_meta(prepared_dir: str | Path) -> DatasetMeta:
    path = Path(prepared_dir) / META_NAME
    try:
        return DatasetMeta.from_dict(read_json(path))
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)") \
            from None


def load_split(prepared_dir: str | Path, split: str) -> Batch:
    """Load one prepared split as numpy arrays (uint8 images, int64 labels)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(prepared_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Batch(npz["images"], npz["labels"])
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)") \
            from None
