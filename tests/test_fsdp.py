"""Sparse training of FSDP2-sharded timm models (``fully_shard``) on two CPU ranks over gloo.

Every rank sees the same data, so a sharded run must reproduce a single-process run with the same seed:
bit-identical masks and union masks (R_s), weights within 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import free_port

import itop_timm
from itop_timm.distributed import full_state_dict, full_tensor, masks_fingerprint

METHODS = ("rigl", "set", "snfs", "unfired")
STEPS = 6


def tiny_vit() -> torch.nn.Module:
    """A two-block ViT (odd head size: uneven shards) with the same initial weights in every process."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=5, embed_dim=48, num_heads=2
    )


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 like Accelerate wraps timm: every block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def train(model: torch.nn.Module, method: str, steps: int = STEPS) -> dict:
    """Sparse training on fixed data; returns full masks, union, R_s and weights."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = itop_timm.sparsify(
        model, optimizer, method=method, density=0.3, update_interval=2, total_steps=20, seed=3
    )
    g = torch.Generator().manual_seed(7)
    fingerprints = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        fingerprints.append(masks_fingerprint(list(sp.masks.values())))
    return {
        "masks": {n: full_tensor(m).cpu() for n, m in sp.masks.items()},
        "union": {n: full_tensor(m).cpu() for n, m in sp.ever_active.items()},
        "itop_rate": sp.itop_rate,
        "density": sp.density,
        "layer_densities": sp.layer_densities(),
        "fingerprints": fingerprints,
        "weights": full_state_dict(model),
        "mask_is_dtensor": type(next(iter(sp.masks.values()))).__name__,
        "local_numel": sum(m.to_local().numel() for m in sp.masks.values())
        if hasattr(next(iter(sp.masks.values())), "to_local")
        else None,
    }


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def set_run(model: torch.nn.Module) -> tuple[torch.nn.Module, itop_timm.Sparsifier]:
    """4 SGD steps of SET at density 0.3 on fixed inputs (sharded or not: the same run)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = itop_timm.sparsify(
        model, optimizer, method="set", density=0.3, update_interval=2, total_steps=20, seed=1
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 16, 16, generator=g)).sum().backward()
        optimizer.step()
    return model, sp


def save_and_reload(out_dir: str) -> dict:
    """save_sparse on every rank of a sharded run, then seed a new sharded run from load_sparse's masks."""
    model, sp = set_run(shard(tiny_vit()))
    folder = itop_timm.save_sparse(model, sp, os.path.join(out_dir, "sharded_model"))
    assert folder.is_dir()  # every rank returns once rank 0 has written it
    _, masks, _ = itop_timm.load_sparse(folder)
    seeded = shard(tiny_vit())
    sp2 = itop_timm.sparsify(
        seeded, torch.optim.SGD(seeded.parameters(), lr=0.1), masks=masks, total_steps=10
    )
    return {
        "itop_rate": sp.itop_rate,
        "seeded_masks_equal": all(torch.equal(full_tensor(sp2.masks[n]), m) for n, m in masks.items()),
        "seeded_is_dtensor": all(type(m).__name__ == "DTensor" for m in sp2.masks.values()),
    }


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    try:
        results = {method: train(shard(tiny_vit()), method) for method in METHODS}
        results["save"] = save_and_reload(out_dir)
        _, sp = set_run(shard(tiny_vit()))
        if rank == 0:  # printed on one rank only: must not wait for a collective the other never joins
            results["printed"] = {"repr": repr(sp), "density": sp.density, "itop_rate": sp.itop_rate}
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_run_equals_single_process(sharded_runs, method):
    single = train(tiny_vit(), method)
    for rank, runs in enumerate(sharded_runs[1]):
        run = runs[method]
        assert run["mask_is_dtensor"] == "DTensor"
        assert run["local_numel"] < sum(m.numel() for m in run["masks"].values())  # really sharded
        for name, mask in single["masks"].items():
            assert torch.equal(run["masks"][name], mask), f"rank {rank}: mask of {name} differs"
            assert torch.equal(run["union"][name], single["union"][name]), f"rank {rank}: union of {name}"
        assert run["itop_rate"] == single["itop_rate"] > single["density"]  # masks did move
        assert run["density"] == single["density"]
        assert run["layer_densities"] == single["layer_densities"]
        assert run["fingerprints"] == single["fingerprints"]
        assert run["weights"].keys() == single["weights"].keys()
        for name, w in single["weights"].items():
            torch.testing.assert_close(run["weights"][name], w, atol=1e-5, rtol=0, msg=name)


