"""The recipe with Chase's ``shrink`` (issue 25): the live model loses its removed channels between
optimizer steps — checkpoints, resume (kill -9 included), the DDP wrapper, weight averaging and the
final checkpoints follow the smaller network."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
import yaml
from test_recipe import RECIPE, ROOT, records, run_config, subprocess_env, tiny_config

from itop_timm.checkpoint import load_sparse

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # (conftest.py)


# removals at steps 1, 3, 5 (removal_interval 2, half a ΔT before the updates), 12 steps in all
CHASE = {"method": "chase", "density": 0.3, "update_interval": 2}
OPTIONS = {"channel_sparsity": 0.5, "removal_interval": 2, "removal_end_fraction": 0.5}


def chase_config(tiny_data, output, shrink: bool, **sections):
    sparsity = {**CHASE, "method_options": {**OPTIONS, "shrink": shrink}}
    return tiny_config(tiny_data, output, sparsity=sparsity | sections.pop("sparsity", {}), **sections)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_recipe_trains_the_shrinking_network_and_writes_it(tiny_data, tmp_path):
    averaging = {"enabled": True, "period_epochs": 0.5, "bn_update_batches": 1}
    shrunk_summary = run_config(chase_config(tiny_data, tmp_path / "shrunk", True, averaging=averaging))
    full_summary = run_config(chase_config(tiny_data, tmp_path / "full", False, averaging=averaging))

    shrinks = records(tmp_path / "shrunk", "shrink")
    assert len(shrinks) >= 2 and not records(tmp_path / "full", "shrink")
    assert all(r["params_after"] < r["params_before"] for r in shrinks)
    macs = [r["macs"] for r in shrinks]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)  # every shrink cuts MACs
    assert all("mask_fingerprint" in r for r in shrinks)
    assert records(tmp_path / "shrunk", "averaging")  # write-backs into the shrunk weights

    # model/ is the shrunken network (rebuilt from timm's architecture and its record), with its masks
    shrunk, masks, meta = load_sparse(tmp_path / "shrunk" / "model")
    full, full_masks, full_meta = load_sparse(tmp_path / "full" / "model")
    assert n_params(shrunk) == shrinks[-1]["params_after"] < n_params(full)
    assert all(masks[n].shape == p.shape for n, p in shrunk.named_parameters() if n in masks)
    # the same number of active weights, in fewer positions (the checkpoint's density is its tensors')
    assert sum(int(m.sum()) for m in masks.values()) == sum(int(m.sum()) for m in full_masks.values())
    assert meta["density"] > full_meta["density"]
    # compacted/: the same architecture as compacting the unshrunk run's model (the same channels went)
    small, _, _ = load_sparse(tmp_path / "shrunk" / "compacted")
    small_full, _, _ = load_sparse(tmp_path / "full" / "compacted")
    assert {n: p.shape for n, p in small.named_parameters()} == {
        n: p.shape for n, p in small_full.named_parameters()
    }
    assert shrunk_summary["compacted"]["max_abs_output_change"] < 1e-4
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), shrunk.eval()(x), rtol=1e-4, atol=1e-4)
    # the same run up to fp32 rounding: the first steps' losses agree (later, rounding may flip a tie)
    first = [r["loss"] for r in records(tmp_path / "shrunk", "train")[:3]]
    first_full = [r["loss"] for r in records(tmp_path / "full", "train")[:3]]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(first_full), rtol=1e-4, atol=1e-5)
    assert shrunk_summary["best_val_top1"] is not None and (tmp_path / "shrunk" / "best.safetensors").exists()
    assert full_summary["density"] == pytest.approx(shrunk_summary["density"], abs=1e-9)


def launch(script, config, *extra, kill_at=None, processes=1):
    env = subprocess_env() | ({"KILL_AT_STEP": str(kill_at)} if kill_at else {})
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        prefix += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        prefix += ["--main_process_port", "0"]
    return subprocess.run(
        [*prefix, str(script), "--config", str(config), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_same_run(a, b) -> None:
    """Bit-exact: masks, union, weights, R_s and the logged losses."""
    model_a, masks_a, meta_a = load_sparse(a / "model")
    model_b, masks_b, meta_b = load_sparse(b / "model")
    assert masks_a.keys() == masks_b.keys()
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(meta_a["ever_active"][n], meta_b["ever_active"][n]) for n in masks_a)
    assert meta_a["itop_rate"] == meta_b["itop_rate"]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert meta_a["sha256"] == meta_b["sha256"]
    loss = [(r["step"], r["loss"]) for r in records(a, "train")]
    assert loss == [(r["step"], r["loss"]) for r in records(b, "train")]


def test_kill_and_resume_across_a_shrink_is_bit_exact(tiny_data, tmp_path):
    cfg = chase_config(
        tiny_data,
        tmp_path / "whole",
        True,
        train={"epochs": 3},
        run={"log_interval": 3},
        averaging={"enabled": True, "period_epochs": 1.0},
    )
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(cfg))
    cfg["run"]["output_dir"] = str(tmp_path / "killed")
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))

    whole = launch(RECIPE, tmp_path / "whole.yaml")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert len(records(tmp_path / "whole", "shrink")) >= 2
    killed = launch(ROOT / "tests" / "kill_at_step.py", tmp_path / "killed.yaml", kill_at=10)
    assert killed.returncode == -signal.SIGKILL
    # the checkpoint resumed from (step 8) holds shrunk weights (the fresh model is brought to them) and
    # the resumed run shrinks again (step 9)
    shrunk_at = [r["step"] for r in records(tmp_path / "killed", "shrink")]
    assert min(shrunk_at) < 8 < max(shrunk_at)
    resumed = launch(RECIPE, tmp_path / "killed.yaml", "--run.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_two_processes_rebuild_ddp_after_each_shrink_and_resume_exactly(tiny_data, tmp_path):
    cfg = chase_config(tiny_data, tmp_path / "whole", True, train={"epochs": 4}, run={"keep_checkpoints": 10})
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(cfg))
    whole = launch(RECIPE, tmp_path / "whole.yaml", processes=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    shrinks = records(tmp_path / "whole", "shrink")
    # 48 images, 8 per process and step: 3 steps per epoch, 12 in all; removals at steps 1, 3, 5 and at
    # the schedule's end (half the run)
    assert [r["step"] for r in shrinks] == [1, 3, 5, 6]
    # the masks were checked identical on both ranks after every shrink (a collective fingerprint), and
    # the new DDP wrapper checks that both ranks' parameters have the same shapes
    assert all(r["mask_fingerprint"] is not None for r in shrinks)
    model, _, _ = load_sparse(tmp_path / "whole" / "model")
    assert n_params(model) == shrinks[-1]["params_after"]
    # resume in a new folder from the checkpoint after the second shrink (step 4): the same run
    resumed = launch(
        RECIPE,
        tmp_path / "whole.yaml",
        "--run.resume",
        str(tmp_path / "whole" / "checkpoints" / "step_00000004"),
        "--run.output_dir",
        str(tmp_path / "resumed"),
        processes=2,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "resumed", "shrink")] == [5, 6]
    model_a, masks_a, meta_a = load_sparse(tmp_path / "whole" / "model")
    model_b, masks_b, meta_b = load_sparse(tmp_path / "resumed" / "model")
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize(
    "sections, env, message",
    [
        ({"train": {"fsdp": True}}, {}, r"shrink with train.fsdp=true: sharded parameters cannot be sliced"),
        (
            {},
            {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"},
            r"shrink with torch.compile \(accelerate launch --dynamo_backend inductor\): .* recompiled",
        ),
    ],
    ids=["fsdp", "compile"],
)
def test_recipe_refuses_shrink_where_it_cannot_run_before_writing(
    tiny_data, tmp_path, monkeypatch, sections, env, message
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        run_config(chase_config(tiny_data, tmp_path / "run", True, **sections))
    assert not (tmp_path / "run").exists()
