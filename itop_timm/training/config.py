"""Training configuration: YAML file + ``--section.key value`` overrides, validated before any work.

A config has the sections ``model``, ``data``, ``optim``, ``sched``, ``train``, ``sparsity``,
``averaging`` and ``run`` (see the dataclasses below, and ``recipes/configs/*.yaml``). Unknown keys
raise a ``ValueError`` listing the valid ones; values are type-checked against the fields.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..config import SparsityConfig, option
from ..methods import MethodInfo
from ..plugins import load_plugins

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
    "config_differences",
    "RESUME_MAY_DIFFER",
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
        "fashion_mnist | imagefolder | disk (datasets.load_from_disk) | a Hugging Face Hub data set id",
        "fashion_mnist",
    )
    data_dir: str | None = option("fashion_mnist: IDX folder; imagefolder/disk: path; hub: optional data_dir")
    train_split: str = option("split to train on", "train")
    val_split: str | None = option(
        "validation split (null: hold out val_fraction of the train split, stratified, seeded)"
    )
    val_fraction: float = option("fraction of the train split held out for validation, in [0, 1)", 0.1)
    test_split: str | None = option("split evaluated at the end (null: none)", "test")
    image_column: str | None = option("image column (null: the first Image column)")
    label_column: str | None = option("label column (null: the first ClassLabel column)")
    max_train_samples: int | None = option("subsample the train split (quick runs)")
    max_eval_samples: int | None = option("subsample the validation and test splits")
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
    seed: int = option("seed of the model, data order, augmentation and (by default) the masks", 0)
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
    overwrite: bool = option("allow a fresh run into an output_dir that already has checkpoints", False)
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
        out: dict[str, Any] = {}
        for s in dataclasses.fields(self):
            section = getattr(self, s.name)
            values = {f.name: copy.deepcopy(getattr(section, f.name)) for f in _section_fields(type(section))}
            out[s.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Every ``section.key`` a config may set."""
        return [
            f"{s.name}.{f.name}" for s in dataclasses.fields(cls) for f in _section_fields(s.default_factory)
        ]

    @classmethod
    def describe_keys(cls) -> str:
        """Every ``--section.key`` with its type, default and meaning (for ``--help``)."""
        lines = []
        for section in dataclasses.fields(cls):
            section_cls = section.default_factory
            lines.append(f"{section.name}:")
            hints = typing.get_type_hints(section_cls)
            for f in _section_fields(section_cls):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if "library_default" in f.metadata:
                    shown = f"the method's, else {f.metadata['library_default']!r}"
                else:
                    shown = repr(default)
                kind = _type_name(hints[f.name])
                lines.append(f"  --{section.name}.{f.name} {kind} (default: {shown})")
                lines.append(f"      {f.metadata.get('help', '')}")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from nested ``{section: {key: value}}``; unknown or ill-typed keys raise ``ValueError``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        run_values = values.get("run")
        plugins = run_values.get("plugins") if isinstance(run_values, Mapping) else None
        # plugins register methods, distributions and schedules: before any of those names is checked
        load_plugins(_check_type("run.plugins", plugins or [], list[str]))
        unknown = [k for k in values if k not in sections]
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; valid sections: {list(sections)}")
        built = {}
        for name, section_field in sections.items():
            section_cls = section_field.default_factory
            given = values.get(name) or {}
            if not isinstance(given, Mapping):
                raise ValueError(f"{source}: section {name!r} must be a mapping, got {given!r}")
            known = {f.name: f for f in _section_fields(section_cls)}
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


def _section_fields(section_cls: type) -> list[dataclasses.Field]:
    """The config keys of a section: its dataclass fields, less those the recipe derives."""
    derived = getattr(section_cls, "derived", ())
    return [f for f in dataclasses.fields(section_cls) if f.name not in derived]


def _type_name(annotation: Any) -> str:
    """``int | None`` -> ``INT|null``, ``list[float]`` -> ``[FLOAT, ...]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"[{_type_name(typing.get_args(annotation)[0])}, ...]"
    if origin is dict:
        return "{KEY: VALUE}"
    if annotation is Any:
        return "VALUE"
    return getattr(annotation, "__name__", str(annotation)).upper()


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
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        if isinstance(value, Sequence) and not isinstance(value, str):
            return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
        raise ValueError(f"{key} must be a list, got {value!r}")
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
        out.setdefault(section, {})[name] = _parse_yaml(raw, f"--{key}") if raw != "" else None
    return out


def _parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (which never runs code) with its errors as a ``ValueError`` naming ``source``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML (plain values only, no tags): {err}") from None


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
        source = str(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {source!r} cannot be read: {err}") from None
        loaded = _parse_yaml(text, f"config file {source!r}")
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ValueError(
                f"config file {source!r}: expected a mapping of sections (model, data, ...), "
                f"got a {type(loaded).__name__}"
            )
        values = dict(loaded or {})
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
        "run.num_threads",
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
