"""W8A8 calibration: input normalization, activation maxima via hooks, SmoothQuant factors, outliers."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BatchEncoding

from hetero_llm.errors import InvalidOptionError
from hetero_llm.quant.calibrate import (activation_absmax, calibration_batches, outlier_channels,
                                        smoothing_factors)
from tiny_shapes import TINY_SHAPES

VOCAB = 256
FACTOR_RTOL = 1e-6  # smoothing factors against the formula computed here in fp64
FIX_HINT = r"(?i)tokeni[sz]e"  # every refusal says how to produce valid calibration data


def tiny_llama() -> nn.Module:
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               **TINY_SHAPES["llama"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids_of(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# -- calibration_batches -------------------------------------------------------------------------

def test_one_dimensional_tensor_becomes_one_batch_row():
    ids = ids_of(9)
    (batch,) = calibration_batches(ids)
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (1, 9)
    assert torch.equal(batch["input_ids"][0], ids)


def test_two_dimensional_tensor_is_one_batch():
    ids = ids_of(3, 7).int()  # int32 token ids are accepted too
    (batch,) = calibration_batches(ids)
    assert batch["input_ids"] is ids


def test_list_and_other_iterables_of_tensors():
    samples = [ids_of(5, seed=1), ids_of(2, 6, seed=2), ids_of(1, 4, seed=3)]
    batches = calibration_batches(samples)
    assert [b["input_ids"].shape for b in batches] == [(1, 5), (2, 6), (1, 4)]
    assert len(calibration_batches(tuple(samples))) == 3
    assert len(calibration_batches(s for s in samples)) == 3  # a generator, read once


def test_tokenizer_like_dicts():
    ids = ids_of(8, seed=4)
    mask = torch.ones(8, dtype=torch.long)
    mask[:2] = 0
    (b,) = calibration_batches({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(8)})
    assert set(b) == {"input_ids", "attention_mask"}  # what the model needs, nothing else
    assert b["input_ids"].shape == (1, 8) and b["attention_mask"].shape == (1, 8)
    assert torch.equal(b["attention_mask"][0], mask)
    enc = BatchEncoding({"input_ids": ids_of(2, 5, seed=5), "attention_mask": torch.ones(2, 5, dtype=torch.long)})
    (b,) = calibration_batches([enc])
    assert b["input_ids"].shape == (2, 5) and b["attention_mask"].shape == (2, 5)
    (b,) = calibration_batches({"input_ids": ids})  # a dict without a mask
    assert set(b) == {"input_ids"}


@pytest.mark.parametrize("data, detail", [
    ("some text", "token ids"),
    (["some text", "more text"], "holds a str"),
    ([], "empty"),
    (torch.randn(2, 8), "integer tensor"),
    ([ids_of(4), torch.rand(4)], "integer tensor"),
    ({"attention_mask": torch.ones(1, 4, dtype=torch.long)}, "input_ids"),
    ([{"text": "hello"}], "input_ids"),
    ({"input_ids": [5, 6, 7]}, "integer tensor"),  # a tokenizer called without return_tensors='pt'
    (torch.zeros(0, dtype=torch.long), "non-empty"),
    (42, "token ids"),
    ([[5, 6, 7]], "holds a list"),
], ids=["str", "list-of-str", "empty-list", "float-tensor", "float-in-list", "dict-without-input-ids",
        "dict-of-text", "python-list-ids", "empty-tensor", "int", "nested-list"])
def test_refusals_say_how_to_fix(data, detail):
    with pytest.raises(InvalidOptionError, match=FIX_HINT) as info:
        calibration_batches(data)
    assert detail in str(info.value)


# -- activation_absmax ----------------------------------------------------------------------------

LINEARS = [f"model.layers.{i}.{rel}" for i in range(2)
           for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


@torch.no_grad()
def manual_absmax(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)))
        for n in names]
    try:
        for b in batches:
            model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.stack(v).amax(0) for n, v in seen.items()}


def test_activation_absmax_equals_a_manual_max_over_hooks():
    model = tiny_llama()
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    data = [ids_of(12, seed=1), {"input_ids": ids_of(2, 10, seed=2), "attention_mask": mask}, ids_of(1, 5, seed=3)]
    stats = activation_absmax(model, LINEARS, data, progress=False)
    assert set(stats) == set(LINEARS)
    want = manual_absmax(model, LINEARS, calibration_batches(data))
    for name in LINEARS:
        in_f = model.get_submodule(name).in_features
        assert stats[name].shape == (in_f,) and stats[name].dtype == torch.float32, name
        assert torch.equal(stats[name], want[name]), name
    # q, k and v read the same input, so they see the same maxima
    assert torch.equal(stats["model.layers.0.self_attn.q_proj"], stats["model.layers.0.self_attn.v_proj"])
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_more_samples_never_lower_the_maxima():
    model = tiny_llama()
    one = activation_absmax(model, LINEARS, [ids_of(8, seed=4)], progress=False)
    two = activation_absmax(model, LINEARS, [ids_of(8, seed=4), ids_of(8, seed=5)], progress=False)
    for name in LINEARS:
        assert torch.all(two[name] >= one[name])
    assert any(torch.any(two[n] > one[n]) for n in LINEARS)


def test_hooks_are_removed_when_the_model_raises():
    model = tiny_llama()
    with pytest.raises(IndexError):
        activation_absmax(model, LINEARS, [ids_of(4), torch.tensor([[1, VOCAB + 5]])], progress=False)
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(InvalidOptionError):
        activation_absmax(model, LINEARS, ["not token ids"], progress=False)
    assert not any(m._forward_pre_hooks for m in model.modules())


class TwoBranches(nn.Module):
    """A model whose second linear only runs when asked: calibration may miss it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.calls.append({"mask": attention_mask, "use_cache": use_cache})
        return self.used(self.embed(input_ids))


