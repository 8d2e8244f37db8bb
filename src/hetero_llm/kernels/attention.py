"""Fused attention (flash attention forward): softmax(q·kᵀ·scale + mask)·v, no score matrix.

    attention(q, k, v, *, causal=True, attn_mask=None, scale=None) -> (B, H, Sq, D)

q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H % Hkv == 0 (GQA; Hkv == 1 is MQA): query head h
reads key/value head h // (H // Hkv), as transformers' repeat_kv does.

Semantics, the same on every path:
- causal with Sq != Sk is bottom-right aligned: query i may attend key j iff j <= i + (Sk - Sq),
  what a chunk of new tokens attending a KV cache needs (SDPA's is_causal is top-left aligned).
- attn_mask: bool (True = may attend) or additive float, broadcastable to (B, H, Sq, Sk); it
  combines with causal. An additive mask is used in q's dtype (as SDPA requires), and values at
  or below that dtype's finfo.min (transformers' "masked", and -inf) count as masked out.
- A row with no key to attend (left padding, Sq > Sk under causal) is exactly 0, never NaN.

Paths: `attention_triton` (the kernel; CUDA, or CPU under the Triton interpreter) for CUDA
tensors where Triton is importable, `attention_torch` (SDPA with an explicit mask) otherwise;
`attention_ref` computes in float64 for tests.

The kernel (`_attn_fwd_kernel`): one program per BLOCK_M query rows of one (batch, head); the q
tile stays in registers while the key loop streams K/V tiles through shared memory (pipelined
by num_stages), with the online softmax and both accumulators in fp32. 16-bit inputs use exp2
with scale·log2(e) folded into one multiply, and P goes to the second dot in the input dtype
(tensor cores: mma.sync on sm_80, wgmma on sm_90); fp32 inputs use IEEE FMA dots and exp. The
key loop has two phases: blocks every row may fully see (no masking work at all) and the few
that straddle the causal diagonal or the end of the keys (masked). Under causal the loop
stops at the diagonal, and the heaviest row blocks are launched first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from .triton_utils import (TRITON_AVAILABLE, jit, load_tile, on_device, pick_config, require_triton, tl,
                           triton)

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Launch configurations keyed by (input bits, the largest head_dim the list serves); the first
# entry of each list is the one used where nothing is timed (the interpreter), the GPU times them
# all once per shape bucket. Shared memory is Q once plus the K, V (and mask) tiles times the
# pipeline depth; every entry fits A100's 163 KiB and H100's 227 KiB even with a 16-bit
# (B, 1, Sq, Sk) mask, the most any launch takes (AOT-tested, numbers in the test file).
# 16-bit: 128-row query tiles over 8 warps are two Hopper warpgroups of 64 rows (wgmma's M);
# BLOCK_N 32-128 keys per step is what flash attention 2 and Triton's fused-attention tutorial
# settle on. The first entries spill no registers on the hot path (causal, no mask; AOT-
# checked); with a mask or on sm_80 some entries spill a little (the AOT test prints the
# counts) and timing picks the others. 128 x 64 over 4 warps is left out: at D = 128 it spills
# heavily on sm_80. 64-row tiles give short prompts more programs to fill the SMs. D = 256
# doubles every row, so tiles shrink.
# fp32 is the correctness path (IEEE FMA dots, no tensor cores): one small tile.
ATTENTION_CONFIGS = {
    (16, 64): (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
               dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    (16, 128): (dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    (16, 256): (dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
    (32, 256): (dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),),
}


def config_key(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """The ATTENTION_CONFIGS key for inputs of `dtype` and `head_dim` (<= MAX_HEAD_DIM)."""
    bits = 32 if dtype == torch.float32 else 16
    return next(k for k in ATTENTION_CONFIGS if k[0] == bits and head_dim <= k[1])


# -- kernel ------------------------------------------------------------------------------------

@jit
def _qk_ieee(q_ptrs, k_ptrs, k_ok, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr):
    """fp32 q·kᵀ (IEEE products: tf32 would lose 10 mantissa bits), summed over head_dim in
    D_CHUNK-wide slices and then across them. An FMA dot (and the interpreter's) adds its
    products one after another, so its rounding error grows with the length; slices of 64 keep
    head_dim 256 as accurate as torch's blocked GEMM. The slices are subtracted from a negated
    sum because Triton folds `s + dot(a, b)` into `dot(a, b, s)`, one sequential sum again."""
    neg = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    offs_c = tl.arange(0, D_CHUNK)
    for c in tl.static_range(0, BLOCK_D, D_CHUNK):
        c_ok = offs_c < HEAD_DIM - c
        qc = tl.load(q_ptrs + c, mask=c_ok[None, :], other=0.0)
        kc = tl.load(k_ptrs + c, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        neg -= tl.dot(qc, tl.trans(kc), input_precision="ieee")
    return -neg


@jit
def _add_mask(s, mask_ptrs, col_ok, MASKED: tl.constexpr, IS_BOOL_MASK: tl.constexpr,
              MASK_MIN: tl.constexpr, FP32: tl.constexpr):
    """The scores s with the attn_mask tile applied: -inf where it forbids a key."""
    if MASKED:
        mv = tl.load(mask_ptrs, mask=col_ok[None, :], other=0)
    else:
        mv = tl.load(mask_ptrs)
    if IS_BOOL_MASK:
        return tl.where(mv != 0, s, float("-inf"))
    mv = mv.to(tl.float32)
    keep = mv > MASK_MIN  # finfo.min (and -inf) means masked out
    if not FP32:  # the 16-bit scores are in log2 units
        mv = mv * 1.4426950408889634
    return tl.where(keep, s + mv, float("-inf"))


@jit
def _attn_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, d_ok, lo, hi,
                 Sk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 IS_BOOL_MASK: tl.constexpr, MASK_MIN: tl.constexpr, HEAD_DIM: tl.constexpr,
                 FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). MASKED: the blocks may hold keys past Sk or
    past the causal diagonal; otherwise every key is visible to every row and nothing is masked.
    q: the q tile (16-bit), or pointers to its first D_CHUNK columns (fp32, see _qk_ieee)."""
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D  # head_dim 80, 96: the tile's last columns are padding
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs = start_n.to(tl.int64)
        cols = start_n + offs_n
        if FP32:
            s = _qk_ieee(q, k_ptrs + offs * stride_kn, cols < Sk, HEAD_DIM, BLOCK_M, BLOCK_N,
                         BLOCK_D, D_CHUNK)
        else:
            k = load_tile(k_ptrs + offs * stride_kn, cols < Sk, d_ok, MASKED, PAD_D)
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # 16-bit: log2 units, exp2(s) == exp(q·k·scale); fp32: natural units
        if HAS_MASK:
            s = _add_mask(s, mask_ptrs + offs * stride_mn, cols < Sk, MASKED, IS_BOOL_MASK,
                          MASK_MIN, FP32)
        if MASKED:
            ok = (cols < Sk)[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_MASK:  # a row with nothing visible yet: exp2(-inf - -inf) would be NaN
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if FP32:  # one rounding fewer in the exponent than folding log2(e) into the scale
            p = tl.exp(s - m_new_safe[:, None])
            alpha = tl.exp(m_i - m_new_safe)
        else:  # the fold saves a multiply per score; P's 16-bit rounding dwarfs its error
            p = tl.math.exp2(s - m_new_safe[:, None])
            alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_ptrs + offs * stride_vn, cols < Sk, d_ok, MASKED, PAD_D)
        acc = acc * alpha[:, None]
        if FP32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:  # P in the input dtype, as flash attention does: the tensor cores' operand type
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
                     stride_ob, stride_oh, stride_om, GROUP, Sq, Sk, qk_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                     IS_BOOL_MASK: tl.constexpr, MASK_MIN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     D_CHUNK: tl.constexpr):
    # Last row block first: under causal it has the most keys, so the long programs start early
    # and the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h, off_b = tl.program_id(1), tl.program_id(2).to(tl.int64)
    off_kv = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows = (offs_m % Sq).to(tl.int64)  # wrapped: loads need no row mask, only the store does
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    FP32: tl.constexpr = q_ptr.dtype.element_ty == tl.float32

    q_rows = q_ptr + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm
    kv_rows = offs_n.to(tl.int64)[:, None]
    k_rows = k_ptr + off_b * stride_kb + off_kv * stride_kh + kv_rows * stride_kn
    if FP32:  # pointers to the first D_CHUNK columns: _qk_ieee loads slice by slice
        q = q_rows + tl.arange(0, D_CHUNK)[None, :]
        k_ptrs = k_rows + tl.arange(0, D_CHUNK)[None, :]
    else:  # the q tile, loaded once
        if HEAD_DIM == BLOCK_D:
            q = tl.load(q_rows + offs_d[None, :])
        else:
            q = tl.load(q_rows + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        k_ptrs = k_rows + offs_d[None, :]
    v_ptrs = v_ptr + off_b * stride_vb + off_kv * stride_vh + kv_rows * stride_vn + offs_d[None, :]
    mask_ptrs = (mask_ptr + off_b * stride_mb + off_h * stride_mh + rows[:, None] * stride_mm
                 + offs_n.to(tl.int64)[None, :] * stride_mn)

    # Key blocks [0, full) are visible to every row of this block; [full, hi) need masking.
    shift = Sk - Sq  # bottom-right causal alignment: row i sees keys j <= i + shift
    if CAUSAL:
        full = tl.minimum(tl.maximum(m0 + shift + 1, 0), Sk) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, Sq) + shift, 0), Sk)
    else:
        full = Sk // BLOCK_N * BLOCK_N
        hi = Sk
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, d_ok,
                                 0, full, Sk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                                 False, CAUSAL, HAS_MASK, IS_BOOL_MASK, MASK_MIN, HEAD_DIM, FP32,
                                 BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, d_ok,
                                 full, hi, Sk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                                 True, CAUSAL, HAS_MASK, IS_BOOL_MASK, MASK_MIN, HEAD_DIM, FP32,
                                 BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK)
    # l_i is 0 exactly for rows that saw no key (their acc is 0 too): write 0, never 0/0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (o_ptr + off_b * stride_ob + off_h * stride_oh
              + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < Sq)[:, None] & d_ok[None, :])


