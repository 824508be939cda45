"""Training-step overhead of the sparsifier, measured as ratios inside one process.

For each model: four identical copies, two dense, one sparsified (RigL, ERK, density 0.1) and one
masked the way the ITOP reference code does (same masks, float32, ``tensor.data = tensor.data * mask``
on the weight and the momentum buffer after ``optimizer.step()``). Their steps interleave (rotating
order) on the same batches, so drift in machine speed hits all alike; the medians give the per-step
ratios sparse/dense and reference/dense (steps without a topology update), and the second dense copy
gives the noise floor of the measurement (dense/dense, an A/A control). Then one topology
update is timed on its own (median of several calls) and expressed in dense-step units. The extra
state the sparsifier holds (masks, union) is reported in bytes per sparse parameter.

    uv run python benchmarks/step_overhead.py                       # resnet18 + vit_tiny, 224 px, batch 32
    uv run python benchmarks/step_overhead.py --img-size 32 --batch-size 128   # small images
    uv run python benchmarks/step_overhead.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging

import timm
import torch
import torch.nn.functional as F
from _common import machine, median, timed, write_json

import itop_timm


def sparsifier_state_bytes(sp: itop_timm.Sparsifier) -> int:
    tensors = list(sp.masks.values()) + list(sp.ever_active.values())
    if sp._state.grad_ema is not None:
        tensors += list(sp._state.grad_ema.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def itop_reference_masking(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor]
) -> None:
    """``Masking.apply_mask`` of the ITOP reference code (Liu et al. 2021, ``sparselearning/core.py``):
    float32 masks, a new weight tensor and momentum buffer per layer and step."""
    for name, tensor in model.named_parameters():
        if name in masks:
            tensor.data = tensor.data * masks[name]
            state = optimizer.state[tensor]
            if "momentum_buffer" in state:
                state["momentum_buffer"] = state["momentum_buffer"] * masks[name]


@torch.no_grad()
def bool_mask_hook(sp: itop_timm.Sparsifier) -> None:
    """The step hook before issue 13: one ``torch._foreach_mul_`` with the bool masks (promoted to
    float on every call)."""
    tensors, masks = [], []
    for name, p in sp._params.items():
        for value in (p, *sp.optimizer.state.get(p, {}).values()):
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                tensors.append(value)
                masks.append(sp.masks[name])
    torch._foreach_mul_(tensors, masks)


def compiled_hook(sp: itop_timm.Sparsifier) -> None:
    """``apply_masks`` with ``compile_hook`` on (a fused ``torch.compile``-d kernel per layer)."""
    sp.compile_hook = True
    try:
        sp.apply_masks()
    finally:
        sp.compile_hook = False


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    kwargs = {"img_size": args.img_size} if "vit" in name or "deit" in name or "mixer" in name else {}
    torch.manual_seed(0)
    dense = timm.create_model(
        name, pretrained=False, num_classes=args.num_classes, in_chans=args.in_chans, **kwargs
    ).to(device)
    control = copy.deepcopy(dense)
    sparse = copy.deepcopy(dense)
    reference = copy.deepcopy(dense)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    opt_dense, opt_control, opt_sparse, opt_reference = sgd(dense), sgd(control), sgd(sparse), sgd(reference)
    total = args.warmup + args.steps
    sp = itop_timm.sparsify(
        sparse, opt_sparse, method=args.method, density=args.density, update_interval=10**9, total_steps=10**9
    )
    reference_masks = {n: m.to(torch.float32) for n, m in sp.masks.items()}
    bool_hook = functools.partial(bool_mask_hook, sp)
    itop_reference_masking(reference, opt_reference, reference_masks)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, generator=g).to(device),
            torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device),
        )
        for _ in range(min(total, 4))
    ]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    sync = device.type == "cuda"

    def step(model, opt, batch, after=None):
        x, y = batch
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if after is not None:
            after()

    dense_times, control_times, sparse_times, reference_times = [], [], [], []
    reference_after = functools.partial(itop_reference_masking, reference, opt_reference, reference_masks)
    runs = [
        (dense, opt_dense, dense_times, None),
        (control, opt_control, control_times, None),
        (sparse, opt_sparse, sparse_times, None),
        (reference, opt_reference, reference_times, reference_after),
    ]
    for i in range(total):
        batch = batches[i % len(batches)]
        # rotate the order so no copy always follows the same one
        for model, opt, times, after in runs[i % len(runs) :] + runs[: i % len(runs)]:
            t = timed(functools.partial(step, model, opt, batch, after), sync)
            if i >= args.warmup:
                times.append(t)
    hooks = {
        "mask_hook_s": sp.apply_masks,
        "reference_hook_s": reference_after,
        "bool_hook_s": bool_hook,
        # the default per-step hook for SGD: the pre-step gradient masking (the post-step hook then does nothing)
        "grad_mask_hook_s": functools.partial(sp._before_optimizer_step, sp.optimizer, (), {}),
    }
    if getattr(args, "compiled_hook", False):
        compiled = functools.partial(compiled_hook, sp)
        compiled()  # compiles
        hooks["compiled_hook_s"] = compiled
    hook_times: dict[str, list[float]] = {key: [] for key in hooks}
    for i in range(args.steps):  # interleaved, rotating order
        order = list(hooks)[i % len(hooks) :] + list(hooks)[: i % len(hooks)]
        for key in order:
            hook_times[key].append(timed(hooks[key], sync))
    update_times = [timed(sp.update_topology, sync) for _ in range(args.updates)]
    dense_step = median(dense_times)
    result = {
        "model": name,
        "params_M": sum(p.numel() for p in dense.parameters()) / 1e6,
        "sparse_params_M": sp.num_sparse_weights / 1e6,
        "density": sp.density,
        "dense_step_s": dense_step,
        "sparse_step_s": median(sparse_times),
        "step_ratio": median(sparse_times) / dense_step,
        "control_ratio": median(control_times) / dense_step,
        "reference_step_s": median(reference_times),
        "reference_ratio": median(reference_times) / dense_step,
        **{key: median(times) for key, times in hook_times.items()},
        **{
            key[: -len("_s")] + "_fraction_of_dense_step": median(times) / dense_step
            for key, times in hook_times.items()
        },
        "update_s": median(update_times),
        "update_in_dense_steps": median(update_times) / dense_step,
        "extra_state_bytes_per_sparse_param": sparsifier_state_bytes(sp) / sp.num_sparse_weights,
    }
    logging.info("%s", result)
    return result


def peak_rss_child(args: argparse.Namespace) -> dict:
    """In a fresh process: a few training steps of one model, dense or sparse; peak RSS in bytes,
    counted from after the imports (Linux: the peak is reset through /proc/self/clear_refs)."""
    from pathlib import Path

    def vm(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = vm("VmRSS")
    name = args.models[0]
    kwargs = {"img_size": args.img_size} if "vit" in name or "deit" in name or "mixer" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=args.num_classes, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if args.child == "sparse":
        sp = itop_timm.sparsify(
            model, opt, method=args.method, density=args.density, update_interval=2, total_steps=10**6
        )
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    for _ in range(4):  # includes topology updates at steps 2 and 4 for the sparse run
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out = {"peak_rss_bytes": vm("VmHWM") - baseline}
    if args.child == "sparse":
        out["sparse_params"] = sp.num_sparse_weights
    return out


def peak_memory(name: str, args: argparse.Namespace) -> dict:
    """Peak RSS growth (above the imported interpreter) of dense vs sparse training in separate
    processes, and the difference per sparse parameter."""
    import subprocess
    import sys

    common = [
        sys.executable,
        __file__,
        "--models",
        name,
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
    ]
    common += [
        "--num-classes",
        str(args.num_classes),
        "--method",
        args.method,
        "--density",
        str(args.density),
    ]
    got = {}
    for kind in ("dense", "sparse"):
        proc = subprocess.run([*common, "--child", kind], capture_output=True, text=True, check=True)
        got[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = got["sparse"]["peak_rss_bytes"] - got["dense"]["peak_rss_bytes"]
    return {
        "peak_rss_dense_MB": got["dense"]["peak_rss_bytes"] / 1e6,
        "peak_rss_sparse_MB": got["sparse"]["peak_rss_bytes"] / 1e6,
        "peak_rss_ratio": got["sparse"]["peak_rss_bytes"] / got["dense"]["peak_rss_bytes"],
        "peak_extra_bytes_per_sparse_param": extra / got["sparse"]["sparse_params"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (1: Fashion-MNIST)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--updates", type=int, default=5, help="timed topology updates")
    parser.add_argument("--method", default="rigl")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny images, few steps")
    parser.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak RSS of dense vs sparse training (child processes)",
    )
    parser.add_argument(
        "--compiled-hook",
        action="store_true",
        help="also time the hook with compile_hook=True (compiles once)",
    )
    parser.add_argument("--child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak_rss_child(args)))
        return
    if args.quick:
        args.img_size, args.batch_size, args.steps, args.warmup, args.updates = 32, 4, 3, 1, 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    results = [measure(name, args, device) for name in args.models]
    if args.memory:
        for r in results:
            r.update(peak_memory(r["model"], args))
    payload = {
        "benchmark": "step_overhead",
        "machine": machine(),
        "device": str(device),
        "settings": vars(args),
        "results": results,
    }
    out = (
        args.out
        or f"step_overhead_{device.type}_{args.img_size}px{'_bf16' if args.bf16 else ''}{'_quick' if args.quick else ''}.json"
    )
    path = write_json(out, payload)
    print(
        f"{'model':28s} {'dense step':>11s} {'sparse/dense':>13s} {'ITOP ref/dense':>15s} {'A/A control':>12s} "
        f"{'update (dense steps)':>21s} {'state B/param':>14s}"
    )
    for r in results:
        print(
            f"{r['model']:28s} {r['dense_step_s'] * 1e3:9.1f}ms {r['step_ratio']:13.3f} {r['reference_ratio']:15.3f} "
            f"{r['control_ratio']:12.3f} "
            f"{r['update_in_dense_steps']:21.2f} {r['extra_state_bytes_per_sparse_param']:14.1f}"
        )
        if "peak_rss_ratio" in r:
            print(
                f"{'':28s} peak RSS dense {r['peak_rss_dense_MB']:.0f} MB, sparse {r['peak_rss_sparse_MB']:.0f} MB "
                f"(x{r['peak_rss_ratio']:.3f}, {r['peak_extra_bytes_per_sparse_param']:+.1f} B per sparse parameter)"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
