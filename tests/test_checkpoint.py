"""Sparse checkpoints: round trips, plain-timm loading, compact storage, corruption, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from helpers import forge_metadata, safetensors_metadata, train_steps, write_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import itop_timm
from itop_timm import cli
from itop_timm.checkpoint import (
    COMPACT_WEIGHTS_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    export_checkpoint,
    load_sparse,
    pack_mask,
    save_sparse,
    unpack_mask,
)
from itop_timm.serialization import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def trained(name: str, density: float = 0.1, size: int = 32, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = itop_timm.sparsify(
        model, opt, method="rigl", density=density, update_interval=2, total_steps=100, seed=seed
    )
    train_steps(model, opt, 3, input_size=(3, size, size))
    model.eval()
    return model, sp


def outputs(model, size=32):
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


ARCHS = [
    ("resnet18", {}, 32),
    ("convnext_atto", {}, 32),
    ("efficientnet_b0", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
]


@pytest.mark.parametrize("name,kwargs,size", ARCHS, ids=[a[0] for a in ARCHS])
def test_round_trip_dense_and_compact_and_plain_timm(name, kwargs, size, tmp_path):
    model, sp = trained(name, size=size, **kwargs)
    ref = outputs(model, size)
    dense_dir = save_sparse(model, sp, tmp_path / "dense", metrics={"top1": 12.5})
    compact_dir = save_sparse(model, sp, tmp_path / "compact", compact=True)

    loaded, masks, meta = load_sparse(dense_dir)
    assert torch.equal(outputs(loaded, size), ref)
    assert set(masks) == set(sp.masks) and all(torch.equal(masks[n], sp.masks[n]) for n in masks)
    assert all(torch.equal(meta["ever_active"][n], sp.ever_active[n]) for n in masks)
    assert meta["itop_rate"] == sp.itop_rate and meta["density"] == pytest.approx(sp.density)
    assert meta["method"] == "rigl" and meta["step"] == 3 and meta["architecture"] == name
    assert meta["metrics"] == {"top1": 12.5}

    # plain timm, two ways
    plain = timm.create_model(f"local-dir:{dense_dir}", pretrained=True).eval()
    assert torch.equal(outputs(plain, size), ref)
    overlay = timm.create_model(
        name,
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay={"file": str(dense_dir / WEIGHTS_FILE), "num_classes": 10},
        **kwargs,
    ).eval()
    assert torch.equal(outputs(overlay, size), ref)

    # compact: bit-identical tensors
    compact, cmasks, cmeta = load_sparse(compact_dir)
    assert cmeta["compact"] and not (compact_dir / WEIGHTS_FILE).exists()
    a, b = loaded.state_dict(), compact.state_dict()
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    assert all(torch.equal(cmasks[n], masks[n]) for n in masks)


@pytest.mark.parametrize("density,limit", [(0.1, 0.15), (0.02, 0.06)])
def test_compact_size_ratio(density, limit, tmp_path):
    model, sp = trained("resnet18", density=density)
    dense = save_sparse(model, sp, tmp_path / "dense")
    inference = save_sparse(model, sp, tmp_path / "inference", compact=True, include_union=False)
    training = save_sparse(model, sp, tmp_path / "training", compact=True)
    dense_bytes = (dense / WEIGHTS_FILE).stat().st_size
    weights_and_masks = (inference / COMPACT_WEIGHTS_FILE).stat().st_size + (
        inference / SPARSITY_FILE
    ).stat().st_size
    assert weights_and_masks <= limit * dense_bytes, weights_and_masks / dense_bytes
    with_union = (training / COMPACT_WEIGHTS_FILE).stat().st_size + (training / SPARSITY_FILE).stat().st_size
    assert (
        weights_and_masks < with_union <= weights_and_masks + dense_bytes / 32 + 65536
    )  # union: 1 bit per weight
    model_c, masks_c, meta_c = load_sparse(inference)
    assert "ever_active" not in meta_c and meta_c["itop_rate"] == sp.itop_rate


def test_export_between_dense_and_compact(tmp_path):
    model, sp = trained("resnet10t")
    save_sparse(model, sp, tmp_path / "a", compact=True)
    export_checkpoint(tmp_path / "a", tmp_path / "b", compact=False)
    m, masks, meta = load_sparse(tmp_path / "b")
    assert (
        torch.equal(outputs(m), outputs(model))
        and meta["method"] == "rigl"
        and meta["itop_rate"] == sp.itop_rate
    )
    assert cli.main(["export", str(tmp_path / "b"), str(tmp_path / "c"), "--compact", "--no-union"]) == 0
    assert (tmp_path / "c" / COMPACT_WEIGHTS_FILE).exists()


def test_mask_packing_round_trip():
    for shape in [(1,), (7,), (8,), (9,), (3, 5, 2), (64, 3, 7, 7)]:
        mask = torch.rand(shape) < 0.3
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed, shape), mask)


def test_resume_sparse_training_from_a_checkpoint(tmp_path):
    model, sp = trained("resnet10t")
    save_sparse(model, sp, tmp_path / "ckpt")
    loaded, masks, meta = load_sparse(tmp_path / "ckpt")
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.05, momentum=0.9)
    sp2 = itop_timm.sparsify(loaded, opt, method="rigl", masks=masks, update_interval=2, total_steps=100)
    assert sp2.layer_densities() == pytest.approx(sp.layer_densities())
    train_steps(loaded, opt, 2)
    assert sp2.density == pytest.approx(sp.density)


def test_dense_model_and_plain_masks(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    save_sparse(model, None, tmp_path / "dense")
    m, masks, meta = load_sparse(tmp_path / "dense")
    assert masks == {} and meta["method"] == "dense" and torch.equal(outputs(m), outputs(model))
    masks = {"fc.weight": torch.rand(10, 512) < 0.5}
    with torch.no_grad():
        model.fc.weight[~masks["fc.weight"]] = 0.0
    save_sparse(model, masks, tmp_path / "masked")
    m, loaded_masks, meta = load_sparse(tmp_path / "masked")
    assert meta["method"] == "masks" and torch.equal(loaded_masks["fc.weight"], masks["fc.weight"])


def test_bad_masks_are_rejected_before_writing(tmp_path):
    model = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(
        ValueError, match=r"masks\['fc.weight'\] has shape \(3, 3\), but the parameter has shape \(10, 512\)"
    ):
        save_sparse(model, {"fc.weight": torch.ones(3, 3, dtype=torch.bool)}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"masks \['nope.weight'\] name no parameter"):
        save_sparse(model, {"nope.weight": torch.ones(3, dtype=torch.bool)}, tmp_path / "x")
    with pytest.raises(ValueError, match="must be bool or hold only 0/1"):
        save_sparse(model, {"fc.weight": torch.full((10, 512), 0.5)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_weights_outside_the_mask_are_saved_as_zero(tmp_path, caplog):
    model = timm.create_model("resnet10t", num_classes=10).eval()
    mask = torch.zeros(10, 512, dtype=torch.bool)
    mask[:, :5] = True
    save_sparse(model, {"fc.weight": mask}, tmp_path / "c")
    assert "were nonzero; saved as 0" in caplog.text
    m, _, _ = load_sparse(tmp_path / "c")
    assert not m.fc.weight[~mask].any() and torch.equal(m.fc.weight[mask], model.fc.weight[mask])


def test_info_cli(tmp_path, capsys):
    model, sp = trained("resnet10t")
    save_sparse(model, sp, tmp_path / "ckpt")
    assert cli.main(["info", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "R_s" in out and "layer1.0.conv1.weight" in out and "rigl" in out
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small saved checkpoint, its model outputs and file bytes."""
    root = tmp_path_factory.mktemp("ref")
    model, sp = trained("test_resnet", density=0.2)
    folder = save_sparse(model, sp, root / "ckpt")
    compact = save_sparse(model, sp, root / "compact", compact=True)
    other_model, other_sp = trained("test_resnet", density=0.2, seed=1)
    other = save_sparse(other_model, other_sp, root / "other")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    compact_files = {p.name: p.read_bytes() for p in compact.iterdir()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {
        "files": files,
        "compact_files": compact_files,
        "state": state,
        "masks": dict(sp.masks),
        "other": other,
    }


def assert_error_or_identical(folder: Path, ref) -> str:
    """Loading must raise CheckpointError, or give exactly the reference model and masks."""
    try:
        model, masks, _ = load_sparse(folder)
    except CheckpointError as err:
        message = str(err)
        assert message and str(folder) in message, message  # names the file
        return "error"
    state = model.state_dict()
    assert set(state) == set(ref["state"]) and all(torch.equal(state[k], ref["state"][k]) for k in state)
    assert set(masks) == set(ref["masks"]) and all(torch.equal(masks[n], ref["masks"][n]) for n in masks)
    return "identical"


def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corruption_gives_a_clear_error_or_the_identical_model(reference, tmp_path_factory, data):
    compact = data.draw(st.booleans(), label="compact")
    files = dict(reference["compact_files"] if compact else reference["files"])
    targets = sorted(n for n in files if n != "README.md")
    name = data.draw(st.sampled_from(targets), label="file")
    blob = bytearray(files[name])
    op = data.draw(
        st.sampled_from(
            ["flip", "flip_header", "truncate", "delete", "swap_tensors", "foreign_file", "zero_run"]
        ),
        label="op",
    )
    if op == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
        blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
    elif op == "flip_header" and name.endswith(".safetensors"):
        pos = data.draw(st.integers(0, header_length(bytes(blob)) - 1), label="pos")
        blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
    elif op == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    elif op == "zero_run":
        start = data.draw(st.integers(0, len(blob) - 1), label="start")
        end = min(len(blob), start + data.draw(st.integers(1, 64), label="len"))
        if any(blob[start:end]):
            blob[start:end] = bytes(end - start)
    elif op == "swap_tensors" and name.endswith(".safetensors"):
        from safetensors.torch import load, save

        tensors = load(bytes(blob))
        by_size: dict = {}
        for k, v in sorted(tensors.items()):  # safetensors returns keys in no fixed order
            by_size.setdefault((v.dtype, tuple(v.shape)), []).append(k)
        pairs = [
            ks for ks in by_size.values() if len(ks) >= 2 and not torch.equal(tensors[ks[0]], tensors[ks[1]])
        ]
        if pairs:
            a, b = data.draw(st.sampled_from(pairs), label="pair")[:2]
            tensors[a], tensors[b] = tensors[b], tensors[a]
            header = json.loads(bytes(blob[8 : header_length(bytes(blob))]))
            blob = bytearray(save(tensors, metadata=header.get("__metadata__")))
    elif op == "foreign_file":
        other = Path(reference["other"]) / name
        if other.exists():
            blob = bytearray(other.read_bytes())
    folder = tmp_path_factory.mktemp("fuzz")
    if op == "delete":
        files.pop(name)
    else:
        files[name] = bytes(blob)
    changed = (
        op == "delete" or files[name] != (reference["compact_files"] if compact else reference["files"])[name]
    )
    outcome = assert_error_or_identical(write_folder(folder, files), reference)
    if (
        changed
        and name.endswith(".safetensors")
        and op in ("truncate", "delete", "swap_tensors", "foreign_file")
    ):
        assert outcome == "error", f"{op} on {name} went unnoticed"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("density", 0.5, "realised density"),
        ("architecture", "resnet18", "disagrees"),
        ("num_classes", 11, "disagrees"),
        ("format_version", 99, "format version"),
    ],
)
def test_edited_metadata_is_caught(reference, tmp_path, field, value, message):
    files = dict(reference["files"])
    meta = json.loads(safetensors_metadata(files[SPARSITY_FILE])["itop_timm"])
    meta[field] = value
    # unlinked, the edit is caught by the link (the format version is read first, as it must be)
    unlinked = message if field == "format_version" else "does not belong to model.safetensors"
    with pytest.raises(CheckpointError, match=unlinked):
        load_sparse(write_folder(tmp_path / "ckpt", forge_metadata(files, json.dumps(meta), relink=False)))
    files = forge_metadata(files, json.dumps(meta))  # a forger who relinks the weights file too
    with pytest.raises(CheckpointError, match=message):
        load_sparse(write_folder(tmp_path / "ckpt", files))


