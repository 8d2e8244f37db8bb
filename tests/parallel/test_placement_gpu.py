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

import hetero_llm
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
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         **kw)
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
    resident = torch.cuda.memory_allocated()
    # nothing on the GPU between forwards: the module holds its pinned CPU weights
    assert all(p.device.type == "cpu" and p.is_pinned() for p in block.parameters())
    assert all(w.is_pinned() for w in block._hf_hook.weights_map.values())
    with torch.no_grad():
        model(ids)
    assert torch.cuda.memory_allocated() == resident  # the streamed copies were dropped
    assert model.hetero_transfers.total == 0  # every block executes on the GPU: nothing crosses
    remove_placement(model)
    assert {p.device.type for p in block.parameters()} == {"cpu"}


@needs_cuda
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_planners_split_through_accelerate_matches_the_all_gpu_model(cache):
    """max_memory too small for the model: the planner puts the embedding and the first layers
    on the CPU, the rest on the GPU. Input ids on either device; logits come back to them."""
    ref = tiny_llama(layers=6).to(GPU)
    model = hetero_llm.accelerate(copy.deepcopy(ref).cpu(), max_memory={"cuda": 600_000, "cpu": "4GiB"},
                                  quantize="none", kernels="torch", prompt_len=16)
    device_map = model.hetero_plan.device_map
    assert set(device_map.values()) == {"cpu", GPU} and device_map["model.embed_tokens"] == "cpu"
    first_gpu = min(int(n.rsplit(".", 1)[1]) for n, d in device_map.items()
                    if n.startswith("model.layers.") and d == GPU)
    into_gpu = boundary_tensors(model, first_gpu)
    kw = {} if cache == "dynamic" else dict(cache_implementation="static")
    for ids in (prompt(), prompt().to(GPU)):
        with torch.no_grad():
            got = model(ids).logits
        assert got.device == ids.device
        torch.testing.assert_close(got.to(GPU), ref(ids.to(GPU)).logits, **TOL)
        model.hetero_transfers.reset()
        into_gpu.clear()
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             **kw)
        assert torch.equal(out.sequences.to(GPU), greedy(ref, new=8, input_ids=ids.to(GPU), **kw))
        if ids.device.type == "cpu":  # hidden states, cos, sin, position ids (mask) over; logits back
            assert model.hetero_transfers.count == {("cpu", GPU): sum(into_gpu), (GPU, "cpu"): len(into_gpu)}
        for i, layer in enumerate(out.past_key_values.layers):
            assert layer.keys.device.type == ("cuda" if i >= first_gpu else "cpu")
