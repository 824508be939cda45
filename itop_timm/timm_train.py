"""Run timm's own ``train.py``, unmodified, with itop_timm's sparse optimizers registered.

timm's ``train.py`` builds its optimizer with ``create_optimizer_v2(model, **optimizer_kwargs(args),
**args.opt_kwargs)``, but nothing in it imports itop_timm, so ``--opt rigl_sgd`` would reach timm's
plain SGD with ``density=...`` and fail. This runner imports itop_timm (which registers
``<method>_<optimizer>`` with timm's optimizer registry) and the installed plugins, then runs the
script as ``python train.py ...`` would::

    python -m itop_timm.timm_train path/to/train.py /data/imagenet --model resnet50 \\
        --opt rigl_sgd --opt-kwargs density=0.1 total_steps=100000 update_interval=100
    itop-timm timm-train path/to/train.py ...                          # the same
    torchrun --nproc_per_node 8 -m itop_timm.timm_train path/to/train.py ...
    accelerate launch -m itop_timm.timm_train path/to/train.py ...

Sparse settings go in ``--opt-kwargs`` (``total_steps`` = epochs × optimizer steps per epoch; timm's
train.py builds the optimizer before the data loader, so it cannot be inferred). The sparsifier's
state rides inside ``optimizer.state_dict()``, so timm's checkpoints and ``--resume`` carry masks,
R_s and RNG.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "python -m itop_timm.timm_train") -> argparse.ArgumentParser:
    """The runner's own arguments: the script, then everything for the script, passed on unchanged."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "script", help="path of timm's train.py (or a script that builds its optimizer like it)"
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m itop_timm.timm_train") -> None:
    """Register the sparse optimizers and run ``script`` as ``__main__`` with ``script_args`` as its argv."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    script = Path(args.script)
    if not script.is_file():
        parser.error(f"script {args.script!r} not found (give the path of timm's train.py)")

    import itop_timm  # noqa: F401 - registers the sparse optimizers with timm

    from .plugins import load_plugins

    try:
        load_plugins()
    except ValueError as err:
        parser.error(str(err))
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.resolve().parent))  # as `python train.py` would
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
