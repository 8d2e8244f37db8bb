"""Tiny random-weight models of every supported family, and prompts for them, shared by the tests."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_shapes import TINY_SHAPES

NEW_TOKENS = 8
VOCAB = 256
BASE = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            # Larger than the default 0.02 so logits are far from flat and comparisons bite.
            initializer_range=0.1)
# OPT takes its init scale from init_std, not initializer_range.
CONFIGS = {**TINY_SHAPES, "opt": dict(TINY_SHAPES["opt"], init_std=0.1)}
FAMILIES = tuple(CONFIGS)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    cfg = AutoConfig.for_model(model_type, **{**BASE, **CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)  # no pad/bos/eos inside


def left_padded_batch(long: torch.Tensor, short: torch.Tensor, pad_id: int = 0):
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.full((1, pad), pad_id), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


SCENARIO_TOKENS = 10  # with a 7-token prompt: past a sliding window of 8 (see the windowed test)

# Every cache generate() uses: a dynamic cache, a static cache, and a left-padded batch.
SCENARIOS = ("dynamic", "static", "left-padded")


def generate_scenario(model, scenario: str) -> torch.Tensor:
    kw = dict(max_new_tokens=SCENARIO_TOKENS, min_new_tokens=SCENARIO_TOKENS, do_sample=False, pad_token_id=0)
    if scenario == "left-padded":
        ids, mask = left_padded_batch(prompt(7, seed=1), prompt(4, seed=2))
        return model.generate(ids, attention_mask=mask, **kw)
    ids = prompt(7, seed=1)
    if scenario == "static":
        kw["cache_implementation"] = "static"
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def assert_same_tokens(original, accelerated):
    for scenario in SCENARIOS:
        want, got = generate_scenario(original, scenario), generate_scenario(accelerated, scenario)
        assert torch.equal(got, want), f"{scenario}: {got.tolist()} != {want.tolist()}"
