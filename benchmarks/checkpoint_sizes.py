"""Sparse checkpoint sizes and load times: dense folder vs compact, timm resnet50 at 80 / 90 / 98 % sparsity.

Masks are ERK masks drawn by ``itop_timm.sparsify`` on a freshly initialised resnet50 (sizes do not
depend on training). "weights+masks" is the compact inference export (``include_union=False``);
"+union" adds the union (R_s) mask that training state needs. Load time is the median of 3
``itop_timm.load_sparse`` calls (full verification included).

    uv run python benchmarks/checkpoint_sizes.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from _common import machine, write_json

import itop_timm
from itop_timm.checkpoint import load_sparse, save_sparse


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.98])
    parser.add_argument("--quick", action="store_true", help="resnet18, one sparsity")
    args = parser.parse_args()
    if args.quick:
        args.model, args.sparsities = "resnet18", [0.9]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            torch.manual_seed(0)
            model = timm.create_model(args.model, pretrained=False)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            sp = itop_timm.sparsify(model, opt, method="static", density=1 - sparsity)
            dense = save_sparse(model, sp, Path(tmp) / f"dense_{sparsity}")
            compact_union = save_sparse(model, sp, Path(tmp) / f"compact_union_{sparsity}", compact=True)
            compact = save_sparse(
                model, sp, Path(tmp) / f"compact_{sparsity}", compact=True, include_union=False
            )
            model_file = (dense / "model.safetensors").stat().st_size
            times = {}
            for name, folder in (("dense", dense), ("compact", compact)):
                samples = []
                for _ in range(3):
                    start = time.perf_counter()
                    load_sparse(folder)
                    samples.append(time.perf_counter() - start)
                times[name] = statistics.median(samples)
            rows.append(
                {
                    "sparsity": sparsity,
                    "density": sp.density,
                    "dense_model_safetensors_MB": model_file / 1e6,
                    "dense_folder_MB": folder_bytes(dense) / 1e6,
                    "compact_weights_and_masks_MB": folder_bytes(compact) / 1e6,
                    "compact_with_union_MB": folder_bytes(compact_union) / 1e6,
                    "compact_ratio": folder_bytes(compact) / model_file,
                    "compact_with_union_ratio": folder_bytes(compact_union) / model_file,
                    "load_dense_s": times["dense"],
                    "load_compact_s": times["compact"],
                }
            )
    payload = {"benchmark": "checkpoint_sizes", "model": args.model, "machine": machine(), "results": rows}
    path = write_json(f"checkpoint_sizes{'_quick' if args.quick else ''}.json", payload)
    print(
        f"{args.model}: sparsity  model.safetensors  dense folder  compact (w+masks)  +union   ratio  ratio+union  load dense  load compact"
    )
    for r in rows:
        print(
            f"{r['sparsity']:>17.0%}  {r['dense_model_safetensors_MB']:>14.1f}MB  {r['dense_folder_MB']:>10.1f}MB  "
            f"{r['compact_weights_and_masks_MB']:>15.1f}MB  {r['compact_with_union_MB']:>5.1f}MB  {r['compact_ratio']:.3f}  "
            f"{r['compact_with_union_ratio']:>10.3f}  {r['load_dense_s']:>9.2f}s  {r['load_compact_s']:>11.2f}s"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
