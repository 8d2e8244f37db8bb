"""What hetero_llm's C++ kernels need around torch's JIT builder (torch.utils.cpp_extension).

torch serializes builds of one extension with a lock file in its build directory, and a process
that finds the file waits for it to go away, with no time limit. A build killed at the wrong
moment (a notebook kernel restarted, a job cancelled) leaves the file behind, and from then on
every process that wants the kernel sleeps forever. A build takes ~30 s here: a lock much older
than that has no owner, and is removed before building.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("hetero_llm")

STALE_LOCK_S = 600.0


def clear_stale_lock(name: str) -> bool:
    """Remove the build lock of extension `name` if it is older than STALE_LOCK_S; True if removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):
        return False  # no lock (or no such helper in this torch): nothing to clear
    if age <= STALE_LOCK_S:
        return False  # a build may be running in another process: let torch wait for it
    log.warning("hetero_llm: removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def already_built(name: str) -> bool:
    """Whether torch's extension cache holds extension `name` built (loading it then takes well
    under a second, so there is no build to announce)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except (ImportError, OSError):
        return False
