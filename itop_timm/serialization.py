"""Safe, atomic files for training state: safetensors for tensors, JSON for everything else.

Nothing here unpickles. A nested state (dicts/lists of tensors, numbers, strings, ``None``) is split
into its tensors, stored as safetensors, and a JSON skeleton, stored in the safetensors header's
metadata, that records where each tensor goes. Every write goes to a temporary file in the target
folder, is flushed to disk and then renamed over the target, so a crash leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_directory",
    "flatten_state",
    "unflatten_state",
    "save_state_file",
    "load_state_file",
    "read_safetensors",
]

_TENSOR = "__tensor__"
_STATE_KEY = "itop_timm.state"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not fit what it is loaded into."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a given path) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if isinstance(data, (bytes, bytearray)):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``path`` (an old ``path`` is
    removed only after the new folder is complete). On error the temporary folder is deleted."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``state`` into ``{key: tensor}`` and a JSON-able skeleton pointing at those keys."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "tensor"
            while key in tensors:
                key += "_"
            tensors[key] = value.detach().cpu().contiguous()
            return {_TENSOR: key}
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"state keys must be strings at {path or '<root>'!r}")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(
            f"cannot store {type(value).__name__} at {path or '<root>'!r} (tensors and JSON types only)"
        )

    return tensors, walk(state, "")


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`; a skeleton key without its tensor raises :class:`CheckpointError`."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_TENSOR}:
                key = value[_TENSOR]
                if key not in tensors:
                    raise CheckpointError(f"tensor {key!r} named in the state is missing from the file")
                return tensors[key]
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(skeleton)


def save_state_file(path: str | os.PathLike, state: Any, metadata: Mapping[str, str] | None = None) -> Path:
    """Store a nested ``state`` in one safetensors file (atomically)."""
    tensors, skeleton = flatten_state(state)
    header = dict(metadata or {})
    header[_STATE_KEY] = json.dumps(skeleton)
    return atomic_write_bytes(path, save(tensors, metadata=header))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file; any defect raises :class:`CheckpointError`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    return tensors, metadata


def load_state_file(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save_state_file`."""
    tensors, metadata = read_safetensors(path)
    if _STATE_KEY not in metadata:
        raise CheckpointError(f"{path}: no itop_timm state in the safetensors header")
    try:
        skeleton = json.loads(metadata[_STATE_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupted state header ({err})") from err
    return unflatten_state(tensors, skeleton)
