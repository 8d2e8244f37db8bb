"""Fill a meta model from a safetensors checkpoint, reading only what this rank holds.

A rank of a tensor/pipeline-parallel job builds its model on the meta device, cuts it to
its stage and slices (parallel/pipeline.py, parallel/tensor.py), and only then reads
weights: each sliced tensor carries `module._hetero_slices[name] = (dim, pieces)`, the
ranges of the full checkpoint tensor it holds, and safetensors' `get_slice` reads those
ranges alone. So no rank ever holds (or reads) the whole model, which is the point of
sharding a model too large for one device.

Only safetensors is read: a pickle (`pytorch_model.bin`) can run code when loaded.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch
from torch import nn

from ..integrations import hf_adapter as hf
from ..errors import ModelLoadError
from .layout import Range

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Record = tuple[int | None, tuple[Range, ...]]  # (dim, pieces): see parallel/tensor.py::_record

_CONVERT_HINT = ("Convert it to safetensors once (model = AutoModelForCausalLM.from_pretrained(path); "
                 "model.save_pretrained(new_path)) and pass new_path.")


class _Checkpoint:
    """Key -> file of one checkpoint; each file is opened once, lazily, and closed on exit."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = _key_files(self.path)
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}
        self._renamed: dict[str, str] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def handle(self, key: str):
        from safetensors import SafetensorError, safe_open

        f = self.files[key]
        if f not in self._open:
            try:
                self._open[f] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as err:
                raise ModelLoadError(f"{f} could not be read as safetensors ({err}); the file is damaged or "
                                     "incomplete: download or save the checkpoint again.") from err
        return self._open[f]

    def renamed(self, model: nn.Module) -> dict[str, str]:
        """Model name -> checkpoint key under transformers' own renamings (legacy names such
        as LayerNorm.gamma); computed once, and only when a name is not found as is."""
        if self._renamed is None:
            self._renamed = {}
            renamings = _renamings(model)
            for key in self.files if renamings else ():
                new = key
                for t in renamings:
                    new = t.rename_source_key(new)[0]
                if new != key:
                    self._renamed.setdefault(new, key)
        return self._renamed


