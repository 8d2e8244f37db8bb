"""INT8 weight-only linear (W8A16): y = x · dequant(qweight)ᵀ + bias, the weight kept in int8.

Weights: qweight (N, K) int8; scale fp32 (N,) per output channel or (N, K // group_size) per
group; optional int32 zero point of the scale's shape, so w = (q - zero_point) * scale.

Two Triton kernels, both accumulating in fp32:
- `_int8_gemv_kernel` for decode (M <= 4): one row of x per program, BLOCK_N output
  channels over the whole of K ("wide N", no split-K, so one launch and a deterministic sum).
  At batch 1 this is bandwidth-bound: the int8 weight is streamed with a prefetched tile in
  flight, and the per-weight work is kept to a few full-rate instructions (`_int8_to_f32`,
  and a register layout that needs no shared memory: see the kernel's comments).
- `_int8_gemm_w8a16_kernel` for prefill: tl.dot tiles with the int8 tile dequantized to the
  activation dtype in registers. (q - zero_point) is an integer of at most 255 in magnitude,
  exact in fp16/bf16, so the dot is exact in its weight operand and the scale is applied to the
  fp32 partial sums, per tile for per-group scales and once at the end per channel.

`int8_linear_ref` is the fp32 torch reference. Launch configurations are data (the tables
below); `pick_config` times the candidates once per (M bucket, N, K, ...) on the GPU.
"""
from __future__ import annotations

import torch


from .triton_utils import (GROUP_M, TRITON_AVAILABLE, grouped_tile, m_bucket, on_device, pick_config,
                           require_triton, tl, triton)
