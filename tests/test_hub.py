"""Hub round trip: push_to_hub against a local fake Hub, load_sparse / timm from a hand-made Hub cache.

Nothing here reaches the real Hugging Face Hub: uploads go to ``tests/hub_server.py`` on 127.0.0.1 and
downloads run with ``HF_HUB_OFFLINE`` from a cache folder written by the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from helpers import train_steps
from hub_server import FakeHub, serve_fake_hub
from huggingface_hub import constants as hf_constants

import itop_timm
from itop_timm.checkpoint import load_sparse, save_sparse
from itop_timm.hub import push_to_hub
from itop_timm.serialization import CheckpointError

REPO = "someone/resnet10t-sparse"
TOKEN = "hf_test_token"
FILES = {"model.safetensors", "sparsity.safetensors", "config.json", "README.md"}
PLACEHOLDER = "<user>/resnet10t-sparse"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: one thread avoids OpenMP oversubscription on a busy machine (seconds per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained():
    """A resnet10t trained 2 RigL steps at density 0.1: (model, sparsifier)."""
    model = timm.create_model("resnet10t", num_classes=10, pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = itop_timm.sparsify(model, optimizer, method="rigl", density=0.1, total_steps=10)
    train_steps(model, optimizer, 2)
    return model.eval(), sp


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The fake Hub, with huggingface_hub online and pointed at it (everything restored afterwards)."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with serve_fake_hub() as hub:
        # huggingface_hub reads these at import time; the client looks them up on the module at call time
        # (is_offline_mode() -> constants.HF_HUB_OFFLINE, HfApi() -> constants.ENDPOINT)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        huggingface_hub.close_session()  # a fresh shared httpx client (reads the proxy settings above)
        try:
            yield hub
        finally:
            huggingface_hub.close_session()  # drop keep-alive connections to this server


def _api_calls(hub: FakeHub) -> list[tuple[str, str]]:
    return [r for r in hub.requests if r[1] != "/api/agent-harnesses"]


def _expected_upload(folder: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    card = files["README.md"].decode()
    assert PLACEHOLDER in card  # what push_to_hub has to replace
    files["README.md"] = card.replace(PLACEHOLDER, REPO).encode()
    return files


def _check_single_upload(hub: FakeHub, url: str) -> dict[str, bytes]:
    assert hub.unknown == []
    assert len(hub.repos_created) == 1
    created = hub.repos_created[0]
    assert (created["organization"], created["name"], created["type"]) == (
        "someone",
        "resnet10t-sparse",
        "model",
    )
    assert created["authorization"] == f"Bearer {TOKEN}"
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit["repo_id"], commit["revision"]) == (REPO, "main")
    assert commit["message"] == "Upload sparse model (itop_timm)"
    assert commit["authorization"] == f"Bearer {TOKEN}"
    assert url == f"{hub.url}/{REPO}/commit/{commit['oid']}"
    # every file went inline in the commit: no LFS / Xet transfer was attempted
    assert _api_calls(hub) == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    return commit["files"]


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    """(parsed JSON header, tensor data bytes) of a safetensors file."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + header_len]), raw[8 + header_len :]


