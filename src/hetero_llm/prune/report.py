"""What pruning achieved, per layer: the share of zero weights and the sizes left."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..quant.modules import is_linear, linear_weight
from ..quant.primitives import dequantize


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, int]  # (out, in) after pruning
    zeros: float  # share of the weights that are exactly zero (INT8: equal to the zero point)


@dataclass(frozen=True)
class PruneReport:
    """Per-linear sparsity of a model, and the totals. `str(report)` is a table."""

    method: str
    layers: tuple[LayerSparsity, ...]
    params_before: int
    params_after: int

    @property
    def sparsity(self) -> float:
        """Share of zero weights over the reported linears."""
        total = sum(a * b for a, b in (r.shape for r in self.layers))
        return sum(r.zeros * a * b for r, (a, b) in ((r, r.shape) for r in self.layers)) / max(total, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"pruning: {self.method} · linear weights {self.params_before:,} → {self.params_after:,} "
                 f"· zeros {100 * self.sparsity:.1f}%", f"{'module':<44} {'shape':>13} {'zeros':>7}"]
        lines += [f"{r.name:<44} {f'{r.shape[0]}x{r.shape[1]}':>13} {100 * r.zeros:6.1f}%" for r in self.layers]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _zero_share(module: nn.Module) -> tuple[tuple[int, int], float]:
    if hasattr(module, "quantized_weight"):  # INT8: a weight is zero where it equals its zero point
        w = dequantize(module.quantized_weight())
    else:
        from .semi_sparse import dense_weight  # a 2:4 sparse-tensor-core weight (GPU) is read back dense
        w = dense_weight(linear_weight(module))
    return tuple(w.shape), float((w == 0).float().mean())


def sparsity_report(model: nn.Module, names: list[str] | None = None, *, method: str = "",
                    params_before: int | None = None) -> PruneReport:
    """Zeros per linear layer of `model` (float or INT8), for `names` or every linear."""
    if names is None:
        names = [n for n, m in model.named_modules() if is_linear(m) or hasattr(m, "qweight")]
    rows = []
    for name in names:
        m = model.get_submodule(name)
        if not (is_linear(m) or isinstance(getattr(m, "qweight", None), torch.Tensor)):
            continue
        shape, zeros = _zero_share(m)
        rows.append(LayerSparsity(name, shape, zeros))
    after = sum(a * b for a, b in (r.shape for r in rows))
    return PruneReport(method, tuple(rows), params_before if params_before is not None else after, after)
