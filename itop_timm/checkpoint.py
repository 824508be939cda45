"""Sparse checkpoints: a Hub-ready folder that plain timm loads and itop_timm verifies.

``save_sparse`` writes, atomically (built in a temporary sibling folder, then renamed):

* ``model.safetensors`` — every tensor of the model, dense, with exact (+0.0) zeros off-mask; plain
  timm loads it (``timm.create_model("local-dir:<folder>", pretrained=True)``, ``"hf-hub:<repo>"``);
* or, with ``compact=True``, ``model.compact.safetensors`` — each sparse weight as its nonzero-position
  values only (the positions are the mask, stored once in ``sparsity.safetensors``); for
  ``load_sparse``, not for plain timm;
* ``sparsity.safetensors`` — bit-packed masks and union (R_s) masks, and in its header a JSON record:
  method, target and realised density, per-layer densities, R_s, step, versions, the timm
  architecture and its arguments, and a SHA-256 of every model tensor;
* ``config.json`` — timm's Hub config (written by timm's ``save_config_for_hf``);
* ``README.md`` — a model card.

``load_sparse`` reads only safetensors and JSON, and checks that names, shapes, dtypes, hashes,
masks (nonzeros only where a mask allows), counts and densities all agree before returning the model;
any defect raises :class:`CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from .distributed import full_state_dict, full_tensor, is_main_rank, is_sharded
from .masks import validate_masks
from .registry import Registry
from .serialization import (
    MAX_JSON_DEPTH,
    CheckpointError,
    atomic_directory,
    json_depth_exceeds,
    parse_json,
    read_json_file,
    read_safetensors,
)
from .sparsifier import Sparsifier, unwrap_model

__all__ = [
    "save_sparse",
    "load_sparse",
    "export_checkpoint",
    "SparseState",
    "read_sparse_metadata",
    "resolve_checkpoint_dir",
    "pack_mask",
    "unpack_mask",
    "CheckpointError",
    "WEIGHTS_FILE",
    "COMPACT_WEIGHTS_FILE",
    "SPARSITY_FILE",
    "CONFIG_FILE",
    "CARD_FILE",
    "ARCHITECTURE_ATTR",
    "register_architecture_rebuilder",
    "config_sha256",
    "nonfinite_counts",
]

_logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
COMPACT_WEIGHTS_FILE = "model.compact.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "itop_timm.sparse"
FORMAT_VERSION = 1
_META_KEY = "itop_timm"
_LINK_KEY = "itop_timm.sparsity_sha256"
_MASK = "masks/"
_UNION = "ever_active/"

# --------------------------------------------------------------------- the extension point
#: The checkpoint format's one extension point for architectures that are not timm's own (a compacted
#: model): a model carrying ``model.itop_timm_pruning_history`` (set by ``itop_timm.structured.compact``)
#: has that JSON record saved under the metadata key ``"structured"``; ``load_sparse`` builds timm's
#: architecture from ``config.json`` and hands it, with the record, to the function registered under
#: that key (``itop_timm.structured`` registers ``rebuild_compacted``). The format knows nothing else
#: about structure, and ``structured/`` imports this module, never the other way round.
ARCHITECTURE_ATTR = "itop_timm_pruning_history"
_ARCHITECTURE_KEY = "structured"
ARCHITECTURE_REBUILDERS: Registry[Callable[[nn.Module, Mapping[str, Any]], nn.Module]] = Registry(
    "architecture rebuilder"
)


def register_architecture_rebuilder(
    rebuild: Callable[[nn.Module, Mapping[str, Any]], nn.Module], *, overwrite: bool = False
) -> None:
    """Register ``rebuild(model, record) -> model``, which gives a freshly built timm model the
    architecture recorded in ``model.itop_timm_pruning_history`` (raising ``ValueError`` when the
    record does not fit)."""
    ARCHITECTURE_REBUILDERS.register(_ARCHITECTURE_KEY, rebuild, overwrite=overwrite)


# ----------------------------------------------------------------------------- bit packing
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (big-endian bit order, row-major)."""
    flat = mask.detach().reshape(-1).to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 7) // 8:
        raise CheckpointError(
            f"packed mask has {packed.numel()} bytes of {packed.dtype}, expected {(numel + 7) // 8} uint8 for shape {shape}"
        )
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


