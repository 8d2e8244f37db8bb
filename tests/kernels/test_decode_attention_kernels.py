"""Split-KV decode attention (decode_attention): Triton kernels and the torch path.

Without CUDA the kernels run on CPU under the Triton interpreter (see triton_helpers), in fp32
and fp16; bf16 runs only on the GPU. The accuracy rule, from the issue: the kernel's max abs
error against a float64 reference is at most twice that of torch's own attention
(F.scaled_dot_product_attention with a boolean length mask, GQA expanded) in the same dtype on
the same inputs. The AOT tests compile every config for sm_80 and sm_90 with no GPU.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (AOT_ARCHS, DEVICE, KERNELS_RUN_HERE, SMEM_BYTES, TRITON, aot_compile,
                            aot_spec, assert_works_without_triton, gpu, needs_cuda, ptx_loops,
                            run_file_in_fresh_process, runs_kernels, uses_mma, uses_wgmma)
# isort: on
import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from hetero_llm.errors import InvalidOptionError
from hetero_llm.kernels.decode_attention import (DECODE_CONFIGS, decode_attention, decode_attention_ref,
                                                 decode_attention_torch)

DA = importlib.import_module("hetero_llm.kernels.decode_attention")  # the package's name is the function

CPU_DTYPES = (torch.float32, torch.float16)
GROUPS = {"mha": 8, "gqa4": 2, "mqa": 1}  # Hkv for H = 8
CONFIGS = {f"{f}-{i}": (f, cfg) for f, cfgs in DECODE_CONFIGS.items() for i, cfg in enumerate(cfgs)}
MIXED = (0, 1, 17, 97, 1025)  # plus S_max: empty, one key, partial tiles, many tiles
# The torch path against the float64 reference (its own tolerance: it is not the kernel).
TORCH_TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
             torch.bfloat16: dict(atol=8e-3, rtol=8e-3)}


def make(b, h, hkv, s, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((b, h, d), (b, hkv, s, d), (b, hkv, s, d)))
    return [t.to(dtype).to(device) for t in (q, k, v)]


def sdpa_error(q, k, v, lens, ref, scale=None):
    """Max abs error of torch's attention in q's dtype on q's device (empty sequences, NaN in
    SDPA, left out)."""
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    hkv, s = k.shape[1], k.shape[2]
    lens_t = torch.as_tensor(lens, device=q.device).expand(b)
    keep = (torch.arange(s, device=q.device) < lens_t[:, None])[:, None, None, :]
    k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    got = F.scaled_dot_product_attention(q.reshape(b, h, 1, d), k, v, attn_mask=keep, scale=scale)
    filled = lens_t > 0
    return (got.reshape(ref.shape)[filled].double() - ref[filled]).abs().max().item() if filled.any() else 0.0


def check(got, q, k, v, lens, scale=None):
    """Shape, dtype, zeros for empty sequences, and the accuracy rule."""
    ref = decode_attention_ref(q, k, v, lens, scale=scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(got).all()
    empty = torch.as_tensor(lens, device=q.device).expand(q.shape[0]) == 0
    assert (got[empty] == 0).all()
    err = (got.double() - ref).abs().max().item()
    torch_err = sdpa_error(q, k, v, lens, ref, scale)
    # Where torch is exact (every sequence of 0 or 1 keys: the output is v) the rule would ask
    # for exactly 0; allow one unit in the last place of the largest output instead.
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item() if torch_err == 0 else 0.0
    assert err <= max(2 * torch_err, floor), f"error {err:.3g} vs torch's {torch_err:.3g}"


def run_kernel(q, k, v, lens, **kw):
    return DA.decode_attention_triton(q, k, v, lens, **kw)


# -- the kernels (interpreter on CPU, compiled on a GPU) --------------------------------------

@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", GROUPS)
def test_mixed_lengths_match_reference(dtype, layout):
    s_max = 1040  # not a multiple of any BLOCK_N
    q, k, v = make(len(MIXED) + 1, 8, GROUPS[layout], s_max, 64, dtype, device=DEVICE)
    lens = torch.tensor([*MIXED, s_max], device=DEVICE)
    check(run_kernel(q, k, v, lens), q, k, v, lens)  # num_splits chosen (2 for MQA here)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_every_head_dim(dtype, d):
    q, k, v = make(3, 8, 2, 150, d, dtype, seed=d, device=DEVICE)
    lens = torch.tensor([0, 9, 150], device=DEVICE)
    check(run_kernel(q, k, v, lens, num_splits=2), q, k, v, lens)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_num_splits_agree(dtype):
    q, k, v = make(4, 8, 2, 300, 64, dtype, seed=1, device=DEVICE)
    lens = torch.tensor([0, 1, 97, 300], device=DEVICE)
    outs = {n: run_kernel(q, k, v, lens, num_splits=n) for n in (1, 2, 3, 7)}
    for out in outs.values():
        check(out, q, k, v, lens)
    # The same result up to the combine's rounding: closer to each other than torch is to exact.
    torch_err = sdpa_error(q, k, v, lens, decode_attention_ref(q, k, v, lens))
    for out in outs.values():
        torch.testing.assert_close(out, outs[1], atol=torch_err, rtol=0)


@runs_kernels
@pytest.mark.parametrize("case", ["q4d", "static-slice", "transposed", "int-lens", "scale"])
def test_query_shapes_and_cache_layouts(case):
    dtype, s = torch.float16, 200
    q, k, v = make(2, 8, 2, s, 64, dtype, seed=2, device=DEVICE)
    lens, kw = torch.tensor([150, 37], device=DEVICE), {}
    if case == "q4d":
        q = q[:, :, None]
    elif case == "static-slice":  # the filled part of a longer static cache, and a batch slice
        big_k, big_v = make(3, 8, 2, 2 * s, 64, dtype, seed=3, device=DEVICE)[1:]
        k, v = big_k[1:, :, :s], big_v[1:, :, :s]
    elif case == "transposed":  # stored (B, S, Hkv, D): stride(-1) == 1, heads interleaved
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        assert not k.is_contiguous()
    elif case == "int-lens":
        lens = 123
    else:
        kw = dict(scale=0.3)
    got = run_kernel(q, k, v, lens, **kw)
    check(got, q, k, v, lens, **kw)


@runs_kernels
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config(name):
    family, cfg = CONFIGS[name]
    dtype = torch.float32 if family == "fp32" else torch.float16
    q, k, v = make(3, 8, 2, 150, 256 if family == "16bit-d256" else 128, dtype, seed=5, device=DEVICE)
    lens = torch.tensor([0, 5, 150], device=DEVICE)
    check(run_kernel(q, k, v, lens, num_splits=2, config=cfg), q, k, v, lens)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 256])
def test_many_query_heads_per_kv_head(dtype, d):
    """MQA with 64 query heads: several programs per KV head (fp32 always; 16-bit at D=256)."""
    q, k, v = make(2, 64, 1, 70, d, dtype, seed=4, device=DEVICE)
    lens = torch.tensor([70, 33], device=DEVICE)
    check(run_kernel(q, k, v, lens, num_splits=2), q, k, v, lens)


@runs_kernels
def test_device_lengths_are_clamped():
    """A lengths tensor on a GPU is not checked on the host; the kernel clamps it instead."""
    q, k, v = make(2, 4, 2, 80, 64, torch.float32, device=DEVICE)
    out = torch.empty_like(q)
    bad = torch.tensor([500, -3], device=DEVICE)
    DA._launch(q, k, v, bad, 0.125, out, DECODE_CONFIGS["fp32"][0], 2)
    clamped = torch.tensor([80, 0], device=DEVICE)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, clamped).float(),
                               atol=1e-5, rtol=1e-5)


def test_num_splits_fill_the_gpu():
    # Llama-3-8B at batch 1, 32k context, on an H100 (132 SMs): >= 2 waves of programs, each
    # chunk at least MIN_SPLIT_BLOCKS tiles.
    n = DA.choose_num_splits(8, 32768, 64, 132)
    assert 8 * n >= 2 * 132 and 32768 / n >= DA.MIN_SPLIT_BLOCKS * 64
    assert DA.choose_num_splits(8, 200, 64, 132) == 1  # short cache: one split
    assert DA.choose_num_splits(1, 10**6, 64, 132) == DA.MAX_SPLITS
    assert DA.choose_num_splits(32 * 8, 32768, 64, 132) == 2  # a big batch fills the GPU itself


# -- the torch path ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", GROUPS)
def test_torch_path_matches_reference(dtype, layout):
    s_max = 1040
    q, k, v = make(len(MIXED) + 1, 8, GROUPS[layout], s_max, 64, dtype)
    lens = torch.tensor([*MIXED, s_max])
    got = decode_attention_torch(q, k, v, lens)
    ref = decode_attention_ref(q, k, v, lens)
    assert got.dtype == dtype and got.shape == q.shape and (got[0] == 0).all()
    torch.testing.assert_close(got.double(), ref, **TORCH_TOL[dtype])
    # Every length equal: the unmasked fast path, for an int and for a tensor.
    for same in (97, torch.full((len(MIXED) + 1,), 97)):
        torch.testing.assert_close(decode_attention_torch(q, k, v, same).double(),
                                   decode_attention_ref(q, k, v, same), **TORCH_TOL[dtype])


def test_torch_path_empty_and_dispatch():
    q, k, v = make(2, 4, 2, 16, 32, torch.float32)
    assert (decode_attention_torch(q, k, v, 0) == 0).all()
    assert (decode_attention_torch(q, k, v, torch.tensor([0, 0])) == 0).all()
    assert (decode_attention(q[:, :, None], k, v, torch.tensor([0, 16]))[0] == 0).all()
    # On CPU tensors the public function is the torch path (the interpreter is for tests only).
    assert torch.equal(decode_attention(q, k, v, 7), decode_attention_torch(q, k, v, 7))
    assert decode_attention(q[:, :, None], k, v, 7, scale=0.5).shape == (2, 4, 1, 32)


def _bad_inputs():
    q, k, v = make(2, 8, 2, 16, 32, torch.float32)
    ok = torch.tensor([3, 16])
    return {
        "q-2d": (q[0], k, v, ok), "q-two-tokens": (q[:, :, None].expand(2, 8, 2, 32), k, v, ok),
        "kv-shapes": (q, k, v[:, :, :8], ok), "batch": (q[:1], k, v, ok),
        "head-dim": (q[..., :16], k, v, ok), "heads": (q[:, :7], k, v, ok),
        "dtype-mismatch": (q.half(), k, v, ok), "float64": (q.double(), k.double(), v.double(), ok),
        "lens-float": (q, k, v, ok.float()), "lens-bool": (q, k, v, ok > 0),
        "lens-shape": (q, k, v, ok[:1]), "lens-too-long": (q, k, v, torch.tensor([3, 17])),
        "lens-negative": (q, k, v, torch.tensor([-1, 3])), "int-too-long": (q, k, v, 17),
        "int-negative": (q, k, v, -1), "lens-bool-int": (q, k, v, True),
        "lens-other-device": (q, k, v, ok.to("meta")), "lens-list": (q, k, v, [3, 16]),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise(case):
    args = _bad_inputs()[case]
    for fn in (decode_attention, decode_attention_torch, decode_attention_ref):
        with pytest.raises(InvalidOptionError):
            fn(*args)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_kernel_limits_raise():
    q, k, v = make(1, 2, 1, 8, 288, torch.float16)
    with pytest.raises(InvalidOptionError, match="head dim"):
        DA.decode_attention_triton(q, k, v, 8)
    q, k, v = make(1, 2, 1, 8, 32, torch.float16)
    with pytest.raises(InvalidOptionError, match="stride"):
        DA.decode_attention_triton(q, torch.randn(1, 1, 8, 64).half()[..., ::2], v, 8)
    with pytest.raises(InvalidOptionError, match="num_splits"):
        DA.decode_attention_triton(q, k, v, 8, num_splits=0)


def test_imports_and_torch_path_work_without_triton():
    assert_works_without_triton(
        "import importlib\n"
        "D = importlib.import_module('hetero_llm.kernels.decode_attention')\n"
        "assert not D.TRITON_AVAILABLE\n"
        "q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)\n"
        "assert D.decode_attention(q, k, k, 5).shape == q.shape\n",
        "D.decode_attention_triton(q, k, k, 5)")


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for sm_80 and sm_90 (no GPU needed) ----------------------------

def _calls(cfg, dtype, group, d, splits=33):
    """Both kernels of a Llama-3-8B-like decode (batch 1, 32k cache), as the launcher calls them."""
    meta = dict(device="meta")
    hkv = 8 if group < 32 else 1
    q = torch.empty(1, hkv * group, d, dtype=dtype, **meta)
    k = torch.empty(1, hkv, 32768, d, dtype=dtype, **meta)
    lens = torch.empty(1, dtype=torch.int32, **meta)
    return DA._decode_calls(q, k, k, lens, d ** -0.5, torch.empty_like(q), cfg, splits)


def _aot_cases():
    """Phase 1: every config on both archs in its family's dtype (bf16 for 16-bit) and fp16 for
    each family's first; on sm_90 also 32 query heads per KV head (MQA-like: 32 rows, or two
    16-row tiles at D=256). Phase 2 once per dtype, head dim and arch."""
    split, combine = {}, {}
    for family, cfgs in DECODE_CONFIGS.items():
        d = 256 if family == "16bit-d256" else 128
        main = torch.float32 if family == "fp32" else torch.bfloat16
        variants = [(i, main, 4, arch) for i in range(len(cfgs)) for arch in AOT_ARCHS]
        if family != "fp32":
            variants += [(0, torch.float16, 4, arch) for arch in AOT_ARCHS] + [(0, main, 32, 90)]
        for i, dtype, group, arch in variants:
            split[f"{family}-{i}-{str(dtype)[6:]}-g{group}-sm{arch}"] = (cfgs[i], dtype, group, d, arch)
            combine[f"{str(dtype)[6:]}-d{d}-sm{arch}"] = (cfgs[i], dtype, group, d, arch)
    return split, combine


AOT_SPLIT, AOT_COMBINE = _aot_cases()
_AOT_JOBS: list = []


@pytest.fixture(scope="module", autouse=True)
def _compile_in_background(request):
    """Start the AOT compiles (two child processes) with the first test of this file when any AOT
    test is selected, so that they overlap the interpreter tests instead of following them."""
    if TRITON and any("test_aot_" in item.name for item in request.session.items):
        specs = [(("split", n), aot_spec("decode_attention", _calls(*c[:4])[0], c[4]))
                 for n, c in AOT_SPLIT.items()]
        specs += [(("combine", n), aot_spec("decode_attention", _calls(*c[:4])[1], c[4]))
                  for n, c in AOT_COMBINE.items()]
        pool = ThreadPoolExecutor(2)
        for part in (specs[0::2], specs[1::2]):
            _AOT_JOBS.append((part, pool.submit(aot_compile, [spec for _, spec in part])))
        pool.shutdown(wait=False)
    yield


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    return {key: r for part, job in _AOT_JOBS for (key, _), r in zip(part, job.result())}


def _mma(ptx):
    return "wgmma" if uses_wgmma(ptx) else "mma.sync" if uses_mma(ptx) else "none"


@pytest.mark.parametrize("name", AOT_SPLIT)
def test_aot_phase1_fits_and_streams(compiled, name):
    cfg, dtype, _, _, arch = AOT_SPLIT[name]
    r = compiled[("split", name)]
    loop = max(ptx_loops(r["ptx"]), key=len)
    piped = any("cp.async" in ln for ln in loop)
    print(f"{name}: BLOCK_N={cfg['BLOCK_N']} warps={cfg['num_warps']} stages={cfg['num_stages']} "
          f"shared={r['shared']} B mma={_mma(r['ptx'])} cp.async={piped}")
    assert r["shared"] <= SMEM_BYTES[arch], f"{name}: {r['shared']} bytes of shared memory"
    if dtype == torch.float32:  # reduction trees on the CUDA cores (see _attend)
        assert _mma(r["ptx"]) == "none"
    else:  # 16-row tiles are below wgmma's 64: the warp-level MMA, fed by cp.async stages
        assert _mma(r["ptx"]) == "mma.sync" and piped
    assert " STL" not in r["sass"], "registers spill to local memory"


@pytest.mark.parametrize("name", AOT_COMBINE)
def test_aot_phase2_fits(compiled, name):
    r = compiled[("combine", name)]
    print(f"combine {name}: shared={r['shared']} B")
    assert r["shared"] <= SMEM_BYTES[AOT_COMBINE[name][4]] and " STL" not in r["sass"]


# -- on a GPU: bf16, long contexts -------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_llama3_8b_32k(dtype):
    q, k, v = make(1, 32, 8, 32768, 128, dtype, device="cuda")
    for lens in (32768, torch.tensor([32768], device="cuda"), torch.tensor([20001], device="cuda")):
        check(decode_attention(q, k, v, lens), q, k, v, lens)
    q, k, v = make(4, 32, 8, 32768, 128, dtype, seed=1, device="cuda")
    lens = torch.tensor([1, 1000, 20001, 32768], device="cuda")  # per-sequence lengths
    check(decode_attention(q, k, v, lens), q, k, v, lens)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_every_config_per_sequence_lengths(name):
    family, cfg = CONFIGS[name]
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    d = 256 if family == "16bit-d256" else 128
    q, k, v = make(5, 32, 8, 8192, d, dtype, device="cuda")
    lens = torch.tensor([0, 1, 777, 4096, 8192], device="cuda")
    for splits in (None, 1, 5):
        check(DA.decode_attention_triton(q, k, v, lens, num_splits=splits, config=cfg), q, k, v, lens)