def _key_files(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint and the file that holds it (headers only)."""
    if not path.exists():
        raise ModelLoadError(f"checkpoint {path} does not exist; pass a Hugging Face model directory or a "
                             ".safetensors file.")
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            return _from_index(index)
        if (path / SINGLE).is_file():
            files = [path / SINGLE]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ModelLoadError(f"{path} holds no .safetensors weights (found: {found}). hetero_llm reads only "
                                 f"safetensors, never pickled weights. {_CONVERT_HINT}")
    elif path.suffix != ".safetensors":
        raise ModelLoadError(f"{path} is not a .safetensors file; hetero_llm reads only safetensors, never "
                             f"pickled weights (.bin/.pt). {_CONVERT_HINT}")
    else:
        files = [path]
    return _from_headers(files)


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({err}); download the checkpoint again.") \
            from err
    out = {key: index.parent / name for key, name in weight_map.items()}
    missing = sorted({str(f) for f in out.values() if not f.is_file()})
    if missing:
        raise ModelLoadError(f"{index} names shard(s) that are not there: {', '.join(missing[:4])}; the download "
                             "is incomplete: download the checkpoint again.")
    return out


def _from_headers(files: list[Path]) -> dict[str, Path]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                out.update(dict.fromkeys(handle.keys(), f))
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{f} could not be read as safetensors ({err}); the file is damaged or "
                                 "incomplete: download or save the checkpoint again.") from err
    return out


def _renamings(model: nn.Module) -> list:
    """transformers' plain key renamings for this model (an internal transformers API: if it
    changes, names are simply not renamed). Converters that merge or split tensors are left
    out: they cannot be read slice by slice."""
    try:
        return hf.checkpoint_renamings(model)
    except Exception:  # noqa: BLE001 - renaming is a convenience, never a reason to fail
        return []


@dataclass
class _Tensor:
    """One tensor object of the model and every (module, attribute) that holds it."""

    tensor: torch.Tensor
    is_buffer: bool
    names: list[str] = field(default_factory=list)
    holders: list[tuple[nn.Module, str]] = field(default_factory=list)
    record: Record | None = None  # None: held whole


def _tensors(model: nn.Module) -> dict[int, _Tensor]:
    """By object id, so a Parameter shared by two modules (tied weights) is read once and
    stays shared."""
    out: dict[int, _Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        slices = module.__dict__.get("_hetero_slices", {})
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if t is None or (id(module), name) in seen:
                    continue
                seen.add((id(module), name))
                entry = out.setdefault(id(t), _Tensor(t, kind == "buffer"))
                entry.names.append(f"{prefix}.{name}" if prefix else name)
                entry.holders.append((module, name))
                if entry.record is None and name in slices:
                    entry.record = slices[name]
    return out


def _module_record(model: nn.Module, name: str) -> Record | None:
    mod, _, attr = name.rpartition(".")
    return model.get_submodule(mod).__dict__.get("_hetero_slices", {}).get(attr)


def _restore_ties(model: nn.Module) -> None:
    """accelerate.init_empty_weights() re-creates every parameter it registers, so the
    lm_head a tied model's __init__ pointed at the embedding's weight gets its own meta
    tensor. Share it again (as transformers' tie_weights would) when both are meta and
    cut the same way, so the tied lm_head is read from the embedding's key."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            t, s = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:  # one of them is a pipeline stand-in, or a tie we cannot see
            continue
        if t is s or not (t.is_meta and s.is_meta) or t.shape != s.shape:
            continue
        if _module_record(model, target) != _module_record(model, source):
            continue
        mod, _, attr = target.rpartition(".")
        model.get_submodule(mod)._parameters[attr] = s


def _candidates(model: nn.Module, names: list[str]) -> list[str]:
    """Checkpoint keys to try for a tensor known by `names`, most likely first."""
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    ties = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ties.update({s: t for t, s in list(ties.items())})  # a tie holds either way round
    out: list[str] = []
    for name in names + [ties[n] for n in names if n in ties]:
        # Old checkpoints (GPT-2's) store the base model without its prefix; a base model
        # may be read from a checkpoint of the model with a head.
        stripped = name[len(prefix):] if prefix != "." and name.startswith(prefix) else None
        for key in (name, stripped, None if stripped or prefix == "." else prefix + name):
            if key is not None and key not in out:
                out.append(key)
    return out


def _find_key(ckpt: _Checkpoint, model: nn.Module, names: list[str]) -> str | None:
    keys = _candidates(model, names)
    found = next((k for k in keys if k in ckpt.files), None)
    if found is None:
        renamed = ckpt.renamed(model)
        found = next((renamed[k] for k in keys if k in renamed), None)
    return found


def _read(ckpt: _Checkpoint, key: str, record: Record | None, like: torch.Tensor, name: str) \
        -> tuple[torch.Tensor, int]:
    """This rank's part of checkpoint tensor `key`, cast to `like`'s dtype, and the bytes read."""
    sl = ckpt.handle(key).get_slice(key)
    shape = list(sl.get_shape())
    dim, pieces = record if record is not None else (None, ())
    if record is not None:
        # The record does not say how long the unsliced dim was, so a checkpoint longer along
        # it than the model's config (more MLP channels, say) is caught only where an unsliced
        # dim disagrees too; ranges past the checkpoint's end are always caught.
        if not 0 <= dim < len(shape) or any(not 0 <= a <= b <= shape[dim] for a, b in pieces):
            _mismatch(name, key, shape, record, like)
        shape[dim] = sum(b - a for a, b in pieces)
    if tuple(shape) != tuple(like.shape):
        _mismatch(name, key, list(sl.get_shape()), record, like)
    if record is None:
        parts = [ckpt.handle(key).get_tensor(key)]
    else:
        lead = (slice(None),) * dim
        parts = [sl[lead + (slice(a, b),)] for a, b in pieces]
    read = sum(p.numel() * p.element_size() for p in parts)
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return value.to(like.dtype).contiguous(), read


def _mismatch(name: str, key: str, shape: list[int], record: Record | None, like: torch.Tensor):
    held = "" if record is None else f" (this rank holds ranges {record[1]} along dim {record[0]})"
    raise ModelLoadError(
        f"{name}: checkpoint tensor {key!r} has shape {tuple(shape)}, which does not fit the model's "
        f"{tuple(like.shape)}{held}. The checkpoint was saved from a different configuration: build the meta "
        "model from the config saved with it (AutoConfig.from_pretrained(checkpoint)).")


def _assign(entry: _Tensor, value: torch.Tensor, like: torch.Tensor) -> None:
    """Put `value` on every module that held the meta tensor, as one object (ties survive)."""
    new = value if entry.is_buffer else nn.Parameter(value, requires_grad=like.requires_grad)
    for module, attr in entry.holders:
        (module._buffers if entry.is_buffer else module._parameters)[attr] = new


def _rebuild_buffers(model: nn.Module) -> None:
    """Recompute buffers a checkpoint does not store (rotary inv_freq): build a fresh
    instance of the module on CPU from its config and take its buffers."""
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None) or getattr(model, "config", None)
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=config)
        except Exception as err:  # whatever the constructor raises means: it cannot be rebuilt
            where = ", ".join(f"{name}.{b}" if name else b for b in meta)
            raise ModelLoadError(
                f"{where}: not in the checkpoint and {type(module).__name__}(config=...) could not recompute it "
                f"({type(err).__name__}: {err}). Build the model with accelerate.init_empty_weights() (which keeps "
                "buffers real) instead of under torch.device('meta').") from err
        for b in meta:
            t = fresh._buffers.get(b)
            if t is not None and t.shape == module._buffers[b].shape:
                module._buffers[b] = t.to(module._buffers[b].dtype)


