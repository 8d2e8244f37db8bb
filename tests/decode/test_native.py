"""decode="native": the compiled CPU decode step (kernels/cpu_decode.cpp) and hetero_llm's greedy loop.

Each test compares against the same INT8 weights decoded by transformers' loop (decode="transformers"):
the native step splits activations exactly as the model's own INT8 GEMV does, so tokens must be
identical and logits equal to fp32 rounding. Both builds (AVX-512 VNNI and AVX2) run where the CPU
has them: HETERO_LLM_CPU_ISA=avx2 selects the AVX2 one on an AVX-512 machine.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.decode.native import NativeStep, native_problem
from hetero_llm.errors import HeteroLLMWarning, InvalidOptionError
from hetero_llm.integrations import hf_adapter as hf
from hetero_llm.integrations.transformers import spec_by_family
from hetero_llm.kernels import cpu_decode
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
BUILDS = [isa for isa in ("avx512_vnni", "avx2") if cpu_decode.best_isa() is not None
          and isa in cpu_decode.BUILDS and all(f in __import__("hetero_llm").hardware.inspect_hardware().cpu.isa
                                               for f in cpu_decode.BUILDS[isa][1])]
pytestmark = pytest.mark.skipif(not BUILDS or not cpu_decode.possible(),
                                reason="no AVX2/AVX-512 VNNI build, compiler or ninja on this machine")


@pytest.fixture(params=BUILDS)
def build(request, monkeypatch):
    monkeypatch.setenv(cpu_decode.ISA_ENV, request.param)
    assert cpu_decode.native_module().ISA == request.param
    return request.param


def tiny(model_type: str = "llama", layers: int = 2, **extra):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type], "num_hidden_layers": layers,
                                              **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def pair(model_type: str = "llama", **extra):
    """(transformers' loop, native step): the same INT8 weights accelerated both ways."""
    ref = tiny(model_type, **extra)
    ours = copy.deepcopy(ref)
    hetero_llm.accelerate(ref, device="cpu", decode="transformers")
    hetero_llm.accelerate(ours, device="cpu")
    assert ours.hetero_plan.model_settings["decode"] == "native"
    return ref, ours


def ids(seed=0, b=2, s=9):
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


# -- the kernel ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_is_the_exact_integer_product_of_the_two_levels(build, rows):
    module = cpu_decode.native_module()
    g = torch.Generator().manual_seed(rows)
    k = 3 * cpu_decode.K_MULTIPLE[build]
    x = torch.randn(rows, k, generator=g) * 3
    w = torch.randint(-127, 128, (37, k), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(37, generator=g) + 0.1, torch.randn(37, generator=g)
    got = module.int8_gemv(x, w, scale, w.sum(1, dtype=torch.int32), bias)
    want = x.double() @ (w.double() * scale.double()[:, None]).T + bias.double()
    # two int8 levels carry ~15 bits of each activation: error ~1e-4 of the output's scale
    assert (got.double() - want).abs().max() <= 5e-4 * want.abs().max()


def test_bad_shapes_are_refused_not_read_out_of_bounds(build):
    module = cpu_decode.native_module()
    w = torch.zeros(8, cpu_decode.K_MULTIPLE[build] + 1, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of"):
        module.int8_gemv(torch.zeros(1, w.shape[1]), w, torch.ones(8), torch.zeros(8, dtype=torch.int32),
                         torch.empty(0))
    with pytest.raises(RuntimeError, match="1..4"):
        w = torch.zeros(8, 64, dtype=torch.int8)
        module.int8_gemv(torch.zeros(5, 64), w, torch.ones(8), torch.zeros(8, dtype=torch.int32), torch.empty(0))


# -- tokens and logits ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type, extra", [("llama", {}), ("mistral", dict(sliding_window=None)),
                                               ("qwen2", {}), ("gemma", {})])
def test_native_generate_gives_transformers_tokens(build, model_type, extra):
    """Qwen2 has q/k/v biases, Gemma GELU-tanh, (1 + w) norms and a scaled embedding. (A sliding window
    needs a sliding cache: such configs keep transformers' loop, see test_decode.py.)"""
    ref, ours = pair(model_type, **extra)
    for batch in (1, 2):
        x = ids(batch, b=batch)
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(x))
        assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    report = ours.hetero_decode.report()
    assert report["mode"] == "native" and report["native_steps"] == 2 * 11 and report["eager_steps"] == 0


