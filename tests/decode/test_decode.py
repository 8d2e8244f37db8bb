"""hetero_llm.decode: generate() through sessions (static cache + hetero_llm's decode step).

On the CPU the step runs eagerly (decode="static"); the same step is what a GPU captures as a
CUDA graph, so these tests check its math, the sessions and the choice between the step and
transformers' own loop. test_decode_gpu.py checks capture and replay on a GPU.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.decode import DecodeStep, decode_pass, runner as runner_mod
from hetero_llm.decode.step import static_cache_problem
from hetero_llm.errors import InvalidOptionError, PlanMismatchError
from hetero_llm.integrations.transformers import spec_by_family
from concurrency import run_together
from tiny_shapes import TINY_SHAPES

BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GREEDY = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)


def tiny(model_type: str = "llama", **extra):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type], **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def pair(model_type: str = "llama", quantize: str = "none", **extra):
    """(transformers' loop, static step): the same weights accelerated both ways."""
    ref = tiny(model_type, **extra)
    ours = copy.deepcopy(ref)
    hetero_llm.accelerate(ref, quantize=quantize, device="cpu", decode="transformers")
    hetero_llm.accelerate(ours, quantize=quantize, device="cpu", decode="static")
    return ref, ours


def ids(seed=0, b=2, s=9):
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


# -- the plan ---------------------------------------------------------------------------------

def test_plan_chooses_graphs_on_a_gpu_and_the_native_step_on_a_cpu():
    model = tiny()
    gpu = hetero_llm.plan(model, hardware="h100-80gb")
    assert gpu.model_settings["decode"] == "cuda_graph"
    assert any("CUDA-graph replay" in n for n in gpu.notes)
    cpu = hetero_llm.plan(model, hardware="cpu-2core")  # INT8 by default on a CPU: decode.native
    assert cpu.model_settings["decode"] == "native"
    # Without INT8 weights the native step does not apply: transformers' loop, and the plan says why.
    fp32 = hetero_llm.plan(model, hardware="cpu-2core", quantize="none")
    assert fp32.model_settings["decode"] == "transformers"
    assert any("not symmetric per-channel INT8" in n for n in fp32.notes)
    assert hetero_llm.plan(model, hardware="cpu-2core", decode="static").model_settings["decode"] == "static"
    assert hetero_llm.plan(model, hardware="h100-80gb", decode="static").model_settings["decode"] == "static"
    # the setting survives the plan's JSON round trip
    assert hetero_llm.Plan.from_json(gpu.to_json()).model_settings["decode"] == "cuda_graph"


def test_a_graphed_plan_predicts_no_host_launch_costs():
    model = tiny()
    graph = hetero_llm.plan(model, hardware="h100-80gb")
    loop = hetero_llm.plan(model, hardware="h100-80gb", decode="transformers")
    assert graph.prediction.decode_ms_after < 0.5 * loop.prediction.decode_ms_after
    assert graph.prediction.prefill_ms_after == loop.prediction.prefill_ms_after  # a prompt is not replayed
    assert graph.prediction.decode_ms_before == loop.prediction.decode_ms_before  # "before" is transformers'
    for a, b in zip(graph.entries, loop.entries):
        assert (a.name, a.action, a.kernel, a.quant) == (b.name, b.action, b.kernel, b.quant)
        assert a.decode_us_after <= b.decode_us_after + 1e-9


@pytest.mark.parametrize("model_type,extra,why", [
    ("gpt2", {}, "no Llama-style decode step"),
    ("opt", {}, "no Llama-style decode step"),
    ("mistral", dict(sliding_window=16), "sliding-window"),
    ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rescaled"),
])
def test_what_the_step_cannot_run_keeps_transformers_loop(model_type, extra, why):
    model = tiny(model_type, **extra)
    p = hetero_llm.plan(model, hardware="h100-80gb")
    assert p.model_settings["decode"] == "transformers"
    assert any(why in n for n in p.notes if n.startswith("decode:"))
    with pytest.raises(InvalidOptionError, match="decode='cuda_graph' cannot run this model"):
        hetero_llm.plan(model, hardware="h100-80gb", decode="cuda_graph")


def test_refusals_are_typed():
    model = tiny()
    with pytest.raises(InvalidOptionError, match="needs the model on a CUDA GPU"):
        hetero_llm.plan(model, hardware="cpu-2core", decode="cuda_graph")
    with pytest.raises(InvalidOptionError, match="Did you mean 'cuda_graph'"):
        hetero_llm.plan(model, decode="graph")
    with pytest.raises(InvalidOptionError, match="not every layer's attention is fused"):
        hetero_llm.plan(model, hardware="cpu-2core", decode="static",
                        kernels=hetero_llm.config.KernelConfig(fuse_projections=False))


def test_decode_pass_refuses_a_model_the_plan_does_not_describe():
    model = tiny()
    p = hetero_llm.plan(model, hardware="cpu-2core", decode="static")
    with pytest.raises(PlanMismatchError, match="decode='static'"):
        decode_pass(model, p)  # the kernels pass has not swapped the attention in


# -- the step's math --------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_static_step_gives_transformers_tokens_and_logits(model_type, quantize):
    # Mistral's config has a 4096-token sliding window by default (v0.1); later ones have none
    ref, ours = pair(model_type, quantize, **(dict(sliding_window=None) if model_type == "mistral" else {}))
    x = ids()
    kw = dict(GREEDY, return_dict_in_generate=True, output_logits=True)
    a, b = ref.generate(x, **kw), ours.generate(x, **kw)
    assert torch.equal(a.sequences, b.sequences)
    # The prompt attends a masked static cache instead of a causal dynamic one: the same math,
    # summed differently. INT8's CPU kernel rounds its input to bf16, which magnifies that.
    tol = 2e-5 if quantize == "none" else 4e-3
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(lb, la, atol=tol, rtol=1e-4)
    report = ours.hetero_decode.report()
    assert report["eager_steps"] == GREEDY["max_new_tokens"] - 1  # every token after the first
    assert report["fallbacks"] == {}


def test_sampling_with_a_seed_draws_what_transformers_draws():
    ref, ours = pair()
    x = ids(3)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(7)
    a = ref.generate(x, **kw)
    torch.manual_seed(7)
    b = ours.generate(x, **kw)
    assert torch.equal(a, b) and ours.hetero_decode.report()["eager_steps"] > 0


def test_step_reads_no_tensor_value_on_the_host():
    """What makes the step capturable: run it on the meta device, where reading any value
    (.item(), bool(tensor), a data-dependent shape) raises. The torch path of every op here;
    the Triton launchers were written to the same rule (lengths stay on the device)."""
    model = tiny()
    hetero_llm.accelerate(model, quantize="none", device="cpu", decode="static", kernels="torch")
    model.to("meta")
    cache = runner_mod._session_cache_class()(config=model.config, max_cache_len=32)
    cfg = model.config
    cache.early_initialization(batch_size=2, num_heads=cfg.num_key_value_heads,
                               head_dim=cfg.hidden_size // cfg.num_attention_heads, dtype=torch.float32,
                               device=torch.device("meta"))
    step = DecodeStep(model, spec_by_family("llama"), cache, batch=2)
    logits = step()
    assert logits.shape == (2, 1, 256) and logits.device.type == "meta"


# -- generate(): sessions and fallbacks --------------------------------------------------------

def test_sessions_are_reused_per_batch_and_length():
    _, ours = pair()
    out = ours.generate(ids(2, b=2), **GREEDY, return_dict_in_generate=True)
    ours.hetero_decode.clear()
    addresses = []
    for b in (2, 2, 1, 2):
        ours.generate(ids(b, b=b), **GREEDY)
        session = next(s for s in ours.hetero_decode._free if s.batch == 2)
        addresses.append(session.cache.layers[0].keys.data_ptr())
    # a captured graph reads the cache where it was: reuse resets it in place
    assert len(set(addresses)) == 1 and out.past_key_values.layers[0].keys.data_ptr() not in addresses
    r = ours.hetero_decode.report()
    assert r["sessions_created"] == 3 and sorted(r["idle_sessions"]) == [(1, 256), (2, 256)]
    ours.generate(ids(0, b=2, s=250), **GREEDY)  # 262 tokens: the next cache size
    assert ours.hetero_decode.report()["sessions_created"] == 4
    assert (2, 512) in ours.hetero_decode.report()["idle_sessions"]
    ours.hetero_decode.clear()
    assert ours.hetero_decode.report()["idle_sessions"] == []


def test_the_pool_keeps_at_most_max_idle_sessions(monkeypatch):
    monkeypatch.setattr(runner_mod, "MAX_IDLE_SESSIONS", 2)
    _, ours = pair()
    for b in (1, 2, 3):
        ours.generate(ids(b, b=b), **GREEDY)
    idle = ours.hetero_decode.report()["idle_sessions"]
    assert [s[0] for s in idle] == [2, 3]  # the least recently used went first


def test_length_defaults_size_the_cache_for_what_transformers_generates():
    ref, ours = pair()
    x = ids(4, b=1, s=5)
    for kw in (dict(do_sample=False), dict(max_length=30, do_sample=False)):
        assert torch.equal(ref.generate(x, **kw), ours.generate(x, **kw))
    assert ours.hetero_decode.report()["fallbacks"] == {}


@pytest.mark.parametrize("case", ["padding", "beams", "two_sequences", "user_cache", "embeds"])
def test_calls_the_step_does_not_take_go_to_transformers(case):
    from transformers import DynamicCache

    ref, ours = pair()
    x = ids(5)
    kw = dict(GREEDY)
    if case == "padding":
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        x[0, :3] = 0
        kw["attention_mask"] = mask
    elif case == "beams":
        kw.update(num_beams=2)
    elif case == "two_sequences":
        kw.update(do_sample=True, num_return_sequences=2)
    elif case == "user_cache":
        kw["past_key_values"] = DynamicCache(config=ours.config)
    if case == "embeds":
        kw["inputs_embeds"] = ours.model.embed_tokens(x)
        x = None
    if case == "two_sequences":
        torch.manual_seed(1)
    a = ref.generate(x, **{**kw, "past_key_values": DynamicCache(config=ref.config)} if case == "user_cache" else kw)
    if case == "two_sequences":
        torch.manual_seed(1)
    b = ours.generate(x, **kw)
    assert torch.equal(a, b)
    r = ours.hetero_decode.report()
    assert r["eager_steps"] == 0 and sum(r["fallbacks"].values()) == 1, r


def test_a_returned_cache_belongs_to_the_caller():
    _, ours = pair()
    out = ours.generate(ids(), **GREEDY, return_dict_in_generate=True)
    kept = out.past_key_values.layers[0].keys.clone()
    ours.generate(ids(9), **GREEDY)  # must not reuse (and overwrite) the returned cache
    assert torch.equal(out.past_key_values.layers[0].keys, kept)
    assert ours.hetero_decode.report()["sessions_created"] == 2


def test_threads_get_their_own_sessions():
    ref, ours = pair()
    prompts = [ids(i, b=1 + i % 2) for i in range(6)]
    want = [ref.generate(p, **GREEDY) for p in prompts]
    got = run_together([lambda p=p: ours.generate(p, **GREEDY) for p in prompts])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    r = ours.hetero_decode.report()
    assert r["sessions_created"] <= len(prompts) and not r["fallbacks"]


class Explode:
    """A logits processor that fails at the first decode step."""

    def __call__(self, input_ids, scores):
        raise ValueError("boom")


def test_an_error_inside_generate_drops_the_session():
    from transformers import LogitsProcessorList

    _, ours = pair()
    with pytest.raises(ValueError, match="boom"):
        ours.generate(ids(), max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([Explode()]))
    r = ours.hetero_decode.report()
    assert r["idle_sessions"] == [] and r["sessions_created"] == 1


# -- the model around it ----------------------------------------------------------------------

def test_save_load_and_deepcopy_keep_the_decode_mode(tmp_path):
    ref, ours = pair()
    hetero_llm.save(ours, tmp_path / "m")
    loaded = hetero_llm.load(tmp_path / "m")
    assert loaded.hetero_decode.report()["mode"] == "static"
    x = ids(2)
    want = ref.generate(x, **GREEDY)
    assert torch.equal(loaded.generate(x, **GREEDY), want)
    twin = copy.deepcopy(ours)
    assert twin.hetero_decode is not ours.hetero_decode and twin.hetero_decode.model is twin
    assert torch.equal(twin.generate(x, **GREEDY), want)
    assert ours.hetero_decode.report()["sessions_created"] == 0  # the copy's calls used its own


def test_plain_forward_calls_are_untouched():
    ref, ours = pair()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


def test_static_cache_problem_names_the_cache_kind():
    assert static_cache_problem(tiny().config) is None
    assert "StaticSlidingWindowLayer" in static_cache_problem(tiny("mistral", sliding_window=16).config)


def test_capture_is_never_tried_off_the_gpu():
    _, ours = pair()
    ours.hetero_decode.use_graphs = True  # as a plan made for a GPU would set it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(ids(), **GREEDY)
    assert ours.hetero_decode.report()["graphs"] == 0
