"""Accuracy vs density: dense vs static, SET, RigL and RigL-ITOP (ITOP's ``unfired`` regrowth) at several
densities, several seeds, with R_s, on Fashion-MNIST (timm resnet18, 1 channel) or CIFAR-10.

Protocol (issue 7): 10 epochs, batch 128, SGD lr 0.1 / Nesterov 0.9 / wd 5e-4, lr x0.1 at 1/2 and 3/4,
random-crop (pad 2) + flip augmentation, ERK densities, cosine prune rate from 0.5, ΔT = --update-interval.
Every run goes through ``recipes/train.py`` in its own process.

    uv run python benchmarks/accuracy_vs_density.py --train-samples 0 --densities 0.1 0.02 \
        --update-interval 100 --reuse-runs               # the full protocol, BENCHMARKS §1 (27 runs, hours)
    uv run python benchmarks/accuracy_vs_density.py --train-samples 10000  # `make bench-full` (~3 h, 2 cores)
    uv run python benchmarks/accuracy_vs_density.py --train-samples 2000 --eval-samples 5000 \
        --update-interval 10                                                # `make bench` (~45 min)
    uv run python benchmarks/accuracy_vs_density.py --quick                # smoke run (minutes)

Writes benchmarks/results/accuracy_vs_density.json (all 60k images; _<n>img with --train-samples n, _quick
with --quick) and PNG plots (accuracy vs density, R_s vs step); runs go to results/runs/ under the same name.
Each gap to dense comes with Welch's two-sided t-test at 5 % over the seeds ("beyond seed noise" or not).
The full protocol's finished runs (config, summary, metrics log) are committed under
benchmarks/results/runs/accuracy_vs_density/, so ``--reuse-runs`` continues it from a fresh clone.

CIFAR-10 (issue 26, BENCHMARKS §9): ``--dataset cifar10`` trains the protocol of
``recipes/configs/cifar10_*.yaml`` (timm resnet18 at half width on 48 px inputs, cosine lr; dense from
``cifar10_dense.yaml``, the unstructured methods from ``cifar10_rigl_itop.yaml`` with the method and
density replaced, Chase and SRigL from their own files at the highest density) on the Hub-layout parquet
folder in ``ITOP_TIMM_CIFAR10_DIR`` (default ``../shared/data/cifar10``). It adds each run's wall time
over the dense run of the same seed (every run on one thread), and for Chase the compacted model's CPU
latency over the dense build of its architecture at 224 px (batch 1), to the table; tests every pair of
unstructured methods at each density (Welch) and the order of accuracy with R_s (Spearman); and plots
accuracy vs R_s. Runs go to results/runs/accuracy_cifar10/ (committed as above). ``--shard K/N`` splits
the plan between N copies of the script, one per core (`make bench-cifar10`):

    taskset -c 0 uv run python benchmarks/accuracy_vs_density.py --dataset cifar10 --reuse-runs --shard 0/2 &
    taskset -c 1 uv run python benchmarks/accuracy_vs_density.py --dataset cifar10 --reuse-runs --shard 1/2
    uv run python benchmarks/accuracy_vs_density.py --dataset cifar10 --summarize     # table so far
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import (
    METHOD_LABELS,
    RESULTS,
    ROOT,
    RUNS,
    add_reuse_flag,
    fashion_mnist_config,
    finished_run,
    latency,
    machine,
    mean_std,
    paired_gap,
    run_recipe,
    welch_gap,
    write_json,
)

from itop_timm.plots import pyplot, save_figure
from itop_timm.serialization import atomic_write_text

#: each protocol's plot title: its data set and network
DATASET_TITLES = {
    "fashion_mnist": "Fashion-MNIST, timm resnet18",
    "cifar10": "CIFAR-10, timm resnet18 at half width, 48 px",
}
#: the methods with a protocol file of their own (recipes/configs/cifar10_<method>.yaml); the others
#: take cifar10_rigl_itop.yaml's sparsity section with their method and density
CIFAR10_OWN_CONFIGS = ("dense", "chase", "srigl")


def cifar10_config(
    output_dir: Path,
    *,
    method: str,
    density: float,
    seed: int,
    epochs: int | None,
    update_interval: int | None,
    train_samples: int | None,
    eval_samples: int | None,
) -> dict[str, Any]:
    """The CIFAR-10 protocol of ``recipes/configs/cifar10_*.yaml`` for one run (``epochs`` and
    ``update_interval`` None: the files' own), reading the data from ``ITOP_TIMM_CIFAR10_DIR`` (default
    ``../shared/data/cifar10``)."""
    own = method if method in CIFAR10_OWN_CONFIGS else "rigl_itop"
    cfg = yaml.safe_load((ROOT / "recipes" / "configs" / f"cifar10_{own}.yaml").read_text())
    cfg["data"] |= {
        "data_dir": os.environ.get("ITOP_TIMM_CIFAR10_DIR", str(ROOT.parent / "shared" / "data" / "cifar10")),
        "max_train_samples": train_samples,
        "max_eval_samples": eval_samples,
    }
    cfg["train"]["seed"] = seed
    if epochs is not None:
        cfg["train"]["epochs"] = epochs
    if own == "rigl_itop":
        cfg["sparsity"] |= {"method": method, "density": density}
    if update_interval is not None and method != "dense":
        cfg["sparsity"]["update_interval"] = update_interval
    cfg["run"] = {
        "output_dir": str(output_dir),
        "log_interval": 50,
        "checkpoint_interval": 0,
        "keep_checkpoints": 1,
        "progress": False,
        "overwrite": True,
        # every run on one thread, so that its wall time over dense compares like with like wherever the
        # protocol continues (run it pinned to one core, e.g. `taskset -c 0`, to leave the other free)
        "num_threads": 1,
    }
    return cfg


#: a Chase run's latency measurement, kept beside the run and committed with it (its models are not)
LATENCY_FILE = "bench_latency.json"


def compacted_latency_ratio(run_dir: Path, size: int = 224, reps: int = 30) -> float:
    """CPU latency of the run's compacted model over the dense network of its architecture (timm's own
    build of the run's ``model/config.json``: every channel, no mask), at ``size`` px, batch 1, timed
    round-robin in this process. Measured once per run and kept in ``bench_latency.json``.

    Not over the run's ``model/``: after Chase's ``shrink`` that is already the smaller network."""
    path = run_dir / LATENCY_FILE
    if path.exists():
        return json.loads(path.read_text())["latency_vs_dense"]
    import timm

    from itop_timm.checkpoint import load_sparse

    dense = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=False).eval()
    small = load_sparse(run_dir / "compacted")[0].eval()
    times = latency({"dense": dense, "compacted": small}, 1, reps, size)
    record = {
        "latency_vs_dense": times["compacted"] / times["dense"],
        "dense_ms": 1000 * times["dense"],
        "compacted_ms": 1000 * times["compacted"],
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "compacted_params": sum(p.numel() for p in small.parameters()),
        "size_px": size,
        "batch": 1,
        "reps": reps,
        "cpu": machine()["cpu"],
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record["latency_vs_dense"]


def plot(results: dict, out_prefix: str) -> list[str]:
    title = DATASET_TITLES[results["settings"]["dataset"]]
    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r["test_top1"] for r in results["runs"] if r["method"] == "dense"]
    if dense:
        m, s = mean_std(dense)
        ax.axhspan(m - s, m + s, color="grey", alpha=0.2)
        ax.axhline(m, color="grey", linestyle="--", label=f"dense {m:.2f}")
    for method in results["methods"]:
        xs, ys, es = [], [], []
        for d in sorted(results["densities"]):
            accs = [r["test_top1"] for r in results["runs"] if r["method"] == method and r["density"] == d]
            if accs:
                m, s = mean_std(accs)
                xs.append(d)
                ys.append(m)
                es.append(s)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=METHOD_LABELS.get(method, method))
    ax.set_xscale("log")
    ax.minorticks_off()  # the densities alone label the axis
    ax.set_xticks(sorted(results["densities"]))
    ax.set_xticklabels([str(d) for d in sorted(results["densities"])])
    ax.set_xlabel("density (fraction of conv/linear weights kept)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{title}:\naccuracy vs density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(str(save_figure(fig, RESULTS / f"{out_prefix}_accuracy.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    d0 = max(results["densities"])
    for method in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == method and r["density"] == d0]
        if runs:
            history = runs[0]["itop_history"]
            ax.plot(
                [h["step"] for h in history],
                [h["itop_rate"] for h in history],
                marker=".",
                label=METHOD_LABELS.get(method, method),
            )
    ax.axhline(d0, color="grey", linestyle="--", label=f"density {d0}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("R_s")
    ax.set_title(f"R_s vs step at density {d0} (seed {runs[0]['seed'] if runs else 0})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(str(save_figure(fig, RESULTS / f"{out_prefix}_itop_rate.png")))

    fig, ax = plt.subplots(figsize=(8, 4))  # wider: the legend sits beside the axes, off the points
    colours = {m: f"C{i}" for i, m in enumerate(results["methods"])}  # a method's colour; a density's marker
    for i, d in enumerate(sorted(results["densities"], reverse=True)):
        rows = [row for row in results["table"] if row["density"] == d]
        for row in rows:
            ax.errorbar(
                row["itop_rate_mean"],
                row["top1_mean"],
                xerr=row["itop_rate_std"],
                yerr=row["top1_std"],
                marker="os^v"[i % 4],
                color=colours[row["method"]],
                capsize=3,
                linestyle="none",
                label=f"{METHOD_LABELS.get(row['method'], row['method'])}, d={d}",
            )
    ax.set_xlabel("R_s (fraction of weights ever active)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{title}:\naccuracy vs R_s (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    paths.append(str(save_figure(fig, RESULTS / f"{out_prefix}_vs_itop_rate.png")))
    return paths


def summarise(runs: list[dict], methods: list[str], densities: list[float]) -> tuple[dict | None, list[dict]]:
    """Dense's mean/std of test top-1 (None without a dense run) and one row per (density, method) cell
    with finished runs: mean ± std of top-1, R_s and wall time over the dense run of the same seed, and
    the gap to dense with Welch's test."""
    dense = [r for r in runs if r["method"] == "dense"]
    if not dense:
        return None, []
    dense_time = {r["seed"]: r["wall_time_s"] for r in dense}
    runs = [r for r in runs if r["seed"] in dense_time]
    for r in runs:
        r["wall_time_vs_dense"] = r["wall_time_s"] / dense_time[r["seed"]]
    dense_top1 = [r["test_top1"] for r in dense]
    table = []
    for d in densities:
        for m in methods:
            sel = [r for r in runs if r["method"] == m and r["density"] == d]
            if not sel:
                continue
            acc_m, acc_s = mean_std([r["test_top1"] for r in sel])
            rs_m, rs_s = mean_std([r["itop_rate"] for r in sel])
            gap = welch_gap([r["test_top1"] for r in sel], dense_top1)
            table.append(
                {
                    "method": m,
                    "density": d,
                    "seeds": [r["seed"] for r in sel],
                    "top1_mean": acc_m,
                    "top1_std": acc_s,
                    "gap_to_dense": gap["gap"],
                    "gap_se": gap["se"],
                    "gap_t": gap["t"],
                    "gap_df": gap["df"],
                    "gap_beyond_noise": gap["beyond_noise"],
                    "itop_rate_mean": rs_m,
                    "itop_rate_std": rs_s,
                    "wall_time_s_mean": mean_std([r["wall_time_s"] for r in sel])[0],
                    "wall_time_vs_dense_mean": mean_std([r["wall_time_vs_dense"] for r in sel])[0],
                    "wall_time_vs_dense_std": mean_std([r["wall_time_vs_dense"] for r in sel])[1],
                }
            )
            kernels = [r["kernel_layers"] for r in sel if "kernel_layers" in r]
            if (
                kernels
            ):  # the range over seeds of the layers the CPU kernels computed, and of all sparse layers
                table[-1]["kernel_layers_range"] = [
                    min(k[0] for k in kernels),
                    max(k[0] for k in kernels),
                    kernels[0][1],
                ]
            latencies = [r["latency_224px_vs_dense"] for r in sel if "latency_224px_vs_dense" in r]
            if latencies:
                table[-1]["latency_224px_vs_dense_mean"], table[-1]["latency_224px_vs_dense_std"] = mean_std(
                    latencies
                )
    mean, std = mean_std(dense_top1)
    return {"mean": mean, "std": std, "seeds": [r["seed"] for r in dense]}, table


