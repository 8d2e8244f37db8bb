"""W8A8: per-token INT8 activations times per-channel INT8 weights on the int8 tensor cores.

    xq, x_scale = quantize_per_token(x, smooth)        x * smooth ~= xq * x_scale, per row
    y = (xq @ qweightᵀ, exact in int32) * x_scale * w_scale + bias

`smooth` is SmoothQuant's per-input-channel 1/s, folded into the activation before it is
quantized (the weight was multiplied by s when it was quantized).

Rounding: torch.round rounds half to even, and so must the kernel. libdevice's rint does (one
`cvt.rni` instruction) but the Triton interpreter cannot run libdevice calls, so the kernel adds
and subtracts 1.5 * 2**23 instead: for |v| < 2**22 the sum lands where the fp32 spacing is 1, so
the add itself rounds v to the nearest integer, ties to even, under the default rounding mode,
and the subtract is exact. One code path, the same on the GPU and in the interpreter, at the
cost of one extra add in a memory-bound kernel. The division uses div_rn (IEEE), as torch does;
Triton's plain `/` on fp32 is an approximate division and could flip a rounding.
"""
from __future__ import annotations

import torch

from .triton_utils import (GROUP_M, TRITON_AVAILABLE, grouped_tile, jit, m_bucket, on_device, pick_config,
                           require_triton, tl, triton)
QMAX = 127  # symmetric: -128 is never produced
QUANT_MAX_K = 65536  # a whole row stays in registers (one pass); longer rows: use the reference

# Keyed by the largest M each list serves (None: any larger M); the first of each list is the
# one used where nothing is timed. BLOCK_K = 128 bytes of K per row (four k32 int8 MMA steps);
# 3-4 pipeline stages of 16-48 KiB, at most 144 KiB of Hopper's 227 KiB per block (AOT-tested).
W8A8_CONFIGS = {
    16: (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),),
    64: (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    None: (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
           dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)),
}


# -- kernels -----------------------------------------------------------------------------------

@jit
def _quantize_per_token_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, M, K,
                               stride_xm, stride_xk, stride_qm, stride_qk,
                               HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    # BLOCK_K covers the whole row: read once, absmax, scale, round, store.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x *= tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    scale = tl.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero (or underflowing) row: never 0/0
    v = tl.div_rn(x, scale[:, None])
    v = (v + 12582912.0) - 12582912.0  # round half to even: see the module docstring
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, v.to(tl.int8),
             mask=mask)
    tl.store(s_ptr + offs_m, scale, mask=offs_m < M)


