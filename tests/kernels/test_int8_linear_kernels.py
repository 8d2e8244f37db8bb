"""W8A16 Triton kernels (int8_linear) against the torch reference.

Without CUDA the kernels run on CPU under the Triton interpreter (see triton_helpers for why
this file may run in a child process), in fp32 and fp16: bf16 is broken in the interpreter and
is checked on the GPU only. The AOT tests compile every configuration for Hopper with no GPU.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (DEVICE, HOPPER_SMEM_BYTES, KERNELS_RUN_HERE, TRITON, aot_compile,
                            aot_spec, gpu, needs_cuda, ptx_lines, ptx_loops,
                            run_file_in_fresh_process, runs_kernels)
# isort: on
import pytest
import torch

from hetero_llm.errors import HardwareError
from hetero_llm.kernels import int8_linear as L
from hetero_llm.kernels.int8_linear import W8A16_CONFIGS, int8_linear_ref

# Kernel vs reference, per output dtype: both accumulate in fp32, so the gap is summation order
# plus the final rounding to the output dtype.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}
CPU_DTYPES = (torch.float32, torch.float16)
QUANTS = {  # name: (group_size, asymmetric)
    "channel-sym": (0, False), "channel-asym": (0, True),
    "group32-sym": (32, False), "group48-asym": (48, True),  # 48: a group that is not a power of 2
}
CONFIGS = {f"{m}-{i}": (m, cfg) for m, cfgs in W8A16_CONFIGS.items() for i, cfg in enumerate(cfgs)}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_weight(n, k, group=0, asym=False, seed=0, scale_size=0.02):
    """Random int8 weight (N, K) with fp32 scales (N,) or (N, K // group) and int32 zero points."""
    g = gen(seed)
    shape = (n, k // group) if group else (n,)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(shape, generator=g) * scale_size + scale_size / 20
    zp = torch.randint(-30, 30, shape, generator=g, dtype=torch.int32) if asym else None
    return q, scale, zp


def make_x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=gen(seed)).to(dtype)


def check(x, q, scale, zp=None, bias=None, config=None):
    """Run the Triton launcher on DEVICE and compare it with the reference on the CPU."""
    dev = [t.to(DEVICE) if t is not None else None for t in (x, q, scale, zp, bias)]
    got = L.int8_linear_triton(*dev, config=config).cpu()
    ref = int8_linear_ref(x, q, scale, zp, bias)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, **TOL[x.dtype])


# -- numerics (interpreter on CPU, compiled on a GPU) -----------------------------------------

@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(m, dtype, quant, bias):
    group, asym = QUANTS[quant]
    n, k = 33, 192  # N odd; K a multiple of every group but of no K block (64..1024)
    q, scale, zp = make_weight(n, k, group, asym)
    b = torch.randn(n, generator=gen(2)) if bias else None
    check(make_x(m, k, dtype), q, scale, zp, b)


@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n, k", [(7, 77), (1, 5), (40, 1030)])
def test_odd_shapes(m, n, k):
    q, scale, zp = make_weight(n, k, asym=True, seed=n)
    check(make_x(m, k, torch.float16, seed=k), q, scale, zp, torch.randn(n, generator=gen(3)))


@runs_kernels
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("quant", ["channel-asym", "group32-sym"])
def test_every_config(name, quant):
    """Each configuration, forced, on a shape that leaves partial tiles in every dimension."""
    m_limit, cfg = CONFIGS[name]
    group, asym = QUANTS[quant]
    m = 3 if m_limit == 4 else 19
    q, scale, zp = make_weight(37, 160, group, asym, seed=4)
    check(make_x(m, 160, torch.float16, seed=5), q, scale, zp, torch.randn(37, generator=gen(6)),
          config=cfg)


