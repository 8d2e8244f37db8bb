"""accelerate(prune=...): masks in every decoder linear, calibration rules, composition with
INT8, exact save/load, the lm_head option, and models without a role table."""
from __future__ import annotations

import copy

import accelerate
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm import InvalidOptionError, KernelConfig, PruneConfig
from hetero_llm.errors import UnsupportedArchitectureError
from hetero_llm.integrations.transformers import spec_for
from hetero_llm.prune import PruneReport, sparsity_report
from hetero_llm.quant import Int8Linear
from hetero_llm.quant.modules import is_linear, linear_weight
from tiny_shapes import TINY_SHAPES

VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
CONFIGS = {**TINY_SHAPES, "opt": dict(TINY_SHAPES["opt"], init_std=0.1)}
PLAIN = KernelConfig(fuse_projections=False, fuse_norms=False)  # modules keep their names
SPARSITY_TOL = 0.01
INT8_MAX_REL_ERR = 5e-2  # max |logit difference| / max |logit|, INT8 weights vs the same pruned fp32 model
NEW_TOKENS = 5


def tiny(family: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**BASE, **CONFIGS[family], **overrides})
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompt(length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def calibration() -> list[torch.Tensor]:
    return [prompt(16, s) for s in range(3)]


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    prefix = spec_for(model).layers + "."
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)}


def zeros(module: nn.Module) -> float:
    return float((linear_weight(module) == 0).float().mean())


def total_zeros(modules: dict[str, nn.Module]) -> float:
    n = sum(linear_weight(m).numel() for m in modules.values())
    return sum(float((linear_weight(m) == 0).sum()) for m in modules.values()) / n


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


MASKS = {
    "magnitude": PruneConfig(method="magnitude"),
    "magnitude-30": PruneConfig(method="magnitude", sparsity=0.3),
    "magnitude-global": PruneConfig(method="magnitude", sparsity=0.6, scope="global"),
    "wanda": PruneConfig(method="wanda"),
    "wanda-70": PruneConfig(method="wanda", sparsity=0.7),
    "wanda-global": PruneConfig(method="wanda", scope="global"),
    "2:4": "2:4",
    "1:4": PruneConfig(method="1:4"),
    "wanda-4:8": PruneConfig(method="wanda", pattern="4:8"),
}


def mask_accelerate(model: nn.Module, prune, **options) -> nn.Module:
    cfg = prune if isinstance(prune, PruneConfig) else PruneConfig(method=prune)
    data = calibration() if cfg.needs_calibration else None
    return hetero_llm.accelerate(model, prune=prune, calibration_data=data, **options)


# -- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MASKS)
def test_masks_reach_their_sparsity_in_every_decoder_linear(name):
    prune = MASKS[name]
    cfg = prune if isinstance(prune, PruneConfig) else PruneConfig(method=prune)
    ref = tiny("llama")
    assert all((linear_weight(m) != 0).all() for m in decoder_linears(ref).values())  # no zeros to begin with
    model = mask_accelerate(copy.deepcopy(ref), prune, quantize="none", kernels=PLAIN)
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7
    if cfg.scope == "global":
        assert abs(total_zeros(linears) - cfg.sparsity) < SPARSITY_TOL
        assert max(map(zeros, linears.values())) - min(map(zeros, linears.values())) > SPARSITY_TOL
    else:
        for name_, m in linears.items():
            assert abs(zeros(m) - cfg.sparsity) < SPARSITY_TOL, name_
    if cfg.nm is not None:
        n, m_ = cfg.nm
        for name_, m in linears.items():
            w = linear_weight(m)
            assert ((w != 0).reshape(w.shape[0], -1, m_).sum(-1) == n).all(), name_
    elif cfg.method == "wanda" and cfg.scope == "layer":  # Wanda ranks within each output row
        for m in linears.values():
            w = linear_weight(m)
            assert ((w == 0).sum(1) == round(cfg.sparsity * w.shape[1])).all()
    # everything outside the decoder linears is untouched; inside, the surviving weights are the
    # original ones (unless Wanda re-fits them by least squares)
    refit = getattr(cfg, "reconstruct", False)
    before = ref.state_dict()
    for k, v in model.state_dict().items():
        if not any(k.startswith(n + ".") for n in linears):
            assert torch.equal(v, before[k]), k
        elif not refit:
            kept = v != 0
            assert torch.equal(v[kept], before[k][kept]), k
    report = model.hetero_prune
    assert isinstance(report, PruneReport)
    assert {r.name for r in report.layers} == set(linears)
    assert abs(report.sparsity - total_zeros(linears)) < 1e-6
    assert abs(report.sparsity - cfg.sparsity) < SPARSITY_TOL
    assert report.params_before == report.params_after == sum(linear_weight(m).numel() for m in linears.values())
    assert "module" in str(report) and cfg.method in report.method
    assert torch.isfinite(logits(model, prompt())).all()