from .triton_utils import jit as _jit
# Launch configurations, keyed by the largest M each list serves (None: any larger M). The
# first entry of each list is the one used where nothing is timed (the interpreter).
# M <= 4 (decode): the CUDA-core GEMV streams the weight with 32-64 weights per thread per
# tile (4-8 KiB per load, two loads in flight per program; BLOCK_K >= 256 * num_warps keeps
# every warp along K, see the kernel); the tensor-core kernel with 16-row tiles is a candidate
# too, so timing on the GPU picks whichever streams faster.
W8A16_CONFIGS = {
    4: (dict(kernel="gemv", BLOCK_N=4, BLOCK_K=1024, num_warps=4),
        dict(kernel="gemv", BLOCK_N=8, BLOCK_K=1024, num_warps=4),
        dict(kernel="gemv", BLOCK_N=4, BLOCK_K=2048, num_warps=8),
        dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)),
    16: (dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
         dict(kernel="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    64: (dict(kernel="mma", BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
         dict(kernel="mma", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
    None: (dict(kernel="mma", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
           dict(kernel="mma", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
           dict(kernel="mma", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
}


# -- kernels -----------------------------------------------------------------------------------

@_jit
def _int8_to_f32(q, zoff):
    """(q - zero_point) in fp32 for int8 q, where zoff = 8388736 + zero_point (fp32).

    0x4B000080 + q is the bit pattern of the float 2**23 + 128 + q (the mantissa holds the
    integer), so an integer add and a float subtract replace the int-to-float convert, which
    the CUDA throughput tables give at 16 results per clock per SM against 128 for an FMA: at
    batch 1 it would cost as much as streaming the weight. Exact: every value is an integer
    below 2**24.
    """
    bits = q.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - zoff


@_jit
def _spread_groups(t, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr):
    """(BLOCK_N, GROUPS) -> (BLOCK_N, BLOCK_K): each group's value over its columns."""
    t = tl.broadcast_to(t[:, :, None], (BLOCK_N, GROUPS, BLOCK_K // GROUPS))
    return tl.reshape(t, (BLOCK_N, BLOCK_K))


@_jit
def _dequant_groups(q, s_ptr, zp_ptr, rows, k0, K, stride_sn, stride_sg,
                    GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUPS: tl.constexpr):
    """(q - zero_point) * scale in fp32 for a weight tile at column k0 that holds GROUPS whole
    groups (or lies inside one): a few scales per row, spread over their columns in registers."""
    gs = k0 // GROUP_SIZE + tl.arange(0, GROUPS)[None, :]
    g_off = rows[:, None] * stride_sn + gs * stride_sg
    g_ok = gs * GROUP_SIZE < K
    zoff = tl.zeros((BLOCK_N, GROUPS), tl.float32) + 8388736.0  # see _int8_to_f32
    if HAS_ZP:
        zoff += tl.load(zp_ptr + g_off, mask=g_ok, other=0).to(tl.float32)
    scale = tl.load(s_ptr + g_off, mask=g_ok, other=0.0)
    w = _int8_to_f32(q, _spread_groups(zoff, BLOCK_N, BLOCK_K, GROUPS))
    return w * _spread_groups(scale, BLOCK_N, BLOCK_K, GROUPS)


@_jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, zp_ptr, b_ptr, y_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg,
                      stride_ym, stride_yn,
                      GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
                      VEC: tl.constexpr):
    # Rows of x vary fastest, so the programs sharing a weight tile run together and the
    # re-reads for M > 1 come from L2.
    pid = tl.program_id(0)
    m = pid % M
    offs_n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N  # wrap instead of masking: loads stay unmasked along N, the store is masked
    # Register layouts: each load takes its vector width from its contiguity, 16 bytes, which
    # is 16 int8 but 8 bf16. Capping both at VEC (16 bytes of x) gives the weight tile and x the
    # same split of K over threads; with BLOCK_K >= VEC * 32 * num_warps every warp lies along
    # K, x's 1-D layout is then the weight tile's column slice, and x is loaded and converted
    # once per thread for all its rows, with no shared-memory exchange (the AOT tests check).
    offs_k = tl.max_contiguous(tl.arange(0, BLOCK_K), VEC)
    x_ptrs = x_ptr + m * stride_xm + offs_k * stride_xk
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
    zoff = tl.zeros((BLOCK_N,), tl.float32) + 8388736.0  # see _int8_to_f32
    if HAS_ZP and GROUP_SIZE == 0:
        zoff += tl.load(zp_ptr + rows * stride_sn).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # reduced over K once, after the loop
    q_next = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0)
    for k0 in range(0, K, BLOCK_K):
        # Prefetch the next weight tile before using this one: two tiles in flight per program
        # (the last prefetch is fully masked and reads nothing).
        q = q_next
        w_ptrs += BLOCK_K * stride_wk
        q_next = tl.load(w_ptrs, mask=offs_k[None, :] < K - k0 - BLOCK_K, other=0)
        x = tl.load(x_ptrs, mask=offs_k < K - k0, other=0.0).to(tl.float32)
        if GROUP_SIZE > 0:
            w = _dequant_groups(q, s_ptr, zp_ptr, rows, k0, K, stride_sn, stride_sg,
                                GROUP_SIZE, HAS_ZP, BLOCK_N, BLOCK_K, GROUPS)
        else:
            w = _int8_to_f32(q, zoff[:, None])
        acc += x[None, :] * w  # masked K: x is 0 there, so (0 - zp) adds nothing
        x_ptrs += BLOCK_K * stride_xk
    out = tl.sum(acc, axis=1)
    if GROUP_SIZE == 0:
        out *= tl.load(s_ptr + rows * stride_sn)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, out.to(y_ptr.dtype.element_ty),
             mask=offs_n < N)


@_jit
def _int8_gemm_w8a16_kernel(x_ptr, w_ptr, s_ptr, zp_ptr, b_ptr, y_ptr, M, N, K,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg,
                            stride_ym, stride_yn,
                            GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m, rows_n = offs_m % M, offs_n % N  # wrapped; only the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_n[None, :] * stride_wn  # (K, N) view
    zoff = tl.zeros((BLOCK_N,), tl.float32) + 8388736.0
    if HAS_ZP and GROUP_SIZE == 0:
        zoff += tl.load(zp_ptr + rows_n * stride_sn).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        if GROUP_SIZE > 0:  # one group per K tile: scale the tile's fp32 partial product
            g_off = rows_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg
            z = zoff
            if HAS_ZP:
                z += tl.load(zp_ptr + g_off).to(tl.float32)
            w = _int8_to_f32(q, z[None, :]).to(x.dtype)
            part = tl.dot(x, w, input_precision=DOT_PRECISION)
            acc += part * tl.load(s_ptr + g_off)[None, :]
        else:
            w = _int8_to_f32(q, zoff[None, :]).to(x.dtype)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if GROUP_SIZE == 0:
        acc *= tl.load(s_ptr + rows_n * stride_sn)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# -- reference ---------------------------------------------------------------------------------

def group_size_of(qweight: torch.Tensor, scale: torch.Tensor) -> int:
    """0 for a per-channel scale (N,) or (N, 1); else the K columns each scale covers."""
    n, k = qweight.shape
    if scale.shape[0] != n or scale.dim() > 2:
        raise ValueError(f"scale must be (N,) or (N, K // group_size) for a ({n}, {k}) weight; "
                         f"got {tuple(scale.shape)}")
    if scale.dim() == 1 or scale.shape[1] == 1:
        return 0
    groups = scale.shape[1]
    if k % groups:
        raise ValueError(f"K={k} is not a whole number of {groups} groups")
    return k // groups


def _per_column(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """A per-channel or per-group (N, ...) tensor expanded to (N, K), in fp32."""
    t = t.to(torch.float32).reshape(t.shape[0], -1)
    return t.repeat_interleave(group, dim=1) if group else t.expand(-1, k)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference W8A16 linear: dequantize to fp32, matmul in fp32, return x.dtype.

    x (..., K); qweight (N, K) int8; scale (N,) or (N, K // group_size); zero_point None or
    integer of the scale's shape (w = (q - zero_point) * scale); bias (N,) or None.
    """
    n, k = qweight.shape
    group = group_size_of(qweight, scale)
    w = qweight.to(torch.float32)
    if zero_point is not None:
        w = w - _per_column(zero_point, group, k)
    w = w * _per_column(scale, group, k)
    y = x.reshape(-1, k).to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# -- launchers ---------------------------------------------------------------------------------

def _pow2_factor(n: int) -> int:
    return n & -n


def _kernel_call(x, qweight, scale, zero_point, bias, y, group, cfg):
    """(kernel, grid, args, kwargs) of the launch `cfg` names, for 2-D x and y: data, so the
    tests can compile exactly this call ahead of time. Both kernels share their arguments."""
    (m, k), n = x.shape, qweight.shape[0]
    block_n, block_k, groups = cfg["BLOCK_N"], cfg["BLOCK_K"], 1
    if group and cfg["kernel"] == "gemv" and block_k % group == 0:
        groups = block_k // group  # whole groups per tile, their scales spread in registers
    elif group and block_k > _pow2_factor(group):  # else one group must hold each K tile
        shrink = block_k // _pow2_factor(group)
        block_k //= shrink
        block_n *= shrink if cfg["kernel"] == "gemv" else 1  # the GEMV keeps its tile's bytes
    args = (x, qweight, scale, zero_point if zero_point is not None else scale,
            bias if bias is not None else scale, y, m, n, k, x.stride(0), x.stride(1),
            qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
            y.stride(0), y.stride(1))
    kwargs = dict(GROUP_SIZE=group, HAS_ZP=zero_point is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"])
    if cfg["kernel"] == "gemv":
        return (_int8_gemv_kernel, (triton.cdiv(n, block_n) * m,), args,
                dict(kwargs, GROUPS=groups, VEC=16 // x.element_size()))
    kwargs.update(DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  BLOCK_M=cfg["BLOCK_M"], GROUP_M=GROUP_M, num_stages=cfg["num_stages"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, block_n),)
    return _int8_gemm_w8a16_kernel, grid, args, kwargs


def _launch(*call_args):
    kernel, grid, args, kwargs = _kernel_call(*call_args)
    kernel[grid](*args, **kwargs)


def _prepare(x, qweight, scale, zero_point, bias):
    """Validate, flatten x to 2D and give every tensor the dtype the kernels read."""
    n, k = qweight.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")
    if qweight.dtype != torch.int8 or x.shape[-1] != k:
        raise ValueError(f"expected an int8 (N, K) weight and x (..., K); got {qweight.dtype} "
                         f"{tuple(qweight.shape)} and x {tuple(x.shape)}")
    group = group_size_of(qweight, scale)
    if group % 16:
        raise ValueError(f"group_size {group} is not a multiple of 16, which the Triton kernels "
                         "need (one scale per K tile); use int8_linear_ref")
    if zero_point is not None:
        if zero_point.shape != scale.shape:
            raise ValueError("zero_point must have the scale's shape")
        zero_point = zero_point.to(torch.int32).reshape(n, -1).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).reshape(n, -1).contiguous()
    return x.reshape(-1, k), scale, zero_point, bias, group


def int8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       zero_point: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       *, config: dict | None = None) -> torch.Tensor:
    """W8A16 linear on Triton; the contract of `int8_linear_ref`.

    The launch configuration comes from W8A16_CONFIGS for M's bucket, the fastest timed once per
    shape on the GPU; `config` forces one (tests, benchmarks). Per-group scales need group_size
    to be a multiple of 16. fp32 activations use full-precision (ieee) dots.
    """
    require_triton("int8_linear_triton", TRITON_AVAILABLE)
    x2, scale, zero_point, bias, group = _prepare(x, qweight, scale, zero_point, bias)
    (m, k), n = x2.shape, qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    bucket = m_bucket(m, W8A16_CONFIGS)
    key = ("w8a16", bucket, n, k, x.dtype, group, zero_point is not None, bias is not None)
    run = lambda cfg: _launch(x2, qweight, scale, zero_point, bias, y, group, cfg)  # noqa: E731
    with on_device(x, _int8_gemv_kernel):
        run(config or pick_config(key, W8A16_CONFIGS[bucket], run, x.device))
    return y.reshape(*x.shape[:-1], n)
