"""export_onnx(): a model (accelerated or not) as one ONNX decoder graph with a KV cache.

The directory written holds
  model.onnx            the graph (and model.onnx.data beside it above ~1.8 GB)
  hetero_llm_onnx.json  what a runner needs: layer count, KV shapes, IO names, quantization,
                        versions and file sizes (see `OnnxCausalLM`)
  config.json, generation_config.json (and the tokenizer, if given)

Graph IO (Optimum's "decoder with past"): inputs `input_ids` (batch, seq), `attention_mask`
(batch, past + seq), `position_ids` (batch, seq), `past_key_values.{i}.key|value` (batch,
kv_heads, past, head_dim), past may be 0; outputs `logits` (batch, seq, vocab) and
`present.{i}.key|value` (batch, kv_heads, past + seq, head_dim). One optional input,
`logits_to_keep` (int64 (1,), default 0 = all positions), limits the lm_head to the last n.

INT8 weights stay INT8 in the file: each quantized linear is DequantizeLinear (per output
channel, axis 0; per group via block_size) -> Transpose -> MatMul, the standard QDQ weight-only
pattern (see docs/onnx.md for how ONNX Runtime executes it).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import sha256_file, written_atomically
from .._version import __version__
from ..errors import (DistributedError, ExportError, InvalidOptionError, MetaDeviceError, NotAModelError,
                      UnsupportedArchitectureError)
from ..integrations.hf_adapter import cache_argument, cache_from_pairs, cache_pairs, output_cache
from ..integrations.transformers import spec_for, supported_model_types
from ..quant.w8a8 import W8A8Linear
from . import onnx_graph
from .onnx_format import FORMAT, FORMAT_VERSION, SIDECAR
from .onnx_modules import QdqLinear, dequantize_int8_onnx, export_copy

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MIN_OPSET = 21  # DequantizeLinear's block_size (per-group scales) arrived in opset 21
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps one message at 2 GB
_PREFIX = "wrapped."


def _require_packages() -> None:
    missing = [name for name in ("onnx", "onnxscript") if _absent(name)]
    if missing:
        raise ExportError(f"export_onnx needs {' and '.join(missing)}: pip install onnx onnxscript "
                          "(and onnxruntime to run or check the result).")


def _absent(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is None


def _check_devices(model: nn.Module) -> None:
    placement = getattr(model, "hetero_placement", None)
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if "meta" in devices:
        raise MetaDeviceError("the model's weights are on the meta device (no data), so there is nothing to "
                              "export. Load real weights first (hetero_llm.load(path) for a saved model).")
    if placement is not None and (len(set(placement.labels.values())) > 1 or placement.offload):
        raise ExportError("this model is split across devices (or offloaded) by its plan; the ONNX file "
                          "holds one whole CPU graph. Accelerate a fresh copy with device='cpu' and export that.")
    if devices - {"cpu"}:
        raise ExportError(f"the model's weights are on {sorted(devices - {'cpu'})}; export_onnx traces a CPU "
                          "model. Accelerate a fresh copy with device='cpu' (or move a plain model with "
                          "model.to('cpu')) and export that.")


def check_exportable(model: Any) -> None:
    """Every refusal, before anything is written (see the module docstring for what works)."""
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise NotAModelError(f"export_onnx takes a transformers causal LM (an nn.Module with a .config), got "
                             f"{type(model).__name__}.")
    if getattr(model, "hetero_parallel", None) is not None:
        raise DistributedError("this model is sharded (tp/pp): this rank holds only its slice. Export the whole "
                               "model: accelerate it without tp=/pp= (or load it whole) and export that.")
    if spec_for(model) is None:
        raise UnsupportedArchitectureError(
            f"export_onnx has no tested export for model_type {getattr(model.config, 'model_type', '?')!r}; "
            f"supported: {', '.join(supported_model_types())}. torch.onnx.export(model, ..., dynamo=True) may "
            "still export a plain transformers model of it.")
    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ExportError("W8A8 layers quantize activations per token at run time, which this export does not "
                          "write. Export a weight-only model instead: accelerate(model, quantize='int8' or "
                          "'int8-asym') keeps the INT8 weights in the file.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError("export_onnx writes decoder-only causal LMs; this model is an "
                                           "encoder-decoder.")
    _check_devices(model)


class _DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, presents): the
    flat IO of the graph around the model's own forward and a transformers DynamicCache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.wrapped = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = cache_from_pairs([(k, v) for k, v in past])
        out = type(self.wrapped).forward(self.wrapped, input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=True,
                                         **{cache_argument(self.wrapped): cache})
        return out.logits, cache_pairs(output_cache(out))


def kv_shapes(clone: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read from one short forward (pruned
    models may have other head counts than the config's originals)."""
    ids = torch.tensor([[1, 2]])
    with torch.inference_mode():
        out = type(clone).forward(clone, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                  **{cache_argument(clone): cache_from_pairs(None)})
    return [(int(k.shape[1]), int(k.shape[3])) for k, _ in cache_pairs(output_cache(out))]


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(n_layers) for part in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


