"""Data-parallel scaling on the CPU: 2 processes under ``accelerate launch --multi_gpu --num_processes 2``
(gloo) vs 1 process, same recipe (RigL, density 0.1, Fashion-MNIST, timm resnet18), same per-process
batch (weak scaling). Reports samples/s, the 2-process speed-up and efficiency, and whether both ranks
held identical masks at every topology update (the recipe all-gathers a mask hash and stops otherwise).

On a machine with C cores, 1 process uses C threads and each of the 2 processes C/2 (torchrun sets
OMP_NUM_THREADS), so on a CPU the comparison measures parallel efficiency, not extra hardware.

    uv run python benchmarks/scaling.py [--train-samples 10000] [--quick]
"""

from __future__ import annotations

import argparse

from _common import RUNS, add_reuse_flag, fashion_mnist_config, machine, run_recipe, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    add_reuse_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.train_samples = 1024
    tag = "scaling" + ("_quick" if args.quick else "")
    results = {}
    for processes in (1, 2):
        cfg = fashion_mnist_config(
            RUNS / tag / f"p{processes}",
            epochs=args.epochs,
            train_samples=args.train_samples,
            seed=0,
            method="rigl",
            density=0.1,
            update_interval=2 if args.quick else 10,
            batch_size=32 if args.quick else 128,  # quick: enough steps per rank for several updates
        )
        summary = run_recipe(cfg, processes=processes, reuse=args.reuse_runs)
        updates = [r for r in summary["metrics"] if r.get("event") == "topology_update"]
        results[processes] = {
            "samples_per_s": summary["samples_per_s"],
            "steps_per_s": summary["steps_per_s"],
            "total_steps": summary["total_steps"],
            "wall_time_s": summary["wall_time_s"],
            "topology_updates": len(updates),
            "ranks_agreed_at_every_update": all(
                r.get("ranks") == processes and "mask_fingerprint" in r for r in updates
            ),
            "final_mask_fingerprint": updates[-1]["mask_fingerprint"] if updates else None,
            "test_top1": summary["test_top1_last"],
        }
    speedup = results[2]["samples_per_s"] / results[1]["samples_per_s"]
    payload = {
        "benchmark": "scaling",
        "machine": machine(),
        "settings": vars(args),
        "results": results,
        "speedup_2_vs_1": speedup,
        "efficiency": speedup / 2,
    }
    path = write_json(f"{tag}.json", payload)
    for p, r in results.items():
        print(
            f"{p} process(es): {r['samples_per_s']:.0f} samples/s, {r['total_steps']} steps, {r['topology_updates']} updates, ranks agreed: {r['ranks_agreed_at_every_update']}"
        )
    print(f"speed-up 2 vs 1: {speedup:.2f}x (efficiency {speedup / 2:.0%})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
