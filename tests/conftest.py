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
def tiny_data(tmp_path_factory) -> str:
    """A tiny image data set on disk (64 train, 32 test) for the recipe tests of one module."""
    from helpers import make_disk_dataset

    return make_disk_dataset(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)


@pytest.fixture
def fresh_accelerate_state():
    """Reset Accelerate's process-wide state after a test that built an Accelerator."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A saved sparse checkpoint (dense and compact storage), its files and the reference state
    (see ``helpers.save_reference_checkpoints``)."""
    from helpers import save_reference_checkpoints

    return save_reference_checkpoints(tmp_path_factory.mktemp("saved"))
