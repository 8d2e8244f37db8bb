"""MatMul + Add: y = x · Wᵀ + bias + residual, the additions in the GEMM's epilogue.

A transformer block ends each branch with `residual + o_proj(attn)` and `residual + down(mlp)`:
a GEMM that writes y, then an add that reads y and the residual back and writes the sum. Here
the residual (and the bias) are added to the fp32 accumulator tile while it is still in
registers, and the sum is rounded once to the output dtype: one kernel, no round trip of y
through memory, and one rounding instead of two.

- `linear_add` is the public entry: Triton on CUDA tensors, else `linear_add_torch`
  (torch.addmm with the residual as its `input`, so the add happens inside the GEMM call).
- `linear_add_triton` is the launcher; `linear_add_ref` the fp32 (float64 for float64 inputs)
  torch reference.

The kernel is the tiled tl.dot GEMM of the Triton tutorials: fp32 accumulation, grouped tile
order for L2 reuse, masked edges, explicit strides. The weight is read in nn.Linear's (N, K)
layout through its strides, as a (K, N) view: never transposed or copied. fp32 inputs use
input_precision="ieee": TF32 keeps 10 mantissa bits, which would be ~1000x the error of an
fp32 torch matmul. Launch configurations are data (LINEAR_ADD_CONFIGS), the fastest per shape
timed once on the GPU.
"""
from __future__ import annotations

import math

import torch

from ..errors import InvalidOptionError
from .triton_utils import (GROUP_M, TRITON_AVAILABLE, grouped_tile, jit, m_bucket, on_device, pick_config,
                           require_triton, tl, triton)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Keyed by the largest M each list serves (None: any larger M); the first of each list is the
# one used where nothing is timed (the interpreter). BLOCK_K is given for 16-bit inputs (fp32:
# see `_block_k`). A stage holds (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes; Triton keeps
# num_stages - 1 of them for mma.sync (sm_80, and 16/32-row tiles on sm_90) and num_stages for
# wgmma (sm_90, 64+ row tiles). The comments give the shared memory of the bf16 build with bias
# and residual, sm_80 / sm_90, as the AOT tests measure it: every entry fits A100's 163 KiB and
# H100's 227 KiB.
# - M <= 16 (decode): streaming the weight is the cost. 16-row MMA tiles, narrow in N so that
#   N=4096 makes 64-256 programs for 132 SMs, long in K so each stage moves 16-32 KiB.
# - M <= 64: 32/64-row tiles, still weight-bound; 64-row tiles use Hopper's wgmma.
# - M <= 256 and larger: compute-bound; the tutorial's H100 tiles (128x128 and 128x256 with 8
#   warps = two warpgroups) beside 64x128 ones, which make twice the programs when M * N / tile
#   would leave SMs idle (M=512, N=4096: 128 tiles of 128x128 for 132 SMs).
LINEAR_ADD_CONFIGS = {
    16: (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),    # 72 / 72 KiB
         dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3),    # 80 / 80
         dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=4)),   # 96 / 96
    64: (dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),    # 72 / 72
         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),    # 96 / 128
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),   # 72 / 96
    256: (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),   # 72 / 96
          dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),  # 96 / 128
          dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)),  # 80 / 120
    None: (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),  # 96 / 128
           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),  # 96 / 144
           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),  # 144 / 192
           dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),  # 96 / 128
           dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),  # 72 / 96
}


# -- kernel ------------------------------------------------------------------------------------