def _sha256(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


# ----------------------------------------------------------------------------- save
def _architecture(model: nn.Module, model_name: str | None) -> str:
    name = model_name or getattr(model, "pretrained_cfg", {}).get("architecture")
    if not name:
        raise ValueError("cannot tell the timm architecture of this model: pass model_name=")
    import timm

    name = name.split(":")[-1].split(".")[0] if not timm.is_model(name) else name
    if not timm.is_model(name):
        raise ValueError(f"model_name {name!r} is not a timm architecture")
    return name


@dataclass(frozen=True)
class SparseState:
    """Masks plus what is known about how they were trained (what :func:`load_sparse` returns can be
    saved again through this, e.g. to export a checkpoint dense or compact)."""

    masks: Mapping[str, torch.Tensor]
    ever_active: Mapping[str, torch.Tensor] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


_INFO_KEYS = (
    "method",
    "target_density",
    "itop_rate",
    "step",
    "distribution",
    "sparsity_config",
    "target_layer_densities",
)


def _collect_masks(
    model: nn.Module, source: Sparsifier | SparseState | Mapping[str, torch.Tensor] | None
) -> tuple[dict, dict | None, dict]:
    """(masks, union or None, info) with masks validated against the model's parameters."""
    if source is None:
        return {}, None, {"method": "dense"}
    if isinstance(source, Sparsifier):
        info = {
            "method": source.method.name,
            "target_density": source.config.density,
            "itop_rate": source.itop_rate,
            "step": source.step,
            "distribution": source.config.distribution,
            "sparsity_config": source.config.to_dict(),
            "target_layer_densities": dict(source.target_densities),
        }
        # full masks (a sharded run gathers them: every rank calls save_sparse)
        masks = {name: full_tensor(m) for name, m in source.masks.items()}
        union = {name: full_tensor(m) for name, m in source.ever_active.items()}
    elif isinstance(source, SparseState):
        masks = dict(source.masks)
        union = dict(source.ever_active) if source.ever_active is not None else None
        info = {"method": "masks", **{k: v for k, v in source.info.items() if k in _INFO_KEYS}}
    elif isinstance(source, Mapping):
        masks, union, info = dict(source), None, {"method": "masks"}
    else:
        raise ValueError(
            f"sparsifier_or_masks must be a Sparsifier, a mapping name -> bool mask or None, got {type(source).__name__}"
        )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    masks = validate_masks(masks, shapes, complete=False)
    if union is not None:
        union = validate_masks(union, {n: shapes[n] for n in masks}, what="union masks")
    return masks, union, info


def _card_metadata(meta: Mapping[str, Any], repo_hint: str) -> dict[str, Any]:
    """The card's YAML front matter, following the Hub's model-card conventions (``datasets``,
    ``metrics``, ``model-index``), with nothing but what produced these weights."""
    card: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "sparse", "itop_timm", f"itop_timm-{meta['method']}"],
    }
    dataset = meta.get("dataset")
    hub_dataset = dataset if isinstance(dataset, str) and dataset.count("/") == 1 else None
    if hub_dataset:
        card["datasets"] = [hub_dataset]
    accuracy = {k: v for k, v in (meta.get("metrics") or {}).items() if "top1" in k and _is_number(v)}
    if accuracy:
        card["metrics"] = ["accuracy"]
    if accuracy and dataset:
        card["model-index"] = [
            {
                "name": repo_hint.split("/")[-1],
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset, "type": hub_dataset or dataset},
                        "metrics": [
                            {"type": "accuracy", "name": name, "value": float(value)}
                            for name, value in accuracy.items()
                        ],
                    }
                ],
            }
        ]
    return card