@runs_kernels
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_zero_rows_and_outliers_stay_finite(m, dtype):
    """All-zero rows give the bias exactly; outliers near the dtype's range stay finite."""
    n, k = 24, 96
    q, scale, zp = make_weight(n, k, 32, True, seed=7, scale_size=2e-4)
    x = make_x(m, k, dtype, seed=8)
    x[0] = 0
    x[-1, ::7] = 6e4 if dtype == torch.float16 else 1e30
    bias = torch.randn(n, generator=gen(9))
    check(x, q, scale, zp, bias)
    y = L.int8_linear_triton(*(t.to(DEVICE) for t in (x, q, scale, zp, bias))).cpu()
    if m > 1:  # row 0 is all zeros (and not the outlier row)
        torch.testing.assert_close(y[0], bias.to(dtype), atol=0, rtol=0)


@runs_kernels
def test_leading_dims_and_strided_x():
    q, scale, zp = make_weight(20, 64, asym=True, seed=10)
    x = make_x(6, 128, torch.float32).reshape(2, 3, 128)[..., ::2]  # (2, 3, 64), K stride 2
    got = L.int8_linear_triton(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), zp.to(DEVICE))
    torch.testing.assert_close(got.cpu(), int8_linear_ref(x, q, scale, zp), **TOL[torch.float32])
    assert got.shape == (2, 3, 20)


@runs_kernels
def test_rejects_what_it_cannot_run():
    q, scale, _ = make_weight(8, 72, 24)  # group of 24: not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        L.int8_linear_triton(make_x(1, 72, torch.float32).to(DEVICE), q.to(DEVICE), scale.to(DEVICE))
    with pytest.raises(ValueError):
        L.int8_linear_triton(make_x(1, 71, torch.float32).to(DEVICE), q.to(DEVICE), scale.to(DEVICE))


@runs_kernels
def test_without_triton_the_launcher_says_so(monkeypatch):
    monkeypatch.setattr(L, "TRITON_AVAILABLE", False)
    q, scale, _ = make_weight(4, 16)
    with pytest.raises(HardwareError, match="Triton"):
        L.int8_linear_triton(make_x(1, 16, torch.float32), q, scale)


def test_reference_dequantizes_per_group():
    q, scale, zp = make_weight(5, 64, 16, True, seed=11)
    w = (q.float() - zp.float().repeat_interleave(16, 1)) * scale.repeat_interleave(16, 1)
    x = make_x(3, 64, torch.float32)
    torch.testing.assert_close(int8_linear_ref(x, q, scale, zp), x @ w.T)


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for Hopper (no GPU needed) -------------------------------------

