"""Render the tables of BENCHMARKS.md from benchmarks/results/*.json.

Each table sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in BENCHMARKS.md and is
rewritten from the matching result file; the prose around it is left alone.

    uv run python benchmarks/report.py            # rewrite the tables in BENCHMARKS.md
    uv run python benchmarks/report.py --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from _common import METHOD_LABELS, RESULTS, ROOT, aggregate_seeds

#: training images of each protocol's full training split
TRAIN_IMAGES = {"fashion_mnist": 60000, "cifar10": 50000}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _machine(data: dict) -> str:
    m = data["machine"]
    return f"*Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), timm {m['timm']}.*"


def _table(header: str, rows: list[str]) -> str:
    """A Markdown table from its ``| a | b |`` header line and row lines."""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows])


def overhead() -> str:
    parts = []
    for name in ("step_overhead_cpu_224px.json",):
        data = _load(name)
        if not data:
            continue
        s = data["settings"]
        header = "| model | params | dense step | sparse / dense | A/A control | mask hook (% of dense step) | one update (dense steps) | extra state (B / sparse param) | peak RSS sparse / dense | peak extra (B / sparse param) |"
        rows = []
        for r in data["results"]:
            rows.append(
                f"| {r['model']} | {r['params_M']:.1f} M | {r['dense_step_s'] * 1e3:.0f} ms | **{r['step_ratio']:.3f}** | {r.get('control_ratio', float('nan')):.3f} | "
                f"{100 * r.get('mask_hook_fraction_of_dense_step', float('nan')):.2f} | "
                f"**{r['update_in_dense_steps']:.2f}** | {r['extra_state_bytes_per_sparse_param']:.1f} | "
                f"{r.get('peak_rss_ratio', float('nan')):.3f} | {r.get('peak_extra_bytes_per_sparse_param', float('nan')):.1f} |"
            )
        parts.append(
            f"Batch {s['batch_size']} at {s['img_size']} px, {s['method']} at density {s['density']}, SGD (Nesterov), "
            f"median of {s['steps']} steps after {s['warmup']} warm-up, update = median of {s['updates']}.\n\n"
            + _table(header, rows)
            + "\n\n"
            + _machine(data)
        )
    return "\n\n".join(parts) or "*not run yet*"


def throughput() -> str:
    data = _load("throughput_cpu.json")
    if not data:
        return "*not run yet*"
    s = data["settings"]
    header = "| model | bare loop | A/A (bare copy / bare) | recipe dense | dense / bare | recipe RigL d=0.1 | RigL / bare |"
    rows = [
        f"| {r['model']} ({r['img_size']} px) | {r['bare_samples_per_s']:.0f} | {r['bare_control_ratio']:.3f} | "
        f"{r['recipe_dense_samples_per_s']:.0f} | **{r['recipe_dense_ratio']:.3f}** | "
        f"{r['recipe_rigl_samples_per_s']:.0f} | **{r['recipe_rigl_ratio']:.3f}** |"
        for r in data["results"]
    ]
    oheader = (
        "| resnet18 | batch | dense step | sparse / dense | ITOP reference / dense | A/A control | hook: bool masks "
        "(before) | hook: re-mask weights + state (cached masks) | hook: compiled re-mask (`compile_hook`) "
        "| hook: mask gradients (default for SGD, Adam, ...) | ITOP reference masking |"
    )

    def pct(o: dict, key: str) -> str:
        value = o.get(f"{key}_fraction_of_dense_step")
        return "–" if value is None else f"{100 * value:.2f} % ({o[key + '_s'] * 1e3:.1f} ms)"

    orows = [
        f"| {o['img_size']} px, {o['in_chans']} ch | {o['batch_size']} | {o['dense_step_s'] * 1e3:.0f} ms | {o['step_ratio']:.3f} | "
        f"{o['reference_ratio']:.3f} | {o['control_ratio']:.3f} | {pct(o, 'bool_hook')} | {pct(o, 'mask_hook')} | "
        f"{pct(o, 'compiled_hook')} | **{pct(o, 'grad_mask_hook')}** | {pct(o, 'reference_hook')} |"
        for o in data["overhead"]
    ]
    return (
        f"Command: `{data['command']}` — batch {s['batch_size']}, {s['steps']} steps per run in windows of "
        f"{s['log_interval']}, {s['rounds']} alternating rounds (samples/s, medians), "
        f"{data['wall_time_s'] / 60:.0f} min in all.\n\n"
        + _table(header, rows)
        + f"\n\n![throughput](benchmarks/results/{Path(data['plot']).name})\n\n"
        + f"Step overhead (median of {s['overhead_steps']} interleaved steps per copy):\n\n"
        + _table(oheader, orows)
        + "\n\n"
        + _machine(data)
    )


def bare_step() -> str:
    data = _load("bare_step_cpu.json")
    if not data:
        return "*not run yet*"
    s = data["settings"]
    labels = {
        "eager": "eager (throughput.py's bare loop)",
        "eager_control": "eager, second copy (A/A)",
        "channels_last": "channels_last",
        "bf16_autocast": "bf16 autocast (forward)",
        "compile": "torch.compile (inductor)",
    }
    rows = [
        f"| {labels.get(name, name)} | {r['samples_per_s']:.0f} | {r['step_s'] * 1e3:.0f} ms | **{r['ratio_to_eager']:.3f}** |"
        for name, r in data["results"].items()
    ]
    return (
        f"Command: `{data['command']}` — {s['model']}, {s['img_size']} px, batch {s['batch_size']}, "
        f"{s['rounds']} alternating rounds of {s['windows']} windows of {s['log_interval']} steps per variant "
        f"(medians), {data['wall_time_s'] / 60:.0f} min in all.\n\n"
        + _table("| bare loop variant | samples/s | step | / eager |", rows)
        + "\n\n"
        + _machine(data)
    )


def _mean_std(mean: float, std: float, seeds: int, digits: int) -> str:
    """``mean ± std`` over seeds; the mean alone for one seed (no spread measured)."""
    text = f"{mean:.{digits}f}"
    return text if seeds < 2 else f"{text} ± {std:.{digits}f}"


def _accuracy(name: str) -> str:
    data = _load(name)
    if not data:
        return "*not run yet*"
    settings, dense = data["settings"], data["dense_top1"]
    images = settings["train_samples"] or TRAIN_IMAGES[settings.get("dataset", "fashion_mnist")]
    timed = bool(data["table"]) and all("wall_time_vs_dense_mean" in r for r in data["table"])
    progress = (
        ""
        if data.get("complete", True)
        else f" **Under way: {len(data['runs'])} of {data['runs_planned']} runs finished** (the table holds "
        "those; `--reuse-runs` continues the protocol, `--summarize` re-tabulates it)."
    )
    seeds = len(dense["seeds"]) if dense else 0
    minutes = sum(r["wall_time_s"] for r in data["runs"]) / 60
    intro = (
        f"Dense: **{_mean_std(dense['mean'], dense['std'], seeds, 2)}** "
        f"(R_s 1, {seeds} seed{'s' if seeds > 1 else ''}). "
        if dense
        else ""
    )
    intro += (
        f"Command: `{data['command']}` ({images} training images, "
        f"{settings['epochs'] or 'the config files’'} epochs, ΔT = {settings['update_interval'] or 'the files’'}, "
        f"seeds {settings['seeds']}; {minutes / 60:.1f} h of training in all, "
        f"{minutes / max(len(data['runs']), 1):.0f} min per run)." + progress
    )
    header = "| method | density | seeds | test top-1 (mean ± std) | gap to dense (± s.e.) | beyond seed noise? | R_s (mean ± std) |"
    if timed:
        header += " wall time / dense (same seed) |"
    rows = []
    for r in data["table"]:
        se = f" ± {r['gap_se']:.2f}" if r["gap_se"] is not None else ""
        verdict = _verdict(r["gap_beyond_noise"], r["gap_t"], r["gap_df"])
        rows.append(
            f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['density']} | {len(r['seeds'])} | "
            f"{_mean_std(r['top1_mean'], r['top1_std'], len(r['seeds']), 2)} | {r['gap_to_dense']:+.2f}{se} | "
            f"{verdict} | {_mean_std(r['itop_rate_mean'], r['itop_rate_std'], len(r['seeds']), 3)} |"
            + (
                f" {_mean_std(r['wall_time_vs_dense_mean'], r['wall_time_vs_dense_std'], len(r['seeds']), 2)}"
                + _time_notes(r)
                + " |"
                if timed
                else ""
            )
        )
    return intro + "\n\n" + _table(header, rows) + _pairs(data) + "\n\n" + _machine(data) + _launch_cpus(data)


def _time_notes(row: dict) -> str:
    """The wall-time cell's notes: Chase's compacted latency, and how many of the sparse layers the CPU
    kernels computed (the range over seeds), where the results hold them."""
    notes = []
    if "latency_224px_vs_dense_mean" in row:
        notes.append(f"compacted 224 px latency {row['latency_224px_vs_dense_mean']:.2f}× dense")
    if "kernel_layers_range" in row:
        low, high, total = row["kernel_layers_range"]
        notes.append(f"kernels in {low}{f'–{high}' if high != low else ''} of {total} layers")
    return f" ({'; '.join(notes)})" if notes else ""


def _pairs(data: dict) -> str:
    """The pairwise comparisons of the unstructured methods at each density (higher R_s minus lower) and
    whether their accuracy orders with R_s (Spearman), when the results hold them."""
    if not data.get("pairs"):
        return ""
    rows, orders = [], []
    for p in data["pairs"]:
        if "rs_order" in p:
            labels = " < ".join(METHOD_LABELS.get(m, m) for m in p["rs_order"])
            orders.append(
                f"density {p['density']}: R_s order {labels}; Spearman ρ of mean top-1 against it "
                f"{p['spearman_rho']:+.2f} (exact one-sided p = {p['spearman_p_one_sided']:.3f})"
            )
            continue
        verdict = _verdict(p["beyond_noise"], p["t"], p["df"])
        se = f" ± {p['se']:.2f}" if p["se"] is not None else ""
        rows.append(
            f"| {p['density']} | {METHOD_LABELS.get(p['higher_rs'], p['higher_rs'])} − "
            f"{METHOD_LABELS.get(p['lower_rs'], p['lower_rs'])} | {p['seeds'][0]} / {p['seeds'][1]} | "
            f"{p['gap']:+.2f}{se} | {verdict} | {_paired(p.get('paired'))} |"
        )
    header = (
        "| density | higher R_s − lower R_s | seeds | top-1 difference (± s.e.) | beyond seed noise? (Welch, 5 %) "
        "| paired by seed: difference ± s.e., beyond noise? (paired t, 5 %) |"
    )
    text = "\n\nMethod against method, the one with the higher mean R_s first (each a test of its own, no multiple-comparison correction):\n\n"
    return text + _table(header, rows) + "".join(f"\n\n{o}." for o in orders)


def _verdict(
    beyond_noise: bool | None,
    t: float | None,
    df: float | None,
    *,
    df_digits: int = 1,
    missing: str = "n/a (1 seed)",
) -> str:
    """A test's verdict cell: **yes** / no with its t and degrees of freedom, or ``missing`` where there
    were too few seeds to test."""
    if beyond_noise is None:
        return missing
    verdict = "**yes**" if beyond_noise else "no"
    return verdict if t is None else f"{verdict} (t = {t:+.1f}, {df:.{df_digits}f} df)"


def _paired(test: dict | None) -> str:
    """One pair's paired-by-seed verdict (absent from results written before it was computed)."""
    if test is None:
        return "n/a"
    seeds = test["seeds"]
    missing = f"n/a ({seeds} shared seed{'s' if seeds != 1 else ''})"
    verdict = _verdict(test["beyond_noise"], test["t"], test["df"], df_digits=0, missing=missing)
    return verdict if test["beyond_noise"] is None else f"{test['gap']:+.2f} ± {test['se']:.2f}: {verdict}"