def _sample(shapes: list[tuple[int, int]], vocab: int):
    """Example inputs with distinct sizes (batch 2, seq 3, past 5) so no axis is specialised."""
    b, s, p = 2, 3, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 1), (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, -1).contiguous()
    past = [(torch.randn(b, kv, p, d, generator=g), torch.randn(b, kv, p, d, generator=g)) for kv, d in shapes]
    return ids, mask, pos, past


def _dynamic_shapes(n_layers: int) -> dict:
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch"), dim("seq"), dim("past"), dim("past_plus_seq")
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq}, "past": [({0: batch, 2: past}, {0: batch, 2: past})] * n_layers}


def _dim_names(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    names = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_plus_seq"},
             "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    names.update({n: {0: "batch", 2: "past"} for n in inputs if n.startswith("past_key_values.")})
    names.update({n: {0: "batch", 2: "past_plus_seq"} for n in outputs if n.startswith("present.")})
    return names


def _trace(clone: nn.Module, shapes: list[tuple[int, int]], opset: int):
    """torch.onnx.export (dynamo) of the wrapper; the exporter's chatter is kept for errors."""
    inputs, outputs = io_names(len(shapes))
    wrapper = _DecoderWithPast(clone).eval()
    args = _sample(shapes, int(getattr(clone.config, "vocab_size", 2)))
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")  # the exporter's notes on axis names, deprecations
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
                dynamic_shapes=_dynamic_shapes(len(shapes)), verbose=False, optimize=False,
                custom_translation_table={torch.ops.hetero_llm.dequantize_int8.default: dequantize_int8_onnx})
            _clean(program.model)
    except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one typed error
        raise ExportError(f"torch.onnx.export failed on this model ({type(exc).__name__}: {exc}). "
                          f"Exporter log:\n{log.getvalue()[-2000:]}") from exc
    return program, inputs, outputs


