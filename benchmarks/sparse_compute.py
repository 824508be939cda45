"""What ``compute="sparse" | "auto"`` buys on the CPU: itop_timm's sparse kernels against masked dense
compute, for timm resnet18.

Three measurements, each a ratio inside one process (the modes interleaved round-robin, medians):

* ``layers``: every distinct convolution of resnet18 at the demo shape (1×28×28, batch 128), forward +
  backward, dense ``F.conv2d`` on the masked weight vs the sparse kernels, at each density;
* ``steps``: one whole training step (forward, backward, SGD step with the sparsifier's hooks) of
  resnet18 with SET masks (ERK) and no topology update inside the timed window, masked vs sparse vs auto,
  plus a second masked model as the A/A control (its ratio to the first is the noise floor), at the demo
  shape and at 64 px (3 channels, batch 64) and 224 px (3 channels, batch 16), for each density and
  thread count;
* ``demo``: the demo run itself (``recipes/configs/fashion_mnist_rigl_itop.yaml``, RigL-ITOP, 5 epochs)
  with ``sparsity.compute`` masked and auto, and the same recipe dense: wall time and test top-1.

    uv run python benchmarks/sparse_compute.py [--parts layers steps demo] [--densities 0.2 0.1 0.05 0.02]
        [--threads 1 2] [--reps 8] [--reuse-runs] [--quick]

Writes ``results/sparse_compute[_quick].json`` and ``results/sparse_compute[_quick].png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import yaml
from _common import RESULTS, ROOT, RUNS, add_reuse_flag, machine, run_recipe, write_json

import itop_timm
from itop_timm.kernels.ops import layer_index, sparse_conv2d

# (name, in_chans, image size, batch)
SHAPES = {"demo": (1, 28, 128), "64px": (3, 64, 64), "224px": (3, 224, 16)}
MODES = ("masked", "masked_control", "sparse", "auto")


def interleaved(fns: dict[str, Any], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, called round-robin after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def conv_inputs(model: torch.nn.Module, in_chans: int, size: int, batch: int) -> dict[str, tuple]:
    """Each convolution's name, module and input shape for one forward pass."""
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, (module, tuple(inputs[0].shape)))

        return hook

    hooks = [
        m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.randn(batch, in_chans, size, size))
    for h in hooks:
        h.remove()
    return shapes


def layer_table(densities: list[float], threads: int, reps: int) -> list[dict[str, Any]]:
    """Forward + backward of each distinct resnet18 convolution at the demo shape, dense vs sparse."""
    torch.set_num_threads(threads)
    in_chans, size, batch = SHAPES["demo"]
    model = timm.create_model("resnet18", in_chans=in_chans, num_classes=10)
    rows, seen = [], set()
    g = torch.Generator().manual_seed(0)
    for name, (module, shape) in conv_inputs(model, in_chans, size, batch).items():
        key = (tuple(module.weight.shape), module.stride[0], shape)
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(shape, generator=g, requires_grad=shape[1] > 1)
        for density in densities:
            mask = torch.rand(module.weight.shape, generator=g) < density
            weight = (module.weight.detach() * mask).requires_grad_()
            stride, padding = module.stride[0], module.padding[0]
            gy = torch.randn_like(F.conv2d(x, weight, None, stride, padding))
            index = layer_index(mask)

            def dense(x=x, weight=weight, gy=gy, stride=stride, padding=padding) -> None:
                F.conv2d(x, weight, None, stride, padding).backward(gy)

            def sparse(x=x, weight=weight, gy=gy, stride=stride, padding=padding, index=index) -> None:
                sparse_conv2d(x, weight, None, index, stride, padding).backward(gy)

            t = interleaved({"dense": dense, "sparse": sparse}, reps)
            rows.append(
                {
                    "layer": name,
                    "weight": list(module.weight.shape),
                    "stride": stride,
                    "input": list(shape),
                    "density": density,
                    "threads": threads,
                    "dense_ms": t["dense"] * 1e3,
                    "sparse_ms": t["sparse"] * 1e3,
                    "speedup": t["dense"] / t["sparse"],
                }
            )
            logging.info("%s %s d=%.2f: x%.2f", name, key, density, rows[-1]["speedup"])
    return rows