# -- checks and masks --------------------------------------------------------------------------

def _check(q, k, v, attn_mask) -> None:
    """Raise InvalidOptionError, naming the fix, unless the inputs make a valid attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidOptionError(f"attention: {name} must be a 4-D tensor (batch, heads, seq, "
                                     f"head_dim); got {got}. Reshape it, e.g. x.view(B, S, H, D)"
                                     ".transpose(1, 2).")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidOptionError(f"attention: q, k, v must share one dtype of fp16, bf16, fp32; "
                                 f"got {q.dtype}, {k.dtype}, {v.dtype}. Cast them with .to(dtype).")
    if k.device != q.device or v.device != q.device:
        raise InvalidOptionError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}; "
                                 "move them to one device.")
    (b, h, _, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if k.shape != v.shape or bk != b or dk != d:
        raise InvalidOptionError(f"attention: expected k and v of shape (B={b}, Hkv, Sk, D={d}); "
                                 f"got k {tuple(k.shape)}, v {tuple(v.shape)}. Pass the cache "
                                 "for the same batch and head_dim as q.")
    if hkv == 0 or h % hkv:
        raise InvalidOptionError(f"attention: q's {h} heads are not a multiple of k/v's {hkv}; "
                                 "pass k/v with a divisor of q's head count (GQA).")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor) or not (
            attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        got = getattr(attn_mask, "dtype", type(attn_mask).__name__)
        raise InvalidOptionError("attention: attn_mask must be a bool tensor (True = may attend) "
                                 f"or a floating additive mask; got {got}.")
    full = (b, h, q.shape[2], sk)
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok or attn_mask.device != q.device:
        raise InvalidOptionError(f"attention: attn_mask {tuple(attn_mask.shape)} on "
                                 f"{attn_mask.device} must broadcast to (B, H, Sq, Sk) = {full} on "
                                 f"{q.device}, e.g. (B, 1, Sq, Sk) or (B, 1, 1, Sk) for padding.")


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not math.isfinite(float(scale)):
        raise InvalidOptionError(f"attention: scale must be a finite number; got {scale}.")
    return float(scale)


def causal_keep(sq: int, sk: int, device=None) -> torch.Tensor:
    """(Sq, Sk) bool, bottom-right aligned: True where key j <= i + (Sk - Sq)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


