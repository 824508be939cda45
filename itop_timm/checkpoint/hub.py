"""Downloading a checkpoint folder from the Hugging Face Hub (``hf-hub:org/name[@revision]``).

``huggingface_hub.snapshot_download`` fetches the folder's files into its cache (so ``HF_HUB_OFFLINE=1``
works from the cache; ``HF_ENDPOINT`` selects another Hub server). Uploading is ``itop_timm.hub``.
"""

from __future__ import annotations

from pathlib import Path

from ..serialization import CheckpointError
from .format import CHECKPOINT_FILES

__all__ = ["HUB_PREFIXES", "is_hub_id", "download_checkpoint"]

#: how a checkpoint on the Hub is named (timm's spelling, and its underscore variant)
HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def is_hub_id(path_or_hub_id: str) -> bool:
    """Whether ``path_or_hub_id`` names a Hub repo (``hf-hub:org/name[@revision]``) rather than a folder."""
    return path_or_hub_id.startswith(HUB_PREFIXES)


def download_checkpoint(hub_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``hf-hub:org/name[@revision]`` (an ``@revision`` applies when
    ``revision`` is ``None``); any failure to fetch it raises :class:`CheckpointError`."""
    from huggingface_hub import snapshot_download

    repo = hub_id.split(":", 1)[1]
    if "@" in repo and revision is None:
        repo, revision = repo.split("@", 1)
    try:
        local = snapshot_download(repo_id=repo, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    except Exception as err:  # offline without cache, missing repo, network...
        raise CheckpointError(
            f"cannot fetch {hub_id!r} from the Hugging Face Hub or its cache: {type(err).__name__}: {err}"
        ) from err
    return Path(local)
