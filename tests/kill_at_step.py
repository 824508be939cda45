"""Run recipes/train.py and SIGKILL the process right after optimizer step $KILL_AT_STEP.

Used by the kill-and-resume test: a global optimizer step post-hook (it runs after the sparsifier's
own hook) counts steps and kills the process without any chance to clean up.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

kill_at = int(os.environ["KILL_AT_STEP"])
steps = 0


def kill_hook(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


register_optimizer_step_post_hook(kill_hook)
recipe = Path(__file__).resolve().parents[1] / "recipes" / "train.py"
sys.argv = [str(recipe), *sys.argv[1:]]
runpy.run_path(str(recipe), run_name="__main__")
