"""Structured pruning: whole MLP channels and KV-head groups removed, the model's config updated,
the result an ordinary (smaller) transformers model: generate, static caches, padded batches,
plans on meta models, and importance that removes exactly the unimportant channels."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import hetero_llm
from hetero_llm import InvalidOptionError, KernelConfig, PruneConfig
from hetero_llm.errors import UnsupportedArchitectureError
from hetero_llm.integrations.transformers import spec_for
from hetero_llm.prune.structured import plan_shrink, pruned_view, shrunk_config
from hetero_llm.quant.modules import linear_weight
from tiny_shapes import TINY_SHAPES

VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
CONFIGS = {**TINY_SHAPES, "opt": dict(TINY_SHAPES["opt"], init_std=0.1)}
MLP_KEY = {"llama": "intermediate_size", "mistral": "intermediate_size", "qwen2": "intermediate_size",
           "qwen3": "intermediate_size",
           "gemma": "intermediate_size", "phi3": "intermediate_size", "gpt2": "n_inner", "opt": "ffn_dim"}
MLP_FAMILIES = ("llama", "qwen2", "qwen3", "gpt2", "opt", "phi3")
HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gemma", "mistral")
# Modules keep their transformers names and types: pruning is checked on the modules it sliced.
PLAIN = KernelConfig(fuse_projections=False, fuse_norms=False)
NEW_TOKENS = 5
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def structured(mlp: float = 0.25, heads: float = 0.0, criterion: str = "magnitude") -> PruneConfig:
    return PruneConfig(method="structured", mlp=mlp, heads=heads, criterion=criterion)


def config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**BASE, **CONFIGS[family], **overrides})


def tiny(family: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(family, **overrides)).eval()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def calibration() -> list[torch.Tensor]:
    return [prompt(16, s) for s in range(3)]


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(ids, **kw).logits.float()


def greedy(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def block(model: nn.Module, i: int, role: str) -> nn.Module:
    spec = spec_for(model)
    return model.get_submodule(f"{spec.layers}.{i}.{spec.roles[role]}")


def width(module: nn.Module, side: str) -> int:
    w = linear_weight(module)
    return w.shape[0] if side == "out" else w.shape[1]


def mlp_modules(model: nn.Module, i: int) -> tuple[list[tuple[nn.Module, int]], nn.Module]:
    """([(input-side linear, how many MLP-width blocks its output holds)], output projection)."""
    roles = spec_for(model).roles
    if "gate_up" in roles:
        return [(block(model, i, "gate_up"), 2)], block(model, i, "down")
    if "gate" in roles:
        return [(block(model, i, "gate"), 1), (block(model, i, "up"), 1)], block(model, i, "down")
    return [(block(model, i, "fc_in"), 1)], block(model, i, "fc_out")


def n_layers(model: nn.Module) -> int:
    return len(model.get_submodule(spec_for(model).layers))


def assert_generates(model: nn.Module, padded: bool = True) -> None:
    """Finite logits; dynamic and static caches agree; a left-padded batch decodes each row as alone."""
    a, b = prompt(9, 1), prompt(6, 2)
    assert torch.isfinite(logits(model, a)).all()
    dynamic = greedy(model, a)
    assert dynamic.shape == (1, 9 + NEW_TOKENS)
    assert torch.equal(greedy(model, a, cache_implementation="static"), dynamic)
    if not padded:
        return
    pad = model.config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = greedy(model, batch, attention_mask=mask)
    assert torch.equal(out[0], dynamic[0])
    assert torch.equal(out[1, 3:], greedy(model, b)[0])


# -- MLP channels, every family --------------------------------------------------------------

@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_mlp_channels_shrink_modules_and_config(family):
    ref = tiny(family)
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune=structured(mlp=0.25), quantize="none", kernels=PLAIN)
    assert getattr(model.config, MLP_KEY[family]) == 96
    assert getattr(ref.config, MLP_KEY[family]) == 128
    for i in range(n_layers(model)):
        ins, out = mlp_modules(model, i)
        for m, blocks in ins:
            assert width(m, "out") == 96 * blocks
            if getattr(m, "bias", None) is not None:
                assert m.bias.shape[-1] == 96 * blocks
        assert width(out, "in") == 96
        assert width(out, "out") == width(mlp_modules(ref, i)[1], "out")  # hidden size kept
    report = model.hetero_prune
    mlp_linears = {f"{spec_for(ref).layers}.{i}.{spec_for(ref).roles[r]}" for i in range(n_layers(ref))
                   for r in ("gate", "up", "gate_up", "down", "fc_in", "fc_out") if r in spec_for(ref).roles}
    assert {r.name for r in report.layers} == mlp_linears
    assert report.params_before == sum(linear_weight(ref.get_submodule(n)).numel() for n in mlp_linears)
    assert report.params_after * 4 == report.params_before * 3  # a quarter of every MLP linear is gone
    assert report.sparsity == 0.0  # nothing masked: channels are gone, not zeroed
    assert_generates(model)


@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_pruned_config_builds_the_pruned_architecture(family):
    """type(model)(model.config) has the pruned model's parameter shapes: save_pretrained and
    from_pretrained work on the result."""
    model = hetero_llm.accelerate(tiny(family), prune=structured(mlp=0.25), quantize="none", kernels=PLAIN)
    fresh = type(model)(model.config)
    want = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == want


def test_save_pretrained_round_trip_of_a_pruned_model(tmp_path):
    model = hetero_llm.accelerate(tiny("llama"), prune=structured(mlp=0.25, heads=0.5), quantize="none",
                                  kernels=PLAIN)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == 96 and again.config.num_key_value_heads == 1
    x = prompt(7, 3)
    torch.testing.assert_close(logits(again, x), logits(model, x), **FP32_TOL)


# -- KV-head groups ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_head_groups_shrink_modules_and_config(family):
    ref = tiny(family)
    head_dim = 16
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune=structured(mlp=0.25, heads=0.5), quantize="none",
                                  kernels=PLAIN)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, head_dim)
    assert c.intermediate_size == 96 and c.hidden_size == 64
    assert (ref.config.num_attention_heads, ref.config.num_key_value_heads) == (4, 2)
    for i in range(n_layers(model)):
        if family == "phi3":
            assert width(block(model, i, "qkv"), "out") == (2 + 1 + 1) * head_dim
        else:
            assert width(block(model, i, "q"), "out") == 2 * head_dim
            assert width(block(model, i, "k"), "out") == head_dim
            assert width(block(model, i, "v"), "out") == head_dim
        assert width(block(model, i, "o"), "in") == 2 * head_dim
        assert width(block(model, i, "o"), "out") == 64
    assert_generates(model)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_head_pruning_with_default_kernels_and_int8(family):
    """The realistic path: structured pruning, then INT8 and the fused kernels on the smaller model."""
    model = hetero_llm.accelerate(tiny(family), prune=structured(heads=0.5), calibration_data=None)
    assert model.config.num_key_value_heads == 1
    assert_generates(model, padded=family == "llama")


@pytest.mark.parametrize("family", ("gpt2", "opt"))
def test_head_pruning_where_head_size_is_derived_is_refused(family):
    model = tiny(family)
    with pytest.raises(UnsupportedArchitectureError, match="heads=0"):
        hetero_llm.accelerate(model, prune=structured(heads=0.5))
    assert not hasattr(model, "hetero_plan")
    assert getattr(model.config, MLP_KEY[family]) == 128


def test_too_few_groups_to_remove_one_is_refused():
    with pytest.raises(InvalidOptionError, match="rounds to none"):
        hetero_llm.plan(tiny("llama"), prune=structured(heads=0.4))  # 0.4 of 2 groups: none


def test_gqa_ratio_is_kept():
    model = hetero_llm.accelerate(tiny("llama", num_attention_heads=8, num_key_value_heads=4),
                                  prune=structured(mlp=0.0, heads=0.5), quantize="none", kernels=PLAIN)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 8)
    assert c.intermediate_size == 128  # mlp=0: MLP untouched
    assert width(block(model, 0, "gate"), "out") == 128
    assert_generates(model, padded=False)


# -- the caller's objects ---------------------------------------------------------------------

def test_shared_config_object_is_not_mutated():
    cfg = config("llama")
    torch.manual_seed(0)
    a = LlamaForCausalLM(cfg).eval()
    b = LlamaForCausalLM(cfg).eval()
    assert a.config is cfg and b.config is cfg  # the premise: both models hold the caller's config
    x = prompt(8, 4)
    before = logits(b, x)
    hetero_llm.accelerate(a, prune=structured(mlp=0.25, heads=0.5))
    assert a.config is not cfg and a.config.intermediate_size == 96 and a.config.num_key_value_heads == 1
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 2)
    assert b.config is cfg
    assert all(getattr(m, "config", None) is not cfg for m in a.modules())  # no submodule keeps the old one
    assert torch.equal(logits(b, x), before)
    assert_generates(a, padded=False)


def test_pruned_view_and_plan_shrink_leave_the_model_alone():
    model = tiny("phi3")
    spec = spec_for(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    shrink = plan_shrink(model, spec, structured(mlp=0.25, heads=0.5))
    assert (shrink.mlp, shrink.kv_heads, shrink.heads, shrink.head_dim) == ((128, 96), (2, 1), (4, 2), 16)
    view = pruned_view(model, spec, shrink)
    assert all(p.device.type == "meta" for p in view.parameters())
    assert view.config.intermediate_size == 96 and view.config.num_attention_heads == 2
    assert model.config.intermediate_size == 128 and model.config.num_attention_heads == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    new = shrunk_config(model.config, spec, shrink)
    assert new is not model.config and new.num_key_value_heads == 1 and new.head_dim == 16


# -- plans ------------------------------------------------------------------------------------

def test_plan_marks_pruned_linears_and_describes_the_pruned_model():
    model = tiny("llama")
    p = hetero_llm.plan(model, hardware="cpu-2core", prune=structured(mlp=0.25, heads=0.5))
    entries = {e.name: e for e in p.entries}
    for i in range(2):
        for role, size in (("gate_proj", 64 * 96), ("up_proj", 64 * 96), ("down_proj", 96 * 64)):
            e = entries[f"model.layers.{i}.mlp.{role}"]
            assert e.prune == "structured: 96 of 128 MLP channels" and e.params == size
        for role, size in (("q_proj", 64 * 32), ("k_proj", 64 * 16), ("v_proj", 64 * 16), ("o_proj", 32 * 64)):
            e = entries[f"model.layers.{i}.self_attn.{role}"]
            assert e.prune == "structured: 1 of 2 KV groups" and e.params == size
    assert entries["lm_head"].prune is None and entries["model.embed_tokens"].prune is None
    assert any("MLP 128 → 96" in n and "KV heads 2 → 1" in n for n in p.notes)
    assert "structured" in str(p)  # the table shows the prune column
    assert model.config.intermediate_size == 128  # plan() changed nothing


def test_plan_of_mlp_only_pruning_leaves_attention_unmarked():
    p = hetero_llm.plan(tiny("gpt2"), hardware="cpu-2core", prune=structured(mlp=0.5))
    marked = {e.name for e in p.entries if e.prune}
    assert marked == {f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")}
    assert any("MLP 128 → 64" in n for n in p.notes)


@pytest.mark.parametrize("family", ("llama", "phi3", "gpt2"))
def test_plan_on_a_meta_model_with_structured_pruning(family):
    heads = 0.5 if family != "gpt2" else 0.0
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(family))
    p = hetero_llm.plan(model, hardware="cpu-2core", prune=structured(mlp=0.25, heads=heads, criterion="wanda"))
    real = hetero_llm.plan(tiny(family), hardware="cpu-2core", prune=structured(mlp=0.25, heads=heads,
                                                                              criterion="wanda"))
    assert p.to_json() == real.to_json()
    assert any(e.prune for e in p.entries)
    assert getattr(model.config, MLP_KEY[family]) == 128


def test_plan_made_first_is_applied_to_the_unpruned_model():
    model = tiny("qwen2")
    p = hetero_llm.plan(model, prune=structured(mlp=0.25, heads=0.5))
    out = hetero_llm.accelerate(model, plan=p)
    assert out.hetero_plan == p and out.config.intermediate_size == 96
    assert_generates(out, padded=False)


# -- which channels go -------------------------------------------------------------------------

def _zero_mlp_channels(model: nn.Module, seed: int) -> dict[int, torch.Tensor]:
    """Zero MLP channels (different ones per layer) everywhere they are read or written."""
    gone = {}
    for i in range(n_layers(model)):
        ins, out = mlp_modules(model, i)
        width_ = width(out, "in")
        idx = torch.randperm(width_, generator=torch.Generator().manual_seed(seed + i))[: width_ // 4]
        with torch.no_grad():
            for m, blocks in ins:
                for b in range(blocks):
                    linear_weight(m)[idx + b * width_] = 0
                    if getattr(m, "bias", None) is not None:
                        m.bias[idx + b * width_] = 0
            linear_weight(out)[:, idx] = 0
        gone[i] = idx
    return gone


def _kept(total: int, gone: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(total, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().squeeze(1)


@pytest.mark.parametrize("family, criterion", [("llama", "magnitude"), ("llama", "wanda"), ("phi3", "magnitude"),
                                               ("gpt2", "magnitude"), ("opt", "magnitude")])
def test_structured_removes_exactly_the_unimportant_mlp_channels(family, criterion):
    ref = tiny(family)
    gone = _zero_mlp_channels(ref, seed=10)
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune=structured(mlp=0.25, criterion=criterion),
                                  quantize="none", kernels=PLAIN,
                                  calibration_data=calibration() if criterion == "wanda" else None)
    for i in range(n_layers(ref)):
        keep = _kept(128, gone[i])
        (ins, out), (ref_ins, ref_out) = mlp_modules(model, i), mlp_modules(ref, i)
        for (m, blocks), (r, _) in zip(ins, ref_ins):
            rows = torch.cat([keep + b * 128 for b in range(blocks)])
            assert torch.equal(linear_weight(m), linear_weight(r)[rows])
            if getattr(r, "bias", None) is not None:
                assert torch.equal(m.bias, r.bias[rows])
        assert torch.equal(linear_weight(out), linear_weight(ref_out)[:, keep])
        if getattr(ref_out, "bias", None) is not None:
            assert torch.equal(out.bias, ref_out.bias)
    # the removed channels contributed nothing: the outputs are those of the original
    x = prompt(10, 5)
    torch.testing.assert_close(logits(model, x), logits(ref, x), **FP32_TOL)


def _zero_kv_group(model: nn.Module, i: int, group: int, heads: int, kv: int, hd: int) -> None:
    per = heads // kv
    q_rows = torch.arange(group * per * hd, (group + 1) * per * hd)
    kv_rows = torch.arange(group * hd, (group + 1) * hd)
    with torch.no_grad():
        if "qkv" in spec_for(model).roles:
            w = linear_weight(block(model, i, "qkv"))
            w[torch.cat([q_rows, kv_rows + heads * hd, kv_rows + (heads + kv) * hd])] = 0
        else:
            for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                linear_weight(block(model, i, role))[rows] = 0
        linear_weight(block(model, i, "o"))[:, q_rows] = 0


@pytest.mark.parametrize("family, criterion", [("llama", "magnitude"), ("qwen2", "magnitude"),
                                               ("phi3", "magnitude"), ("mistral", "wanda")])
def test_structured_removes_exactly_the_unimportant_kv_group(family, criterion):
    heads, kv, hd = 8, 4, 8
    ref = tiny(family, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd)
    dropped = {0: 2, 1: 0}  # a middle group in layer 0, the first in layer 1
    for i, g in dropped.items():
        _zero_kv_group(ref, i, g, heads, kv, hd)
    model = hetero_llm.accelerate(copy.deepcopy(ref), prune=structured(mlp=0.0, heads=0.25, criterion=criterion),
                                  quantize="none", kernels=PLAIN,
                                  calibration_data=calibration() if criterion == "wanda" else None)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 3)
    per = heads // kv
    for i, g in dropped.items():
        groups = [x for x in range(kv) if x != g]
        q_rows = torch.cat([torch.arange(x * per * hd, (x + 1) * per * hd) for x in groups])
        kv_rows = torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in groups])
        if family == "phi3":
            rows = torch.cat([q_rows, kv_rows + heads * hd, kv_rows + (heads + kv) * hd])
            assert torch.equal(linear_weight(block(model, i, "qkv")), linear_weight(block(ref, i, "qkv"))[rows])
        else:
            for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                assert torch.equal(linear_weight(block(model, i, role)), linear_weight(block(ref, i, role))[rows])
                b = block(ref, i, role).bias
                if b is not None:  # qwen2: q/k/v biases follow their rows
                    assert torch.equal(block(model, i, role).bias, b[rows])
        assert torch.equal(linear_weight(block(model, i, "o")), linear_weight(block(ref, i, "o"))[:, q_rows])
    if family != "qwen2":  # qwen2's k/v biases of the removed group were not zero: outputs differ
        x = prompt(10, 6)
        torch.testing.assert_close(logits(model, x), logits(ref, x), **FP32_TOL)


# -- architectures without a role table --------------------------------------------------------

def test_structured_on_an_unknown_architecture_is_refused():
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError, match="prune='magnitude'"):
        hetero_llm.accelerate(model, strict=False, prune=structured())
    with pytest.raises(UnsupportedArchitectureError):
        hetero_llm.plan(model, strict=False, prune=structured())
    assert not hasattr(model, "hetero_plan") and model.config.intermediate_size == 128
