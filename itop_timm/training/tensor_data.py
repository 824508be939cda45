"""The in-memory data path: decode a small data set once, augment whole batches with tensor ops.

Where the model is the bottleneck (Fashion-MNIST, CIFAR-size sets), per-sample PIL transforms in
loader workers compete with the compute for the same cores. Here every split is decoded once into a
``uint8`` tensor ``[N, C, H, W]`` (resized and centre-cropped to the model's input size as the PIL
path does); the loader only indexes it (``__getitems__``, no per-sample Python), and the training
batch is augmented on the training device after the transfer:

* random crop from a zero-padded image (``data.crop: pad``, ``data.crop_padding``), i.e. a shifted
  ``H x W`` window of the padded image, then a horizontal flip with probability ``data.hflip``;
* ``(x / 255 - mean) / std`` with the resolved mean/std (evaluation splits: this only).

Every random choice of sample ``i`` is a counter-based hash of ``(seed, epoch, i)`` computed with
integer tensor ops, identical on the CPU and CUDA: the batch of a given (seed, epoch, step) is always
the same, whatever the number of ranks, workers or resumptions. ``rrc`` crops and colour jitter stay
on timm's PIL transforms (:mod:`itop_timm.training.loaders`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig, ModelConfig
from .loaders import EpochAware

__all__ = [
    "use_in_memory",
    "decode_split",
    "sample_keys",
    "BatchAugment",
    "TensorImageDataset",
    "make_tensor_loader",
    "device_batches",
]

_logger = logging.getLogger(__name__)

_MASK31 = 0x7FFFFFFF
_DRAW_X, _DRAW_Y, _DRAW_FLIP = 1, 2, 3


def _split_bytes(split: Any, channels: int, size: int) -> int:
    return 0 if split is None else len(split) * channels * size * size


def use_in_memory(cfg: DataConfig, model_cfg: ModelConfig, splits: Sequence[Any]) -> bool:
    """Whether the run takes the in-memory path: ``data.in_memory`` if set, else when the augmentation
    has a tensor version and the decoded splits fit in ``data.in_memory_max_mb``."""
    if cfg.in_memory is not None:
        return cfg.in_memory
    if cfg.in_memory_blocker() is not None:
        return False
    total = sum(_split_bytes(s, model_cfg.in_chans, model_cfg.img_size) for s in splits)
    return total <= cfg.in_memory_max_mb * 2**20


def decode_split(
    data: Any, image_column: str, label_column: str, mode: str, size: int, interpolation: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images ``[N, C, size, size]``, int64 labels) of a 🤗 split: each image converted to
    ``mode``, resized (shorter side) and centre-cropped to ``size`` when it is not already that size."""
    from PIL import Image
    from torchvision import transforms as T

    geometry = T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(size)]
    )
    channels = 1 if mode == "L" else 3
    images = torch.empty((len(data), channels, size, size), dtype=torch.uint8)
    labels = torch.empty(len(data), dtype=torch.int64)
    start = 0
    for batch in data.iter(batch_size=1024):
        for offset, (image, label) in enumerate(zip(batch[image_column], batch[label_column], strict=True)):
            if not hasattr(image, "convert"):
                image = Image.fromarray(np.asarray(image))
            image = image.convert(mode)
            if image.size != (size, size):
                image = geometry(image)
            array = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
            images[start + offset] = torch.from_numpy(array.copy()).permute(2, 0, 1)
            labels[start + offset] = int(label)
        start += len(batch[label_column])
    return images, labels


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xor-shift-multiply); products stay below 2**62, so int64 never overflows."""
    x = x & _MASK31
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 15)


def _stream_base(seed: int, epoch: int, draw: int) -> int:
    digest = hashlib.sha256(f"itop_timm.tensor_data:{seed}:{epoch}:{draw}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & _MASK31


def sample_keys(seed: int, epoch: int, draw: int, indices: torch.Tensor) -> torch.Tensor:
    """31-bit pseudo-random integers, a pure function of (seed, epoch, draw, sample index)."""
    base = _stream_base(seed, epoch, draw)
    return _mix31(_mix31(indices.to(torch.int64) + base) ^ base)


class BatchAugment:
    """Random crop from the zero-padded batch, horizontal flip and normalisation, per sample seeded
    by (seed, epoch, index); runs on the device of the batch."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        seed: int,
        padding: int = 0,
        hflip: float = 0.0,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.seed = seed
        self.padding = padding
        self.hflip = hflip

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` as float32 (what ToTensor + Normalize compute)."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.to(torch.float32) / 255.0 - mean) / std

    def windows(
        self, indices: torch.Tensor, epoch: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row offset, column offset, flipped) of every sample's window in the padded image."""
        span = 2 * self.padding + 1
        dy = sample_keys(self.seed, epoch, _DRAW_Y, indices) % span
        dx = sample_keys(self.seed, epoch, _DRAW_X, indices) % span
        flip = sample_keys(self.seed, epoch, _DRAW_FLIP, indices).to(torch.float64) / 2**31 < self.hflip
        return dy, dx, flip

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Augment a uint8 batch ``[B, C, H, W]`` of the samples ``indices`` in ``epoch``."""
        b, c, h, w = images.shape
        if self.padding == 0 and self.hflip == 0:
            return self.normalize(images)
        dy, dx, flip = self.windows(indices.to(images.device), epoch, h, w)
        p = self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        steps_h = torch.arange(h, device=images.device)
        steps_w = torch.arange(w, device=images.device)
        rows = dy[:, None] + steps_h  # [B, H]
        cols = dx[:, None] + torch.where(flip[:, None], w - 1 - steps_w, steps_w)  # [B, W]
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        return self.normalize(out)


@dataclass(eq=False)
class TensorImageDataset(EpochAware, Dataset):
    """A decoded split; batches are fetched whole (``__getitems__``).

    Training batches are ``(uint8 images, labels, indices)`` for :class:`BatchAugment` on the device;
    evaluation batches ``(normalised float images, labels)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    augment: BatchAugment
    train: bool = field(kw_only=True)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images, labels = self.images[index], self.labels[index]
        if self.train:
            return images, labels, index
        return self.augment.normalize(images), labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([index]))


def _whole_batch(batch: Any) -> Any:
    return batch  # __getitems__ already built the batch


def make_tensor_loader(
    dataset: TensorImageDataset,
    batch_size: int,
    *,
    sampler: Any,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that indexes the decoded tensor a batch at a time."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        collate_fn=_whole_batch,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def device_batches(loader: Iterable[Any], train_set: Dataset, epoch: int) -> Iterator[tuple[Any, Any]]:
    """The (inputs, labels) of a training epoch: in-memory batches augmented on their device,
    PIL-path batches as they come."""
    if not isinstance(train_set, TensorImageDataset):
        yield from loader
        return
    for images, labels, indices in loader:
        yield train_set.augment(images, indices, epoch), labels


def build_tensor_loaders(
    cfg: Any, splits: Any, model: torch.nn.Module, num_workers: int, pin_memory: bool = False
) -> tuple[TensorImageDataset, dict[str, DataLoader]]:
    """The in-memory counterpart of :func:`.builders.build_loaders`: every split decoded once, the
    train/val/test(/bn) loaders over the tensors (``cfg`` is the whole :class:`~.config.TrainConfig`)."""
    from .loaders import EpochShuffleSampler, resolve_data_config

    data_cfg = resolve_data_config(cfg.data, cfg.model, model)
    seed, size = cfg.train.seed, cfg.model.img_size
    mode = "L" if cfg.model.in_chans == 1 else "RGB"
    pad = cfg.data.crop == "pad"
    augment = BatchAugment(
        data_cfg["mean"],
        data_cfg["std"],
        seed=seed,
        padding=cfg.data.crop_padding if pad else 0,
        hflip=cfg.data.hflip if pad else 0.0,
    )

    def decode(split: Any, interpolation: str) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_split(split, splits.image_column, splits.label_column, mode, size, interpolation)

    def loader(dataset: TensorImageDataset, batch_size: int, train: bool) -> DataLoader:
        sampler = EpochShuffleSampler(len(dataset), seed) if train else None
        return make_tensor_loader(
            dataset,
            batch_size,
            sampler=sampler,
            train=train,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    train_images, train_labels = decode(splits.train, "bilinear")  # the PIL path's T.Resize default
    train_set = TensorImageDataset(train_images, train_labels, augment, train=True)
    loaders = {"train": loader(train_set, cfg.data.batch_size, True)}
    for name in ("val", "test"):
        split = getattr(splits, name)
        if split is not None:
            images, labels = decode(split, data_cfg["interpolation"])
            dataset = TensorImageDataset(images, labels, augment, train=False)
            loaders[name] = loader(dataset, cfg.data.eval_batch_size, False)
    if cfg.averaging.enabled and cfg.averaging.bn_update_batches:
        plain = TensorImageDataset(train_images, train_labels, augment, train=False)
        loaders["bn"] = loader(plain, cfg.data.batch_size, False)
    total = sum(t.numel() for t in (train_images,)) / 2**20
    _logger.info("in-memory data: %d training images decoded (%.1f MiB uint8)", len(train_set), total)
    return train_set, loaders
