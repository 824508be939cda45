"""Training configuration: YAML file + ``--section.key value`` overrides, validated before any work.

A config has the sections ``model``, ``data``, ``optim``, ``sched``, ``train``, ``sparsity``,
``averaging`` and ``run`` (see the dataclasses below, and ``recipes/configs/*.yaml``). Unknown keys
raise a ``ValueError`` listing the valid ones; values are type-checked against the fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainLoopConfig",
    "SparsityOptions",
    "AveragingOptions",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "config_differences",
    "RESUME_MAY_DIFFER",
]


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    pretrained: bool = False  # downloads weights: only when online
    num_classes: int | None = None  # None: from the data set's labels
    in_chans: int = 3
    img_size: int = 224  # input resolution (square)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | imagefolder | disk | a Hugging Face Hub data set id
    data_dir: str | None = None  # fashion_mnist: IDX folder; imagefolder/disk: path; hub: optional data_dir
    train_split: str = "train"
    val_split: str | None = None  # None: hold out val_fraction of the train split (stratified, seeded)
    val_fraction: float = 0.1
    test_split: str | None = "test"
    image_column: str | None = None  # None: the first Image column
    label_column: str | None = None  # None: the first ClassLabel column
    max_train_samples: int | None = None  # subsample the train split (quick runs)
    max_eval_samples: int | None = None  # subsample val/test
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    num_workers: int = 1
    mean: list[float] | None = None  # None: timm's defaults for the model (averaged for 1 channel)
    std: list[float] | None = None
    crop: str = "pad"  # pad: random crop from a padded image; rrc: timm RandomResizedCrop; none
    crop_padding: int = 4
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # rrc only
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # rrc only
    hflip: float = 0.5
    color_jitter: float = 0.0


@dataclass
class OptimConfig:
    opt: str = "sgd"  # any timm optimizer name (timm's "sgd" is Nesterov SGD)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kwargs: dict[str, Any] = field(default_factory=dict)
    clip_grad: float | None = None  # max gradient norm


@dataclass
class SchedConfig:
    name: str = "multistep"  # any timm scheduler: multistep | cosine | step | plateau | ... | none
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training (multistep)
    decay_rate: float = 0.1
    warmup_epochs: float = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0


@dataclass
class TrainLoopConfig:
    epochs: int = 10
    label_smoothing: float = 0.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16: GPU, with loss scaling)
    gradient_accumulation_steps: int = 1
    seed: int = 0


@dataclass
class SparsityOptions:
    method: str = "rigl"  # dense, or a registered method (static, set, rigl, snfs, unfired, ...)
    density: float = 0.1
    distribution: str = "erk"
    update_interval: int = 100
    prune_rate: float = 0.5
    final_prune_rate: float = 0.005
    prune_schedule: str = "cosine"
    stop_fraction: float | None = None  # last topology update at this fraction of training (RigL: 0.75)
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int | None = None  # None: train.seed


@dataclass
class AveragingOptions:
    enabled: bool = False
    period_epochs: float = 1.0
    sample_prob: float = 1.0
    last_fraction: float = 1.0
    bn_update_batches: int = 50  # batches used to re-estimate BatchNorm statistics after write-back


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    log_interval: int = 50  # optimizer steps between JSON log lines
    checkpoint_interval: int = 500  # optimizer steps between checkpoints (0: only at epoch ends)
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint folder, or "latest" (in output_dir/checkpoints)
    overwrite: bool = False  # allow a fresh run into an output_dir that already has checkpoints
    tensorboard: bool = False
    progress: bool = True
    cpu: bool = False  # force the CPU even when a GPU is present
    save_sparse: bool = True  # write the final sparse checkpoint (model.safetensors + sparsity.safetensors)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    averaging: AveragingOptions = field(default_factory=AveragingOptions)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Every ``section.key`` a config may set."""
        return [
            f"{s.name}.{f.name}"
            for s in dataclasses.fields(cls)
            for f in dataclasses.fields(s.default_factory())
        ]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from nested ``{section: {key: value}}``; unknown or ill-typed keys raise ``ValueError``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in sections]
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; valid sections: {list(sections)}")
        built = {}
        for name, section_field in sections.items():
            section_cls = section_field.default_factory
            given = values.get(name) or {}
            if not isinstance(given, Mapping):
                raise ValueError(f"{source}: section {name!r} must be a mapping, got {given!r}")
            known = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = [k for k in given if k not in known]
            if bad:
                hints = {k: difflib.get_close_matches(k, list(known), n=1) for k in bad}
                hint = "; ".join(f"{name}.{k}: did you mean {name}.{h[0]}?" for k, h in hints.items() if h)
                raise ValueError(
                    f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}"
                    f"{' (' + hint + ')' if hint else ''}; valid keys in {name!r}: {list(known)}"
                )
            typed = {k: _check_type(f"{name}.{k}", v, _field_type(section_cls, k)) for k, v in given.items()}
            built[name] = section_cls(**typed)
        config = cls(**built)
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
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
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
            (
                self.sparsity.stop_fraction is None or 0 < self.sparsity.stop_fraction <= 1,
                "sparsity.stop_fraction must be in (0, 1]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def dense(self) -> bool:
        return self.sparsity.method.lower() == "dense"


def _field_type(section_cls: type, key: str) -> Any:
    return typing.get_type_hints(section_cls)[key]


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate ``value`` against a field annotation (int/float/bool/str/list/dict/Optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise ValueError(f"{key} must be a list, got {value!r}")
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"{key} must be a mapping, got {value!r}")
    raise ValueError(f"{key}: unsupported field type {annotation}")  # pragma: no cover


def parse_overrides(args: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["--optim.lr", "0.05", "--sparsity.density=0.02"]`` -> ``{"optim": {"lr": 0.05}, ...}``.

    Values are parsed as YAML scalars/lists (``true``, ``null``, ``[0.5, 0.75]``).
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    valid = TrainConfig.valid_keys()
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} needs a value")
            raw = args[i + 1]
            i += 1
        i += 1
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            raise ValueError(
                f"unknown config key {key!r}{f' (did you mean {close}?)' if close else ''}; valid keys: {', '.join(valid)}"
            )
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(raw) if raw != "" else None
    return out


def _merge(base: dict[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in overrides.items():
        current = merged.get(section)
        merged[section] = {**(current if isinstance(current, Mapping) else {}), **values}
    return merged


def load_config(
    path: str | Path | None, overrides: Sequence[str] | Mapping[str, Mapping[str, Any]] = ()
) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} not found")
        loaded = yaml.safe_load(path.read_text())
        values = loaded or {}
        source = str(path)
    parsed = parse_overrides(overrides) if not isinstance(overrides, Mapping) else overrides
    return TrainConfig.from_dict(_merge(values, parsed), source=source)


#: keys that may change between a checkpoint and its resumption without changing the run's result.
RESUME_MAY_DIFFER = frozenset(
    {
        "run.resume",
        "run.overwrite",
        "run.progress",
        "run.tensorboard",
        "run.log_interval",
        "run.checkpoint_interval",
        "run.keep_checkpoints",
        "run.output_dir",
        "data.num_workers",
        "data.eval_batch_size",
        "data.data_dir",
    }
)


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str] = RESUME_MAY_DIFFER
) -> list[str]:
    """``section.key: saved -> current`` for every setting that differs (except ``ignore``)."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if name not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