def _model_card(meta: Mapping[str, Any], repo_hint: str, compact: bool) -> str:
    import yaml

    arch = meta["architecture"]
    lines = [
        "---",
        yaml.safe_dump(_card_metadata(meta, repo_hint), sort_keys=False).rstrip("\n"),
        "---",
        f"# {arch} — sparse ({meta['method']})",
        "",
    ]
    if meta["method"] == "dense":
        lines.append("Dense model saved with itop_timm.")
    else:
        lines += [
            f"Trained sparse with itop_timm (method `{meta['method']}`): "
            f"**density {meta['density']:.4f}** ({100 * (1 - meta['density']):.2f} % of conv/linear weights are zero)"
            + (
                f", In-Time Over-Parameterization rate **R_s = {meta['itop_rate']:.4f}**"
                if meta.get("itop_rate") is not None
                else ""
            )
            + (f" after {meta['step']} optimizer steps." if meta.get("step") is not None else "."),
        ]
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in meta["metrics"].items()
        ]
    lines += ["", "## Training", ""]
    lines += [
        f"- data set: {meta.get('dataset') or 'not recorded'}",
        f"- method: `{meta['method']}`",
        f"- itop_timm {meta.get('itop_timm_version')}, timm {meta.get('timm_version')}",
    ]
    if meta.get("training_config"):
        import yaml

        lines += [
            "",
            "Recipe config:",
            "",
            "```yaml",
            yaml.safe_dump(dict(meta["training_config"]), sort_keys=False).rstrip("\n"),
            "```",
        ]
    if meta["tensors"]:
        lines += ["", "## Per-layer sparsity", "", "| tensor | shape | density | R_s |", "|---|---|---|---|"]
        for name, t in meta["tensors"].items():
            rs = f"{t['itop_rate']:.4f}" if t.get("itop_rate") is not None else "–"
            lines.append(f"| `{name}` | {tuple(t['shape'])} | {t['density']:.4f} | {rs} |")
    load_timm = (
        "Plain timm reads `model.safetensors` (dense tensors with exact zeros):\n\n"
        "```python\nimport timm\n"
        f'model = timm.create_model("hf-hub:{repo_hint}", pretrained=True)      # from the Hub\n'
        'model = timm.create_model("local-dir:path/to/folder", pretrained=True)  # from a local copy\n```'
    )
    if compact:
        load_timm = (
            "This is a *compact* export (`model.compact.safetensors`: nonzero values + bit masks); "
            "load it with itop_timm, or `itop-timm export --dense` it for plain timm."
        )
    lines += [
        "",
        "## How to load",
        "",
        load_timm,
        "",
        "With itop_timm (verifies masks, hashes and densities; gives the masks to continue sparse training):",
        "",
        "```python\nimport itop_timm\n"
        f'model, masks, meta = itop_timm.load_sparse("hf-hub:{repo_hint}")\n'
        "# continue training sparse from these masks:\n"
        "# sp = itop_timm.sparsify(model, optimizer, masks=masks, total_steps=...)\n```",
        "",
    ]
    return "\n".join(lines)


