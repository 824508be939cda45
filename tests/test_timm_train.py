"""``python -m itop_timm.timm_train`` runs a timm-train.py-like script unchanged with the sparse optimizers
registered: 2 ranks under torchrun, a missing script refused. (One process and a resume from its
checkpoint through ``itop-timm timm-train``: ``test_cli.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
            "--output",
            str(tmp_path),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = report(tmp_path, 0), report(tmp_path, 1)
    assert r0["step"] == r1["step"] == 4
    assert r0["fingerprint"] == r1["fingerprint"] and r0["itop_rate"] == r1["itop_rate"] > 0.2


def test_runner_rejects_a_missing_script(tmp_path):
    out = run([sys.executable, "-m", "itop_timm.timm_train", str(tmp_path / "train.py")])
    assert out.returncode == 2 and "not found" in out.stderr