def _clean(model) -> None:
    """The exporter's optimizer without its pattern rewriter, which takes half the export time
    on a 30-layer model and changes nothing ONNX Runtime does not do itself at load: fold
    constants (small ones only, and never a DequantizeLinear: the weights must stay INT8),
    drop dead nodes, merge duplicates."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    ir.passes.Sequential(common.InlinePass())(model)
    fold_constants(model, input_size_limit=8192, output_size_limit=8192,
                   should_fold=lambda node: False if node.op_type == "DequantizeLinear" else None)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(), common.OutputFixPass(), common.NameFixPass(),
        common.ClearMetadataAndDocStringPass())(model)  # per-node stack traces: most of a small file


def _quantization(model: nn.Module, proto) -> dict:
    linears = [m for m in model.modules() if isinstance(m, QdqLinear)]
    schemes = sorted({"int8-asym" if m.zero_point is not None else "int8" for m in linears})
    per_group = sorted({m.block_size for m in linears if m.block_size})
    int8 = onnx_graph.int8_initializers(proto)
    return {"int8_linears": len(linears), "schemes": schemes, "group_sizes": per_group,
            "int8_weight_bytes": sum(int8.values()),
            "int8_embedding": any(type(m).__name__ == "Int8Embedding" for m in model.modules()),
            "representation": "DequantizeLinear(int8 weight (out, in), fp32 scale, [int8 zero point]; axis=0, "
                              "or axis=1 with block_size per group) -> Transpose -> MatMul" if linears else None}


def _sidecar(model: nn.Module, clone: nn.Module, proto, shapes, inputs, outputs, opset: int) -> dict:
    import onnx
    import onnxscript

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "hetero_llm_version": __version__,
        "model_file": MODEL_FILE, "model_type": clone.config.model_type, "model_class": type(model).__name__,
        "num_layers": len(shapes), "kv_heads": [kv for kv, _ in shapes], "head_dim": [d for _, d in shapes],
        "vocab_size": int(clone.config.vocab_size), "dtype": "float32",
        "source_dtype": str(next(iter(model.parameters()), torch.empty(0)).dtype).replace("torch.", ""),
        "inputs": inputs, "outputs": outputs, "optional_inputs": {onnx_graph.LOGITS_TO_KEEP: 0},
        "opset": opset, "quantization": _quantization(clone, proto),
        "accelerated": getattr(model, "hetero_plan", None) is not None,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
    }


def _save_program(program, clone: nn.Module, directory: Path):
    """The exporter writes the file (weights beside it in model.onnx.data when protobuf's 2 GB
    cap is near); the graph is then read back without its weights, to be edited."""
    import onnx

    from ..evaluate.timing import weight_bytes

    path = directory / MODEL_FILE
    program.save(str(path), external_data=weight_bytes(clone) > EXTERNAL_DATA_BYTES)
    return onnx.load(str(path), load_external_data=False)


def _write(proto, directory: Path) -> list[str]:
    """The edited graph over the first file; external weights, if any, are left as written."""
    import onnx

    onnx.save_model(proto, str(directory / MODEL_FILE))
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(MODEL_FILE))


def _write_configs(model: nn.Module, clone: nn.Module, directory: Path, tokenizer: Any) -> None:
    config = clone.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    if getattr(model, "generation_config", None) is not None:
        (directory / "generation_config.json").write_text(model.generation_config.to_json_string())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _build(model: nn.Module, tmp: Path, opset: int, tokenizer: Any, check: bool) -> None:
    clone = export_copy(model)
    shapes = kv_shapes(clone)
    program, inputs, outputs = _trace(clone, shapes, opset)
    proto = _save_program(program, clone, tmp)
    del program
    onnx_graph.strip_prefix(proto, _PREFIX)
    onnx_graph.add_logits_to_keep(proto)
    onnx_graph.set_dim_names(proto, _dim_names(inputs, outputs))
    sidecar = _sidecar(model, clone, proto, shapes, inputs, outputs, opset)
    files = _write(proto, tmp)
    del proto
    _write_configs(model, clone, tmp, tokenizer)
    sidecar["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    if check:
        from .onnx_check import check_export
        check_export(clone, tmp)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int | None = None, tokenizer: Any = None,
                overwrite: bool = False, check: bool = True) -> Path:
    """Write `model` (accelerated by hetero_llm or a plain transformers causal LM, on the CPU) to
    directory `path` as an ONNX decoder with a KV cache; returns the path.

    INT8 weights (`quantize='int8'`/`'int8-asym'`, per channel or per group, INT8 embeddings)
    stay INT8 in the file as DequantizeLinear -> MatMul; floating-point weights are written
    in fp32 (a bf16/fp16 model is exported in fp32). `opset` defaults to and must be at least
    21. `check=True` runs the file once with onnxruntime (when installed) against the model on a
    prompt and one cached step, and raises ExportError if the logits differ beyond float
    rounding. Refuses (typed errors, nothing written) W8A8 models, sharded or split models,
    families without a role table, and a non-empty `path` unless `overwrite=True`.
    Run the result with `hetero_llm.export.OnnxCausalLM(path)`.
    """
    opset = MIN_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise InvalidOptionError(f"opset={opset}: the export needs opset {MIN_OPSET} or newer (DequantizeLinear "
                                 f"with per-group block_size); pass opset={MIN_OPSET} or leave it out.")
    check_exportable(model)
    _require_packages()
    target = Path(path)
    with written_atomically(target, overwrite, ExportError, "export") as tmp:
        _build(model, tmp, opset, tokenizer, check)
    return target
