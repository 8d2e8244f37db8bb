"""save() and load(): an accelerated model as safetensors plus a versioned JSON manifest.

A saved directory holds
  model.safetensors   every tensor of the accelerated model (INT8 weights, scales,
                      zero points, smoothing vectors, float norms...), stored once
  config.json         the transformers config, to rebuild the architecture
  generation_config.json (if the model has one)
  hetero_llm.json     format version, the plan, dtype, tensor aliases and the
                      SHA-256 of every file, so truncation or corruption is caught
load() builds the architecture with empty weights (accelerate's
init_empty_weights), replays the plan's module swaps without quantizing
anything, and assigns the saved tensors: no calibration, no pickle, and the
logits are bit-identical to the saved model's. 2:4 weights on sparse tensor
cores (torch SparseSemiStructuredTensor) are written dense, so the file stays
plain safetensors, and converted again after placement on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import sha256_file, written_atomically
from ._version import __version__
from .errors import DistributedError, HardwareError, HeteroLLMError, ModelLoadError, PlanMismatchError
from .integrations import hf_adapter as hf
from .plan import Plan
from .selfcheck import require_parts
from .pipeline import PassContext, apply_plan
from .prune.semi_sparse import dense_weight

FORMAT = "hetero_llm"
FORMAT_VERSION = 1
MANIFEST = "hetero_llm.json"
WEIGHTS = "model.safetensors"


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict with each storage once; aliases maps a dropped name to the kept one."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        t = dense_weight(t)  # a 2:4 sparse tensor has no storage of its own to key or write
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]  # tied tensors (e.g. a float lm_head tied to its embedding)
            continue
        seen[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write an accelerated model to directory `path`; returns the path.

    Refuses to write into a non-empty directory unless overwrite=True; the
    files are written to a temporary directory first and moved into place,
    so an interrupted save never leaves a half-written model behind.
    """
    from safetensors.torch import save_file

    plan: Plan | None = getattr(model, "hetero_plan", None)
    if plan is None:
        raise HeteroLLMError("save() writes a model accelerated by hetero_llm (it stores the plan with the "
                             "weights); call hetero_llm.accelerate(model) first, or use model.save_pretrained().")
    if getattr(model, "hetero_parallel", None) is not None:
        raise DistributedError(
            "save() writes a whole model, and this one is sharded: this rank holds only its tp/pp slice. "
            "Save the model before accelerate(..., tp=/pp=) (hetero_llm.save or save_pretrained), and shard "
            "when loading: accelerate(meta_model, tp=..., checkpoint=path) reads each rank's slice.")
    target = Path(path)
    with written_atomically(target, overwrite) as tmp:
        tensors, aliases = _unique_tensors(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(model.config.to_json_string())
        files = [WEIGHTS, "config.json"]
        if getattr(model, "generation_config", None) is not None:
            (tmp / "generation_config.json").write_text(model.generation_config.to_json_string())
            files.append("generation_config.json")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "hetero_llm_version": __version__,
                    "transformers_version": hf.transformers_version(), "model_class": type(model).__name__, "dtype": str(model.dtype).replace("torch.", ""),
                    "aliases": aliases, "plan": json.loads(plan.to_json()),
                    "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return target


def _read_manifest(directory: Path) -> dict:
    if not (directory / MANIFEST).is_file():
        raise ModelLoadError(f"{directory} has no {MANIFEST}: it was not written by hetero_llm.save(). "
                             "Load a plain checkpoint with transformers, then call hetero_llm.accelerate().")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{directory / MANIFEST} is not valid JSON ({e}); the save is damaged: save again.") \
            from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ModelLoadError(f"{directory / MANIFEST} is not a hetero_llm manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{directory} uses save format {manifest.get('format_version')!r}; this hetero_llm "
                             f"({__version__}) reads format {FORMAT_VERSION}. Load it with the version that "
                             f"saved it ({manifest.get('hetero_llm_version')}) or re-accelerate the original.")
    for name, info in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise ModelLoadError(f"{f} is missing; the save is incomplete: save the model again.")
        if f.stat().st_size != info.get("bytes") or sha256_file(f) != info.get("sha256"):
            raise ModelLoadError(f"{f} does not match its checksum (truncated or corrupted); save the model again.")
    return manifest


def _skeleton(directory: Path, manifest: dict, plan: Plan) -> nn.Module:
    """The original architecture with meta weights, checked against the plan."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .api import check_plan_matches

    config = AutoConfig.from_pretrained(str(directory))
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # meta initialisation leaves tied weights as two Parameters
    if type(model).__name__ != manifest.get("model_class"):
        raise ModelLoadError(f"config.json builds a {type(model).__name__}, the manifest expects "
                             f"{manifest.get('model_class')}; the directory mixes files from different saves.")
    check_plan_matches(model, plan)
    return model


def _load_tensors(directory: Path, manifest: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{directory / WEIGHTS} cannot be read ({e}); save the model again.") from None
    # safetensors hands out tensors at file offsets (8-byte aligned); the CPU int8
    # kernels use aligned vector loads and crash on those. A copy is 64-byte aligned.
    tensors = {}
    while loaded:
        name, t = loaded.popitem()
        tensors[name] = t.clone()
    for alias, source in manifest.get("aliases", {}).items():
        if source not in tensors:
            raise ModelLoadError(f"alias {alias} -> {source} names a tensor the file does not hold")
        tensors[alias] = tensors[source]
    return tensors


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by save(): same modules, same tensors, same logits.

    Raises ModelLoadError for a missing, truncated, corrupted or mismatched
    file; nothing partially loaded is ever returned.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    try:
        plan = Plan.from_json(json.dumps(manifest["plan"]))
    except (KeyError, TypeError, ValueError, HeteroLLMError) as e:
        raise ModelLoadError(f"the plan in {directory / MANIFEST} cannot be read ({e}); save again.") from None
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("this model was saved with a plan for a CUDA GPU and this machine has none; "
                            "load it on a GPU machine, or re-accelerate the original model here.")
    model = _skeleton(directory, manifest, plan)

    def fill(rebuilt: nn.Module) -> None:  # the "fill" pass: after the plan's swaps, before placing
        require_parts(rebuilt, plan, f"the model saved in {directory} (with transformers "
                                     f"{manifest.get('transformers_version', 'unknown')})")
        _fill(rebuilt, _load_tensors(directory, manifest))

    # The passes accelerate() ran, replayed on the meta skeleton: empty INT8 modules, the fused
    # ones, then the saved tensors, then dtype, devices, 2:4 weights and generate().
    return apply_plan(model, plan, PassContext(fill=fill))


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = set(model.state_dict().keys())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PlanMismatchError(f"the saved tensors do not fit the rebuilt model (missing {missing[:3]}, "
                                f"unexpected {extra[:3]}); the file and the plan come from different saves.")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:  # shapes or dtypes differ
        raise PlanMismatchError(f"the saved tensors do not fit the rebuilt model: {e}") from None
    _refresh_derived(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelLoadError(f"{leftover[0]} (and {len(leftover) - 1} more) got no data from the file.")


def _refresh_derived(model: nn.Module) -> None:
    """Recompute what modules derive from their saved tensors (bf16 scales, folded norm weights)."""
    for m in model.modules():
        refresh = getattr(m, "_refresh", None)
        if callable(refresh):
            refresh()