def _still_meta(model: nn.Module) -> list[str]:
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]


def load_shard(model: nn.Module, checkpoint: str | os.PathLike) -> int:
    """Materialize on CPU, from a safetensors checkpoint, every meta tensor of `model`: for a
    tensor sliced by the tensor-parallel pass, only this rank's ranges are read.

    `checkpoint`: a Hugging Face model directory (model.safetensors, or shards with
    model.safetensors.index.json) or one .safetensors file. Tensors already real are left
    alone; tied weights stay one object; buffers the checkpoint lacks (rotary inv_freq) are
    recomputed. Returns the bytes read from the checkpoint. Raises ModelLoadError for a
    missing tensor, a shape that does not match, or anything left on the meta device.
    """
    read = 0
    with _Checkpoint(checkpoint) as ckpt:
        _restore_ties(model)
        for entry in _tensors(model).values():
            like = entry.tensor
            if not like.is_meta:
                continue
            if entry.record is not None and entry.record[0] is None:  # zeros on this rank: nothing to read
                _assign(entry, torch.zeros(like.shape, dtype=like.dtype), like)
                continue
            key = _find_key(ckpt, model, entry.names)
            if key is None:
                if entry.is_buffer:
                    continue  # recomputed below, or reported as still meta
                raise ModelLoadError(
                    f"{entry.names[0]}: not found in checkpoint {ckpt.path} (tried {_candidates(model, entry.names)}). "
                    "The checkpoint belongs to a different model or is incomplete: pass the directory the model's "
                    "config came from, with every shard.")
            value, n = _read(ckpt, key, entry.record, like, entry.names[0])
            _assign(entry, value, like)
            read += n
    _rebuild_buffers(model)
    left = _still_meta(model)
    if left:
        raise ModelLoadError(f"still on the meta device after loading {checkpoint}: {', '.join(left[:6])}"
                             f"{' ...' if len(left) > 6 else ''}. Nothing in the checkpoint fills them: build the "
                             "model with accelerate.init_empty_weights() so buffers stay real, or load from the "
                             "checkpoint these tensors were saved in.")
    return read
