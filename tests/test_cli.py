"""The ``itop-timm`` command: ``train`` (the recipe), ``methods`` (an installed plugin's method listed too)
and ``timm-train`` (timm's train.py with the sparse optimizers, resumed from its own checkpoint).

``info`` and ``export`` on good and hostile checkpoints (``push`` is tested with the Hub server in
test_hub.py, ``compact`` with compaction in test_compact.py and the recipe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import checkpoint_metadata, forge_metadata, load_is_identical, train_sparse, write_folder
from test_checkpoint import deep_json
from test_plugins import ROOT, write_entry_point_package
from test_recipe import subprocess_env, tiny_config
from test_timm_train import SCRIPT, SPARSE_ARGS, report, run

from itop_timm import cli
from itop_timm.checkpoint import CONFIG_FILE, load_sparse, save_sparse
from itop_timm.serialization import CheckpointError


def test_itop_timm_cli_train_and_methods(tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", train={"epochs": 1})))
    cmd = [sys.executable, "-m", "itop_timm.cli"]
    result = subprocess.run(
        [*cmd, "train", "--config", str(config)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["total_steps"] == 6
    listing = subprocess.run(
        [*cmd, "methods"], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert listing.returncode == 0 and "rigl" in listing.stdout and "erk" in listing.stdout
    assert (
        subprocess.run(
            [*cmd, "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=300
        ).returncode
        == 0
    )


def test_cli_lists_an_installed_plugins_method(tmp_path):
    write_entry_point_package(tmp_path, "itop_test_plugin_cli", "cli_plugin_method")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run(
        [sys.executable, "-m", "itop_timm.cli", "methods"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "cli_plugin_method" in out.stdout and "a test plugin's method" in out.stdout


def test_runner_trains_sparse_and_the_checkpoint_resumes_the_masks(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    out = run(
        [sys.executable, "-m", "itop_timm.timm_train", str(SCRIPT), *SPARSE_ARGS, "--output", str(first)]
    )
    assert out.returncode == 0, out.stderr
    r = report(first)
    assert r["optimizer"] == "SGD" and r["step"] == 4 and r["update_interval"] == 2
    assert r["density"] == pytest.approx(0.2, abs=1e-3) and r["itop_rate"] > r["density"]
    state = torch.load(first / "last.pth", weights_only=True)["optimizer"]["itop_timm"]  # no pickle needed
    assert state["step"] == 4
    # the CLI spelling, resuming from the script's own checkpoint: masks, step and union continue
    out = run(
        [
            sys.executable,
            "-m",
            "itop_timm.cli",
            "timm-train",
            str(SCRIPT),
            *SPARSE_ARGS,
            "--resume",
            str(first / "last.pth"),
            "--steps",
            "1",
            "--output",
            str(second),
        ]
    )
    assert out.returncode == 0, out.stderr
    resumed = report(second)
    assert resumed["step"] == 5 and resumed["itop_rate"] >= r["itop_rate"]
    from itop_timm.distributed import masks_fingerprint

    assert masks_fingerprint(list(state["masks"].values())) == r["fingerprint"]
    assert resumed["fingerprint"] == r["fingerprint"]  # no topology update at step 5 (odd)


# --------------------------------------------------------------------------- checkpoint commands
def test_info_cli(tmp_path, capsys):
    model, sp = train_sparse("resnet10t", 0.1)
    save_sparse(model, sp, tmp_path / "ckpt")
    assert cli.main(["info", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "R_s" in out and "layer1.0.conv1.weight" in out and "rigl" in out
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
def test_deeply_nested_json_is_a_checkpoint_error(saved_checkpoint, tmp_path, depth, capsys):
    folder = write_folder(
        tmp_path / "config", {**saved_checkpoint["files"], CONFIG_FILE: deep_json(depth).encode()}
    )
    with pytest.raises(CheckpointError, match=r"config.json: unreadable timm config \(nested"):
        load_sparse(folder)
    meta_text = json.dumps({**checkpoint_metadata(saved_checkpoint["files"]), "extra": "DEEP"}).replace(
        '"DEEP"', deep_json(depth)
    )
    folder = write_folder(tmp_path / "meta", forge_metadata(saved_checkpoint["files"], meta_text))
    with pytest.raises(CheckpointError, match=r"sparsity.safetensors: unreadable metadata JSON \(nested"):
        load_sparse(folder)
    assert cli.main(["info", str(folder)]) == 2  # a clean error, no traceback
    assert "sparsity.safetensors: unreadable metadata JSON" in capsys.readouterr().err


def test_export_onto_its_source_spelled_differently_is_refused(saved_checkpoint, tmp_path, capsys):
    src = write_folder(tmp_path / "src", saved_checkpoint["files"])
    for spelling in (f"{src}/", f"{src}/.", f"{tmp_path}/src/../src"):
        assert cli.main(["export", str(src), spelling, "--compact"]) == 2
        assert "different destination folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == saved_checkpoint["files"]
    assert cli.main(["export", str(src), str(tmp_path / "other"), "--compact"]) == 0  # the neighbour
    assert load_is_identical(tmp_path / "other", saved_checkpoint)


def test_info_escapes_control_characters(saved_checkpoint, tmp_path, capsys):
    hostile = "\x1b[2J\x1b[31mowned\nchecksum  : OK\r\u202e"
    meta = checkpoint_metadata(saved_checkpoint["files"])
    meta["dataset"] = hostile
    meta["metrics"] = {hostile: hostile}
    folder = write_folder(tmp_path / "ckpt", forge_metadata(saved_checkpoint["files"], json.dumps(meta)))
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[31mowned\\nchecksum  : OK" in out
    assert not any(line.startswith("checksum") for line in out.splitlines())
    assert cli.main(["info", str(folder), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_nonfinite_weights_warn_at_save_and_in_info(tmp_path, caplog, capsys):
    model, sp = train_sparse()
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


def test_export_into_the_run_folder_holding_its_source_is_refused(saved_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    src = write_folder(run / "model", saved_checkpoint["files"])
    (run / "metrics.jsonl").write_text("{}\n")
    assert cli.main(["export", str(src), str(run), "--compact"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == saved_checkpoint["files"]


# --------------------------------------------------------------------------- help, listing, card
@pytest.mark.parametrize("command", ["info", "export", "compact", "push", "methods"])
def test_every_argument_has_help(command):
    """Every positional and option of every subcommand (and the top level) says what it is; defaults
    that are not obvious are shown."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    sub = subparsers.choices[command]
    assert sub.description, f"`itop-timm {command} --help` has no description"
    for action in [*parser._actions, *sub._actions]:
        if action.dest not in ("help", "command"):
            assert action.help, f"{command}: {action.dest} has no help text"
    if command == "compact":
        assert "(default: 0.0)" in sub.format_help()


