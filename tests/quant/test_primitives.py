"""INT8 primitives: accuracy (SQNR), error bounds, edge values, bf16-exact scales."""
from __future__ import annotations

import math

import pytest
import torch

from hetero_llm.errors import NonFiniteWeightError
from hetero_llm.quant import QuantizedWeight, dequantize, quantize_asymmetric, quantize_symmetric, sqnr_db
from hetero_llm.quant.primitives import QMAX_ASYM, QMAX_SYM, QMIN_ASYM, QMIN_SYM

MIN_SQNR_DB = {"int8": 40.0, "int8-asym": 40.0}  # Gaussian weights, per-channel
# Largest |w - dequant(q)| in units of the row's scale: round-to-nearest is 0.5.
MAX_ERROR_STEPS = {"int8": 0.5 + 1e-6, "int8-asym": 0.5 + 1e-6}
SCHEMES = {"int8": quantize_symmetric, "int8-asym": quantize_asymmetric}


def gaussian(rows: int = 256, cols: int = 512, seed: int = 0, scale: float = 1.0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) + shift) * scale


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sqnr_on_gaussian_weights(scheme):
    w = gaussian()
    assert sqnr_db(w, dequantize(SCHEMES[scheme](w))) >= MIN_SQNR_DB[scheme]


def test_asymmetric_wins_on_one_sided_weights():
    w = gaussian(64, 256, seed=1).abs()  # all >= 0: symmetric wastes half its range
    sym = sqnr_db(w, dequantize(quantize_symmetric(w)))
    asym = sqnr_db(w, dequantize(quantize_asymmetric(w)))
    assert asym > sym + 3


def test_sqnr_db_reference_values():
    ref = torch.ones(1000)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise power 1% of signal
    assert sqnr_db(ref, ref * 1.01) == pytest.approx(40.0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layout_and_ranges(scheme):
    w = gaussian(48, 40, seed=2, shift=0.3)
    qw = SCHEMES[scheme](w)
    assert isinstance(qw, QuantizedWeight)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == w.shape and qw.qweight.is_contiguous()
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (48,)
    lo, hi = (QMIN_SYM, QMAX_SYM) if scheme == "int8" else (QMIN_ASYM, QMAX_ASYM)
    assert lo <= int(qw.qweight.min()) and int(qw.qweight.max()) <= hi
    if scheme == "int8":
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == torch.int32 and qw.zero_point.shape == (48,)
    assert dequantize(qw, torch.bfloat16).dtype == torch.bfloat16
    assert w.dtype == torch.float32  # input untouched


def test_symmetric_error_is_half_a_step():
    for mag in (1e-30, 1e-3, 1.0, 1e30):
        for shift in (0.0, 0.5, -2.0):
            w = gaussian(128, 333, seed=3, scale=mag, shift=shift)
            qw = quantize_symmetric(w)
            steps = ((w - dequantize(qw)).abs() / qw.scale[:, None]).max().item()
            assert steps <= MAX_ERROR_STEPS["int8"], (mag, shift, steps)


def test_asymmetric_error_is_half_a_step():
    worst = 0.0
    for mag in (1e-30, 1e-3, 1.0, 1e30):
        for shift in (0.0, 0.5, -2.0):
            w = gaussian(128, 333, seed=3, scale=mag, shift=shift)
            qw = quantize_asymmetric(w)
            steps = ((w - dequantize(qw)).abs() / qw.scale[:, None]).max().item()
            worst = max(worst, steps)
    assert worst <= MAX_ERROR_STEPS["int8-asym"]


def test_asymmetric_keeps_zero_exact():
    w = gaussian(32, 64, seed=4, shift=1.0)
    w[:, ::3] = 0.0
    assert torch.all(dequantize(quantize_asymmetric(w))[:, ::3] == 0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("mag", [1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e20, 1e30])
def test_scales_are_bf16_representable(scheme, mag):
    w = gaussian(64, 96, seed=5, scale=mag, shift=0.2)
    qw = SCHEMES[scheme](w)
    assert torch.equal(qw.scale, qw.scale.bfloat16().float())
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_zero_rows(scheme):
    w = gaussian(8, 64, seed=6)
    w[[0, 5]] = 0.0
    qw = SCHEMES[scheme](w)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    d = dequantize(qw)
    assert not d.isnan().any()
    assert torch.all(d[[0, 5]] == 0)
    assert sqnr_db(w[1:5], d[1:5]) >= MIN_SQNR_DB[scheme]  # other rows unaffected
    assert torch.all(dequantize(SCHEMES[scheme](torch.zeros(3, 16))) == 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_values_stay_accurate(scheme):
    w = gaussian(16, 64, seed=7, scale=1e-30)
    qw = SCHEMES[scheme](w)
    d = dequantize(qw)
    assert torch.isfinite(d).all() and torch.isfinite(qw.scale).all()
    assert sqnr_db(w, d) >= MIN_SQNR_DB[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_huge_outliers_stay_finite_and_per_channel(scheme):
    w = gaussian(16, 64, seed=8)
    w[3, 7] = 1e30
    w[9, 0] = -1e30
    w[9, 1] = 1e-30
    qw = SCHEMES[scheme](w)
    d = dequantize(qw)
    assert torch.isfinite(d).all() and torch.isfinite(qw.scale).all()
    assert d[3, 7].item() == pytest.approx(1e30, rel=1e-2)
    assert d[9, 0].item() == pytest.approx(-1e30, rel=1e-2)
    normal = [r for r in range(16) if r not in (3, 9)]
    assert sqnr_db(w[normal], d[normal]) >= MIN_SQNR_DB[scheme]  # one row's outlier stays in its row


def test_asymmetric_full_fp32_range_stays_finite():
    w = torch.tensor([[3e38, -3e38, 1.0, 0.0]])
    assert torch.isfinite(dequantize(quantize_asymmetric(w))).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_module(scheme, bad):
    w = gaussian(8, 16, seed=9)
    w[2, 3] = bad
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.3\.mlp\.up_proj") as info:
        SCHEMES[scheme](w, "model.layers.3.mlp.up_proj")
    assert "1 NaN/inf" in str(info.value) and "quantize='none'" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_weight_dtypes(scheme, dtype):
    w = gaussian(32, 64, seed=10).to(dtype)
    qw = SCHEMES[scheme](w)
    assert qw.scale.dtype == torch.float32
    assert sqnr_db(w.double(), dequantize(qw)) >= MIN_SQNR_DB[scheme]