def test_native_logits_match_the_eager_step(build):
    from hetero_llm.decode.step import DecodeStep

    _, ours = pair(layers=3)
    x = ids(5, b=2)
    runner = ours.hetero_decode
    logits = []
    for make in (DecodeStep, NativeStep):
        session = runner.checkout(2, 64)
        ours(x, attention_mask=torch.ones_like(x), **{hf.cache_argument(ours): session.cache})
        step = make(ours, runner.spec, session.cache, 2)
        out = []
        for token in (7, 11, 13):
            step.ids.fill_(token)
            out.append(step().clone())
        logits.append(torch.cat(out, dim=1))
        runner.release(session, keep=False)
    want, got = logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_the_cache_is_written_where_transformers_reads_it(build):
    """After native steps, transformers' own forward continues from the same cache."""
    _, ours = pair()
    x = ids(3, b=1)
    runner = ours.hetero_decode
    session = runner.checkout(1, 64)
    ours(x, **{hf.cache_argument(ours): session.cache})
    step = NativeStep(ours, runner.spec, session.cache, 1)
    step.ids.fill_(9)
    step()
    assert int(session.cache.layers[1].cumulative_length) == x.shape[1] + 1
    nxt = torch.tensor([[9, 21]])
    full = ours(torch.cat([x, nxt], dim=1)).logits[:, -1]
    # the eager forward reads the native step's keys and values for token 9 (the bound: a whole prompt
    # of 11 rows runs torch's int8pack GEMM with bf16 activations; a misplaced key is off by ~100%)
    mask = torch.ones(1, x.shape[1] + 2, dtype=torch.long)
    cont = type(ours).forward(ours, input_ids=nxt[:, 1:], attention_mask=mask,
                              **{hf.cache_argument(ours): session.cache}).logits[:, -1]
    assert (cont - full).abs().max() <= 3e-2 * full.abs().max()
    runner.release(session, keep=False)


# -- the greedy loop ----------------------------------------------------------------------------------

GREEDY_CASES = [
    dict(max_new_tokens=10),
    dict(max_new_tokens=10, min_new_tokens=6),
    dict(max_length=14),
    dict(max_new_tokens=10, min_length=15),
]


@pytest.mark.parametrize("kw", GREEDY_CASES, ids=lambda kw: ",".join(kw))
def test_greedy_loop_gives_transformers_output(build, kw):
    ref, ours = pair()
    x = ids(1)
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    assert ours.hetero_decode.report()["loops"] == {"hetero_llm greedy": 1}


def test_end_of_sequence_stops_and_pads_like_transformers(build):
    ref, ours = pair()
    x = ids(2)
    free = ref.generate(x, max_new_tokens=10, do_sample=False)
    # the 4th token of the first sequence as its end: it stops there, the second goes on padded
    eos = [int(free[0, x.shape[1] + 3]), 250]
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    want = ref.generate(x, **kw)
    assert torch.equal(ours.generate(x, **kw), want)
    assert (want[0, x.shape[1] + 4:] == 0).all() or want.shape[1] < free.shape[1]
    # min_new_tokens keeps an end-of-sequence token from being chosen until then
    kw["min_new_tokens"] = 6
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))


def test_streamer_gets_the_same_pieces(build):
    class Collect:
        def __init__(self):
            self.pieces, self.ended = [], False

        def put(self, value):
            self.pieces.append(value.tolist())

        def end(self):
            self.ended = True

    ref, ours = pair()
    x = ids(4, b=1)
    a, b = Collect(), Collect()
    ref.generate(x, max_new_tokens=6, streamer=a)
    ours.generate(x, max_new_tokens=6, streamer=b)
    assert a.pieces == b.pieces and a.ended and b.ended


@pytest.mark.parametrize("kw, reason", [
    (dict(do_sample=True, top_k=3), "do_sample=True"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
])
def test_other_settings_use_transformers_loop_with_the_native_step(build, kw, reason):
    ref, ours = pair()
    x = ids(6, b=1)
    torch.manual_seed(1)
    want = ref.generate(x, max_new_tokens=8, **kw)
    torch.manual_seed(1)
    got = ours.generate(x, max_new_tokens=8, **kw)
    want = want if isinstance(want, torch.Tensor) else want.sequences
    got = got if isinstance(got, torch.Tensor) else got.sequences
    assert torch.equal(got, want)
    report = ours.hetero_decode.report()
    assert [k for k in report["loops"]] == [f"transformers (generation setting {reason})"]
    assert report["native_steps"] == 7


# -- the choice --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, why", [
    (dict(quantize="none"), "not symmetric per-channel INT8"),
    (dict(quantize="int8-asym"), "not symmetric per-channel INT8"),
    (dict(quantize="w8a8"), "not symmetric per-channel INT8"),
    (dict(kernels=hetero_llm.KernelConfig(fuse_norms=False)), "RMSNorms are not swapped"),
])
def test_plans_the_step_cannot_run_keep_transformers_loop(options, why):
    model = tiny()
    plan = hetero_llm.plan(model, hardware="cpu-2core", **options)
    assert plan.model_settings["decode"] == "transformers"
    assert any(why in n for n in plan.notes), plan.notes
    with pytest.raises(InvalidOptionError, match=why):
        hetero_llm.plan(model, hardware="cpu-2core", **{**options, "decode": "native"})