def method_pairs(runs: list[dict], methods: list[str], densities: list[float]) -> list[dict]:
    """Every pair of ``methods`` at each density where both have runs: the difference of their mean test
    top-1 (the method with the higher mean R_s minus the other) with Welch's test and, under ``paired``,
    the paired t-test over the seeds both ran (a seed fixes their initial weights, mask and data order);
    and per density the Spearman correlation of the methods' mean R_s with their mean top-1 (ITOP's claim:
    accuracy grows with R_s) with its exact one-sided permutation p-value. Each pair is one of several
    tests: no correction."""
    out = []
    for d in densities:
        cells = {
            m: [r for r in runs if r["method"] == m and r["density"] == d]
            for m in methods
            if any(r["method"] == m and r["density"] == d for r in runs)
        }
        order = sorted(cells, key=lambda m: statistics.mean(r["itop_rate"] for r in cells[m]))
        for i, low in enumerate(order):
            for high in order[i + 1 :]:
                test = welch_gap([r["test_top1"] for r in cells[high]], [r["test_top1"] for r in cells[low]])
                paired = paired_gap(
                    {r["seed"]: r["test_top1"] for r in cells[high]},
                    {r["seed"]: r["test_top1"] for r in cells[low]},
                )
                out.append(
                    {
                        "density": d,
                        "higher_rs": high,
                        "lower_rs": low,
                        "seeds": [len(cells[high]), len(cells[low])],
                        **{k: test[k] for k in ("gap", "se", "t", "df", "beyond_noise")},
                        "paired": paired,
                    }
                )
        if len(order) >= 3:
            top1 = [statistics.mean(r["test_top1"] for r in cells[m]) for m in order]
            rho, p = spearman_by_rank(top1)
            out.append({"density": d, "rs_order": order, "spearman_rho": rho, "spearman_p_one_sided": p})
    return out


