"""The transformers conventions read by integrations.hf_adapter, on the installed release."""
from __future__ import annotations

import warnings

import pytest
import torch

from hetero_llm.integrations import hf_adapter as hf
from tiny_models import prompt, tiny_model


def test_version_range():
    assert hf.version_tuple("5.25.0.dev0") == (5, 25)
    assert hf.in_tested_range("5.17.0") and hf.in_tested_range(hf.NEWEST_TESTED)
    assert not hf.in_tested_range("5.16.1") and not hf.in_tested_range("6.0.0")
    nxt = hf.version_tuple(hf.NEWEST_TESTED)
    assert not hf.in_tested_range(f"{nxt[0]}.{nxt[1] + 1}.0")


def test_cache_argument_is_the_one_the_installed_release_takes():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    name = hf.cache_argument(model)
    assert name in hf.CACHE_ARGUMENTS and hf.cache_argument(layer) == name
    expected = "cache" if hf.version_tuple(hf.transformers_version()) >= (5, 25) else "past_key_values"
    assert name == expected


def test_take_cache_accepts_either_name_and_removes_both():
    for key in hf.CACHE_ARGUMENTS:
        kwargs = {key: "c", "other": 1}
        assert hf.take_cache(kwargs) == "c" and kwargs == {"other": 1}
    kwargs = {"past_key_values": None, "cache": None}
    assert hf.take_cache(kwargs, "given") == "given" and kwargs == {}


def test_outputs_and_caches_round_trip_without_deprecation_warnings():
    model = tiny_model("llama")
    ids = prompt(5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated spelling would warn on >= 5.25
        out = model(input_ids=ids, use_cache=True, **{hf.cache_argument(model): hf.cache_from_pairs(None)})
        cache = hf.output_cache(out)
        pairs = hf.cache_pairs(cache)
        assert len(pairs) == 2 and pairs[0][0].shape[2] == 5
        again = hf.cache_from_pairs(pairs)
        step = model(input_ids=ids[:, :1], use_cache=True, **{hf.cache_argument(model): again})
        assert hf.output_cache(step).get_seq_length() == 6
        built = hf.causal_lm_output(out.logits, cache)
        assert hf.output_cache(built) is cache and built.logits is out.logits


def test_static_cache_length_is_a_tensor_on_the_cache_device():
    model = tiny_model("llama")
    cache = hf.new_static_cache(hf.static_cache_class(), model.config, 16)
    assert not hf.layer_is_initialized(cache.layers[0])
    model(input_ids=prompt(3, seed=0), use_cache=True, **{hf.cache_argument(model): cache})
    assert hf.layer_is_initialized(cache.layers[0])
    length = hf.static_layer_length(cache.layers[0])
    assert isinstance(length, torch.Tensor) and int(length) == 3
    assert {type(x) for x in cache.layers} == {hf.static_layer_class()}


def test_attention_registration_and_selection():
    from hetero_llm.fused import attention_interface

    model = tiny_model("llama")
    assert hf.can_set_attention(model)
    attention_interface.register()
    hf.set_attention_implementation(model, attention_interface.NAME)
    assert hf.attention_implementation(model) == attention_interface.NAME
    assert callable(hf.sdpa_attention_function())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_checkpoint_renamings_are_readable(family):
    assert isinstance(hf.checkpoint_renamings(tiny_model(family)), list)


def test_rope_type_and_text_config():
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert hf.rope_type(hf.text_config(model.config)) == "linear"
    assert hf.rope_type(tiny_model("llama").config) == "default"


def test_an_untested_transformers_warns_with_the_range(monkeypatch):
    from hetero_llm.errors import HeteroLLMWarning

    monkeypatch.setattr(hf, "installed_transformers", lambda: "9.1.0")
    with pytest.warns(HeteroLLMWarning, match=r"5\.17\.0 to .*this is 9\.1\.0.*SelfCheckError"):
        hf.warn_if_untested()
    monkeypatch.setattr(hf, "installed_transformers", lambda: hf.NEWEST_TESTED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.warn_if_untested()


def test_pyproject_declares_the_tested_range():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    tested = project["tool"]["hetero_llm"]["tested-transformers"]
    assert "transformers" + tested == hf.tested_requirement()
    deps = [d for d in project["project"]["dependencies"] if d.startswith("transformers")]
    assert deps == [f"transformers>={hf.OLDEST_SUPPORTED},<6"]
