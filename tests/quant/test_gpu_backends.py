"""The CUDA backends of the quantized modules against their torch references (GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetero_llm.quant import Int8Linear
from hetero_llm.quant.backends import BACKENDS
from hetero_llm.quant.w8a8 import BACKENDS as W8A8_BACKENDS
from hetero_llm.quant.w8a8 import W8A8Linear

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Relative max error of the Triton path vs the torch reference, per activation dtype.
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@needs_cuda
@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int8:g128", "int8-asym:g64"])
@pytest.mark.parametrize("rows", [1, 3, 64, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_int8_linear_matches_reference(scheme, rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(1024, 768, bias=True, device="cuda")
    fast = Int8Linear.from_linear(linear, scheme, backend="triton-int8")
    assert fast.backend == "triton-int8" and BACKENDS["triton-int8"].supports(1024, torch.device("cuda"),
                                                                              fast.group_size)
    ref = Int8Linear.from_linear(linear, scheme, backend="torch-dequant")
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    assert _rel(fast(x), ref(x.float())) < MAX_REL_ERR[dtype]


@needs_cuda
@pytest.mark.parametrize("rows", [1, 17, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_w8a8_linear_matches_reference(rows, dtype):
    torch.manual_seed(0)
    w = torch.randn(768, 1024, device="cuda")
    smooth = torch.rand(1024, device="cuda") + 0.5
    fast = W8A8Linear.from_weight(w, None, smooth=smooth, outliers=torch.tensor([3, 70]), backend="triton-w8a8")
    assert fast.backend == "triton-w8a8" and W8A8_BACKENDS["triton-w8a8"].supports(1024, torch.device("cuda"))
    ref = W8A8Linear.from_weight(w, None, smooth=smooth, outliers=torch.tensor([3, 70]), backend="torch-w8a8")
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    got = fast(x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert _rel(got, ref(x.float())) < MAX_REL_ERR[dtype]
    assert _rel(got, F.linear(x.float(), w)) < 5e-2  # W8A8 against the float layer