@jit
def _int8_gemm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m, rows_n = offs_m % M, offs_n % N  # wrapped; only the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    # The (K, N) view of the (N, K) weight: K stays contiguous, which int8 wgmma requires.
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rows_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    # Same order of fp32 operations as the reference: int32 -> fp32, * x_scale, * w_scale.
    c = acc.to(tl.float32) * tl.load(as_ptr + rows_m)[:, None]
    c = c * tl.load(bs_ptr + rows_n)[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             c.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- references --------------------------------------------------------------------------------

def quantize_per_token_ref(x: torch.Tensor, smooth: torch.Tensor | None = None):
    """Symmetric per-row INT8: (xq int8 (..., K), x_scale fp32 (..., 1)), scale = absmax / 127.

    An all-zero row gets scale 1. `smooth` (K,) multiplies x (in fp32) before quantizing.
    """
    xf = x.to(torch.float32)
    if smooth is not None:
        xf = xf * smooth.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.round(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return xq, scale


def int_matmul_ref(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """xq (M, K) @ qweight (N, K)ᵀ exactly, as int32.

    float64 holds every partial sum exactly (|sum| <= K * 128 * 128 < 2**53) and has a matmul
    on every device, which int32 does not (CUDA).
    """
    return (xq.to(torch.float64) @ qweight.to(torch.float64).T).to(torch.int32)


def int8_gemm_ref(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                  w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reference: (xq @ qweightᵀ as int32) * x_scale[:, None] * w_scale[None, :] + bias."""
    y = int_matmul_ref(xq, qweight).to(torch.float32)
    y = y * x_scale.reshape(-1, 1).to(torch.float32) * w_scale.reshape(1, -1).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w8a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None):
    """Reference W8A8 linear on x (..., K): quantize per token, integer GEMM, x.dtype out."""
    xq, xs = quantize_per_token_ref(x.reshape(-1, x.shape[-1]), smooth)
    y = int8_gemm_ref(xq, xs, qweight, w_scale, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


# -- launchers ---------------------------------------------------------------------------------

def _quantize_call(x2, smooth, xq, scale):
    """(kernel, grid, args, kwargs) of the quantize launch on 2-D x: data, for the AOT tests."""
    m, k = x2.shape
    block_k = triton.next_power_of_2(k)
    tile = max(block_k, 4096)  # rows per program: about 4096 elements, 32 per thread
    block_m = min(tile // block_k, triton.next_power_of_2(m))
    args = (x2, smooth if smooth is not None else scale, xq, scale, m, k,
            x2.stride(0), x2.stride(1), xq.stride(0), xq.stride(1))
    kwargs = dict(HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                  num_warps=max(1, min(32, tile // 1024)))
    return _quantize_per_token_kernel, (triton.cdiv(m, block_m),), args, kwargs


def quantize_per_token_triton(x: torch.Tensor, smooth: torch.Tensor | None = None):
    """`quantize_per_token_ref` in one Triton kernel; rows of up to QUANT_MAX_K elements."""
    require_triton("quantize_per_token_triton", TRITON_AVAILABLE)
    k = x.shape[-1]
    if k > QUANT_MAX_K:
        raise ValueError(f"rows of {k} > {QUANT_MAX_K} elements do not fit one pass; "
                         "use quantize_per_token_ref")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.ones((m, 1), dtype=torch.float32, device=x.device)  # K == 0: scale 1
    if m and k:
        smooth = smooth.to(torch.float32).contiguous() if smooth is not None else None
        kernel, grid, args, kwargs = _quantize_call(x2, smooth, xq, scale)
        with on_device(x, kernel):
            kernel[grid](*args, **kwargs)
    return xq.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def _gemm_call(xq, x_scale, qweight, w_scale, bias, out, cfg):
    """(kernel, grid, args, kwargs) of the W8A8 GEMM launch: data, for the AOT tests."""
    (m, k), n = xq.shape, qweight.shape[0]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    args = (xq, qweight, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, k,
            xq.stride(0), xq.stride(1), qweight.stride(0), qweight.stride(1),
            out.stride(0), out.stride(1))
    kwargs = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    return _int8_gemm_kernel, grid, args, kwargs


def _launch_gemm(*call_args):
    kernel, grid, args, kwargs = _gemm_call(*call_args)
    kernel[grid](*args, **kwargs)


def int8_gemm_triton(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float16, *,
                     config: dict | None = None) -> torch.Tensor:
    """`int8_gemm_ref` on the int8 tensor cores: int32 accumulation, fp32 epilogue.

    The configuration comes from W8A8_CONFIGS for M's bucket (timed once per shape on the GPU);
    `config` forces one.
    """
    require_triton("int8_gemm_triton", TRITON_AVAILABLE)
    m, k = xq.shape
    n = qweight.shape[0]
    if xq.dtype != torch.int8 or qweight.dtype != torch.int8 or qweight.shape[1] != k:
        raise ValueError(f"expected int8 xq (M, K) and qweight (N, K); got {xq.dtype} "
                         f"{tuple(xq.shape)} and {qweight.dtype} {tuple(qweight.shape)}")
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError("x_scale must have M elements and w_scale N (per token, per channel)")
    x_scale = x_scale.to(torch.float32).reshape(m).contiguous()
    w_scale = w_scale.to(torch.float32).reshape(n).contiguous()
    bias = bias.to(torch.float32).contiguous() if bias is not None else None
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    bucket = m_bucket(m, W8A8_CONFIGS)
    key = ("w8a8", bucket, n, k, out_dtype, bias is not None)
    run = lambda cfg: _launch_gemm(xq, x_scale, qweight, w_scale, bias, out, cfg)  # noqa: E731
    with on_device(xq, _int8_gemm_kernel):
        run(config or pick_config(key, W8A8_CONFIGS[bucket], run, xq.device))
    return out


def w8a8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None):
    """W8A8 linear on x (..., K): quantize per token, then the int8 GEMM; returns x.dtype."""
    xq, xs = quantize_per_token_triton(x.reshape(-1, x.shape[-1]), smooth)
    y = int8_gemm_triton(xq, xs, qweight, w_scale, bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
