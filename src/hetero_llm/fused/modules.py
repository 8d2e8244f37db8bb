"""Modules swapped into a model by the kernels pass.

`FusedProjection` computes several linears that read the same input (q/k/v,
gate/up) as one matmul; each original module is replaced by a
`ProjectionSlice` that returns its columns. The model's own forward code is
unchanged: it still calls q_proj(x), k_proj(x), v_proj(x), and the first call
computes all three.
"""
from __future__ import annotations

import torch
from torch import nn

from ..integrations.hf_adapter import take_cache
from ..kernels.dispatch import attend, project_add, use_triton
from ..kernels.rms_norm import rms_norm


def _version(x: torch.Tensor) -> int:
    """In-place writes bump a tensor's version; inference tensors have none (and
    cannot be written in place outside inference mode)."""
    try:
        return x._version
    except RuntimeError:
        return -1


class FusedProjection(nn.Module):
    """One linear whose output is the concatenation of several projections."""

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)
        # slot[0] = (input tensor, outputs, [calls left]) of the last input. The
        # input is matched by identity, so a different tensor always recomputes:
        # results are right whatever order or thread the slices are called in.
        # (A list slot, because nn.Module.__setattr__ is slow on this hot path.)
        self._slot: list = [None]

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        slot = self._slot
        last = slot[0]  # one read: another thread may replace it meanwhile
        version = _version(x)
        if last is None or last[0] is not x or last[3] != version:
            last = (x, self.linear(x).split(self.sizes, dim=-1), [len(self.sizes)], version)
            slot[0] = last
        last[2][0] -= 1
        if last[2][0] <= 0 and slot[0] is last:
            slot[0] = None  # every slice has been served: free the activations
        return last[1][index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class ProjectionSlice(nn.Module):
    """Stands where q_proj (or k_proj, ...) was; returns its part of the fused output."""

    def __init__(self, fused: FusedProjection, index: int, in_features: int) -> None:
        super().__init__()
        # Held in a list so it is not registered as a child: the fused module
        # is registered once on the block (e.g. self_attn.hetero_qkv), so
        # state_dict and .to() see its weights once.
        self._fused = [fused]
        self.index = index
        self.in_features = in_features
        self.out_features = fused.sizes[index]

    @property
    def fused(self) -> FusedProjection:
        return self._fused[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of fused, out_features={self.out_features}"


def apply_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk * cos + rotate_half(qk) * sin, bit for bit, for qk (b, heads, s, d), cos/sin (b, s, d).

    Written into one output with half-width products instead of transformers' five full-size
    temporaries: on a 512-token SmolLM2 prompt that formula took ~2 ms per layer here (each fresh
    1.5 MB temporary page-faulted: glibc returned it to the kernel) against ~0.13 ms. The same
    roundings: (-x2) * s == -(x2 * s), so a + (-x2) * s == a - x2 * s."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    half = qk.shape[-1] // 2
    out = qk * c
    out[..., :half] -= qk[..., half:] * s[..., :half]
    out[..., half:] += qk[..., :half] * s[..., half:]
    return out


class RotaryAttention(nn.Module):
    """Llama-style self-attention with q/k/v as one matmul and one rotary pass.

    Same math as transformers' Llama/Mistral/Qwen2/Qwen3/Gemma attention forward, in fewer ops: the
    fused projection is viewed as heads once, q and k are rotated together, and the attention
    itself is `dispatch.attend` (SDPA or grouped matmuls on the torch backend; the flash and
    split-KV Triton kernels on the triton backend). The KV cache is the model's own Cache
    object, so generate(), static caches and padding masks work as before.

    `residual`, when given, is added to the output projection (inside its matmul on the Triton
    path): the decoder layer's forward bound by `bind_fused_decoder_layer` passes it.
    `cache_lens` (from `hetero_llm.decode`'s step): how many static-cache keys each sequence
    attends, in place of a mask.
    """

    def __init__(self, attn: nn.Module, qkv: nn.Module, num_heads: int, num_kv_heads: int,
                 backend: str = "torch", q_norm: nn.Module | None = None, k_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.qkv, self.o_proj = qkv, attn.o_proj
        # Qwen3 / OLMo 2 / Gemma 3: an RMSNorm over each head's q and k, before rotary.
        self.q_norm, self.k_norm = q_norm, k_norm
        self.layer_idx = attn.layer_idx
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.config = attn.config  # read by transformers' mask and cache helpers
        self.is_causal = True
        self.backend = backend

    _rotary = staticmethod(apply_rotary)

    def rotated_qkv(self, hidden_states: torch.Tensor, position_embeddings, cache):
        """q (b, h, s, d) and the cache's k, v (b, hk, S, d), the new k and v appended."""
        b, s, _ = hidden_states.shape
        h, hk = self.num_heads, self.num_kv_heads
        heads = self.qkv(hidden_states).view(b, s, h + 2 * hk, self.head_dim)
        qkv = heads.transpose(1, 2)
        cos, sin = position_embeddings
        qk = qkv[:, : h + hk]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(heads[:, :, :h]), self.k_norm(heads[:, :, h: h + hk])), dim=2).transpose(1, 2)
        q, k = self._rotary(qk, cos, sin).split([h, hk], dim=1)
        v = qkv[:, h + hk:]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, residual: torch.Tensor | None = None, cache_lens=None, **kwargs):
        # The decoder layer passes the KV cache as `cache=` (transformers >= 5.25) or
        # `past_key_values=` (before): take it under either name.
        cache = take_cache(kwargs, past_key_values)
        b, s, _ = hidden_states.shape
        q, k, v = self.rotated_qkv(hidden_states, position_embeddings, cache)
        out = attend(self.backend, q, k, v, attention_mask, self.scaling, cache_lens=cache_lens)
        return project_add(self.backend, self.o_proj, out.transpose(1, 2).reshape(b, s, -1), residual), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, backend={self.backend}"


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up computed as one matmul.

    Replaces a whole Llama-style MLP module: one module call instead of five.
    `act` is the model's own activation module, so GELU-tanh (Gemma) and SiLU
    (Llama, Mistral, Qwen2) are both exact. `residual`, when given, is added to the down
    projection (inside its matmul on the Triton path).
    """

    def __init__(self, gate_up: nn.Module, down: nn.Module, act: nn.Module, intermediate: int,
                 backend: str = "torch") -> None:
        super().__init__()
        self.gate_up, self.down_proj, self.act_fn = gate_up, down, act
        self.intermediate = intermediate
        self.backend = backend
        from ..kernels.cpu_decode import activation_code
        self._silu = activation_code(act) == 0  # the fused prompt epilogue computes SiLU only

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        hidden = None
        if self._silu and hasattr(self.gate_up, "forward_fused"):  # an INT8 prompt GEMM on the CPU
            hidden = self.gate_up.forward_fused(x, "silu_glu")
        if hidden is None:
            gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
            hidden = self.act_fn(gate) * up
        return project_add(self.backend, self.down_proj, hidden, residual)

    def extra_repr(self) -> str:
        return f"intermediate={self.intermediate}, backend={self.backend}"


class RMSNorm(nn.Module):
    """RMSNorm in one kernel (torch's rms_norm, or Triton's). `offset=1` gives Gemma's (1 + w).

    Called with a `residual`, it adds it first and returns (normalized, sum): the sum is the
    next residual stream, and on the Triton path add and norm are one pass over the row.
    """

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0, backend: str = "torch") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = float(eps)
        self.offset = float(offset)
        self.backend = backend
        self._refresh()

    def _refresh(self) -> None:
        w = self.weight.detach()
        # Gemma multiplies in fp32 by (1 + w): fold the offset in once, here.
        self._effective = (w.float() + self.offset) if self.offset else w

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._refresh()
        return result

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_triton(self.backend, x):
            from ..kernels.rms_norm import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps, residual=residual, offset=self.offset)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return rms_norm(x.float(), self._effective, self.eps).to(x.dtype)
        return rms_norm(x, self._effective, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, backend={self.backend}"
