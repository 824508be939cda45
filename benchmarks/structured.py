"""Structured sparsity on Fashion-MNIST (timm resnet18, 1 channel): dense vs RMDA (group LASSO over
torch-pruning's coupled channel groups) vs Chase (channel-level DST, S_c 0.3 and 0.5; layer-ranked 0.5
and 0.6; layer-ranked 0.6 with ``shrink``, the removed channels sliced out of the live model during training,
with masked and with sparse-kernel compute) vs SRigL (constant fan-in DST), all at density 0.1 where
sparse, several seeds; every model then compacted.

Every model is trained through ``recipes/train.py``, loaded back with ``load_sparse`` and compacted
with ``itop_timm.structured.compact`` (all-zero or all-masked channel groups removed). Reported per run:
test top-1 (checked identical before/after compaction), params and MACs ratios (compacted / dense
architecture), the CPU inference latency ratio compacted / dense at the training resolution (28 px) and
at 224 px, batch 1 and 64 (both models timed in this process, interleaved, median of runs), and the
training wall time against the dense run of the same seed. Shrinking runs also report their training
MACs: the MACs per step (the model's after each shrink, from the run's ``shrink`` records), averaged
over the run, over the dense model's; ``structured_macs.png`` plots them per step. Means ± std over
seeds in the table.

    uv run python benchmarks/structured.py [--seeds 0 1 2] [--lambdas 2e-4] [--channel-sparsities 0.3 0.5]
        [--layer-ranked 0.5 0.6] [--shrink-ranked 0.6] [--shrink-compute masked sparse]
        [--only dense chase_sc0.6_layer_shrink ...] [--reuse-runs] [--summarize] [--quick]

``--only`` trains the named configurations (with ``dense``, the timing control, among them) and keeps
the other configurations' rows of the results file as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import timm
import torch
from _common import (
    RESULTS,
    RUNS,
    add_reuse_flag,
    aggregate_seeds,
    fashion_mnist_config,
    latency,
    machine,
    run_recipe,
    write_json,
)

from itop_timm.checkpoint import ARCHITECTURE_ATTR, load_sparse
from itop_timm.structured import compact, count_macs_and_params


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(images), 500):
        correct += int((model(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum())
    return 100.0 * correct / len(images)


def load_test_split(data_dir: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from itop_timm.training.config import DataConfig, ModelConfig
    from itop_timm.training.data import build_transforms, load_splits

    dc = DataConfig(
        dataset="fashion_mnist",
        data_dir=data_dir,
        mean=[0.2860],
        std=[0.3530],
        val_fraction=0.0,
        max_eval_samples=limit,
    )
    splits = load_splits(dc, 0)
    _, eval_tf = build_transforms(
        dc, ModelConfig(name="resnet18", in_chans=1, img_size=28), timm.create_model("resnet18", in_chans=1)
    )
    images = torch.stack([eval_tf(row["image"].convert("L")) for row in splits.test])
    return images, torch.tensor(splits.test["label"])


def plans(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(run name, what differs from the dense recipe) for every configuration (seed added later)."""
    out: list[tuple[str, dict]] = [("dense", {})]
    out += [(f"rmda_l{lam:g}", {"lambda": lam}) for lam in args.lambdas]
    out += [
        (f"chase_sc{sc:g}", {"method": "chase", "options": {"channel_sparsity": sc}})
        for sc in args.channel_sparsities
    ]
    out += [
        (
            f"chase_sc{sc:g}_layer",
            {"method": "chase", "options": {"channel_sparsity": sc, "ranking": "layer"}},
        )
        for sc in args.layer_ranked
    ]
    for sc in args.shrink_ranked:
        for compute in args.shrink_compute:
            out.append(
                (
                    f"chase_sc{sc:g}_layer_shrink" + ("" if compute == "masked" else f"_{compute}"),
                    {
                        "method": "chase",
                        "options": {"channel_sparsity": sc, "ranking": "layer", "shrink": True},
                        "compute": compute,
                    },
                )
            )
    out.append(("srigl", {"method": "srigl", "options": {}}))
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in out})
        if unknown or "dense" not in args.only:
            raise SystemExit(
                f"--only {args.only}: unknown {unknown}; allowed {[n for n, _ in out]}, dense among them"
            )
        out = [(name, extra) for name, extra in out if name in args.only]
    return out


def train_macs(metrics: list[dict], total_steps: int, dense_macs: int) -> tuple[float, list[list[int]]]:
    """The run's MACs per training step averaged over the run, over the dense model's, and the MACs per
    step as ``[[first step, MACs], ...]``: a shrink at step s applies from step s + 1."""
    curve = [[1, dense_macs]] + [[r["step"] + 1, r["macs"]] for r in metrics if r.get("event") == "shrink"]
    total = 0
    for (start, macs), (end, _) in zip(curve, [*curve[1:], [total_steps + 1, 0]], strict=True):
        total += (end - start) * macs
    return total / (total_steps * dense_macs), [*curve, [total_steps, curve[-1][1]]]


