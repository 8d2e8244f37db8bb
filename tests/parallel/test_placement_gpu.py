"""A model split between a GPU and the CPU, and a block offloaded to the GPU (GPU only).

fp32 throughout for the comparisons: the CPU half computes with CPU kernels, so bf16 results may
differ from the all-GPU model's by more than rounding; fp32 logits agree to 1e-4 and greedy
tokens exactly. One bf16 test checks that the split runs and keeps its dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_placement import boundary_tensors, greedy, padded_batch, prompt, tiny_llama

from hetero_llm.parallel.placement import place, remove_placement

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = "cuda:0"
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 logits, CPU half vs GPU


def gpu_cpu_labels(model, cpu_layers) -> dict[str, str]:
    """Embedding, norm, rotary and lm_head on the GPU; the listed layers on the CPU."""
    n = model.config.num_hidden_layers
    return {"model.embed_tokens": GPU, **{f"model.layers.{i}": "cpu" if i in cpu_layers else GPU for i in range(n)},
            "model.norm": GPU, "model.rotary_emb": GPU, "lm_head": GPU}


def on_gpu(inputs: dict) -> dict:
    return {k: v.to(GPU) for k, v in inputs.items()}


@needs_cuda
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_gpu_cpu_split_matches_the_all_gpu_model(cache, padded):
    ref = tiny_llama(layers=6).to(GPU)
    model = copy.deepcopy(ref).cpu()
    place(model, gpu_cpu_labels(model, cpu_layers=(3, 4, 5)))
    assert model.model.layers[4].mlp.up_proj.weight.device.type == "cpu"
    inputs = on_gpu(padded_batch() if padded else dict(input_ids=prompt()))
    with torch.no_grad():
        got, want = model(**inputs).logits, ref(**inputs).logits
    assert got.device == want.device
    torch.testing.assert_close(got, want, **TOL)
    kw = {} if cache == "dynamic" else dict(cache_implementation="static")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, greedy(ref, new=8, **inputs, **kw))
    for i, layer in enumerate(out.past_key_values.layers):  # each layer's cache beside its layer
        assert layer.keys.device.type == ("cpu" if i >= 3 else "cuda")


@needs_cuda
def test_crossings_per_step_do_not_depend_on_the_cpu_layers():
    counts = {}
    for cpu_layers in [(5,), (2, 3, 4, 5)]:
        model = tiny_llama(layers=6)
        into_cpu = boundary_tensors(model, cpu_layers[0])
        place(model, gpu_cpu_labels(model, cpu_layers))
        greedy(model, new=5, input_ids=prompt().to(GPU))
        assert model.hetero_transfers.count == {(GPU, "cpu"): sum(into_cpu), ("cpu", GPU): len(into_cpu)}
        counts[cpu_layers] = dict(model.hetero_transfers.count)
    assert counts[(5,)] == counts[(2, 3, 4, 5)]


@needs_cuda
def test_bf16_split_generates_on_the_gpu():
    model = tiny_llama(layers=4).to(torch.bfloat16)
    place(model, gpu_cpu_labels(model, cpu_layers=(2, 3)))
    ids = prompt().to(GPU)
    out = greedy(model, new=8, input_ids=ids)
    assert out.device == ids.device and out.shape == (1, ids.shape[1] + 8)
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


@needs_cuda
def test_offloaded_block_streams_to_the_gpu_and_matches():
    ref = tiny_llama(layers=4).to(GPU)
    model = copy.deepcopy(ref).cpu()
    place(model, gpu_cpu_labels(model, cpu_layers=()), offload=("model.layers.1", "model.layers.2"))
    ids = prompt().to(GPU)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(model, new=8, input_ids=ids), greedy(ref, new=8, input_ids=ids))
    block = model.model.layers[1]
    assert all(p.is_meta for p in block.parameters())  # nothing resident between forwards
    assert all(w.is_pinned() for w in block._hf_hook.weights_map.values())
    assert model.hetero_transfers.total == 0  # every block executes on the GPU: nothing crosses
    remove_placement(model)
    assert {p.device.type for p in block.parameters()} == {"cpu"}