def spearman_by_rank(values: list[float]) -> tuple[float, float]:
    """Spearman's rho of ``values`` against their positions 0..n-1 (tied values share their mean rank) and
    its exact one-sided p-value: the fraction of the n! orderings with a rho at least as large."""
    import itertools

    positions = list(range(len(values)))

    def rho(seq: list[float]) -> float:
        ordered = sorted(seq)
        ranks = [statistics.mean(i for i, w in enumerate(ordered) if w == v) for v in seq]
        return statistics.correlation(ranks, positions) if len(set(seq)) > 1 else 0.0

    observed = rho(values)
    perms = list(itertools.permutations(values))
    return observed, sum(rho(list(q)) >= observed - 1e-12 for q in perms) / len(perms)


def parse_shard(parser: argparse.ArgumentParser, text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N) with 0 <= K < N; None for None; a parser error naming the value otherwise."""
    if text is None:
        return None
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        parser.error(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2 and 1/2 for two copies")
    return int(k), int(n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASET_TITLES),
        default="fashion_mnist",
        help="fashion_mnist: the protocol below; cifar10: recipes/configs/cifar10_*.yaml (module docstring)",
    )
    parser.add_argument(
        "--densities",
        type=float,
        nargs="+",
        help="default: 0.1 0.05 0.02 (Fashion-MNIST), 0.1 0.05 (CIFAR-10)",
    )
    parser.add_argument("--methods", nargs="+", default=["static", "set", "rigl", "unfired"])
    parser.add_argument(
        "--structured-methods",
        nargs="*",
        help="methods run at the highest density only (default: none for Fashion-MNIST; chase srigl for "
        "CIFAR-10, from their own config files)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, help="default: 10 (Fashion-MNIST), the config files' (CIFAR-10)"
    )
    parser.add_argument(
        "--train-samples",
        type=int,
        help="subsample of the training images (0: all; default 10000 for Fashion-MNIST, 0 for CIFAR-10)",
    )
    parser.add_argument(
        "--update-interval",
        type=int,
        help="ΔT in optimizer steps (default: 25 for Fashion-MNIST, the config files' for CIFAR-10)",
    )
    parser.add_argument("--eval-samples", type=int, default=0, help="test images used (0: all 10k)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, 512 images, 2 methods"
    )
    add_reuse_flag(parser)
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="train nothing: tabulate the finished runs (as --reuse-runs would reuse them) of a protocol "
        "still under way, marked incomplete in the JSON and in BENCHMARKS.md",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="train only the plan's runs K, K+N, K+2N, ... (0-based; N copies with K = 0..N-1, each pinned to a "
        "core of its own, share a protocol without overlap); the other runs are only read back if finished",
    )
    args = parser.parse_args()
    shard = parse_shard(parser, args.shard)
    cifar = args.dataset == "cifar10"
    if args.densities is None:
        args.densities = [0.1, 0.05] if cifar else [0.1, 0.05, 0.02]
    if args.structured_methods is None:
        args.structured_methods = ["chase", "srigl"] if cifar else []
    if args.train_samples is None:
        args.train_samples = 0 if cifar else 10000
    if not cifar:
        args.epochs = 10 if args.epochs is None else args.epochs
        args.update_interval = 25 if args.update_interval is None else args.update_interval
    if args.quick:
        args.densities, args.methods, args.seeds, args.epochs, args.train_samples = (
            [0.1],
            ["static", "rigl"],
            [0],
            2,
            512,
        )
        args.update_interval, args.eval_samples = 2, 500
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # The full protocol (all training images) owns the plain name, which BENCHMARKS renders; a subsample's
    # runs and results are kept apart so that they never overwrite the protocol's committed runs.
    tag = ("accuracy_cifar10" if cifar else "accuracy_vs_density") + (
        "_quick" if args.quick else f"_{args.train_samples}img" if args.train_samples else ""
    )
    samples = args.train_samples or None
    top = max(args.densities)
    # Seed-major: a run cut short (``--reuse-runs`` continues it) has whole seeds' tables first.
    plan = [
        run
        for s in args.seeds
        for run in [("dense", 1.0, s)]
        + [(m, d, s) for d in args.densities for m in args.methods]
        + [(m, top, s) for m in args.structured_methods]
    ]
    methods = [*args.methods, *args.structured_methods]
    runs = []
    for i, (method, density, seed) in enumerate(plan, 1):
        out = RUNS / tag / f"{method}_d{density}_s{seed}"
        if cifar:
            cfg = cifar10_config(
                out,
                method=method,
                density=density,
                seed=seed,
                epochs=args.epochs,
                update_interval=args.update_interval,
                train_samples=samples,
                eval_samples=args.eval_samples or None,
            )
        else:
            cfg = fashion_mnist_config(
                out,
                epochs=args.epochs,
                train_samples=samples,
                seed=seed,
                method=method,
                density=density,
                update_interval=args.update_interval,
                eval_samples=args.eval_samples or None,
            )
        train = not args.summarize and (shard is None or (i - 1) % shard[1] == shard[0])
        summary = run_recipe(cfg, reuse=args.reuse_runs) if train else finished_run(cfg)
        if summary is None:
            continue
        history = [{"step": 0, "itop_rate": summary.get("density", 1.0)}] + [
            {"step": r["step"], "itop_rate": r["itop_rate"]}
            for r in summary["metrics"]
            if r.get("event") == "topology_update" and "itop_rate" in r
        ]
        runs.append(
            {
                "method": method,
                "density": density,
                "seed": seed,
                "test_top1": summary["test_top1_last"],
                "test_top5": summary["test_top5_last"],
                "realised_density": summary.get("density", 1.0),
                "itop_rate": summary.get("itop_rate", 1.0),
                "wall_time_s": summary["wall_time_s"],
                "total_steps": summary["total_steps"],
                "num_threads": summary.get("num_threads"),  # absent in runs from before it was recorded
                "itop_history": history,
            }
        )
        if "compute" in summary:  # which layers the CPU kernels computed (absent before it was recorded)
            compute = summary["compute"]
            runs[-1]["kernel_layers"] = [
                len(compute["sparse_layers"]),
                len(compute["sparse_layers"]) + len(compute["dense_layers"]),
            ]
        if "launches" in summary:  # absent from runs finished before launches were recorded
            runs[-1]["launches"] = len(summary["launches"])
            runs[-1]["cpus"] = sorted({launch["cpu"] for launch in summary["launches"]})
        if (out / LATENCY_FILE).exists() or ((out / "compacted").is_dir() and summary.get("compacted")):
            runs[-1]["latency_224px_vs_dense"] = compacted_latency_ratio(out)
        logging.info(
            "[%d/%d] %s d=%s seed=%d: top-1 %.2f R_s %.3f (%.0f s)",
            i,
            len(plan),
            method,
            density,
            seed,
            runs[-1]["test_top1"],
            runs[-1]["itop_rate"],
            runs[-1]["wall_time_s"],
        )
    threads = {r["num_threads"] for r in runs} - {None}
    results = {
        "benchmark": "accuracy_cifar10" if cifar else "accuracy_vs_density",
        # the threads the runs trained on (the CIFAR-10 protocol's run.num_threads), not this process's
        "machine": machine() | ({"torch_threads": threads.pop()} if len(threads) == 1 else {}),
        "settings": vars(args),
        "command": "uv run python benchmarks/accuracy_vs_density.py"
        + (" --dataset cifar10" if cifar else "")
        + (
            " --quick"
            if args.quick
            else f" --train-samples {args.train_samples}"
            + (f" --epochs {args.epochs}" if args.epochs is not None else "")
            + (f" --update-interval {args.update_interval}" if args.update_interval is not None else "")
            + f" --densities {' '.join(map(str, args.densities))}"
            + "".join(
                f" --{name} {' '.join(map(str, getattr(args, name)))}"
                for name in ("methods", "seeds")
                if getattr(args, name) != parser.get_default(name)
            )
            + (f" --eval-samples {args.eval_samples}" if args.eval_samples else "")
            + " --reuse-runs"
        ),
        "wall_time_s": sum(r["wall_time_s"] for r in runs),  # training time of the runs, summed
        "runs_planned": len(plan),
        "complete": len(runs) == len(plan),
        "methods": methods,
        "densities": args.densities,
        "runs": runs,
    }
    results["dense_top1"], results["table"] = summarise(runs, methods, args.densities)
    results["pairs"] = method_pairs(runs, args.methods, args.densities)  # the unstructured methods
    results["plots"] = plot(results, tag)
    path = write_json(f"{tag}.json", results)
    print(f"{len(runs)} of {len(plan)} runs finished")
    if results["dense_top1"]:
        print(f"dense: {results['dense_top1']['mean']:.2f} ± {results['dense_top1']['std']:.2f}")
    print(
        f"{'method':22s} {'density':>8s} {'top-1':>14s} {'gap':>7s} {'beyond noise':>12s} {'R_s':>14s} "
        f"{'time/dense':>10s}"
    )
    for row in results["table"]:
        verdict = {True: "yes", False: "no", None: "n/a"}[row["gap_beyond_noise"]]
        print(
            f"{METHOD_LABELS.get(row['method'], row['method']):22s} {row['density']:8.3f} {row['top1_mean']:7.2f} ± {row['top1_std']:4.2f} {row['gap_to_dense']:+7.2f} {verdict:>12s} {row['itop_rate_mean']:7.3f} ± {row['itop_rate_std']:.3f} {row['wall_time_vs_dense_mean']:9.2f}x"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
