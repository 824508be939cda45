"""Shared test helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def train_steps(
    model,
    optimizer,
    steps: int,
    input_size=(3, 32, 32),
    batch: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    on_step=None,
):
    """Run ``steps`` plain training steps on random data (a fixed generator, so runs are repeatable)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for i in range(steps):
        x = torch.randn(batch, *input_size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if on_step is not None:
            on_step(i + 1)


def synthetic_images(n: int, classes: int, size: int, channels: int, seed: int):
    """Images whose class is a bright square at a class-specific place, plus noise (learnable, tiny)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    q = size // 2
    for i, c in enumerate(labels):
        r, k = divmod(int(c) % 4, 2)
        images[i, r * q : (r + 1) * q, k * q : (k + 1) * q] += 150
    return images, labels


def make_disk_dataset(
    root, n_train: int = 64, n_test: int = 32, classes: int = 4, size: int = 16, channels: int = 1
):
    """A tiny ``datasets.DatasetDict`` (train/test) saved with ``save_to_disk``; returns its path."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(classes)])}
    )
    splits = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, classes, size, channels, seed)
        images = images[..., 0] if channels == 1 else images
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images), "label": labels.tolist()}, features=features
        )
    path = str(root / "tiny_dataset")
    datasets.DatasetDict(splits).save_to_disk(path)
    return path


def make_image_folder(root, n_per_class: int = 6, classes: int = 3, size: int = 16):
    """A tiny RGB imagefolder: root/train/<class>/*.png and root/test/<class>/*.png; returns root."""
    from PIL import Image

    for split, seed in (("train", 0), ("test", 1)):
        images, labels = synthetic_images(n_per_class * classes, classes, size, 3, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def write_idx(path, array) -> None:
    """Write ``array`` (uint8) as a gzip-compressed IDX file."""
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


PLUGIN = """
from itop_timm import MethodInfo, register_method
from itop_timm.methods import magnitude_score, random_score

register_method(MethodInfo("{name}", magnitude_score, random_score, "a test plugin's method",
                           defaults={{"update_interval": 7, "prune_rate": 0.25}}))
"""


def write_plugin(folder, module: str, method: str) -> None:
    """A plugin module ``module`` in ``folder`` that registers ``method`` (defaults: update_interval 7,
    prune_rate 0.25)."""
    (folder / f"{module}.py").write_text(PLUGIN.format(name=method))


def safetensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header."""
    import json
    import struct

    length = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + length]).get("__metadata__") or {}


def forge_metadata(files: dict, meta_json: str, relink: bool = True) -> dict:
    """A copy of a checkpoint's ``files`` whose ``sparsity.safetensors`` carries the metadata text
    ``meta_json``; with ``relink`` the weights file is re-saved to name the new file by hash (a forger
    who rewrites both files, so only the metadata checks stand in the way)."""
    import hashlib

    from safetensors.torch import load, save

    files = dict(files)
    files["sparsity.safetensors"] = save(
        load(files["sparsity.safetensors"]), metadata={"itop_timm": meta_json}
    )
    if relink:
        link = hashlib.sha256(files["sparsity.safetensors"]).hexdigest()
        for name in ("model.safetensors", "model.compact.safetensors"):
            if name in files:
                files[name] = save(load(files[name]), metadata={"itop_timm.sparsity_sha256": link})
    return files


def write_folder(path, files: dict[str, bytes]):
    """Make ``path`` hold exactly ``files`` (name -> bytes); returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    for p in path.iterdir():
        p.unlink()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path
