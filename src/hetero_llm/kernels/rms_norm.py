"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, in one torch op or one Triton kernel.

`rms_norm_ref` is the reference (the formula transformers' Llama uses); `rms_norm` runs
torch's fused `F.rms_norm` for fp32 inputs on the CPU and falls back to the reference for lower
precisions, whose rounding order transformers defines. On CUDA tensors it runs the Triton
kernel below.

With a residual (the pre-norm block's `s = residual + branch; y = norm(s)`), `rms_norm(x, w,
eps, residual)` returns (y, s): s rounded to x's dtype is the next residual stream, and y is
the norm of that stored s. The Triton kernel reads x and the residual once, writes s and y
once: four row-sized transfers instead of the six of an add kernel followed by a norm kernel.

The kernel holds whole rows in registers (BLOCK_N = next power of two of the hidden size, up to
RMS_MAX_HIDDEN), computes the statistics in fp32 and rounds once, at the end, where
transformers' Llama rounds twice (the normalized row, then the product with w). `offset=1.0`
scales by (1 + w), Gemma's form.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from .triton_utils import TRITON_AVAILABLE, jit, on_device, require_triton, tl, triton

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
RMS_MAX_HIDDEN = 16384  # whole rows in registers: 32 fp32 values per thread at 16 warps
_ROW_ELEMENTS = 2048  # short rows: several per program, about this many elements in all


# -- kernel ------------------------------------------------------------------------------------

@jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, M, N,
                     stride_xm, stride_rm, stride_ym, stride_sm,
                     EPS: tl.constexpr, OFFSET: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # eps and the offset are constexprs: a model has one of each, so one compile per model,
    # and the AOT tests can compile exactly this call (their signature types ints and pointers).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    r64 = rows.to(tl.int64)[:, None]  # M * stride can pass 2**31 elements
    # Unit stride along the row (the launcher guarantees it): 16-byte vector loads and stores.
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(r_ptr + r64 * stride_rm + cols[None, :], mask=mask, other=0.0)
        # One rounding, as torch's x + residual: this is the stream the next layer adds to.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + r64 * stride_sm + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + EPS)  # masked columns are 0: they add nothing
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if OFFSET != 0.0:
        w += OFFSET
    y = xf * inv[:, None] * w[None, :]
    tl.store(y_ptr + r64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# -- references and the torch path -------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: normalize in fp32, cast back, then scale (Llama's order)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm_residual_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, offset: float = 0.0):
    """Reference of the residual form, transformers' ops: s = x + residual in x's dtype, then
    RMSNorm of s in Llama's order (offset 0) or Gemma's (fp32 times offset + w, one cast).
    Returns (y, s)."""
    s = x + residual
    if not offset:
        return rms_norm_ref(s, weight, eps), s
    h = s.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (offset + weight.to(torch.float32))).to(s.dtype), s


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


def _check(x, weight, residual) -> None:
    """Shapes and dtypes the norm needs; InvalidOptionError saying the fix."""
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise InvalidOptionError(f"rms_norm: weight must be (hidden,) for x (..., hidden); got "
                                 f"weight {tuple(weight.shape)} and x {tuple(x.shape)}")
    if residual is None:
        return
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise InvalidOptionError(f"rms_norm: residual must match x's shape and dtype "
                                 f"({tuple(x.shape)}, {x.dtype}); got {tuple(residual.shape)}, "
                                 f"{residual.dtype}. Cast or reshape it first.")
    if residual.device != x.device:
        raise InvalidOptionError(f"rms_norm: residual is on {residual.device} but x is on "
                                 f"{x.device}; move them to one device")


def _triton_runs(x, weight, residual) -> bool:
    """Whether the dispatcher takes the Triton kernel: CUDA, a kernel dtype, a row that fits,
    and no autograd to feed (the kernel has no backward)."""
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, residual))
    return (TRITON_AVAILABLE and x.is_cuda and weight.is_cuda and not grads
            and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES
            and 0 < x.shape[-1] <= RMS_MAX_HIDDEN)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """Fused RMSNorm; with `residual`, (norm(x + residual), x + residual).

    Without a residual: one tensor, the dtype torch's promotion of x and weight gives. CUDA
    tensors run the Triton kernel (one rounding); elsewhere the torch ops, unchanged.
    """
    if _triton_runs(x, weight, residual):
        return rms_norm_triton(x, weight, eps, residual)  # validates its inputs
    if residual is None:
        return _rms_norm_torch(x, weight, eps)  # the code path of before the residual form
    _check(x, weight, residual)
    s = x + residual
    return _rms_norm_torch(s, weight, eps), s


# -- Triton launcher ---------------------------------------------------------------------------

def _rms_norm_call(x2, weight, r2, y, s, eps, offset):
    """(kernel, grid, args, kwargs) of the launch for 2-D, row-contiguous tensors: data, so the
    AOT tests compile exactly the launcher's call."""
    m, n = x2.shape
    block_n = triton.next_power_of_2(n)
    block_m = min(max(1, _ROW_ELEMENTS // block_n), triton.next_power_of_2(m))
    # About 16 elements per thread (two 16-byte vectors of a 16-bit row): 8 warps for 4096,
    # 16 for 8192 and up (32 per thread at 16384).
    num_warps = min(16, max(1, block_m * block_n // 512))
    args = (x2, r2 if r2 is not None else x2, weight, y, s if s is not None else y, m, n,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            s.stride(0) if s is not None else 0)
    kwargs = dict(EPS=float(eps), OFFSET=float(offset), HAS_RESIDUAL=r2 is not None,
                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return _rms_norm_kernel, (triton.cdiv(m, block_m),), args, kwargs


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2-D (rows, hidden) with unit stride along the row, a view where possible."""
    t = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, offset: float = 0.0):
    """RMSNorm of x (..., hidden) in one Triton kernel: x / sqrt(mean(x²) + eps) * (offset + w).

    Without `residual`, returns y; with it, (y, s) where s = x + residual in x's dtype (the
    next residual stream) and y the norm of s. y has torch's promotion of x's and weight's
    dtypes, s has x's. fp16, bf16 or fp32; hidden up to RMS_MAX_HIDDEN.
    """
    require_triton("rms_norm_triton", TRITON_AVAILABLE)
    _check(x, weight, residual)
    n = x.shape[-1]
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        raise InvalidOptionError(f"rms_norm_triton takes fp16, bf16 or fp32 x and weight; got "
                                 f"{x.dtype} and {weight.dtype}. Call rms_norm on the CPU instead.")
    if n > RMS_MAX_HIDDEN:
        raise InvalidOptionError(f"rms_norm_triton keeps a row in registers, at most "
                                 f"{RMS_MAX_HIDDEN} elements; got hidden={n}. Call rms_norm_ref "
                                 "(rms_norm dispatches there itself).")
    if weight.device != x.device:
        raise InvalidOptionError(f"rms_norm_triton: weight is on {weight.device} but x is on "
                                 f"{x.device}; move them to one device")
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x2) if residual is not None else None
    if x2.shape[0] and n:
        kernel, grid, args, kwargs = _rms_norm_call(x2, weight.contiguous(), r2, y, s, eps, offset)
        with on_device(x, kernel):
            kernel[grid](*args, **kwargs)
    y = y.reshape(x.shape)
    return y if residual is None else (y, s.reshape(x.shape))
