"""``python -m itop_timm.timm_train`` runs a timm-train.py-like script unchanged with the sparse optimizers
registered: ``total_steps`` derived from timm's schedule and loader, the sparsity figures in timm's log
lines and ``summary.csv``, the safetensors sparse folder next to timm's checkpoints (and ``info`` on a
``.pth`` pointing to it), 2 ranks under torchrun, a missing script refused. (A resume from the script's
checkpoint through ``itop-timm timm-train``: ``test_cli.py``.)"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itop_timm import cli
from itop_timm.checkpoint import load_sparse
from itop_timm.distributed import masks_fingerprint
from itop_timm.serialization import CheckpointError
from itop_timm.timm_train import SPARSE_FOLDER, derive_total_steps

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("timm_train_like.py")
SPARSE_ARGS = ["--opt", "rigl_sgd", "--opt-kwargs", "density=0.2", "total_steps=20", "update_interval=2"]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def report(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def test_the_script_alone_cannot_build_a_sparse_optimizer(tmp_path):
    out = run([sys.executable, str(SCRIPT), *SPARSE_ARGS, "--output", str(tmp_path)])
    assert out.returncode != 0
    assert "unexpected keyword argument 'density'" in out.stderr  # why the runner exists


@pytest.mark.slow  # 2 fresh processes importing timm: ~1 min on 2 cores
def test_runner_under_torchrun_two_ranks_hold_identical_masks(tmp_path):
    out = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port of its own
            "--nproc_per_node",
            "2",
            "-m",
            "itop_timm.timm_train",
            str(SCRIPT),
            *SPARSE_ARGS,
            "--samples",
            "32",  # 2 batches per rank and epoch
            "--output",
            str(tmp_path),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = report(tmp_path, 0), report(tmp_path, 1)
    assert r0["step"] == r1["step"] == 4
    assert r0["fingerprint"] == r1["fingerprint"] and r0["itop_rate"] == r1["itop_rate"] > 0.2
    # the sparsity lines come from rank 0 only, once each
    console = out.stdout + out.stderr
    for line in ("Topology update 1 at step 2:", "Topology update 2 at step 4:", "Sparsity: epoch 1 "):
        assert console.count(line) == 1, console[-3000:]
    _, masks, meta = load_sparse(tmp_path / SPARSE_FOLDER)
    assert meta["step"] == 4 and masks_fingerprint(list(masks.values())) == r0["fingerprint"]


def test_runner_derives_total_steps_prints_sparsity_and_writes_the_sparse_folder(tmp_path):
    # 1 epoch + 1 warm-up epoch (prefix) + 1 cool-down epoch, 2 batches each: timm trains 6 updates
    schedule = ["--epochs", "1", "--warmup-epochs", "1", "--warmup-prefix", "--cooldown-epochs", "1"]
    sparse = ["--opt", "rigl_sgd", "--opt-kwargs", "density=0.2", "update_interval=2"]
    out = run(
        [
            sys.executable,
            "-m",
            "itop_timm.timm_train",
            str(SCRIPT),
            *sparse,
            *schedule,
            "--output",
            str(tmp_path),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = report(tmp_path)
    assert r["total_steps"] == r["step"] == 6  # derived: no topology update at the last step
    console = out.stdout + out.stderr
    assert "total_steps=6 (timm's scheduled epochs" in console
    train_lines = [line for line in console.splitlines() if line.startswith("Train:")]
    assert len(train_lines) == 6 and all(
        re.search(r"  Density: 0\.\d{4}  R_s: 0\.\d{4}$", t) for t in train_lines
    )
    assert [line.split(":")[0] for line in console.splitlines() if line.startswith("Topology update")] == [
        "Topology update 1 at step 2",
        "Topology update 2 at step 4",
    ]
    assert f"Sparsity: epoch 2  Density: {r['density']:.4f}  R_s: {r['itop_rate']:.4f}" in console
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert float(rows[-1]["train_itop_rate"]) == pytest.approx(r["itop_rate"])
    assert float(rows[-1]["train_density"]) == pytest.approx(r["density"])
    # the Hub-ready folder next to timm's checkpoint, verified on load, the last epoch's weights
    model, masks, meta = load_sparse(tmp_path / SPARSE_FOLDER)
    assert (
        meta["method"] == "rigl" and meta["step"] == 6 and meta["itop_rate"] == pytest.approx(r["itop_rate"])
    )
    assert masks_fingerprint(list(masks.values())) == r["fingerprint"]
    assert meta["metrics"]["epoch"] == 2 and float(rows[-1]["eval_top1"]) == meta["metrics"]["eval_top1"]
    recorded = meta["training_config"]["timm_train"]
    assert (
        recorded["opt"] == "rigl_sgd"
        and recorded["opt_kwargs"]["density"] == 0.2
        and "output" not in recorded
    )
    saved = torch.load(tmp_path / "last.pth", weights_only=True)["state_dict"]  # the stand-in's own file
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # timm's checkpoint itself is refused (a pickle), pointing to the folder
    with pytest.raises(
        CheckpointError, match=rf"a pickle.*{re.escape(str(tmp_path / SPARSE_FOLDER))} \(pass that"
    ):
        load_sparse(tmp_path / "last.pth")
    assert cli.main(["info", str(tmp_path / "last.pth")]) == 2


def test_derived_total_steps_are_timms_scheduled_epochs_times_updates_per_epoch():
    args = argparse.Namespace(
        sched="cosine", epochs=10, warmup_epochs=2, warmup_prefix=True, cooldown_epochs=3, grad_accum_steps=4
    )
    assert derive_total_steps(args, train_batches=10) == (10 + 2 + 3) * 3  # ceil(10 / 4) updates
    args.warmup_prefix, args.cooldown_epochs, args.grad_accum_steps = False, 0, 1
    assert derive_total_steps(args, train_batches=10) == 10 * 10


def test_a_missing_total_steps_names_opt_kwargs():
    import timm
    from timm.optim import create_optimizer_v2

    model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    with pytest.raises(ValueError, match=r"pass total_steps.*--opt-kwargs total_steps=N"):
        create_optimizer_v2(model, "rigl_sgd", lr=0.1, density=0.1)


def test_runner_rejects_a_missing_script(tmp_path):
    out = run([sys.executable, "-m", "itop_timm.timm_train", str(tmp_path / "train.py")])
    assert out.returncode == 2 and "not found" in out.stderr