def test_bf16_models_compute_in_fp32_with_the_native_step(build):
    """planner.precision: a bf16 model with INT8 weights on a CPU computes in fp32; its INT8 weights are
    those of the same values in fp32, so it generates exactly what the fp32 copy does."""
    model = tiny().to(torch.bfloat16)
    as_fp32 = copy.deepcopy(model).float()
    plan = hetero_llm.plan(model, hardware="cpu-2core")
    assert plan.model_settings["compute_dtype"] == "float32" and plan.model_settings["decode"] == "native"
    assert any("activations: float32, not the model's bfloat16" in n for n in plan.notes)
    hetero_llm.accelerate(model)
    hetero_llm.accelerate(as_fp32)
    assert {t.dtype for t in model.parameters()} <= {torch.float32, torch.int8}
    x = ids(3, b=1)
    assert torch.equal(model.generate(x, max_new_tokens=8), as_fp32.generate(x, max_new_tokens=8))
    assert model.hetero_decode.report()["native_steps"] == 7


@pytest.mark.parametrize("options, hardware", [(dict(quantize="none"), "cpu-2core"), ({}, "h100-80gb")])
def test_bf16_keeps_its_dtype_without_int8_on_a_cpu(options, hardware):
    plan = hetero_llm.plan(tiny().to(torch.bfloat16), hardware=hardware, **options)
    assert "compute_dtype" not in plan.model_settings
    if hardware.startswith("cpu"):  # and the native step, fp32 only, does not apply
        assert plan.model_settings["decode"] == "transformers"


def test_the_isa_switch(monkeypatch):
    monkeypatch.setenv(cpu_decode.ISA_ENV, "none")
    plan = hetero_llm.plan(tiny(), hardware="cpu-2core")
    assert plan.model_settings["decode"] == "transformers"
    monkeypatch.setenv(cpu_decode.ISA_ENV, "avx2")
    assert cpu_decode.best_isa(("avx", "avx2", "fma", "avx512", "vnni")) == "avx2"
    assert cpu_decode.best_isa(("avx", "avx2")) is None  # AVX2 without FMA: no build
    monkeypatch.setenv(cpu_decode.ISA_ENV, "sse9")
    with pytest.raises(InvalidOptionError, match="HETERO_LLM_CPU_ISA"):
        cpu_decode.best_isa()


def test_native_on_a_gpu_is_refused():
    with pytest.raises(InvalidOptionError, match="CPU"):
        hetero_llm.plan(tiny(), hardware="h100-80gb", decode="native")


def test_without_a_compiler_the_plan_decodes_with_transformers_and_warns(build, monkeypatch):
    model = tiny()
    plan = hetero_llm.plan(model, hardware="cpu-2core")  # made where the step could be built
    assert plan.model_settings["decode"] == "native"
    monkeypatch.setattr(cpu_decode, "possible", lambda: False)  # applied where it cannot
    with pytest.warns(HeteroLLMWarning, match="native CPU decode step cannot run"):
        hetero_llm.accelerate(model, plan=plan)
    assert not hasattr(model, "hetero_decode")
    x = ids(2, b=1)
    assert model.generate(x, max_new_tokens=4).shape == (1, x.shape[1] + 4)


def test_native_problem_names_the_layer(build):
    _, ours = pair()
    spec = spec_by_family("llama")
    assert native_problem(ours, spec) is None
    ours.model.layers[1].mlp.act_fn = torch.nn.ReLU()
    assert "layer 1" in native_problem(ours, spec) and "ReLU" in native_problem(ours, spec)


def test_saved_and_loaded_models_keep_the_native_step(build, tmp_path):
    _, ours = pair()
    hetero_llm.save(ours, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = hetero_llm.load(tmp_path / "m")
    x = ids(8, b=1)
    assert loaded.hetero_plan.model_settings["decode"] == "native"
    assert torch.equal(loaded.generate(x, max_new_tokens=6), ours.generate(x, max_new_tokens=6))
    assert loaded.hetero_decode.report()["native_steps"] == 5


def test_the_bound_forward_takes_logits_to_keep(build):
    """transformers' generate() (and hetero_llm's bench) read forward's signature to ask for the last
    position's logits only: without the name, a prompt's lm_head ran over every position."""
    import inspect

    _, ours = pair()
    assert "logits_to_keep" in inspect.signature(ours.forward).parameters
    x = ids(9, b=2)
    assert ours(x, logits_to_keep=1).logits.shape == (2, 1, 256)
    assert ours(x).logits.shape == (2, x.shape[1], 256)


def test_batches_over_four_go_to_transformers_loop(build):
    ref, ours = pair()
    x = ids(10, b=cpu_decode.MAX_ROWS + 1)
    kw = dict(max_new_tokens=5, attention_mask=torch.ones_like(x))
    assert torch.equal(ours.generate(x, **kw), ref.generate(x, **kw))
    report = ours.hetero_decode.report()
    assert report["native_steps"] == 0 and report["fallbacks"] == {
        f"a batch of {cpu_decode.MAX_ROWS + 1} sequences (the native CPU step decodes up to 4 at once)": 1}
    assert cpu_decode.native_module().MAX_ROWS == cpu_decode.MAX_ROWS
