"""Identical masks on every rank: two CPU processes over gloo, each seeded differently on purpose."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import itop_timm
from itop_timm.distributed import all_ranks_agree, masks_fingerprint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out_dir: str, compute: str = "masked") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, out_dir, compute)
        # The DDP wrapper's reducer holds the process group inside reference cycles: collect them before
        # the group is destroyed rather than at interpreter exit, where gloo's threads can abort the
        # process ("terminate called without an active exception", seen in CI).
        gc.collect()
    finally:
        dist.destroy_process_group()


def train(rank: int, out_dir: str, compute: str) -> None:
    """Six DDP steps of a small sparse model; saves this rank's mask fingerprints and weights."""
    torch.manual_seed(100 + rank)  # different weights on purpose; DDP broadcasts rank 0's
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = itop_timm.sparsify(
        model,
        optimizer,
        method="set",
        density=0.3,
        update_interval=2,
        total_steps=20,
        seed=rank,
        compute=compute,
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    fingerprints = [masks_fingerprint(list(sp.masks.values()))]
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        fingerprints.append(masks_fingerprint(list(sp.masks.values())))
    agree, values = all_ranks_agree(fingerprints[-1])
    torch.save(
        {
            "fingerprints": fingerprints,
            "agree": agree,
            "values": values,
            "itop": sp.itop_rate,
            "step": sp.step,
            "weights": [p.detach().clone() for p in model.parameters()],
            "kernel_layers": 0 if sp._compute is None else len(sp._compute.layers),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.parametrize("compute", ["masked", "sparse", "auto"])
def test_two_ranks_hold_identical_masks(tmp_path, compute):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), compute), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["fingerprints"] == r1["fingerprints"]  # after init and after every step (3 updates)
    assert len(set(r0["fingerprints"])) > 1  # the masks did change
    assert r0["agree"] and r1["agree"] and r0["values"] == r1["values"]
    assert r0["step"] == r1["step"] == 6 and r0["itop"] == r1["itop"] > 0.3
    assert r0["kernel_layers"] == (0 if compute == "masked" else 2)
    for a, b in zip(
        r0["weights"], r1["weights"], strict=True
    ):  # DDP: the same averaged gradients on both ranks
        assert torch.equal(a, b)
