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

from .rms_norm import rms_norm


class FusedProjection(nn.Module):
    """One linear whose output is the concatenation of several projections."""

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)
        # (input tensor, outputs, [calls left]) of the last input. The input is
        # matched by identity, so a different tensor always recomputes: results
        # are right whatever order or thread the slices are called from.
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, ...], list[int]] | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last  # one read: another thread may replace it meanwhile
        if last is None or last[0] is not x:
            outputs = self.linear(x).split(self.sizes, dim=-1)
            last = (x, outputs, [len(self.sizes)])
            self._last = last
        last[2][0] -= 1
        if last[2][0] <= 0 and self._last is last:
            self._last = None  # every slice has been served: free the activations
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


class RMSNorm(nn.Module):
    """RMSNorm on torch's single fused op. `offset=1` gives Gemma's (1 + w) scaling."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = float(eps)
        self.offset = float(offset)
        self._refresh()

    def _refresh(self) -> None:
        w = self.weight.detach()
        # Gemma multiplies in fp32 by (1 + w): fold the offset in once, here.
        self._effective = (w.float() + self.offset) if self.offset else w

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._refresh()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return rms_norm(x.float(), self._effective, self.eps).to(x.dtype)
        return rms_norm(x, self._effective, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"
