"""A build lock left by a killed build is cleared; one a running build holds is left alone."""
from __future__ import annotations

import os
import time

from hetero_llm.kernels import _build


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_kernel" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not _build.clear_stale_lock("some_kernel") and lock.exists()  # a build may be running
    old = time.time() - _build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert _build.clear_stale_lock("some_kernel") and not lock.exists()
    assert not _build.clear_stale_lock("some_kernel")  # nothing left to clear


def test_a_built_extension_is_recognised(monkeypatch, tmp_path):
    # Only a real build is announced ("compiling ..."), not each process's load of the cached one.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not _build.already_built("some_kernel")
    assert (tmp_path / "some_kernel").is_dir()  # torch's helper makes the build directory: still no library
    assert not _build.already_built("some_kernel")
    (tmp_path / "some_kernel" / "some_kernel.so").touch()
    assert _build.already_built("some_kernel")
