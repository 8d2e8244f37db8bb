"""Fused kernels. Each op has a Triton kernel, a torch path and a reference beside it.

The public functions run the Triton kernel on CUDA tensors (when Triton is installed) and the
torch path otherwise, so they work on any device:

- attention(q, k, v, *, causal=True, attn_mask=None, scale=None): flash attention, GQA/MQA.
- decode_attention(q, k_cache, v_cache, cache_lens): one new token per sequence, split-KV.
- linear_add(x, weight, bias=None, residual=None): x·Wᵀ + b + residual, adds in the epilogue.
- rms_norm(x, weight, eps, residual=None): RMSNorm, optionally after adding a residual.

The submodules of the same names hold the launchers (`*_triton`), torch paths (`*_torch`) and
references (`*_ref`); reach them with importlib or `from hetero_llm.kernels.attention import ...`.
"""
from .attention import attention
from .decode_attention import decode_attention
from .linear_add import linear_add
from .rms_norm import rms_norm, rms_norm_ref

__all__ = ["attention", "decode_attention", "linear_add", "rms_norm", "rms_norm_ref"]
