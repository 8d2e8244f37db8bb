"""Tiny config shapes for every supported family, shared by the test files."""

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
TINY_SHAPES = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, head_dim=16),
    "phi3": dict(_LLAMA_LIKE),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=64),
}
