"""Decode attention: one new query token per sequence against a KV cache, split-KV on the GPU.

    out[b, h] = softmax(q[b, h] · k[b, h // G, :n_b]ᵀ * scale) · v[b, h // G, :n_b]

with G = H // Hkv query heads per KV head and n_b = cache_lens[b] <= S_max (static caches are
longer than what is filled). n_b == 0 gives zeros, never NaN.

The Triton path is flash-decoding. Batch 1 has only B * Hkv (sequence, KV head) pairs, far
fewer than the SMs, so phase 1 also splits each sequence's keys into `num_splits` chunks:
program (split, pair) streams its chunk of K and V once, BLOCK_N keys at a time, for all G query
heads of the group at once (16-bit: rows padded to >= 16 so that tl.dot runs on the tensor
cores), with an online softmax in fp32, and writes a partial output normalized by its own sum
plus its log-sum-exp (-inf for an empty chunk). Phase 2 weighs the splits of each (b, h) by
exp(lse - max) and writes q's dtype. Chunks are cut from each sequence's own length, so short
sequences in a batch do little work; with one split, phase 1 writes the output itself. Each
cache byte is read once for ~2 flops: the kernel is bandwidth-bound, so the configs differ in
tile length and pipeline depth only, and fp32 can afford tree reductions instead of a dot.

cache_lens on a CUDA device is not range-checked (that would synchronize the GPU every step);
the kernel clamps each length into [0, S_max] instead, so a bad length cannot read out of bounds.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from ..errors import InvalidOptionError
from .triton_utils import (TRITON_AVAILABLE, jit, load_tile, on_device, pick_config, require_triton, tl,
                           triton)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_ROWS = 16  # the smallest M of a tensor-core dot: a KV group's query rows are padded to it
MAX_TILE = 4096  # rows * BLOCK_D of the 16-bit accumulator: more spills registers (AOT-tested)
FP32_ROWS = 4  # fp32 query rows per program: their (rows, BLOCK_N, BLOCK_D) products stay in registers
MIN_SPLIT_BLOCKS = 4  # a split streams at least this many BLOCK_N tiles (else the combine dominates)
MAX_SPLITS = 128
SPLIT_TILE = 16  # splits combined per step in phase 2
WAVES = 2  # phase 1 aims at >= this many programs per SM
INTERPRETER_SMS = 4  # no SMs under the interpreter: a nominal count keeps the program count small

# Phase-1 configs per family (see _family); the first of each is used where nothing is timed.
# One pipeline stage holds a K and a V tile, 2 * BLOCK_N * BLOCK_D * element bytes (32 KiB for
# 64 keys of bf16 D=128): 2-4 stages keep 64-128 KiB in flight per SM, what it takes to approach
# HBM bandwidth, within the shared memory of sm_80 and sm_90 (AOT-tested). fp32 multiplies on
# the CUDA cores (see _attend), with 8 warps so that its 3-D products fit the registers; its
# loads are not staged through shared memory (Triton pipelines the operands of dots), and one
# config serves: fp32 decoding is for accuracy, not speed.
DECODE_CONFIGS = {
    "16bit-d128": (dict(BLOCK_N=64, num_warps=4, num_stages=3),
                   dict(BLOCK_N=128, num_warps=4, num_stages=3),
                   dict(BLOCK_N=64, num_warps=4, num_stages=4)),
    "16bit-d256": (dict(BLOCK_N=32, num_warps=4, num_stages=3),
                   dict(BLOCK_N=64, num_warps=4, num_stages=3),
                   dict(BLOCK_N=64, num_warps=8, num_stages=2)),
    "fp32": (dict(BLOCK_N=32, num_warps=8, num_stages=1),),
}
LOG2E = 1.4426950408889634


def _family(d: int, dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit-d128" if d <= 128 else "16bit-d256"


# -- kernels -----------------------------------------------------------------------------------

@jit
def _attend(q, k_ptrs, v_ptrs, n_ok, d_ok, acc, m_i, l_i, qk_scale,
            MASK_N: tl.constexpr, MASK_D: tl.constexpr, FP32: tl.constexpr):
    """One BLOCK_N tile of keys: the online-softmax update of (acc, m_i, l_i)."""
    k = load_tile(k_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    v = load_tile(v_ptrs, n_ok, d_ok, MASK_N, MASK_D)
    if FP32:
        # Reduction trees, not tl.dot: an fp32 dot (even "ieee") accumulates D products one
        # after another, and its score errors measured 1.3x (up to 4.6x) those of torch's CPU
        # attention; a tree sum is ~2x more accurate than torch. The kernel is bandwidth-bound.
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
    if FP32:  # natural units, as torch: the rounding of s - m is exact near the max
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
    else:  # base 2, scale * log2(e) folded into qk_scale: one multiply fewer per score
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        # P in the input dtype, as flash attention: the tensor cores take 16-bit operands.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, lse_ptr, seq_len, S_max, num_splits,
                         num_kv_heads, qk_scale, stride_qb, stride_qh, stride_kb, stride_kh,
                         stride_ks, stride_vb, stride_vh, stride_vs, GROUP: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                         BLOCK_D: tl.constexpr, HAS_LENS: tl.constexpr, SINGLE: tl.constexpr,
                         FP32: tl.constexpr):
    row_tiles = (GROUP + BLOCK_G - 1) // BLOCK_G  # 1 but for big groups
    split, pid = tl.program_id(0), tl.program_id(1)
    b, kv, tile = pid // (num_kv_heads * row_tiles), pid // row_tiles % num_kv_heads, pid % row_tiles
    if HAS_LENS:  # clamped, never trusted: a CUDA lengths tensor is not checked on the host
        n_keys = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), S_max)
    else:
        n_keys = seq_len
    # This sequence's chunk: a whole number of tiles, from its own length.
    chunk = tl.cdiv(tl.cdiv(n_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.maximum(tl.minimum(lo + chunk, n_keys), lo)
    hi_full = lo + (hi - lo) // BLOCK_N * BLOCK_N

    offs_g, offs_n, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    g_ok, d_ok = tile * BLOCK_G + offs_g < GROUP, offs_d < HEAD_D
    heads = kv * GROUP + tile * BLOCK_G + offs_g
    b64, kv64, lo64 = b.to(tl.int64), kv.to(tl.int64), lo.to(tl.int64)  # caches can pass 2**31
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = (k_ptr + (b64 * stride_kb + kv64 * stride_kh + lo64 * stride_ks)
              + offs_n[:, None] * stride_ks + offs_d[None, :])
    v_ptrs = (v_ptr + (b64 * stride_vb + kv64 * stride_vh + lo64 * stride_vs)
              + offs_n[:, None] * stride_vs + offs_d[None, :])
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    for start in range(lo, hi_full, BLOCK_N):
        acc, m_i, l_i = _attend(q, k_ptrs, v_ptrs, offs_n, d_ok, acc, m_i, l_i, qk_scale,
                                False, HEAD_D < BLOCK_D, FP32)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    if hi_full < hi:  # the sequence's last, partial tile
        acc, m_i, l_i = _attend(q, k_ptrs, v_ptrs, offs_n < hi - hi_full, d_ok, acc, m_i, l_i,
                                qk_scale, True, HEAD_D < BLOCK_D, FP32)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # an empty chunk: acc is 0
    rows = (b64 * num_kv_heads * GROUP + heads) * num_splits + split
    tl.store(o_ptr + rows[:, None] * HEAD_D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])
    if not SINGLE:  # log-sum-exp in the units of s: natural for fp32, base 2 otherwise
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        if FP32:
            lse = m_i + tl.log(l_safe)
        else:
            lse = m_i + tl.log2(l_safe)
        tl.store(lse_ptr + rows, tl.where(l_i > 0.0, lse, float("-inf")), mask=g_ok)


@jit
def _weight(lse, m, NATURAL: tl.constexpr):
    if NATURAL:
        w = tl.exp(lse - m)
    else:
        w = tl.exp2(lse - m)
    return w


@jit
def _decode_combine_kernel(o_ws_ptr, lse_ptr, out_ptr, num_splits, HEAD_D: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                           SPLIT_TILE: tl.constexpr, NATURAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=offs_s < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    denom = tl.sum(_weight(lse, m, NATURAL), 0)
    inv = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    offs_t, d_ok = tl.arange(0, SPLIT_TILE), offs_d < HEAD_D
    for s0 in range(0, num_splits, SPLIT_TILE):
        s_ok = s0 + offs_t < num_splits
        w = _weight(tl.load(lse_ptr + row * num_splits + s0 + offs_t, mask=s_ok,
                            other=float("-inf")), m, NATURAL)
        o = tl.load(o_ws_ptr + (row * num_splits + s0 + offs_t)[:, None] * HEAD_D + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    tl.store(out_ptr + row * HEAD_D + offs_d, (acc * inv).to(out_ptr.dtype.element_ty), mask=d_ok)


# -- validation --------------------------------------------------------------------------------

def _check(q, k_cache, v_cache, cache_lens, scale):
    """(q as (B, H, D), lengths: int or integer tensor (B,), scale), or InvalidOptionError."""
    if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] != 1):
        raise InvalidOptionError(f"q must be (B, H, D) or (B, H, 1, D), one new token per sequence;"
                                 f" got {tuple(q.shape)}. Use kernels.attention for longer queries.")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise InvalidOptionError(f"k_cache and v_cache must both be (B, Hkv, S_max, D); got "
                                 f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    (b, h, d), (bk, hkv, _, dk) = (q.shape[0], q.shape[1], q.shape[-1]), k_cache.shape
    if b != bk or d != dk or hkv == 0 or h % hkv:
        raise InvalidOptionError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}:"
                                 " batch and head dim must match and H must be a multiple of Hkv")
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise InvalidOptionError(f"q, k_cache and v_cache must share one of {DTYPES}; got {q.dtype}, "
                                 f"{k_cache.dtype}, {v_cache.dtype}. Cast them to one dtype.")
    if not (q.device == k_cache.device == v_cache.device):
        raise InvalidOptionError(f"q, k_cache and v_cache are on {q.device}, {k_cache.device}, "
                                 f"{v_cache.device}; move them to one device")
    return q.reshape(b, h, d), _check_lens(cache_lens, b, k_cache), (
        1.0 / math.sqrt(d) if scale is None else float(scale))


def _check_lens(cache_lens, batch, k_cache):
    s_max = k_cache.shape[2]
    if isinstance(cache_lens, torch.Tensor):
        if cache_lens.dtype.is_floating_point or cache_lens.dtype.is_complex or \
                cache_lens.dtype == torch.bool or cache_lens.shape != (batch,):
            raise InvalidOptionError(f"cache_lens must be an integer tensor of shape ({batch},); got "
                                     f"{cache_lens.dtype} {tuple(cache_lens.shape)}")
        if cache_lens.device != k_cache.device:
            raise InvalidOptionError(f"cache_lens is on {cache_lens.device} but the cache on "
                                     f"{k_cache.device}; move it with .to({str(k_cache.device)!r})")
        if cache_lens.device.type != "cpu" or not batch:  # no GPU sync: the kernel clamps
            return cache_lens
        low, high = int(cache_lens.min()), int(cache_lens.max())
    elif isinstance(cache_lens, numbers.Integral) and not isinstance(cache_lens, bool):
        cache_lens = low = high = int(cache_lens)
    else:
        raise InvalidOptionError(f"cache_lens must be an int or an integer tensor; got "
                                 f"{type(cache_lens).__name__}")
    if low < 0 or high > s_max:
        raise InvalidOptionError(f"cache lengths must lie in [0, {s_max}] (the cache holds S_max = "
                                 f"{s_max} positions); got {low}..{high}")
    return cache_lens


# -- references and the torch path -------------------------------------------------------------

def _length_mask(lens, s, device):
    """(B, S) bool, True for the keys each sequence attends."""
    lens = torch.as_tensor(lens, device=device).reshape(-1, 1)
    return torch.arange(s, device=device) < lens


def decode_attention_ref(q, k_cache, v_cache, cache_lens, *, scale=None) -> torch.Tensor:
    """Reference in float64 (returned as float64, q's shape): for the tests."""
    q3, lens, scale = _check(q, k_cache, v_cache, cache_lens, scale)
    b, h, d = q3.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    k, v = (t.to(torch.float64).repeat_interleave(h // hkv, dim=1) for t in (k_cache, v_cache))
    scores = torch.einsum("bhd,bhsd->bhs", q3.to(torch.float64), k) * scale
    keep = _length_mask(lens, s, q.device)[:, None, :].expand(b, h, s)
    p = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)  # n_b == 0: zeros
    return torch.einsum("bhs,bhsd->bhd", p, v).reshape(q.shape)


def decode_attention_torch(q, k_cache, v_cache, cache_lens, *, scale=None) -> torch.Tensor:
    """The torch path: grouped matmuls (GQA without repeating the cache) and a length mask.

    Lengths known on the host trim the cache to the longest one; the mask is built only when
    they differ (the common case, every length equal, needs none). 16-bit inputs on the CPU are
    computed in fp32, as torch's own CPU attention does: a 16-bit CPU matmul would round every
    score. On the GPU the matmuls stay in the input dtype (with fp32 accumulation).
    """
    q3, lens, scale = _check(q, k_cache, v_cache, cache_lens, scale)
    b, h, d = q3.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    mask = None
    if isinstance(lens, int) or lens.device.type == "cpu":
        longest = lens if isinstance(lens, int) else int(lens.max()) if b else 0
        k_cache, v_cache, s = k_cache[:, :, :longest], v_cache[:, :, :longest], longest
        if not isinstance(lens, int) and bool((lens != longest).any()):
            mask = _length_mask(lens, s, q.device)
    else:
        mask = _length_mask(lens, s, q.device)
    if s == 0:
        return torch.zeros_like(q)
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    qg = q3.reshape(b, hkv, h // hkv, d).to(work)
    scores = torch.matmul(qg, k_cache.to(work).transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    p = scores.softmax(-1, dtype=torch.float32).to(work)
    out = torch.matmul(p, v_cache.to(work)).reshape(b, h, d)
    if mask is not None:  # an empty sequence's softmax is 0/0
        out = out.masked_fill(~mask[:, :1, None], 0.0)
    return out.to(q.dtype).reshape(q.shape)


# -- launchers ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    cuda = device.type == "cuda"
    return torch.cuda.get_device_properties(device).multi_processor_count if cuda else INTERPRETER_SMS


def choose_num_splits(programs: int, keys: int, block_n: int, sms: int) -> int:
    """Splits per sequence: enough programs (`programs` of them per split, B * Hkv for 16-bit)
    for WAVES waves over `sms` SMs, but every split at least MIN_SPLIT_BLOCKS tiles of `keys`
    long (so 1 split for short caches), and at most MAX_SPLITS."""
    wanted = -(-WAVES * sms // max(programs, 1))
    most = keys // (MIN_SPLIT_BLOCKS * block_n)
    return max(1, min(wanted, most, MAX_SPLITS))


def _rows_per_program(group: int, block_d: int, fp32: bool) -> int:
    """BLOCK_G: a 16-bit group's rows padded to a tensor-core tile, fp32 rows FP32_ROWS at a
    time. Bigger groups (MQA with many heads) take several programs, each reading the KV."""
    rows = triton.next_power_of_2(group)
    if fp32:
        return min(rows, FP32_ROWS)
    return min(max(rows, MIN_ROWS), max(MIN_ROWS, MAX_TILE // block_d))


def _decode_calls(q3, k_cache, v_cache, lens, scale, out, cfg, num_splits=None):
    """[(kernel, grid, args, kwargs)] of one decode launch: phase 1, and phase 2 when split.

    Data, so that the AOT tests compile exactly what the launcher runs. `lens` is an int
    (every sequence) or an integer tensor (B,).
    """
    (b, h, d), (_, hkv, s_max, _) = q3.shape, k_cache.shape
    group, block_n, fp32 = h // hkv, cfg["BLOCK_N"], q3.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(d))
    block_g = _rows_per_program(group, block_d, fp32)
    programs = b * hkv * triton.cdiv(group, block_g)
    if num_splits is None:
        keys = lens if isinstance(lens, int) else s_max
        num_splits = choose_num_splits(programs, keys, block_n, _sm_count(q3.device))
    single = num_splits == 1
    if single:
        o_ws, lse = out, out  # phase 1 writes the output; lse unused
    else:
        o_ws = torch.empty((b * h, num_splits, d), dtype=torch.float32, device=q3.device)
        lse = torch.empty((b * h, num_splits), dtype=torch.float32, device=q3.device)
    has_lens = isinstance(lens, torch.Tensor)
    args = (q3, k_cache, v_cache, lens if has_lens else q3, o_ws, lse, 0 if has_lens else lens,
            s_max, num_splits, hkv, scale if fp32 else scale * LOG2E, q3.stride(0), q3.stride(1),
            *k_cache.stride()[:3], *v_cache.stride()[:3])
    kwargs = dict(GROUP=group, BLOCK_G=block_g, BLOCK_N=block_n, HEAD_D=d, BLOCK_D=block_d,
                  HAS_LENS=has_lens, SINGLE=single, FP32=fp32, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    calls = [(_decode_split_kernel, (num_splits, programs), args, kwargs)]
    if not single:
        calls.append((_decode_combine_kernel, (b * h,), (o_ws, lse, out, num_splits),
                      dict(HEAD_D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
                           SPLIT_TILE=SPLIT_TILE, NATURAL=fp32, num_warps=4, num_stages=2)))
    return calls


def _launch(*call_args, **call_kwargs):
    for kernel, grid, args, kwargs in _decode_calls(*call_args, **call_kwargs):
        kernel[grid](*args, **kwargs)


def decode_attention_triton(q, k_cache, v_cache, cache_lens, *, scale=None, num_splits=None,
                            config: dict | None = None) -> torch.Tensor:
    """`decode_attention` in two Triton kernels (split-KV, see the module docstring).

    `num_splits` (splits per sequence) and `config` (one of DECODE_CONFIGS) force what is
    otherwise chosen from the SM count and timed once per shape on the GPU.
    """
    require_triton("decode_attention_triton", TRITON_AVAILABLE)
    q3, lens, scale = _check(q, k_cache, v_cache, cache_lens, scale)
    d = q3.shape[-1]
    if d > MAX_HEAD_DIM:
        raise InvalidOptionError(f"head dim {d} > {MAX_HEAD_DIM} does not fit the kernel's tiles; "
                                 "call decode_attention (it falls back) or decode_attention_torch")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise InvalidOptionError("the caches' last dim must be contiguous (stride 1); pass "
                                 ".contiguous() caches or call decode_attention_torch")
    if num_splits is not None and not 1 <= int(num_splits) <= MAX_SPLITS:
        raise InvalidOptionError(f"num_splits must lie in [1, {MAX_SPLITS}]; got {num_splits}")
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out.reshape(q.shape)
    key = ("decode", *q3.shape, *k_cache.shape[1:2], q.dtype, str(q.device),
           triton.next_power_of_2(lens if isinstance(lens, int) else k_cache.shape[2]))
    run = lambda cfg: _launch(q3, k_cache, v_cache, lens, scale, out, cfg, num_splits)  # noqa: E731
    with on_device(q, _decode_split_kernel):
        run(config or pick_config(key, DECODE_CONFIGS[_family(d, q.dtype)], run, q.device))
    return out.reshape(q.shape)


def _triton_runs(q, k_cache) -> bool:
    return (TRITON_AVAILABLE and q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM
            and k_cache.dim() == 4 and k_cache.stride(-1) == 1)


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None) -> torch.Tensor:
    """Attention of one new query token per sequence against a KV cache.

    q (B, H, D) or (B, H, 1, D); k_cache, v_cache (B, Hkv, S_max, D) in transformers' layout,
    any strides; H a multiple of Hkv (GQA, MQA). Sequence b attends keys 0 <= j < cache_lens[b],
    where cache_lens is an integer tensor (B,) on the cache's device or one int for all; a
    length of 0 gives zeros. Lengths are range-checked when given as an int or a CPU tensor; a
    CUDA tensor is not (that would synchronize every step): the kernel clamps it to [0, S_max].
    Returns q's shape and dtype. `scale` defaults to 1 / sqrt(D).

    Runs the split-KV Triton kernels on CUDA tensors where Triton is available (head dim <= 256,
    caches contiguous in their last dim); the torch path everywhere else.
    """
    if _triton_runs(q, k_cache) and v_cache.stride(-1) == 1:
        return decode_attention_triton(q, k_cache, v_cache, cache_lens, scale=scale)
    return decode_attention_torch(q, k_cache, v_cache, cache_lens, scale=scale)
