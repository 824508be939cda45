"""The recipe's configuration: its sections, and :func:`load_config` (YAML file + ``--section.key value``
overrides, validated before any work).

A config has the sections ``model``, ``data``, ``optim``, ``sched``, ``train``, ``sparsity``,
``averaging`` and ``run`` (see the dataclasses below, and ``recipes/configs/*.yaml``). Reading,
type-checking and merging the values is :mod:`.options`' job: unknown keys raise a ``ValueError``
listing the valid ones, values are type-checked against the fields, and mapping options take
sub-keys (``--sparsity.method_options.channel_sparsity 0.3``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from ..config import SPARSIFY_DEFAULTS, SparsityConfig, option
from ..plugins import load_plugins
from ..validation import SEED, Range, check_options
from .options import (
    build_sections,
    check_type,
    describe_keys,
    merge_overrides,
    parse_yaml,
    section_fields,
    sections_to_dict,
    valid_keys,
)
from .options import parse_overrides as _parse_overrides

if TYPE_CHECKING:  # the methods import torch; --help reads this module without it
    from ..methods import MethodInfo

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainLoopConfig",
    "SparsitySection",
    "AveragingOptions",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "published_config",
]


@dataclass
class ModelConfig:
    name: str = option("any timm model name (timm.list_models())", "resnet18")
    pretrained: bool = option("start from timm's pretrained weights (downloads: only when online)", False)
    num_classes: int | None = option("output classes (null: from the data set's labels)")
    in_chans: int = option("input channels", 3)
    img_size: int = option("input resolution (square)", 224)
    kwargs: dict[str, Any] = option("extra timm.create_model arguments", factory=dict)


@dataclass
class DataConfig:
    dataset: str = option(
        "fashion_mnist | imagefolder | disk (datasets.load_from_disk) | a Hugging Face Hub data set id | "
        "parquet (a local Hub-layout folder of train/test .parquet files in data_dir)",
        "fashion_mnist",
    )
    data_dir: str | None = option(
        "fashion_mnist: IDX folder; imagefolder/disk/parquet: path; hub: optional data_dir"
    )
    train_split: str = option("split to train on", "train")
    val_split: str | None = option(
        "validation split (null: hold out val_fraction of the train split, stratified, seeded)"
    )
    val_fraction: float = option("fraction of the train split held out for validation, in [0, 1)", 0.1)
    test_split: str | None = option("split evaluated at the end (null: none)", "test")
    image_column: str | None = option("image column (null: the first Image column)")
    label_column: str | None = option("label column (null: the first ClassLabel column)")
    max_train_samples: int | None = option(
        "subsample the train split (quick runs)", range=Range(int, 1, optional=True)
    )
    max_eval_samples: int | None = option(
        "subsample the validation and test splits (an empty split is refused: a test of nothing measures "
        "nothing; set data.test_split null to skip the test)",
        range=Range(int, 1, optional=True),
    )
    batch_size: int = option("training batch size per process", 128)
    eval_batch_size: int = option("evaluation batch size per process", 256)
    num_workers: int | str = option(
        "DataLoader worker processes: auto = the cores the compute threads leave (CPU), all of the "
        "process's share but one (GPU); the in-memory path needs none",
        "auto",
    )
    in_memory: bool | None = option(
        "decode every split once into a uint8 tensor and augment batches with tensor ops on the training "
        "device (crop pad/none, no colour jitter); null: when the decoded splits fit in in_memory_max_mb"
    )
    in_memory_max_mb: int = option(
        "size limit (MiB of decoded uint8 images) of the automatic in-memory path", 2048
    )
    mean: list[float] | None = option(
        "normalisation mean (null: timm's for the model, averaged for 1 channel)"
    )
    std: list[float] | None = option("normalisation std (null: timm's for the model)")
    crop: str = option("pad: random crop from a padded image; rrc: timm RandomResizedCrop; none", "pad")
    crop_padding: int = option("padding of crop: pad, in pixels", 4)
    scale: list[float] = option("RandomResizedCrop scale range (crop: rrc)", factory=lambda: [0.08, 1.0])
    ratio: list[float] = option(
        "RandomResizedCrop aspect ratio range (crop: rrc)", factory=lambda: [3 / 4, 4 / 3]
    )
    hflip: float = option("probability of a horizontal flip, in [0, 1]", 0.5)
    color_jitter: float = option("colour jitter strength (0: off)", 0.0)

    def in_memory_blocker(self) -> str | None:
        """``None`` when the augmentation has a batched tensor version (the in-memory path can take
        it), else why not (``rrc``, colour jitter)."""
        if self.crop not in ("pad", "none"):
            return f"data.crop={self.crop!r} (only pad and none have a batched tensor version)"
        if self.color_jitter:
            return f"data.color_jitter={self.color_jitter} (colour jitter has no batched tensor version)"
        return None


@dataclass
class OptimConfig:
    opt: str = option(
        "any timm optimizer name (timm's sgd is Nesterov SGD; rmda, proxsgd for structured sparsity)", "sgd"
    )
    lr: float = option("peak learning rate", 0.1)
    momentum: float = option("momentum (SGD, RMDA)", 0.9)
    weight_decay: float = option("weight decay", 5e-4)
    kwargs: dict[str, Any] = option("extra create_optimizer_v2 arguments", factory=dict)
    clip_grad: float | None = option("max gradient norm (null: no clipping)")


@dataclass
class SchedConfig:
    name: str = option("any timm scheduler: multistep | cosine | step | plateau | ... | none", "multistep")
    milestones: list[float] = option(
        "multistep: fractions of training in (0, 1) where the lr decays", factory=lambda: [0.5, 0.75]
    )
    decay_rate: float = option("lr factor at each milestone", 0.1)
    warmup_epochs: float = option("epochs of linear warm-up", 0.0)
    warmup_lr: float = option("lr at the start of the warm-up", 1e-5)
    min_lr: float = option("lower bound of the lr (cosine)", 0.0)


@dataclass
class TrainLoopConfig:
    epochs: int = option("epochs to train", 10)
    label_smoothing: float = option("label smoothing of the cross-entropy, in [0, 1)", 0.0)
    mixed_precision: str = option("no | bf16 | fp16 (fp16: GPU, with loss scaling)", "no")
    gradient_accumulation_steps: int = option("batches per optimizer step", 1)
    seed: int = option(
        "seed of the model, data order, augmentation and (by default) the masks", 0, range=SEED
    )
    fsdp: bool = option(
        "shard the model with FSDP2 (Accelerate's FSDP plugin, version 2, one unit per timm block)", False
    )


@dataclass(frozen=True)
class SparsitySection(SparsityConfig):
    """The recipe's ``sparsity:`` section: :class:`itop_timm.SparsityConfig` (unset fields take the
    method's default, then the library's), plus what only the recipe knows. ``method: dense`` trains
    without a sparsifier; ``total_steps`` and ``stop_step`` come from ``train.epochs`` and
    ``stop_fraction``; ``seed`` defaults to ``train.seed``."""

    #: library settings the recipe derives (from train.epochs and stop_fraction): not config keys
    derived: ClassVar[tuple[str, ...]] = ("total_steps", "stop_step")

    seed: int | None = option("seed of the initial masks and every random choice (null: train.seed)")
    stop_fraction: float | None = option(
        "last topology update at this fraction of training (RigL: 0.75; null: until the end)"
    )

    @property
    def method_info(self) -> MethodInfo | None:
        return None if self.dense else super().method_info

    @property
    def dense(self) -> bool:
        return self.method.lower() == "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in self.derived:
            if getattr(self, key) is not None:
                raise ValueError(
                    f"sparsity.{key} is set by the recipe from train.epochs; use sparsity.stop_fraction instead"
                )
        if self.stop_fraction is not None and not 0 < self.stop_fraction <= 1:
            raise ValueError(f"sparsity.stop_fraction must be in (0, 1], got {self.stop_fraction!r}")

    def filled(self, seed: int) -> SparsitySection:
        """This section with every unset setting as the run fills it: the method's default, else the
        library's; an unset seed is ``seed`` (``train.seed``). ``total_steps`` and ``stop_step`` stay
        unset: they follow from the data (``--print-config`` shows this)."""
        info = self.method_info
        if info is None:  # dense: no sparsifier, nothing to fill
            return self
        defaults = {**SPARSIFY_DEFAULTS, **info.defaults, "seed": seed}
        unset = {k: v for k, v in defaults.items() if getattr(self, k) is None and v is not None}
        return dataclasses.replace(self, **unset) if unset else self

    def for_run(self, total_steps: int, seed: int) -> SparsityConfig:
        """The library config of a run of ``total_steps`` optimizer steps, resolved and validated."""
        values = self.library_fields()
        values["total_steps"] = total_steps
        if self.stop_fraction is not None:
            values["stop_step"] = int(self.stop_fraction * total_steps)
        if values["seed"] is None:
            values["seed"] = seed
        return SparsityConfig(**values).resolved()


@dataclass
class AveragingOptions:
    enabled: bool = option("periodic sampled weight averaging (PSWA / PWALKS)", False)
    period_epochs: float = option("length of an averaging period, in epochs", 1.0)
    sample_prob: float = option("probability that an iterate of the period is sampled (PWALKS q)", 1.0)
    last_fraction: float = option("average only over this last fraction of each period", 1.0)
    bn_update_batches: int = option("batches to re-estimate BatchNorm statistics after a write-back", 50)


@dataclass
class RunConfig:
    output_dir: str = option("folder of metrics, plots, checkpoints and the sparse model", "runs/default")
    log_interval: int = option("optimizer steps between JSON log lines", 50)
    checkpoint_interval: int = option("optimizer steps between checkpoints (0: only at epoch ends)", 500)
    keep_checkpoints: int = option("training checkpoints kept", 2)
    resume: str | None = option("a checkpoint folder, or latest (in output_dir/checkpoints)")
    overwrite: bool = option(
        "allow a fresh run into an output_dir that holds another run's results (they are removed first)",
        False,
    )
    tensorboard: bool = option("also log to TensorBoard (pip install itop-timm[tensorboard])", False)
    progress: bool = option("show a progress bar", True)
    cpu: bool = option("force the CPU even when a GPU is present", False)
    save_sparse: bool = option(
        "write the final sparse checkpoint (model.safetensors + sparsity.safetensors)", True
    )
    plugins: list[str] = option(
        "modules imported before the config is resolved (they register methods, distributions, schedules)",
        factory=list,
    )
    num_threads: int | str = option(
        "torch CPU threads per process: auto = usable cores (os.sched_getaffinity) / local processes, "
        "unless OMP_NUM_THREADS was exported by the user (not by accelerate launch / torchrun)",
        "auto",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    averaging: AveragingOptions = field(default_factory=AveragingOptions)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{section: {key: value}}`` (tuples as lists), as in a YAML config."""
        return sections_to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(self) -> TrainConfig:
        """A copy whose ``sparsity`` section is :meth:`SparsitySection.filled` from ``train.seed``: the
        values the run uses where the config leaves them unset (for ``--print-config``)."""
        return dataclasses.replace(self, sparsity=self.sparsity.filled(self.train.seed))

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Every ``section.key`` a config may set."""
        return valid_keys(cls)

    @classmethod
    def describe_keys(cls) -> str:
        """Every ``--section.key`` with its type, default and meaning (for ``--help``)."""
        return describe_keys(cls)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from nested ``{section: {key: value}}``; unknown or ill-typed keys raise ``ValueError``.

        The modules named in ``run.plugins`` are imported first: they register the methods,
        distributions and schedules the other keys may name. (Installed plugins are the entry
        point's to load: :func:`itop_timm.load_plugins`.)
        """
        run_values = values.get("run") if isinstance(values, Mapping) else None
        plugins = run_values.get("plugins") if isinstance(run_values, Mapping) else None
        load_plugins(check_type("run.plugins", plugins or [], list[str]), installed=False)
        config = cls(**build_sections(cls, values, source))
        config.validate()
        return config

    def validate(self) -> None:
        """Value checks that need no imports of models or data (those come before training starts)."""
        checks = [
            (self.model.img_size >= 8, "model.img_size must be >= 8"),
            (self.model.in_chans >= 1, "model.in_chans must be >= 1"),
            (self.model.num_classes is None or self.model.num_classes >= 1, "model.num_classes must be >= 1"),
            (0.0 <= self.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
            (self.data.batch_size >= 1 and self.data.eval_batch_size >= 1, "data batch sizes must be >= 1"),
            (self.data.in_memory_max_mb >= 0, "data.in_memory_max_mb must be >= 0"),
            (
                self.data.crop in ("pad", "rrc", "none"),
                f"data.crop must be pad, rrc or none, got {self.data.crop!r}",
            ),
            (0.0 <= self.data.hflip <= 1.0, "data.hflip must be in [0, 1]"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
            (
                self.train.mixed_precision in ("no", "bf16", "fp16"),
                f"train.mixed_precision must be no, bf16 or fp16, got {self.train.mixed_precision!r}",
            ),
            (0.0 <= self.train.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
            (
                all(0 < m < 1 for m in self.sched.milestones),
                "sched.milestones are fractions of training in (0, 1)",
            ),
            (self.run.log_interval >= 1, "run.log_interval must be >= 1"),
            (self.run.checkpoint_interval >= 0, "run.checkpoint_interval must be >= 0"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for section in dataclasses.fields(self):  # the ranges declared with option() (train.seed, ...)
            values = getattr(self, section.name)
            declared = {f.name: getattr(values, f.name) for f in section_fields(type(values))}
            check_options(type(values), declared, f"{section.name}.")
        if self.data.in_memory:
            why_not = self.data.in_memory_blocker()
            if why_not is not None:
                raise ValueError(f"data.in_memory=true is not possible with {why_not}")
        from .resources import check_num_threads, check_num_workers

        check_num_threads(self.run.num_threads)
        check_num_workers(self.data.num_workers)

    @property
    def dense(self) -> bool:
        return self.sparsity.dense


def parse_overrides(args: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["--optim.lr", "0.05", "--model.kwargs.drop_rate", "0.1"]`` -> ``{"optim": {"lr": 0.05},
    "model": {"kwargs.drop_rate": 0.1}}``, checked against :class:`TrainConfig` (see
    :func:`.options.parse_overrides`)."""
    return _parse_overrides(args, TrainConfig)


def load_config(
    path: str | Path | None, overrides: Sequence[str] | Mapping[str, Mapping[str, Any]] = ()
) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides
    (``--section.key value`` strings, or ``{section: {key: value}}``; a dotted ``key.subkey`` sets one
    entry of a mapping option)."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} not found")
        source = str(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {source!r} cannot be read: {err}") from None
        loaded = parse_yaml(text, f"config file {source!r}")
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(
                f"config file {source!r}: expected a mapping of sections (model, data, ...), "
                f"got a {type(loaded).__name__}"
            )
        values = dict(loaded or {})
    parsed = parse_overrides(overrides) if not isinstance(overrides, Mapping) else overrides
    return TrainConfig.from_dict(merge_overrides(values, parsed), source=source)


#: settings left out of the config published with a model: where this machine keeps its data and runs
PRIVATE_KEYS = frozenset({"data.data_dir", *(f"run.{f.name}" for f in dataclasses.fields(RunConfig))})


def published_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that produced the weights, for the checkpoint's metadata and model card (local
    paths and run bookkeeping left out)."""
    return {
        section: {k: v for k, v in values.items() if f"{section}.{k}" not in PRIVATE_KEYS}
        for section, values in cfg.to_dict().items()
        if section != "run"
    }