def test_printing_a_sharded_sparsifier_on_one_rank_runs_no_collective(sharded_runs):
    printed = sharded_runs[1][0]["printed"]
    single = set_run(tiny_vit())[1]
    assert printed["density"] == single.density and printed["itop_rate"] == single.itop_rate
    assert printed["repr"] == repr(single)


def test_sharded_save_sparse_writes_todays_folder(sharded_runs, tmp_path):
    """The folder written from 2 ranks equals a single-process save of the same training, and plain
    timm loads it with the same outputs."""
    import timm
    from safetensors.torch import load_file

    out, runs = sharded_runs
    sharded = out / "sharded_model"
    model, sp = set_run(tiny_vit())
    single = itop_timm.save_sparse(model, sp, tmp_path / "single_model")
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (sharded / "config.json").read_text() == (single / "config.json").read_text()
    masks, reference_masks = (
        load_file(sharded / "sparsity.safetensors"),
        load_file(single / "sparsity.safetensors"),
    )
    assert masks.keys() == reference_masks.keys()
    assert all(torch.equal(masks[k], reference_masks[k]) for k in masks)  # masks and union, bit-packed
    weights, reference = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, w in reference.items():
        torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=0, msg=name)

    plain = timm.create_model(f"local-dir:{sharded}", pretrained=True).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x), atol=1e-5, rtol=0)
    assert all(r["save"]["itop_rate"] == sp.itop_rate for r in runs)


def test_load_sparse_masks_seed_a_sharded_run(sharded_runs):
    for run in sharded_runs[1]:
        assert run["save"]["seeded_is_dtensor"] and run["save"]["seeded_masks_equal"]


