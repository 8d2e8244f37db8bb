"""place_pass with a device map, on a machine without GPUs.

A boundary between two devices is exercised by pretending that "cuda:1" is the CPU: the
transport then copies tensors at each crossing and tags what each block produces with the device
it pretends to be on, so the boundary logic and the crossing counts are the ones a real split
has (tests/parallel/test_placement_gpu.py checks them on a GPU). Outputs must be *identical* to
the unsplit model's: the same CPU kernels compute the same values, only in a different place.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_shapes import TINY_SHAPES
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import hetero_llm
from hetero_llm import HardwareError, Plan, PlanMismatchError
from hetero_llm.parallel import placement
from hetero_llm.parallel.offload import StreamedWeights
from hetero_llm.parallel.placement import (
    attach_placement,
    place,
    place_pass,
    remove_placement,
)

VOCAB = 256
FAR = "cuda:1"  # a pretend second device
SIMULATED = {"cpu": torch.device("cpu"), FAR: torch.device("cpu")}


def tiny_llama(layers: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**TINY_SHAPES["llama"], "num_hidden_layers": layers, "vocab_size": VOCAB,
                         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.1,
                         **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def labels_for(model: nn.Module, far_layers=(), far_head: bool = False, far_rotary: bool = False,
               far_embed: bool = False) -> dict[str, str]:
    """Every top-level block on the CPU except the listed layers (and norm + lm_head...) on FAR."""
    n = model.config.num_hidden_layers
    return {"model.embed_tokens": FAR if far_embed else "cpu",
            **{f"model.layers.{i}": FAR if i in far_layers else "cpu" for i in range(n)},
            "model.norm": FAR if far_head else "cpu", "model.rotary_emb": FAR if far_rotary else "cpu",
            "lm_head": FAR if far_head else "cpu"}


def cpu_plan(device_map: dict[str, str] | None = None, offload: tuple[str, ...] = ()) -> Plan:
    """A plan with no per-module decisions: placement alone."""
    return Plan(model_type="llama", family="llama", device="cpu", hardware={}, options={}, entries=(),
                device_map=device_map or {}, offload=offload)


def prompt(length: int = 9, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch() -> dict[str, torch.Tensor]:
    ids = prompt(9, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    return dict(input_ids=ids, attention_mask=mask)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def greedy(model: nn.Module, new: int = 6, **inputs) -> torch.Tensor:
    inputs = inputs or dict(input_ids=prompt())
    return model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=0)


def split(model: nn.Module, far_layers=(2, 3), offload=(), **far) -> nn.Module:
    place(model, labels_for(model, far_layers, **far), tuple(offload), SIMULATED)
    return model


def boundary_tensors(model: nn.Module, layer: int) -> list[int]:
    """Spy: per call of `layer`, how many distinct tensors it receives (in args, kwargs, tuples)."""
    seen: list[int] = []

    def flat(obj):
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (tuple, list)):
            return [t for item in obj for t in flat(item)]
        if isinstance(obj, dict):
            return [t for item in obj.values() for t in flat(item)]
        return []

    def spy(module, args, kwargs):
        seen.append(len({id(t) for t in flat((args, kwargs))}))
    model.model.layers[layer].register_forward_pre_hook(spy, with_kwargs=True)
    return seen


# -- an empty device map: the whole model on plan.device, as before -----------------------------

def test_empty_device_map_keeps_the_model_whole_without_hooks():
    model = tiny_llama()
    place_pass(model, cpu_plan())
    assert not hasattr(model, "hetero_placement") and not hasattr(model, "hf_device_map")
    assert not model._forward_pre_hooks and not model.model.layers[0]._forward_pre_hooks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_empty_device_map_on_cuda_without_a_gpu_is_refused():
    with pytest.raises(HardwareError, match="re-plan here"):
        place_pass(tiny_llama(), dataclasses.replace(cpu_plan(), device="cuda"))


# -- refusals ------------------------------------------------------------------------------

def test_a_device_this_machine_lacks_is_refused_by_name():
    model = tiny_llama()
    missing = f"cuda:{torch.cuda.device_count()}"
    dm = {**labels_for(model), "model.layers.3": missing}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HardwareError, match=rf"model\.layers\.3 on {missing}.*hetero_llm\.plan\(model\).*max_memory"):
        place_pass(model, cpu_plan(dm))
    assert not hasattr(model, "hetero_placement")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_device_map_naming_absent_blocks_is_refused():
    model = tiny_llama()
    with pytest.raises(PlanMismatchError, match="model.layers.9"):
        place_pass(model, cpu_plan({**labels_for(model), "model.layers.9": "cpu"}))


def test_offloading_a_block_the_map_does_not_place_is_refused():
    model = tiny_llama()
    with pytest.raises(PlanMismatchError, match="does not place"):
        place_pass(model, cpu_plan({"model.embed_tokens": "cpu"}, offload=("lm_head",)))


def test_tied_weights_placed_apart_are_refused():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(PlanMismatchError, match="tied"):
        place(model, labels_for(model, far_head=True), (), SIMULATED)


# -- same outputs as the unsplit model -------------------------------------------------------

SPLITS = {"tail": dict(far_layers=(2, 3)), "middle": dict(far_layers=(1,)),
          "all layers": dict(far_layers=(0, 1, 2, 3)), "tail and head": dict(far_layers=(2, 3), far_head=True),
          # the planner's layout: embedding and the first layers on the CPU, the rest on the GPU
          "planner": dict(far_layers=(2, 3), far_head=True, far_rotary=True),
          "all but the embedding": dict(far_layers=(0, 1, 2, 3), far_head=True, far_rotary=True)}


@pytest.mark.parametrize("where", SPLITS)
def test_split_logits_are_identical(where):
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), **SPLITS[where])
    ids = prompt()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    assert model.hetero_transfers.total > 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_split_greedy_generate_is_identical(cache, padded):
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(2, 3), far_head=padded)
    inputs = padded_batch() if padded else dict(input_ids=prompt())
    kw = {} if cache == "dynamic" else dict(cache_implementation="static")
    assert torch.equal(greedy(model, **inputs, **kw), greedy(ref, **inputs, **kw))


# -- crossings: once per boundary per distinct tensor, whatever the layers behind it -------------

@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_crossings_per_step_do_not_depend_on_the_layers_behind_a_boundary(cache, padded):
    inputs = padded_batch() if padded else dict(input_ids=prompt())
    kw = {} if cache == "dynamic" else dict(cache_implementation="static")
    totals = {}
    for far in [(3,), (1, 2, 3)]:  # one layer, then three, on the far side
        model = tiny_llama()
        into_far = boundary_tensors(model, far[0])
        split(model, far_layers=far)
        greedy(model, new=5, **inputs, **kw)
        steps = len(into_far)
        assert steps == 5
        # Each step: every distinct tensor the first far layer gets (hidden states, cos, sin,
        # position ids, the mask when there is one) crosses once; the hidden states come back once.
        assert model.hetero_transfers.count == {("cpu", FAR): sum(into_far), (FAR, "cpu"): steps}
        totals[far] = dict(model.hetero_transfers.count)
    assert totals[(3,)] == totals[(1, 2, 3)]


def test_decode_step_bytes_stay_constant_as_the_kv_cache_grows():
    """The cache lives beside its layer: what crosses per decode step is one token's activations."""
    model = split(tiny_llama(), far_layers=(2, 3))
    per_step = []
    model.register_forward_hook(lambda *_: per_step.append(dict(model.hetero_transfers.bytes)))
    greedy(model, new=6)
    deltas = [{k: after[k] - before.get(k, 0) for k in after} for before, after in zip(per_step, per_step[1:])]
    hidden = model.config.hidden_size * 4  # one fp32 token
    assert all(d == deltas[0] for d in deltas) and deltas[0][(FAR, "cpu")] == hidden


