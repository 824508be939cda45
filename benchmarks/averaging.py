"""Periodic sampled weight averaging on Fashion-MNIST (timm resnet18, 1 channel): dense and RigL-ITOP
at density 0.1, each with and without PWALKS averaging (one period per epoch, q = --sample-prob, last
--last-fraction of each epoch, BatchNorm re-estimated on 50 batches after each write-back), several seeds.

Reported per configuration: final test top-1 and volatility = std of the per-epoch test top-1 over the
last half of training (the test split is evaluated after every epoch, i.e. right after each write-back).

    uv run python benchmarks/averaging.py [--seeds 0 1 2] [--epochs 10] [--train-samples 10000] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from _common import (
    RESULTS,
    RUNS,
    add_reuse_flag,
    fashion_mnist_config,
    machine,
    mean_std,
    run_recipe,
    write_json,
)

from itop_timm.plots import pyplot, save_figure

CONFIGS = [("dense", False), ("dense", True), ("rigl", False), ("rigl", True)]


def label(method: str, averaging: bool) -> str:
    return f"{'dense' if method == 'dense' else 'RigL-ITOP d=0.1'}{' + PWALKS' if averaging else ''}"


def plot(runs: list[dict], path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, averaging in CONFIGS:
        curves = [r["per_epoch_top1"] for r in runs if r["method"] == method and r["averaging"] == averaging]
        if not curves:
            continue
        epochs = range(1, len(curves[0]) + 1)
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(
            epochs, mean, marker="o", linestyle="-" if averaging else "--", label=label(method, averaging)
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.set_title("Fashion-MNIST resnet18: with / without weight averaging")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--sample-prob", type=float, default=0.5)
    parser.add_argument("--last-fraction", type=float, default=0.5)
    parser.add_argument("--update-interval", type=int, default=25)
    parser.add_argument("--quick", action="store_true")
    add_reuse_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_samples = [0], 2, 512
    eval_samples = 500 if args.quick else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tag = "averaging" + ("_quick" if args.quick else "")
    start = time.time()
    runs = []
    for method, averaging in CONFIGS:
        for seed in args.seeds:
            out = RUNS / tag / f"{method}_{'avg' if averaging else 'plain'}_s{seed}"
            cfg = fashion_mnist_config(
                out,
                epochs=args.epochs,
                train_samples=args.train_samples,
                seed=seed,
                method=method,
                density=0.1,
                update_interval=args.update_interval,
                per_epoch_test=True,
                eval_samples=eval_samples,
            )
            if averaging:
                cfg["averaging"] = {
                    "enabled": True,
                    "period_epochs": 1.0,
                    "sample_prob": args.sample_prob,
                    "last_fraction": args.last_fraction,
                    "bn_update_batches": 50,
                }
            summary = run_recipe(cfg, reuse=args.reuse_runs)
            per_epoch = [
                r["top1"] for r in summary["metrics"] if r.get("event") == "eval" and r.get("split") == "val"
            ]
            half = per_epoch[len(per_epoch) // 2 :]
            runs.append(
                {
                    "method": method,
                    "averaging": averaging,
                    "seed": seed,
                    "final_top1": summary["test_top1_last"],
                    "per_epoch_top1": per_epoch,
                    "volatility": statistics.stdev(half) if len(half) > 1 else 0.0,
                    "wall_time_s": summary["wall_time_s"],
                }
            )
            logging.info(
                "%s seed %d: final %.2f volatility %.3f (%.0f s)",
                label(method, averaging),
                seed,
                runs[-1]["final_top1"],
                runs[-1]["volatility"],
                runs[-1]["wall_time_s"],
            )
    table = []
    for method, averaging in CONFIGS:
        sel = [r for r in runs if r["method"] == method and r["averaging"] == averaging]
        final = mean_std([r["final_top1"] for r in sel])
        vol = mean_std([r["volatility"] for r in sel])
        time_m = statistics.mean(r["wall_time_s"] for r in sel)
        table.append(
            {
                "config": label(method, averaging),
                "final_top1_mean": final[0],
                "final_top1_std": final[1],
                "volatility_mean": vol[0],
                "volatility_std": vol[1],
                "wall_time_s": time_m,
            }
        )
    plot_path = RESULTS / f"{tag}.png"
    plot(runs, plot_path)
    payload = {
        "benchmark": "averaging",
        "machine": machine(),
        "settings": vars(args),
        "command": "uv run python benchmarks/averaging.py" + (" --quick" if args.quick else ""),
        "wall_time_s": time.time() - start,
        "runs": runs,
        "table": table,
        "plot": str(plot_path),
    }
    path = write_json(f"{tag}.json", payload)
    print(f"{'configuration':28s} {'final top-1':>16s} {'volatility (std, last half)':>28s} {'train s':>8s}")
    for row in table:
        print(
            f"{row['config']:28s} {row['final_top1_mean']:8.2f} ± {row['final_top1_std']:4.2f} {row['volatility_mean']:18.3f} ± {row['volatility_std']:.3f} {row['wall_time_s']:8.0f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
