"""The self-check's tiny model keeps what chooses a model's modules and shrinks what does not."""
from __future__ import annotations

from transformers import AutoConfig

from hetero_llm.integrations.tiny import TINY_WINDOW, tiny_config, tiny_model


def test_sizes_shrink_and_settings_stay():
    cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                               rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=None,
                               rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                "rope_theta": 500000.0})
    tiny = tiny_config(cfg)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads) == (64, 2, 4)
    assert tiny.num_key_value_heads == 2  # still grouped
    assert tiny.vocab_size == 512 and tiny.bos_token_id == 1 and tiny.eos_token_id == [2]
    assert (tiny.rms_norm_eps, tiny.attention_bias, tiny.tie_word_embeddings) == (1e-5, True, True)
    assert tiny.rope_parameters["rope_type"] == "llama3" and tiny.use_cache
    assert cfg.hidden_size == 2048  # the original is untouched


def test_layer_kinds_and_windows_are_kept_at_two_layers():
    cfg = AutoConfig.for_model("qwen2", num_hidden_layers=6, use_sliding_window=True, sliding_window=4096,
                               max_window_layers=2)
    tiny = tiny_config(cfg)
    assert tiny.num_hidden_layers == 2 and tiny.sliding_window == TINY_WINDOW
    assert set(tiny.layer_types) == set(cfg.layer_types)


def test_tiny_model_is_small_fp32_and_deterministic():
    cfg = AutoConfig.for_model("gemma", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=256000)
    from transformers import GemmaForCausalLM
    a, b = tiny_model(GemmaForCausalLM, cfg), tiny_model(GemmaForCausalLM, cfg)
    assert sum(p.numel() for p in a.parameters()) < 200_000
    assert all(p.dtype.is_floating_point and str(p.dtype) == "torch.float32" for p in a.parameters())
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    assert not a.training
