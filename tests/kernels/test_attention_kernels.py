"""Fused attention (kernels/attention.py): the Triton kernel, the torch path, the reference.

Without CUDA the kernel runs on CPU under the Triton interpreter (see triton_helpers), in fp32
and fp16; bf16 is checked on the GPU only (the interpreter's bf16 is wrong). The AOT tests
compile every configuration for A100 (sm_80) and H100 (sm_90) without a GPU.

Accuracy rule: the kernel's largest error against the float64 reference must be at most twice
that of the same-dtype torch op (SDPA on the same device, with the same mask), measured on the
same inputs.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (AOT_ARCHS, DEVICE, KERNELS_RUN_HERE, SMEM_BYTES, TRITON, AccuracyRule,
                            aot_compile, aot_spec, assert_works_without_triton, gpu, needs_cuda,
                            ptx_lines, ptx_loops, run_file_in_fresh_process, runs_kernels, uses_mma,
                            uses_wgmma)
# isort: on
import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hetero_llm.errors import InvalidOptionError
from hetero_llm.kernels.attention import (ATTENTION_CONFIGS, attention, attention_ref,
                                          attention_torch, causal_keep)

A = importlib.import_module("hetero_llm.kernels.attention")  # the package exports the function
CPU_DTYPES = (torch.float32, torch.float16)  # what the interpreter computes correctly


def gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(b, h, hkv, sq, sk, d, dtype, seed=0, device=DEVICE):
    g = gen(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n, s in ((h, sq), (hkv, sk), (hkv, sk)))
    return [t.to(dtype).to(device) for t in (q, k, v)]


def assert_accurate(got, q, k, v, **kw):
    """The accuracy rule; returns (kernel error, torch error) for the record."""
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    # Where SDPA happens to be exact (one visible key, or outputs that round exactly), the
    # kernel's different summation order may still cost one rounding of the output: allow that.
    rule = AccuracyRule(q.dtype, floor_ulps=1.0)
    rule.add(got, attention_torch(q, k, v, **kw), attention_ref(q, k, v, **kw)).check()
    return rule.ours, rule.torch


def make_mask(kind, b, h, sq, sk, dtype, seed=0):
    """Masks as models hand them over; returns (mask, causal to combine with it)."""
    g, neg = gen(seed), torch.finfo(dtype).min
    pads = torch.arange(b)[:, None] * 5  # batch row i has 5*i padded keys
    keys = torch.arange(sk)[None, :]
    if kind == "left-bool":  # (B, 1, 1, Sk), combined with causal: early rows see nothing
        return (keys >= pads)[:, None, None, :], True
    if kind == "right-additive":  # (B, 1, 1, Sk), transformers' finfo.min
        m = torch.zeros(b, sk).masked_fill(keys >= sk - pads, neg)
        return m[:, None, None, :].to(dtype), True
    if kind == "hf-4d":  # (B, 1, Sq, Sk): causal and left padding folded in, causal=False
        keep = causal_keep(sq, sk)[None] & (keys >= pads)[:, None, :]
        return torch.zeros(b, 1, sq, sk).masked_fill(~keep[:, None], neg).to(dtype), False
    if kind == "neg-inf-rows":  # (B, H, Sq, Sk) bias with -inf, some rows entirely -inf
        m = torch.randn(b, h, sq, sk, generator=g)
        m = m.masked_fill(torch.rand(b, h, sq, sk, generator=g) < 0.3, float("-inf"))
        m[:, :, ::4] = float("-inf")
        return m.to(dtype), False
    if kind == "bool-2d":  # (Sq, Sk): random, every third row fully masked
        keep = torch.rand(sq, sk, generator=g) < 0.5
        keep[::3] = False
        return keep, True
    raise ValueError(kind)


def no_key_rows(mask, causal, b, h, sq, sk, dtype):
    keep = causal_keep(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
    if mask is not None:
        keep = keep & A._mask_keep(mask.cpu(), dtype)
    return ~keep.expand(b, h, sq, sk).any(-1)


# -- the kernel, under the interpreter (or on the GPU) ----------------------------------------

# (B, H, Hkv, Sq, Sk, D, causal): every head_dim, GQA/MQA/MHA, Sq == Sk and Sq < Sk and Sq > Sk,
# partial tiles everywhere, two long key ranges with a small B*H.
SHAPES = {
    "decode-mqa": (2, 4, 1, 1, 97, 64, True),
    "one-key": (1, 2, 2, 1, 1, 80, True),
    "gqa-17": (2, 4, 2, 17, 17, 80, True),
    "mha-97-d96": (1, 2, 2, 97, 97, 96, True),
    "noncausal-d128": (1, 2, 2, 97, 97, 128, False),
    "chunk-d256": (1, 4, 2, 17, 97, 256, True),
    "sq-gt-sk": (1, 2, 1, 97, 17, 64, True),
    "long-1023": (1, 1, 1, 17, 1023, 128, True),
    "long-1025": (1, 2, 1, 17, 1025, 64, False),
}


@runs_kernels
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernel_matches_reference(name, dtype):
    b, h, hkv, sq, sk, d, causal = SHAPES[name]
    q, k, v = qkv(b, h, hkv, sq, sk, d, dtype, seed=sq + sk + d)
    got = A.attention_triton(q, k, v, causal=causal)
    assert_accurate(got, q, k, v, causal=causal)
    if causal and sq > sk:  # the first Sq - Sk rows see no key
        assert torch.equal(got[:, :, :sq - sk].cpu(), torch.zeros_like(got[:, :, :sq - sk].cpu()))


MASKS = {  # kind: (B, H, Hkv, Sq, Sk, D)
    "left-bool": (3, 2, 1, 17, 17, 64),
    "right-additive": (2, 4, 2, 17, 97, 80),
    "hf-4d": (3, 2, 2, 17, 20, 128),
    "neg-inf-rows": (1, 2, 1, 17, 33, 64),
    "bool-2d": (1, 4, 4, 17, 17, 96),
}


@runs_kernels
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernel_masks_and_rows_that_see_nothing(kind, dtype):
    b, h, hkv, sq, sk, d = MASKS[kind]
    q, k, v = qkv(b, h, hkv, sq, sk, d, dtype, seed=len(kind))
    mask, causal = make_mask(kind, b, h, sq, sk, dtype)
    got = A.attention_triton(q, k, v, causal=causal, attn_mask=mask.to(DEVICE))
    assert_accurate(got, q, k, v, causal=causal, attn_mask=mask.to(DEVICE))
    empty = no_key_rows(mask, causal, b, h, sq, sk, dtype)
    assert empty.any() or kind == "right-additive"
    assert (got.cpu()[empty] == 0).all()  # exactly 0, never NaN


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernel_strided_inputs_and_scale(dtype):
    """transformers' (B, S, H, D).transpose(1, 2) views, a k whose head_dim is not unit-stride,
    and a custom scale; the output keeps q's layout."""
    b, h, hkv, sq, sk, d = 2, 4, 2, 17, 33, 64
    g = gen(1)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, hkv, d, sk, generator=g).to(dtype).to(DEVICE).transpose(2, 3)
    v = torch.randn(b, sk, hkv, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(-1) != 1 and not v.is_contiguous()
    got = A.attention_triton(q, k, v, causal=True, scale=0.3)
    assert got.stride() == q.stride()
    assert_accurate(got, q, k, v, causal=True, scale=0.3)


CONFIGS = {f"{bits}-{d}-{i}": (bits, d, cfg) for (bits, d), cfgs in ATTENTION_CONFIGS.items()
           for i, cfg in enumerate(cfgs)}


@runs_kernels
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config(name):
    """Each launch configuration, forced: partial row and key tiles, causal straddling, a mask."""
    bits, d, cfg = CONFIGS[name]
    dtype = torch.float32 if bits == 32 else torch.float16
    sq, sk = cfg["BLOCK_M"] + 5, 2 * cfg["BLOCK_N"] + cfg["BLOCK_M"] + 7
    q, k, v = qkv(1, 2, 1, sq, sk, d, dtype, seed=bits + d)
    mask = (torch.arange(sk) % 7 != 3).to(DEVICE)  # (Sk,): broadcast over everything else
    got = A.attention_triton(q, k, v, causal=True, attn_mask=mask, config=cfg)
    assert_accurate(got, q, k, v, causal=True, attn_mask=mask)


def test_default_configs_and_dispatch():
    """The first config of each bucket is taken untimed; head_dims map to their buckets."""
    keys = [A.config_key(dt, d) for dt, d in ((torch.bfloat16, 80), (torch.float16, 64),
                                              (torch.float16, 256), (torch.float32, 64))]
    assert keys == [(16, 128), (16, 64), (16, 256), (32, 256)]
    q, k, v = qkv(1, 2, 1, 5, 9, 64, torch.float32)
    out = attention(q, k, v)
    if not q.is_cuda:  # CPU tensors take the torch path even where the interpreter could run
        assert torch.equal(out, attention_torch(q, k, v))


# -- the torch path (CPU tensors) and the reference --------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 17, 17, 64), (1, 4, 1, 5, 23, 80),
                                   (1, 2, 2, 9, 4, 96)])