def test_shared_tensors_are_copied_once_per_step_not_per_layer():
    model = split(tiny_llama(layers=6), far_layers=(1, 2, 3, 4, 5))
    into_far = boundary_tensors(model, 1)
    logits(model, prompt())
    assert model.hetero_transfers.count == {("cpu", FAR): into_far[0], (FAR, "cpu"): 1}
    model.hetero_transfers.reset()
    assert model.hetero_transfers.total == 0 and not model.hetero_transfers.bytes


def test_logits_come_back_to_the_main_device_only_when_the_head_is_elsewhere():
    model = split(tiny_llama(), far_layers=(3,), far_head=True)
    out = model(prompt()).logits
    transport = model.hetero_placement.transport
    assert transport.label_of(out) == "cpu"
    # hidden states and the shared tensors go out once; logits come back: nothing returns for the norm
    assert model.hetero_transfers.count[(FAR, "cpu")] == 1
    assert model.hetero_transfers.bytes[(FAR, "cpu")] == out.numel() * 4


def test_a_weightless_block_runs_on_the_main_device():
    """rotary_emb computes where its input is: placed on FAR it would only add crossings."""
    counts = {}
    for far_rotary in (False, True):
        model = split(tiny_llama(), far_layers=(2, 3), far_head=True, far_rotary=far_rotary)
        assert model.hetero_placement.labels["model.rotary_emb"] == "cpu"
        logits(model, prompt())
        counts[far_rotary] = dict(model.hetero_transfers.count)
    assert counts[False] == counts[True]


