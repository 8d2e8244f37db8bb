"""Which weights to zero: scores (magnitude, Wanda) and the masks that keep the best of them.

A mask is a bool tensor shaped like the (out, in) weight, True where the weight stays.
Scores are fp32; ties are broken by position (topk), so a mask is the same on every run.
"""
from __future__ import annotations

import torch

from ..config import PruneConfig
from ..errors import InvalidOptionError


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def sum_of_squares(stat: torch.Tensor) -> torch.Tensor:
    """Per input channel, the sum of x^2 over the calibration tokens: the statistic itself, or the
    diagonal of a Gram matrix X^T X."""
    return torch.diagonal(stat) if stat.dim() == 2 else stat


def wanda_scores(weight: torch.Tensor, input_stat: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j||: a weight matters when it is large or meets large activations (Wanda,
    Sun et al. 2023). The activation norm comes from calibration data (sum of squares or Gram)."""
    norm = sum_of_squares(input_stat).to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().abs().float() * norm.unsqueeze(0)


def _drop_smallest(scores: torch.Tensor, count: int, dim: int | None) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count <= 0:
        return keep
    if dim is None:
        flat = keep.view(-1)
        flat[torch.topk(scores.reshape(-1), count, largest=False, sorted=False).indices] = False
        return keep
    return keep.scatter_(dim, torch.topk(scores, count, dim=dim, largest=False, sorted=False).indices, False)


def layer_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep the largest (1 - sparsity) of the scores, over the whole layer or within each output row."""
    if per_row:
        return _drop_smallest(scores, int(round(sparsity * scores.shape[1])), dim=1)
    return _drop_smallest(scores, int(round(sparsity * scores.numel())), dim=None)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive inputs of each row (N:M semi-structured)."""
    rows, cols = scores.shape
    if cols % m:
        raise InvalidOptionError(f"an {n}:{m} pattern needs the input size to be a multiple of {m}; this layer "
                                 f"has {cols} inputs. Use pattern='unstructured' or exclude the layer.")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2, sorted=False).indices, True)
    return keep.reshape(rows, cols)


def global_threshold(score_fns: list, total: int, sparsity: float, iterations: int = 48) -> float:
    """The score below which `sparsity` of all `total` weights fall, by bisection on counts.

    `score_fns` yields each layer's scores on demand, so no concatenation of every score in the
    model is ever held (that would be 4 bytes per weight).
    """
    target = sparsity * total
    lo, hi = 0.0, max(float(fn().max()) for fn in score_fns)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = sum(int((fn() < mid).sum()) for fn in score_fns)
        lo, hi = (mid, hi) if below < target else (lo, mid)
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
    return hi


@torch.no_grad()
def reconstruct(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, block: int = 128,
                damping: float = 0.01) -> torch.Tensor:
    """The pruned weight (zeros where ~keep) whose output on the calibration inputs stays closest
    to the dense one: SparseGPT's column-by-column optimal-brain-surgeon update with the mask
    given (here chosen by Wanda). `gram` is X^T X of the layer's inputs (in, in).

    Each zeroed weight's error is spread over the not-yet-visited columns through the inverse
    Hessian's Cholesky factor; columns go in blocks so most of the work is one matmul per block.
    """
    w = weight.detach().float().clone()
    h = gram.detach().float().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never seen active: nothing to preserve, prune them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.diag(h).mean() * torch.eye(n, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = keep.to(w.dtype)
    for a in range(0, n, block):
        b = min(a + block, n)
        w1, h1 = w[:, a:b].clone(), hinv[a:b, a:b]
        err = torch.zeros_like(w1)
        for i in range(b - a):
            q = w1[:, i] * keep[:, a + i]
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, a:b] = w1
        w[:, b:] -= err @ hinv[a:b, b:]
    if not torch.isfinite(w).all():  # a degenerate Gram matrix: keep the plain mask instead
        return weight.detach().float() * keep
    return w.to(weight.dtype)


def mask_label(cfg: PruneConfig) -> str:
    """How a plan names an unstructured or N:M pruning ("wanda 50% per row", "magnitude 2:4")."""
    refit = " +refit" if cfg.reconstruct else ""
    if cfg.nm is not None:
        return f"{cfg.method} {cfg.pattern}{refit}"
    where = "global" if cfg.scope == "global" else ("per row" if cfg.method == "wanda" else "per layer")
    return f"{cfg.method} {100 * cfg.sparsity:g}% {where}{refit}"
