"""W8A8 Triton kernels (int8_gemm): per-token quantization and the int8 tensor-core GEMM.

Without CUDA the kernels run on CPU under the Triton interpreter (see triton_helpers), in fp32
and fp16; bf16 is checked on the GPU only. The AOT tests compile every configuration for Hopper
and look for the int8 tensor-core instructions.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (DEVICE, HOPPER_SMEM_BYTES, KERNELS_RUN_HERE, TRITON, aot_compile, aot_spec,
                            assert_works_without_triton, gpu, needs_cuda, ptx_lines, ptx_loops,
                            run_file_in_fresh_process, runs_kernels)
# isort: on
import pytest
import torch

from hetero_llm.kernels import int8_gemm as G
from hetero_llm.kernels.int8_gemm import (W8A8_CONFIGS, int8_gemm_ref, int_matmul_ref,
                                          quantize_per_token_ref, w8a8_linear_ref)
from hetero_llm.quant.primitives import sqnr_db

# Kernel vs reference, per output dtype: the same integers and the same fp32 epilogue, so the
# gap is an FMA contraction in the epilogue plus the final rounding.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}
CPU_DTYPES = (torch.float32, torch.float16)
CONFIGS = {f"{m}-{i}": (m, cfg) for m, cfgs in W8A8_CONFIGS.items() for i, cfg in enumerate(cfgs)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_int8(*shape, seed=0):
    return torch.randint(-127, 128, shape, generator=gen(seed), dtype=torch.int8)


def on(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


# -- per-token quantization ---------------------------------------------------------------------

@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [5, 77, 256, 1030])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_is_bitwise_the_reference(m, k, dtype, smooth):
    x = (torch.randn(m, k, generator=gen(k)) * 4).to(dtype)
    s = torch.rand(k, generator=gen(1)) + 0.5 if smooth else None
    xq, scale = G.quantize_per_token_triton(*on(x, s))
    rq, rs = quantize_per_token_ref(x, s)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (m, 1)
    assert torch.equal(xq.cpu(), rq) and torch.equal(scale.cpu(), rs)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_quantize_ties_zeros_outliers_and_underflow(dtype):
    big = 6e4 if dtype == torch.float16 else 3e38
    x = torch.zeros(5, 8)
    x[0] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -3.5])  # scale 1: exact ties
    x[2] = torch.tensor([big, -big, 1, -1, 0, big / 3, 7, -big])  # outliers; row 1 stays zero
    x[3, 0] = 1e-44 if dtype == torch.float32 else 0.0  # absmax / 127 underflows to 0
    x[4] = torch.linspace(-2, 3, 8)
    x = x.to(dtype)
    xq, scale = G.quantize_per_token_triton(*on(x))
    rq, rs = quantize_per_token_ref(x)
    assert torch.equal(xq.cpu(), rq) and torch.equal(scale.cpu(), rs)
    assert rq[0].tolist() == [127, 0, 2, 2, 0, -2, 126, -4]  # half to even, as torch.round
    assert scale[1].item() == 1.0 and scale[3].item() == 1.0 and torch.isfinite(scale).all()


@runs_kernels
def test_quantize_leading_dims_and_limits():
    x = torch.randn(2, 3, 40, generator=gen(2))
    xq, scale = G.quantize_per_token_triton(*on(x))
    assert xq.shape == (2, 3, 40) and scale.shape == (2, 3, 1)
    assert torch.equal(xq.cpu(), quantize_per_token_ref(x)[0])
    with pytest.raises(ValueError, match="one pass"):
        G.quantize_per_token_triton(torch.zeros(1, 65537, device=DEVICE))


# -- the int8 GEMM ------------------------------------------------------------------------------

@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17, 70])
@pytest.mark.parametrize("n, k", [(33, 77), (1, 32), (40, 300)])
def test_gemm_is_exact_in_int32(m, n, k):
    """Unit scales, fp32 out: every |sum| < 2**24 here, so the output is the integer product."""
    xq, w = rand_int8(m, k, seed=m), rand_int8(n, k, seed=n)
    ones_m, ones_n = torch.ones(m, 1), torch.ones(n)
    got = G.int8_gemm_triton(*on(xq, ones_m, w, ones_n), out_dtype=torch.float32).cpu()
    assert torch.equal(got, int_matmul_ref(xq, w).to(torch.float32))
    assert torch.equal(int_matmul_ref(xq, w), xq.int() @ w.int().T)  # the reference is exact too


@runs_kernels
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_is_exact(name):
    m_limit, cfg = CONFIGS[name]
    m = {16: 9, 64: 40}.get(m_limit, 130)  # partial tiles in every dimension
    xq, w = rand_int8(m, 200, seed=3), rand_int8(37, 200, seed=4)
    got = G.int8_gemm_triton(*on(xq, torch.ones(m), w, torch.ones(37)), out_dtype=torch.float32,
                               config=cfg).cpu()
    assert torch.equal(got, int_matmul_ref(xq, w).to(torch.float32))


@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("out_dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_scales_and_bias(m, out_dtype, bias):
    n, k = 33, 77
    xq, w = rand_int8(m, k, seed=5), rand_int8(n, k, seed=6)
    xs, ws = torch.rand(m, 1, generator=gen(7)) * 0.1, torch.rand(n, generator=gen(8)) * 0.01
    b = torch.randn(n, generator=gen(9)) if bias else None
    got = G.int8_gemm_triton(*on(xq, xs, w, ws, b), out_dtype=out_dtype).cpu()
    ref = int8_gemm_ref(xq, xs, w, ws, b, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, ref, **TOL[out_dtype])


# -- W8A8 linear --------------------------------------------------------------------------------

@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True])
def test_w8a8_linear_matches_reference(m, dtype, smooth):
    n, k = 33, 100
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.randn(m, k, generator=gen(10))
    x[0, 3] = big  # an outlier token: finite in, finite out
    if m > 1:
        x[1] = 0  # an all-zero token gives the bias exactly
    x = x.to(dtype)
    w, ws = rand_int8(n, k, seed=11), torch.rand(n, generator=gen(12)) * 1e-3
    s = torch.rand(k, generator=gen(13)) * 0.5 + 0.5 if smooth else None
    b = torch.randn(n, generator=gen(14))
    got = G.w8a8_linear_triton(*on(x, w, ws, b, s)).cpu()
    ref = w8a8_linear_ref(x, w, ws, b, s)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, **TOL[dtype])
    if m > 1:
        torch.testing.assert_close(got[1], b.to(dtype), atol=0, rtol=0)


def test_w8a8_reference_is_close_to_float():
    x, w = torch.randn(16, 256, generator=gen(15)), torch.randn(64, 256, generator=gen(16))
    ws = w.abs().amax(1) / 127
    wq = torch.round(w / ws[:, None]).to(torch.int8)
    assert sqnr_db(x @ w.T, w8a8_linear_ref(x, wq, ws)) > 30


def test_imports_and_references_work_without_triton():
    """With triton unimportable: both modules import, the references run, the launchers say why."""
    assert_works_without_triton(
        "import hetero_llm.kernels.int8_linear as L, hetero_llm.kernels.int8_gemm as G\n"
        "assert not L.TRITON_AVAILABLE and not G.TRITON_AVAILABLE\n"
        "x, w = torch.randn(2, 32), torch.randint(-127, 127, (8, 32), dtype=torch.int8)\n"
        "L.int8_linear_ref(x, w, torch.ones(8)); G.w8a8_linear_ref(x, w, torch.ones(8))\n",
        "L.int8_linear_triton(x, w, torch.ones(8))", "G.w8a8_linear_triton(x, w, torch.ones(8))")


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for Hopper (no GPU needed) -------------------------------------

def _gemm_spec(cfg, m, n=4096, k=4096, out_dtype=torch.bfloat16):
    meta = dict(device="meta")
    xq, w = torch.empty(m, k, dtype=torch.int8, **meta), torch.empty(n, k, dtype=torch.int8, **meta)
    call = G._gemm_call(xq, torch.empty(m, **meta), w, torch.empty(n, **meta),
                          torch.empty(n, **meta), torch.empty(m, n, dtype=out_dtype, **meta), cfg)
    return aot_spec("int8_gemm", call)


def _quantize_spec(k, dtype, smooth):
    meta = dict(device="meta")
    x = torch.empty(4096, k, dtype=dtype, **meta)
    call = G._quantize_call(x, torch.empty(k, **meta) if smooth else None,
                              torch.empty(4096, k, dtype=torch.int8, **meta),
                              torch.empty(4096, 1, **meta))
    return aot_spec("int8_gemm", call)


GEMM_AOT = {name: (cfg, {16: 16, 64: 64}.get(m, 4096)) for name, (m, cfg) in CONFIGS.items()}
QUANT_AOT = {"bf16-4096-smooth": (4096, torch.bfloat16, True),
             "fp16-14336": (14336, torch.float16, False), "fp32-77": (77, torch.float32, True)}


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    specs = {f"gemm-{n}": _gemm_spec(cfg, m) for n, (cfg, m) in GEMM_AOT.items()}
    specs.update({f"quant-{n}": _quantize_spec(*a) for n, a in QUANT_AOT.items()})
    return dict(zip(specs, aot_compile(list(specs.values()))))


@pytest.mark.parametrize("name", GEMM_AOT)
def test_aot_gemm_uses_int8_tensor_cores(compiled, name):
    r, cfg = compiled[f"gemm-{name}"], GEMM_AOT[name][0]
    assert 0 < r["shared"] <= HOPPER_SMEM_BYTES, f"{name}: {r['shared']} bytes of shared memory"
    loop = max(ptx_loops(r["ptx"]), key=len)
    int8_mma = [ln for ln in loop if "mma" in ln and ".s32.s8.s8" in ln]
    if cfg["BLOCK_M"] >= 64:  # a warpgroup per 64 rows: wgmma, in SASS IGMMA
        assert any(ln.startswith("wgmma.mma_async") for ln in int8_mma), name
        assert not r["sass"] or ptx_lines(r["sass"], "IGMMA", "S8.S8")
    else:  # 16-row tiles are below wgmma's 64: the warp-level int8 MMA
        assert any(ln.startswith("mma.sync") for ln in int8_mma), name
    assert [ln for ln in loop if "cp.async" in ln], "the operand loads are not pipelined"


@pytest.mark.parametrize("name", QUANT_AOT)
def test_aot_quantize_rounds_like_torch(compiled, name):
    r = compiled[f"quant-{name}"]
    assert r["shared"] <= HOPPER_SMEM_BYTES
    assert ptx_lines(r["ptx"], "div.rn.f32")  # IEEE division, as torch
    assert not ptx_lines(r["ptx"], "div.full") and not ptx_lines(r["ptx"], "div.approx")
    assert ptx_lines(r["ptx"], "add", "0f4B400000")  # the 1.5 * 2**23 rounding add survived


# -- on a GPU: bf16 and realistic shapes ------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 16, 64, 4096])
@pytest.mark.parametrize("n, k", [(4096, 4096), (1000, 1030)])
def test_gpu_w8a8_matches_reference(dtype, m, n, k):
    x = (torch.randn(m, k, generator=gen(m)) * 2).to(dtype).cuda()
    w, ws = rand_int8(n, k, seed=n).cuda(), (torch.rand(n, generator=gen(k)) * 1e-3).cuda()
    s, b = (torch.rand(k, generator=gen(1)) + 0.5).cuda(), torch.randn(n, generator=gen(2)).cuda()
    xq, xs = G.quantize_per_token_triton(x, s)
    rq, rs = quantize_per_token_ref(x, s)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)
    got = G.w8a8_linear_triton(x, w, ws, b, s)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, w8a8_linear_ref(x, w, ws, b, s), **TOL[dtype])


@gpu
@needs_cuda
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_every_config_is_exact(name):
    m_limit, cfg = CONFIGS[name]
    m = {16: 13, 64: 50}.get(m_limit, 1000)
    xq, w = rand_int8(m, 4096, seed=1).cuda(), rand_int8(4096, 4096, seed=2).cuda()
    got = G.int8_gemm_triton(xq, torch.ones(m, device="cuda"), w, torch.ones(4096, device="cuda"),
                               out_dtype=torch.float32, config=cfg)
    assert torch.equal(got, int_matmul_ref(xq, w).to(torch.float32))
