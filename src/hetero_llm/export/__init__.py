"""Export to other runtimes: ONNX (export_onnx) and its ONNX Runtime runner (OnnxCausalLM).

Nothing here imports onnx, onnxscript or onnxruntime until it is used.
"""
from .onnx import export_onnx
from .onnx_runtime import OnnxCausalLM

__all__ = ["export_onnx", "OnnxCausalLM"]
