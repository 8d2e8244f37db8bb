"""Int8Embedding (lookups, dtypes, Gemma's scaled embedding) and the tied INT8 lm_head."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.quant import dequantize
from hetero_llm.quant.backends import int8pack_available
from hetero_llm.quant.embedding import Int8Embedding, TiedInt8Linear
from tiny_shapes import TINY_SHAPES

# Tolerances, in one place.
# A lookup's error per element, in units of its row's scale: round to nearest (+ fp32 rounding).
MAX_ERROR_STEPS = 0.5 + 1e-5
# Unit roundoff of the output dtype: the INT8 lookup and a half-precision reference each round once.
OUT_ROUNDING = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# Tied lm_head against F.linear on the dequantized table (max |diff| / max |ref|), by backend.
TIED_REL_TOL = {"torch-dequant": 1e-5, "cpu-int8pack": 1e-2}
# Whole-model logits, INT8 against the original (as in tests/integrations).
MIN_COSINE = 0.99
MAX_REL_ERR = {torch.float32: 5e-2, torch.bfloat16: 6e-2}

VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids_of(*shape: int, seed: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def make_embedding(vocab: int = 50, dim: int = 37, dtype=torch.float32, padding_idx=None, seed: int = 0):
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed)))
        emb.weight[vocab // 2] *= 1e-3  # rows of very different magnitudes: per-row scales matter
        emb.weight[vocab // 3] *= 1e3
        if padding_idx is not None:
            emb.weight[padding_idx] = 0.0
    return emb.to(dtype)


def assert_lookup_close(got: torch.Tensor, want: torch.Tensor, row_scale: torch.Tensor, factor: float = 1.0):
    """|got - want| <= half a step of each row (times the embedding's output factor), plus output rounding."""
    err = (got.float() - want.float()).abs()
    # either side's output rounding (a bf16 reference against the fp32 output of a bf16 model on a CPU)
    rounding = max(OUT_ROUNDING[got.dtype], OUT_ROUNDING[want.dtype]) * (got.float().abs() + want.float().abs())
    bound = MAX_ERROR_STEPS * row_scale.unsqueeze(-1) * factor + rounding
    assert torch.all(err <= bound), (err / bound).max().item()


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, dtype=torch.float32) -> None:
    got, want = got.float(), want.float()
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert cos > MIN_COSINE and rel < MAX_REL_ERR[dtype], (cos, rel)


# -- Int8Embedding ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (2, 5), (1, 1)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_lookups_match_nn_embedding_per_row(shape, index_dtype):
    emb = make_embedding()
    q = Int8Embedding.from_embedding(emb)
    ids = ids_of(*shape, seed=1, high=50).to(index_dtype)
    ids.view(-1)[0] = 50 // 3  # the huge row
    got = q(ids)
    assert got.shape == (*shape, 37) and got.dtype == torch.float32
    assert_lookup_close(got, emb(ids.long()).detach(), q.scale[ids.long()])


def test_every_row_and_repeated_ids():
    emb = make_embedding(vocab=300, dim=64)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.arange(300).repeat(2)
    got = q(ids)
    assert_lookup_close(got, emb(ids).detach(), q.scale[ids])
    assert torch.equal(got[:300], got[300:])
    # lookups are rows of the dequantized table, nothing else
    assert torch.equal(got[:300], dequantize(q.quantized_weight()))


