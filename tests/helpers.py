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


def randomize_batchnorm(model, generator) -> None:
    """Give every BatchNorm layer non-trivial running statistics and affine parameters (so a test of the
    outputs sees every channel)."""
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)


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


# --------------------------------------------------------------------------- sparse checkpoints
def train_sparse(
    name: str = "test_resnet",
    density: float = 0.2,
    *,
    method: str = "rigl",
    seed: int = 0,
    size: int = 32,
    **model_kwargs,
):
    """A timm model (10 classes) sparsified with ``method`` and trained 3 steps on random
    ``size`` x ``size`` images: ``(model in eval mode, sparsifier)``."""
    import timm

    import itop_timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **model_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = itop_timm.sparsify(
        model, opt, method=method, density=density, update_interval=2, total_steps=100, seed=seed
    )
    train_steps(model, opt, 3, input_size=(3, size, size))
    return model.eval(), sp


def save_reference_checkpoints(root) -> dict:
    """A sparse ``test_resnet`` (density 0.2) saved under ``root`` dense (with a Hub data set id) and
    compact, plus another seed's checkpoint: ``{"files", "compact_files"}`` (name -> bytes), its
    ``"state"`` and ``"masks"``, and the ``"other"`` folder."""
    from itop_timm.checkpoint import save_sparse

    model, sp = train_sparse()
    dense = save_sparse(model, sp, root / "dense", dataset="zalando-datasets/fashion_mnist")
    compact = save_sparse(model, sp, root / "compact", compact=True)
    other_model, other_sp = train_sparse(seed=1)
    return {
        "files": {p.name: p.read_bytes() for p in dense.iterdir()},
        "compact_files": {p.name: p.read_bytes() for p in compact.iterdir()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": {k: v.clone() for k, v in sp.masks.items()},
        "other": save_sparse(other_model, other_sp, root / "other"),
    }


def checkpoint_metadata(files: dict) -> dict:
    """The JSON metadata in a checkpoint's ``sparsity.safetensors`` (``files``: name -> bytes)."""
    import json

    return json.loads(safetensors_metadata(files["sparsity.safetensors"])["itop_timm"])


def load_is_identical(folder, ref: dict) -> bool:
    """Load ``folder``: ``True`` if it is exactly the reference model and masks (``ref`` as made by
    :func:`save_reference_checkpoints`), ``False`` for a ``CheckpointError`` naming a file of the
    folder; anything else fails the test."""
    from itop_timm.checkpoint import load_sparse
    from itop_timm.serialization import CheckpointError

    try:
        model, masks, _ = load_sparse(folder)
    except CheckpointError as err:
        assert str(folder) in str(err), str(err)
        return False
    state = model.state_dict()
    assert set(state) == set(ref["state"]) and all(torch.equal(state[k], ref["state"][k]) for k in state)
    assert set(masks) == set(ref["masks"]) and all(torch.equal(masks[n], ref["masks"][n]) for n in masks)
    return True
