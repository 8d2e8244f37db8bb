"""The Transport: each live tensor copied once per destination, structures kept, nothing kept alive."""
from __future__ import annotations

import copy
import gc
from collections import namedtuple

import torch

from hetero_llm.parallel.transfer import Transport

FAR = "cuda:1"


def transport() -> Transport:
    return Transport({"cpu": torch.device("cpu"), FAR: torch.device("cpu")})  # simulated: FAR is the CPU


def test_a_live_tensor_is_copied_once_per_destination():
    t, x = transport(), torch.randn(4, 8)
    first = t.fetch(x, FAR)
    assert first is not x and torch.equal(first, x) and t.fetch(x, FAR) is first
    assert t.counter.count == {("cpu", FAR): 1} and t.counter.bytes == {("cpu", FAR): 4 * 8 * 4}
    assert t.label_of(first) == FAR and t.label_of(x) == "cpu"
    assert t.bring(first, FAR) is first  # already there: no copy, no count
    assert t.counter.total == 1


def test_a_new_tensor_with_the_same_values_is_a_new_copy():
    t = transport()
    t.fetch(torch.ones(3), FAR)
    t.fetch(torch.ones(3), FAR)
    assert t.counter.total == 2


def test_an_entry_goes_away_with_its_source():
    t, x = transport(), torch.randn(5)
    moved = t.fetch(x, FAR)
    assert len(t._copies[FAR]) == 1
    del x
    gc.collect()
    assert not t._copies[FAR]
    assert t.label_of(moved) == FAR  # the copy itself lives on while someone holds it


def test_a_tensor_changed_in_place_is_copied_again():
    t, x = transport(), torch.zeros(3)
    t.fetch(x, FAR)
    x.add_(1)
    assert torch.equal(t.fetch(x, FAR), torch.ones(3)) and t.counter.total == 2


def test_bring_walks_nested_structures_and_keeps_their_types():
    Pair = namedtuple("Pair", "cos sin")
    t = transport()
    cos, sin, mask = torch.randn(2, 4), torch.randn(2, 4), torch.ones(1, 1, 2, 2, dtype=torch.bool)
    cache = object()  # a KV cache: not a tensor, never moved
    args = (torch.randn(1, 2, 4),)
    kwargs = dict(position_embeddings=(cos, sin), pair=Pair(cos, sin), attention_mask=mask, past_key_values=cache,
                  use_cache=True, extra=[mask])
    new_args, new_kwargs = t.bring(args, FAR), t.bring(kwargs, FAR)
    assert isinstance(new_kwargs["pair"], Pair) and isinstance(new_kwargs["extra"], list)
    assert new_kwargs["past_key_values"] is cache and new_kwargs["use_cache"] is True
    assert new_kwargs["pair"].cos is new_kwargs["position_embeddings"][0]  # one copy of cos
    assert new_kwargs["extra"][0] is new_kwargs["attention_mask"]
    assert t.counter.total == 4  # hidden, cos, sin, mask
    assert t.bring(new_args, FAR) is new_args and t.bring(new_kwargs, FAR) is new_kwargs


def test_a_view_of_a_tagged_tensor_is_where_its_base_is():
    t = transport()
    moved = t.fetch(torch.randn(2, 6, 4), FAR)
    assert t.label_of(moved[:, -1:, :]) == FAR


def test_a_deep_copy_starts_with_no_copies_and_its_own_counter():
    t, x = transport(), torch.randn(3)
    t.fetch(x, FAR)
    clone = copy.deepcopy(t)
    assert clone.counter is not t.counter and clone.counter.count == t.counter.count
    assert not clone._copies[FAR] and clone.simulated
    clone.fetch(x, FAR)
    assert clone.counter.total == 2 and t.counter.total == 1


def test_real_devices_are_not_simulated():
    t = Transport({"cpu": torch.device("cpu")})
    x = torch.randn(2)
    assert not t.simulated and t.label_of(x) == "cpu" and t.bring(x, "cpu") is x