def _launch_cpus(data: dict) -> str:
    """Which CPUs the runs trained on, where their launches were recorded (runs continued in another
    session may mix machines)."""
    recorded = [r for r in data["runs"] if "cpus" in r]
    if not recorded:
        return ""
    counts: dict[str, int] = {}
    for r in recorded:
        key = " + ".join(r["cpus"])
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{cpu} ({n} run{'s' if n > 1 else ''})" for cpu, n in counts.items())
    unrecorded = len(data["runs"]) - len(recorded)
    return f" *Runs trained on: {parts}" + (
        f"; {unrecorded} earlier run{'s' if unrecorded > 1 else ''} without a record.*"
        if unrecorded
        else ".*"
    )


def accuracy() -> str:
    """BENCHMARKS §1: the full protocol (all 60k training images)."""
    return _accuracy("accuracy_vs_density.json")


def accuracy_2000img() -> str:
    """BENCHMARKS §1b: `make bench`'s 2,000-image sweep."""
    return _accuracy("accuracy_vs_density_2000img.json")


def accuracy_cifar10() -> str:
    """BENCHMARKS §9: the CIFAR-10 protocol."""
    return _accuracy("accuracy_cifar10.json")


def scaling() -> str:
    data = _load("scaling.json")
    if not data:
        return "*not run yet*"
    header = "| processes | samples/s | optimizer steps | topology updates | masks identical on every rank at every update |"
    rows = []
    for p, r in data["results"].items():
        rows.append(
            f"| {p} | {r['samples_per_s']:.0f} | {r['total_steps']} | {r['topology_updates']} | {'yes' if r['ranks_agreed_at_every_update'] else 'NO'} |"
        )
    return (
        _table(header, rows)
        + f"\n\nSpeed-up 2 vs 1 process: **{data['speedup_2_vs_1']:.2f}×** (efficiency {data['efficiency']:.0%}).\n\n"
        + _machine(data)
    )


