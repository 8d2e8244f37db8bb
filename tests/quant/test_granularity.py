"""Per-group and per-tensor INT8 weights: layout, error bounds, accuracy, edge values, modules, scheme names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetero_llm.config import QuantConfig
from hetero_llm.errors import InvalidOptionError, NonFiniteWeightError
from hetero_llm.quant import Int8Linear, QuantizedWeight, dequantize, sqnr_db
from hetero_llm.quant.backends import BACKENDS, int8pack_available
from hetero_llm.quant.primitives import QMAX_ASYM, QMAX_SYM, QMIN_ASYM, QMIN_SYM, quantize_weight
from hetero_llm.quant.schemes import QuantSpec, spec_for_options

# Accuracy targets and tolerances, in one place.
# W8A16 on Gaussian weights. Measured (seed 0): per channel sym 42.50 / asym 43.14 dB at 256x512,
# 42.80 / 43.45 at 96x384; per group of 128: 43.69 / 44.51; of 64: 44.43 / 45.41.
MIN_SQNR_DB = 43.0
# Symmetric per-channel misses 43 dB on Gaussian weights: a row of 384-512 N(0, 1) values has
# max |w| ~ 3.1, so the step is ~3.1/127 and the rounding noise step^2/12 gives ~42.5-42.8 dB.
# That is the math of absmax INT8, not a bug; reported rather than lowering the target.
SYM_CHANNEL_BELOW_TARGET = "sym per-channel INT8 on Gaussian weights measures 42.5-42.8 dB (< 43 dB target)"
MAX_ERROR_STEPS = 0.5 + 1e-6  # |w - dequant| in units of its group's scale: round to nearest
# Max |y - ref| / max |ref| against F.linear on the dequantized weight, by backend (fp32 input).
REL_TOL = {"torch-dequant": 1e-5, "cpu-int8pack": 1e-2, "cpu-vnni": 1e-2}
TO_FLOAT_REL_TOL = 2e-2  # the INT8 layer against the original float layer

GRANULARITY_CASES = [("channel", None), ("group", 128), ("group", 64)]
SHAPES = [(256, 512), (96, 384)]


def gaussian(rows: int, cols: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) + shift) * scale


def per_element_scale(qw: QuantizedWeight) -> torch.Tensor:
    """The scale that applies to each element of the (out, in) weight."""
    if qw.scale.dim() == 1:
        return qw.scale[:, None].expand_as(qw.qweight)
    return qw.scale.repeat_interleave(qw.group_size, dim=1)


def quantize(w, asym: bool, granularity: str, group_size: int | None, name: str = "weight"):
    return quantize_weight(w, name, asymmetric=asym, granularity=granularity, group_size=group_size or 128)


# -- layout -----------------------------------------------------------------------------

@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 384])
def test_group_layout(asym, group_size):
    w = gaussian(96, 384, seed=1, shift=0.3)
    qw = quantize(w, asym, "group", group_size)
    groups = 384 // group_size
    assert qw.qweight.shape == (96, 384) and qw.qweight.dtype == torch.int8 and qw.qweight.is_contiguous()
    assert qw.scale.shape == (96, groups) and qw.scale.dtype == torch.float32
    assert qw.group_size == group_size
    assert torch.equal(qw.scale, qw.scale.bfloat16().float())  # bf16-exact, like per-channel scales
    lo, hi = (QMIN_ASYM, QMAX_ASYM) if asym else (QMIN_SYM, QMAX_SYM)
    assert lo <= int(qw.qweight.min()) and int(qw.qweight.max()) <= hi
    if asym:
        assert qw.zero_point.shape == (96, groups) and qw.zero_point.dtype == torch.int32
    else:
        assert qw.zero_point is None


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_tensor_layout_repeats_one_scale_per_row(asym):
    w = gaussian(40, 96, seed=2, shift=0.5)
    qw = quantize(w, asym, "tensor", None)
    assert qw.scale.shape == (40,) and qw.group_size is None  # reads as per-channel to every kernel
    assert torch.all(qw.scale == qw.scale[0])
    span = (w.max() - w.min().clamp(max=0)) if asym else w.abs().max()
    levels = (QMAX_ASYM - QMIN_ASYM) if asym else QMAX_SYM
    assert qw.scale[0] >= span / levels and qw.scale[0] <= span / levels * (1 + 2 ** -7)  # rounded up to bf16
    if asym:
        assert qw.zero_point.shape == (40,) and torch.all(qw.zero_point == qw.zero_point[0])
    # one tensor-wide step: the weight's extremes use the integer range's ends
    assert int(qw.qweight.max()) >= QMAX_SYM - 1


def test_group_size_property():
    w = gaussian(8, 64)
    assert quantize(w, False, "channel", None).group_size is None
    assert quantize(w, False, "tensor", None).group_size is None
    assert quantize(w, True, "group", 16).group_size == 16
    assert QuantizedWeight(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 3)).group_size == 32


def test_scales_are_independent_per_group():
    w = gaussian(16, 256, seed=3)
    w2 = w.clone()
    w2[:, 64:128] *= 1000.0  # only group 1 of each row changes
    a, b = quantize(w, False, "group", 64), quantize(w2, False, "group", 64)
    keep = [0, 2, 3]
    assert torch.equal(a.scale[:, keep], b.scale[:, keep])
    assert torch.equal(a.qweight[:, :64], b.qweight[:, :64]) and torch.equal(a.qweight[:, 128:], b.qweight[:, 128:])
    assert torch.all(b.scale[:, 1] > 500 * a.scale[:, 1])


# -- error bounds and accuracy ------------------------------------------------------------

@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group_size", [("group", 32), ("group", 64), ("group", 128),
                                                     ("tensor", None), ("channel", None)])
def test_round_trip_error_is_half_a_step_per_group(asym, granularity, group_size):
    worst = 0.0
    for mag in (1e-30, 1e-3, 1.0, 1e30):
        for shift in (0.0, 0.5, -2.0):
            w = gaussian(96, 384, seed=4, scale=mag, shift=shift)
            qw = quantize(w, asym, granularity, group_size)
            d = dequantize(qw)
            assert torch.isfinite(d).all()
            steps = ((w.double() - d.double()).abs() / per_element_scale(qw).double()).max().item()
            worst = max(worst, steps)
    assert worst <= MAX_ERROR_STEPS


def sqnr_cases():
    for shape in SHAPES:
        for granularity, group_size in GRANULARITY_CASES:
            for asym in (False, True):
                marks = ()
                if granularity == "channel" and not asym:
                    marks = pytest.mark.xfail(strict=True, reason=SYM_CHANNEL_BELOW_TARGET)
                ident = f"{shape[0]}x{shape[1]}-{'asym' if asym else 'sym'}-{granularity}{group_size or ''}"
                yield pytest.param(shape, granularity, group_size, asym, marks=marks, id=ident)


@pytest.mark.parametrize("shape, granularity, group_size, asym", list(sqnr_cases()))
def test_w8a16_sqnr_on_gaussian_weights(shape, granularity, group_size, asym):
    w = gaussian(*shape, seed=0)
    db = sqnr_db(w, dequantize(quantize(w, asym, granularity, group_size)))
    assert db >= MIN_SQNR_DB, f"{db:.2f} dB"


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_smaller_groups_are_more_accurate(asym):
    w = gaussian(96, 384, seed=5)
    cases = [("tensor", None), ("channel", None), ("group", 128), ("group", 32)]  # coarse to fine
    db = [sqnr_db(w, dequantize(quantize(w, asym, gr, g))) for gr, g in cases]
    assert all(b > a + 0.3 for a, b in zip(db, db[1:])), db


# -- edge values ----------------------------------------------------------------------------

@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_all_zero_groups(asym):
    w = gaussian(8, 256, seed=6, shift=0.2)
    w[2, 64:128] = 0.0  # one group of one row
    w[5] = 0.0  # a whole row
    qw = quantize(w, asym, "group", 64)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert qw.scale[2, 1] == 1.0 and torch.all(qw.scale[5] == 1.0)  # any scale is exact for zeros
    d = dequantize(qw)
    assert torch.all(d[2, 64:128] == 0) and torch.all(d[5] == 0)
    assert torch.all(qw.qweight[2, 64:128] == 0)  # zero point 0: no kernel has to cancel terms
    if asym:
        assert qw.zero_point[2, 1] == 0
    others = torch.ones_like(w, dtype=torch.bool)
    others[2, 64:128] = False
    others[5] = False
    assert sqnr_db(w[others], d[others]) >= MIN_SQNR_DB  # neighbours unaffected
    assert torch.all(dequantize(quantize(torch.zeros(4, 128), asym, "group", 32)) == 0)
    assert torch.all(dequantize(quantize(torch.zeros(4, 128), asym, "tensor", None)) == 0)


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_tiny_and_huge_groups_in_one_row_stay_finite_and_accurate(asym):
    w = gaussian(16, 192, seed=7, shift=0.1)
    w[:, :64] *= 1e-30
    w[:, 64:128] *= 1e30
    qw = quantize(w, asym, "group", 64)
    d = dequantize(qw)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all() and torch.isfinite(d).all()
    for g in range(3):  # each group keeps its own accuracy, whatever its neighbours hold
        cols = slice(64 * g, 64 * (g + 1))
        assert sqnr_db(w[:, cols], d[:, cols]) >= MIN_SQNR_DB - 3, g


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("mag", [1e-30, 1e30])
@pytest.mark.parametrize("granularity, group_size", [("group", 64), ("tensor", None)])
def test_extreme_magnitudes_never_give_nan_or_inf(asym, mag, granularity, group_size):
    w = gaussian(12, 128, seed=8, scale=mag, shift=-0.3)
    qw = quantize(w, asym, granularity, group_size)
    d = dequantize(qw)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all() and torch.isfinite(d).all()
    assert sqnr_db(w, d) >= 35.0
    mixed = w.clone()
    mixed[0, 0] = 1e30 if mag < 1 else 1e-30  # both ends of fp32 in one tensor
    dm = dequantize(quantize(mixed, asym, granularity, group_size))
    assert torch.isfinite(dm).all() and not dm.isnan().any()


def test_full_fp32_range_per_group_and_tensor_stays_finite():
    w = torch.tensor([[3e38, -3e38, 1.0, 0.0], [1e-38, -1e-38, 0.0, 2.0]])
    for asym in (False, True):
        for granularity, group_size in [("group", 2), ("tensor", None)]:
            assert torch.isfinite(dequantize(quantize(w, asym, granularity, group_size))).all()


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group_size", [("group", 64), ("tensor", None)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_the_module(asym, granularity, group_size, bad):
    w = gaussian(8, 128, seed=9)
    w[3, 70] = bad
    with pytest.raises(NonFiniteWeightError, match=r"model\.layers\.1\.mlp\.down_proj") as info:
        quantize(w, asym, granularity, group_size, name="model.layers.1.mlp.down_proj")
    assert "quantize='none'" in str(info.value)
    lin = nn.Linear(128, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    scheme = f"{'int8-asym' if asym else 'int8'}:{'tensor' if group_size is None else f'g{group_size}'}"
    with pytest.raises(NonFiniteWeightError, match=r"lm_head"):
        Int8Linear.from_linear(lin, scheme, name="lm_head")


@pytest.mark.parametrize("group_size", [100, 7, 0, -64, 1000])
def test_group_size_must_divide_in_features(group_size):
    w = gaussian(8, 384)
    with pytest.raises(InvalidOptionError, match="group_size") as info:
        quantize_weight(w, "w", granularity="group", group_size=group_size)
    assert "in_features=384" in str(info.value) and "per-channel" in str(info.value)


def test_unknown_granularity_is_refused():
    with pytest.raises(InvalidOptionError, match="granularity"):
        quantize_weight(gaussian(4, 64), granularity="row")
    with pytest.raises(InvalidOptionError, match="group_size"):
        Int8Linear.from_linear(nn.Linear(96, 8), "int8:g64")
    with pytest.raises(InvalidOptionError, match="per-channel weight scales"):
        QuantConfig(scheme="w8a8", granularity="group")


# -- Int8Linear with per-group and per-tensor scales ------------------------------------------

def make_linear(in_f: int, out_f: int = 37, bias: bool = True, seed: int = 0, shift: float = 0.0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) + shift)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def expected_backend(scheme: str) -> str:
    # cpu-int8pack takes one scale per output channel: per-group weights use the reference.
    # A per-tensor weight repeats its scale on every row, so the per-channel kernel runs it.
    if ":g" in scheme or not int8pack_available():
        return "torch-dequant"
    if not scheme.startswith("int8-asym") and BACKENDS["cpu-vnni"].supports(128, torch.device("cpu")):
        return "cpu-vnni"  # hetero_llm's VNNI GEMV, where this CPU has it (in_features 128 here)
    return "cpu-int8pack"


@pytest.mark.parametrize("scheme", ["int8:g64", "int8-asym:g64", "int8:g32", "int8:tensor", "int8-asym:tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_f_linear_on_dequantized_weight(scheme, bias):
    lin = make_linear(192, bias=bias, shift=0.2 if "asym" in scheme else 0.0)
    layer = Int8Linear.from_linear(lin, scheme)
    spec = QuantSpec.parse(scheme)
    assert layer.scheme == scheme and layer.backend == expected_backend(scheme)
    assert layer.group_size == (spec.group_size if spec.granularity == "group" else None)
    assert (layer.zero_point is not None) == spec.asymmetric
    w = layer.dequantized_weight()
    assert (w - lin.weight).abs().max() <= 0.5 * per_element_scale(layer.quantized_weight()).max() + 1e-6
    g = torch.Generator().manual_seed(1)
    for rows in (1, 5, 17, 64):
        x = torch.randn(rows, 192, generator=g)
        y = layer(x)
        assert y.shape == (rows, 37) and y.dtype == torch.float32
        want = F.linear(x.double(), w.double(), None if lin.bias is None else lin.bias.double())
        assert rel_err(y, want) < REL_TOL[layer.backend], rows
        assert rel_err(y, lin(x).detach()) < TO_FLOAT_REL_TOL, rows
    x3 = torch.randn(2, 3, 192, generator=g)
    assert layer(x3).shape == (2, 3, 37)


def test_int8pack_is_never_used_with_group_scales():
    lin = make_linear(128)
    layer = Int8Linear.from_linear(lin, "int8:g64", backend="cpu-int8pack")
    assert layer.backend == "torch-dequant"
    assert not BACKENDS["cpu-int8pack"].supports(128, torch.device("cpu"), 64)
    assert BACKENDS["torch-dequant"].supports(128, torch.device("cpu"), 64)


@pytest.mark.parametrize("scheme", ["int8:g64", "int8-asym:g32"])
def test_group_layer_state_dict_round_trip_and_half_cast(scheme):
    layer = Int8Linear.from_linear(make_linear(128), scheme)
    spec = QuantSpec.parse(scheme)
    sd = layer.state_dict()
    assert sd["scale"].shape == (37, 128 // spec.group_size)
    fresh = Int8Linear(128, 37, bias=True, asymmetric=spec.asymmetric, group_size=spec.group_size,
                       scheme=scheme)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fresh(x), layer(x))
    scale = layer.scale.clone()
    layer.half()
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    y = layer(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel_err(y, fresh(x)) < 5e-3


# -- scheme names ------------------------------------------------------------------------------

SCHEME_FORMS = {
    "int8": QuantSpec(),
    "int8-asym": QuantSpec(asymmetric=True),
    "int8:g128": QuantSpec(granularity="group", group_size=128),
    "int8:g64": QuantSpec(granularity="group", group_size=64),
    "int8:g1": QuantSpec(granularity="group", group_size=1),
    "int8-asym:g32": QuantSpec(asymmetric=True, granularity="group", group_size=32),
    "int8:tensor": QuantSpec(granularity="tensor"),
    "int8-asym:tensor": QuantSpec(asymmetric=True, granularity="tensor"),
    "w8a8": QuantSpec(activations=True),
}


@pytest.mark.parametrize("text", SCHEME_FORMS)
def test_quant_spec_round_trip(text):
    spec = QuantSpec.parse(text)
    assert spec == SCHEME_FORMS[text]
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec
    assert spec.describe()


def test_spec_for_options_matches_parse():
    for scheme in ("int8", "int8-asym"):
        for granularity, size in [("channel", 128), ("group", 64), ("tensor", 128)]:
            spec = spec_for_options(scheme, granularity, size)
            assert QuantSpec.parse(str(spec)) == spec
    assert str(spec_for_options("w8a8", "channel", 128)) == "w8a8"
    assert "per group of 64" in QuantSpec.parse("int8:g64").describe()
    assert "per tensor" in QuantSpec.parse("int8-asym:tensor").describe()
    assert "W8A8" in QuantSpec.parse("w8a8").describe()


@pytest.mark.parametrize("text", ["", "int4", "INT8", " int8", "int8-sym", "int8:", "int8:g", "int8:g0",
                                  "int8:g-1", "int8:g1.5", "int8:G64", "int8:64", "int8:channel",
                                  "int8:tensor:g64", "int8:g64:tensor", "w8a8:g64", "w8a8:tensor",
                                  "int8:g\u0666\u0664"])
def test_bad_scheme_strings_are_refused(text):
    with pytest.raises(InvalidOptionError, match=r"int8|granularity"):
        QuantSpec.parse(text)