def test_modules_never_reached_are_reported():
    model = TwoBranches()
    with pytest.raises(InvalidOptionError, match=r"never reached unused \(1 modules"):
        activation_absmax(model, ["used", "unused"], torch.tensor([1, 2, 3]), progress=False)
    assert not model.used._forward_pre_hooks and not model.unused._forward_pre_hooks


def test_inputs_reach_the_model_as_given():
    model = TwoBranches()
    mask = torch.tensor([0, 1, 1])
    stats = activation_absmax(model, ["used"], {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": mask},
                              progress=False)
    (call,) = model.calls
    assert call["use_cache"] is False and torch.equal(call["mask"], mask.reshape(1, 3))
    with torch.no_grad():
        want = model.embed(torch.tensor([1, 2, 3])).abs().amax(0)
    assert torch.equal(stats["used"], want)


# -- smoothing_factors ---------------------------------------------------------------------------------

def formula(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    return (a.double() ** alpha / w.double() ** (1 - alpha)).float()


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.85, 1.0])
def test_smoothing_formula(alpha):
    g = torch.Generator().manual_seed(6)
    a = torch.rand(64, generator=g) * 20 + 0.1
    w = torch.rand(64, generator=g) * 2 + 0.01
    s = smoothing_factors(a, w, alpha)
    assert s.shape == (64,) and s.dtype == torch.float32
    torch.testing.assert_close(s, formula(a, w, alpha), rtol=FACTOR_RTOL, atol=0)
    if alpha == 0.0:  # all on the weight side: s = 1 / max|w|
        torch.testing.assert_close(s, 1.0 / w, rtol=FACTOR_RTOL, atol=0)
    if alpha == 1.0:  # all on the activation side: s = max|x|
        torch.testing.assert_close(s, a, rtol=FACTOR_RTOL, atol=0)


def test_smoothing_equalizes_the_two_sides_at_half():
    # SmoothQuant's point: after x / s and W * s, the activation and weight maxima of a channel match.
    a = torch.tensor([100.0, 1.0, 0.5, 30.0])
    w = torch.tensor([0.01, 0.5, 2.0, 0.2])
    s = smoothing_factors(a, w, 0.5)
    torch.testing.assert_close(a / s, w * s, rtol=1e-5, atol=0)


def test_dead_channels_get_one():
    a = torch.tensor([0.0, 1e-6, 3.0, 3.0, 0.0, 5.0])
    w = torch.tensor([1.0, 1.0, 0.0, 1e-7, 0.0, 0.5])
    s = smoothing_factors(a, w, 0.5)
    assert torch.equal(s[:5], torch.ones(5))
    torch.testing.assert_close(s[5], formula(a[5:], w[5:], 0.5)[0], rtol=FACTOR_RTOL, atol=0)


def test_factors_are_clamped_and_finite():
    a = torch.tensor([1e8, 1e-4, float("inf"), float("nan"), 3e38, 2.0])
    w = torch.tensor([1e-3, 1e6, 1.0, 1.0, 1e-30, 3e38])
    for alpha in (0.0, 0.5, 1.0):
        s = smoothing_factors(a, w, alpha)
        assert torch.isfinite(s).all(), alpha
        assert (s >= 1e-4).all() and (s <= 1e4).all(), alpha
    s = smoothing_factors(a, w, 0.5)
    assert s[0] == 1e4 and s[1] == pytest.approx(1e-4) and s[2] == 1.0 and s[3] == 1.0


# -- outlier_channels ----------------------------------------------------------------------------------

def test_outlier_channels_sorted_top_k():
    x = torch.tensor([0.5, 9.0, 0.1, 7.0, 3.0, 8.0, 0.2])
    idx = outlier_channels(x, 3)
    assert idx.dtype == torch.long and idx.tolist() == [1, 3, 5]  # the largest three, in channel order
    assert outlier_channels(x, 1).tolist() == [1]
    assert outlier_channels(x, 100).tolist() == list(range(7))  # more than there are: all
    assert outlier_channels(x, 0) is None
    assert outlier_channels(x, -2) is None
    assert outlier_channels(x.half(), 2).tolist() == [1, 5]