def checkpoints() -> str:
    data = _load("checkpoint_sizes.json")
    if not data:
        return "*not run yet*"
    header = f"| {data['model']} sparsity | model.safetensors | dense folder | compact: weights + masks | compact + union | ratio (w+m / dense) | ratio with union | load dense | load compact |"
    rows = []
    for r in data["results"]:
        rows.append(
            f"| {r['sparsity']:.0%} | {r['dense_model_safetensors_MB']:.1f} MB | {r['dense_folder_MB']:.1f} MB | {r['compact_weights_and_masks_MB']:.1f} MB | "
            f"{r['compact_with_union_MB']:.1f} MB | **{r['compact_ratio']:.3f}** | {r['compact_with_union_ratio']:.3f} | {r['load_dense_s']:.2f} s | {r['load_compact_s']:.2f} s |"
        )
    return _table(header, rows) + "\n\n" + _machine(data)


def averaging() -> str:
    data = _load("averaging.json")
    if not data:
        return "*not run yet*"
    header = "| configuration | final test top-1 | volatility (std of per-epoch test top-1, last half) | train time |"
    rows = []
    for r in data["table"]:
        rows.append(
            f"| {r['config']} | {r['final_top1_mean']:.2f} ± {r['final_top1_std']:.2f} | {r['volatility_mean']:.3f} ± {r['volatility_std']:.3f} | {r['wall_time_s']:.0f} s |"
        )
    s = data["settings"]
    return (
        f"Command: `{data['command']}` — {s['train_samples']} training images, {s['epochs']} epochs, seeds {s['seeds']}, "
        f"PWALKS q = {s['sample_prob']}, last {s['last_fraction']:.0%} of each epoch.\n\n"
        + _table(header, rows)
        + "\n\n"
        + _machine(data)
    )