@jit
def _linear_add_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K,
                       stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                       stride_ym, stride_yn,
                       HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge tiles wrap onto valid rows and columns, so the operand loads need no M/N mask (and
    # stay vectorized); only the epilogue's loads and store are masked. Row offsets in int64:
    # M * stride can pass 2**31 elements for long prompts times wide rows.
    rows_m, rows_n = (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_n[None, :] * stride_wn  # (K, N) view
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # K a multiple of BLOCK_K (LLM shapes): no mask in the main loop
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # Epilogue, all in fp32 on the accumulator: + bias, + residual, then one rounding.
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    out_m, out_n = offs_m.to(tl.int64), offs_n.to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + out_m[:, None] * stride_rm + out_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + out_m[:, None] * stride_ym + out_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# -- validation --------------------------------------------------------------------------------

def _check(x, weight, bias, residual) -> None:
    """Shapes, dtypes and devices of a linear_add call; InvalidOptionError saying the fix."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise InvalidOptionError(f"linear_add: {name} must be a torch.Tensor; got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise InvalidOptionError(
            f"linear_add: expected x (..., K) and weight (N, K) as nn.Linear stores it; got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}. Pass linear.weight, not its transpose.")
    if not x.dtype.is_floating_point:
        raise InvalidOptionError(f"linear_add: x must be a floating-point tensor; got {x.dtype}")
    n = weight.shape[0]
    expected = {"weight": tuple(weight.shape), "bias": (n,), "residual": (*x.shape[:-1], n)}
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise InvalidOptionError(f"linear_add: {name} must have shape {expected[name]} for x "
                                     f"{tuple(x.shape)} and weight {tuple(weight.shape)}; "
                                     f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise InvalidOptionError(f"linear_add: {name} is {t.dtype} but x is {x.dtype}; cast it "
                                     f"with .to({x.dtype}) (the output takes x's dtype)")
        if t.device != x.device:
            raise InvalidOptionError(f"linear_add: {name} is on {t.device} but x is on {x.device}; "
                                     "move them to one device")


# -- torch paths -------------------------------------------------------------------------------

def linear_add_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x · Wᵀ + bias + residual computed in fp32 (float64 for float64 inputs),
    rounded once to x's dtype."""
    _check(x, weight, bias, residual)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


def linear_add_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """One torch.addmm: the residual (and bias) is addmm's `input`, added inside the GEMM call
    (beta=1), so no separate add kernel and no second output buffer."""
    _check(x, weight, bias, residual)
    m, k, n = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0]
    x2 = x.reshape(m, k)
    if residual is not None:
        # Bias and residual together: the (N,) bias broadcast into the (M, N) residual first.
        inp = residual.reshape(m, n)
        inp = inp + bias if bias is not None else inp
    elif bias is not None:
        inp = bias  # addmm broadcasts (N,) over the rows
    else:
        return (x2 @ weight.T).reshape(*x.shape[:-1], n)
    return torch.addmm(inp, x2, weight.T, beta=1, alpha=1).reshape(*x.shape[:-1], n)


# -- Triton launcher ---------------------------------------------------------------------------

def _block_k(cfg: dict, dtype: torch.dtype) -> int:
    """The table's BLOCK_K is for 2-byte inputs; fp32 takes half, at most 64, so a stage holds
    at most the 16-bit bytes. fp32 "ieee" dots are CUDA-core FMAs, which gain nothing from long
    K tiles; and under the interpreter each K tile is one numpy product summed in sequence,
    whose fp32 error at 256-long tiles came out ~2x that of torch's blocked CPU GEMM."""
    return min(cfg["BLOCK_K"] // 2, 64) if dtype == torch.float32 else cfg["BLOCK_K"]


def _linear_add_call(x2, weight, bias, r2, y, cfg):
    """(kernel, grid, args, kwargs) of the launch for 2-D x, residual and y: data, so the AOT
    tests compile exactly the launcher's call."""
    (m, k), n = x2.shape, weight.shape[0]
    block_k = _block_k(cfg, x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    r_strides = (r2.stride(0), r2.stride(1)) if r2 is not None else (0, 0)
    args = (x2, weight, bias if bias is not None else y, r2 if r2 is not None else y, y, m, n, k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *r_strides,
            y.stride(0), y.stride(1))
    kwargs = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, EVEN_K=k % block_k == 0,
                  DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",  # 16-bit: unused
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=GROUP_M,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _linear_add_kernel, grid, args, kwargs


def _launch(*call_args):
    kernel, grid, args, kwargs = _linear_add_call(*call_args)
    kernel[grid](*args, **kwargs)


def linear_add_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """x · Wᵀ + bias + residual in one Triton GEMM; fp16, bf16 or fp32 inputs, x's dtype out.

    The configuration comes from LINEAR_ADD_CONFIGS for M's bucket, the fastest timed once per
    shape on the GPU; `config` forces one (tests, benchmarks).
    """
    require_triton("linear_add_triton", TRITON_AVAILABLE)
    _check(x, weight, bias, residual)
    if x.dtype not in KERNEL_DTYPES:
        raise InvalidOptionError(f"linear_add_triton takes fp16, bf16 or fp32; got {x.dtype}. "
                                 "Call linear_add_torch for other dtypes.")
    m, k, n = math.prod(x.shape[:-1]), x.shape[-1], weight.shape[0]
    x2 = x.reshape(m, k)
    r2 = residual.reshape(m, n) if residual is not None else None
    if m == 0 or n == 0 or k == 0:  # nothing to multiply: the torch path gives the sums
        return linear_add_torch(x, weight, bias, residual)
    bias = bias.contiguous() if bias is not None else None  # N elements, read unit-stride
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bucket = m_bucket(m, LINEAR_ADD_CONFIGS)
    key = ("linear_add", bucket, n, k, x.dtype, bias is not None, r2 is not None)
    run = lambda cfg: _launch(x2, weight, bias, r2, y, cfg)  # noqa: E731
    with on_device(x, _linear_add_kernel):
        run(config or pick_config(key, LINEAR_ADD_CONFIGS[bucket], run, x.device))
    return y.reshape(*x.shape[:-1], n)


def _wants_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ + bias + residual, the adds fused into the matmul.

    x (..., K); weight (N, K) as nn.Linear stores it; bias (N,) or None; residual (..., N) with
    x's leading shape, or None; all of x's dtype and device. Returns x's dtype. CUDA tensors
    run the Triton kernel (fp32 accumulator, bias and residual added in fp32, one rounding);
    elsewhere, or where autograd must see the op, one torch.addmm.
    """
    _check(x, weight, bias, residual)
    if (x.is_cuda and TRITON_AVAILABLE and x.dtype in KERNEL_DTYPES
            and not _wants_autograd(x, weight, bias, residual)):
        return linear_add_triton(x, weight, bias, residual)
    return linear_add_torch(x, weight, bias, residual)
