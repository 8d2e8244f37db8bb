"""OnnxCausalLM: an exported directory run by ONNX Runtime on the CPU, shaped like a model.

`forward` and `generate` take and return torch tensors as a transformers causal LM does, so
`hetero_llm.evaluate` (perplexity, measure_decode, measure_prefill, run_bench) measures it like
any other variant. generate() is greedy; the KV cache stays in ONNX Runtime's own buffers
between steps (IOBinding), so a step copies nothing but the new token's ids.

`matmul` chooses how ONNX Runtime executes the INT8 weights (the file is the same):
  "float" (default): each DequantizeLinear is constant-folded when the session loads, and the
          matmuls run in fp32 on the dequantized weights: the same math as hetero_llm's torch
          reference (logits within float rounding); the weights take fp32 memory at run time.
  "int8": ONNX Runtime's own QDQ fusion turns DequantizeLinear -> MatMul into MatMulNBits
          (bits=8, accuracy_level=4): INT8 weights in memory and integer dot products, with the
          activations quantized to int8 in blocks of 32 along K at run time (finer than
          per-tensor dynamic quantization, but not weight-only: a small extra error).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError, ModelLoadError
from ..integrations.hf_adapter import causal_lm_output, take_cache
from .onnx_format import FORMAT, FORMAT_VERSION, SIDECAR
from .onnx_generate import greedy, positions
from .onnx_graph import LOGITS_TO_KEEP

MATMUL_MODES = ("float", "int8")


def read_sidecar(directory: Path) -> dict:
    path = directory / SIDECAR
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no {SIDECAR}: it was not written by hetero_llm.export_onnx(). "
                             "Export the model with export_onnx(model, path) first.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); export the model again.") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path} is format {meta.get('format')!r} v{meta.get('format_version')!r}; this "
                             f"hetero_llm reads {FORMAT!r} v{FORMAT_VERSION}. Export the model again.")
    for name, info in meta.get("files", {}).items():
        f = directory / name
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            raise ModelLoadError(f"{f} is missing or has the wrong size (truncated?); export the model again.")
    return meta


def session_options(threads: int | None, matmul: str):
    import onnxruntime as ort

    if matmul not in MATMUL_MODES:
        raise InvalidOptionError(f"matmul={matmul!r}; choose one of {MATMUL_MODES} (see OnnxCausalLM).")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the CPU EP's notes on unused initializers are not the user's concern
    if matmul == "float":
        # Without QDQ handling, constant folding replaces each DequantizeLinear on a weight by
        # its fp32 result; with it, ORT fuses DequantizeLinear -> MatMul into int8 MatMulNBits.
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _config(directory: Path):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return config, generation


class OnnxCausalLM(nn.Module):
    """An export_onnx() directory run by onnxruntime (CPU); `forward`/`generate` as transformers'.

    `threads`: ONNX Runtime's intra-op threads (default: torch.get_num_threads(), so a
    benchmark gives both the same cores). `matmul`: "float" or "int8" (module docstring).
    It is an nn.Module without parameters only so that code written for models (device
    lookup, `model(...)`) takes it; `weight_bytes()` says what its weights occupy.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, matmul: str = "float",
                 providers: list | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError("OnnxCausalLM needs onnxruntime: pip install onnxruntime") from None
        self.directory = Path(path)
        self.meta = read_sidecar(self.directory)
        self.config, self.generation_config = _config(self.directory)
        self.matmul = matmul
        self.session = ort.InferenceSession(str(self.directory / self.meta["model_file"]),
                                            session_options(threads, matmul),
                                            providers=providers or ["CPUExecutionProvider"])
        self._past = [name for name in self.meta["inputs"] if name.startswith("past_key_values.")]
        self._present = [name for name in self.meta["outputs"] if name.startswith("present.")]
        self.eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    def weight_bytes(self) -> int:
        """Bytes of weights as the session holds them (an estimate): the files, plus, with
        matmul="float", fp32 copies of the INT8 weights in place of their int8 bytes."""
        files = sum(info["bytes"] for info in self.meta.get("files", {}).values())
        int8 = int(self.meta.get("quantization", {}).get("int8_weight_bytes", 0))
        return files + (3 * int8 if self.matmul == "float" else 0)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past keys and values for a first call."""
        return [np.zeros((batch, kv, 0, d), dtype=np.float32)
                for kv, d in zip(self.meta["kv_heads"], self.meta["head_dim"]) for _ in range(2)]

    def _feed(self, input_ids, attention_mask, position_ids, past, logits_to_keep: int) -> dict:
        ids = _numpy(input_ids, np.int64)
        past_len = 0 if past is None else int(past[0].shape[2])
        mask = (np.ones((ids.shape[0], past_len + ids.shape[1]), dtype=np.int64) if attention_mask is None
                else _numpy(attention_mask, np.int64))
        pos = positions(mask)[:, past_len:] if position_ids is None else _numpy(position_ids, np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                LOGITS_TO_KEEP: np.array([int(logits_to_keep)], dtype=np.int64)}
        past = self.empty_past(ids.shape[0]) if past is None else past
        feed.update(zip(self._past, (_numpy(p, np.float32) for p in past)))
        return feed

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = True, logits_to_keep: int = 0, **kwargs):
        """transformers-style forward: returns CausalLMOutputWithPast (logits, past_key_values as a
        tuple of (key, value) tensors per layer when use_cache). `past_key_values` (or `cache`, as
        transformers >= 5.25 names it) may be such a tuple or a transformers Cache."""
        if kwargs.get("inputs_embeds") is not None:
            raise InvalidOptionError("the ONNX graph takes input_ids, not inputs_embeds.")
        past = _flat_past(take_cache(kwargs, past_key_values))
        outs = self.session.run(None, self._feed(input_ids, attention_mask, position_ids, past, logits_to_keep))
        logits = torch.from_numpy(outs[0])
        presents = None
        if use_cache:
            it = iter(torch.from_numpy(o) for o in outs[1:])
            presents = tuple(zip(it, it))
        return causal_lm_output(logits, presents)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 do_sample: bool = False, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns (batch, prompt + new) token ids like
        transformers' generate (finished rows padded with pad_token_id)."""
        return greedy(self, input_ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      do_sample=do_sample, attention_mask=attention_mask, **kwargs)

    def extra_repr(self) -> str:
        q = self.meta.get("quantization", {})
        return (f"{self.directory}, layers={self.num_layers}, matmul={self.matmul}, "
                f"int8_linears={q.get('int8_linears', 0)}")


def _numpy(x: Any, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _flat_past(past: Any) -> list | None:
    """[k0, v0, k1, v1, ...] from a tuple of (key, value) pairs or a transformers Cache."""
    if past is None:
        return None
    layers = getattr(past, "layers", None)
    if layers is not None:
        if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.numel() == 0:
            return None  # an empty cache: the first call
        return [t for layer in layers for t in (layer.keys, layer.values)]
    return [t for pair in past for t in pair[:2]]
