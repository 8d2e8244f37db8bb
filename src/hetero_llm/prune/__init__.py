"""Pruning: unstructured and N:M masks (magnitude, Wanda) and structured shrinking.

Runs first in the data flow (prune -> quantize -> shard -> place -> kernels): masks zero
weights in place, structured pruning removes MLP channels and KV-head groups and updates
the model's config, so everything after it sees an ordinary, smaller model.
"""
from .report import PruneReport, sparsity_report

__all__ = ["PruneReport", "sparsity_report"]
