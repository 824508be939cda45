"""FSDP2 vs DDP with the sparsifier on 2 CPU ranks (gloo): memory per rank and step overhead.

Three runs of timm ``vit_small_patch16_224`` (22 M parameters; 64 px inputs keep the CPU compute
small, the memory that matters — weights, gradients, AdamW state, masks — does not depend on it), each
2 processes started with ``torch.multiprocessing`` over gloo, the same data on both ranks:

* ``ddp_sparse``: DDP + ``sparsify`` (RigL, density 0.1);
* ``fsdp_sparse``: ``fully_shard`` per block + root + ``sparsify`` (same settings);
* ``fsdp_dense``: ``fully_shard``, no sparsifier.

Per rank it records the training-state bytes this rank holds (parameters, gradients, optimizer state,
masks and union masks: local shards for FSDP), the process's peak RSS (``ru_maxrss``: includes the
Python/torch runtime), the median step time with the mask hook but no topology update
(``update_interval`` beyond the run), the time of the mask hook alone (``apply_masks``: the
sparsifier's whole per-step work) and the time of one topology update (which gathers one layer at a
time). The machine is shared with other work: step times are noisy; min and max over the timed steps
are reported with the median.

    uv run python benchmarks/fsdp.py [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

MODES = ("ddp_sparse", "fsdp_sparse", "fsdp_dense")
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(mode: str, model_name: str, img_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model to call, the module whose parameters the optimizer sees)."""
    import timm
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size, num_classes=10)
    if mode == "ddp_sparse":
        return torch.nn.parallel.DistributedDataParallel(model), model
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, model


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sp: Any) -> int:
    """Bytes of this rank's training state: parameters, gradients, optimizer state, masks, union."""
    from itop_timm.distributed import local

    def nbytes(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():
        total += nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0)
        total += sum(nbytes(v) for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor))
    if sp is not None:
        total += sum(nbytes(m) for m in sp.masks.values()) + sum(nbytes(m) for m in sp.ever_active.values())
    return total


def _worker(rank: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    import itop_timm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the cores shared by the 2 ranks
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model, inner = _build(mode, args.model, args.img_size)
        optimizer = torch.optim.AdamW(inner.parameters(), lr=1e-3)
        sp = None
        if mode != "fsdp_dense":
            sp = itop_timm.sparsify(
                inner, optimizer, method="rigl", density=0.1, update_interval=10**9, total_steps=10**9
            )
        g = torch.Generator().manual_seed(0)
        times = []
        for step in range(args.steps + args.warmup):
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        hook_s = None
        if sp is not None:  # the per-step cost itself: re-masking local shards of weights and AdamW state
            hook_times = []
            for _ in range(20):
                start = time.perf_counter()
                sp.apply_masks()
                hook_times.append(time.perf_counter() - start)
            hook_s = statistics.median(hook_times)
        update_s = None
        if sp is not None:
            dist.barrier()
            start = time.perf_counter()
            sp.update_topology()
            update_s = time.perf_counter() - start
        result = {
            "state_mib": _state_bytes(inner, optimizer, sp) / MIB,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024,
            "step_s_median": statistics.median(times),
            "step_s_min": min(times),
            "step_s_max": max(times),
            "hook_s": hook_s,
            "update_s": update_s,
            "itop_rate": sp.itop_rate if sp is not None else None,
        }
        torch.save(result, os.path.join(out, f"{mode}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(_free_port(), mode, args, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2)]


def main() -> None:
    import tempfile

    from _common import machine, write_json

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="vit_tiny, 3 steps: checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.model, args.img_size, args.batch, args.steps, args.warmup = "vit_tiny_patch16_224", 32, 4, 3, 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            results[mode] = run_mode(mode, args, Path(tmp))
            r0 = results[mode][0]
            print(
                f"{mode:12s} state/rank {r0['state_mib']:8.1f} MiB  peak RSS/rank {r0['peak_rss_mib']:8.1f} MiB  "
                f"step {1000 * r0['step_s_median']:7.1f} ms (min {1000 * r0['step_s_min']:.1f}, "
                f"max {1000 * r0['step_s_max']:.1f})"
                + (f"  hook {1000 * r0['hook_s']:.1f} ms" if r0["hook_s"] is not None else "")
                + (f"  update {1000 * r0['update_s']:.0f} ms" if r0["update_s"] is not None else "")
            )
    overhead = results["fsdp_sparse"][0]["step_s_median"] / results["fsdp_dense"][0]["step_s_median"] - 1
    print(f"sparsifier step overhead under FSDP (rank 0, medians): {100 * overhead:+.1f} %")
    name = "fsdp" + ("_quick" if args.quick else "") + ".json"
    path = write_json(
        name,
        {
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items()},
            "ranks": 2,
            "results": results,
            "fsdp_sparse_vs_dense_step_overhead": overhead,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