def test_fsdp1_is_rejected_naming_fsdp2():
    """FSDP1 cannot be constructed without an accelerator, so a subclass skips its constructor: what
    sparsify sees is the same (an FSDP1 module in the tree)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fsdp1Stub(FullyShardedDataParallel):
        __getattr__ = torch.nn.Module.__getattr__
        named_parameters = torch.nn.Module.named_parameters
        named_modules = torch.nn.Module.named_modules

        def __init__(self, module: torch.nn.Module) -> None:
            torch.nn.Module.__init__(self)
            self.inner = module

    inner = tiny_vit()
    before = {n: p.detach().clone() for n, p in inner.named_parameters()}
    with pytest.raises(ValueError, match=r"FSDP1.*fully_shard.*fsdp_version: 2"):
        itop_timm.sparsify(
            Fsdp1Stub(inner), torch.optim.SGD(inner.parameters(), lr=0.1), density=0.1, total_steps=5
        )
    assert all(torch.equal(p, before[n]) for n, p in inner.named_parameters())


def test_deepspeed_zero3_parameters_are_rejected():
    """ZeRO-3 marks its partitioned parameters with ``ds_id`` (DeepSpeed itself is not installed here)."""
    model = tiny_vit()
    model.head.weight.ds_id = 0
    before = model.head.weight.detach().clone()
    with pytest.raises(ValueError, match="DeepSpeed.*fully_shard"):
        itop_timm.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.1, total_steps=5)
    assert torch.equal(model.head.weight, before)


# --------------------------------------------------------------------------- the recipe (train.fsdp)
def fsdp_recipe_config(data_dir: str, output) -> dict:
    from test_recipe import tiny_config

    cfg = tiny_config(data_dir, output, train={"epochs": 3, "fsdp": True}, sparsity={"method": "set"})
    cfg["model"] = {
        "name": "vit_tiny_patch16_224",
        "in_chans": 1,
        "img_size": 16,
        "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    }
    return cfg


def accelerate_launch(script, config, *extra, kill_at=None):
    """``accelerate launch --num_processes 2`` on the CPU (gloo)."""
    import subprocess
    import sys

    from test_recipe import subprocess_env

    env = subprocess_env() | ({"KILL_AT_STEP": str(kill_at)} if kill_at else {})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", "0", str(script), "--config", str(config), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def fsdp_data(tmp_path_factory) -> str:
    from helpers import make_disk_dataset

    return make_disk_dataset(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)


def test_recipe_trains_sharded_under_accelerate_launch(fsdp_data, tmp_path):
    import json

    import timm
    import yaml
    from test_recipe import RECIPE, records

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(fsdp_recipe_config(fsdp_data, tmp_path / "run")))
    result = accelerate_launch(RECIPE, tmp_path / "cfg.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["total_steps"] == 9
    assert summary["itop_rate"] > summary["density"] == pytest.approx(0.3, abs=1e-3)
    # Accelerate's FSDP checkpoint (full state on rank 0) plus the sparsifier's safetensors state
    last = tmp_path / "run" / "checkpoints" / "step_00000009"
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "itop_timm_state.safetensors"} <= {
        p.name for p in last.iterdir()
    }
    updates = records(tmp_path / "run", "topology_update")
    assert updates and all(r["ranks"] == 2 for r in updates)
    model, masks, meta = itop_timm.load_sparse(tmp_path / "run" / "model")
    assert meta["itop_rate"] == pytest.approx(summary["itop_rate"])
    plain = timm.create_model(f"local-dir:{tmp_path / 'run' / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


@pytest.mark.slow
def test_recipe_kill_and_resume_under_fsdp_is_exact(fsdp_data, tmp_path):
    import yaml
    from test_recipe import RECIPE, ROOT, records

    cfg = fsdp_recipe_config(fsdp_data, tmp_path / "whole")
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(cfg))
    cfg["run"]["output_dir"] = str(tmp_path / "killed")
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))

    whole = accelerate_launch(RECIPE, tmp_path / "whole.yaml")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = accelerate_launch(ROOT / "tests" / "kill_at_step.py", tmp_path / "killed.yaml", kill_at=6)
    assert killed.returncode != 0, "the run was not killed"
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_00000004"]
    resumed = accelerate_launch(RECIPE, tmp_path / "killed.yaml", "--run.resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    model_a, masks_a, meta_a = itop_timm.load_sparse(tmp_path / "whole" / "model")
    model_b, masks_b, meta_b = itop_timm.load_sparse(tmp_path / "killed" / "model")
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(meta_a["ever_active"][n], meta_b["ever_active"][n]) for n in masks_a)
    assert meta_a["itop_rate"] == meta_b["itop_rate"] and meta_a["step"] == meta_b["step"] == 9
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    loss_a = [(r["step"], r["loss"]) for r in records(tmp_path / "whole", "train")]
    loss_b = [(r["step"], r["loss"]) for r in records(tmp_path / "killed", "train")]
    assert loss_a == loss_b


def test_paused_sparsifier_ignores_the_optimizer_state_initialisation_step():
    """torch.distributed.checkpoint's optimizer-state helpers (used by Accelerate's FSDP save/load_state)
    step an optimizer that has no state yet once, with zero gradients and lr 0: not a training step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = itop_timm.sparsify(model, optimizer, method="rigl", density=0.3, update_interval=1, total_steps=9)
    with sp.paused():
        get_optimizer_state_dict(model, optimizer)
    assert sp.step == 0 and sp.last_update is None
    assert optimizer.state  # the initialisation did step the optimizer
    model.zero_grad(set_to_none=True)
    optimizer.state.clear()
    get_optimizer_state_dict(model, optimizer)  # unpaused, the same call counts as a step
    assert sp.step == 1


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("resnet18", ["BasicBlock"]),
        ("vit_tiny_patch16_224", ["Block"]),
        ("efficientnet_b0", ["DepthwiseSeparableConv", "InvertedResidual"]),
        ("convnext_atto", ["ConvNeXtBlock"]),
    ],
)
def test_recipe_wraps_timm_blocks(name, blocks):
    import timm

    from itop_timm.training.fsdp import block_class_names

    with torch.device("meta"):
        assert block_class_names(timm.create_model(name)) == blocks


def test_recipe_refuses_fsdp_with_weight_averaging(tmp_path):
    from itop_timm.training import run
    from itop_timm.training.config import TrainConfig
    from itop_timm.training.loop import InputError

    cfg = fsdp_recipe_config("unused", tmp_path / "run")
    cfg["averaging"] = {"enabled": True}
    with pytest.raises(InputError, match="train.fsdp=true does not support averaging"):
        run(TrainConfig.from_dict(cfg))
    assert not (tmp_path / "run").exists()
