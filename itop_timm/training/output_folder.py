"""A run's output folder: what a run leaves there, and the lock that lets one run at a time write it.

**Results.** A fresh run truncates ``metrics.jsonl`` and replaces ``model/``, ``summary.json``, ...:
:func:`previous_results` names what a finished (or interrupted) run left, so a fresh run refuses
such a folder unless asked to overwrite it (then :func:`remove_previous_results` clears those
results first, so the old run's model never sits beside the new run's metrics) or to resume it.

**Lock.** A run holds an exclusive ``flock`` on ``<output_dir>/.itop_timm.lock`` from its set-up to
its end (the main process; the other ranks of the same run write only through it). A second run into
the same folder is refused, naming the holder's host and process id that the file records. A lock is
never stale: the kernel drops it when its process ends, however it ends (``kill -9``, an OOM kill,
a power cut), so the file a killed run leaves behind is not locked and a resume takes it at once.
(``flock`` works on local file systems and, emulated with POSIX locks, on NFSv4; a file system that
supports neither refuses the run with its OS error.)
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from .checkpointing import checkpoint_dir, list_checkpoints

__all__ = [
    "LOCK_FILE",
    "check_writable",
    "RESULT_NAMES",
    "OutputLock",
    "OutputBusyError",
    "previous_results",
    "remove_previous_results",
]

#: The lock file in the output folder.
LOCK_FILE = ".itop_timm.lock"

#: What a run writes into its output folder besides ``checkpoints/``, ``config.yaml`` and the lock.
RESULT_NAMES = ("metrics.jsonl", "summary.json", "model", "compacted", "best.safetensors", "plots")


def check_writable(output_dir: str | Path) -> None:
    """``ValueError`` unless a run can create and write ``output_dir``: it (or, when it does not exist
    yet, its nearest existing ancestor) must be a folder this process may write into."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "" if existing == path else f": {str(existing)!r} is not a folder"
        raise ValueError(f"run.output_dir {str(output_dir)!r} cannot be a folder{where or ' (it is a file)'}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its parent {str(existing)!r} is not writable)"
        raise ValueError(f"run.output_dir {str(output_dir)!r} is not writable by this user{where}")


def previous_results(output_dir: str | Path) -> list[str]:
    """The results of an earlier run in ``output_dir`` (``checkpoints`` when it holds complete ones; an
    empty ``metrics.jsonl`` is no result), in :data:`RESULT_NAMES` order."""
    output = Path(output_dir)
    found = ["checkpoints"] if list_checkpoints(checkpoint_dir(output)) else []
    for name in RESULT_NAMES:
        path = output / name
        if path.is_dir() or (path.exists() and (name != "metrics.jsonl" or path.stat().st_size > 0)):
            found.append(name)
    return found


def remove_previous_results(output_dir: str | Path) -> None:
    """Delete an earlier run's checkpoints and :data:`RESULT_NAMES` from ``output_dir`` (nothing else)."""
    output = Path(output_dir)
    for path in (checkpoint_dir(output), *(output / name for name in RESULT_NAMES)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class OutputBusyError(ValueError):
    """Another live run holds the output folder's lock."""


class OutputLock:
    """The exclusive lock of an output folder (see the module docstring); :meth:`release` (or the end
    of the process) frees it."""

    def __init__(self, output_dir: str | Path) -> None:
        import fcntl

        self.path = Path(output_dir) / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise OutputBusyError(
                f"{str(output_dir)!r} is being written by another run ({holder}): wait for it to end, or "
                "pass --run.output_dir to start elsewhere"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock (idempotent); the file stays (an unlocked file is no lock)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
