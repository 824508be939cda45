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

The modules, one job each: ``format`` (file names, header keys, bit packing, hashes, ``SparseState``),
``schema`` (metadata types), ``architecture`` (timm name, model rebuilding, the rebuilder registry),
``card`` (model card), ``write`` (atomic folder writing), ``save`` (``save_sparse``), ``hub`` (Hub
download), ``verify`` (cross-checks between the files), ``load`` (``load_sparse``), ``export``
(``export_checkpoint``). This package imports neither the package root nor ``itop_timm.structured``
(the rebuilder registry imports ``itop_timm.structured.compacted`` when a compacted checkpoint is loaded).
"""

from ..serialization import CheckpointError
from .architecture import ARCHITECTURE_ATTR, ARCHITECTURE_REBUILDERS, register_architecture_rebuilder
from .export import export_checkpoint
from .format import (
    CARD_FILE,
    COMPACT_WEIGHTS_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    SparseState,
    config_sha256,
    pack_mask,
    unpack_mask,
)
from .load import load_sparse, read_sparse_metadata, resolve_checkpoint_dir
from .save import nonfinite_counts, save_sparse

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
    "FORMAT",
    "FORMAT_VERSION",
    "ARCHITECTURE_ATTR",
    "ARCHITECTURE_REBUILDERS",
    "register_architecture_rebuilder",
    "config_sha256",
    "nonfinite_counts",
]