def _machine_name(machine: dict | None) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores" if machine else "machine not recorded"


def structured() -> str:
    data = _load("structured.json")
    if not data or not data.get("rows"):
        return "*not run yet*"
    dense_top1 = {r["seed"]: r["test_top1"] for r in data["rows"] if r["model"] == "dense"}
    runs = [
        {**r, "delta_top1": r["test_top1"] - r.get("dense_test_top1", dense_top1[r["seed"]])}
        for r in data["rows"]
    ]  # paired by seed, with the dense run of the row's own invocation
    table = aggregate_seeds(runs)

    def pm(r: dict, key: str, fmt: str = ".2f") -> str:
        return f"{r[key]:{fmt}} ± {r[key + '_std']:{fmt}}"

    header = (
        "| model | seeds | test top-1 | Δ vs dense (same seed) | params ratio | MACs ratio (28 px) | speed-up 28 px b1 | 28 px b64 "
        "| **224 px b1** | **224 px b64** | training time vs dense | training MACs vs dense |"
    )
    lines = [
        f"| {r['model']} | {len(r['seeds'])} | {pm(r, 'test_top1')} | {r['delta_top1']:+.2f} ± {r['delta_top1_std']:.2f} | {r['params_ratio']:.3f} | "
        f"{r['macs_ratio']:.3f} | {pm(r, 'speedup_28px_b1')}× | {pm(r, 'speedup_28px_b64')}× | "
        f"**{pm(r, 'speedup_224px_b1')}×** | **{pm(r, 'speedup_224px_b64')}×** | {pm(r, 'train_time_ratio')}× | "
        f"{pm(r, 'train_macs_ratio', '.3f') + '×' if 'train_macs_ratio' in r else '1 (full network)'} |"
        for r in table
    ]
    s = data["settings"]
    same = all(r["same_after_compaction"] for r in data["rows"])
    only = s.get("only")
    partial = (
        f" Rows {', '.join(only)} were trained in the latest invocation (`--only`; Δ and training times "
        f"against its own dense runs); the others are kept from an earlier full run "
        f"({_machine_name(data.get('earlier_machine'))}; against that run's dense runs)."
        if only
        else ""
    )
    macs_plot = (
        f"\n\n![MACs per training step]({Path(data['macs_plot']).relative_to(ROOT)})"
        if data.get("macs_plot")
        else ""
    )
    return (
        f"Command: `{data['command']}` — {s['train_samples']} training images, {s['epochs']} epochs, seeds "
        f"{sorted({r['seed'] for r in data['rows']})}, density 0.1 for the sparse methods, RMDA lr {s['rmda_lr']}. Mean ± std over seeds; "
        f"speed-up = dense latency / compacted latency (dense row: the A/A control). Test top-1 identical "
        f"before and after compaction for every run: {'yes' if same else 'NO'}.{partial}\n\n"
        + _table(header, lines)
        + f"\n\n![structured]({Path(data['plot']).relative_to(ROOT)}){macs_plot}\n\n"
        + _machine(data)
    )