def save_sparse(
    model: nn.Module,
    sparsifier_or_masks: Sparsifier | SparseState | Mapping[str, torch.Tensor] | None,
    directory: str | os.PathLike,
    *,
    model_name: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    compact: bool = False,
    include_union: bool = True,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    label_names: list[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sparse checkpoint folder (see the module docstring); returns its path.

    Args:
        model: the (timm) model; DDP / compile wrappers are unwrapped. A sharded (FSDP2) model: call
            ``save_sparse`` on every rank; the tensors are gathered and rank 0 writes the same folder as
            an unsharded run (the other ranks return once it is complete).
        sparsifier_or_masks: a :class:`Sparsifier` (masks, union, method, R_s...), a :class:`SparseState`,
            a ``{name: bool mask}`` mapping, or ``None`` for a dense model.
        directory: target folder; an existing checkpoint there is replaced only once the new one is complete.
        model_name: timm architecture name (default: ``model.pretrained_cfg["architecture"]``).
        extra_metadata: JSON-able values stored under ``"extra"`` in the sparsity metadata.
        compact: store sparse weights as nonzero values + the bit mask (``model.compact.safetensors``).
        include_union: store the union (R_s) masks (training state; an inference export may leave them out).
        metrics: e.g. ``{"test_top1": 91.2}`` for the model card and metadata.
        dataset: the data set the weights were trained on; a Hugging Face Hub id (``org/name``) is
            also listed in the model card's ``datasets:`` metadata.
        label_names: class names, stored in ``config.json`` as timm does.
        data_config: the preprocessing the model was trained with (``input_size``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``), stored in ``config.json``'s ``pretrained_cfg``.
        training_config: the recipe's config that produced the weights (JSON-able), recorded in the
            metadata and the model card.

    ``config.json`` keeps only what builds and preprocesses the model: timm's provenance of its own
    pretrained weights (tag, licence, paper, origin) is not copied into it. The model must hold one
    floating dtype (``ValueError`` otherwise); ``load_sparse`` rebuilds it in that dtype. NaN/Inf
    weights are saved as they are, with a warning (``metadata["nonfinite"]`` counts them).
    """
    import itop_timm

    model = unwrap_model(model)
    arch = _architecture(model, model_name)
    masks, union, info = _collect_masks(model, sparsifier_or_masks)
    try:
        json.dumps(dict(extra_metadata or {}))
        json.dumps(dict(metrics or {}))
        json.dumps(dict(training_config or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"extra_metadata, metrics and training_config must be JSON-serialisable ({err})"
        ) from err

    state = full_state_dict(model)  # sharded tensors gathered, one at a time
    _check_one_float_dtype(state)
    dense: dict[str, torch.Tensor] = {}
    zeroed = 0
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if name in masks:
            mask = masks[name].to("cpu")
            zeroed += int((t[~mask] != 0).sum())
            t = torch.where(mask, t, torch.zeros((), dtype=t.dtype))  # +0.0 everywhere off-mask
        dense[name] = t.contiguous().clone()
    if zeroed:
        _logger.warning("save_sparse: %d weights outside the masks were nonzero; saved as 0", zeroed)
    nonfinite = nonfinite_counts(dense)
    if nonfinite:
        _logger.warning(
            "save_sparse: %d NaN/Inf values in %d tensor(s) (first: %s); saved as they are",
            sum(nonfinite.values()),
            len(nonfinite),
            next(iter(nonfinite)),
        )

    tensors_meta: dict[str, Any] = {}
    for name, mask in masks.items():
        active = int(mask.sum())
        entry = {"shape": list(mask.shape), "active": active, "density": active / mask.numel()}
        if union is not None:
            entry["itop_rate"] = int(union[name].sum()) / mask.numel()
        tensors_meta[name] = entry
    total = sum(m.numel() for m in masks.values())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "itop_timm_version": itop_timm.__version__,
        "timm_version": __import__("timm").__version__,
        "architecture": arch,
        "num_classes": getattr(model, "num_classes", None),
        **info,
        "density": (sum(e["active"] for e in tensors_meta.values()) / total) if total else 1.0,
        "compact": bool(compact),
        "has_union": union is not None and include_union,
        "tensors": tensors_meta,
        "sha256": {name: _sha256(t) for name, t in dense.items()},
        "dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in dense.items()},
        "shapes": {name: list(t.shape) for name, t in dense.items()},
        "metrics": dict(metrics or {}),
        "dataset": dataset,
        "extra": dict(extra_metadata or {}),
        "training_config": dict(training_config) if training_config is not None else None,
        "nonfinite": nonfinite,
    }
    history = getattr(model, ARCHITECTURE_ATTR, None)
    if history is not None:
        meta[_ARCHITECTURE_KEY] = history
    if json_depth_exceeds(meta, MAX_JSON_DEPTH - 1):
        raise ValueError(
            f"extra_metadata / training_config nest too deeply: checkpoints hold at most {MAX_JSON_DEPTH} levels"
        )

    directory = Path(directory)
    if not is_sharded(model):
        _write_folder(directory, model, dense, masks, union, meta, compact, label_names, data_config)
    else:  # every rank is here: rank 0 writes, the others wait until it is done
        try:
            if is_main_rank():
                _write_folder(directory, model, dense, masks, union, meta, compact, label_names, data_config)
        finally:
            torch.distributed.barrier()
    _logger.info(
        "saved sparse checkpoint (%s, density %.4f) to %s", meta["method"], meta["density"], directory
    )
    return directory


def _write_folder(
    directory: Path,
    model: nn.Module,
    dense: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    union: Mapping[str, torch.Tensor] | None,
    meta: dict[str, Any],
    compact: bool,
    label_names: list[str] | None,
    data_config: Mapping[str, Any] | None,
) -> None:
    """Write the checkpoint folder atomically from gathered (full, CPU) tensors."""
    from timm.models._hub import save_config_for_hf

    _recover_interrupted_save(directory)
    with atomic_directory(directory) as tmp:
        # timm writes config.json (architecture, num_classes, model_args, pretrained_cfg); the weights
        # are the masked copy (exact +0.0 off-mask) or the compact form
        save_config_for_hf(
            model,
            str(tmp / CONFIG_FILE),
            model_config={"label_names": list(label_names)} if label_names else None,
            data_config=dict(data_config) if data_config else None,
        )
        meta["config_sha256"] = config_sha256(_write_own_config(tmp / CONFIG_FILE))
        # always written, dense models too: it holds the hashes of every tensor and of config.json
        sparsity: dict[str, torch.Tensor] = {f"{_MASK}{n}": pack_mask(m) for n, m in masks.items()}
        if meta["has_union"]:
            sparsity |= {f"{_UNION}{n}": pack_mask(union[n]) for n in masks}
        meta["sparsity_sha256"] = {k: _sha256(v) for k, v in sparsity.items()}
        sparsity_blob = safetensors_save(sparsity, metadata={_META_KEY: json.dumps(meta)})
        (tmp / SPARSITY_FILE).write_bytes(sparsity_blob)
        # the weights file names its companion sparsity file by hash, so a lost or swapped one is detected
        # (a single metadata key: safetensors writes several in no fixed order, and saves should be
        # byte-for-byte reproducible)
        header = {_LINK_KEY: hashlib.sha256(sparsity_blob).hexdigest()}
        if compact:
            packed = {name: (t[masks[name].to("cpu")] if name in masks else t) for name, t in dense.items()}
            (tmp / COMPACT_WEIGHTS_FILE).write_bytes(safetensors_save(packed, metadata=header))
        else:
            (tmp / WEIGHTS_FILE).write_bytes(safetensors_save(dense, metadata=header))
        (tmp / CARD_FILE).write_text(_model_card(meta, f"<user>/{meta['architecture']}-sparse", compact))


#: ``pretrained_cfg`` keys that describe how to build and preprocess the model; the others (tag,
#: hf_hub_id, license, paper_ids, origin_url, test-time sizes of timm's ImageNet weights...) describe
#: weights this checkpoint does not hold, so they are not copied.
_OWN_PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "min_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
    "label_offset",
)


def _write_own_config(path: Path) -> dict[str, Any]:
    """Rewrite timm's ``config.json`` without the borrowed provenance of timm's pretrained weights."""
    config = json.loads(path.read_text())
    cfg = config.get("pretrained_cfg") or {}
    config["pretrained_cfg"] = {k: cfg[k] for k in _OWN_PRETRAINED_CFG_KEYS if k in cfg}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def _check_one_float_dtype(state: Mapping[str, torch.Tensor]) -> None:
    """A checkpoint holds one floating dtype (``load_sparse`` rebuilds the model in it)."""
    dtypes = sorted({str(t.dtype) for t in state.values() if t.is_floating_point()})
    if len(dtypes) > 1:
        raise ValueError(
            f"save_sparse: the model mixes floating dtypes {dtypes}; cast it to one first "
            "(e.g. model.float() or model.to(torch.bfloat16)) so the checkpoint loads back"
        )


def nonfinite_counts(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: number of NaN/Inf values}`` for every floating tensor that has any."""
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if t.is_floating_point()}
    return {name: n for name, n in counts.items() if n}


def _recover_interrupted_save(directory: Path) -> Path:
    """If a save was interrupted between its two renames, put the previous checkpoint back."""
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():
        os.replace(old, directory)
        _logger.warning("restored %s from an interrupted save", directory)
    return directory


# ----------------------------------------------------------------------------- load
def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for ``path_or_hub_id`` (``hf-hub:org/name[@rev]`` is fetched through huggingface_hub's cache)."""
    text = str(path_or_hub_id)
    if text.startswith(("hf-hub:", "hf_hub:")):
        from huggingface_hub import snapshot_download

        repo = text.split(":", 1)[1]
        if "@" in repo and revision is None:
            repo, revision = repo.split("@", 1)
        try:
            local = snapshot_download(
                repo_id=repo,
                revision=revision,
                allow_patterns=[WEIGHTS_FILE, COMPACT_WEIGHTS_FILE, SPARSITY_FILE, CONFIG_FILE, CARD_FILE],
            )
        except Exception as err:  # offline without cache, missing repo, network...
            raise CheckpointError(
                f"cannot fetch {text!r} from the Hugging Face Hub or its cache: {type(err).__name__}: {err}"
            ) from err
        return Path(local)
    folder = _recover_interrupted_save(Path(text))
    if not folder.is_dir():
        raise CheckpointError(f"{text}: no such checkpoint folder (or use hf-hub:<org>/<name>)")
    return folder


def read_sparse_metadata(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sparsity metadata and the raw (packed) tensors of ``sparsity.safetensors``, integrity-checked."""
    path = Path(folder) / SPARSITY_FILE
    tensors, header = read_safetensors(path)
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: no itop_timm metadata in the header")
    meta = parse_json(header[_META_KEY], path, "metadata JSON")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an itop_timm sparse checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {_short(meta.get('format_version'))}, this itop_timm reads {FORMAT_VERSION}"
        )
    expected = meta.get("sparsity_sha256")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise CheckpointError(
            f"{path}: tensors {sorted(set(tensors) ^ set(expected if isinstance(expected, dict) else {}))[:5]} "
            "do not match the recorded list"
        )
    for key, tensor in tensors.items():
        if _sha256(tensor) != expected[key]:
            raise CheckpointError(f"{path}: tensor {key!r} is corrupted (checksum mismatch)")
    return meta, tensors


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (hostile metadata can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_optional_number(value: Any) -> bool:
    return value is None or _is_number(value)


def _is_str_map(value: Any, check: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(s) and s >= 0 for s in value)


def _is_tensor_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and _is_shape(entry.get("shape"))
        and _is_int(entry.get("active"))
        and _is_number(entry.get("density"))
        and _is_optional_number(entry.get("itop_rate"))
    )


#: metadata key -> (required, type check); every value load_sparse, the card or ``info`` reads
_META_SCHEMA: dict[str, tuple[bool, Any]] = {
    "architecture": (True, lambda v: isinstance(v, str)),
    "method": (True, lambda v: isinstance(v, str)),
    "density": (True, _is_number),
    "compact": (True, lambda v: isinstance(v, bool)),
    "has_union": (True, lambda v: isinstance(v, bool)),
    "tensors": (True, lambda v: _is_str_map(v, _is_tensor_entry)),
    "sha256": (True, lambda v: _is_str_map(v, lambda h: isinstance(h, str))),
    "dtypes": (True, lambda v: _is_str_map(v, lambda d: isinstance(d, str))),
    "shapes": (True, lambda v: _is_str_map(v, _is_shape)),
    "num_classes": (False, lambda v: v is None or _is_int(v)),
    "step": (False, lambda v: v is None or _is_int(v)),
    "itop_rate": (False, _is_optional_number),
    "target_density": (False, _is_optional_number),
    "metrics": (False, lambda v: _is_str_map(v, lambda m: m is None or isinstance(m, (str, int, float)))),
    "dataset": (False, lambda v: v is None or isinstance(v, str)),
    "extra": (False, lambda v: isinstance(v, dict)),
    "config_sha256": (False, lambda v: isinstance(v, str)),
    "nonfinite": (False, lambda v: _is_str_map(v, _is_int)),
    "training_config": (False, lambda v: v is None or isinstance(v, dict)),
    _ARCHITECTURE_KEY: (False, lambda v: isinstance(v, dict)),  # its rebuilder checks the rest
}


def _check_meta_types(meta: Mapping[str, Any], path: Path) -> None:
    """Every metadata value that is read must have its documented type (else :class:`CheckpointError`)."""
    for key, (required, check) in _META_SCHEMA.items():
        if key not in meta:
            if required:
                raise CheckpointError(f"{path}: invalid metadata: {key!r} is missing")
        elif not check(meta[key]):
            raise CheckpointError(f"{path}: invalid metadata: {key!r} = {_short(meta[key])}")


def config_sha256(config: Any) -> str:
    """SHA-256 of ``config.json``'s content in canonical JSON form (key order and layout do not count)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """``config.json`` parsed, and its architecture name."""
    path = folder / CONFIG_FILE
    config = read_json_file(path, "timm config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: unreadable timm config (a JSON object is expected)")
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: 'architecture' must be a string, got {_short(arch)}")
    return config, arch


def _read_metadata(folder: Path, arch: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(metadata, packed mask tensors, whether ``sparsity.safetensors`` exists), types checked."""
    if (folder / SPARSITY_FILE).exists():
        meta, raw = read_sparse_metadata(folder)
        _check_meta_types(meta, folder / SPARSITY_FILE)
        return meta, raw, True
    if (folder / COMPACT_WEIGHTS_FILE).exists():
        raise CheckpointError(f"{folder / SPARSITY_FILE}: missing (a compact checkpoint needs its masks)")
    # a dense checkpoint of an older itop_timm, or a plain timm folder: nothing to verify against
    return {"method": "dense", "compact": False, "tensors": {}, "architecture": arch}, {}, False


def _weights_path(folder: Path, meta: Mapping[str, Any]) -> Path:
    """The weights file the metadata names; a folder holding the other kind is a mismatched pair."""
    compact = bool(meta.get("compact"))
    path = folder / (COMPACT_WEIGHTS_FILE if compact else WEIGHTS_FILE)
    other = folder / (WEIGHTS_FILE if compact else COMPACT_WEIGHTS_FILE)
    if not path.exists() and other.exists():
        raise CheckpointError(
            f"{folder / SPARSITY_FILE}: records a {'compact' if compact else 'dense'} checkpoint, but the folder "
            f"holds {other.name}: the two files do not belong together"
        )
    return path


def _check_link(folder: Path, weights_path: Path, header: Mapping[str, str], has_sparsity: bool) -> None:
    """The weights file names its sparsity file by hash: a lost, swapped or edited one is an error."""
    link = header.get(_LINK_KEY)  # absent: a weights file not written by itop_timm (plain timm)
    if link == "none" and has_sparsity:
        raise CheckpointError(f"{weights_path}: saved as a dense checkpoint, but {SPARSITY_FILE} is present")
    if link is not None and link != "none":
        if not has_sparsity:
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: missing (its weights file {weights_path.name} refers to it)"
            )
        if hashlib.sha256((folder / SPARSITY_FILE).read_bytes()).hexdigest() != link:
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: does not belong to {weights_path.name} (hash mismatch)"
            )


def _check_config(folder: Path, config: Mapping[str, Any], arch: str, meta: Mapping[str, Any]) -> None:
    """``config.json`` decides the architecture timm builds: it must be the one that was saved."""
    path = folder / CONFIG_FILE
    if meta["architecture"] != arch:
        raise CheckpointError(
            f"{path}: architecture {arch!r} disagrees with {SPARSITY_FILE} ({meta['architecture']!r})"
        )
    classes = config.get("num_classes")
    if meta.get("num_classes") is not None and classes != meta["num_classes"]:
        raise CheckpointError(
            f"{path}: num_classes {_short(classes)} disagrees with {SPARSITY_FILE} ({meta['num_classes']})"
        )
    recorded = meta.get("config_sha256")
    if recorded is None:
        _logger.warning("%s: saved by an older itop_timm, its model_args are not verified", path)
    elif config_sha256(config) != recorded:
        raise CheckpointError(
            f"{path}: differs from the config saved with this checkpoint (checksum mismatch in "
            f"{SPARSITY_FILE}); it decides the architecture (model_args), so it must not be edited"
        )


def _read_masks(
    path: Path, meta: Mapping[str, Any], raw: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unpack masks (and union masks) and check them against the recorded counts and densities."""
    masks: dict[str, torch.Tensor] = {}
    union: dict[str, torch.Tensor] = {}
    for name, entry in meta["tensors"].items():
        key = f"{_MASK}{name}"
        if key not in raw:
            raise CheckpointError(f"{path}: mask of {name!r} is missing")
        shape = tuple(entry["shape"])
        try:
            masks[name] = unpack_mask(raw[key], shape)
            if meta["has_union"]:
                union[name] = unpack_mask(raw[f"{_UNION}{name}"], shape)
        except (CheckpointError, KeyError) as err:
            raise CheckpointError(f"{path}: tensor {name!r}: {err}") from err
        active = int(masks[name].sum())
        if active != entry["active"] or not math.isclose(
            active / max(1, masks[name].numel()), entry["density"], rel_tol=1e-9, abs_tol=1e-12
        ):
            raise CheckpointError(
                f"{path}: mask of {name!r} has {active} active weights, metadata records {entry['active']}"
            )
        if union and bool((masks[name] & ~union[name]).any()):
            raise CheckpointError(f"{path}: union mask of {name!r} does not contain its mask")
    if masks:
        total = sum(m.numel() for m in masks.values())
        realised = sum(int(m.sum()) for m in masks.values()) / max(1, total)
        if not math.isclose(realised, meta["density"], rel_tol=1e-9):
            raise CheckpointError(
                f"{path}: realised density {realised} differs from the recorded {meta['density']}"
            )
    return masks, union


def _expand_compact(
    weights_path: Path, stored: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dense tensors from a compact file (each masked tensor holds only its active values)."""
    state = {}
    for name, t in stored.items():
        if name not in masks:
            state[name] = t
            continue
        mask = masks[name]
        if t.ndim != 1 or t.numel() != int(mask.sum()):
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} holds {t.numel()} values, its mask has {int(mask.sum())}"
            )
        full = torch.zeros(mask.shape, dtype=t.dtype)
        full[mask] = t
        state[name] = full
    return state


def _build_model(folder: Path, arch: str, meta: Mapping[str, Any]) -> nn.Module:
    """The architecture exactly as timm builds it from ``config.json`` (plus a recorded compaction)."""
    import timm

    if not timm.is_model(arch):
        raise CheckpointError(f"{folder / CONFIG_FILE}: unknown timm architecture {arch!r}")
    try:
        model = timm.create_model(
            f"local-dir:{folder}", pretrained=False
        )  # timm's own reading of config.json
    except Exception as err:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: timm cannot build {arch!r} from it ({type(err).__name__}: {err})"
        ) from err
    if _ARCHITECTURE_KEY in meta:
        if _ARCHITECTURE_KEY not in ARCHITECTURE_REBUILDERS:
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: holds a compacted architecture; import itop_timm.structured to load it"
            )
        try:
            model = ARCHITECTURE_REBUILDERS.get(_ARCHITECTURE_KEY)(model, meta[_ARCHITECTURE_KEY])
        except Exception as err:  # hostile history: any failure to replay it is a defect of the file
            raise CheckpointError(
                f"{folder / SPARSITY_FILE}: cannot rebuild the compacted architecture ({type(err).__name__}: {err})"
            ) from err
    return model


def _stored_float_dtype(weights_path: Path, state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of the stored tensors (``None`` if there is none)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise CheckpointError(
            f"{weights_path}: tensors mix floating dtypes {sorted(str(d) for d in dtypes)}; a model has one"
        )
    return dtypes.pop() if dtypes else None


def _check_tensors(
    weights_path: Path,
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    has_sparsity: bool,
) -> None:
    """Names, shapes, dtypes, hashes and off-mask zeros of every tensor against the model and metadata."""
    arch = meta["architecture"]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: tensors do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    stray = sorted(set(masks) - set(expected))
    if stray:
        raise CheckpointError(f"{weights_path.parent / SPARSITY_FILE}: masks of unknown tensors {stray[:5]}")
    for name, ref in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {tuple(t.shape)}, {arch} needs {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has dtype {t.dtype}, {arch} needs {ref.dtype}"
            )
        if has_sparsity:
            if meta["shapes"].get(name) != list(t.shape) or meta["dtypes"].get(name) != str(
                t.dtype
            ).removeprefix("torch."):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} disagrees with the shape/dtype recorded in {SPARSITY_FILE}"
                )
            if _sha256(t) != meta["sha256"].get(name):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} is corrupted or from another checkpoint (checksum mismatch)"
                )
        if name in masks:
            if tuple(masks[name].shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{weights_path.parent / SPARSITY_FILE}: mask of {name!r} has shape "
                    f"{tuple(masks[name].shape)}, the tensor {tuple(t.shape)}"
                )
            if bool((t[~masks[name]] != 0).any()):
                raise CheckpointError(
                    f"{weights_path}: tensor {name!r} has nonzeros where its mask is inactive"
                )


def load_sparse(
    path_or_hub_id: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a sparse checkpoint from a folder or ``hf-hub:org/name``.

    Returns ``(model, masks, metadata)``: the timm model (eval mode, on ``device``, in the floating
    dtype it was saved in), the bool masks (``{}`` for a dense checkpoint) and the metadata dict;
    ``metadata["ever_active"]`` holds the union masks when stored. Continue training with
    ``itop_timm.sparsify(model, optimizer, masks=masks, ...)``. Any defect of any file raises
    :class:`CheckpointError` naming it.
    """
    folder = resolve_checkpoint_dir(path_or_hub_id, revision)
    config, arch = _read_config(folder)
    meta, raw, has_sparsity = _read_metadata(folder, arch)
    weights_path = _weights_path(folder, meta)
    stored, weights_header = read_safetensors(weights_path)
    _check_link(folder, weights_path, weights_header, has_sparsity)
    if has_sparsity:
        _check_config(folder, config, arch, meta)
    masks, union = _read_masks(folder / SPARSITY_FILE, meta, raw)
    state = _expand_compact(weights_path, stored, masks) if meta["compact"] else stored
    model = _build_model(folder, arch, meta)
    dtype = _stored_float_dtype(weights_path, state)
    if dtype is not None:
        model.to(dtype)  # timm builds float32; a checkpoint saved in bf16/fp16 loads as such
    _check_tensors(weights_path, model, state, masks, meta, has_sparsity)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    metadata = dict(meta)
    if union:
        metadata["ever_active"] = {n: u.to(device) for n, u in union.items()}
    metadata["path"] = str(folder)
    return model, {n: m.to(device) for n, m in masks.items()}, metadata


def export_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, compact: bool, include_union: bool = True
) -> Path:
    """Verify the checkpoint at ``src`` and write it to ``dst`` dense (plain-timm loadable) or compact."""
    if _same_folder(src, dst):
        raise ValueError(f"export needs a different destination folder than {str(src)!r}, got {str(dst)!r}")
    model, masks, meta = load_sparse(src)
    if _same_folder(meta["path"], dst):
        raise ValueError(
            f"export needs a different destination folder than {meta['path']!r}, got {str(dst)!r}"
        )
    source = SparseState(masks, meta.get("ever_active"), meta) if masks else None
    return save_sparse(
        model,
        source,
        dst,
        model_name=meta["architecture"],
        compact=compact,
        include_union=include_union,
        metrics=meta.get("metrics"),
        extra_metadata=meta.get("extra"),
        dataset=meta.get("dataset"),
        training_config=meta.get("training_config"),
    )


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two spellings name the same folder (trailing slashes, ``..``, symbolic links)."""
    return Path(a).resolve() == Path(b).resolve()
