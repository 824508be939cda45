"""Training throughput: the recipe against a bare PyTorch loop on the same machine, and the step hook.

In one run, per model (resnet18 on 28 px Fashion-MNIST, vit_tiny on 32 px Fashion-MNIST, 1 channel,
batch 128), samples/s of

(a) a bare loop: the model, timm's SGD (Nesterov, lr 0.1, wd 5e-4), batches indexed from the decoded
    uint8 training tensor and augmented by the recipe's own ``BatchAugment`` (pad-2 crop, flip,
    normalise), the recipe's thread count: no Accelerate, no logging, no sparsifier;
(a') the same bare loop again, on a second copy: the A/A control (noise floor of the machine);
(b) the recipe dense, (c) the recipe RigL d = 0.1 (``recipes/train.py`` in a fresh process, the
    demo's ΔT = 100), each a rate over log windows of ``--log-interval`` steps.

The four alternate for ``--rounds`` rounds (a, a', b, c, then rotated), so drift in the machine's speed
hits all alike; each number is the median over its windows after the first (start-up excluded) and over
rounds. Then the sparsifier's per-step overhead (``step_overhead.py``'s interleaved dense / A/A dense /
sparse / ITOP-reference copies) at 28 px (resnet18, batch 128, 1 channel) and 224 px (batch 32).

    uv run python benchmarks/throughput.py                 # CPU: about 20 minutes on 2 cores
    uv run python benchmarks/throughput.py --device cuda   # when a GPU is lent
    uv run python benchmarks/throughput.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import step_overhead
import torch
import torch.nn.functional as F
from _common import RESULTS, RUNS, fashion_mnist_config, machine, median, run_recipe, write_json

from itop_timm.plots import pyplot, save_figure
from itop_timm.training.config import TrainConfig
from itop_timm.training.data import load_splits
from itop_timm.training.loop import create_model
from itop_timm.training.resources import resolve_num_threads
from itop_timm.training.tensor_data import BatchAugment, decode_split

MODELS = {"resnet18": 28, "vit_tiny_patch16_224": 32}


def recipe_config(name: str, img_size: int, method: str, args: argparse.Namespace, out: Path) -> dict:
    """The demo's settings (fashion_mnist_config + RigL ΔT 100) for ``name`` on this benchmark's budget."""
    cfg = fashion_mnist_config(
        out,
        epochs=1,
        train_samples=args.batch_size * args.steps,
        seed=0,
        method=method,
        density=0.1,
        update_interval=100,
        batch_size=args.batch_size,
        eval_samples=args.batch_size,
    )
    cfg["model"] |= {"name": name, "img_size": img_size}
    cfg["run"] |= {"log_interval": args.log_interval, "save_sparse": False, "cpu": args.device == "cpu"}
    cfg["data"]["test_split"] = None
    return cfg


BARE_VARIANTS = ("eager", "channels_last", "bf16_autocast", "compile")


class BareLoop:
    """A plain PyTorch training loop over the decoded tensor, with the recipe's model, optimizer and
    augmentation; ``window()`` trains ``log_interval`` steps and returns their samples/s.

    ``variant`` is one of :data:`BARE_VARIANTS`: ``eager`` (the loop the recipe is compared with), or one
    standard lever on it: the model and batches in ``channels_last``, the forward pass under
    ``torch.autocast(dtype=bfloat16)``, or the model wrapped in ``torch.compile`` (inductor)."""

    def __init__(
        self,
        cfg: dict,
        device: torch.device,
        model: torch.nn.Module | None = None,
        variant: str = "eager",
    ) -> None:
        from timm.optim import create_optimizer_v2

        if variant not in BARE_VARIANTS:  # before any data is decoded
            raise ValueError(f"variant {variant!r} is not one of {BARE_VARIANTS}")
        tc = TrainConfig.from_dict(cfg)
        splits = load_splits(tc.data, tc.train.seed)
        mode = "L" if tc.model.in_chans == 1 else "RGB"
        images, labels = decode_split(
            splits.train, splits.image_column, splits.label_column, mode, tc.model.img_size
        )
        self.images, self.labels = images.to(device), labels.to(device)
        self.augment = BatchAugment(
            tc.data.mean, tc.data.std, seed=0, padding=tc.data.crop_padding, hflip=tc.data.hflip
        )
        self.model = (model if model is not None else create_model(tc, splits.num_classes)).to(device)
        self.optimizer = create_optimizer_v2(
            self.model, "sgd", lr=0.1, momentum=0.9, weight_decay=tc.optim.weight_decay
        )
        self.channels_last = variant == "channels_last"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if variant == "compile" else self.model
        self.autocast = variant == "bf16_autocast"
        self.batch_size, self.device, self.step_count = tc.data.batch_size, device, 0
        self.cfg, self.variant = cfg, variant

    def clone(self, variant: str | None = None) -> BareLoop:
        """A second loop on a copy of this one's model, with ``variant`` (default: the same)."""
        return BareLoop(self.cfg, self.device, copy.deepcopy(self.model), variant or self.variant)

    def _step(self) -> torch.Tensor:
        n = len(self.labels)
        steps_per_epoch = max(1, n // self.batch_size)
        epoch, k = divmod(self.step_count, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(self.device)
        idx = order[k * self.batch_size : (k + 1) * self.batch_size]
        x = self.augment(self.images[idx], idx, epoch)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), self.labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss

    def window(self, steps: int) -> float:
        sync = self.device.type == "cuda"
        start = time.perf_counter()
        for _ in range(steps):
            loss = self._step()
        float(loss.detach())  # one host sync per window, as the recipe's logging does
        if sync:
            torch.cuda.synchronize()
        return steps * self.batch_size / (time.perf_counter() - start)


def recipe_windows(cfg: dict) -> list[float]:
    """samples/s of every logged window of a fresh recipe run after its first."""
    summary = run_recipe(cfg)
    rates = [r["samples_per_s"] for r in summary["metrics"] if r.get("event") == "train"]
    return rates[1:] or rates


def measure_model(name: str, img_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    base = RUNS / f"throughput{'_quick' if args.quick else ''}" / name
    configs = {m: recipe_config(name, img_size, m, args, base / m) for m in ("dense", "rigl")}
    bare = BareLoop(configs["dense"], device)
    control = bare.clone()
    rates: dict[str, list[float]] = {"bare": [], "bare_control": [], "recipe_dense": [], "recipe_rigl": []}
    warm = args.log_interval

    def bare_run(loop: BareLoop) -> list[float]:
        loop.window(warm)  # warm-up window, like the recipe's first
        return [loop.window(args.log_interval) for _ in range(args.steps // args.log_interval - 1)]

    jobs = [
        ("bare", lambda: bare_run(bare)),
        ("bare_control", lambda: bare_run(control)),
        ("recipe_dense", lambda: recipe_windows(configs["dense"])),
        ("recipe_rigl", lambda: recipe_windows(configs["rigl"])),
    ]
    for r in range(args.rounds):
        for key, job in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            got = job()
            logging.info("%s round %d %s: %s samples/s", name, r, key, [round(v, 1) for v in got])
            rates[key].append(median(got))
    result = {"model": name, "img_size": img_size, "rates": rates}
    result |= {f"{k}_samples_per_s": median(v) for k, v in rates.items()}
    bare_rate = result["bare_samples_per_s"]
    result |= {
        "bare_control_ratio": result["bare_control_samples_per_s"] / bare_rate,
        "recipe_dense_ratio": result["recipe_dense_samples_per_s"] / bare_rate,
        "recipe_rigl_ratio": result["recipe_rigl_samples_per_s"] / bare_rate,
    }
    return result


def hook_overhead(img_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """step_overhead.measure for resnet18 at the demo's shape (28 px, 1 channel, 10 classes, the
    benchmark's batch) or at ImageNet's (224 px, 3 channels, 1000 classes, ``--overhead-batch-224``)."""
    batch, chans, classes = (args.batch_size, 1, 10) if img_size == 28 else (args.overhead_batch_224, 3, 1000)
    ns = argparse.Namespace(
        img_size=img_size,
        batch_size=batch,
        in_chans=chans,
        num_classes=classes,
        steps=args.overhead_steps,
        warmup=1 if args.quick else 3,
        updates=2,
        method="rigl",
        density=0.1,
        bf16=False,
        compiled_hook=not args.quick,
    )
    return {
        "img_size": img_size,
        "batch_size": batch,
        "in_chans": chans,
        **step_overhead.measure("resnet18", ns, device),
    }


def plot(results: list[dict], path: Path) -> Path:
    """Grouped bars: samples/s of the bare loop, its A/A copy and the recipe (dense, RigL) per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [
        ("bare", "bare loop"),
        ("bare_control", "bare loop (A/A)"),
        ("recipe_dense", "recipe dense"),
        ("recipe_rigl", "recipe RigL d=0.1"),
    ]
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(results))]
        ax.bar(xs, [r[f"{key}_samples_per_s"] for r in results], width, label=label)
    ax.set_xticks(range(len(results)), [f"{r['model']} ({r['img_size']} px)" for r in results])
    ax.set_ylabel("training samples / s")
    ax.set_title("Recipe vs bare PyTorch loop (same model, batch, augmentation, threads)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="training steps per recipe run / bare run")
    parser.add_argument("--log-interval", type=int, default=10, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the four variants")
    parser.add_argument("--overhead-steps", type=int, default=30, help="timed steps per copy (hook overhead)")
    parser.add_argument("--overhead-batch-224", type=int, default=32, help="batch of the 224 px overhead run")
    parser.add_argument("--img-size-large", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batches, few steps")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.steps, args.log_interval = ["resnet18"], 8, 4, 2
        args.rounds, args.overhead_steps, args.overhead_batch_224, args.img_size_large = 1, 2, 2, 32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    plan = resolve_num_threads("auto")  # what the recipe's run.num_threads: auto gives a lone process
    torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "throughput",
        "machine": machine(),
        "device": str(device),
        "settings": vars(args),
        "command": " ".join(["uv run python benchmarks/throughput.py", *sys.argv[1:]]),
        "results": [],
        "overhead": [],
    }
    suffix = f"{device.type}{'_quick' if args.quick else ''}"
    results, overhead = payload["results"], payload["overhead"]

    def save() -> Path:  # after every stage, so an interrupted run keeps what it measured
        payload["wall_time_s"] = time.perf_counter() - started
        if results:
            payload["plot"] = str(plot(results, RESULTS / f"throughput_{suffix}.png"))
        return write_json(f"throughput_{suffix}.json", payload)

    overhead.append(hook_overhead(28, args, device))
    save()
    for name in args.models:
        results.append(measure_model(name, MODELS[name], args, device))
        save()
    overhead.append(hook_overhead(args.img_size_large, args, device))
    path = save()
    print(
        f"{'model':24s} {'bare':>8s} {'A/A':>6s} {'dense':>8s} {'/bare':>6s} {'rigl':>8s} {'/bare':>6s}  (samples/s)"
    )
    for r in results:
        print(
            f"{r['model']:24s} {r['bare_samples_per_s']:8.1f} {r['bare_control_ratio']:6.3f} "
            f"{r['recipe_dense_samples_per_s']:8.1f} {r['recipe_dense_ratio']:6.3f} "
            f"{r['recipe_rigl_samples_per_s']:8.1f} {r['recipe_rigl_ratio']:6.3f}"
        )
    for o in overhead:
        print(
            f"hook overhead resnet18 {o['img_size']} px batch {o['batch_size']}: sparse/dense {o['step_ratio']:.3f}, "
            f"ITOP reference/dense {o['reference_ratio']:.3f}, A/A {o['control_ratio']:.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