def condense() -> str:
    data = _load("condense.json")
    if not data:
        return "*not run yet*"
    header = "| layer | batch | dense | A/A (dense / dense) | `torch.sparse` CSR | condensed | **condensed vs dense** | condensed vs CSR |"
    rows = [
        f"| {r['layer']} | {r['batch']} | {r['dense_us']:.0f} µs | {r['aa_ratio']:.2f} | {r['csr_us']:.0f} µs | "
        f"{r['condensed_us']:.0f} µs | **{r['condensed_speedup_vs_dense']:.2f}×** | {r['condensed_speedup_vs_csr']:.2f}× |"
        for r in data["rows"]
    ]
    return (
        f"Command: `{data['command']}` — density {data['settings']['density']}, median of {data['settings']['reps']} interleaved calls.\n\n"
        + _table(header, rows)
        + "\n\n"
        + _machine(data)
    )


SECTIONS: dict[str, Callable[[], str]] = {
    "overhead": overhead,
    "throughput": throughput,
    "bare_step": bare_step,
    "accuracy": accuracy,
    "accuracy_2000img": accuracy_2000img,
    "accuracy_cifar10": accuracy_cifar10,
    "scaling": scaling,
    "checkpoints": checkpoints,
    "averaging": averaging,
    "structured": structured,
    "condense": condense,
}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(\n<!-- END {name} -->)", re.S)
        body = fn()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    new = render(text)
    if args.check:
        sys.exit(0 if new == text else 1)
    path.write_text(new)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
