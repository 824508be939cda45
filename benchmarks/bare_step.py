"""How fast can the bare training step go on this machine? Standard levers on throughput.py's bare loop.

The recipe runs at the bare loop's speed (``throughput.py``), so the demo's training time is bounded by
the bare step. This benchmark asks whether a standard lever makes that step faster on this machine: in
one process, on copies of one resnet18 (the demo's shape: 28 px, 1 channel, batch 128, timm's SGD, the
recipe's batch augmentation and thread count), it interleaves windows of

* ``eager``: throughput.py's bare loop, and a second eager copy (the A/A control),
* ``channels_last``: model and batches in channels-last memory format,
* ``bf16_autocast``: the forward pass under ``torch.autocast(dtype=torch.bfloat16)``,
* ``compile``: the model wrapped in ``torch.compile`` (inductor; compiled in a warm-up window),

and reports each variant's samples/s over the eager loop's (medians over windows and rounds).

    uv run python benchmarks/bare_step.py            # CPU: about 5 minutes on 2 cores
    uv run python benchmarks/bare_step.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from _common import RUNS, machine, median, write_json
from throughput import BARE_VARIANTS, BareLoop, recipe_config

from itop_timm.training.resources import resolve_num_threads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", help="timm model name (28 px Fashion-MNIST)")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-interval", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=4, help="timed windows per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of all variants")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batches, few steps")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.log_interval, args.windows, args.rounds = 8, 2, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(resolve_num_threads("auto").threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    # recipe_config's data budget is batch_size * steps images: enough for every window of a round.
    args.steps = args.log_interval * (args.windows + 1) * args.rounds
    cfg = recipe_config(args.model, args.img_size, "dense", args, RUNS / "bare_step")
    eager = BareLoop(cfg, device)
    loops = {"eager": eager, "eager_control": eager.clone()}
    loops |= {v: eager.clone(v) for v in BARE_VARIANTS if v != "eager"}
    for name, loop in loops.items():  # warm-up window each (compiles the compiled copy)
        t = time.perf_counter()
        loop.window(args.log_interval)
        logging.info("warm-up %s: %.1f s", name, time.perf_counter() - t)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            got = [loops[name].window(args.log_interval) for _ in range(args.windows)]
            logging.info("round %d %s: %s samples/s", r, name, [round(v, 1) for v in got])
            rates[name].extend(got)
    eager_rate = median(rates["eager"])
    medians = {name: median(v) for name, v in rates.items()}
    results = {
        name: {"samples_per_s": m, "step_s": args.batch_size / m, "ratio_to_eager": m / eager_rate}
        for name, m in medians.items()
    }
    payload = {
        "benchmark": "bare_step",
        "machine": machine(),
        "device": str(device),
        "settings": vars(args),
        "command": " ".join(["uv run python benchmarks/bare_step.py", *sys.argv[1:]]),
        "rates": rates,
        "results": results,
        "wall_time_s": time.perf_counter() - started,
    }
    path = write_json(f"bare_step_{device.type}{'_quick' if args.quick else ''}.json", payload)
    print(f"{'variant':16s} {'samples/s':>10s} {'step (s)':>9s} {'/ eager':>8s}")
    for name, r in results.items():
        print(f"{name:16s} {r['samples_per_s']:10.1f} {r['step_s']:9.3f} {r['ratio_to_eager']:8.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