def test_logits_come_back_to_the_inputs_device_when_the_first_block_is_elsewhere():
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(0, 1, 2, 3), far_head=True, far_embed=True)
    assert model.hetero_placement.main == FAR
    ids = prompt()  # on "cpu": not where the model's first block is
    out = model(ids).logits
    assert model.hetero_placement.transport.label_of(out) == "cpu"
    assert torch.equal(out, logits(ref, ids))
    assert torch.equal(greedy(model), greedy(ref))


# -- offload: accelerate's hook streams the weights -------------------------------------------

def holds_its_cpu_weights(block: nn.Module) -> bool:
    """Between forwards an offloaded block's tensors are its weights_map's CPU tensors themselves."""
    hook = block._hf_hook
    tensors = dict(list(block.named_parameters()) + list(block.named_buffers()))
    return isinstance(hook, StreamedWeights) and set(hook.weights_map) == set(tensors) and all(
        t.device.type == "cpu" and t.data_ptr() == hook.weights_map[n].data_ptr() for n, t in tensors.items())


@pytest.fixture
def streams(monkeypatch) -> list[str]:
    """Records each StreamedWeights load (pre_forward) and drop (post_forward)."""
    calls: list[str] = []
    pre, post = StreamedWeights.pre_forward, StreamedWeights.post_forward

    def load(self, module, *args, **kwargs):
        calls.append("load")
        return pre(self, module, *args, **kwargs)

    def drop(self, module, output):
        calls.append("drop")
        return post(self, module, output)
    monkeypatch.setattr(StreamedWeights, "pre_forward", load)
    monkeypatch.setattr(StreamedWeights, "post_forward", drop)
    return calls


def test_offloaded_blocks_stream_their_weights_and_give_identical_outputs(streams):
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(2, 3), offload=("model.layers.1", "model.layers.3"))
    ids = prompt()
    assert torch.equal(logits(model, ids), logits(ref, ids))
    assert streams == ["load", "drop"] * 2  # each offloaded block, once per forward
    assert torch.equal(greedy(model), greedy(ref))
    assert all(holds_its_cpu_weights(model.get_submodule(n)) for n in ("model.layers.1", "model.layers.3"))
    assert not hasattr(model.model.layers[2], "_hf_hook")
    saved = model.state_dict()  # real data, for save()
    assert all(torch.equal(t, ref.state_dict()[k]) for k, t in saved.items())


def test_the_first_block_can_be_offloaded(streams):
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(0, 1, 2, 3), far_head=True, far_embed=True,
                  offload=("model.embed_tokens",))
    ids = prompt()
    assert model.device.type == "cpu"  # generate() puts its inputs there: no meta weights
    assert torch.equal(logits(model, ids), logits(ref, ids)) and streams == ["load", "drop"]
    assert torch.equal(greedy(model), greedy(ref))


def test_offload_of_quantized_fused_blocks_through_accelerate():
    """The public path: quantize, place, then the kernels pass fuses the blocks' projections;
    the hooks attach at the first forward, to the fused modules."""
    ref = tiny_llama()
    plan = hetero_llm.plan(ref, hardware="cpu-2core", quantize="int8")
    whole = hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)
    dm = {**labels_for(ref), "model.layers.2": "cpu", "model.layers.3": "cpu"}
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=dataclasses.replace(
        plan, device_map=dm, offload=("model.layers.2", "model.norm")))
    ids = prompt()
    assert torch.equal(logits(model, ids), logits(whole, ids))
    assert torch.equal(greedy(model), greedy(whole))
    hooked = model.model.layers[2]._hf_hook
    assert any(name.startswith("self_attn.qkv.") for name in hooked.weights_map)  # the fused projection


