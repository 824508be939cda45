"""Image-classification data sets through 🤗 ``datasets``: the sources and their train/val/test splits.

Sources (``data.dataset``):

* ``fashion_mnist`` — the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), converted once to a ``datasets.DatasetDict`` (``image``:
  ``Image``, ``label``: ``ClassLabel``, the Hub's ``zalando-datasets/fashion_mnist`` schema) and cached
  as Arrow under the 🤗 datasets cache;
* ``imagefolder`` — a local ``data_dir`` with one folder per class (``datasets``' imagefolder builder);
* ``disk`` — a ``DatasetDict`` saved with ``save_to_disk`` at ``data_dir``;
* anything else — a Hugging Face Hub data set id (``cifar10``, ``zalando-datasets/fashion_mnist``...),
  loaded with ``datasets.load_dataset`` (from the local cache when ``HF_DATASETS_OFFLINE=1``).

From splits to batches: :mod:`.loaders` (timm's PIL transforms; its names are importable from here
too) and :mod:`.tensor_data` (the in-memory path).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..serialization import plain_mode
from ..validation import short_repr
from .config import DataConfig
from .loaders import (
    EpochShuffleSampler,
    ImageClassificationDataset,
    build_transforms,
    make_loader,
    resolve_data_config,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "fashion_mnist_from_idx",
    "hub_dataset_id",
    "load_splits",
    "check_labels",
    "Splits",
    "build_transforms",
    "resolve_data_config",
    "ImageClassificationDataset",
    "EpochShuffleSampler",
    "make_loader",
]

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), validating its header against its size."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {dims} ({expected} bytes of data) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def hub_dataset_id(name: str) -> str:
    """The Hugging Face Hub id of a ``data.dataset`` name where it has one (``fashion_mnist`` is the
    Hub's ``zalando-datasets/fashion_mnist``); other names are returned as they are."""
    return {"fashion_mnist": "zalando-datasets/fashion_mnist"}.get(name, name)


def fashion_mnist_from_idx(data_dir: str | Path = FASHION_MNIST_DIR, cache_dir: str | Path | None = None):
    """The Fashion-MNIST IDX files as a ``datasets.DatasetDict`` (train 60k / test 10k), cached as Arrow."""
    import datasets

    folder = Path(data_dir)
    files = {split: [_idx_path(folder, stem) for stem in stems] for split, stems in _IDX_FILES.items()}
    missing = [
        stem
        for split, stems in _IDX_FILES.items()
        for stem, p in zip(stems, files[split], strict=True)
        if p is None
    ]
    if missing:
        raise ValueError(
            f"Fashion-MNIST IDX files not found in {str(folder)!r} (missing {missing}); on Debian/Ubuntu: "
            "`apt-get install -y dataset-fashion-mnist`, or set data.data_dir"
        )
    digest = hashlib.sha256()
    for paths in files.values():
        for p in paths:
            digest.update(p.name.encode())
            digest.update(hashlib.sha256(p.read_bytes()).digest())
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "itop_timm"
    target = root / f"fashion_mnist_idx-{digest.hexdigest()[:16]}"
    if (target / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(target))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_path} / {labels_path}: expected N images of HxW and N labels")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..9")
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images), "label": labels.astype(np.int64)}, features=features
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        os.chmod(tmp, plain_mode(folder=True))  # a shared cache, not mkdtemp's private 0o700
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        os.replace(tmp, target)  # atomic; fails if another process already published the cache
        _logger.info("cached Fashion-MNIST (IDX) as Arrow in %s", target)
    except OSError:
        if not (target / "dataset_dict.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


@dataclass
class Splits:
    """The train/val/test splits of an image-classification data set and its schema."""

    train: Any
    val: Any | None
    test: Any | None
    image_column: str
    label_column: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _load_source(cfg: DataConfig):
    import datasets

    name = cfg.dataset
    if name == "fashion_mnist":
        return fashion_mnist_from_idx(cfg.data_dir or FASHION_MNIST_DIR)
    if name in ("imagefolder", "disk"):
        if not cfg.data_dir or not Path(cfg.data_dir).is_dir():
            raise ValueError(
                f"data.dataset={name!r} needs data.data_dir to be an existing folder, got {cfg.data_dir!r}"
            )
        try:
            if name == "imagefolder":
                return datasets.load_dataset("imagefolder", data_dir=cfg.data_dir)
            loaded = datasets.load_from_disk(cfg.data_dir)
        except Exception as err:  # datasets raises many types (not a saved data set, no images, torn files)
            what = "a data set saved with save_to_disk" if name == "disk" else "a folder of images"
            raise ValueError(
                f"data.dataset={name!r}: data.data_dir {cfg.data_dir!r} is not {what} "
                f"({type(err).__name__}: {short_repr(str(err), 300)})"
            ) from err
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if Path(name).exists():
        raise ValueError(
            f"data.dataset={name!r} is a local path: use dataset: imagefolder (or disk) with data_dir: {name}"
        )
    try:
        return datasets.load_dataset(name, data_dir=cfg.data_dir)
    except Exception as err:  # datasets raises many types (offline, not found, bad config)
        raise ValueError(
            f"unknown data set {name!r}: not fashion_mnist/imagefolder/disk and not loadable from the Hugging Face Hub "
            f"or its local cache ({type(err).__name__}: {err})"
        ) from err


def _columns(features: Any, cfg: DataConfig) -> tuple[str, str]:
    import datasets

    image = cfg.image_column or next((k for k, v in features.items() if isinstance(v, datasets.Image)), None)
    label = cfg.label_column or next(
        (k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None
    )
    if label is None and "label" in features:
        label = "label"
    if image is None or image not in features:
        raise ValueError(f"no image column found (columns: {list(features)}); set data.image_column")
    if label is None or label not in features:
        raise ValueError(f"no label column found (columns: {list(features)}); set data.label_column")
    return image, label


#: how to run without a split that turned out empty
_SKIP_SPLIT = {
    "train": "",
    "val": "; set data.val_split null and data.val_fraction 0 to train without validation",
    "test": "; set data.test_split null to train without a final test",
}


def _split_description(role: str, cfg: DataConfig) -> str:
    """How an error names a split: ``the test split 'test' of data set 'disk'``."""
    name = getattr(cfg, f"{role}_split")
    what = (
        f"split {name!r}" if name is not None else f"split held out by data.val_fraction={cfg.val_fraction}"
    )
    return f"the {role} {what} of data set {cfg.dataset!r}"


def _check_not_empty(role: str, data: Any, cfg: DataConfig) -> None:
    """``ValueError`` when a split the run would train on or measure with holds no sample (an
    accuracy over no sample is not a measurement)."""
    if data is not None and len(data) == 0:
        raise ValueError(f"{_split_description(role, cfg)} is empty{_SKIP_SPLIT[role]}")


def _bad_label_rows(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices of the labels that are not integers in ``[0, num_classes)`` (missing ones: NaN or None)."""
    if labels.dtype.kind in "biu":
        values = labels.astype(np.int64)
        return np.flatnonzero((values < 0) | (values >= num_classes))
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.floor(labels))
        return np.flatnonzero(~whole | (labels < 0) | (labels >= num_classes))
    return np.flatnonzero(  # strings, None, mixed objects: integers only
        [
            not (isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= x < num_classes)
            for x in labels
        ]
    )


def check_labels(splits: Splits, num_classes: int, cfg: DataConfig) -> None:
    """``ValueError`` naming the split, the row and the value when a label of a split the run uses is
    not an integer in ``[0, num_classes)`` (e.g. ``-1``, which 🤗 datasets allows for an unlabeled
    split). Reads the label column only (Arrow), not the images."""
    for role in ("train", "val", "test"):
        data = getattr(splits, role)
        if data is None:
            continue
        column = data.select_columns([splits.label_column]).with_format("arrow")[:].column(0)
        bad = _bad_label_rows(column.to_numpy(zero_copy_only=False), num_classes)
        if not bad.size:
            continue
        row = int(bad[0])
        value = column[row].as_py()
        unlabeled = value is None or value == -1
        hint = (
            f": an unlabeled split cannot be trained on or measured{_SKIP_SPLIT[role]}" if unlabeled else ""
        )
        raise ValueError(
            f"{_split_description(role, cfg)} has {bad.size} label(s) outside the model's classes in column "
            f"{splits.label_column!r}, the first {short_repr(value)} (row {row}); allowed: integers in "
            f"[0, {num_classes}){hint}"
        )


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load the data set and name its train/val/test splits; ``ValueError`` before any training on bad input."""
    import datasets

    source = _load_source(cfg)
    available = list(source)
    for role, split in (("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split)):
        if split is not None and split not in source:
            raise ValueError(
                f"data.{role}_split={split!r} is not in data set {cfg.dataset!r}; available splits: {available}"
            )
    train = source[cfg.train_split]
    image_col, label_col = _columns(train.features, cfg)
    label_feature = train.features[label_col]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
    else:
        class_names = [str(i) for i in range(int(max(train[label_col])) + 1)]
    val = source[cfg.val_split] if cfg.val_split is not None else None
    if val is None and cfg.val_fraction > 0:
        stratify = label_col if isinstance(label_feature, datasets.ClassLabel) else None
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=seed, stratify_by_column=stratify)
        train, val = parts["train"], parts["test"]
    test = source[cfg.test_split] if cfg.test_split is not None else None
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples is not None:
        val = val.select(range(min(cfg.max_eval_samples, len(val)))) if val is not None else None
        test = test.select(range(min(cfg.max_eval_samples, len(test)))) if test is not None else None
    for role, data in (("train", train), ("val", val), ("test", test)):
        _check_not_empty(role, data, cfg)
    return Splits(train, val, test, image_col, label_col, class_names)