def _mask_keep(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where an attn_mask lets a query attend: True, or an additive value (in the inputs' dtype
    `dtype`) above finfo(dtype).min."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask.to(dtype) > torch.finfo(dtype).min


# -- torch paths -------------------------------------------------------------------------------

def attention_ref(q, k, v, *, causal=True, attn_mask=None, scale=None,
                  compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference: the score matrix in `compute_dtype` (float64 unless asked), returned in it."""
    _check(q, k, v, attn_mask)
    (_, h, sq, d), (hkv, sk) = q.shape, k.shape[1:3]
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(h // hkv, dim=1), vf.repeat_interleave(h // hkv, dim=1)
    s = qf @ kf.transpose(-1, -2) * _scale(scale, d)
    keep = causal_keep(sq, sk, q.device) if causal else torch.ones(sq, sk, dtype=torch.bool,
                                                                  device=q.device)
    if attn_mask is not None:
        keep = keep & _mask_keep(attn_mask, q.dtype)
        if attn_mask.dtype != torch.bool:
            s = s + attn_mask.to(q.dtype).to(compute_dtype)
    p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
    return p.masked_fill(~keep, 0) @ vf  # rows with no key: softmax gave NaN, now 0


def attention_torch(q, k, v, *, causal=True, attn_mask=None, scale=None) -> torch.Tensor:
    """`attention` on torch's scaled_dot_product_attention, with the causal mask built
    bottom-right aligned where Sq != Sk and rows that see no key set to 0."""
    _check(q, k, v, attn_mask)
    (_, h, sq, d), (hkv, sk) = q.shape, k.shape[1:3]
    scale = _scale(scale, d)
    if q.numel() == 0 or sk == 0:
        return q.new_zeros(q.shape)
    keep, sdpa_mask = None, None
    if attn_mask is not None:
        keep = _mask_keep(attn_mask, q.dtype)
        sdpa_mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
    is_causal = causal and sq == sk and attn_mask is None  # SDPA's top-left causal agrees
    if causal and not is_causal:
        tri = causal_keep(sq, sk, q.device)
        keep = tri if keep is None else keep & tri
        sdpa_mask = keep if sdpa_mask is None or sdpa_mask.dtype == torch.bool else \
            sdpa_mask.masked_fill(~tri, -math.inf)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=h != hkv)
    if keep is not None:  # SDPA gives NaN (or the mean of v) where a row sees no key
        out = out.masked_fill(~keep.any(-1, keepdim=True), 0)
    return out


# -- the Triton launcher -----------------------------------------------------------------------

def _attention_call(q, k, v, attn_mask, out, scale: float, causal: bool, cfg: dict):
    """(kernel, grid, args, kwargs) of the attention launch: data, for the AOT tests."""
    (b, h, sq, d), (hkv, sk) = q.shape, k.shape[1:3]
    block_d = max(16, triton.next_power_of_2(d))
    if attn_mask is None:
        mask, mask_strides, mask_min = q, (0, 0, 0, 0), 0.0
    else:
        # Broadcast dims get stride 0: the (B, H, Sq, Sk) mask is never materialized. A float
        # mask is read in q's dtype (an fp32 one would double its pipelined tiles in shared memory).
        if attn_mask.dtype == torch.bool:
            mask, mask_min = attn_mask.view(torch.int8), 0.0
        else:
            mask, mask_min = attn_mask.to(q.dtype), torch.finfo(q.dtype).min
        mask = mask.expand(b, h, sq, sk)
        mask_strides = mask.stride()
    qk_scale = scale if q.dtype == torch.float32 else scale * LOG2E  # see _attn_blocks
    args = (q, k, v, mask, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides,
            *out.stride()[:3], h // hkv, sq, sk, qk_scale)
    kwargs = dict(HEAD_DIM=d, CAUSAL=bool(causal), HAS_MASK=attn_mask is not None,
                  IS_BOOL_MASK=attn_mask is not None and attn_mask.dtype == torch.bool,
                  MASK_MIN=mask_min, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_D=block_d, D_CHUNK=min(block_d, 64), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    return _attn_fwd_kernel, (triton.cdiv(sq, cfg["BLOCK_M"]), h, b), args, kwargs


def _launch(*call_args):
    kernel, grid, args, kwargs = _attention_call(*call_args)
    kernel[grid](*args, **kwargs)


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 8192)


def attention_triton(q, k, v, *, causal=True, attn_mask=None, scale=None,
                     config: dict | None = None) -> torch.Tensor:
    """`attention` in one Triton kernel (flash attention forward); head_dim <= 256.

    The configuration comes from ATTENTION_CONFIGS for the dtype and head_dim (timed once per
    shape bucket on the GPU); `config` forces one. Inputs need unit stride only in head_dim.
    """
    require_triton("attention_triton", TRITON_AVAILABLE)
    _check(q, k, v, attn_mask)
    (_, h, sq, d), sk = q.shape, k.shape[2]
    if d > MAX_HEAD_DIM:
        raise InvalidOptionError(f"attention_triton: head_dim {d} > {MAX_HEAD_DIM} does not fit "
                                 "the kernel's tiles; call attention_torch instead.")
    scale = _scale(scale, d)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)  # q's layout, e.g. (B, S, H, D) memory for a transposed view
    if out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0 or sk == 0:
        return out.zero_()
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)  # once, not per timed launch (a no-op if it matches)
    candidates = ATTENTION_CONFIGS[config_key(q.dtype, d)]
    kind = None if attn_mask is None else attn_mask.dtype
    key = ("attention", q.dtype, d, causal, kind, _bucket(sq), _bucket(sk), h // k.shape[1] > 1)
    run = lambda cfg: _launch(q, k, v, attn_mask, out, scale, causal, cfg)  # noqa: E731
    with on_device(q, _attn_fwd_kernel):
        run(config or pick_config(key, candidates, run, q.device))
    return out


def attention(q, k, v, *, causal=True, attn_mask=None, scale=None) -> torch.Tensor:
    """Fused attention: softmax(q·kᵀ·scale + mask)·v, (B, H, Sq, D) in q's dtype.

    q (B, H, Sq, D); k, v (B, Hkv, Sk, D), H % Hkv == 0. causal is bottom-right aligned (query i
    sees keys j <= i + Sk - Sq); attn_mask is bool (True = attend) or additive, broadcastable to
    (B, H, Sq, Sk), and combines with causal; rows that see no key are 0. scale defaults to
    head_dim ** -0.5. The Triton kernel runs for CUDA tensors where Triton is importable and
    head_dim <= 256; everything else takes `attention_torch`.
    """
    if (isinstance(q, torch.Tensor) and q.is_cuda and TRITON_AVAILABLE and q.dim() == 4
            and q.shape[-1] <= MAX_HEAD_DIM):
        return attention_triton(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)
    return attention_torch(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)
