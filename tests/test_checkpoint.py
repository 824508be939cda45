"""Sparse checkpoints: round trips, plain-timm loading, compact storage, corruption, hostile JSON,
dtypes, provenance of the published files, atomic writes."""

from __future__ import annotations

import functools
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
import yaml
from helpers import (
    checkpoint_metadata,
    forge_metadata,
    load_is_identical,
    safetensors_metadata,
    train_sparse,
    train_steps,
    write_folder,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import itop_timm
from itop_timm import cli
from itop_timm.checkpoint import (
    COMPACT_WEIGHTS_FILE,
    CONFIG_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    export_checkpoint,
    load_sparse,
    pack_mask,
    save_sparse,
    unpack_mask,
)
from itop_timm.checkpoint.format import tensor_sha256
from itop_timm.serialization import CheckpointError, remove_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def outputs(model, size=32):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(
        next(model.parameters()).dtype
    )
    with torch.no_grad():
        return model(x)


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
    model, sp = train_sparse(name, 0.1, size=size, **kwargs)
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
    model, sp = train_sparse("resnet18", density)
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
    model, sp = train_sparse("resnet10t", 0.1)
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
    model, sp = train_sparse("resnet10t", 0.1)
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


# --------------------------------------------------------------------------- config.json is covered
@pytest.mark.parametrize(
    "edit",
    [
        {"act_layer": "gelu"},  # another activation: same tensors, another model
        {"global_pool": "max"},  # another pooling
        {"drop_rate": 0.5},
    ],
)
def test_edited_model_args_are_refused(saved_checkpoint, tmp_path, edit):
    config = json.loads(saved_checkpoint["files"][CONFIG_FILE])
    config["model_args"].update(edit)
    files = {**saved_checkpoint["files"], CONFIG_FILE: json.dumps(config, indent=2).encode()}
    with pytest.raises(CheckpointError, match=r"config.json: differs from the config saved"):
        load_sparse(write_folder(tmp_path / "ckpt", files))


def test_reformatted_config_json_still_loads(saved_checkpoint, tmp_path):
    config = json.loads(saved_checkpoint["files"][CONFIG_FILE])
    reordered = dict(reversed(list(config.items())))  # same content, other key order and layout
    files = {**saved_checkpoint["files"], CONFIG_FILE: json.dumps(reordered, indent=None).encode()}
    assert load_is_identical(write_folder(tmp_path / "ckpt", files), saved_checkpoint)


# --------------------------------------------------------------------------- hostile JSON
def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nested_metadata_within_the_limit_still_loads(saved_checkpoint, tmp_path):
    extra = {"a": [[{"b": [1, 2, {"c": None}]}]]}
    folder = write_folder(
        tmp_path / "ckpt",
        forge_metadata(
            saved_checkpoint["files"],
            json.dumps({**checkpoint_metadata(saved_checkpoint["files"]), "extra": extra}),
        ),
    )
    assert load_is_identical(folder, saved_checkpoint)
    assert load_sparse(folder)[2]["extra"] == extra


# JSON values of every type, nesting and size
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


def json_paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a parsed JSON document, the root included."""
    paths, stack = [], [(value, prefix)]
    while stack:
        item, path = stack.pop()
        paths.append(path)
        if isinstance(item, dict):
            stack.extend((v, (*path, k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(item))
    return sorted(paths, key=repr)


def mutate(doc, data) -> str:
    """Draw one mutation of the JSON document ``doc``; returns the new file text."""
    op = data.draw(
        st.sampled_from(["replace", "delete", "insert", "deep", "whole", "reformat", "big_string"]),
        label="op",
    )
    if op == "whole":
        return json.dumps(data.draw(JSON_VALUES, label="document"))
    if op == "reformat":  # legitimate: the same content written differently
        return json.dumps(doc, indent=data.draw(st.sampled_from([None, 1, 4])), sort_keys=True)
    path = data.draw(st.sampled_from(json_paths(doc)), label="path")
    doc = json.loads(json.dumps(doc))
    parent, key = None, None
    target = doc
    for step in path:
        parent, key, target = target, step, target[step]
    placeholder = "__HOSTILE__"
    if op == "deep":
        new_text = deep_json(data.draw(st.integers(1, 3000), label="depth"))
    elif op == "big_string":
        new_text = json.dumps("x" * data.draw(st.integers(0, 200_000), label="length"))
    else:
        new_text = json.dumps(data.draw(JSON_VALUES, label="value"))
    if op == "delete" and parent is not None:
        del parent[key]
        return json.dumps(doc)
    if op == "insert" and isinstance(target, dict):
        target[data.draw(st.text(max_size=12), label="key")] = placeholder
    elif parent is None:
        return new_text
    else:
        parent[key] = placeholder
    return json.dumps(doc).replace(json.dumps(placeholder), new_text, 1)


def same_content(old_text: str, new_text: str) -> bool:
    """Whether two JSON texts parse to the same content (layout and key order aside)."""
    try:
        return json.dumps(json.loads(new_text), sort_keys=True) == json.dumps(
            json.loads(old_text), sort_keys=True
        )
    except (ValueError, RecursionError):
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_json_gives_the_identical_model_or_a_checkpoint_error(saved_checkpoint, tmp_path_factory, data):
    compact = data.draw(st.booleans(), label="compact")
    files = dict(saved_checkpoint["compact_files"] if compact else saved_checkpoint["files"])
    target = data.draw(st.sampled_from([CONFIG_FILE, SPARSITY_FILE]), label="file")
    if target == CONFIG_FILE:
        old = files[CONFIG_FILE].decode()
        new = mutate(json.loads(old), data)
        files[CONFIG_FILE] = new.encode()
        unchanged, relink = same_content(old, new), True
    else:
        old = json.dumps(checkpoint_metadata(files))
        new = mutate(checkpoint_metadata(files), data)
        relink = data.draw(st.booleans(), label="relink")
        files = forge_metadata(files, new, relink=relink)
        unchanged = same_content(old, new)
    identical = load_is_identical(write_folder(tmp_path_factory.mktemp("fuzz"), files), saved_checkpoint)
    event(f"{target}: {'identical' if identical else 'error'}")
    if unchanged and relink:  # the same content, written differently: must keep loading
        assert identical
    if target == CONFIG_FILE and not unchanged:  # config.json decides the model: any edit is refused
        assert not identical
    if not relink and new != old:  # metadata edited without relinking the weights file
        assert not identical


# --------------------------------------------------------------------------- dtype round trip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_round_trips(tmp_path, dtype):
    model, sp = train_sparse()
    model.to(dtype)
    ref = outputs(model)
    for compact in (False, True):
        loaded, masks, meta = load_sparse(save_sparse(model, sp, tmp_path / f"c{compact}", compact=compact))
        assert all(p.dtype == dtype for p in loaded.parameters())
        assert torch.equal(outputs(loaded), ref) and set(masks) == set(sp.masks)


def test_mixed_dtypes_are_refused_at_save_time(tmp_path):
    model, sp = train_sparse()
    model.fc.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"mixes floating dtypes .*cast it to one"):
        save_sparse(model, sp, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- stale temporaries, mismatched files
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "ckpt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".ckpt.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".ckpt.{dead.pid}.def456.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".ckpt.{os.getppid()}.ghi789.tmp"  # a save in progress in a running process
    live.mkdir()
    other = tmp_path / f".ckpt2.{dead.pid}.abc.tmp"  # belongs to another target
    other.mkdir()
    assert sorted(p.name for p in remove_stale_temporaries(target)) == sorted([stale.name, stale_file.name])
    assert live.exists() and other.exists() and not stale.exists() and not stale_file.exists()


def test_compact_folder_with_dense_metadata_names_the_mismatch(saved_checkpoint, tmp_path):
    files = dict(saved_checkpoint["compact_files"])
    files[SPARSITY_FILE] = saved_checkpoint["files"][SPARSITY_FILE]  # from the dense save of the same model
    with pytest.raises(
        CheckpointError, match=r"records a dense checkpoint, but the folder holds model.compact"
    ):
        load_sparse(write_folder(tmp_path / "ckpt", files))
    assert COMPACT_WEIGHTS_FILE in files and WEIGHTS_FILE not in files


# --------------------------------------------------------------------------- provenance
BORROWED = ("tag", "license", "paper_ids", "paper_name", "origin_url", "hf_hub_id", "url", "test_input_size")


def test_published_files_carry_only_real_provenance(tmp_path):
    model, sp = train_sparse()
    assert model.pretrained_cfg.get("tag")  # timm's default config of the architecture has one
    recipe = {"model": {"name": "test_resnet"}, "sparsity": {"method": "rigl", "density": 0.2}}
    folder = save_sparse(
        model,
        sp,
        tmp_path / "ckpt",
        dataset="zalando-datasets/fashion_mnist",
        metrics={"test_top1_last": 91.5, "best_val_top1": 92.0},
        training_config=recipe,
    )
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert not set(BORROWED) & set(config["pretrained_cfg"]), config["pretrained_cfg"]
    assert config["pretrained_cfg"]["input_size"] and config["pretrained_cfg"]["mean"]  # preprocessing stays
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["datasets"] == ["zalando-datasets/fashion_mnist"] and front["metrics"] == ["accuracy"]
    assert front["library_name"] == "timm" and "license" not in front
    (result,) = front["model-index"][0]["results"]
    assert result["dataset"]["type"] == "zalando-datasets/fashion_mnist"
    assert {(m["name"], m["value"]) for m in result["metrics"]} == {
        ("test_top1_last", 91.5),
        ("best_val_top1", 92.0),
    }
    assert "a1_in1k" not in card and "r160_in1k" not in card and "arXiv" not in card
    _, _, meta = load_sparse(folder)
    assert meta["training_config"] == recipe and meta["method"] == "rigl" and meta["itop_timm_version"]
    assert "density: 0.2" in card and "itop_timm " + itop_timm.__version__ in card


def test_local_dataset_is_not_listed_as_a_hub_dataset(tmp_path):
    model, sp = train_sparse()
    folder = save_sparse(model, sp, tmp_path / "ckpt", dataset="disk", metrics={"test_top1_last": 50.0})
    front = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert "datasets" not in front and front["model-index"][0]["results"][0]["dataset"]["name"] == "disk"


# --------------------------------------------------------------------------- corruption
def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corruption_gives_a_clear_error_or_the_identical_model(saved_checkpoint, tmp_path_factory, data):
    compact = data.draw(st.booleans(), label="compact")
    files = dict(saved_checkpoint["compact_files"] if compact else saved_checkpoint["files"])
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
        other = Path(saved_checkpoint["other"]) / name
        if other.exists():
            blob = bytearray(other.read_bytes())
    folder = tmp_path_factory.mktemp("fuzz")
    if op == "delete":
        files.pop(name)
    else:
        files[name] = bytes(blob)
    changed = (
        op == "delete"
        or files[name] != (saved_checkpoint["compact_files"] if compact else saved_checkpoint["files"])[name]
    )
    outcome = "identical" if load_is_identical(write_folder(folder, files), saved_checkpoint) else "error"
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
def test_edited_metadata_is_caught(saved_checkpoint, tmp_path, field, value, message):
    files = dict(saved_checkpoint["files"])
    meta = json.loads(safetensors_metadata(files[SPARSITY_FILE])["itop_timm"])
    meta[field] = value
    # unlinked, the edit is caught by the link (the format version is read first, as it must be)
    unlinked = message if field == "format_version" else "does not belong to model.safetensors"
    with pytest.raises(CheckpointError, match=unlinked):
        load_sparse(write_folder(tmp_path / "ckpt", forge_metadata(files, json.dumps(meta), relink=False)))
    files = forge_metadata(files, json.dumps(meta))  # a forger who relinks the weights file too
    with pytest.raises(CheckpointError, match=message):
        load_sparse(write_folder(tmp_path / "ckpt", files))


def test_mask_allowing_fewer_weights_than_stored_is_caught(saved_checkpoint, tmp_path):
    from safetensors.torch import load, save

    files = dict(saved_checkpoint["files"])
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
    meta["sparsity_sha256"] = {k: tensor_sha256(v) for k, v in tensors.items()}
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
    import itop_timm, itop_timm.checkpoint as ck, itop_timm.checkpoint.write as ck_write
    import itop_timm.serialization as ser
    where = sys.argv[2]
    torch.manual_seed(5)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = itop_timm.sparsify(model, opt, method="set", density=0.5, total_steps=10, seed=5)
    if where == "writing":  # die after the first new file is written into the temporary folder
        real = ck_write.safetensors_save
        def dying_save(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        ck_write.safetensors_save = dying_save
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
    model, sp = train_sparse()
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


def test_saved_metadata_keeps_the_format_s_key_names(saved_checkpoint):
    from itop_timm.checkpoint.schema import META_SCHEMA

    meta = checkpoint_metadata(saved_checkpoint["files"])
    required = {key for key, (needed, _) in META_SCHEMA.items() if needed}
    written = {"config_sha256", "num_classes", "step", "itop_rate", "target_density", "dataset"}
    assert required | written <= set(meta)  # a renamed key would orphan every checkpoint already saved


def test_a_save_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    from itop_timm.structured import compact_checkpoint

    model, sp = train_sparse()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    source = save_sparse(model, sp, run / "model")  # a new folder: fine
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for target in (run, run / "metrics.jsonl"):
        with pytest.raises(ValueError, match="not a checkpoint folder|is not a folder"):
            save_sparse(model, sp, target)
        with pytest.raises(ValueError, match="not a checkpoint folder|is not a folder"):
            compact_checkpoint(source, target)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    save_sparse(model, sp, run / "model")  # the neighbours: over a checkpoint folder, into an empty one
    (tmp_path / "empty").mkdir()
    save_sparse(model, sp, tmp_path / "empty")
    for folder in (run / "model", tmp_path / "empty"):
        _, masks, _ = load_sparse(folder)
        assert all(torch.equal(masks[name], mask) for name, mask in sp.masks.items())


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_config_json_that_is_no_regular_file_is_a_checkpoint_error_not_a_hang(
    saved_checkpoint, tmp_path, kind
):
    import threading

    folder = write_folder(
        tmp_path / "ckpt", {k: v for k, v in saved_checkpoint["files"].items() if k != CONFIG_FILE}
    )
    if kind == "fifo":
        os.mkfifo(folder / CONFIG_FILE)
    else:
        (folder / CONFIG_FILE).symlink_to("/dev/zero")
    outcome: list = []

    def load() -> None:
        try:
            load_sparse(folder)
        except CheckpointError as err:
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "load_sparse blocked on config.json"
    assert outcome and "config.json: timm config is not a regular file" in str(outcome[0])


# --------------------------------------------------------------------------- permissions
@functools.cache
def _sparse_test_resnet() -> tuple[torch.nn.Module, itop_timm.Sparsifier]:
    model = timm.create_model("test_resnet", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, itop_timm.sparsify(model, optimizer, density=0.5, total_steps=10)


@settings(max_examples=12, deadline=None)
@given(
    umask=st.sampled_from([0o022, 0o002, 0o027, 0o077, 0o007, 0o000]), existing=st.sampled_from([None, 0o640])
)
def test_outputs_get_the_permissions_a_plain_open_gives(umask, existing):
    """Issue 27 class 4: mkstemp's 0600 and mkdtemp's 0700 never reach an output: a new file gets
    0666 & ~umask (a replaced one keeps its mode), a folder 0777 & ~umask."""
    import stat
    import tempfile

    from itop_timm.serialization import atomic_directory, atomic_write_text

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(umask)
    try:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            summary = root / "summary.json"
            if existing is not None:
                summary.write_text("{}")
                summary.chmod(existing)
            atomic_write_text(summary, "{}")
            assert mode(summary) == (existing if existing is not None else 0o666 & ~umask)
            with atomic_directory(root / "plots") as tmp:
                (tmp / "a.png").write_bytes(b"png")
            assert mode(root / "plots") == 0o777 & ~umask and mode(root / "plots" / "a.png") == 0o666 & ~umask
            out = itop_timm.save_sparse(*_sparse_test_resnet(), root / "model", model_name="test_resnet")
            assert mode(out) == 0o777 & ~umask
            assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o666 & ~umask for p in out.iterdir()}
    finally:
        os.umask(old)


def test_the_fashion_mnist_cache_folder_is_not_private(tmp_path):
    from helpers import write_idx

    from itop_timm.training.data import fashion_mnist_from_idx

    for prefix, n in (("train", 4), ("t10k", 2)):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.zeros(n, 28, 28, dtype=torch.uint8).numpy()
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).numpy())
    old = os.umask(0o022)
    try:
        assert len(fashion_mnist_from_idx(tmp_path, cache_dir=tmp_path / "cache")["train"]) == 4
    finally:
        os.umask(old)
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.stat().st_mode & 0o777 == 0o755
