"""Style gate: ruff lint + format check over the package, tests, recipes and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [p for p in ("itop_timm", "tests", "recipes", "benchmarks") if (ROOT / p).exists()]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or sys.executable
    cmd = [exe, *args] if exe.endswith("ruff") else [exe, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint():
    result = ruff("check", "--output-format", "concise", *TARGETS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = ruff("format", "--check", *TARGETS)
    assert result.returncode == 0, result.stdout + result.stderr
