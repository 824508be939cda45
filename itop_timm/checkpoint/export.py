"""``export_checkpoint``: verify a checkpoint and write it again, dense (plain-timm loadable) or compact."""

from __future__ import annotations

import os
from pathlib import Path

from .format import SparseState
from .load import load_sparse
from .save import save_sparse

__all__ = ["export_checkpoint"]


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