def _flip_byte_in_data(path: Path) -> None:
    """Flip one bit of the byte in the middle of a safetensors file's tensor data (after the header)."""
    raw = bytearray(path.read_bytes())
    _, data = _split_safetensors(bytes(raw))
    assert len(data) > 1000
    raw[len(raw) - len(data) + len(data) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_push_to_hub_uploads_the_verified_folder(trained, fake_hub, tmp_path):
    model, sp = trained
    folder = save_sparse(model, sp, tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} == FILES
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    url = push_to_hub(folder, REPO, private=True, token=TOKEN)

    files = _check_single_upload(fake_hub, url)
    assert fake_hub.repos_created[0]["private"] is True
    assert fake_hub.repos_created[0]["payload"]["visibility"] == "private"
    assert set(files) == FILES
    expected = _expected_upload(folder)
    for name in FILES - {"README.md"}:
        assert files[name] == expected[name], name
    card = files["README.md"].decode()
    assert card == expected["README.md"].decode()
    assert f'load_sparse("hf-hub:{REPO}")' in card and f'create_model("hf-hub:{REPO}"' in card
    assert "<user>/" not in card
    # the local folder is untouched (the card is rewritten only in the upload)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # what reached the Hub is a valid checkpoint giving the same model
    published = tmp_path / "published"
    published.mkdir()
    for name, data in files.items():
        (published / name).write_bytes(data)
    loaded, masks, meta = load_sparse(published)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert masks.keys() == sp.masks.keys()
    assert all(torch.equal(masks[n], sp.masks[n].cpu()) for n in masks)
    assert meta["itop_rate"] == sp.itop_rate


def test_push_to_hub_refuses_a_corrupted_folder(trained, fake_hub, tmp_path):
    model, sp = trained
    folder = save_sparse(model, sp, tmp_path / "ckpt")
    _flip_byte_in_data(folder / "model.safetensors")

    with pytest.raises(CheckpointError, match=r"model\.safetensors.*checksum mismatch") as raised:
        push_to_hub(folder, REPO, private=True, token=TOKEN)
    # the error names the user's folder, not the private copy that was verified
    assert str(raised.value).startswith(f"{folder}/model.safetensors") and "itop_timm_push_" not in str(
        raised.value
    )

    assert fake_hub.repos_created == []
    assert fake_hub.commits == []
    assert fake_hub.requests == []  # not even a preupload / validation call


def test_push_model_object(trained, fake_hub, tmp_path):
    model, sp = trained

    url = push_to_hub(model, REPO, sparsifier=sp, token=TOKEN)

    files = _check_single_upload(fake_hub, url)
    assert fake_hub.repos_created[0]["private"] is False  # the default
    assert set(files) == FILES
    # what save_sparse writes for this model, the card naming the repo
    expected = _expected_upload(save_sparse(model, sp, tmp_path / "reference"))
    assert set(files) == set(expected)
    for name in FILES:  # saves are byte-for-byte reproducible
        assert files[name] == expected[name], name
    with pytest.raises(ValueError, match="sparsifier= only together with a model"):
        push_to_hub(tmp_path / "reference", REPO, sparsifier=sp, token=TOKEN)
    assert len(fake_hub.commits) == 1


def test_push_dense_checkpoint(fake_hub, tmp_path):
    model = timm.create_model("resnet10t", num_classes=10, pretrained=False).eval()
    folder = save_sparse(model, None, tmp_path / "dense")
    url = push_to_hub(folder, REPO, token=TOKEN)
    files = _check_single_upload(fake_hub, url)
    # sparsity.safetensors of a dense model: no masks, the hashes of every tensor and of config.json
    assert set(files) == {"model.safetensors", "sparsity.safetensors", "config.json", "README.md"}
    assert REPO in files["README.md"].decode()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _populate_hub_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """Lay ``folder``'s files out as huggingface_hub's cache would after a download; returns the commit.

    ``<cache>/models--org--name/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/main}``
    where the etag is the sha256 of an LFS file (the safetensors) and the git blob sha1 of a regular one.
    """
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    commit = hashlib.sha1(b"".join(name.encode() + data for name, data in files.items())).hexdigest()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_sha1(data)
        (storage / "blobs" / etag).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", etag), snapshot / name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline: read back verbatim
    return commit


def test_load_sparse_from_hub_cache_offline(trained, monkeypatch, tmp_path):
    model, sp = trained
    folder = save_sparse(model, sp, tmp_path / "ckpt")
    cache = tmp_path / "hf_cache"
    commit = _populate_hub_cache(cache, REPO, folder)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # set by conftest; made explicit here
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # snapshot/hf_hub_download's default
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)

    loaded, masks, meta = load_sparse(f"hf-hub:{REPO}")
    assert Path(meta["path"]) == (cache / f"models--someone--resnet10t-sparse/snapshots/{commit}").resolve()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference)
    assert masks.keys() == sp.masks.keys() and len(masks) > 0
    assert all(torch.equal(masks[n], sp.masks[n].cpu()) for n in masks)
    assert meta["itop_rate"] == sp.itop_rate
    assert meta["density"] == pytest.approx(sp.density)

    # a pinned commit resolves to the same snapshot
    _, _, pinned = load_sparse(f"hf-hub:{REPO}@{commit}")
    assert pinned["path"] == meta["path"]

    # plain timm reads the same cache (hf_hub_download of config.json and model.safetensors)
    plain = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(plain(x), reference)

    with pytest.raises(CheckpointError, match="someone/not-there"):
        load_sparse("hf-hub:someone/not-there")
    assert not (cache / "models--someone--not-there" / "snapshots").exists()
    shutil.rmtree(cache)  # the cache, not the model, is what made these loads work
    with pytest.raises(CheckpointError, match=REPO):
        load_sparse(f"hf-hub:{REPO}")


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_push_without_the_hub_is_a_clean_error(hub, monkeypatch, tmp_path, capsys):
    """Issue 27 class 14: not a raw 12-frame traceback; exit status 1 (the input was fine)."""
    from itop_timm import cli

    model = timm.create_model("test_resnet", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = save_sparse(
        model, itop_timm.sparsify(model, optimizer, density=0.5, total_steps=10), tmp_path / "m"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hub == "offline")
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    huggingface_hub.close_session()
    try:
        assert cli.main(["push", str(folder), REPO, "--token", TOKEN]) == 1
    finally:
        huggingface_hub.close_session()
    err = capsys.readouterr().err
    assert err.startswith(f"itop-timm push: error: cannot push to the Hugging Face Hub repo '{REPO}' (")
    assert err.endswith("); nothing was published\n") and err.count("\n") == 1, err
