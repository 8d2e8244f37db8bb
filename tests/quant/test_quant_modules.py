"""Int8Linear: every backend against an fp64 reference, both matmul paths, odd shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hetero_llm.quant import Int8Linear, dequantize
from hetero_llm.quant.backends import BACKENDS, GEMV_MAX_ROWS, int8pack_available, pick_backend

# Max |y - ref| / max |ref|, ref = x @ dequant(W).T + b in fp64, by (backend, input dtype).
# torch-dequant on fp32 is the exact dequantized matmul; cpu-int8pack feeds bf16 activations;
# bf16 inputs also get a bf16 output (one more rounding, 2**-9 relative).
REL_TOL = {
    ("torch-dequant", torch.float32): 1e-5,
    ("cpu-int8pack", torch.float32): 1e-2,
    ("torch-dequant", torch.bfloat16): 1.5e-2,
    ("cpu-int8pack", torch.bfloat16): 1.5e-2,
    ("torch-dequant", torch.float16): 5e-3,
    ("cpu-int8pack", torch.float16): 1e-2,
    # cpu-vnni: ~15-bit activations in, fp32 out; only the output cast rounds.
    ("cpu-vnni", torch.float32): 1e-4,
    ("cpu-vnni", torch.bfloat16): 1.5e-2,
    ("cpu-vnni", torch.float16): 5e-3,
}
ROWS = (1, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 64)  # both sides of the GEMV/GEMM switch
OUT_FEATURES = 48

needs_int8pack = pytest.mark.skipif(not int8pack_available(), reason="no usable int8pack kernel in this torch")


def make_linear(in_f: int, out_f: int = OUT_FEATURES, bias: bool = True, seed: int = 0,
                one_sided: bool = False) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        w = torch.randn(out_f, in_f, generator=g)
        lin.weight.copy_(w.abs() + 0.1 if one_sided else w)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantized_weight(torch.float64).T
    return y + layer.bias.double() if layer.bias is not None else y


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def cases():
    for backend in ("cpu-int8pack", "torch-dequant"):
        for in_f in (64, 48, 40, 33):
            if backend == "cpu-int8pack" and in_f % 16:
                continue
            yield backend, in_f


@pytest.mark.parametrize("backend, in_f", list(cases()))
@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_reference(backend, in_f, scheme, bias, dtype):
    if backend == "cpu-int8pack" and not int8pack_available():
        pytest.skip("no usable int8pack kernel in this torch")
    lin = make_linear(in_f, bias=bias, one_sided=scheme == "int8-asym")
    layer = Int8Linear.from_linear(lin, scheme, backend=backend)
    assert layer.backend == backend and layer.scheme == scheme
    g = torch.Generator().manual_seed(in_f)
    for rows in ROWS:
        x = torch.randn(rows, in_f, generator=g).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (rows, OUT_FEATURES)
        err = rel_err(y, reference(layer, x))
        assert err < REL_TOL[(backend, dtype)], f"rows={rows}: {err}"


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_quantized_layer_is_close_to_float_layer(scheme):
    lin = make_linear(64)
    layer = Int8Linear.from_linear(lin, scheme)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    want = lin(x).detach().double()
    assert rel_err(layer(x), want) < 2e-2


@needs_int8pack
@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_backends_agree(scheme):
    lin = make_linear(64)
    fast = Int8Linear.from_linear(lin, scheme, backend="cpu-int8pack")
    ref = Int8Linear.from_linear(lin, scheme, backend="torch-dequant")
    x = torch.randn(GEMV_MAX_ROWS + 1, 64, generator=torch.Generator().manual_seed(2))
    assert rel_err(fast(x), ref(x).double()) < REL_TOL[("cpu-int8pack", torch.float32)]
    # the GEMV (<= 16 rows) and GEMM paths give the same rows the same answer
    assert rel_err(fast(x[:GEMV_MAX_ROWS]), fast(x)[:GEMV_MAX_ROWS].double()) < 1e-2


def test_leading_dimensions_are_kept():
    layer = Int8Linear.from_linear(make_linear(64))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    assert y.shape == (2, 5, OUT_FEATURES)
    assert rel_err(y, reference(layer, x.reshape(-1, 64)).reshape(2, 5, -1)) < 1e-2


def test_backend_choice_by_in_features():
    assert Int8Linear.from_linear(make_linear(33)).backend == "torch-dequant"
    assert Int8Linear.from_linear(make_linear(40)).backend == "torch-dequant"
    expected = "cpu-int8pack" if int8pack_available() else "torch-dequant"
    if BACKENDS["cpu-vnni"].supports(64, torch.device("cpu")):
        expected = "cpu-vnni"  # hetero_llm's own GEMV where the CPU has AVX-512 VNNI
    assert Int8Linear.from_linear(make_linear(64)).backend == expected
    assert Int8Linear.from_linear(make_linear(48)).backend == ("cpu-int8pack" if int8pack_available()
                                                                 else "torch-dequant")  # 48 % 64 != 0
    assert pick_backend(64, torch.device("cpu"), "torch-dequant") == "torch-dequant"
    # a kernel asked for a shape it cannot run (a plan made for another model) is not used
    assert Int8Linear.from_linear(make_linear(40), backend="cpu-int8pack").backend == "torch-dequant"
    assert not BACKENDS["cpu-int8pack"].supports(64, torch.device("cuda"))
    assert BACKENDS["torch-dequant"].supports(33, torch.device("cpu"))


def test_from_gpt2_conv1d():
    torch.manual_seed(4)
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight stored (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = Int8Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (64, 48)
    x = torch.randn(3, 64)
    assert rel_err(layer(x), conv(x).detach().double()) < 2e-2


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="not a linear"):
        Int8Linear.from_linear(nn.Embedding(4, 4))


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_state_dict_holds_integers_and_scales(scheme):
    layer = Int8Linear.from_linear(make_linear(64), scheme)
    sd = layer.state_dict()
    expected = {"qweight", "scale", "bias"} | ({"zero_point"} if scheme == "int8-asym" else set())
    assert set(sd) == expected  # derived buffers are not saved
    assert sd["qweight"].dtype == torch.int8 and sd["scale"].dtype == torch.float32
    assert sd["bias"].dtype == torch.float32
    # load into a fresh module and get the same outputs
    fresh = Int8Linear(64, OUT_FEATURES, bias=True, asymmetric=scheme == "int8-asym", backend=layer.backend)
    fresh.load_state_dict(sd)
    fresh.load_quantized(fresh.quantized_weight(), fresh.bias)  # refresh derived buffers
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))


ZERO_ROW_CASES = [
    pytest.param("torch-dequant", "int8"),
    pytest.param("torch-dequant", "int8-asym"),
    pytest.param("cpu-int8pack", "int8", marks=needs_int8pack),
    pytest.param("cpu-int8pack", "int8-asym", marks=needs_int8pack),
]


@pytest.mark.parametrize("backend, scheme", ZERO_ROW_CASES)
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS + 1])
def test_all_zero_weight_rows_give_zero_outputs(backend, scheme, rows):
    lin = make_linear(64, bias=False)
    with torch.no_grad():
        lin.weight[[0, 7]] = 0.0
    layer = Int8Linear.from_linear(lin, scheme, backend=backend)
    y = layer(torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)))
    assert torch.isfinite(y).all()
    assert torch.all(y[:, [0, 7]] == 0)


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
def test_to_bfloat16_keeps_scale_fp32(scheme):
    lin = make_linear(64)
    layer = Int8Linear.from_linear(lin, scheme)
    scale = layer.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert layer.scale_bf16.dtype == torch.bfloat16 and torch.equal(layer.scale_bf16.float(), scale)
    assert layer.bias.dtype == torch.float32
    if scheme == "int8-asym":
        assert layer.zero_point.dtype == torch.int32
        assert torch.equal(layer.zero_scale, layer.zero_point.float() * scale)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert rel_err(layer(x), reference(layer, x)) < REL_TOL[(layer.backend, torch.bfloat16)]


def test_to_float16_keeps_small_scales_exact():
    lin = make_linear(64)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # per-row max ~3e-4: scales ~2e-6, deep in fp16's subnormals
    layer = Int8Linear.from_linear(lin, "int8")
    scale = layer.scale.clone()
    layer.to(torch.float16)
    assert torch.equal(layer.scale, scale)


@needs_int8pack
def test_transposed_input():
    layer = Int8Linear.from_linear(make_linear(64), backend="cpu-int8pack")
    x = torch.randn(64, 5).t()  # (5, 64), stride (1, 5)
    assert rel_err(layer(x), reference(layer, x)) < REL_TOL[("cpu-int8pack", torch.float32)]




def fp16_cases():
    yield pytest.param("torch-dequant")
    yield pytest.param("cpu-int8pack", marks=needs_int8pack)


@pytest.mark.parametrize("backend", list(fp16_cases()))
def test_fp16_activations_with_large_outputs_stay_finite(backend):
    # Realistic LLM magnitudes: weights ~N(0, 0.02), outputs of ~50 (fp16 handles this fine).
    lin = nn.Linear(1024, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 1024, generator=torch.Generator().manual_seed(30)) * 0.02)
    layer = Int8Linear.from_linear(lin, backend=backend)
    x = (torch.randn(2, 1024, generator=torch.Generator().manual_seed(31)) * 30).half()
    assert torch.isfinite(torch.nn.functional.linear(x, lin.weight.half())).all()  # fp16 itself copes
    y = layer(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference(layer, x)) < REL_TOL[(backend, torch.float16)]


@pytest.mark.parametrize("backend", list(fp16_cases()))
def test_fp16_activations_with_small_scales(backend):
    lin = make_linear(64, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # scales ~2e-6: fp16 subnormals
    layer = Int8Linear.from_linear(lin, backend=backend)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(32)).half()
    assert rel_err(layer(x), reference(layer, x)) < REL_TOL[(backend, torch.float16)]


@pytest.mark.parametrize("make_x", [lambda: torch.randn(5, 128)[:, :64],
                                    lambda: torch.randn(2, 64, 3).transpose(1, 2)])
def test_other_non_contiguous_inputs(make_x):
    layer = Int8Linear.from_linear(make_linear(64))
    x = make_x()
    assert rel_err(layer(x), reference(layer, x.reshape(-1, 64)).reshape(*x.shape[:-1], -1)) < 1e-2


def test_dequantized_weight_and_repr():
    lin = make_linear(40)
    layer = Int8Linear.from_linear(lin, "int8-asym")
    d = layer.dequantized_weight()
    assert torch.equal(d, dequantize(layer.quantized_weight()))
    assert (d - lin.weight).abs().max() < 2 * layer.scale.max()
    text = repr(layer)
    assert "in_features=40" in text and "scheme=int8-asym" in text and "backend=torch-dequant" in text


def test_backend_can_be_switched():
    layer = Int8Linear.from_linear(make_linear(64), backend="torch-dequant")
    x = torch.randn(2, 64)
    before = layer(x)
    if int8pack_available():
        layer.backend = "cpu-int8pack"
        assert rel_err(layer(x), before.double()) < 1e-2
    with pytest.raises(KeyError):
        layer.backend = "no-such-backend"
