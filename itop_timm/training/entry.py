"""Command line of the training recipe: ``--config file.yaml`` plus ``--section.key value`` overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..plugins import load_plugins
from .config import TrainConfig, load_config

__all__ = ["build_parser", "main", "format_summary"]

_logger = logging.getLogger("itop_timm.train")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train any timm model sparse (dynamic sparse training with ITOP) on a 🤗 data set.\n"
            "Run as `accelerate launch recipes/train.py --config recipes/configs/<name>.yaml [--section.key value ...]`,\n"
            "`python recipes/train.py ...` (one process) or `itop-timm train ...`."
        ),
        epilog=(
            "config keys (YAML `section: {key: value}`, or overrides `--section.key value`; values are YAML,\n"
            "e.g. `--sched.milestones [0.5,0.75]`, `--model.num_classes null`; a {KEY: VALUE} key also takes\n"
            "one entry at a time, merged into the file's: `--sparsity.method_options.channel_sparsity 0.3`):\n"
            + TrainConfig.describe_keys()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (recipes/configs/*.yaml); defaults if omitted")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (method defaults and seed filled in) and exit",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    return parser


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "=== summary ==="]
    for key, value in summary.items():
        lines.append(f"{key:>18s}: {value:.4f}" if isinstance(value, float) else f"{key:>18s}: {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "train.py") -> dict[str, Any] | None:
    """Parse arguments, load the installed plugins, train, print the summary; returns it (``None`` for
    ``--print-config``)."""
    parser = build_parser(prog)
    args, overrides = parser.parse_known_args(argv)  # --help exits here, before torch is imported
    from .reporting import configure_console

    # log lines above the progress bar, and informational ones from the main process only
    configure_console(getattr(logging, str(args.log_level).upper(), logging.INFO))
    try:
        load_plugins()  # installed plugins: before the config names their methods
        cfg = load_config(args.config, overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.print_config:
        sys.stdout.write(cfg.resolved().to_yaml())  # the values the run fills in, not null
        return None
    from .loop import InputError, run

    try:
        summary = run(cfg)
    except InputError as err:
        # bad input found before training: a clear message, no traceback (other errors keep theirs)
        _logger.error("%s", err)
        raise SystemExit(2) from err
    from accelerate import PartialState

    if PartialState().is_main_process:
        sys.stdout.write(format_summary(summary) + "\n")
        sys.stdout.write(json.dumps(summary) + "\n")
    return summary
