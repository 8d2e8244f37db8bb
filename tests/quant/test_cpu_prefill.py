"""The INT8 weight-only prompt GEMM: each strategy right, the fastest one chosen per CPU and cached."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hetero_llm.errors import InvalidOptionError
from hetero_llm.quant import cpu_prefill
from hetero_llm.quant.modules import Int8Linear

# Relative error bound of each strategy against the dequantized weight in fp32 (max |error| over
# max |output|): two int8 levels ~15 bits, bf16 activations ~8 bits, fp32 rounding only.
BOUNDS = {"int8x2": 2e-4, "bf16": 1e-2, "fp32": 1e-5}


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_prefill.ENV, raising=False)
    cpu_prefill.chosen.cache_clear()
    yield
    cpu_prefill.chosen.cache_clear()


def layer(scheme: str, k: int = 192, n: int = 320) -> Int8Linear:
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(k, n), scheme, backend="cpu-int8pack")


@pytest.mark.parametrize("scheme", ["int8", "int8-asym"])
@pytest.mark.parametrize("strategy", cpu_prefill.STRATEGIES)
def test_each_strategy_computes_the_dequantized_linear(strategy, scheme):
    if strategy not in cpu_prefill.available():
        pytest.skip("torch._int_mm is not exact on this CPU")
    m = layer(scheme)
    x = torch.randn(40, m.in_features) * torch.logspace(-2, 1, m.in_features)  # outlier-like channels
    want = x @ m.dequantized_weight().T
    got = cpu_prefill.MATMULS[strategy](x, m)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() <= BOUNDS[strategy] * want.abs().max()


@pytest.mark.parametrize("strategy", cpu_prefill.STRATEGIES)
def test_the_timed_step_computes_what_a_layer_computes(strategy):
    # The choice is timed on GEMM + epilogue; a step that skipped work would win unfairly.
    if strategy not in cpu_prefill.available():
        pytest.skip("torch._int_mm is not exact on this CPU")
    m = layer("int8")
    x = torch.randn(40, m.in_features)
    y = x @ m.dequantized_weight().T
    residual = torch.randn_like(y)
    added = cpu_prefill._with_epilogue(strategy, x, m, "add", residual)
    gated = cpu_prefill._with_epilogue(strategy, x, m, "silu_glu")
    gate, up = y.chunk(2, dim=1)
    for got, want in ((added, y + residual), (gated, torch.nn.functional.silu(gate) * up)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= BOUNDS[strategy] * 4 * want.abs().max()


def test_rows_of_zeros_and_tiny_values_stay_finite():
    m = layer("int8")
    x = torch.zeros(20, m.in_features)
    x[1] = 1e-30
    x[2, 0] = 3.0
    for strategy in cpu_prefill.available():
        y = cpu_prefill.MATMULS[strategy](x, m)
        assert torch.isfinite(y).all(), strategy
        assert torch.equal(y[0], torch.zeros_like(y[0])), strategy


def test_the_module_uses_the_prefill_gemm_for_prompts_only(monkeypatch):
    m = layer("int8")
    calls = []
    original = cpu_prefill.MATMULS["fp32"]
    monkeypatch.setitem(cpu_prefill.MATMULS, "fp32", lambda x, l: calls.append(x.shape[0]) or original(x, l))
    monkeypatch.setenv(cpu_prefill.ENV, "fp32")
    x = torch.randn(2, 24, m.in_features)
    y = m(x)
    m(torch.randn(1, 1, m.in_features))  # decode: the GEMV
    assert calls == [48]
    assert torch.allclose(y, x @ m.dequantized_weight().T + m.bias, rtol=0, atol=1e-4)


def test_the_choice_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    timings = {"small": {"int8x2": 3.0, "bf16": 1.0, "fp32": 2.0}, "large": {"int8x2": 5.0, "bf16": 9.0, "fp32": 7.0}}
    shapes = {v: k for k, v in cpu_prefill.TIMING_SHAPES.items()}
    monkeypatch.setattr(cpu_prefill, "available", lambda: cpu_prefill.STRATEGIES)
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: timings[shapes[shape]])
    assert cpu_prefill.strategy(2**20) == "bf16"
    assert cpu_prefill.strategy(16 * 2**20) == "int8x2"
    saved = json.loads(next((tmp_path / "machine").glob("cpu-prefill-*.json")).read_text())
    assert saved["strategy"] == {"small": "bf16", "large": "int8x2"} and saved["ms"] == timings

    cpu_prefill.chosen.cache_clear()  # a new process: read back, not measured again
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: pytest.fail("measured twice"))
    assert cpu_prefill.strategy(2**20) == "bf16"


def test_a_cached_choice_this_build_cannot_run_is_measured_again(monkeypatch, tmp_path):
    path = cpu_prefill._cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"strategy": {"small": "int8x2", "large": "int8x2"}}))
    monkeypatch.setattr(cpu_prefill, "available", lambda: ("bf16", "fp32"))
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: {"bf16": 2.0, "fp32": 1.0})
    assert cpu_prefill.strategy() == "fp32"


def test_the_environment_forces_a_strategy(monkeypatch):
    monkeypatch.setattr(cpu_prefill, "measure", lambda shape: pytest.fail("forced: nothing to measure"))
    monkeypatch.setenv(cpu_prefill.ENV, "fp32")
    assert cpu_prefill.strategy() == "fp32"
    monkeypatch.setenv(cpu_prefill.ENV, "int4")
    with pytest.raises(InvalidOptionError, match="int8x2, bf16, fp32"):
        cpu_prefill.strategy()
    monkeypatch.setattr(cpu_prefill, "available", lambda: ("bf16", "fp32"))
    monkeypatch.setenv(cpu_prefill.ENV, "int8x2")
    with pytest.raises(InvalidOptionError, match="not exact on this CPU"):
        cpu_prefill.strategy()


CAPPED = """
import torch
from torch import nn
from hetero_llm.quant import cpu_prefill
from hetero_llm.quant.modules import Int8Linear
torch.manual_seed(0)
m = Int8Linear.from_linear(nn.Linear(256, 512), "int8", backend="cpu-int8pack")
x = torch.randn(64, 256)
want = x @ m.dequantized_weight().T + m.bias
err = ((m(x) - want).abs().max() / want.abs().max()).item()
print(cpu_prefill.available(), cpu_prefill.strategy(), err)
assert err < 1e-2, err
"""


@pytest.mark.parametrize("caps", [{"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                                  {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}], ids=["avx2", "avx512-no-bf16"])
def test_capped_isa_levels_compute_right(caps, tmp_path):
    """On AVX2, oneDNN's int8 GEMM saturates (errors ~10% of the output): int8x2 must not be chosen."""
    env = dict(os.environ, HETERO_LLM_CACHE=str(tmp_path), **caps)
    env.pop(cpu_prefill.ENV, None)
    out = subprocess.run([sys.executable, "-c", CAPPED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    if caps.get("ONEDNN_MAX_CPU_ISA") == "AVX2":
        assert "int8x2" not in out.stdout.split(")")[0]


def native_or_skip():
    native = cpu_prefill._native()
    if native is None:
        pytest.skip("hetero_llm's compiled CPU helpers are not built here (AVX-512 VNNI and a compiler)")
    return native


@pytest.mark.parametrize("k", [64, 100, 576])
def test_the_compiled_split_matches_torch(k):
    native = native_or_skip()
    x = torch.randn(33, k) * torch.logspace(-3, 1, k)
    x[0] = 0.0
    q, s1 = native.split_levels(x)
    q_ref, s1_ref, _, _ = cpu_prefill.split_two_levels(x)
    assert q.dtype == torch.int8 and q.shape == (66, k) and torch.equal(s1, s1_ref)
    assert (q != q_ref).float().mean() < 1e-3  # a rounding tie may fall the other way, nothing more
    rebuilt = s1 * (q[:33].float() + q[33:].float() / cpu_prefill.LEVEL_RATIO)
    assert (rebuilt - x).abs().max() <= s1.max() / 500


def test_the_compiled_and_torch_paths_agree(monkeypatch):
    native_or_skip()
    m = layer("int8", k=576, n=320)
    x = torch.randn(50, 576)
    native = cpu_prefill.int8x2_matmul(x, m)
    monkeypatch.setenv(cpu_prefill.NATIVE_ENV, "0")
    in_torch = cpu_prefill.int8x2_matmul(x, m)
    assert (native - in_torch).abs().max() <= 1e-5 * in_torch.abs().max()


def test_a_more_accurate_strategy_wins_a_near_tie():
    assert cpu_prefill.pick({"int8x2": 1.05, "bf16": 1.0, "fp32": 3.0}) == "int8x2"
    assert cpu_prefill.pick({"int8x2": 1.2, "bf16": 1.0, "fp32": 3.0}) == "bf16"
    assert cpu_prefill.pick({"int8x2": 2.0, "bf16": 4.0, "fp32": 2.1}) == "fp32"
    assert cpu_prefill.pick({"bf16": 4.0, "fp32": 2.1}) == "fp32"


# ----------------------------------------------------------------------------- fused epilogues


def unbiased(scheme: str, k: int, n: int = 320) -> Int8Linear:
    """Decoder layers' o/down/gate_up projections have no bias (a biased one runs the plain ops)."""
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(k, n, bias=False), scheme, backend="cpu-int8pack")


@pytest.mark.parametrize("n", [320, 330])  # 330: a tail past the 16-lane loop
def test_the_fused_epilogues_equal_the_separate_ops(monkeypatch, n):
    native_or_skip()
    monkeypatch.setenv(cpu_prefill.ENV, "int8x2")
    m = unbiased("int8", k=576, n=n)
    x, residual = torch.randn(40, 576), torch.randn(40, n)
    plain = cpu_prefill.int8x2_matmul(x, m)
    added = cpu_prefill.fused_prefill_matmul(x, m, "add", residual)
    assert (added - (plain + residual)).abs().max() <= 1e-6 * (plain + residual).abs().max()
    gate, up = plain.split(n // 2, dim=1)
    glu = cpu_prefill.fused_prefill_matmul(x, m, "silu_glu")
    want = torch.nn.functional.silu(gate) * up
    assert glu.shape == (40, n // 2) and (glu - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_fused_epilogue_is_declined_where_its_gemm_is_not_used(monkeypatch):
    native_or_skip()
    monkeypatch.setenv(cpu_prefill.ENV, "int8x2")
    m = unbiased("int8", k=576)
    prompt, residual = torch.randn(2, 20, 576), torch.randn(2, 20, 320)
    assert m.forward_fused(prompt, "add", residual).shape == (2, 20, 320)
    assert m.forward_fused(prompt[:, :4], "add", residual[:, :4]) is None  # decode rows: the GEMV
    assert m.forward_fused(prompt.bfloat16(), "add", residual) is None  # would round differently
    assert unbiased("int8-asym", k=576).forward_fused(prompt, "add", residual) is None  # zero points
    assert layer("int8", k=576).forward_fused(prompt, "add", residual) is None  # a bias
    monkeypatch.setenv(cpu_prefill.ENV, "fp32")
    assert m.forward_fused(prompt, "add", residual) is None  # another GEMM: nothing to fuse into
    with pytest.raises(ValueError):
        cpu_prefill.fused_prefill_matmul(prompt[0], m, "gelu")


def test_a_gated_mlp_and_a_residual_projection_give_the_same_prompt_output(monkeypatch):
    from hetero_llm.kernels.dispatch import project_add
    from hetero_llm.fused.modules import GatedMLP
    native_or_skip()
    monkeypatch.setenv(cpu_prefill.ENV, "int8x2")
    mlp = GatedMLP(unbiased("int8", k=576, n=2 * 320), unbiased("int8", k=320, n=576), nn.SiLU(), 320)
    x, residual = torch.randn(1, 30, 576), torch.randn(1, 30, 576)
    h = x[..., :320].contiguous()
    with torch.inference_mode():
        fused, fused_add = mlp(x, residual), project_add("torch", mlp.down_proj, h, residual)
        monkeypatch.setattr(Int8Linear, "forward_fused", lambda self, *a: None)
        separate, separate_add = mlp(x, residual), project_add("torch", mlp.down_proj, h, residual)
    assert (fused - separate).abs().max() <= 1e-5 * separate.abs().max()
    assert (fused_add - separate_add).abs().max() <= 1e-6 * separate_add.abs().max()