def test_plan_marks_the_masked_linears_and_says_so():
    model = mask_accelerate(tiny("llama"), PruneConfig(method="wanda", sparsity=0.6), quantize="none")
    p = model.hetero_plan
    marked = {e.name: e.prune for e in p.entries if e.prune}
    assert set(marked) == {f"model.layers.{i}.{n}" for i in range(2)
                           for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert len(set(marked.values())) == 1 and next(iter(marked.values())).startswith("wanda 60% per row")
    assert any("pruning: wanda 60%" in n for n in p.notes)
    assert p.options["prune"]["method"] == "wanda"
    assert "wanda 60%" in str(p)


@pytest.mark.parametrize("family", ("llama", "gpt2", "opt", "phi3", "qwen2"))
def test_two_of_four_in_every_family(family):
    ref = tiny(family)
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune="2:4", quantize="none", kernels=PLAIN)
    linears = decoder_linears(model)
    assert linears
    for name, m in linears.items():
        w = linear_weight(m)  # Conv1D (gpt2): its (out, in) view; groups run along the inputs
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    head = spec_for(model).model_roles["lm_head"]
    assert torch.equal(linear_weight(model.get_submodule(head)), linear_weight(ref.get_submodule(head)))
    assert torch.isfinite(logits(model, prompt())).all()


def test_nm_skips_linears_whose_inputs_do_not_divide():
    model = hetero_llm.accelerate(tiny("llama", intermediate_size=96), prune=PruneConfig(method="32:64"),
                                  quantize="none", kernels=PLAIN)
    p = model.hetero_plan
    for i in range(2):
        assert p.entry(f"model.layers.{i}.mlp.down_proj").prune is None  # 96 inputs
        assert zeros(model.model.layers[i].mlp.down_proj) == 0.0
        assert zeros(model.model.layers[i].mlp.up_proj) == 0.5
    assert any("2 linears not pruned" in n and "multiple of 64" in n for n in p.notes)


# -- calibration -------------------------------------------------------------------------------

@pytest.mark.parametrize("prune", ["wanda", PruneConfig(method="wanda", pattern="2:4"), "structured",
                                   PruneConfig(method="structured", heads=0.5)])
def test_wanda_without_calibration_data_is_refused_before_any_change(prune):
    model = tiny("llama")
    before = state(model)
    with pytest.raises(InvalidOptionError, match="calibration_data") as info:
        hetero_llm.accelerate(model, prune=prune)
    assert "criterion='magnitude'" in str(info.value)
    assert not hasattr(model, "hetero_plan") and not hasattr(model, "hetero_prune")
    now = model.state_dict()
    assert now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
    assert model.config.intermediate_size == 128


def test_structured_by_magnitude_needs_no_data():
    model = hetero_llm.accelerate(tiny("llama"), prune=PruneConfig(method="structured", criterion="magnitude"))
    assert model.config.intermediate_size == 96