def test_layout_state_dict_and_padding():
    emb = make_embedding(padding_idx=3)
    q = Int8Embedding.from_embedding(emb)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (50, 37)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (50,)
    assert torch.equal(q.scale, q.scale.bfloat16().float())  # bf16-exact, like every INT8 scale
    assert set(q.state_dict()) == {"qweight", "scale"}  # scale_bf16 is derived, not saved
    assert q.padding_idx == 3 and q.num_embeddings == 50 and q.embedding_dim == 37
    assert torch.all(q(torch.tensor([3, 3])) == 0)  # the padding row stays exactly zero
    assert "int8 per row" in repr(q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_tables_return_their_dtype(dtype):
    emb = make_embedding(dtype=dtype)
    q = Int8Embedding.from_embedding(emb)
    assert q.dtype == dtype and q.scale.dtype == torch.float32
    ids = ids_of(3, 4, seed=2, high=50)
    got = q(ids)
    assert got.dtype == dtype
    assert_lookup_close(got, emb(ids).detach(), q.scale[ids])


def test_casts_change_the_lookup_dtype_and_keep_fp32_scales():
    emb = make_embedding()
    q = Int8Embedding.from_embedding(emb)
    scale, qweight = q.scale.clone(), q.qweight.clone()
    ids = ids_of(9, seed=3, high=50)
    want = q(ids)
    q.half()
    assert q.dtype == torch.float16 and q(ids).dtype == torch.float16
    assert torch.equal(q.scale, scale) and q.scale.dtype == torch.float32 and torch.equal(q.qweight, qweight)
    assert q.scale_bf16.dtype == torch.bfloat16 and torch.equal(q.scale_bf16.float(), scale)
    q.to("cpu", torch.bfloat16)
    assert q(ids).dtype == torch.bfloat16
    q.float()
    assert q.dtype == torch.float32 and torch.equal(q(ids), want)
    q.to("cpu")  # a device move alone keeps the dtype
    assert q.dtype == torch.float32


def test_weight_property_is_the_dequantized_table():
    emb = make_embedding()
    q = Int8Embedding.from_embedding(emb)
    w = q.weight
    assert w.shape == (50, 37) and w.dtype == torch.float32 and not isinstance(w, nn.Parameter)
    assert torch.equal(w, dequantize(q.quantized_weight()))
    assert_lookup_close(w, emb.weight.detach(), q.scale)
    assert q.weight is not w  # a fresh tensor: writing to it cannot corrupt the INT8 rows
    q.half()
    assert q.weight.dtype == torch.float16


class ScaledEmbedding(nn.Embedding):
    """Stands in for Gemma's ScaledWordEmbedding: lookups times a (weight-dtype) factor."""

    def __init__(self, vocab, dim, embed_scale):
        super().__init__(vocab, dim)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_scale_is_kept(dtype):
    factor = 40 ** 0.5  # not a power of two: rounding in the weight dtype matters
    emb = ScaledEmbedding(50, 37, factor)
    with torch.no_grad():
        emb.weight.normal_(generator=torch.Generator().manual_seed(4))
    emb = emb.to(dtype)
    q = Int8Embedding.from_embedding(emb)
    assert q.embed_scale == float(torch.tensor(factor).to(dtype))
    assert "embed_scale=" in repr(q)
    ids = ids_of(2, 6, seed=5, high=50)
    got = q(ids)
    assert got.dtype == dtype
    assert_lookup_close(got, emb(ids).detach(), q.scale[ids], factor=q.embed_scale)
    plain = Int8Embedding.from_embedding(make_embedding())
    assert plain.embed_scale == 1.0 and "embed_scale" not in repr(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 40])
def test_gemma_scaled_word_embedding(dtype, hidden):
    ref = tiny_model("gemma", hidden_size=hidden).to(dtype)
    original = ref.model.embed_tokens
    assert type(original).__name__.endswith("ScaledWordEmbedding")
    model = hetero_llm.accelerate(copy.deepcopy(ref))
    e = model.hetero_plan.entry("model.embed_tokens")
    assert (e.action, e.quant, e.kernel) == ("quantize", "int8", "int8-lookup")
    emb = model.model.embed_tokens
    # a bf16 model on a CPU computes in fp32 once its weights are INT8 (planner.precision)
    computes = getattr(torch, model.hetero_plan.model_settings.get("compute_dtype", str(dtype)[6:]))
    assert isinstance(emb, Int8Embedding) and emb.dtype == computes
    assert emb.embed_scale == float(original.embed_scale.to(dtype))  # sqrt(hidden), as the model rounds it
    ids = ids_of(2, 9, seed=6)
    with torch.no_grad():
        want = original(ids)
    assert_lookup_close(emb(ids), want, emb.scale[ids], factor=emb.embed_scale)


