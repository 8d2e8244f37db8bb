"""Directories written whole or not at all, and file checksums: what save() and export_onnx() share."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import HeteroLLMError


def cache_dir() -> Path:
    """Where hetero_llm keeps what it computes once (converted models, CPU measurements, self-check
    verdicts): ``$HETERO_LLM_CACHE``, else ``~/.cache/hetero_llm``."""
    env = os.environ.get("HETERO_LLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hetero_llm"


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` so that a concurrent reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def written_atomically(target: Path, overwrite: bool, error: type[HeteroLLMError] = HeteroLLMError,
                       what: str = "model") -> Iterator[Path]:
    """A temporary directory beside `target` to write into; moved into place when the block ends,
    removed if it raises, so an interrupted write never leaves a half-written `what` behind.

    Refuses (`error`) a non-empty `target` unless `overwrite`; its files are only replaced once
    the new ones are complete.
    """
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise error(f"{target} already exists and is not empty; pass overwrite=True to replace it "
                    f"(its files are only removed once the new {what} is fully written).")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
