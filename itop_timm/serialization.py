"""Safe, atomic files for training state: safetensors for tensors, JSON for everything else.

Nothing here unpickles. A nested state (dicts/lists of tensors, numbers, strings, ``None``) is split
into its tensors, stored as safetensors, and a JSON skeleton, stored in the safetensors header's
metadata, that records where each tensor goes. Every write goes to a temporary file in the target
folder, is flushed to disk and then renamed over the target, so a crash leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
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
    "plain_mode",
    "flatten_state",
    "unflatten_state",
    "save_state_file",
    "load_state_file",
    "read_safetensors",
    "parse_json",
    "read_json_file",
    "remove_stale_temporaries",
    "MAX_JSON_DEPTH",
    "json_depth_exceeds",
]

_TENSOR = "__tensor__"
_STATE_KEY = "itop_timm.state"
#: JSON read from a checkpoint may nest at most this deep (itop_timm writes at most ~6 levels).
MAX_JSON_DEPTH = 32
#: config/metadata JSON files larger than this are refused unread.
MAX_JSON_BYTES = 64 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not fit what it is loaded into."""


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(text: str | bytes, source: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse JSON read from ``source``; any defect (syntax, encoding, nesting deeper than
    :data:`MAX_JSON_DEPTH`) raises :class:`CheckpointError` naming ``source``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError covers bad JSON and bad UTF-8
        message = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CheckpointError(f"{source}: unreadable {what} ({message})") from None
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise CheckpointError(f"{source}: unreadable {what} (nested deeper than {MAX_JSON_DEPTH} levels)")
    return value


def read_json_file(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Read and parse a JSON file with :func:`parse_json`; a missing file, one that is not a regular file
    (a FIFO would block, ``/dev/zero`` never ends) or one over :data:`MAX_JSON_BYTES` raises
    :class:`CheckpointError` naming it, without reading more than that bound."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise CheckpointError(f"{path}: {what} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {what} larger than {MAX_JSON_BYTES} bytes")
    return parse_json(data, path, what)


def _temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary siblings of ``path``; it carries this process's id, so a later
    writer can tell the leftovers of a killed one from a save in progress."""
    return f".{path.name}.{os.getpid()}."


def _owner_is_gone(name: str, path: Path) -> bool:
    pid_text = name[len(f".{path.name}.") :].split(".", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings (``.<name>.<pid>.*.tmp``) that a killed write of ``path`` left
    behind, i.e. those whose writing process no longer runs on this machine; returns what was removed."""
    import shutil

    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _owner_is_gone(candidate.name, path):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask: from ``/proc`` where Linux shows it, else by setting it and back."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(folder: bool = False) -> int:
    """The permissions a plain ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) gives a new file or
    folder under the process's umask: what :mod:`tempfile`'s private ``0o600`` / ``0o700`` is set to
    before a temporary file or folder becomes an output."""
    return (0o777 if folder else 0o666) & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a given path) to ``path`` atomically. The file
    gets the permissions a plain ``open()`` would: those of the file it replaces, else
    :func:`plain_mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
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
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = plain_mode()
        os.chmod(tmp, mode)
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
    removed only after the new folder is complete). On error the temporary folder is deleted. The
    folder gets the permissions a plain ``mkdir()`` would (:func:`plain_mode`)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, plain_mode(folder=True))
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
    skeleton = parse_json(metadata[_STATE_KEY], path, "state header")
    return unflatten_state(tensors, skeleton)
