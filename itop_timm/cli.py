"""The ``itop-timm`` command.

itop-timm train --config recipes/configs/fashion_mnist_rigl_itop.yaml [--section.key value ...]
itop-timm info runs/fashion_mnist_rigl_itop/model        # or hf-hub:org/name
itop-timm export <checkpoint> <out_dir> --compact [--no-union]
itop-timm push <checkpoint> <org/name> [--private] [--token T]
itop-timm compact <checkpoint> <out_dir>                  # remove zeroed channels (torch-pruning)
itop-timm methods                                          # registered methods / distributions / schedules
itop-timm timm-train path/to/timm/train.py [timm's arguments]  # timm's train.py with sparse optimizers
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def _clean(value: Any) -> str:
    """``str(value)`` with every non-printable character (escape sequences, newlines, bidi controls)
    shown as a Python escape, so text from a forged file cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    rows = [tuple(_clean(c) for c in row) for row in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_sparse, nonfinite_counts

    model, masks, meta = load_sparse(args.checkpoint)
    nonfinite = nonfinite_counts(model.state_dict())
    if nonfinite:
        print(
            f"WARNING: {sum(nonfinite.values())} NaN/Inf values in {len(nonfinite)} tensor(s): "
            + _clean(", ".join(list(nonfinite)[:5])),
            file=sys.stderr,
        )
    if args.json:
        printable = {
            k: v
            for k, v in meta.items()
            if k not in ("ever_active", "sha256", "sparsity_sha256", "dtypes", "shapes")
        }
        print(json.dumps(printable, indent=2, default=str))
        return 0
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("checkpoint", meta["path"]),
        ("architecture", meta["architecture"]),
        ("parameters", f"{params:,}"),
        ("method", meta.get("method")),
    ]
    if masks:
        sparse = sum(m.numel() for m in masks.values())
        rows += [
            ("sparse tensors", f"{len(masks)} ({sparse:,} weights)"),
            ("density", f"{meta['density']:.4f} (target {meta.get('target_density')})"),
        ]
        if meta.get("itop_rate") is not None:
            rows.append(("R_s", f"{meta['itop_rate']:.4f}"))
        rows += [("step", meta.get("step")), ("compact", meta.get("compact"))]
    if meta.get("dataset"):
        rows.append(("dataset", meta["dataset"]))
    rows += list((meta.get("metrics") or {}).items())
    if nonfinite:
        rows.append(("NaN/Inf values", f"{sum(nonfinite.values())} in {len(nonfinite)} tensor(s)"))
    for key, value in rows:
        print(f"{_clean(key):<15s}: {_clean(value)}")
    if "structured" in meta:
        history = meta["structured"].get("history")
        print(
            f"structured     : compacted with torch-pruning ({len(history) if isinstance(history, list) else '?'} pruning steps)"
        )
    if masks and not args.no_layers:
        print()
        rows = [
            (
                name,
                "x".join(map(str, t["shape"])),
                f"{t['density']:.4f}",
                f"{t['itop_rate']:.4f}" if t.get("itop_rate") is not None else "-",
            )
            for name, t in meta["tensors"].items()
        ]
        _print_table(rows, ("tensor", "shape", "density", "R_s"))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_checkpoint

    path = export_checkpoint(
        args.checkpoint, args.output, compact=args.compact, include_union=not args.no_union
    )
    size = sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")
    print(f"wrote {path} ({'compact' if args.compact else 'dense'}, {size / 1e6:.2f} MB of safetensors)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo_id, private=args.private, token=args.token)
    print(url)
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from .structured import compact_checkpoint

    report = compact_checkpoint(args.checkpoint, args.output, input_size=args.input_size, tol=args.tol)
    print(json.dumps(report, indent=2, default=str))
    return 0


#: the schedule settings ``itop-timm methods`` shows per method: (column, SparsityConfig field)
_METHOD_COLUMNS = (
    ("ΔT", "update_interval"),
    ("p0", "prune_rate"),
    ("final", "final_prune_rate"),
    ("schedule", "prune_schedule"),
)


def _method_row(info: Any, library: Any) -> tuple[str, ...]:
    """One row of the method table: each schedule setting the method runs with when left unset, the
    method's own default marked ``*`` (a static method has none: ``-``), and its description."""
    cells = []
    for _, key in _METHOD_COLUMNS:
        if not info.dynamic:
            cells.append("-")
        elif key in info.defaults:
            cells.append(f"{info.defaults[key]}*")
        else:
            cells.append(str(library[key]))
    return (info.name, *cells, info.description)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .config import SPARSIFY_DEFAULTS
    from .registry import DISTRIBUTIONS, METHODS, SCHEDULES
    from .structure import describe_options

    infos = [METHODS.get(n) for n in METHODS.names()]
    header = ("method", *(column for column, _ in _METHOD_COLUMNS), "description")
    _print_table([_method_row(info, SPARSIFY_DEFAULTS) for info in infos], header)
    print(
        "\n* the method's own default (MethodInfo.defaults); unmarked: the library's (SPARSIFY_DEFAULTS).\n"
        "ΔT = update_interval, p0 = prune_rate, final = final_prune_rate, schedule = prune_schedule;\n"
        "a value you set (sparsify(..., update_interval=...), --sparsity.update_interval ...) wins."
    )
    shown = {key for _, key in _METHOD_COLUMNS}
    for info in infos:
        others = {k: v for k, v in info.defaults.items() if k not in shown}
        if others:
            listed = ", ".join(f"{k}={v!r}" for k, v in others.items())
            print(_clean(f"{info.name} also defaults: {listed}"))
    library = ", ".join(f"{k}={v!r}" for k, v in SPARSIFY_DEFAULTS.items() if k not in shown)
    print(f"library defaults of the other settings: {library}")
    for info in infos:
        if info.structure is not None:
            print(f"\n{info.name} method_options:")
            for option, (default, help_) in describe_options(info.structure).items():
                print(_clean(f"  {option} (default: {default!r}): {help_}"))
    print()
    print("distributions:", ", ".join(DISTRIBUTIONS.names()))
    print("prune-rate schedules:", ", ".join(SCHEDULES.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itop-timm",
        description="Sparse training for timm models (ITOP dynamic sparse training, RMDA, weight averaging).",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="Python logging level: DEBUG, INFO, WARNING, ERROR (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "train", help="train a timm model sparse (the recipe; --help lists config keys)", add_help=False
    )
    sub.add_parser(
        "timm-train",
        help="run timm's own train.py with the sparse optimizers registered (--opt rigl_sgd --opt-kwargs ...)",
        add_help=False,
    )

    p = sub.add_parser(
        "info",
        help="summarise a sparse checkpoint (folder or hf-hub:org/name)",
        description="Verify a checkpoint and print its method, density, R_s, metrics and per-layer table.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (e.g. runs/<name>/model) or hf-hub:org/name")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "export",
        help="re-save a checkpoint dense (plain-timm loadable) or compact",
        description=(
            "Verify a checkpoint and write it to a new folder: dense by default (model.safetensors,\n"
            "which plain timm loads: timm.create_model('local-dir:OUT', pretrained=True)), or with\n"
            "--compact as nonzero values + bit masks, which only itop_timm loads. A compact checkpoint\n"
            "becomes plain-timm loadable again by exporting it without --compact."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="source: checkpoint folder or hf-hub:org/name")
    p.add_argument("output", help="destination folder (new, or an earlier checkpoint folder to replace)")
    p.add_argument(
        "--compact",
        action="store_true",
        help="nonzero values + bit masks (~0.13x the dense size at 90%% sparsity); "
        "loads with itop_timm only, not plain timm",
    )
    p.add_argument(
        "--no-union", action="store_true", help="leave out the union (R_s) masks: an inference export"
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "push",
        help="verify a checkpoint folder and upload it to the Hugging Face Hub",
        description="Verify a checkpoint folder (as itop_timm.load_sparse does) and upload all its files "
        "to a Hub model repository in one commit; the model card's load snippets name the repository.",
    )
    p.add_argument("checkpoint", help="checkpoint folder to upload")
    p.add_argument("repo_id", help="Hub repository id, org/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "compact",
        help="remove all-zero channels with torch-pruning into a smaller dense model",
        description="Slice every all-zero (or masked) channel group out of a checkpoint with torch-pruning, "
        "check that the outputs are unchanged and save the smaller model (load it with itop_timm.load_sparse).",
    )
    p.add_argument("checkpoint", help="source: checkpoint folder or hf-hub:org/name")
    p.add_argument("output", help="destination folder of the compacted checkpoint")
    p.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        default=None,
        help="C H W of the example input (default: from config.json)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=0.0,
        help="channels whose weights all have |w| <= tol count as zero (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_compact)

    p = sub.add_parser(
        "methods",
        help="list registered sparse-training methods, distributions and schedules",
        description="List every registered sparse-training method (installed plugins included) with the "
        "schedule it runs with when left unset (ΔT, prune rate p0, final rate, schedule; the method's own "
        "defaults marked *), each structured method's method_options with their defaults, and the "
        "registered layer-density distributions and prune-rate schedules.",
    )
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `train` and `timm-train` are entry points of their own (their own parsers, their own plugin loading)
    if argv and argv[0] == "train":  # the recipe has its own parser (config keys as options)
        from .training import main as train_main

        train_main(argv[1:], prog="itop-timm train")
        return 0
    if argv and argv[0] == "timm-train":  # everything after the script path is timm's
        from .timm_train import main as timm_train_main

        timm_train_main(argv[1:], prog="itop-timm timm-train")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .hub import HubError
    from .plugins import load_plugins
    from .serialization import CheckpointError

    try:
        load_plugins()  # installed plugins' methods, distributions and schedules, before any name is read
        return args.func(args)
    except (CheckpointError, ValueError) as err:
        print(f"itop-timm {args.command}: error: {_clean(err)}", file=sys.stderr)
        return 2
    except HubError as err:  # the input was fine; the Hub could not be reached or refused
        print(f"itop-timm {args.command}: error: {_clean(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