def test_structured_by_wanda_uses_the_data():
    a = hetero_llm.accelerate(tiny("llama"), prune="structured", quantize="none", kernels=PLAIN,
                              calibration_data=calibration())
    b = hetero_llm.accelerate(tiny("llama"), prune=PruneConfig(method="structured", criterion="magnitude"),
                              quantize="none", kernels=PLAIN)
    assert a.config.intermediate_size == b.config.intermediate_size == 96
    # same sizes, different channels: the activations changed the ranking
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("prune", ["magnitude", "2:4", PruneConfig(method="structured", criterion="magnitude")])
def test_calibration_data_nothing_uses_is_refused(prune):
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        hetero_llm.accelerate(tiny("llama"), prune=prune, quantize="none", calibration_data=calibration())


@pytest.mark.parametrize("prune", ["magnitude", PruneConfig(method="structured", criterion="magnitude")])
def test_checkpoint_with_pruning_is_refused(tmp_path, prune):
    tiny("llama").save_pretrained(tmp_path)
    with accelerate.init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**BASE, **CONFIGS["llama"]}))
    with pytest.raises(InvalidOptionError, match="without checkpoint=") as info:
        hetero_llm.accelerate(meta, prune=prune, checkpoint=tmp_path)
    assert isinstance(info.value, ValueError)
    assert not hasattr(meta, "hetero_plan") and meta.config.intermediate_size == 128
    assert all(p.device.type == "meta" for p in meta.parameters())


# -- with INT8 ---------------------------------------------------------------------------------

def test_wanda_zeros_stay_zeros_in_int8():
    ref = tiny("llama")
    fp32 = hetero_llm.accelerate(copy.deepcopy(ref), prune="wanda", quantize="none", kernels=PLAIN,
                                 calibration_data=calibration())
    int8 = hetero_llm.accelerate(copy.deepcopy(ref), prune="wanda", quantize="int8", kernels=PLAIN,
                                 calibration_data=calibration())
    for name, m in decoder_linears(fp32).items():
        q = int8.get_submodule(name)
        assert isinstance(q, Int8Linear)
        pruned = linear_weight(m) == 0
        assert pruned.float().mean() == 0.5
        assert (q.qweight[pruned] == 0).all(), name
    report = sparsity_report(int8, list(decoder_linears(fp32)))
    assert len(report.layers) == 14 and all(r.zeros >= 0.5 for r in report.layers)
    x = prompt(12)
    assert rel_err(logits(int8, x), logits(fp32, x)) < INT8_MAX_REL_ERR


def test_wanda_with_default_kernels_keeps_its_zeros_in_the_fused_int8_linears():
    model = mask_accelerate(tiny("llama"), "wanda")
    report = sparsity_report(model)
    fused = [r for r in report.layers if r.name.startswith("model.layers.")]
    assert {r.name.rsplit(".", 1)[1] for r in fused} >= {"qkv", "gate_up", "down_proj", "o_proj"}
    assert all(r.zeros >= 0.5 for r in fused)
    assert next(r for r in report.layers if r.name == "lm_head").zeros < 0.1
    assert torch.isfinite(logits(model, prompt())).all()


def test_asymmetric_int8_keeps_pruned_weights_at_the_zero_point():
    model = hetero_llm.accelerate(tiny("llama"), prune="2:4", quantize="int8-asym", kernels=PLAIN)
    q = model.model.layers[0].mlp.down_proj
    assert q.zero_point.abs().sum() > 0  # the check below must not pass trivially
    report = sparsity_report(model, list(decoder_linears(model)))
    assert all(r.zeros >= 0.5 for r in report.layers)


@pytest.mark.parametrize("prune", [PruneConfig(method="structured", mlp=0.25, heads=0.5, criterion="magnitude"),
                                   "2:4"])
