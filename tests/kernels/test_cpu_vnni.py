"""hetero_llm's AVX-512 VNNI W8A16 GEMV: numerics against fp64, the module path, fallbacks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hetero_llm
from hetero_llm.kernels import cpu_vnni
from hetero_llm.kernels.cpu_vnni import MAX_ROWS, a16w8_gemv, a16w8_gemv_ref, vnni_kernel, vnni_possible
from hetero_llm.quant import Int8Linear
from hetero_llm.quant.backends import BACKENDS

needs_vnni = pytest.mark.skipif(not vnni_possible() or vnni_kernel() is None,
                                reason="no AVX-512 VNNI, compiler or ninja here")

# Max |y - ref| / max |ref|. Two int8 levels carry ~15 bits of each activation row, so the
# kernel is ~100x closer to the fp64 product than the bf16-activation kernel (int8pack, ~2e-3).
MAX_REL_ERR = 1e-4


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-300))


def _case(m: int, n: int, k: int, seed: int = 0, x_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * x_scale
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) + 0.5) / 100
    return x, w, s, w.sum(1, dtype=torch.int32)


@needs_vnni
@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("n, k", [(1, 64), (7, 128), (100, 576), (333, 1536)])
def test_matches_fp64_reference(m, n, k):
    x, w, s, rs = _case(m, n, k, seed=m * n)
    got = a16w8_gemv(x, w, s, rs)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert _rel(got, a16w8_gemv_ref(x, w, s)) < MAX_REL_ERR


@needs_vnni
def test_more_accurate_than_bf16_activations():
    x, w, s, rs = _case(1, 512, 1024, seed=3)
    ref = a16w8_gemv_ref(x, w, s)
    bf16 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, s.bfloat16()).float()
    assert _rel(a16w8_gemv(x, w, s, rs), ref) * 20 < _rel(bf16, ref)


@needs_vnni
@pytest.mark.parametrize("x_scale", [1e-30, 1e-3, 1e3, 1e20])
def test_tiny_and_huge_activations_stay_finite_and_accurate(x_scale):
    x, w, s, rs = _case(2, 96, 256, seed=5, x_scale=x_scale)
    got = a16w8_gemv(x, w, s, rs)
    assert torch.isfinite(got).all()
    assert _rel(got, a16w8_gemv_ref(x, w, s)) < MAX_REL_ERR


@needs_vnni
def test_zero_rows_and_outlier_rows():
    x, w, s, rs = _case(3, 64, 192, seed=7)
    x[0] = 0.0  # an all-zero activation row: exactly zero out
    x[1, 5] = 1e4  # one huge outlier: the rest of the row keeps ~7 bits, still far below bf16's error
    w[10] = 0  # an all-zero weight row
    rs = w.sum(1, dtype=torch.int32)
    got = a16w8_gemv(x, w, s, rs)
    assert torch.equal(got[0], torch.zeros(64)) and torch.equal(got[:, 10], torch.zeros(3))
    ref = a16w8_gemv_ref(x, w, s)
    assert _rel(got[2:], ref[2:]) < MAX_REL_ERR
    # The outlier row loses precision on its small values, yet beats bf16 activations.
    bf16 = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, s.bfloat16()).float()
    assert _rel(got[1:2], ref[1:2]) < 1e-3 and _rel(got[1:2], ref[1:2]) < _rel(bf16[1:2], ref[1:2])


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 4, 5, 17])
def test_int8_linear_uses_it_for_few_rows(dtype, rows):
    lin = nn.Linear(128, 72, bias=True)
    layer = Int8Linear.from_linear(lin, "int8")
    assert layer.backend == "cpu-vnni"
    x = torch.randn(2, rows, 128).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, rows, 72)
    want = x.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    # rows beyond MAX_ROWS take the int8pack/bf16-GEMM path: bf16 activation error
    tol = {torch.float32: 1e-2, torch.bfloat16: 1.5e-2, torch.float16: 1e-2}[dtype]
    assert _rel(y, want) < tol


@needs_vnni
def test_asymmetric_layers_and_odd_widths_keep_torch_kernels():
    assert Int8Linear.from_linear(nn.Linear(128, 8), "int8-asym").backend == "cpu-int8pack"
    assert Int8Linear.from_linear(nn.Linear(96, 8), "int8").backend == "cpu-int8pack"  # 96 % 64
    assert not BACKENDS["cpu-vnni"].supports(128, torch.device("cpu"), group_size=64)


@needs_vnni
def test_tied_lm_head_reads_the_embedding_row_sums():
    from transformers import AutoConfig, AutoModelForCausalLM
    from tiny_shapes import TINY_SHAPES
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", vocab_size=256, **TINY_SHAPES["gpt2"])
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    import copy
    model = hetero_llm.accelerate(copy.deepcopy(ref))
    assert model.lm_head.backend == "cpu-vnni"
    assert model.lm_head.rowsum is model.transformer.wte.rowsum
    ids = torch.randint(0, 256, (1, 1))
    with torch.inference_mode():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("HETERO_LLM_NO_CPP_KERNELS", "1")
    cpu_vnni.vnni_possible.cache_clear()
    try:
        assert not vnni_possible()
        assert Int8Linear.from_linear(nn.Linear(128, 8), "int8").backend != "cpu-vnni" or \
            vnni_kernel() is not None  # an already-built kernel stays usable in this process
    finally:
        monkeypatch.delenv("HETERO_LLM_NO_CPP_KERNELS")
        cpu_vnni.vnni_possible.cache_clear()