# -- TiedInt8Linear ---------------------------------------------------------------------------------

def tied_backends():
    yield "torch-dequant"
    yield pytest.param("cpu-int8pack", marks=pytest.mark.skipif(not int8pack_available(),
                                                                 reason="no usable int8pack kernel"))


@pytest.mark.parametrize("backend", list(tied_backends()))
def test_tied_linear_reads_the_embedding(backend):
    emb = Int8Embedding.from_embedding(make_embedding(vocab=50, dim=64))
    head = TiedInt8Linear(emb, backend)
    assert head.backend == backend
    assert head.qweight is emb.qweight and head.scale is emb.scale
    assert list(head.parameters()) == [] and list(head.buffers()) == [] and head.state_dict() == {}
    assert (head.in_features, head.out_features) == (64, 50)
    assert head.bias is None and head.zero_point is None and head.group_size is None
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(7))
    y = head(x)
    assert y.shape == (2, 3, 50) and y.dtype == torch.float32
    want = F.linear(x.double(), emb.weight.double())
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < TIED_REL_TOL[backend]
    assert torch.equal(head.weight, emb.weight)


def test_tied_linear_picks_a_backend_that_supports_the_shape():
    emb = Int8Embedding.from_embedding(make_embedding(vocab=50, dim=37))  # 37 % 16 != 0
    assert TiedInt8Linear(emb).backend == "torch-dequant"
    assert TiedInt8Linear(emb, "cpu-int8pack").backend == "torch-dequant"


@pytest.mark.parametrize("family", ["gemma", "gpt2", "opt"])
def test_tied_lm_head_shares_the_int8_table_in_a_model(family):
    ref = tiny_model(family)
    model = hetero_llm.accelerate(copy.deepcopy(ref))
    emb, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(emb, Int8Embedding) and isinstance(head, TiedInt8Linear)
    assert head.qweight is emb.qweight and head.embedding is emb
    keys = model.state_dict().keys()
    assert not any(k.startswith("lm_head") for k in keys)
    tables = [k for k, v in model.state_dict().items() if v.data_ptr() == emb.qweight.data_ptr()]
    assert len(tables) == 1 and tables[0].endswith(("embed_tokens.qweight", "wte.qweight"))  # saved once
    ids = torch.cat([ids_of(1, 12, seed=8), ids_of(1, 12, seed=9)]).clamp(min=3)
    with torch.inference_mode():
        assert_logits_close(model(ids).logits, ref(ids).logits)


def test_tied_lm_head_survives_a_cast():
    ref = tiny_model("gemma")
    model = hetero_llm.accelerate(copy.deepcopy(ref))
    scale = model.model.embed_tokens.scale.clone()
    model.to("cpu", torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    emb, head = model.model.embed_tokens, model.lm_head
    assert head.qweight is emb.qweight and head.scale is emb.scale
    assert emb.scale.dtype == torch.float32 and torch.equal(emb.scale, scale)
    assert emb.dtype == torch.bfloat16
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    ids = ids_of(2, 12, seed=10).clamp(min=3)
    with torch.inference_mode():
        out = model(ids).logits
        assert out.dtype == torch.bfloat16
        assert_logits_close(out, ref(ids).logits, torch.bfloat16)
    gen = model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 16)


def test_untied_model_gets_its_own_int8_head():
    ref = tiny_model("llama")
    model = hetero_llm.accelerate(copy.deepcopy(ref))
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert not isinstance(model.lm_head, TiedInt8Linear)
    assert model.lm_head.qweight is not model.model.embed_tokens.qweight
    assert {"lm_head.qweight", "lm_head.scale"} <= set(model.state_dict())
