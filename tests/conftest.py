"""Test set-up: no network, a private Hugging Face cache, deterministic CPU torch."""

from __future__ import annotations

import os
import tempfile

# Must be set before huggingface_hub / datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="itop_timm_hf_home_"))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A saved sparse checkpoint (dense and compact storage), its files and the reference state
    (see ``helpers.save_reference_checkpoints``)."""
    from helpers import save_reference_checkpoints

    return save_reference_checkpoints(tmp_path_factory.mktemp("saved"))
