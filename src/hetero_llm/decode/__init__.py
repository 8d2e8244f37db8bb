"""Decoding without per-token overhead: a static KV cache and hetero_llm's own decode step,
captured as a CUDA graph on GPUs, behind the model's plain generate()."""
from .apply import decode_pass
from .runner import DecodeRunner, install, uninstall
from .step import DecodeStep

__all__ = ["DecodeRunner", "DecodeStep", "decode_pass", "install", "uninstall"]
