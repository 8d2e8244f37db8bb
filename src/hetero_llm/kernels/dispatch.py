"""Which implementation of each fused op a swapped-in module runs.

Modules keep the plan's `backend` ("triton" or "torch"). The Triton path runs when the plan chose
it and the tensor can take it: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (for
debugging kernels). Otherwise, e.g. for a model planned for a GPU and then moved to the CPU, the
torch path runs: the same math, never an error.

The kernel modules are imported on first use, so a CPU-only model never imports Triton here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .triton_utils import runs_triton


def use_triton(backend: str, x: torch.Tensor) -> bool:
    return backend == "triton" and runs_triton(x)


def _decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token against the whole cache: q (b, h, 1, d), k/v (b, hk, S, d).

    Query heads that share a kv head are one (group, d) matrix, so GQA needs no
    repeated keys. On CPU this is 2-8x faster than SDPA's flash kernel for one
    token (which tiles for long queries), with the same fp32 math.
    """
    b, h, _, d = q.shape
    hk = k.shape[1]
    scores = torch.matmul(q.reshape(b, hk, h // hk, d), k.transpose(-1, -2)).mul_(scale)
    return torch.matmul(scores.softmax(dim=-1), v).reshape(b, h, 1, d)


def attend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, causal: bool = True, cache_lens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Attention of new tokens q (b, h, s, d) against the cache k/v (b, hk, S, d).

    `mask` is transformers' (bool or additive, broadcastable to (b, h, s, S)) and then holds
    the causal pattern itself. None means the model found it could skip it; for a causal
    model a single token then sees the whole cache, and a prompt is causal from the first key
    (as SDPA's is_causal: an empty static cache holds S > s slots, all after the prompt).

    `cache_lens` (one token per sequence, no mask): sequence b attends the first cache_lens[b]
    keys of a static cache, an int or an integer tensor (b,) on the cache's device. The decode
    step of `hetero_llm.decode` passes it: a length held on the GPU needs no host sync, so the
    step can be captured in a CUDA graph.
    """
    if cache_lens is not None and mask is None and q.shape[2] == 1:
        if q.device.type == "cpu" and isinstance(cache_lens, torch.Tensor) \
                and int(cache_lens.min()) == int(cache_lens.max()):  # values on the host: free to read
            n = int(cache_lens.max())
            return _decode_attention_torch(q, k[:, :, :n], v[:, :, :n], scale)
        from .decode_attention import decode_attention, decode_attention_torch
        run = decode_attention if use_triton(backend, q) else decode_attention_torch
        return run(q, k, v, cache_lens, scale=scale)
    s, h, hk = q.shape[2], q.shape[1], k.shape[1]
    causal = causal and mask is None and s > 1
    if causal and k.shape[2] > s:
        k, v = k[:, :, :s], v[:, :, :s]  # the rest of an empty static cache
    if use_triton(backend, q):
        if mask is None and s == 1:
            from .decode_attention import decode_attention_triton
            return decode_attention_triton(q, k, v, k.shape[2], scale=scale)
        from .attention import attention_triton
        return attention_triton(q, k, v, causal=causal, attn_mask=mask, scale=scale)
    if mask is None and s == 1:
        return _decode_attention_torch(q, k, v, scale)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=h != hk)
    # Masked GQA: expand the kv heads, as transformers does; SDPA's enable_gqa does not take a
    # mask on every backend.
    if h != hk:
        k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def fuses_residual(backend: str, linear: nn.Module) -> bool:
    """Whether `project_add` adds the residual inside the matmul (a plain floating-point Linear
    on the Triton path); otherwise the add is a separate op, best fused into the next norm."""
    # A row-parallel linear's output must be all-reduced (a hook) before the residual joins it.
    return backend == "triton" and type(linear) is nn.Linear and not getattr(linear, "hetero_row_parallel", False)


def project_add(backend: str, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """linear(x) + residual, with the add in the matmul's epilogue where the backend can."""
    if residual is None:
        return linear(x)
    fused = getattr(linear, "forward_fused", None)  # an INT8 layer's prompt GEMM on the CPU
    if fused is not None and not use_triton(backend, x):
        y = fused(x, "add", residual)
        if y is not None:
            return y
    if fuses_residual(backend, linear) and use_triton(backend, x):
        from .linear_add import linear_add_triton
        return linear_add_triton(x, linear.weight, linear.bias, residual)
    return linear(x) + residual
