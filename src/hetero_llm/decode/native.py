"""decode="native": the CPU decode step with every decoder layer in one compiled call.

`DecodeStep` (step.py) walks the layers in Python: on a CPU that is ~1,000 small eager ops per
token, which for a small model cost more than its INT8 matmuls. `NativeStep` computes the same
step, against the same transformers StaticCache, with the layer loop in C++
(kernels/cpu_decode.cpp): the embedding, rotary tables, final norm and lm_head stay the model's
own modules (one call each). It takes Llama-style layers whose linears are all symmetric
per-channel INT8 (the CPU plan's default) in an fp32 model; `native_problem` says why a model
does not qualify, and the planner then keeps transformers' loop.
"""
from __future__ import annotations

import torch
from torch import nn

from ..integrations import hf_adapter as hf
from ..integrations.transformers import ArchitectureSpec
from ..kernels import cpu_decode
from ..kernels.cpu_decode import activation_code
from ..fused.decoder_layer import layout_fits
from ..fused.modules import GatedMLP, RMSNorm, RotaryAttention
from .._modules import model_dtype
from ..quant.modules import Int8Linear
from .step import DecodeStep

def _linear_problem(name: str, module: nn.Module, multiple: int) -> str | None:
    if not isinstance(module, Int8Linear):
        return f"{name} is not INT8 ({type(module).__name__})"
    if module.zero_point is not None or module.group_size is not None:
        return f"{name} is {module.scheme} with {'groups' if module.group_size else 'zero points'} (symmetric per-channel only)"
    if module.in_features % multiple:
        return f"{name} has {module.in_features} inputs, not a multiple of {multiple}"
    if module.qweight.device.type != "cpu":
        return f"{name} is not on the CPU"
    return None


def native_problem(model: nn.Module, spec: ArchitectureSpec | None) -> str | None:
    """Why `NativeStep` cannot run `model` (after the quantize and kernels passes), or None."""
    from .step import step_problem

    problem = step_problem(model, spec)
    if problem is not None:
        return problem
    dtype = model_dtype(model)
    if dtype != torch.float32:
        return f"the model computes in {dtype} (the native step is fp32)"
    module = cpu_decode.native_module()
    if module is None:
        return "no native CPU decode step on this machine (no AVX2/AVX-512 build, compiler or ninja)"
    multiple = int(module.K_MULTIPLE)
    for index, layer in enumerate(model.get_submodule(spec.layers)):
        where = f"layer {index}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (not layout_fits(layer, spec) or not isinstance(attn, RotaryAttention)
                or not isinstance(mlp, GatedMLP)):
            return f"{where} is not a Llama-style block with hetero_llm's attention and MLP"
        if attn.q_norm is not None:
            return f"{where}'s attention normalizes q and k per head (the native step does not)"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(isinstance(n, RMSNorm) for n in norms) or len({n.eps for n in norms}) != 1:
            return f"{where}'s norms are not hetero_llm RMSNorms with one epsilon"
        if activation_code(mlp.act_fn) is None:
            return f"{where}'s activation {type(mlp.act_fn).__name__} is not SiLU or tanh-GELU"
        for name, lin in (("qkv", attn.qkv), ("o_proj", attn.o_proj), ("gate_up", mlp.gate_up),
                          ("down_proj", mlp.down_proj)):
            problem = _linear_problem(f"{where}'s {name}", lin, multiple)
            if problem is not None:
                return problem
    return None


def _linear_tensors(lin: Int8Linear) -> list[torch.Tensor]:
    bias = lin.bias if lin.bias is not None else torch.empty(0)
    return [lin.qweight, lin.scale, lin.rowsum, bias]


class NativeStep(DecodeStep):
    """DecodeStep with the decoder layers in one native call (see module docstring)."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, cache, batch: int) -> None:
        super().__init__(model, spec, cache, batch)
        self.module = cpu_decode.native_module()
        if self.module is None:
            raise RuntimeError("the native CPU decode step is not available on this machine")
        self._layers_for = None  # the cache tensors the native object was built against

    def _native(self):
        keys = [layer.keys for layer in self.cache.layers]
        if self._layers_for is not None and all(a is b for a, b in zip(keys, self._layers_for[0])):
            return self._layers_for[1]
        first = self.layers[0]
        attn, mlp = first.self_attn, first.mlp
        native = self.module.DecodeLayers(attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.intermediate,
                                          first.input_layernorm.eps, float(attn.scaling),
                                          activation_code(mlp.act_fn))
        for layer, cached in zip(self.layers, self.cache.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = [t for lin in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj) for t in _linear_tensors(lin)]
            native.add_layer(layer.input_layernorm._effective.float(), layer.post_attention_layernorm._effective.float(),
                             linears, cached.keys, cached.values, hf.static_layer_length(cached))
        self._layers_for = (keys, native)
        return native

    def __call__(self) -> torch.Tensor:
        length = hf.static_layer_length(self.first_layer)
        batch = self.ids.shape[0]
        positions = length.reshape(1, 1).repeat(batch, 1)
        hidden = self.embed(self.ids)  # (batch, 1, hidden)
        cos, sin = hf.rotary_tables(self.rotary, hidden, positions)
        out = self._native().forward(hidden.reshape(batch, -1), cos.reshape(batch, -1), sin.reshape(batch, -1))
        return self.lm_head(self.norm(out.reshape(batch, 1, -1)))
