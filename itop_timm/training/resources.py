"""CPU threads and data-loader workers of a training process: resolved from the cores it may use.

``run.num_threads: auto`` gives each local process ``usable cores / local processes`` torch threads,
where the usable cores are ``os.sched_getaffinity`` (what taskset, cgroups-aware launchers and job
schedulers hand the process). A number sets the threads explicitly. ``OMP_NUM_THREADS`` exported by
the user is respected under ``auto``; the one that ``accelerate launch`` and ``torchrun`` export
themselves (1 on the CPU) is not, since it would leave all cores but one idle.

``data.num_workers: auto`` gives the data loader the cores the compute threads leave (CPU training),
or all cores of the process but one (GPU training, where the CPU only feeds the GPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO",
    "ThreadPlan",
    "usable_cores",
    "local_processes",
    "check_num_threads",
    "check_num_workers",
    "resolve_num_threads",
    "resolve_num_workers",
    "configure_threads",
]

_logger = logging.getLogger(__name__)

AUTO = "auto"
# environment variables that only launchers set: when present, OMP_NUM_THREADS is the launcher's
_LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
_MAX_AUTO_WORKERS = 8


def usable_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where unsupported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes(env: Mapping[str, str] = os.environ) -> int:
    """Training processes on this machine (``LOCAL_WORLD_SIZE`` from torchrun / accelerate, else 1)."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_num_threads(value: int | str) -> None:
    """``ValueError`` unless ``value`` is ``auto`` or an integer in [1, usable cores]."""
    cores = usable_cores()
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cores:
        raise ValueError(
            f"run.num_threads must be 'auto' or an integer in [1, {cores}] (the cores this process may use), "
            f"got {value!r}"
        )


def check_num_workers(value: int | str) -> None:
    """``ValueError`` unless ``value`` is ``auto`` or an integer >= 0."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.num_workers must be 'auto' or an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class ThreadPlan:
    """The torch threads of this process and where the number came from."""

    threads: int
    source: str  # "run.num_threads", "OMP_NUM_THREADS" or "auto"
    usable_cores: int
    local_processes: int


def resolve_num_threads(setting: int | str, env: Mapping[str, str] = os.environ) -> ThreadPlan:
    """Threads for ``run.num_threads`` (already validated): an explicit number wins; under ``auto`` a
    user-exported ``OMP_NUM_THREADS`` wins; otherwise usable cores / local processes."""
    cores, procs = usable_cores(), local_processes(env)
    if setting != AUTO:
        return ThreadPlan(int(setting), "run.num_threads", cores, procs)
    launched = any(marker in env for marker in _LAUNCHER_MARKERS)
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1 and not launched:
        return ThreadPlan(int(omp), "OMP_NUM_THREADS", cores, procs)
    return ThreadPlan(max(1, cores // procs), AUTO, cores, procs)


def resolve_num_workers(setting: int | str, plan: ThreadPlan, device_type: str) -> int:
    """Data-loader workers for ``data.num_workers`` (already validated): an explicit number wins;
    ``auto`` takes the cores of this process's share that compute threads leave free on the CPU, or
    all of the share but one (at most 8) when a GPU computes."""
    if setting != AUTO:
        return int(setting)
    share = max(1, plan.usable_cores // plan.local_processes)
    if device_type == "cpu":
        return max(0, share - plan.threads)
    return max(1, min(_MAX_AUTO_WORKERS, share - 1))


def configure_threads(setting: int | str, env: Mapping[str, str] = os.environ) -> ThreadPlan:
    """Resolve ``run.num_threads`` and apply it with ``torch.set_num_threads``; logged."""
    plan = resolve_num_threads(setting, env)
    torch.set_num_threads(plan.threads)
    _logger.info(
        "torch threads: %d (%s; %d usable cores, %d local process(es))",
        plan.threads,
        plan.source,
        plan.usable_cores,
        plan.local_processes,
    )
    return plan
