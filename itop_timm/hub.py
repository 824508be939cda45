"""Publishing sparse checkpoints on the Hugging Face Hub (``huggingface_hub.HfApi``).

Downloads go through :func:`itop_timm.load_sparse` (``hf-hub:org/name``: ``snapshot_download`` with
its cache, so ``HF_HUB_OFFLINE=1`` works from the cache). ``HF_ENDPOINT`` selects another Hub server.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CARD_FILE, COMPACT_WEIGHTS_FILE, WEIGHTS_FILE, load_sparse, save_sparse
from .serialization import CheckpointError
from .sparsifier import Sparsifier
from .validation import short_repr

__all__ = ["HubError", "push_to_hub"]

_logger = logging.getLogger(__name__)


class HubError(ConnectionError):
    """The Hugging Face Hub refused or could not be reached (offline mode, no network, HTTP errors)."""


def push_to_hub(
    directory_or_model: str | os.PathLike | nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    sparsifier: Sparsifier | Mapping[str, torch.Tensor] | None = None,
    commit_message: str = "Upload sparse model (itop_timm)",
    revision: str | None = None,
    save_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """Upload a sparse checkpoint folder (or a model + its sparsifier, saved first) to ``repo_id``.

    The folder is verified with :func:`itop_timm.load_sparse` before anything is sent, so a corrupted
    or inconsistent checkpoint is never published. Creates the repo if needed
    (``HfApi.create_repo(exist_ok=True)``) and uploads every file in one commit (``HfApi.create_commit``).

    Returns the URL of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="itop_timm_push_") as tmp:
        if isinstance(directory_or_model, nn.Module):
            folder = save_sparse(
                directory_or_model, sparsifier, Path(tmp) / "model", **dict(save_kwargs or {})
            )
        else:
            if sparsifier is not None:
                raise ValueError("pass sparsifier= only together with a model, not with a folder")
            folder = Path(directory_or_model)
        if not ((folder / WEIGHTS_FILE).exists() or (folder / COMPACT_WEIGHTS_FILE).exists()):
            raise ValueError(
                f"{folder} is not a sparse checkpoint folder (no {WEIGHTS_FILE}); create it with save_sparse"
            )
        # verify and upload one private copy, so a save into `folder` meanwhile cannot slip through unchecked
        snapshot = Path(tmp) / "verified"
        shutil.copytree(folder, snapshot)
        try:
            _, masks, meta = load_sparse(snapshot)
        except CheckpointError as err:  # name the user's folder, not the private copy
            raise CheckpointError(str(err).replace(str(snapshot), str(folder))) from None
        operations = []
        for path in sorted(p for p in snapshot.iterdir() if p.is_file()):
            content: str | bytes = str(path)
            if path.name == CARD_FILE:  # the card's load snippets name the repo
                content = path.read_text().replace(f"<user>/{meta['architecture']}-sparse", repo_id).encode()
            operations.append(CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=content))
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(
                repo_id=repo_id,
                repo_type="model",
                operations=operations,
                commit_message=commit_message,
                revision=revision,
            )
        except Exception as err:  # offline mode (an OSError), HTTP errors, and the HTTP client's own
            # transport errors (httpx's are no OSErrors): only these two calls, and the cause is chained
            raise HubError(
                f"cannot push to the Hugging Face Hub repo {repo_id!r} ({type(err).__name__}: "
                f"{short_repr(str(err), 300)}); nothing was published"
            ) from err
    _logger.info("pushed %s (%d sparse tensors) to %s", folder, len(masks), repo_id)
    return str(getattr(info, "commit_url", info))
