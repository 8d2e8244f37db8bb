"""Whether torch._int_mm (int8 x int8 -> int32, oneDNN) is usable and exact on this CPU.

On AVX-512 VNNI or AMX it is; on AVX2 oneDNN's u8*s8 products saturate in 16-bit pairs, so the
answer is measured, not assumed. The W8A8 linear and the INT8 prompt GEMM ask it before using it.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def int_mm_available() -> bool:
    """torch._int_mm runs on CPU tensors in this build and is exact."""
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (3, 64), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, b.t()), (a.long() @ b.long().t()).int()))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
