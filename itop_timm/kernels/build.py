"""Building and loading the CPU kernels (``sparse_ops.cpp``).

The kernels are one C++ file with a plain C ABI and no dependency on torch's C++ API, compiled on first
use with the machine's C++ compiler (``$CXX``, else ``c++``, else ``g++``) in well under a second, for
this CPU (``-march=native``) with OpenMP, cached under ``$ITOP_TIMM_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/itop_timm/kernels``, i.e. ``~/.cache/itop_timm/kernels``) by a hash of the source,
the compiler, the flags and the CPU, and loaded with :mod:`ctypes`. Why this way rather than torch's
``cpp_extension`` (30–60 s builds against torch's headers, a rebuild for every torch version, ninja
needed) or numba (an LLVM dependency, less control over vectorisation): see BENCHMARKS §8. The built
library uses the OpenMP runtime torch already loaded (same ``libgomp.so.1``), so torch's and the
kernels' threads are one pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["KernelBuildError", "load_kernels", "find_compiler", "kernel_cache_dir"]

SOURCE = Path(__file__).with_name("sparse_ops.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_CANDIDATES = ("c++", "g++")


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be built or loaded (no compiler, a failed compile, a bad library)."""


def find_compiler() -> str:
    """Path of the C++ compiler to use: ``$CXX`` if set, else the first of ``c++``, ``g++`` on ``PATH``."""
    wanted = os.environ.get("CXX")
    for name in (wanted,) if wanted else _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    looked = f"$CXX={wanted!r}" if wanted else " or ".join(_CANDIDATES)
    raise KernelBuildError(
        f"compute='sparse' builds itop_timm's CPU kernels with a C++ compiler, and none was found "
        f"(looked for {looked} on PATH): install one (e.g. `apt-get install g++`), point $CXX at it, "
        f"or use compute='masked'"
    )


def kernel_cache_dir() -> Path:
    """Where built kernels are kept (``$ITOP_TIMM_KERNEL_CACHE``, else the user's cache folder)."""
    given = os.environ.get("ITOP_TIMM_KERNEL_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "itop_timm" / "kernels"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (best effort)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelBuildError(f"the C++ compiler {compiler} does not run: {err}") from None
    return done.stdout


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically: a concurrent build by another rank is fine)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise KernelBuildError(
                f"building itop_timm's CPU kernels with {compiler} failed (exit {done.returncode}):\n"
                f"{done.stderr.strip()[-4000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_kernels() -> ctypes.CDLL:
    """The kernel library, built on first use (see the module docstring); raises
    :class:`KernelBuildError` naming the missing tool or the compiler's error."""
    compiler = find_compiler()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), _compiler_version(compiler).encode(),
                 " ".join(FLAGS).encode(), _cpu_identity().encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    target = kernel_cache_dir() / key.hexdigest()[:20] / "itop_sparse_ops.so"
    if not target.is_file():
        _build(compiler, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        raise KernelBuildError(f"cannot load the built CPU kernels {target}: {err}") from None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the three kernels (pointers as integers: ``tensor.data_ptr()``)."""
    ptr, threads = ctypes.c_void_p, ctypes.c_int
    lib.itop_sparse_forward.argtypes = [ptr] * 8 + [threads]
    lib.itop_sparse_input_grad.argtypes = [ptr] * 7 + [threads]
    lib.itop_sparse_weight_grad.argtypes = [ptr] * 7 + [threads]
    for fn in (lib.itop_sparse_forward, lib.itop_sparse_input_grad, lib.itop_sparse_weight_grad):
        fn.restype = None