@pytest.mark.parametrize("kind", [None, "left-bool", "hf-4d"])
def test_torch_path_matches_reference(dtype, shape, kind):
    b, h, hkv, sq, sk, d = shape
    q, k, v = qkv(b, h, hkv, sq, sk, d, dtype, seed=sk, device="cpu")
    mask, causal = make_mask(kind, b, h, sq, sk, dtype) if kind else (None, True)
    got = attention(q, k, v, causal=causal, attn_mask=mask)
    ref = attention_ref(q, k, v, causal=causal, attn_mask=mask)
    ref_in_dtype = attention_ref(q, k, v, causal=causal, attn_mask=mask,
                                 compute_dtype=torch.float32)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ref_in_dtype.double(), ref, atol=1e-5, rtol=1e-5)
    empty = no_key_rows(mask, causal, b, h, sq, sk, dtype)
    assert (got[empty] == 0).all() and (ref[empty] == 0).all()


def test_reference_semantics():
    """Bottom-right causal, GQA head mapping, finfo.min as masked: checked against plain loops."""
    q, k, v = qkv(1, 4, 2, 3, 5, 8, torch.float32, device="cpu")
    out = attention_ref(q, k, v, causal=True)
    q, k, v = q.double(), k.double(), v.double()
    for h in range(4):
        for i in range(3):
            s = (q[0, h, i] @ k[0, h // 2, : i + 3].T) * 8 ** -0.5  # query i sees keys <= i + 2
            torch.testing.assert_close(out[0, h, i], torch.softmax(s, -1) @ v[0, h // 2, : i + 3])
    q, k, v = q.float(), k.float(), v.float()
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.float32)
    mask[..., :3] = torch.finfo(torch.float32).min
    out = attention_ref(q, k, v, causal=True, attn_mask=mask)
    assert (out[0, :, 0] == 0).all() and (out[0, :, 1:] != 0).all()  # row 0 sees keys 0..2 only


def test_torch_path_needs_no_sdpa_causal_alignment():
    """SDPA's is_causal is top-left aligned; the torch path must not use it when Sq != Sk."""
    q, k, v = qkv(1, 2, 2, 4, 10, 16, torch.float32, device="cpu")
    got = attention(q, k, v, causal=True)
    torch.testing.assert_close(got.double(), attention_ref(q, k, v, causal=True))
    assert torch.isfinite(attention(*qkv(1, 1, 1, 6, 2, 16, torch.float32, device="cpu"))).all()


def test_torch_path_takes_large_head_dims():
    q, k, v = qkv(1, 2, 1, 3, 5, 320, torch.float32, device="cpu")
    torch.testing.assert_close(attention(q, k, v).double(), attention_ref(q, k, v), atol=1e-5,
                               rtol=0)


def _bad(**change):
    q, k, v = (torch.zeros(2, 4, 8, 64), torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64))
    args = dict(q=q, k=k, v=v, attn_mask=None, scale=None)
    args.update(change)
    return args


BAD = {
    "q 3-D": _bad(q=torch.zeros(4, 8, 64)),
    "k not a tensor": _bad(k=[1, 2]),
    "dtype mismatch": _bad(k=torch.zeros(2, 2, 8, 64, dtype=torch.float16)),
    "float64": _bad(q=torch.zeros(2, 4, 8, 64, dtype=torch.float64),
                    k=torch.zeros(2, 2, 8, 64, dtype=torch.float64),
                    v=torch.zeros(2, 2, 8, 64, dtype=torch.float64)),
    "batch mismatch": _bad(k=torch.zeros(1, 2, 8, 64), v=torch.zeros(1, 2, 8, 64)),
    "head_dim mismatch": _bad(v=torch.zeros(2, 2, 8, 32)),
    "Sk of k != Sk of v": _bad(v=torch.zeros(2, 2, 9, 64)),
    "heads not a multiple": _bad(k=torch.zeros(2, 3, 8, 64), v=torch.zeros(2, 3, 8, 64)),
    "mask not broadcastable": _bad(attn_mask=torch.ones(2, 1, 8, 7, dtype=torch.bool)),
    "mask 5-D": _bad(attn_mask=torch.ones(1, 2, 1, 8, 8, dtype=torch.bool)),
    "mask int": _bad(attn_mask=torch.ones(2, 1, 8, 8, dtype=torch.int64)),
    "scale nan": _bad(scale=float("nan")),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_refused(case):
    args = BAD[case]
    for fn in (attention, attention_ref):
        with pytest.raises(InvalidOptionError, match="attention"):
            fn(args["q"], args["k"], args["v"], attn_mask=args["attn_mask"], scale=args["scale"])


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_kernel_refuses_large_head_dims():
    q = torch.zeros(1, 1, 4, 320)
    with pytest.raises(InvalidOptionError, match="head_dim 320"):
        A.attention_triton(q, q, q)


def test_imports_and_torch_path_work_without_triton():
    assert_works_without_triton(
        "import importlib; A = importlib.import_module('hetero_llm.kernels.attention')\n"
        "assert not A.TRITON_AVAILABLE\n"
        "q = torch.randn(1, 2, 3, 64, generator=torch.Generator().manual_seed(0))\n"
        # fp32 against the float64 reference: fp32's tolerances, not float64's
        "torch.testing.assert_close(A.attention(q, q, q).double(), A.attention_ref(q, q, q),\n"
        "                           atol=1e-5, rtol=1e-5)\n",
        "A.attention_triton(q, q, q)")


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for A100 and H100 (no GPU needed) ------------------------------

def _spec(cfg, dtype, d, arch, causal=True, mask=None):
    """The launcher's call for a long prefill: (B, S, H, D) views, GQA 32/8, 4096 tokens."""
    b, h, hkv, s, meta = 2, 32, 8, 4096, dict(device="meta")
    q = torch.empty(b, s, h, d, dtype=dtype, **meta).transpose(1, 2)
    k, v = (torch.empty(b, s, hkv, d, dtype=dtype, **meta).transpose(1, 2) for _ in "kv")
    m = {None: None, "bool": torch.empty(b, 1, 1, s, dtype=torch.bool, **meta),
         "float": torch.empty(b, 1, s, s, dtype=dtype, **meta)}[mask]
    return aot_spec("attention", A._attention_call(q, k, v, m, torch.empty_like(q), 0.088, causal,
                                                   cfg), arch)


# A 16-bit (B, 1, Sq, Sk) mask is the most shared memory any launch takes (its tiles are
# pipelined beside K and V), so every config is compiled with one, for both archs. Then the hot
# path (causal, no mask: wgmma, pipelining, no register spills) and the other constexpr
# variants (non-causal, bool mask, head_dim 96 under a 128 tile) for the first configs. fp32
# (FMA dots, no wgmma) takes the same shared memory on both archs; its largest head_dim
# compiles for sm_80, whose limit is the lower.
AOT = {f"{n}-sm{arch}-float-mask": (cfg, torch.bfloat16, d, arch, True, "float")
       for n, (bits, d, cfg) in CONFIGS.items() if bits == 16 for arch in AOT_ARCHS}
FP32_CFG, (CFG_64, CFG_128, CFG_128B) = ATTENTION_CONFIGS[32, 256][0], (
    ATTENTION_CONFIGS[16, 64][0], ATTENTION_CONFIGS[16, 128][0], ATTENTION_CONFIGS[16, 128][1])
AOT["32-256-0-sm80-float-mask"] = (FP32_CFG, torch.float32, 256, 80, True, "float")
AOT["32-256-0-sm90-d128-causal"] = (FP32_CFG, torch.float32, 128, 90, True, None)
HOT = {"16-128-0-sm90-fp16-causal": (CFG_128, torch.float16, 128, 90, True, None),
       "16-64-0-sm90-bf16-causal": (CFG_64, torch.bfloat16, 64, 90, True, None),
       "16-128-1-sm80-bf16-noncausal": (CFG_128B, torch.bfloat16, 128, 80, False, None)}
AOT.update(HOT)
AOT["16-128-0-sm90-fp16-d96-bool-mask"] = (CFG_128, torch.float16, 96, 90, True, "bool")


_AOT_JOBS: list = []


def _compile_all():
    """Start compiling AOT in two child processes (ptxas is single-threaded): (names, futures)."""
    names = list(AOT)
    specs = [_spec(*AOT[n]) for n in names]
    pool = ThreadPoolExecutor(2)
    halves = [pool.submit(aot_compile, specs[i::2]) for i in range(2)]
    pool.shutdown(wait=False)
    return names[0::2] + names[1::2], halves


@pytest.fixture(scope="module", autouse=True)
def _aot_in_background(request):
    """Where AOT tests are selected, start their compiles (about 20 s of CPU with a cold Triton
    cache) before this file's first test, so the interpreter tests run meanwhile."""
    _AOT_JOBS.clear()
    items = request.session.items
    if TRITON and any("compiled" in getattr(item, "fixturenames", ()) for item in items):
        _AOT_JOBS.append(_compile_all())
    yield


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    names, halves = _AOT_JOBS[0] if _AOT_JOBS else _compile_all()
    return dict(zip(names, [r for h in halves for r in h.result()]))


@pytest.mark.parametrize("name", AOT)
def test_aot_fits_shared_memory_and_uses_tensor_cores(compiled, name):
    r, (_, dtype, _, arch, _, _) = compiled[name], AOT[name]
    spills = len(ptx_lines(r["sass"], "STL")) + len(ptx_lines(r["sass"], "LDL"))
    print(f"{name}: {r['shared'] // 1024} KiB shared (limit {SMEM_BYTES[arch] // 1024}), "
          f"{spills} spill instructions")
    assert 0 < r["shared"] <= SMEM_BYTES[arch], f"{name}: {r['shared']} bytes of shared memory"
    if dtype == torch.float32:  # IEEE fp32: FMA dots, never tf32 tensor cores
        assert not uses_mma(r["ptx"]) and not ptx_lines(r["ptx"], "tf32")
        assert ptx_lines(r["ptx"], "fma.rn.f32")
        return
    loops = ptx_loops(r["ptx"])
    assert any(ptx_lines("\n".join(body), "cp.async") for body in loops), "loads not pipelined"
    assert uses_mma(r["ptx"])
    if arch == 90:  # every 16-bit config has 64-row warpgroup tiles: both dots on wgmma
        assert uses_wgmma(r["ptx"]), name
    else:
        assert ptx_lines(r["ptx"], "mma.sync", "f32.bf16.bf16" if dtype == torch.bfloat16
                         else "f32.f16.f16")


@pytest.mark.parametrize("name", HOT)
def test_aot_hot_path_pipelined_without_spills(compiled, name):
    """Causal, no mask: no register spills (local memory traffic in SASS), pipelined loads."""
    r = compiled[name]
    if r["sass"]:
        spills = ptx_lines(r["sass"], "STL") + ptx_lines(r["sass"], "LDL")
        assert not spills, f"{name}: {len(spills)} spill instructions"
    assert any(ptx_lines("\n".join(body), "cp.async") for body in ptx_loops(r["ptx"]))


@pytest.mark.parametrize("name", [n for n in HOT if "sm90" in n])
def test_aot_report_wgmma_on_hopper(compiled, name):
    """Report how Hopper runs the two dots: q·kᵀ reads both operands from shared memory
    (descriptors), P·V takes P from registers; each is waited on before its result is used."""
    ptx = compiled[name]["ptx"]
    forms = sorted({ln.split()[0] + (" A=regs" if ln.count("{") > 1 else " A=smem")
                    for ln in ptx_lines(ptx, "wgmma.mma_async")})
    print(f"{name}: {forms}; wait_group: {len(ptx_lines(ptx, 'wgmma.wait_group'))}")
    assert any("A=smem" in f for f in forms) and any("A=regs" in f for f in forms), forms


# -- on a GPU: bf16, fp16 and long sequences --------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 8, 8, 4096, 4096, 128), (2, 8, 2, 1025, 1025, 64),
                                   (1, 4, 1, 17, 4096, 256), (2, 8, 4, 4096, 4096, 80),
                                   (4, 8, 8, 1, 4096, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_matches_reference_and_sdpa(dtype, shape, causal):
    b, h, hkv, sq, sk, d = shape
    q, k, v = qkv(b, h, hkv, sq, sk, d, dtype, seed=sq + d, device="cuda")
    got = attention(q, k, v, causal=causal)
    assert_accurate(got, q, k, v, causal=causal)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_every_config_with_masks(kind, name):
    bits, d, cfg = CONFIGS[name]
    dtype = torch.float32 if bits == 32 else torch.bfloat16
    b, h, hkv, sq, sk, _ = MASKS[kind]
    q, k, v = qkv(b, h, hkv, sq, sk + 300, d, dtype, seed=3, device="cuda")
    mask, causal = make_mask(kind, b, h, sq, sk + 300, dtype)
    got = A.attention_triton(q, k, v, causal=causal, attn_mask=mask.cuda(), config=cfg)
    assert_accurate(got, q, k, v, causal=causal, attn_mask=mask.cuda())
    assert (got.cpu()[no_key_rows(mask, causal, b, h, sq, sk + 300, dtype)] == 0).all()