def test_methods_lists_each_methods_own_defaults(capsys):
    from itop_timm.methods import MethodInfo, magnitude_score, random_score, register_method
    from itop_timm.registry import METHODS

    register_method(
        MethodInfo(
            "cli_defaults_probe",
            magnitude_score,
            random_score,
            "probe",
            defaults={"update_interval": 7, "distribution": "uniform"},
        )
    )
    try:
        assert cli.main(["methods"]) == 0
    finally:
        METHODS.unregister("cli_defaults_probe")
    out = capsys.readouterr().out
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():  # the table comes first: its row is a method's first line
        if line.strip():
            rows.setdefault(line.split()[0], line.split())
    assert rows["method"][:5] == ["method", "ΔT", "p0", "final", "schedule"]
    assert rows["rigl"][1:5] == ["100", "0.5", "0.005", "cosine"]  # the library's
    assert rows["srigl"][1:3] == ["100", "0.3*"]  # srigl's own prune rate
    assert rows["static"][1:5] == ["-", "-", "-", "-"]  # never updates
    assert rows["cli_defaults_probe"][1] == "7*"
    assert "cli_defaults_probe also defaults: distribution='uniform'" in out
    assert "channel_sparsity (default: 0.5)" in out and "erk" in out


def test_compact_card_gives_a_working_way_to_plain_timm(saved_checkpoint, tmp_path, capsys):
    """The compact card says plain timm cannot load it and how to get a copy it can; that way works."""
    import timm

    card = saved_checkpoint["compact_files"]["README.md"].decode()
    assert "--dense" not in card and "size mismatch" in card
    assert "itop-timm export hf-hub:<user>/test_resnet-sparse dense-copy" in card
    assert 'timm.create_model("local-dir:dense-copy", pretrained=True)' in card
    src = write_folder(tmp_path / "compact", saved_checkpoint["compact_files"])
    with pytest.raises(RuntimeError, match="size mismatch"):  # what the card warns about
        timm.create_model(f"local-dir:{src}", pretrained=True)
    assert cli.main(["export", str(src), str(tmp_path / "dense-copy")]) == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'dense-copy'}", pretrained=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved_checkpoint["state"].items())
    assert "Plain timm reads `model.safetensors`" in (tmp_path / "dense-copy" / "README.md").read_text()


LAZY_IMPORT_PROBE = """
import sys
from itop_timm.training import build_parser
from itop_timm.cli import build_parser as cli_parser
build_parser().format_help(), cli_parser().format_help()
assert "torch" not in sys.modules, "--help imported torch"
import itop_timm
from itop_timm.config import SparsityConfig
assert SparsityConfig(method="srigl").method == "srigl"  # the registry loads its built-in entries
import timm.optim
assert "rigl_sgd" in timm.optim.list_optimizers()  # registered once timm.optim is imported
assert itop_timm.sparsify and itop_timm.MethodInfo and "sparsify" in dir(itop_timm)
print("ok")
"""


def test_help_imports_no_torch_and_names_load_on_use():
    """``--help`` of the recipe and of ``itop-timm`` answers without torch; the lazily imported package
    still registers built-in methods and timm's sparse optimizer names when they are needed."""
    out = subprocess.run(
        [sys.executable, "-c", LAZY_IMPORT_PROBE], env=subprocess_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_print_config_shows_the_resolved_values(capsys):
    from itop_timm.training import main

    assert main(["--print-config", "--sparsity.method", "srigl", "--train.seed", "7"]) is None
    sparsity = yaml.safe_load(capsys.readouterr().out)["sparsity"]
    assert sparsity["prune_rate"] == 0.3  # srigl's own default
    assert sparsity["seed"] == 7  # train.seed
    assert (sparsity["update_interval"], sparsity["final_prune_rate"], sparsity["distribution"]) == (
        100,
        0.005,
        "erk",
    )
