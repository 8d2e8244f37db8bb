"""W8A8Linear: per-token activation quantization, both backends, smoothing, fp outlier channels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetero_llm.quant import dequantize, sqnr_db
from hetero_llm.quant.calibrate import outlier_channels, smoothing_factors
from hetero_llm.quant.primitives import QMAX_SYM, quantize_per_token
from hetero_llm.quant.w8a8 import BACKENDS, W8A8Linear, _quantize_rows, int_mm_available, pick_backend

# Accuracy targets and tolerances, in one place.
# Layer output against fp32 F.linear, Gaussian x and W. Measured (seed 0): 40.64 dB at K=100,
# 39.56 dB at K=512. Both operands are absmax INT8 (~42.5 dB each on Gaussian rows of 512), so
# the noises add to ~39.5 dB: the 40 dB target is missed at K=512 by the math, not by a bug.
MIN_SQNR_DB = 40.0
W8A8_BELOW_TARGET = "W8A8 on Gaussian x, W with K=512 measures 39.56 dB (< 40 dB target)"
# W8A8 noise power / (weight-only noise + activation-only noise): measured 0.95-1.03.
NOISE_ADDITIVITY = (0.9, 1.1)
# cpu-intmm against torch-w8a8: identical integers (same q, exact int32/fp64 sums); the fast path
# scales in fp32 (int32 -> fp32, then two fp32 multiplies), the reference in fp64 with one rounding
# at the end. Measured max 2.0 * 2**-24 relative per element; no bias, so nothing cancels.
BACKEND_RTOL = 4 * 2.0 ** -24
FP16_REL_TOL = 1e-2  # the same layer after .half(), fp16 input/output, against fp32
ROWS = (1, 3, 17, 512)

BACKEND_NAMES = ["cpu-intmm", "torch-w8a8"]


def gaussian(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_int_mm_is_available_here():
    assert int_mm_available()
    assert pick_backend(64, torch.device("cpu")) == "cpu-intmm"
    assert pick_backend(64, torch.device("cpu"), "torch-w8a8") == "torch-w8a8"
    assert not BACKENDS["cpu-intmm"].supports(64, torch.device("cuda"))
    assert pick_backend(64, torch.device("cuda"), "cpu-intmm") == "torch-w8a8"
    # torch._int_mm on CPU returns garbage for K = 1: such a layer uses the reference
    assert pick_backend(1, torch.device("cpu")) == "torch-w8a8"
    w, x = gaussian(5, 1, seed=41), gaussian(3, 1, seed=42)
    layer = W8A8Linear.from_weight(w, None, backend="cpu-intmm")
    assert layer.backend == "torch-w8a8"
    assert rel_err(layer(x), F.linear(x, w)) < 2e-2


# -- per-token activation quantization ------------------------------------------------------

def test_fast_row_quantization_agrees_with_reference():
    x = gaussian(37, 100, seed=1)
    x[3] *= 1e30
    x[5] *= 1e-30
    x[8] = 0.0
    x[11, 7] = -50.0  # one large entry
    q_ref, s_ref = quantize_per_token(x)
    q, s = _quantize_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37, 1)
    assert torch.equal(q, q_ref)
    nonzero = torch.ones(37, dtype=torch.bool)
    nonzero[8] = False
    assert torch.equal(s[nonzero], s_ref[nonzero])
    # a zero row: any scale reproduces it (the reference says 1, the fast path the smallest normal)
    assert torch.all(q[8] == 0) and torch.isfinite(s[8]).all() and s[8] > 0
    torch.testing.assert_close(q.float() * s, q_ref.float() * s_ref, rtol=0, atol=0)


@pytest.mark.parametrize("mag", [1e-30, 1e-3, 1.0, 1e30])
def test_per_token_error_is_half_a_step(mag):
    x = gaussian(64, 96, seed=2, scale=mag)
    for fn in (quantize_per_token, _quantize_rows):
        q, s = fn(x)
        assert torch.isfinite(s).all() and (s > 0).all()
        d = q.double() * s.double()
        assert torch.isfinite(d).all()
        assert ((d - x.double()).abs() / s.double()).max() <= 0.5 + 1e-5
        assert int(q.abs().max()) == QMAX_SYM  # each row's max uses the full range


def test_per_token_special_rows():
    x = torch.stack([torch.zeros(16), torch.full((16,), 1e30), torch.full((16,), -1e-30),
                     torch.tensor([3e38, -3e38] + [1.0] * 14)])
    assert torch.isfinite(x).all()
    for fn in (quantize_per_token, _quantize_rows):
        q, s = fn(x)
        d = q.double() * s.double()
        assert torch.isfinite(s).all() and torch.isfinite(d).all()
        assert torch.all(q[0] == 0)
        torch.testing.assert_close(d[1:3], x[1:3].double(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_token_reference_scales_in_fp32(dtype):
    x = gaussian(2, 5, 64, seed=3).to(dtype)
    q, s = quantize_per_token(x)
    assert q.shape == x.shape and s.shape == (2, 5, 1) and s.dtype == torch.float32


# -- the layer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [pytest.param(100, id="K100"),
                               pytest.param(512, id="K512", marks=pytest.mark.xfail(strict=True,
                                                                                      reason=W8A8_BELOW_TARGET))])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_output_sqnr_on_gaussian(backend, k):
    w, x = gaussian(256, k, seed=0), gaussian(64, k, seed=1)
    layer = W8A8Linear.from_weight(w, None, backend=backend)
    assert layer.backend == backend
    db = sqnr_db(F.linear(x, w), layer(x))
    assert db >= MIN_SQNR_DB, f"{db:.2f} dB"


@pytest.mark.parametrize("shape", [(64, 512, 256), (17, 100, 48), (64, 96, 37)])
def test_noise_is_weight_noise_plus_activation_noise(shape):
    # W8A8 adds nothing beyond its two quantizations: no double rounding, no wrong scale.
    m, k, n = shape
    w, x = gaussian(n, k, seed=4), gaussian(m, k, seed=5)
    layer = W8A8Linear.from_weight(w, None)
    ref = F.linear(x.double(), w.double())
    q, s = quantize_per_token(x)
    noise_w = (F.linear(x.double(), layer.dequantized_weight().double()) - ref).pow(2).sum()
    noise_a = (F.linear(q.double() * s.double(), w.double()) - ref).pow(2).sum()
    ratio = ((layer(x).double() - ref).pow(2).sum() / (noise_w + noise_a)).item()
    assert NOISE_ADDITIVITY[0] < ratio < NOISE_ADDITIVITY[1], ratio


@pytest.mark.parametrize("k", [100, 64, 7, 513])
@pytest.mark.parametrize("n", [48, 37, 1])
def test_cpu_intmm_equals_reference(k, n):
    w = gaussian(n, k, seed=6)
    fast = W8A8Linear.from_weight(w, None, backend="cpu-intmm")
    ref = W8A8Linear.from_weight(w, None, backend="torch-w8a8")
    assert torch.equal(fast.qweight, ref.qweight) and torch.equal(fast.scale, ref.scale)
    g = torch.Generator().manual_seed(k)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g)
        x[0, 0] = 0.0  # exact zeros as well
        torch.testing.assert_close(fast(x), ref(x), rtol=BACKEND_RTOL, atol=0)


def test_cpu_intmm_equals_reference_with_zero_and_huge_rows():
    w = gaussian(40, 100, seed=7)
    fast = W8A8Linear.from_weight(w, None, backend="cpu-intmm")
    ref = W8A8Linear.from_weight(w, None, backend="torch-w8a8")
    x = gaussian(4, 100, seed=8)
    x[1] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-30
    y = fast(x)
    assert torch.isfinite(y).all() and torch.all(y[1] == 0)
    torch.testing.assert_close(y, ref(x), rtol=BACKEND_RTOL, atol=0)
    want = F.linear(x.double(), w.double())
    for row in (0, 2, 3):  # each row keeps its own relative accuracy
        assert rel_err(y[row], want[row]) < 2e-2, row


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("k", [100, 64])
def test_bias_odd_shapes_and_rows(backend, k):
    w, b = gaussian(37, k, seed=9), gaussian(37, seed=10)
    with_bias = W8A8Linear.from_weight(w, b, backend=backend)
    without = W8A8Linear.from_weight(w, None, backend=backend)
    assert with_bias.bias.dtype == torch.float32
    g = torch.Generator().manual_seed(11)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g)
        y = with_bias(x)
        assert y.shape == (rows, 37) and y.dtype == torch.float32
        assert torch.equal(y, without(x) + b)  # the bias is added once, in fp32
        assert rel_err(y, F.linear(x, w, b)) < 3e-2


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_leading_dimensions(backend):
    layer = W8A8Linear.from_weight(gaussian(48, 100, seed=12), gaussian(48, seed=13), backend=backend)
    x = gaussian(2, 5, 100, seed=14)
    y = layer(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, layer(x.reshape(10, 100)).reshape(2, 5, 48), rtol=0, atol=0)
    xt = gaussian(100, 3, seed=15).t()  # non-contiguous
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()), rtol=0, atol=0)


# -- smoothing ------------------------------------------------------------------------------------

def test_smoothing_is_exact_in_float():
    w, b = gaussian(48, 100, seed=16), gaussian(48, seed=17)
    smooth = torch.rand(100, generator=torch.Generator().manual_seed(18)) * 1.5 + 0.5
    layer = W8A8Linear.from_weight(w, b, smooth=smooth)
    assert torch.equal(layer.smooth, smooth) and layer.smooth.dtype == torch.float32
    # W / smooth is what is quantized: the weight the layer applies to x is W up to rounding
    # of W / smooth, which is half a step of its row, times that column's smooth factor
    err = (layer.dequantized_weight() - w).abs()
    bound = 0.5 * layer.scale[:, None] * smooth[None, :] * (1 + 1e-5)
    assert torch.all(err <= bound)
    # the forward computes quantize(x * smooth) against the integer weight: nothing else
    x = gaussian(17, 100, seed=19)
    q, s = quantize_per_token(x * smooth)
    want = (q.double() @ layer.qweight.double().T) * s.double() * layer.scale.double() + b.double()
    assert rel_err(layer(x), want) < 1e-6
    assert rel_err(layer(x), F.linear(x, w, b)) < 3e-2


def outlier_input(m: int, k: int, seed: int, channels=(3, 77), factor: float = 100.0) -> torch.Tensor:
    x = gaussian(m, k, seed=seed)
    x[:, list(channels)] *= factor
    return x


def test_smoothing_moves_activation_outliers_into_the_weight():
    w = gaussian(96, 256, seed=20, scale=0.05)
    x = outlier_input(64, 256, seed=21)
    ref = F.linear(x, w)
    plain = sqnr_db(ref, W8A8Linear.from_weight(w, None)(x))
    s = smoothing_factors(x.abs().amax(0), w.abs().amax(0), 0.5)
    smoothed = sqnr_db(ref, W8A8Linear.from_weight(w, None, smooth=1.0 / s)(x))
    # measured: 29.9 dB plain, 44.0 dB smoothed
    assert smoothed > plain + 10, (plain, smoothed)


# -- outlier channels kept in floating point --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_outlier_channels_stay_in_floating_point(backend):
    w, b = gaussian(48, 100, seed=22), gaussian(48, seed=23)
    idx = torch.tensor([3, 41, 99])
    layer = W8A8Linear.from_weight(w, b, outliers=idx, backend=backend)
    assert torch.equal(layer.outlier_index, idx) and layer.outlier_index.dtype == torch.long
    assert layer.outlier_index is not idx  # a copy: the caller's tensor can change
    assert torch.equal(layer.outlier_weight, w[:, idx])
    assert torch.all(layer.qweight[:, idx] == 0)
    assert torch.equal(layer.dequantized_weight()[:, idx], w[:, idx])
    x = gaussian(5, 100, seed=24)
    x[:, idx] = 0.0
    x2 = x.clone()
    x2[:, idx] = gaussian(5, 3, seed=25) * 1e4
    # the kept channels add their exact float contribution; the int8 part does not see them
    torch.testing.assert_close(layer(x2) - layer(x), F.linear(x2 - x, w), rtol=1e-5, atol=1e-2)


def test_outliers_kept_in_fp_beat_quantizing_them():
    w = gaussian(96, 256, seed=26, scale=0.05)
    x = outlier_input(64, 256, seed=27, channels=(3, 77, 200), factor=1e4)
    ref = F.linear(x.double(), w.double())
    clean = x.clone()
    clean[:, [3, 77, 200]] = 0.0
    scale = F.linear(clean.double(), w.double()).abs().max()  # the non-outlier part of the output
    plain = (W8A8Linear.from_weight(w, None)(x).double() - ref).abs().max() / scale
    idx = outlier_channels(x.abs().amax(0), 3)
    assert idx.tolist() == [3, 77, 200]
    kept = (W8A8Linear.from_weight(w, None, outliers=idx)(x).double() - ref).abs().max() / scale
    assert kept < 3e-2 and plain > 30 * kept, (plain.item(), kept.item())


def test_smoothing_and_outliers_together():
    w, b = gaussian(48, 100, seed=28), gaussian(48, seed=29)
    smooth = torch.rand(100, generator=torch.Generator().manual_seed(30)) + 0.5
    idx = torch.tensor([0, 50])
    layer = W8A8Linear.from_weight(w, b, smooth=smooth, outliers=idx)
    assert torch.equal(layer.outlier_weight, w[:, idx] / smooth[idx])  # stored for the smoothed input
    assert torch.allclose(layer.dequantized_weight()[:, idx], w[:, idx], rtol=1e-6, atol=0)
    x = gaussian(17, 100, seed=31)
    assert rel_err(layer(x), F.linear(x, w, b)) < 3e-2
    text = repr(layer)
    assert "smooth=True" in text and "fp_outlier_channels=2" in text


# -- dtype casts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_keeps_fp32_parts(backend, dtype):
    w, b = gaussian(48, 100, seed=32, scale=1e-3), gaussian(48, seed=33)  # scales ~3e-5: fp16 subnormal
    smooth = torch.rand(100, generator=torch.Generator().manual_seed(34)) + 0.5
    layer = W8A8Linear.from_weight(w, b, smooth=smooth, outliers=torch.tensor([7]), backend=backend)
    kept = {n: getattr(layer, n).clone() for n in ("scale", "bias", "smooth", "outlier_weight")}
    x = gaussian(3, 100, seed=35)
    want = layer(x)
    layer.to(dtype)
    assert layer.qweight.dtype == torch.int8 and layer.outlier_index.dtype == torch.long
    for name, value in kept.items():
        assert getattr(layer, name).dtype == torch.float32 and torch.equal(getattr(layer, name), value), name
    y = layer(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, want) < FP16_REL_TOL
    layer.float()
    assert torch.equal(layer(x), want)


def test_half_keeps_large_activations_finite():
    # LLM-like magnitudes: fp16 activations of ~30, weights ~N(0, 0.02)
    w = gaussian(64, 1024, seed=36, scale=0.02)
    layer = W8A8Linear.from_weight(w, None).half()
    x = gaussian(2, 1024, seed=37, scale=30).half()
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel_err(y, F.linear(x.float(), w)) < 3e-2


def test_state_dict_holds_integers_and_fp32_parts():
    w = gaussian(48, 100, seed=38)
    layer = W8A8Linear.from_weight(w, gaussian(48, seed=39), smooth=torch.ones(100) * 2,
                                   outliers=torch.tensor([1, 2]))
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "bias", "smooth", "outlier_index", "outlier_weight"}
    assert sd["qweight"].dtype == torch.int8 and sd["outlier_index"].dtype == torch.long
    fresh = W8A8Linear(100, 48, bias=True, n_outliers=2, smooth=True, backend=layer.backend)
    fresh.load_state_dict(sd)
    x = gaussian(3, 100, seed=40)
    assert torch.equal(fresh(x), layer(x))
    plain = W8A8Linear.from_weight(w, None)
    assert set(plain.state_dict()) == {"qweight", "scale"}
    assert torch.equal(dequantize(plain.quantized_weight()), plain.dequantized_weight())