def _meta_call(cfg, m, n, k, dtype=torch.bfloat16, group=0, asym=True, bias=True):
    """The launcher's own kernel call for this shape, built on meta tensors."""
    meta = dict(device="meta")
    shape = (n, k // group) if group else (n,)
    x, q = torch.empty(m, k, dtype=dtype, **meta), torch.empty(n, k, dtype=torch.int8, **meta)
    zp = torch.empty(shape, dtype=torch.int32, **meta) if asym else None
    b = torch.empty(n, **meta) if bias else None
    x2, s, zp, b, group = L._prepare(x, q, torch.empty(shape, **meta), zp, b)
    return aot_spec("int8_linear", L._kernel_call(x2, q, s, zp, b, torch.empty(m, n, dtype=dtype, **meta),
                                                  group, cfg))


AOT = {f"{name}-bf16": (CONFIGS[name][1], dict(m=1 if CONFIGS[name][0] == 4 else 4096))
       for name in CONFIGS}
AOT.update({  # per-group scales, fp16 and fp32 on representative configs
    "4-0-group128": (W8A16_CONFIGS[4][0], dict(m=1, group=128)),
    "4-0-fp16": (W8A16_CONFIGS[4][0], dict(m=1, dtype=torch.float16)),
    "4-0-fp32": (W8A16_CONFIGS[4][0], dict(m=1, dtype=torch.float32, asym=False)),
    "None-0-group128": (W8A16_CONFIGS[None][0], dict(m=4096, group=128)),
    "None-0-fp16": (W8A16_CONFIGS[None][0], dict(m=4096, dtype=torch.float16, bias=False)),
    "None-1-fp32": (W8A16_CONFIGS[None][1], dict(m=4096, dtype=torch.float32)),  # most shared memory
})


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    specs = {label: _meta_call(cfg, n=4096, k=4096, **kw) for label, (cfg, kw) in AOT.items()}
    return dict(zip(specs, aot_compile(list(specs.values()))))


@pytest.mark.parametrize("label", AOT)
def test_aot_compiles_for_hopper(compiled, label):
    r = compiled[label]
    cfg = AOT[label][0]
    assert 0 <= r["shared"] <= HOPPER_SMEM_BYTES, f"{label}: {r['shared']} bytes of shared memory"
    assert r["num_warps"] == cfg["num_warps"]
    loop = max(ptx_loops(r["ptx"]), key=len)  # the K loop
    if cfg["kernel"] == "gemv":
        _check_gemv_ptx(r["ptx"], loop)
    else:
        _check_mma_ptx(r, loop, cfg, label)


def _check_gemv_ptx(ptx, loop):
    fmas = [ln for ln in loop if "fma.rn.f32" in ln]
    assert fmas
    # int8 -> fp32 by the exponent trick, not the slow convert instruction, once per weight
    # (per-group zero points are converted once per row and tile: a few, not one per FMA)
    assert not ptx_lines(ptx, "cvt.rn.f32.s8")
    assert 4 * len([ln for ln in loop if "cvt.rn.f32.s" in ln]) <= len(fmas)
    # no layout conversion through shared memory inside the K loop
    assert not [ln for ln in loop if "bar.sync" in ln or "st.shared" in ln]
    # vector loads (8 or 16 bytes per thread) of the weight and of x
    assert [ln for ln in loop if "ld.global.v2" in ln or "ld.global.v4" in ln]


def _check_mma_ptx(r, loop, cfg, label):
    dt = "f32" if "fp32" in label else "f16" if "fp16" in label else "bf16"
    mma = [ln for ln in loop if "mma" in ln and f".{dt}.{dt}" in ln]
    if dt != "f32" and cfg["BLOCK_M"] >= 64:  # Hopper's warpgroup MMA, fed from shared memory
        assert any(ln.startswith("wgmma.mma_async") for ln in mma), label
        assert not r["sass"] or ptx_lines(r["sass"], "HGMMA")
    elif dt != "f32":
        assert any(ln.startswith("mma.sync") for ln in mma), label
    assert [ln for ln in loop if "cp.async" in ln], "the operand loads are not pipelined"


# -- on a GPU: bf16 and realistic shapes ------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 333])
@pytest.mark.parametrize("n, k", [(4096, 4096), (1000, 1030)])
@pytest.mark.parametrize("quant", ["channel-sym", "channel-asym", "group32-sym"])
def test_gpu_matches_reference(dtype, m, n, k, quant):
    group, asym = QUANTS[quant]
    if group and k % group:
        pytest.skip("K is not a whole number of groups")
    q, scale, zp = make_weight(n, k, group, asym, seed=m)
    x = make_x(m, k, dtype, seed=n)
    bias = torch.randn(n, generator=gen(12))
    got = L.int8_linear_triton(x.cuda(), q.cuda(), scale.cuda(), zp.cuda() if asym else None,
                               bias.cuda())
    ref = int8_linear_ref(x.cuda(), q.cuda(), scale.cuda(), zp.cuda() if asym else None, bias.cuda())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, **TOL[dtype])


@gpu
@needs_cuda
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_every_config_bf16(name):
    m_limit, cfg = CONFIGS[name]
    q, scale, zp = make_weight(4096, 4096, asym=True, seed=13)
    x = make_x(2 if m_limit == 4 else 300, 4096, torch.bfloat16, seed=14)
    got = L.int8_linear_triton(x.cuda(), q.cuda(), scale.cuda(), zp.cuda(), config=cfg)
    torch.testing.assert_close(got, int8_linear_ref(x.cuda(), q.cuda(), scale.cuda(), zp.cuda()),
                               **TOL[torch.bfloat16])
