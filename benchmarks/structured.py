"""Structured sparsity on Fashion-MNIST (timm resnet18, 1 channel): dense vs RMDA (group LASSO over
torch-pruning's coupled channel groups, several λ) vs RigL-ITOP (density 0.1) + compaction.

Every model is trained through ``recipes/train.py``, loaded back with ``load_sparse`` and compacted
with ``itop_timm.structured.compact`` (all-zero — or, for ITOP, all-masked — channel groups removed).
Reported: test top-1 (checked identical before/after compaction), fraction of zero groups (weighted by
size), params and MACs ratios (compacted / dense architecture) and the measured CPU inference latency
ratio, compacted / dense, at batch 1 and 64, both timed in this process, interleaved, median of runs.

    uv run python benchmarks/structured.py [--lambdas 0 5e-5 1e-4 2e-4] [--epochs 10] [--train-samples 10000] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import timm
import torch
from _common import RUNS, add_reuse_flag, fashion_mnist_config, machine, run_recipe, write_json

from itop_timm.checkpoint import load_sparse
from itop_timm.structured import compact


def latency(models: dict[str, torch.nn.Module], batch: int, reps: int) -> dict[str, float]:
    """Median seconds per forward pass, the models timed round-robin on the same input."""
    x = torch.randn(batch, 1, 28, 28)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 5e-5, 1e-4, 2e-4])
    parser.add_argument("--rmda-lr", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=30, help="timed forward passes per model and batch size")
    parser.add_argument("--quick", action="store_true")
    add_reuse_flag(parser)
    args = parser.parse_args()
    eval_limit = None
    if args.quick:
        args.lambdas, args.epochs, args.train_samples, args.reps, eval_limit = [1e-2], 2, 512, 3, 500
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tag = "structured" + ("_quick" if args.quick else "")
    start = time.time()

    plans = [("dense", {}), ("rigl_itop", {})] + [(f"rmda_l{lam:g}", {"lambda": lam}) for lam in args.lambdas]
    trained = {}
    for name, extra in plans:
        method = "rigl" if name == "rigl_itop" else "dense"
        cfg = fashion_mnist_config(
            RUNS / tag / name,
            epochs=args.epochs,
            train_samples=args.train_samples,
            seed=0,
            method=method,
            density=0.1,
            update_interval=25,
            eval_samples=eval_limit,
        )
        if "lambda" in extra:
            cfg["optim"] = {
                "opt": "rmda",
                "lr": args.rmda_lr,
                "momentum": 0.01,
                "weight_decay": 0.0,
                "kwargs": {"weight_lambda": extra["lambda"], "regularizer": "coupled"},
            }
        summary = run_recipe(cfg, reuse=args.reuse_runs)
        last_train = [r for r in summary["metrics"] if r.get("event") == "train"][-1]
        trained[name] = {
            "summary": summary,
            "zero_groups": last_train.get("zero_groups"),
            "zero_groups_weighted": last_train.get("zero_groups_weighted"),
            "lambda": extra.get("lambda"),
        }
        logging.info("trained %s: test top-1 %.2f", name, summary["test_top1_last"])

    data_dir = cfg["data"]["data_dir"]
    images, labels = load_test_split(data_dir, eval_limit)
    example = torch.zeros(1, 1, 28, 28)
    dense_model, _, _ = load_sparse(RUNS / tag / "dense" / "model")
    rows = []
    for name, info in trained.items():
        model, masks, _ = load_sparse(RUNS / tag / name / "model")
        before = test_accuracy(model, images, labels)
        small, report = compact(model, example, masks=masks or None)
        after = test_accuracy(small, images, labels)
        lat = {
            b: latency(
                {"dense": dense_model, "model": small}, b, args.reps if b == 1 else max(3, args.reps // 3)
            )
            for b in (1, 64)
        }
        rows.append(
            {
                "model": name,
                "lambda": info["lambda"],
                "test_top1": before,
                "test_top1_after_compaction": after,
                "zero_groups": info["zero_groups"],
                "zero_groups_weighted": info["zero_groups_weighted"],
                "params_ratio": report["params_ratio"],
                "macs_ratio": report["macs_ratio"],
                "channels_removed": report["channels_removed_total"],
                "latency_b1_ms": lat[1]["model"] * 1e3,
                "latency_b64_ms": lat[64]["model"] * 1e3,
                "dense_latency_b1_ms": lat[1]["dense"] * 1e3,
                "dense_latency_b64_ms": lat[64]["dense"] * 1e3,
                "latency_ratio_b1": lat[1]["model"] / lat[1]["dense"],
                "latency_ratio_b64": lat[64]["model"] / lat[64]["dense"],
                "train_wall_time_s": info["summary"]["wall_time_s"],
            }
        )
        logging.info("%s", rows[-1])
    payload = {
        "benchmark": "structured",
        "machine": machine(),
        "settings": vars(args),
        "command": "uv run python benchmarks/structured.py" + (" --quick" if args.quick else ""),
        "wall_time_s": time.time() - start,
        "rows": rows,
    }
    path = write_json(f"{tag}.json", payload)
    dense_acc = rows[0]["test_top1"]
    print(
        f"{'model':16s} {'top-1':>6s} {'Δ dense':>8s} {'zero groups (w.)':>17s} {'params':>7s} {'MACs':>6s} {'lat b1':>7s} {'lat b64':>8s}"
    )
    for r in rows:
        zg = "-" if r["zero_groups"] is None else f"{r['zero_groups']:.3f} ({r['zero_groups_weighted']:.3f})"
        print(
            f"{r['model']:16s} {r['test_top1']:6.2f} {r['test_top1'] - dense_acc:+8.2f} {zg:>17s} {r['params_ratio']:7.3f} "
            f"{r['macs_ratio']:6.3f} {r['latency_ratio_b1']:7.3f} {r['latency_ratio_b64']:8.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
