"""Placement (and, later, tensor/pipeline sharding) of a planned model."""
