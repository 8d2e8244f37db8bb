"""hetero_llm.decode on a GPU: the decode step captured as a CUDA graph and replayed.

Skipped without a CUDA GPU. The step's math, the sessions and the fallbacks are tested on the
CPU in test_decode.py; these check what only a GPU has: capture, replay, a failed capture,
captures from several threads.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.decode.step import DecodeStep
from hetero_llm.errors import HeteroLLMWarning
from concurrency import run_together
from tiny_shapes import TINY_SHAPES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
NEW = 16
GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


def models(dtype=torch.float32, quantize="none", modes=("transformers", "static", "cuda_graph")):
    """The same tiny Llama on the GPU, accelerated once per decode mode."""
    cfg = AutoConfig.for_model("llama", **{**BASE, **TINY_SHAPES["llama"], "hidden_size": 128,
                                           "intermediate_size": 256})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    out = {}
    for mode in modes:
        m = copy.deepcopy(base).cuda()
        out[mode] = hetero_llm.accelerate(m, quantize=quantize, device="cuda", decode=mode)
    return out


def prompt(b=2, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (b, s), generator=g).cuda()


@pytest.mark.parametrize("dtype,quantize,tol", [(torch.float32, "none", 1e-4), (torch.bfloat16, "none", 3e-2),
                                                (torch.float16, "int8", 3e-2)])
def test_replayed_graph_gives_the_eager_steps_logits(dtype, quantize, tol):
    ms = models(dtype, quantize)
    x = prompt()
    out = {mode: m.generate(x, **GREEDY) for mode, m in ms.items()}
    graph, static = out["cuda_graph"], out["static"]
    assert torch.equal(graph.sequences, static.sequences)
    for a, b in zip(graph.logits, static.logits):  # same kernels, same arguments: same numbers
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(graph.logits, out["transformers"].logits):  # another attention path: close
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    r = ms["cuda_graph"].hetero_decode.report()
    # first decode step: eager + capture; every later one a replay
    assert r["graphs"] == 1 and r["graph_steps"] == NEW - 2 and r["eager_steps"] == 0
    assert 0 < r["warmup_s"][0] < 60


def test_the_next_call_of_that_shape_replays_without_capturing():
    m = models(modes=("cuda_graph",))["cuda_graph"]
    first = m.generate(prompt(), **GREEDY)
    again = m.generate(prompt(), **GREEDY)
    assert torch.equal(first.sequences, again.sequences)
    other = m.generate(prompt(seed=1), **GREEDY)
    r = m.hetero_decode.report()
    assert r["graphs"] == 1 and r["sessions_created"] == 1 and r["graph_steps"] == 3 * NEW - 4
    assert not torch.equal(other.sequences, first.sequences)


def test_a_failed_capture_warns_and_decodes_eagerly(monkeypatch):
    ms = models(modes=("static", "cuda_graph"))
    original = DecodeStep.__call__

    def syncs(self):  # reading a value on the host is what a capture cannot record
        logits = original(self)
        float(logits.sum())
        return logits

    monkeypatch.setattr(DecodeStep, "__call__", syncs)
    x = prompt()
    with pytest.warns(HeteroLLMWarning, match="could not capture"):
        got = ms["cuda_graph"].generate(x, **GREEDY)
    want = ms["static"].generate(x, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    r = ms["cuda_graph"].hetero_decode.report()
    assert r["graphs"] == 0 and r["eager_steps"] == NEW - 1
    torch.cuda.synchronize()  # the device is still usable


def test_threads_capture_and_replay_their_own_graphs():
    ms = models(modes=("static", "cuda_graph"))
    prompts = [prompt(b=1 + i % 2, seed=i) for i in range(4)]
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    want = [ms["static"].generate(p, **kw) for p in prompts]
    got = run_together([lambda p=p: ms["cuda_graph"].generate(p, **kw) for p in prompts])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert 1 <= ms["cuda_graph"].hetero_decode.report()["graphs"] <= len(prompts)
