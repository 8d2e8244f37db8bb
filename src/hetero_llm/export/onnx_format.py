"""The exported directory's format: its name, version and sidecar file, shared by the writer
(onnx.py) and the reader (onnx_runtime.py), which import this and not each other."""
from __future__ import annotations

FORMAT = "hetero_llm_onnx"
FORMAT_VERSION = 1
SIDECAR = "hetero_llm_onnx.json"