def run_config(
    args: argparse.Namespace, tag: str, name: str, extra: dict, seed: int, eval_limit: int | None
) -> dict:
    cfg = fashion_mnist_config(
        RUNS / tag / f"{name}_s{seed}",
        epochs=args.epochs,
        train_samples=args.train_samples,
        seed=seed,
        method=extra.get("method", "dense"),
        density=0.1,
        update_interval=args.update_interval,
        eval_samples=eval_limit,
    )
    if "options" in extra:
        cfg["sparsity"]["method_options"] = extra["options"]
    if "compute" in extra:
        cfg["sparsity"]["compute"] = extra["compute"]
    if "lambda" in extra:
        cfg["optim"] = {
            "opt": "rmda",
            "lr": args.rmda_lr,
            "momentum": 0.01,
            "weight_decay": 0.0,
            "kwargs": {"weight_lambda": extra["lambda"], "regularizer": "coupled"},
        }
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=[2e-4],
        help="RMDA λ (2e-4: §6's only λ that removes channels)",
    )
    parser.add_argument(
        "--channel-sparsities", type=float, nargs="+", default=[0.3, 0.5], help="Chase S_c values"
    )
    parser.add_argument(
        "--layer-ranked",
        type=float,
        nargs="*",
        default=[0.5, 0.6],
        help="S_c values of chase with ranking=layer (every group loses the same fraction; not in the paper)",
    )
    parser.add_argument(
        "--shrink-ranked",
        type=float,
        nargs="*",
        default=[0.6],
        help="S_c values of layer-ranked chase with shrink (removed channels leave the live model)",
    )
    parser.add_argument(
        "--shrink-compute",
        nargs="*",
        default=["masked", "sparse"],
        choices=["masked", "sparse"],
        help="sparsity.compute of the shrinking runs (sparse: the CPU kernels inside the channels left)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="train only these configurations (dense among them); the others' rows are kept from the results file",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rmda-lr", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--update-interval", type=int, default=25, help="ΔT: optimizer steps between topology updates"
    )
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument(
        "--reps", type=int, default=20, help="timed forward passes per model at 28 px, batch 1"
    )
    parser.add_argument("--quick", action="store_true")
    add_reuse_flag(parser)
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="no training or timing: table and plot from the runs already in the results file (an interrupted run)",
    )
    args = parser.parse_args()
    eval_limit = None
    if args.quick:
        args.lambdas, args.channel_sparsities, args.layer_ranked, args.seeds = [1e-2], [0.5], [], [0]
        args.shrink_ranked, args.shrink_compute = [0.5], ["masked"]
        args.epochs, args.train_samples, args.reps, eval_limit = 2, 512, 3, 500
        args.update_interval = 2  # 8 steps: chase's channel removal needs a topology update after it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tag = "structured" + ("_quick" if args.quick else "")
    start = time.time()

    images = labels = None
    results_file = RESULTS / f"{tag}.json"
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {}
    saved = earlier.get("rows", [])
    rows = saved if args.summarize else []
    if args.only and not args.summarize:
        rows = [r for r in saved if r["model"] not in args.only]
    # the machine of the rows kept from an earlier invocation (--only)
    earlier_machine = earlier.get("earlier_machine") or earlier.get("machine") if args.only else None
    if args.summarize:
        args.seeds = sorted({r["seed"] for r in rows})
    # with --reuse-runs, a reused run's measurements are read back too (same model: same test top-1)
    previous = {(r["model"], r["seed"]): r for r in saved} if args.reuse_runs else {}
    for seed in [] if args.summarize else args.seeds:
        dense_dir = dense_time = None
        for name, extra in plans(args):
            cfg = run_config(args, tag, name, extra, seed, eval_limit)
            summary = run_recipe(cfg, reuse=args.reuse_runs)
            logging.info("trained %s seed %d: test top-1 %.2f", name, seed, summary["test_top1_last"])
            if name == "dense":
                dense_dir, dense_time = Path(cfg["run"]["output_dir"]) / "model", summary["wall_time_s"]
                dense_macs = count_macs_and_params(load_sparse(dense_dir)[0], torch.zeros(1, 1, 28, 28))
                dense_top1 = summary["test_top1_last"]
            old = previous.get((name, seed))
            if old is not None and abs(old["test_top1"] - summary["test_top1_last"]) < 0.005:
                rows.append(old)
                continue
            if images is None:
                images, labels = load_test_split(cfg["data"]["data_dir"], eval_limit)
            dense_model = load_sparse(dense_dir)[0]
            model, masks, _ = load_sparse(Path(cfg["run"]["output_dir"]) / "model")
            before = test_accuracy(model, images, labels)
            small, report = compact(model, torch.zeros(1, 1, 28, 28), masks=masks or None)
            after = test_accuracy(small, images, labels)
            # against the dense architecture (a shrunk run's model/ is already the smaller network)
            macs, params = count_macs_and_params(small, torch.zeros(1, 1, 28, 28))
            row = {
                "model": name,
                "seed": seed,
                "test_top1": before,
                "dense_test_top1": dense_top1,  # the dense run of the same seed and invocation (Δ pairs with it)
                "same_after_compaction": before == after,
                "params_ratio": params / dense_macs[1],
                "macs_ratio": macs / dense_macs[0],
                "channels_removed": report["channels_removed_total"],
                "train_time_ratio": summary["wall_time_s"] / dense_time,
            }
            if extra.get("options", {}).get("shrink"):
                history = getattr(small, ARCHITECTURE_ATTR)["history"]
                row["channels_removed"] = sum(len(entry[2]) for entry in history)
                row["train_macs_ratio"], row["macs_per_step"] = train_macs(
                    summary["metrics"], summary["total_steps"], dense_macs[0]
                )
            last_train = [r for r in summary["metrics"] if r.get("event") == "train"][-1]
            if last_train.get("zero_groups") is not None:
                row["zero_groups_weighted"] = last_train["zero_groups_weighted"]
            for size in (28, 224):
                for batch in (1, 64):
                    reps = (
                        args.reps
                        if (size, batch) == (28, 1)
                        else max(3, args.reps // (4 if size == 28 else 6))
                    )
                    lat = latency({"dense": dense_model, "model": small}, batch, reps, size, in_chans=1)
                    row[f"latency_ms_{size}px_b{batch}"] = lat["model"] * 1e3
                    row[f"speedup_{size}px_b{batch}"] = lat["dense"] / lat["model"]
            rows.append(row)
            logging.info("%s", row)
            write_json(f"{tag}.json", {"benchmark": "structured", "partial": True, "rows": rows})
    order = [name for name, _ in plans(argparse.Namespace(**{**vars(args), "only": None}))]
    rows.sort(key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order), r["seed"]))
    table = aggregate_seeds(rows)
    payload = {
        "benchmark": "structured",
        "machine": machine(),
        "earlier_machine": earlier_machine,
        "settings": vars(args),
        "command": "uv run python benchmarks/structured.py"
        + (" --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else ""),
        "wall_time_s": time.time() - start,
        "rows": rows,
        "table": table,
        "plot": str(plot(table, RESULTS / f"{tag}.png")),
        "macs_plot": str(plot_macs(rows, RESULTS / f"{tag}_macs.png")),
    }
    path = write_json(f"{tag}.json", payload)
    dense_acc = table[0]["test_top1"]
    print(
        f"{'model':14s} {'top-1':>13s} {'Δ dense':>8s} {'params':>7s} {'MACs':>6s} {'28px b1':>8s} {'b64':>6s} {'224px b1':>9s} {'b64':>6s} {'train t':>8s}"
    )
    for r in table:
        print(
            f"{r['model']:14s} {r['test_top1']:6.2f} ± {r['test_top1_std']:4.2f} {r['test_top1'] - dense_acc:+8.2f} "
            f"{r['params_ratio']:7.3f} {r['macs_ratio']:6.3f} {r['speedup_28px_b1']:7.2f}× {r['speedup_28px_b64']:5.2f}× "
            f"{r['speedup_224px_b1']:8.2f}× {r['speedup_224px_b64']:5.2f}× {r['train_time_ratio']:7.2f}×"
        )
    print(f"wrote {path}")


def plot(table: list[dict], path: Path) -> Path:
    """Test top-1 against the 224 px batch-1 speed-up of the compacted model, one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in table:
        ax.errorbar(
            r["speedup_224px_b1"],
            r["test_top1"],
            xerr=r["speedup_224px_b1_std"],
            yerr=r["test_top1_std"],
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            r["model"], (r["speedup_224px_b1"], r["test_top1"]), textcoords="offset points", xytext=(5, 5)
        )
    ax.axvline(1.5, color="grey", linestyle=":", label="target 1.5×")
    ax.axhline(table[0]["test_top1"] - 1, color="grey", linestyle="--", label="dense − 1 point")
    ax.set_xlabel("CPU speed-up at 224 px, batch 1 (dense / compacted)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("resnet18, Fashion-MNIST: accuracy vs real speed-up")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_macs(rows: list[dict], path: Path) -> Path:
    """MACs per training step over the dense model's, one line per shrinking run (a flat 1 for dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(1.0, color="black", label="dense (and every run that does not shrink)")
    names = sorted({r["model"] for r in rows if "macs_per_step" in r})
    for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], names, strict=False):
        for i, r in enumerate(r for r in rows if r["model"] == name):
            steps = [s for s, _ in r["macs_per_step"]]
            dense = r["macs_per_step"][0][1]
            ratios = [m / dense for _, m in r["macs_per_step"]]
            label = f"{name} (mean {r['train_macs_ratio']:.2f}× over the run)" if i == 0 else None
            ax.step(steps, ratios, where="post", color=color, alpha=0.7, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("MACs per step / dense")
    ax.set_ylim(0, 1.05)
    ax.set_title("resnet18, Fashion-MNIST 28 px: MACs per training step")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
