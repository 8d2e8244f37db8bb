"""INT8 quantization: primitives, quantized modules, backends and the quantize pass."""
from .modules import Int8Linear
from .primitives import (QuantizedWeight, dequantize, quantize_asymmetric, quantize_symmetric,
                         sqnr_db)

__all__ = ["Int8Linear", "QuantizedWeight", "dequantize", "quantize_asymmetric", "quantize_symmetric",
           "sqnr_db"]