def test_pruned_int8_logits_close_to_pruned_fp32(prune):
    ref = tiny("llama")
    fp32 = hetero_llm.accelerate(copy.deepcopy(ref), prune=prune, quantize="none")
    int8 = hetero_llm.accelerate(copy.deepcopy(ref), prune=prune, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    x = prompt(12)
    assert rel_err(logits(int8, x), logits(fp32, x)) < INT8_MAX_REL_ERR
    assert greedy(int8, x).shape == (1, 12 + NEW_TOKENS)


# -- save / load -------------------------------------------------------------------------------

SAVED = {
    "wanda-int8": (PruneConfig(method="wanda"), "int8"),
    "structured-int8": (PruneConfig(method="structured", mlp=0.25, heads=0.34), "int8"),
    "structured-fp32": (PruneConfig(method="structured", mlp=0.25, heads=0.34), "none"),
    "2:4-int8": ("2:4", "int8"),
}


@pytest.mark.parametrize("case", SAVED)
def test_save_load_is_exact(tmp_path, case):
    prune, quantize = SAVED[case]
    model = mask_accelerate(tiny("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16),
                            prune, quantize=quantize)
    hetero_llm.save(model, tmp_path / "m")
    loaded = hetero_llm.load(tmp_path / "m")
    assert loaded.hetero_plan == model.hetero_plan
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    if "structured" in case:
        c = loaded.config
        assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (96, 4, 2, 16)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = prompt(11)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert torch.equal(greedy(loaded, x), greedy(model, x))


def test_pruned_fp32_config_rebuilds_the_same_shapes():
    model = hetero_llm.accelerate(tiny("llama"), prune=PruneConfig(method="structured", mlp=0.25, heads=0.5,
                                                                   criterion="magnitude"),
                                  quantize="none", kernels=PLAIN)
    fresh = type(model)(model.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    x = prompt()
    torch.testing.assert_close(logits(fresh.eval(), x), logits(model, x))


# -- lm_head -----------------------------------------------------------------------------------

def test_lm_head_tied_to_the_embedding_is_refused():
    model = tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = state(model)
    with pytest.raises(InvalidOptionError, match="lm_head=False"):
        hetero_llm.accelerate(model, prune=PruneConfig(method="magnitude", lm_head=True))
    assert not hasattr(model, "hetero_plan")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(InvalidOptionError, match="shares its weight"):
        hetero_llm.plan(model, prune=PruneConfig(method="2:4", lm_head=True))


def test_tied_lm_head_is_left_alone_by_default():
    ref = tiny("llama", tie_word_embeddings=True)
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune="magnitude", quantize="none")
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.hetero_plan.entry("lm_head").prune is None


@pytest.mark.parametrize("prune", [PruneConfig(method="magnitude", lm_head=True),
                                   PruneConfig(method="wanda", lm_head=True)])
def test_untied_lm_head_is_pruned_when_asked(prune):
    ref = tiny("llama", tie_word_embeddings=False)
    model = mask_accelerate(copy.deepcopy(ref), prune, quantize="none", kernels=PLAIN)
    assert abs(zeros(model.lm_head) - 0.5) < SPARSITY_TOL
    assert model.hetero_plan.entry("lm_head").prune
    assert "lm_head" in {r.name for r in model.hetero_prune.layers}
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert any("and the lm_head" in n for n in model.hetero_plan.notes)


# -- architectures without a role table --------------------------------------------------------

def tiny_unknown() -> nn.Module:
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_unknown_architecture_non_strict_masks_work_structured_is_refused():
    model = tiny_unknown()
    with pytest.raises(UnsupportedArchitectureError, match="magnitude"):
        hetero_llm.accelerate(model, strict=False, prune=PruneConfig(method="structured", criterion="magnitude"))
    assert not hasattr(model, "hetero_plan")
    hetero_llm.accelerate(model, strict=False, prune="magnitude", quantize="none")
    layers = {n: m for n, m in model.named_modules() if n.startswith("gpt_neox.layers.") and is_linear(m)}
    assert len(layers) == 2 * 4
    assert all(abs(zeros(m) - 0.5) < SPARSITY_TOL for m in layers.values())
    assert set(layers) <= {r.name for r in model.hetero_prune.layers}
    out = greedy(model, prompt())
    assert out.shape == (1, 10 + NEW_TOKENS)


# -- fixes found while testing: refusals come before any change; an unknown model's output layer --

def test_unused_calibration_data_is_refused_before_pruning():
    model = _llama_for_refusal()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        hetero_llm.accelerate(model, prune="magnitude", quantize="none", calibration_data=[torch.randint(0, 64, (1, 8))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "hetero_prune")


def test_missing_w8a8_data_is_refused_before_pruning():
    model = _llama_for_refusal()
    size = model.config.intermediate_size
    with pytest.raises(InvalidOptionError, match="calibration_data"):
        hetero_llm.accelerate(model, prune=PruneConfig(method="structured", criterion="magnitude"), quantize="w8a8")
    assert model.config.intermediate_size == size


def _llama_for_refusal():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_wanda_reconstruct_keeps_the_mask_and_beats_plain_wanda_on_the_layer_output():
    """The least-squares update keeps exactly the zeros of the mask and brings the layer's output
    on the calibration inputs closer to the dense one than the plain mask does."""
    from hetero_llm.prune.masks import layer_mask, reconstruct, wanda_scores
    torch.manual_seed(0)
    # correlated inputs (as real activations are): the kept weights can stand in for the pruned ones
    x = torch.randn(512, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(512, 64)
    w = torch.randn(32, 64)
    gram = x.t() @ x
    keep = layer_mask(wanda_scores(w, torch.diagonal(gram)), 0.5, per_row=True)
    refit = reconstruct(w, keep, gram)
    assert torch.equal(refit == 0, ~keep)
    dense = x @ w.t()
    plain_err = (x @ (w * keep).t() - dense).norm()
    refit_err = (x @ refit.t() - dense).norm()
    assert refit_err < 0.8 * plain_err


def test_structured_refit_of_the_output_projection_beats_the_plain_slice():
    """Removing input channels of down/o and re-fitting the rest by least squares keeps the
    projection's output on the calibration inputs closer to the dense one than slicing alone."""
    from hetero_llm.prune.structured import _refit
    torch.manual_seed(0)
    x = torch.randn(512, 8) @ torch.randn(8, 48) + 0.1 * torch.randn(512, 48)
    dense = nn.Linear(48, 16, bias=False)
    keep = torch.arange(0, 48, 2)
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    _refit(plain, None, keep)
    _refit(refit, x.t() @ x, keep)
    assert plain.weight.shape == refit.weight.shape == (16, 24)
    assert torch.equal(plain.weight, dense.weight[:, keep])
    with torch.no_grad():
        want = dense(x)
        plain_err = (plain(x[:, keep]) - want).norm()
        refit_err = (refit(x[:, keep]) - want).norm()
    assert refit_err < 0.5 * plain_err


def test_structured_refit_is_on_by_default_with_wanda_and_refused_without_data():
    assert PruneConfig(method="structured").reconstruct is True
    assert PruneConfig(method="structured", criterion="magnitude").reconstruct is False
    assert PruneConfig(method="wanda", scope="global").reconstruct is False
    with pytest.raises(InvalidOptionError, match="reconstruct"):
        PruneConfig(method="structured", criterion="magnitude", reconstruct=True)
    with pytest.raises(InvalidOptionError, match="reconstruct"):
        PruneConfig(method="magnitude", reconstruct=True)


@pytest.mark.parametrize("prune", ["magnitude", PruneConfig(method="structured", criterion="magnitude")])
def test_a_nan_weight_is_refused_before_anything_is_pruned(prune):
    model = _llama_for_refusal()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hetero_llm.HeteroLLMError, match="NaN"):
        hetero_llm.accelerate(model, prune=prune, quantize="none")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)) for k in before)
    assert not hasattr(model, "hetero_prune") and model.config.intermediate_size == 128


@pytest.mark.parametrize("data", ["raw text, not token ids", [torch.randn(1, 8)], []])
def test_bad_calibration_data_for_wanda_is_a_typed_error_and_nothing_is_pruned(data):
    model = _llama_for_refusal()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidOptionError, match="calibration"):
        hetero_llm.accelerate(model, prune="wanda", quantize="none", calibration_data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "hetero_prune")
