"""Every ```python and ```bash block of README.md runs as pasted, at tiny sizes.

The blocks run in the README's order: the Python blocks in one namespace (later blocks continue from
the first one's ``model``, ``optimizer``, ``loader``, ``sp``, as the README says), in a temporary
folder; the bash blocks with ``bash -e`` from the repository root, the environment's ``bin`` first on
``PATH`` (the README's ``source .venv/bin/activate``). Before running, the exact strings of
:data:`SUBSTITUTIONS` are replaced: tiny models, inputs and data instead of the README's. Each of them
must occur in the README, so the table cannot silently stop applying. The blocks of :data:`SKIPPED`
cannot run here (network, minutes of training, several processes); each must still exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import make_disk_dataset
from test_recipe import subprocess_env, tiny_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)

#: README text -> what the test runs instead (every key must occur in the README)
SUBSTITUTIONS = {
    # the first block's data: 64 random images instead of 256
    "torch.randn(256, 3, 32, 32), torch.randint(0, 100, (256,))": (
        "torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))"
    ),
    # timm's tiny test model instead of ResNets
    'timm.create_model("resnet50", num_classes=100)': 'timm.create_model("test_resnet", num_classes=100)',
    'timm.create_model("resnet18", num_classes=100)': 'timm.create_model("test_resnet", num_classes=100)',
    # tracing inputs for torch-pruning at 32 px
    "torch.zeros(1, 3, 224, 224)": "torch.zeros(1, 3, 32, 32)",
    # the recipe: a one-epoch run on 64 images (set up by the test) instead of the demo's config
    "recipes/configs/fashion_mnist_rigl_itop.yaml": "{config}",
    "runs/fashion_mnist_rigl_itop": "{run}",
}

#: a text found in exactly one skipped block -> why it cannot run here
SKIPPED = {
    "bash recipes/demo.sh": "the demo trains for about 6 min and the suite runs minutes (the README's first lines)",
    "python3 -m uv sync --locked": "builds the environment from the package registries (network); "
    "the test runs in that environment",
    "python -m itop_timm.timm_train path/to/pytorch-image-models/train.py": "needs a pytorch-image-models "
    "checkout and ImageNet (the runner is tested in test_timm_train.py)",
    "from torch.distributed.fsdp import fully_shard": "needs a torch.distributed process group "
    "(tested on 2 ranks in test_fsdp.py)",
    'itop_timm.push_to_hub("ckpt", "org/name", private=True)': "needs the Hugging Face Hub "
    "(network and a token; tested against a local Hub server in test_hub.py)",
    "accelerate launch --multi_gpu --num_processes 2": "full training runs, several processes "
    "(tested in test_recipe.py and test_distributed.py)",
}


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every ```python and ```bash block, in order."""
    return BLOCK.findall(README.read_text())


def test_every_readme_block_runs(tmp_path, monkeypatch):
    text = README.read_text()
    for old in SUBSTITUTIONS:
        assert old in text, f"substitution {old!r} no longer occurs in README.md: update the table"
    blocks = readme_blocks()
    skipped = {marker: [code for _, code in blocks if marker in code] for marker in SKIPPED}
    for marker, found in skipped.items():
        assert len(found) == 1, f"{len(found)} README blocks contain the skip marker {marker!r}"
    skipped_codes = {found[0] for found in skipped.values()}
    run_dir = tmp_path / "run"
    data = make_disk_dataset(tmp_path / "data", n_train=64, n_test=32)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, run_dir, train={"epochs": 1})))
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for index, (language, code) in enumerate(blocks):
        if code in skipped_codes:
            continue
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new.format(config=config, run=run_dir))
        where = f"README.md block {index} ({language})"
        if language == "python":
            exec(compile(code, where, "exec"), namespace)
        else:
            result = subprocess.run(
                ["bash", "-e", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, f"{where} failed:\n{code}\n{result.stderr[-3000:]}"
        ran += 1
    assert ran == len(blocks) - len(SKIPPED)
    assert 0 < namespace["sp"].density <= 0.5  # the last block's sparsifier
    assert (run_dir / "model").is_dir() and (run_dir / "best.safetensors").is_file()


def test_readme_first_lines_are_the_demo_and_the_test_suite():
    """The README opens with exactly two commands: the demo and the test suite."""
    language, code = readme_blocks()[0]
    commands = [line.split("#")[0].strip() for line in code.splitlines() if line.strip()]
    assert language == "bash" and commands == [
        "bash recipes/demo.sh",
        "python3 -m pip install -q uv && python3 -m uv run --locked pytest",
    ]