def test_split_through_accelerate_with_a_pretend_gpu(monkeypatch):
    monkeypatch.setattr(placement, "available_devices", lambda: ["cpu", FAR])
    monkeypatch.setattr(placement, "physical_device", lambda label: torch.device("cpu"))
    ref = tiny_llama()
    plan = hetero_llm.plan(ref, hardware="cpu-2core", quantize="none")
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=dataclasses.replace(
        plan, device_map=labels_for(ref, far_layers=(2, 3)), offload=("model.layers.3",)))
    assert model.hetero_placement.transport.simulated
    assert torch.equal(greedy(model), greedy(hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)))
    assert model.hetero_transfers.count[(FAR, "cpu")] == 6  # one step per token


def test_save_and_load_an_offloaded_model(tmp_path):
    ref = tiny_llama()
    plan = cpu_plan(labels_for(ref), offload=("model.layers.1",))
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=plan)
    ids = prompt()
    want = logits(model, ids)  # after the first forward: weights streamed
    hetero_llm.save(model, tmp_path / "m")
    loaded = hetero_llm.load(tmp_path / "m")
    assert loaded.hetero_plan.offload == ("model.layers.1",)
    assert torch.equal(logits(loaded, ids), want)
    assert holds_its_cpu_weights(loaded.model.layers[1])


# -- removable, copyable ---------------------------------------------------------------------

def test_remove_placement_takes_every_hook_off():
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(2, 3), far_head=True, offload=("model.layers.2",))
    ids = prompt()
    logits(model, ids)
    remove_placement(model)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._state_dict_hooks
        assert not hasattr(m, "_hf_hook") and "forward" not in m.__dict__
    assert not any(hasattr(model, a) for a in ("hetero_placement", "hetero_transfers", "hf_device_map"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model, ids), logits(ref, ids))


def test_hooks_attach_at_the_first_forward_or_on_request():
    model = split(tiny_llama(), far_layers=(2, 3))
    assert not model.hetero_placement.attached and not model.model.layers[2]._forward_pre_hooks
    attach_placement(model)
    attach_placement(model)  # idempotent
    assert model.hetero_placement.attached and len(model.model.layers[2]._forward_pre_hooks) == 1


@pytest.mark.parametrize("before_first_forward", [True, False])
def test_deepcopy_of_a_placed_model_works_and_is_independent(before_first_forward):
    ref = tiny_llama()
    model = split(copy.deepcopy(ref), far_layers=(2, 3), offload=("model.layers.3",))
    ids = prompt()
    if not before_first_forward:
        logits(model, ids)
    clone = copy.deepcopy(model)
    assert clone.hetero_transfers is clone.hetero_placement.transport.counter
    assert clone.hetero_transfers is not model.hetero_transfers
    clone.hetero_transfers.reset()
    assert torch.equal(logits(clone, ids), logits(ref, ids))
    assert clone.hetero_transfers.count[(FAR, "cpu")] == 1
    remove_placement(clone)
    assert torch.equal(logits(model, ids), logits(ref, ids))  # the original keeps its hooks
    assert hasattr(model, "hetero_placement")


def test_the_planners_split_runs_with_a_pretend_gpu(monkeypatch):
    """The planner's own device map for an H100 with a budget below the model (embedding and the
    first layers on the CPU, the rest on "cuda:0"), through accelerate(), "cuda:0" being the CPU.
    Its GPU blocks carry GPU kernel choices (Triton), which fall back to torch on CPU tensors."""
    monkeypatch.setattr(placement, "available_devices", lambda: ["cpu", "cuda:0"])
    monkeypatch.setattr(placement, "physical_device", lambda label: torch.device("cpu"))
    ref = tiny_llama(layers=6)
    plan = hetero_llm.plan(ref, hardware="h100-80gb", max_memory={"cuda": 600_000, "cpu": "1GiB"},
                           quantize="none", prompt_len=16)
    assert set(plan.device_map.values()) == {"cpu", "cuda:0"} and plan.device_map["model.embed_tokens"] == "cpu"
    model = hetero_llm.accelerate(copy.deepcopy(ref), plan=dataclasses.replace(plan, device="cpu"))
    ids = prompt()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=1e-4, rtol=1e-4)
    model.hetero_transfers.reset()
    assert torch.equal(greedy(model), greedy(ref))
    # per step: hidden states, cos, sin and position ids over (no mask without padding); logits back
    assert model.hetero_transfers.count == {("cpu", "cuda:0"): 4 * 6, ("cuda:0", "cpu"): 6}