def test_mask_allowing_fewer_weights_than_stored_is_caught(reference, tmp_path):
    from safetensors.torch import load, save

    files = dict(reference["files"])
    blob = files[SPARSITY_FILE]
    header = json.loads(blob[8 : header_length(blob)])
    meta = json.loads(header["__metadata__"]["itop_timm"])
    tensors = load(blob)
    name = next(n for n, t in meta["tensors"].items() if t["density"] < 1)
    mask = unpack_mask(tensors[f"masks/{name}"], tuple(meta["tensors"][name]["shape"]))
    first = mask.reshape(-1).nonzero()[0, 0]
    mask.reshape(-1)[first] = False  # one weight fewer, metadata and checksums made consistent
    tensors[f"masks/{name}"] = pack_mask(mask)
    meta["tensors"][name]["active"] -= 1
    meta["tensors"][name]["density"] = meta["tensors"][name]["active"] / mask.numel()
    total = sum(torch.Size(t["shape"]).numel() for t in meta["tensors"].values())
    meta["density"] = sum(t["active"] for t in meta["tensors"].values()) / total
    from itop_timm.checkpoint import _sha256

    meta["sparsity_sha256"] = {k: _sha256(v) for k, v in tensors.items()}
    files[SPARSITY_FILE] = save(tensors, metadata={"itop_timm": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"sparsity.safetensors: does not belong to model.safetensors"):
        load_sparse(write_folder(tmp_path / "ckpt", files))
    # a forger who also relinks the weights file still hits the value check
    weights = files[WEIGHTS_FILE]
    link = {"format": "pt", "itop_timm.sparsity_sha256": hashlib.sha256(files[SPARSITY_FILE]).hexdigest()}
    files[WEIGHTS_FILE] = save(load(weights), metadata=link)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has nonzeros where its mask is inactive"):
        load_sparse(write_folder(tmp_path / "ckpt", files))


# --------------------------------------------------------------------------- atomic writes
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch, timm
    import itop_timm, itop_timm.checkpoint as ck, itop_timm.serialization as ser
    where = sys.argv[2]
    torch.manual_seed(5)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = itop_timm.sparsify(model, opt, method="set", density=0.5, total_steps=10, seed=5)
    if where == "writing":  # die after the first new file is written into the temporary folder
        real = ck.safetensors_save
        def dying_save(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        ck.safetensors_save = dying_save
    else:  # die between moving the old folder away and moving the new one in
        calls = []
        real_replace = os.replace
        def dying_replace(src, dst):
            calls.append(dst)
            real_replace(src, dst)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        ser.os.replace = dying_replace
    ck.save_sparse(model, sp, sys.argv[1])
    """
)


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, where):
    model, sp = trained("test_resnet", density=0.2)
    target = save_sparse(model, sp, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(script), str(target), where],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    loaded, masks, meta = load_sparse(target)  # recovers an interrupted rename
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert torch.equal(outputs(loaded), outputs(model)) and meta["itop_rate"] == sp.itop_rate
    leftovers = sorted(p.name for p in tmp_path.glob(".ckpt.*.tmp"))
    assert len(leftovers) == 1, leftovers  # the killed save's temporary folder
    save_sparse(model, sp, target)  # the next save of this checkpoint removes what the killed one left
    assert not list(tmp_path.glob(".ckpt.*")), sorted(p.name for p in tmp_path.glob(".ckpt.*"))
