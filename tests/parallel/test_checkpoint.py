"""load_shard: a meta model, cut for one tp rank (or one pipeline stage), reads exactly its
slices from safetensors; reduce_statistics makes a row-parallel slice's INT8 scales those of
the whole row. Single process, CPU: the slicing is done without a process group."""
from __future__ import annotations

import copy
import json

import accelerate
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from hetero_llm.errors import ModelLoadError
from hetero_llm.integrations.transformers import map_roles, spec_for
from hetero_llm.parallel.checkpoint import load_shard
from hetero_llm.parallel.layout import role_shard, tensor_layout
from hetero_llm.parallel.pipeline import EmbeddingStandIn, LogitsStandIn, SkippedLayer
from hetero_llm.parallel.tensor import slice_module
from hetero_llm.quant.primitives import quantize_weight, reduce_statistics

_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 128}
# name: (config, vocab_parallel)
CASES = {
    "llama_tied": (lambda: LlamaConfig(**_LLAMA, tie_word_embeddings=True), True),
    # biases everywhere: a row-parallel nn.Linear keeps its bias on rank 0 only
    "llama_bias": (lambda: LlamaConfig(**_LLAMA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                   False),
    "qwen2": (lambda: Qwen2Config(**_LLAMA, tie_word_embeddings=False), True),  # q/k/v biases
    # Conv1D; tied lm_head, replicated vocabulary; a row-parallel bias is zeros on rank 1
    "gpt2": (lambda: GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=64, vocab_size=256,
                                bos_token_id=0, eos_token_id=0), False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (full model, checkpoint directory)."""
    out = {}
    for name, (config, _) in CASES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config()).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def skeleton(config, how: str) -> nn.Module:
    if how == "init_empty_weights":  # parameters on meta, buffers real
        with accelerate.init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):  # everything on meta, rotary inv_freq included
        return AutoModelForCausalLM.from_config(config)


def cut(model: nn.Module, rank: int, vocab_parallel: bool, tp: int = 2) -> nn.Module:
    """What parallel/tensor.py::shard_tensor_parallel does to the weights, without wiring."""
    spec = spec_for(model)
    lay = tensor_layout(model, spec, tp, vocab_parallel)
    head = model.get_submodule(spec.model_roles["lm_head"])
    embed = model.get_submodule(spec.model_roles["embed"])
    tied = head.weight is embed.weight
    for name, role in map_roles(model, spec).roles.items():
        shard = role_shard(role, lay)
        if shard is not None and not (role == "lm_head" and tied):
            slice_module(model.get_submodule(name), shard, rank)
    if tied:
        head.weight = embed.weight
    return model


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def assert_same(loaded: nn.Module, ref: nn.Module) -> None:
    got, want = tensors(loaded), tensors(ref)
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert not t.is_meta and t.dtype == want[name].dtype, name
        assert torch.equal(t, want[name]), name


def held_bytes(model: nn.Module, full_shapes: dict[str, torch.Size]) -> tuple[int, int, int]:
    """(bytes of every tensor read, bytes held of the sliced ones, full bytes of those), each
    tensor counted once (a tied lm_head is the embedding's tensor)."""
    seen, read, held, full = set(), 0, 0, 0
    for prefix, m in model.named_modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            dim, _ = m.__dict__.get("_hetero_slices", {}).get(name, (-1, ()))
            if dim is None:  # zeros on this rank, not read
                continue
            read += p.numel() * p.element_size()
            if dim >= 0:
                held += p.numel() * p.element_size()
                full += full_shapes[f"{prefix}.{name}"].numel() * p.element_size()
    return read, held, full


@pytest.mark.parametrize("how", ["init_empty_weights", "meta"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_reads_exactly_its_slices(saved, case, rank, how):
    model, path = saved[case]
    config, vocab_parallel = CASES[case]
    ref = cut(copy.deepcopy(model), rank, vocab_parallel)
    meta = cut(skeleton(config(), how), rank, vocab_parallel)
    read = load_shard(meta, path)
    assert_same(meta, ref)
    if getattr(model.config, "tie_word_embeddings", False):
        assert meta.lm_head.weight is meta.get_input_embeddings().weight  # the tie survives
    total, held, full = held_bytes(meta, {n: t.shape for n, t in tensors(model).items()})
    assert read == total
    assert held / full == pytest.approx(0.5, abs=0.01)


def test_full_load_from_meta_gives_the_same_logits(saved):
    model, path = saved["llama_tied"]
    meta = skeleton(model.config, "meta")
    load_shard(meta, path)  # rotary inv_freq is recomputed: it is not in the checkpoint
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(meta.eval()(ids).logits, model(ids).logits)


def test_sharded_checkpoint_with_index(saved, tmp_path):
    model, _ = saved["llama_bias"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    meta = cut(skeleton(model.config, "meta"), 1, False)
    load_shard(meta, tmp_path)
    assert_same(meta, cut(copy.deepcopy(model), 1, False))


def test_old_gpt2_keys_without_the_base_model_prefix(saved, tmp_path):
    model, path = saved["gpt2"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        old = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
    assert "h.0.attn.c_attn.weight" in old
    save_file(old, tmp_path / "old.safetensors")
    meta = cut(skeleton(model.config, "meta"), 1, True)
    load_shard(meta, tmp_path / "old.safetensors")  # one file, not a directory
    assert_same(meta, cut(copy.deepcopy(model), 1, True))


def _rewrite(src, dst, rename) -> None:
    """Copy a checkpoint with its keys renamed (rename returns None: drop the key)."""
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        out = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
    save_file({k: v for k, v in out.items() if k is not None}, dst / "model.safetensors")


def test_a_tie_is_read_from_whichever_side_the_checkpoint_stores(saved, tmp_path):
    model, path = saved["llama_tied"]
    _rewrite(path, tmp_path, lambda k: "lm_head.weight" if k == "model.embed_tokens.weight" else k)
    meta = skeleton(model.config, "init_empty_weights")
    load_shard(meta, tmp_path)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert torch.equal(meta.model.embed_tokens.weight, model.model.embed_tokens.weight)
    first = _stage(skeleton(model.config, "meta"), range(2), True, False)  # an embedding, no lm_head
    load_shard(first, tmp_path)
    assert torch.equal(first.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_keys_renamed_by_transformers_conversions(saved, tmp_path, monkeypatch):
    class Legacy:  # stands in for a transformers WeightRenaming (LayerNorm.gamma -> LayerNorm.weight)
        def rename_source_key(self, key):
            return key.replace("legacy_norm", "norm"), None

    monkeypatch.setattr("hetero_llm.parallel.checkpoint._renamings", lambda model: [Legacy()])
    model, path = saved["llama_bias"]
    _rewrite(path, tmp_path, lambda k: k.replace("model.norm", "model.legacy_norm"))
    meta = cut(skeleton(model.config, "meta"), 0, False)
    load_shard(meta, tmp_path)
    assert_same(meta, cut(copy.deepcopy(model), 0, False))


def _stage(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """What parallel/pipeline.py::split_pipeline does to the modules, without wiring."""
    blocks = model.model.layers
    for i in range(len(blocks)):
        if i not in layers:
            blocks[i] = SkippedLayer(i, blocks[i])
    if not first:
        model.model.embed_tokens = EmbeddingStandIn(model.config.hidden_size, torch.float32)
    if not last:
        model.model.norm, model.lm_head = nn.Identity(), LogitsStandIn(model.config.vocab_size)
    return model


def test_pipeline_stages_read_only_their_layers(saved):
    model, path = saved["llama_tied"]
    full = sum(t.numel() * 4 for t in model.parameters())
    first = _stage(skeleton(model.config, "meta"), range(2), True, False)
    last = _stage(skeleton(model.config, "meta"), range(2, 4), False, True)
    read = load_shard(first, path) + load_shard(last, path)
    # each layer is read by one stage; the tied embedding by both (as the lm_head on the last)
    assert read == full + model.lm_head.weight.numel() * 4
    # the last stage has no embedding: its tied lm_head is read from the embedding's key
    assert torch.equal(last.lm_head.weight, model.lm_head.weight)
    assert torch.equal(last.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert not list(last.model.layers[0].parameters())


def test_missing_key(saved, tmp_path):
    model, path = saved["llama_bias"]
    _rewrite(path, tmp_path, lambda k: None if k == "model.layers.1.mlp.up_proj.weight" else k)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: not found"):
        load_shard(cut(skeleton(model.config, "meta"), 0, False), tmp_path)


@pytest.mark.parametrize("intermediate, rank", [(96, None), (256, 1), (128 + 64, None)])
def test_wrong_shape(saved, intermediate, rank):
    _, path = saved["llama_bias"]
    meta = skeleton(LlamaConfig(**{**_LLAMA, "intermediate_size": intermediate}, tie_word_embeddings=False,
                                attention_bias=True, mlp_bias=True), "meta")
    if rank is not None:  # rank 1's ranges (128, 256) lie outside the checkpoint's 128 channels
        cut(meta, rank, False)
    with pytest.raises(ModelLoadError, match=r"mlp\.\w+_proj\.\w+: checkpoint tensor .* has shape"):
        load_shard(meta, path)


def test_only_safetensors_is_read(saved, tmp_path):
    model, _ = saved["gpt2"]
    meta = skeleton(model.config, "meta")
    (tmp_path / "pickled").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled" / "pytorch_model.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.st"}}))
    for bad, why in [(tmp_path / "pickled" / "pytorch_model.bin", "not a .safetensors file"),
                     (tmp_path / "pickled", "no .safetensors"), (tmp_path / "nothing", "does not exist"),
                     (tmp_path / "bad.safetensors", "could not be read"), (tmp_path / "index", "not there")]:
        with pytest.raises(ModelLoadError, match=why):
            load_shard(meta, bad)


def test_a_buffer_nothing_can_fill_is_reported(saved):
    model, path = saved["gpt2"]
    meta = skeleton(model.config, "meta")

    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.zeros(3), persistent=False)

    meta.transformer.extra = Extra().to("meta")
    with pytest.raises(ModelLoadError, match=r"transformer\.extra\.table"):
        load_shard(meta, path)


# --- reduce_statistics ------------------------------------------------------------------


def _stats(w: torch.Tensor, per_tensor: bool) -> dict[str, torch.Tensor]:
    """What quantize_symmetric/asymmetric reduce: per-row (or whole-tensor) absmax, lo, hi."""
    dims = (0, 1) if per_tensor else (1,)
    keep = {"dim": dims, "keepdim": True}
    return {"absmax": w.abs().amax(**keep), "min": w.amin(**keep).clamp(max=0), "max": w.amax(**keep).clamp(min=0)}


def _fake_all_reduce(other: dict[str, torch.Tensor], asymmetric: bool, calls: list[str]):
    """A 2-rank all-reduce whose other rank holds the statistics `other`."""
    def fn(t: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        known = other["min" if op == "min" else ("max" if asymmetric else "absmax")]
        return (torch.maximum if op == "max" else torch.minimum)(t, known.reshape(t.shape), out=t)
    return fn


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_a_row_parallel_slice_gets_the_scales_of_the_whole_row(asymmetric, granularity):
    torch.manual_seed(1)
    w = torch.randn(6, 64)
    w[:, 40] = 9.0  # the row maxima sit in rank 1's half, so rank 0 alone would pick other scales
    w[:, 10] = -7.0
    full = quantize_weight(w, asymmetric=asymmetric, granularity=granularity)
    for r, cols in enumerate((slice(0, 32), slice(32, 64))):
        other = _stats(w[:, slice(32, 64) if r == 0 else slice(0, 32)], granularity == "tensor")
        calls: list[str] = []
        with reduce_statistics(_fake_all_reduce(other, asymmetric, calls)):
            part = quantize_weight(w[:, cols], asymmetric=asymmetric, granularity=granularity)
        assert sorted(calls) == (["max", "min"] if asymmetric else ["max"])
        assert torch.equal(part.scale, full.scale)
        assert torch.equal(part.qweight, full.qweight[:, cols])
        if asymmetric:
            assert torch.equal(part.zero_point, full.zero_point)
    alone = quantize_weight(w[:, :32], asymmetric=asymmetric, granularity=granularity)
    assert not torch.equal(alone.scale, full.scale)  # the reducer was needed


def test_per_group_statistics_are_never_reduced():
    w = torch.randn(4, 64)

    def refuse(t, op):
        raise AssertionError("per-group statistics must stay local")

    with reduce_statistics(refuse):
        for asym in (False, True):
            got = quantize_weight(w, asymmetric=asym, granularity="group", group_size=16)
            want_scale = quantize_weight(w, asymmetric=asym, granularity="group", group_size=16).scale
            assert torch.equal(got.scale, want_scale)
    assert torch.equal(quantize_weight(w).scale, quantize_weight(w).scale)  # the reducer is gone after the block


# Computed by quantize_weight before reduce_statistics existed: without a reducer, nothing changes.
_W = (torch.arange(24, dtype=torch.float32).reshape(3, 8) - 9) / 7
_W[2] *= 0.01
GOLDEN = {
    (False, "channel"): ([[-127, -113, -99, -85, -70, -56, -42, -28], [-21, 0, 21, 42, 63, 84, 105, 127],
                          [63, 72, 81, 90, 99, 108, 117, 126]], ["0x1.4cp-7", "0x1.bcp-8", "0x1.4cp-13"], None),
    (True, "channel"): ([[-128, -100, -71, -43, -15, 13, 41, 70], [-128, -92, -56, -19, 17, 53, 89, 126],
                         [-1, 17, 35, 54, 72, 90, 108, 126]], ["0x1.4cp-8", "0x1.02p-8", "0x1.4ap-14"],
                        [126, -92, -128]),
    (False, "group"): ([[-127, -113, -99, -85, -127, -101, -76, -51], [-63, 0, 63, 127, 63, 84, 105, 127],
                        [89, 102, 114, 127, 99, 108, 117, 126]],
                       ["0x1.4cp-7", "0x1.72p-8", "0x1.28p-9", "0x1.bcp-8", "0x1.d8p-14", "0x1.4cp-13"], None),
    (True, "tensor"): ([[-128, -111, -94, -77, -60, -43, -26, -9], [8, 25, 42, 59, 76, 93, 110, 127],
                        [26, 26, 27, 27, 27, 27, 27, 27]], ["0x1.14p-7"] * 3, [25, 25, 25]),
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_without_a_reducer_results_are_unchanged(key):
    asymmetric, granularity = key
    q, scales, zero = GOLDEN[key]
    got = quantize_weight(_W, asymmetric=asymmetric, granularity=granularity, group_size=4)
    assert got.qweight.tolist() == q
    assert got.scale.flatten().tolist() == [float.fromhex(s) for s in scales]
    assert (got.zero_point.tolist() if got.zero_point is not None else None) == zero