def training_step(shape: str, density: float, threads: int, reps: int) -> dict[str, Any]:
    """Step times of the four modes on the same batch, interleaved; ratios to the first masked model."""
    torch.set_num_threads(threads)
    in_chans, size, batch = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, in_chans, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    steps = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", in_chans=in_chans, num_classes=10)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        compute = "masked" if mode.startswith("masked") else mode
        itop_timm.sparsify(
            model, optimizer, method="set", density=density, update_interval=10**6, total_steps=10**7,
            compute=compute,
        )  # fmt: skip

        def step(model=model, optimizer=optimizer) -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        steps[mode] = step
    t = interleaved(steps, reps, warmup=3)  # auto times its layers in its first step
    base = t["masked"]
    return {
        "shape": shape,
        "density": density,
        "threads": threads,
        **{f"{mode}_ms": t[mode] * 1e3 for mode in MODES},
        **{f"speedup_{mode}": base / t[mode] for mode in MODES[1:]},
    }


def demo_runs(reuse: bool, quick: bool) -> dict[str, Any]:
    """The demo recipe with compute masked and auto, and dense: training wall time and test accuracy."""
    base = yaml.safe_load((ROOT / "recipes" / "configs" / "fashion_mnist_rigl_itop.yaml").read_text())
    results = {}
    for name, changes in (
        ("dense", {"method": "dense"}),
        ("rigl_masked", {"compute": "masked"}),
        ("rigl_auto", {"compute": "auto"}),
    ):
        cfg = copy.deepcopy(base)
        cfg["data"]["data_dir"] = os.environ.get("ITOP_TIMM_FASHION_MNIST_DIR", cfg["data"]["data_dir"])
        cfg["sparsity"] = {**cfg["sparsity"], **changes}
        if changes.get("method") == "dense":
            cfg["sparsity"] = {"method": "dense"}
        cfg["run"] = {**cfg["run"], "output_dir": str(RUNS / f"sparse_compute_demo{'_quick' if quick else ''}" / name),
                      "progress": False, "overwrite": True, "checkpoint_interval": 0}  # fmt: skip
        if quick:
            cfg["train"]["epochs"] = 1
            cfg["data"]["max_train_samples"] = 512
            cfg["data"]["max_eval_samples"] = 256
        summary = run_recipe(cfg, reuse=reuse)
        results[name] = {k: summary.get(k) for k in ("test_top1_last", "density", "itop_rate", "wall_time_s")}
    dense_time = results["dense"]["wall_time_s"]
    for name in ("rigl_masked", "rigl_auto"):
        results[name]["wall_time_vs_dense"] = results[name]["wall_time_s"] / dense_time
    return results


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = payload.get("steps", [])
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for shape in SHAPES:
        for threads in sorted({r["threads"] for r in steps}):
            rows = sorted(
                (r for r in steps if r["shape"] == shape and r["threads"] == threads),
                key=lambda r: r["density"],
            )
            if rows:
                ax.plot([r["density"] for r in rows], [r["speedup_auto"] for r in rows], marker="o",
                        label=f"auto, {shape}, {threads} thread{'s' if threads > 1 else ''}")  # fmt: skip
    controls = [r["speedup_masked_control"] for r in steps]
    ax.axhspan(min(controls), max(controls), color="grey", alpha=0.2, label="A/A control (masked vs masked)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("training step speed-up over masked")
    ax.set_title(f"resnet18 training step, sparse kernels ({payload['machine']['cpu']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", default=["layers", "steps", "demo"], choices=["layers", "steps", "demo"]
    )
    parser.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=8, help="timed repetitions per mode (medians)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one density: a smoke test")
    add_reuse_flag(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        SHAPES.update({"demo": (1, 28, 16), "64px": (3, 32, 8), "224px": (3, 32, 4)})
        args.densities, args.threads, args.reps = [0.1], [1], 2
    payload: dict[str, Any] = {
        "machine": machine(),
        "note": "ratios within one process; see module docstring",
    }
    if "layers" in args.parts:
        payload["layers"] = [row for t in args.threads for row in layer_table(args.densities, t, args.reps)]
    if "steps" in args.parts:
        payload["steps"] = []
        for shape in SHAPES:
            densities = (
                args.densities
                if shape != "224px"
                else [d for d in args.densities if d in (0.1, 0.02)] or args.densities[:1]
            )
            for threads in args.threads if shape != "224px" else args.threads[-1:]:
                for density in densities:
                    row = training_step(shape, density, threads, args.reps)
                    payload["steps"].append(row)
                    logging.info("step %s d=%.2f %d thr: auto x%.2f sparse x%.2f control x%.2f", shape, density,
                                 threads, row["speedup_auto"], row["speedup_sparse"], row["speedup_masked_control"])  # fmt: skip
    if "demo" in args.parts:
        payload["demo"] = demo_runs(args.reuse_runs, args.quick)
    name = "sparse_compute_quick" if args.quick else "sparse_compute"
    path = write_json(f"{name}.json", payload)
    plot(payload, RESULTS / f"{name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
