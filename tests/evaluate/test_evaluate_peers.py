"""The torch quantize_dynamic peer."""
from __future__ import annotations

import warnings

import torch

from hetero_llm.evaluate import PEERS, torch_dynamic_int8


def test_peer_is_a_quiet_quantized_copy(tiny_model):
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.inference_mode():
        before = tiny_model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the peer fails the test
        peer = torch_dynamic_int8(tiny_model)
    assert peer is not tiny_model and not peer.training
    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # original intact
    assert hasattr(peer.model.layers[0].mlp.up_proj, "_packed_params")  # dynamic int8 Linear
    with torch.inference_mode():
        after = peer(ids).logits
    cos = torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0)
    assert cos > 0.95


def test_registry():
    assert PEERS == {"torch-dynamic-int8": torch_dynamic_int8}
