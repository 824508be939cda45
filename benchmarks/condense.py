"""SRigL's condensed linear layers: CPU latency against the dense layer and against ``torch.sparse`` CSR.

The two MLP layers of a ViT-B/16 block (768 → 3072 and 3072 → 768), 90 % sparse with constant fan-in
(the mask SRigL trains: every row holds the same number of weights), timed in one process, interleaved
in rotating order, median of ``--reps``: (a) dense ``F.linear`` on the masked weight, (a') the same again
(the A/A control), (b) ``torch.sparse`` CSR matmul, (c) ``CondensedLinear``. All outputs are checked
equal to the dense layer's first. Batch 1 (a token at a time) and 197 (one ViT-B/16 image's tokens).

    uv run python benchmarks/condense.py [--density 0.1] [--reps 200] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import machine, write_json

from itop_timm.structured import CondensedLinear


def constant_fan_in_mask(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    k = max(1, round(density * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, torch.rand(rows, cols, generator=generator).topk(k, dim=1).indices, True)
    return mask


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], reps: int) -> dict[str, float]:
    """Median seconds per call, the functions called in rotating order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        for _ in range(5):
            fn()
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def measure(in_f: int, out_f: int, density: float, batch: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = constant_fan_in_mask(out_f, in_f, density, g)
    layer = torch.nn.Linear(in_f, out_f)
    layer.weight.mul_(mask)
    condensed = CondensedLinear.from_linear(layer, mask)
    csr = layer.weight.to_sparse_csr()
    x = torch.randn(batch, in_f, generator=g)
    dense = F.linear(x, layer.weight, layer.bias)

    def sparse() -> torch.Tensor:
        return (csr @ x.T).T + layer.bias

    assert torch.allclose(sparse(), dense, atol=1e-4) and torch.allclose(condensed(x), dense, atol=1e-4)
    t = interleaved(
        {
            "dense": lambda: F.linear(x, layer.weight, layer.bias),
            "dense_aa": lambda: F.linear(x, layer.weight, layer.bias),
            "csr": sparse,
            "condensed": lambda: condensed(x),
        },
        reps,
    )
    return {
        "layer": f"{in_f}->{out_f}",
        "batch": batch,
        "density": density,
        **{f"{k}_us": v * 1e6 for k, v in t.items()},
        "aa_ratio": t["dense_aa"] / t["dense"],
        "condensed_speedup_vs_dense": t["dense"] / t["condensed"],
        "condensed_speedup_vs_csr": t["csr"] / t["condensed"],
        "csr_speedup_vs_dense": t["dense"] / t["csr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.reps = 5
    rows = [
        measure(in_f, out_f, args.density, batch, args.reps)
        for in_f, out_f in ((768, 3072), (3072, 768))
        for batch in (1, 197)
    ]
    payload = {
        "benchmark": "condense",
        "machine": machine(),
        "settings": vars(args),
        "command": "uv run python benchmarks/condense.py" + (" --quick" if args.quick else ""),
        "rows": rows,
    }
    path = write_json("condense" + ("_quick" if args.quick else "") + ".json", payload)
    print(
        f"{'layer':12s} {'batch':>5s} {'dense µs':>9s} {'A/A':>5s} {'CSR µs':>8s} {'cond. µs':>9s} {'vs dense':>9s} {'vs CSR':>7s}"
    )
    for r in rows:
        print(
            f"{r['layer']:12s} {r['batch']:5d} {r['dense_us']:9.1f} {r['aa_ratio']:5.2f} {r['csr_us']:8.1f} "
            f"{r['condensed_us']:9.1f} {r['condensed_speedup_vs_dense']:8.2f}× {r['condensed_speedup_vs_csr']:6.2f}×"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
