"""Hostile and careless input (issue 16): every class of defect found by adversarial testing, with the
legitimate neighbour that must keep working, and a property-based fuzz over the checkpoint's JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import forge_metadata, safetensors_metadata, train_steps, write_folder
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import itop_timm
from itop_timm import cli
from itop_timm.checkpoint import (
    COMPACT_WEIGHTS_FILE,
    CONFIG_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    load_sparse,
    save_sparse,
)
from itop_timm.serialization import CheckpointError, remove_stale_temporaries


def trained(seed: int = 0, method: str = "rigl", density: float = 0.2):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = itop_timm.sparsify(model, opt, method=method, density=density, update_interval=2, total_steps=50)
    train_steps(model, opt, 3, input_size=(3, 32, 32))
    return model.eval(), sp


def outputs(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(
        next(model.parameters()).dtype
    )
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved sparse checkpoint (dense and compact storage), its files and the reference state."""
    root = tmp_path_factory.mktemp("saved")
    model, sp = trained()
    dense = save_sparse(model, sp, root / "dense", dataset="zalando-datasets/fashion_mnist")
    compact = save_sparse(model, sp, root / "compact", compact=True)
    return {
        "files": {p.name: p.read_bytes() for p in dense.iterdir()},
        "compact_files": {p.name: p.read_bytes() for p in compact.iterdir()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": {k: v.clone() for k, v in sp.masks.items()},
        "outputs": outputs(model),
    }


def load_is_identical(folder: Path, ref) -> bool:
    """Load ``folder``: ``True`` if it is exactly the reference model and masks, ``False`` for a
    :class:`CheckpointError` naming a file of the folder; anything else fails the test."""
    try:
        model, masks, _ = load_sparse(folder)
    except CheckpointError as err:
        assert str(folder) in str(err), str(err)
        return False
    state = model.state_dict()
    assert set(state) == set(ref["state"]) and all(torch.equal(state[k], ref["state"][k]) for k in state)
    assert set(masks) == set(ref["masks"]) and all(torch.equal(masks[n], ref["masks"][n]) for n in masks)
    return True


def meta_of(files: dict[str, bytes]) -> dict:
    return json.loads(safetensors_metadata(files[SPARSITY_FILE])["itop_timm"])


# --------------------------------------------------------------------------- 1: config.json is covered
@pytest.mark.parametrize(
    "edit",
    [
        {"act_layer": "gelu"},  # another activation: same tensors, another model
        {"global_pool": "max"},  # another pooling
        {"drop_rate": 0.5},
    ],
)
def test_edited_model_args_are_refused(saved, tmp_path, edit):
    config = json.loads(saved["files"][CONFIG_FILE])
    config["model_args"].update(edit)
    files = {**saved["files"], CONFIG_FILE: json.dumps(config, indent=2).encode()}
    with pytest.raises(CheckpointError, match=r"config.json: differs from the config saved"):
        load_sparse(write_folder(tmp_path / "ckpt", files))


def test_reformatted_config_json_still_loads(saved, tmp_path):
    config = json.loads(saved["files"][CONFIG_FILE])
    reordered = dict(reversed(list(config.items())))  # same content, other key order and layout
    files = {**saved["files"], CONFIG_FILE: json.dumps(reordered, indent=None).encode()}
    assert load_is_identical(write_folder(tmp_path / "ckpt", files), saved)


# --------------------------------------------------------------------------- 2: hostile JSON
def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
def test_deeply_nested_json_is_a_checkpoint_error(saved, tmp_path, depth, capsys):
    folder = write_folder(tmp_path / "config", {**saved["files"], CONFIG_FILE: deep_json(depth).encode()})
    with pytest.raises(CheckpointError, match=r"config.json: unreadable timm config \(nested"):
        load_sparse(folder)
    meta_text = json.dumps({**meta_of(saved["files"]), "extra": "DEEP"}).replace('"DEEP"', deep_json(depth))
    folder = write_folder(tmp_path / "meta", forge_metadata(saved["files"], meta_text))
    with pytest.raises(CheckpointError, match=r"sparsity.safetensors: unreadable metadata JSON \(nested"):
        load_sparse(folder)
    assert cli.main(["info", str(folder)]) == 2  # a clean error, no traceback
    assert "sparsity.safetensors: unreadable metadata JSON" in capsys.readouterr().err


def test_nested_metadata_within_the_limit_still_loads(saved, tmp_path):
    extra = {"a": [[{"b": [1, 2, {"c": None}]}]]}
    folder = write_folder(
        tmp_path / "ckpt",
        forge_metadata(saved["files"], json.dumps({**meta_of(saved["files"]), "extra": extra})),
    )
    assert load_is_identical(folder, saved)
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
def test_fuzz_json_gives_the_identical_model_or_a_checkpoint_error(saved, tmp_path_factory, data):
    compact = data.draw(st.booleans(), label="compact")
    files = dict(saved["compact_files"] if compact else saved["files"])
    target = data.draw(st.sampled_from([CONFIG_FILE, SPARSITY_FILE]), label="file")
    if target == CONFIG_FILE:
        old = files[CONFIG_FILE].decode()
        new = mutate(json.loads(old), data)
        files[CONFIG_FILE] = new.encode()
        unchanged, relink = same_content(old, new), True
    else:
        old = json.dumps(meta_of(files))
        new = mutate(meta_of(files), data)
        relink = data.draw(st.booleans(), label="relink")
        files = forge_metadata(files, new, relink=relink)
        unchanged = same_content(old, new)
    identical = load_is_identical(write_folder(tmp_path_factory.mktemp("fuzz"), files), saved)
    event(f"{target}: {'identical' if identical else 'error'}")
    if unchanged and relink:  # the same content, written differently: must keep loading
        assert identical
    if target == CONFIG_FILE and not unchanged:  # config.json decides the model: any edit is refused
        assert not identical
    if not relink and new != old:  # metadata edited without relinking the weights file
        assert not identical


# --------------------------------------------------------------------------- 3: API misuse
def test_second_sparsify_on_the_same_optimizer_is_refused():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = itop_timm.sparsify(model, opt, density=0.2, total_steps=10)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with pytest.raises(ValueError, match="already sparsified.*call its .remove"):
        itop_timm.sparsify(model, opt, density=0.5, total_steps=10)
    train_steps(model, opt, 2, input_size=(3, 32, 32))
    assert all(torch.equal(sp.masks[n], masks[n]) for n in masks)  # one hook, untouched masks
    assert sp.density == pytest.approx(0.2, abs=1e-3)
    sp.remove()  # the legitimate neighbour: replace the sparsifier after removing the first
    sp2 = itop_timm.sparsify(model, opt, density=0.5, total_steps=10)
    train_steps(model, opt, 2, input_size=(3, 32, 32))
    assert sp2.density == pytest.approx(0.5, abs=1e-3)
    params = dict(model.named_parameters())
    assert all(not params[n][~m].any() for n, m in sp2.masks.items())  # the second masks hold
    assert any(params[n][~masks[n]].any() for n in masks)  # and the removed first hook no longer masks
    other = torch.optim.SGD(model.parameters(), lr=0.05)  # a new optimizer (e.g. fine-tuning) is fine
    sp2.remove()
    itop_timm.sparsify(model, other, density=0.3, total_steps=10)


def grad_less_setup(method: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = itop_timm.sparsify(
        model,
        opt,
        method=method,
        density=0.5,
        distribution="uniform",
        update_interval=1000,
        total_steps=10**4,
    )
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model, sp


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_gradient_grown_update_skips_layers_without_gradient(method, caplog):
    model, sp = grad_less_setup(method)
    model[0].weight.grad = None  # unused in the forward pass / frozen / zero_grad(set_to_none=True)
    before = {n: m.clone() for n, m in sp.masks.items()}
    update = sp.update_topology()
    assert update["no_grad_layers"] == ["0.weight"] and "0.weight" not in update["layers"]
    assert torch.equal(sp.masks["0.weight"], before["0.weight"])  # not pruned, not regrown by tie-breaking
    assert not torch.equal(sp.masks["2.weight"], before["2.weight"])  # the layer with a gradient is updated
    assert "have no gradient" in caplog.text


def test_random_grown_update_still_changes_layers_without_gradient():
    model, sp = grad_less_setup("set")  # SET grows at random: no gradient needed
    model[0].weight.grad = None
    before = sp.masks["0.weight"].clone()
    update = sp.update_topology()
    assert "no_grad_layers" not in update and not torch.equal(sp.masks["0.weight"], before)


# --------------------------------------------------------------------------- 4: dtype round trip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_round_trips(tmp_path, dtype):
    model, sp = trained()
    model.to(dtype)
    ref = outputs(model)
    for compact in (False, True):
        loaded, masks, meta = load_sparse(save_sparse(model, sp, tmp_path / f"c{compact}", compact=compact))
        assert all(p.dtype == dtype for p in loaded.parameters())
        assert torch.equal(outputs(loaded), ref) and set(masks) == set(sp.masks)


def test_mixed_dtypes_are_refused_at_save_time(tmp_path):
    model, sp = trained()
    model.fc.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"mixes floating dtypes .*cast it to one"):
        save_sparse(model, sp, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- 6: careless CLI input
def test_export_onto_its_source_spelled_differently_is_refused(saved, tmp_path, capsys):
    src = write_folder(tmp_path / "src", saved["files"])
    for spelling in (f"{src}/", f"{src}/.", f"{tmp_path}/src/../src"):
        assert cli.main(["export", str(src), spelling, "--compact"]) == 2
        assert "different destination folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == saved["files"]
    assert cli.main(["export", str(src), str(tmp_path / "other"), "--compact"]) == 0  # the neighbour
    assert load_is_identical(tmp_path / "other", saved)


def test_info_escapes_control_characters(saved, tmp_path, capsys):
    hostile = "\x1b[2J\x1b[31mowned\nchecksum  : OK\r\u202e"
    meta = meta_of(saved["files"])
    meta["dataset"] = hostile
    meta["metrics"] = {hostile: hostile}
    folder = write_folder(tmp_path / "ckpt", forge_metadata(saved["files"], json.dumps(meta)))
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[31mowned\\nchecksum  : OK" in out
    assert not any(line.startswith("checksum") for line in out.splitlines())
    assert cli.main(["info", str(folder), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out


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


def test_compact_folder_with_dense_metadata_names_the_mismatch(saved, tmp_path):
    files = dict(saved["compact_files"])
    files[SPARSITY_FILE] = saved["files"][SPARSITY_FILE]  # from the dense save of the same model
    with pytest.raises(
        CheckpointError, match=r"records a dense checkpoint, but the folder holds model.compact"
    ):
        load_sparse(write_folder(tmp_path / "ckpt", files))
    assert COMPACT_WEIGHTS_FILE in files and WEIGHTS_FILE not in files


# --------------------------------------------------------------------------- 7: NaN/Inf weights
def test_nonfinite_weights_warn_at_save_and_in_info(tmp_path, caplog, capsys):
    model, sp = trained()
    finite = save_sparse(model, sp, tmp_path / "finite")
    assert "NaN/Inf" not in caplog.text
    assert cli.main(["info", str(finite)]) == 0 and "NaN/Inf" not in capsys.readouterr().err
    with torch.no_grad():
        model.fc.bias[:2] = torch.tensor([float("nan"), float("inf")])
    folder = save_sparse(model, sp, tmp_path / "nan")
    assert "save_sparse: 2 NaN/Inf values in 1 tensor(s) (first: fc.bias)" in caplog.text
    loaded, _, meta = load_sparse(folder)
    assert meta["nonfinite"] == {"fc.bias": 2} and torch.isnan(loaded.fc.bias[0])
    assert cli.main(["info", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "WARNING: 2 NaN/Inf values in 1 tensor(s): fc.bias" in captured.err
    assert "NaN/Inf values : 2 in 1 tensor(s)" in captured.out


# --------------------------------------------------------------------------- 8: provenance
BORROWED = ("tag", "license", "paper_ids", "paper_name", "origin_url", "hf_hub_id", "url", "test_input_size")


def test_published_files_carry_only_real_provenance(tmp_path):
    model, sp = trained()
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
    model, sp = trained()
    folder = save_sparse(model, sp, tmp_path / "ckpt", dataset="disk", metrics={"test_top1_last": 50.0})
    front = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert "datasets" not in front and front["model-index"][0]["results"][0]["dataset"]["name"] == "disk"
