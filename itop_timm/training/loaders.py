"""From data set splits to batches on timm's PIL path: the resolved input settings (size, mean/std,
interpolation), timm's train/eval transforms, a dataset whose random transforms are seeded per
(seed, epoch, index), the per-epoch shuffling sampler and the DataLoader.

:func:`resolve_data_config` and :class:`EpochShuffleSampler` serve the in-memory path
(:mod:`.tensor_data`) too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, ModelConfig

__all__ = [
    "resolve_data_config",
    "build_transforms",
    "ImageClassificationDataset",
    "EpochShuffleSampler",
    "make_loader",
]


def _mean_std(
    cfg: DataConfig, model_cfg: ModelConfig, timm_cfg: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = model_cfg.in_chans
    mean = cfg.mean if cfg.mean is not None else list(timm_cfg["mean"])
    std = cfg.std if cfg.std is not None else list(timm_cfg["std"])
    if len(mean) != channels:
        mean = [float(np.mean(mean))] * channels if cfg.mean is None else mean
    if len(std) != channels:
        std = [float(np.mean(std))] * channels if cfg.std is None else std
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean/std need {channels} values (model.in_chans), got {mean} / {std}")
    return tuple(mean), tuple(std)


def resolve_data_config(cfg: DataConfig, model_cfg: ModelConfig, model: torch.nn.Module) -> dict[str, Any]:
    """Input size, mean/std and interpolation for ``model`` (timm's ``resolve_data_config`` + the config)."""
    from timm.data import resolve_data_config as timm_resolve

    timm_cfg = timm_resolve({}, model=model)
    mean, std = _mean_std(cfg, model_cfg, timm_cfg)
    size = model_cfg.img_size
    return {
        "input_size": (model_cfg.in_chans, size, size),
        "interpolation": timm_cfg.get("interpolation", "bilinear"),
        "mean": mean,
        "std": std,
        "crop_pct": 1.0,
    }


def build_transforms(
    cfg: DataConfig, model_cfg: ModelConfig, model: torch.nn.Module
) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's ``create_transform`` for the resolved data config."""
    from timm.data import create_transform
    from torchvision import transforms as T

    data_cfg = resolve_data_config(cfg, model_cfg, model)
    input_size, size = data_cfg["input_size"], model_cfg.img_size
    common = {"interpolation": data_cfg["interpolation"], "mean": data_cfg["mean"], "std": data_cfg["std"]}
    eval_tf = create_transform(input_size, is_training=False, crop_pct=data_cfg["crop_pct"], **common)
    if cfg.crop == "none":
        return eval_tf, eval_tf
    if cfg.crop == "rrc":
        train_tf = create_transform(
            input_size,
            is_training=True,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            **common,
        )
        return train_tf, eval_tf
    # "pad": resize to the input size, random crop from a zero-padded copy (the CIFAR recipe), flip,
    # then timm's final stage (ToTensor + Normalize)
    _, _, final = create_transform(
        input_size, is_training=True, separate=True, hflip=0.0, color_jitter=0.0, **common
    )
    primary = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=cfg.crop_padding)]
    if cfg.hflip > 0:
        primary.append(T.RandomHorizontalFlip(cfg.hflip))
    return T.Compose([*primary, final]), eval_tf


class EpochAware:
    """Knows the current epoch (``set_epoch``, called by the loop before each epoch), which seeds its
    per-epoch randomness."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@dataclass(eq=False)
class ImageClassificationDataset(EpochAware, Dataset):
    """(image tensor, label) pairs from a 🤗 dataset; random transforms seeded per (seed, epoch, index)."""

    data: Any
    image_column: str
    label_column: str
    transform: Callable
    mode: str
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.data[int(index)]
        image = row[self.image_column]
        if not hasattr(image, "convert"):
            from PIL import Image

            image = Image.fromarray(np.asarray(image))
        image = image.convert(self.mode)
        if self.seed is None:
            return self.transform(image), int(row[self.label_column])
        # torchvision draws from torch's default CPU generator, timm's RandomResizedCrop from `random`:
        # seed both for this sample, then restore them (this may run in the training process itself)
        # modulo 2**64: what torch's generators take (every seed that fitted before is unchanged)
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % 2**64
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            x = self.transform(image)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
        return x, int(row[self.label_column])


class EpochShuffleSampler(EpochAware, Sampler[int]):
    """A fresh permutation per epoch, a pure function of (seed, epoch): identical on every rank and
    after a resume."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


def make_loader(
    dataset: ImageClassificationDataset, batch_size: int, *, train: bool, seed: int, num_workers: int
) -> DataLoader:
    """A DataLoader with its own generator (loader start-up never draws from the global RNG)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if train else None,
        shuffle=False,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
