"""export_onnx and OnnxCausalLM: tiny random models exported, run by ONNX Runtime, compared.

Tolerances (TOL, relative to the largest |logit| of the reference):
- "same_math": ONNX Runtime with matmul="float" against the model computing the same math in
  torch (an fp32 model; an INT8 model with every INT8 linear on the "torch-dequant" backend,
  i.e. x @ dequantize(W)^T in fp32). Only the order of float operations differs: measured
  ~4e-7 here and ~2e-6 on SmolLM2's 30 layers.
- "fast_backends": the same file against our INT8 model on its default CPU backends (the VNNI
  GEMV, or int8pack with bf16 activations for more than 4 rows): that is our kernels' own error
  (measured 4e-3 here, 1.2e-2 on SmolLM2), not the export's.
- "ort_int8": matmul="int8", where ONNX Runtime quantizes activations to int8 in blocks of 32
  (measured 1.5e-2 here, 2.6e-2 on SmolLM2).
"""
from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import hetero_llm
from hetero_llm import QuantConfig
from hetero_llm.config import PruneConfig
from hetero_llm.evaluate import weight_bytes
from hetero_llm.errors import (DistributedError, ExportError, InvalidOptionError, MetaDeviceError, ModelLoadError,
                               NotAModelError, UnsupportedArchitectureError)
from hetero_llm.quant.embedding import TiedInt8Linear
from hetero_llm.quant.modules import Int8Linear
from tiny_shapes import TINY_SHAPES

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from hetero_llm.export import OnnxCausalLM, export_onnx  # noqa: E402
from hetero_llm.export.onnx import SIDECAR  # noqa: E402

TOL = {"same_math": 1e-4, "fast_backends": 3e-2, "ort_int8": 6e-2}
BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(model_type: str = "llama", **extra):
    cfg = AutoConfig.for_model(model_type, **{**BASE, **TINY_SHAPES[model_type], **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def accelerated(model_type: str = "llama", quantize="int8", **extra):
    return hetero_llm.accelerate(tiny(model_type, **extra), quantize=quantize, device="cpu")


@contextlib.contextmanager
def reference_backends(model):
    """Every INT8 linear on the torch-dequant backend: the math the exported graph writes down."""
    linears = [m for m in model.modules() if isinstance(m, (Int8Linear, TiedInt8Linear))]
    before = [m.backend for m in linears]
    for m in linears:
        m.backend = "torch-dequant"
    try:
        yield model
    finally:
        for m, b in zip(linears, before):
            m.backend = b


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def reference(model, ids, mask=None, past=None):
    """Our model's logits and cache, through transformers' forward with a DynamicCache."""
    total = ids.shape[1] + (0 if past is None else past[0][0].shape[2])
    mask = torch.ones(ids.shape[0], total, dtype=torch.long) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]  # as generate() (and the runner)
    cache = DynamicCache() if past is None else DynamicCache(ddp_cache_data=past)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    return out.logits, [(layer.keys.clone(), layer.values.clone()) for layer in out.past_key_values.layers]


def prompt_ids(b=2, s=6, seed=0):
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def assert_prompt_and_steps(model, runner, tol: float, steps: int = 3) -> None:
    """Prompt (the second row left-padded), then `steps` cached steps feeding present back as past."""
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    want, past = reference(model, ids, mask)
    got = runner(input_ids=ids, attention_mask=mask)
    assert rel(got.logits[0], want[0]) <= tol
    assert rel(got.logits[1, 2:], want[1, 2:]) <= tol  # padded positions have no meaningful logits
    presents = got.past_key_values
    for step in range(steps):
        token = prompt_ids(2, 1, seed=10 + step)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        want, past = reference(model, token, mask, past)
        got = runner(input_ids=token, attention_mask=mask, past_key_values=presents)
        assert rel(got.logits, want) <= tol, step
        keep = mask[:, None, :, None]  # what padded tokens leave in the cache is never attended
        for (k, v), (rk, rv) in zip(got.past_key_values, past):
            assert k.shape == rk.shape and rel(k * keep, rk * keep) <= tol and rel(v * keep, rv * keep) <= tol
        presents = got.past_key_values


def greedy_matches(model, runner, new_tokens: int = 10) -> None:
    ids = prompt_ids(2, 7, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
    got = runner.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    assert torch.equal(got, want)


# -- fixtures: one export each, shared by the tests that read it ---------------------------------

@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    model = tiny("llama", tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("fp32") / "onnx"
    path.mkdir()
    (path / "stale.txt").write_text("from an earlier export")
    export_onnx(model, path, overwrite=True)  # replaces the directory, and runs the self-check
    return model, path


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    model = accelerated("llama", tie_word_embeddings=True)
    return model, export_onnx(model, tmp_path_factory.mktemp("int8") / "onnx", check=False)


# -- fp32 --------------------------------------------------------------------------------------

def test_fp32_export_writes_the_graph_the_sidecar_and_the_configs(fp32):
    model, path = fp32
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", SIDECAR,
                                                        "model.onnx"]
    meta = json.loads((path / SIDECAR).read_text())
    assert meta["num_layers"] == 2 and meta["kv_heads"] == [2, 2] and meta["head_dim"] == [16, 16]
    assert meta["quantization"]["int8_linears"] == 0 and meta["accelerated"] is False
    graph = onnx.load(str(path / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                         "past_key_values.0.value"]
    assert names[-1] == "logits_to_keep"  # optional: it has a default initializer
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]
    dims = [d.dim_param for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past"


def test_fp32_logits_prompt_and_cached_steps(fp32):
    model, path = fp32
    assert_prompt_and_steps(model, OnnxCausalLM(path), TOL["same_math"])


def test_fp32_greedy_generate_is_identical(fp32):
    model, path = fp32
    greedy_matches(model, OnnxCausalLM(path))


def test_logits_to_keep_returns_the_last_positions(fp32):
    _, path = fp32
    runner = OnnxCausalLM(path)
    ids = prompt_ids()
    full = runner(input_ids=ids).logits
    last = runner(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 256) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


# -- INT8 --------------------------------------------------------------------------------------

def test_int8_weights_stay_int8_in_the_file(int8, fp32):
    model, path = int8
    meta = json.loads((path / SIDECAR).read_text())
    q = meta["quantization"]
    assert q["schemes"] == ["int8"] and q["int8_embedding"] and q["group_sizes"] == []
    linears = [m for m in model.modules() if isinstance(m, (Int8Linear, TiedInt8Linear))]
    assert q["int8_linears"] == len(linears) == 9  # qkv, o, gate_up, down per layer, tied lm_head
    graph = onnx.load(str(path / "model.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 9
    # the tied lm_head reads the embedding's INT8 table: stored once
    stored = sum(m.qweight.numel() for m in model.modules() if isinstance(m, Int8Linear)) \
        + model.model.embed_tokens.qweight.numel()
    assert q["int8_weight_bytes"] == stored
    big_floats = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                  and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 64 * 64]
    assert big_floats == []
    size, fp32_size = (path / "model.onnx").stat().st_size, (fp32[1] / "model.onnx").stat().st_size
    assert size < 0.4 * fp32_size, (size, fp32_size)


def test_int8_logits_match_our_int8_math(int8):
    model, path = int8
    runner = OnnxCausalLM(path)
    with reference_backends(model):
        assert_prompt_and_steps(model, runner, TOL["same_math"])
    assert_prompt_and_steps(model, runner, TOL["fast_backends"], steps=1)


def test_int8_greedy_generate_is_identical(int8):
    model, path = int8
    with reference_backends(model):
        greedy_matches(model, OnnxCausalLM(path), new_tokens=12)


def test_ort_int8_matmuls_are_close_and_hold_less(int8):
    model, path = int8
    fast, exact = OnnxCausalLM(path, matmul="int8"), OnnxCausalLM(path)
    ids = prompt_ids()
    with reference_backends(model):
        want, _ = reference(model, ids)
    assert rel(fast(input_ids=ids).logits, want) <= TOL["ort_int8"]
    assert fast.weight_bytes() < exact.weight_bytes()
    assert weight_bytes(fast) == fast.weight_bytes()


@pytest.mark.parametrize("case", ["qwen2-int8-asym", "gemma-int8-group32", "llama-structured", "opt", "gpt2"])
def test_other_schemes_and_families(case, tmp_path, monkeypatch):
    """Zero points and biases (qwen2), per-group scales with Gemma's norm and embedding scale,
    a structurally pruned model (fewer KV heads), OPT's fused q/k/v slices, GPT-2's Conv1D
    (written with its weights in model.onnx.data, as a model near protobuf's 2 GB cap is)."""
    if case == "gpt2":
        monkeypatch.setattr("hetero_llm.export.onnx.EXTERNAL_DATA_BYTES", 0)
    one = dict(n_layer=1) if case == "gpt2" else dict(num_hidden_layers=1)  # one layer: a faster export
    if case == "qwen2-int8-asym":
        model = accelerated("qwen2", quantize="int8-asym", **one)
    elif case == "gemma-int8-group32":
        model = accelerated("gemma", quantize=QuantConfig(scheme="int8", granularity="group", group_size=32), **one)
    elif case == "llama-structured":
        prune = PruneConfig(method="structured", mlp=0.25, heads=0.5, criterion="magnitude")
        model = hetero_llm.accelerate(tiny("llama", **one), prune=prune, quantize="int8", device="cpu")
    else:
        model = accelerated(case, **one)
    path = export_onnx(model, tmp_path / "onnx", check=False)
    meta = json.loads((path / SIDECAR).read_text())
    graph = onnx.load(str(path / "model.onnx")).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == meta["quantization"]["int8_linears"] > 0
    if case == "qwen2-int8-asym":
        assert meta["quantization"]["schemes"] == ["int8-asym"] and all(len(n.input) == 3 for n in dq)
    if case == "gemma-int8-group32":
        assert meta["quantization"]["group_sizes"] == [32]
        blocks = [{a.name: a.i for a in n.attribute}.get("block_size") for n in dq]
        # every linear per group; Gemma's tied lm_head reads the embedding's per-row table
        assert blocks.count(32) == len(dq) - 1 and isinstance(model.lm_head, TiedInt8Linear)
    if case == "llama-structured":
        assert meta["kv_heads"] == [1] and model.config.intermediate_size < 128
    if case == "gpt2":
        assert sorted(meta["files"]) == ["model.onnx", "model.onnx.data"]
        assert (path / "model.onnx").stat().st_size < (path / "model.onnx.data").stat().st_size
    with reference_backends(model):
        assert_prompt_and_steps(model, OnnxCausalLM(path), TOL["same_math"], steps=2)


# -- refusals ----------------------------------------------------------------------------------

def _w8a8():
    return hetero_llm.accelerate(tiny(), quantize=QuantConfig(scheme="w8a8", smooth_alpha=0), device="cpu")


def _sharded():
    model = tiny()
    model.hetero_parallel = object()  # what accelerate(tp=/pp=) leaves on a rank's model
    return model


def _meta():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny().config)


def _unsupported():
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=4)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("build,kwargs,error,words", [
    (_w8a8, {}, ExportError, "quantize='int8'"),
    (_sharded, {}, DistributedError, "without tp=/pp="),
    (_meta, {}, MetaDeviceError, "meta device"),
    (_unsupported, {}, UnsupportedArchitectureError, "gpt_neox"),
    (tiny, {"opset": 18}, InvalidOptionError, "opset 21"),
    (lambda: torch.nn.Linear(2, 2), {}, NotAModelError, "causal LM"),
])
def test_refusals_are_typed_and_write_nothing(build, kwargs, error, words, tmp_path):
    with pytest.raises(error, match=words):
        export_onnx(build(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_non_empty_target_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="overwrite=True"):
        export_onnx(tiny(), target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_a_failed_export_leaves_the_old_directory_in_place(monkeypatch, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    def broken(*args):
        raise ExportError("the exporter failed")

    monkeypatch.setattr("hetero_llm.export.onnx._trace", broken)
    with pytest.raises(ExportError, match="exporter failed"):
        export_onnx(tiny(), target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["keep.txt"]


def test_the_self_check_catches_a_graph_that_is_off(fp32, monkeypatch):
    from hetero_llm.export import onnx_check
    from hetero_llm.export.onnx_modules import export_copy

    model, path = fp32
    assert onnx_check.check_export(export_copy(model), path) <= 1e-5
    monkeypatch.setattr(onnx_check, "CHECK_RTOL", -1.0)  # any difference is now too large
    with pytest.raises(ExportError, match="differ from the model"):
        onnx_check.check_export(export_copy(model), path)


def test_runner_refusals(fp32, tmp_path):
    _, path = fp32
    with pytest.raises(ModelLoadError, match="export_onnx"):
        OnnxCausalLM(tmp_path)
    with pytest.raises(InvalidOptionError, match="matmul"):
        OnnxCausalLM(path, matmul="int4")
    runner = OnnxCausalLM(path)
    with pytest.raises(InvalidOptionError, match="greedily"):
        runner.generate(prompt_ids(), max_new_tokens=2, do_sample=True)
    with pytest.raises(InvalidOptionError, match="num_beams"):
        runner.generate(prompt_ids(), max_new_tokens=2, num_beams=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes((path / "model.onnx").read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="wrong size"):
        OnnxCausalLM(broken)


# -- evaluate and the CLI ----------------------------------------------------------------------

class ToyTokenizer:
    """One id per character, no download (as tests/evaluate's)."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        ids = [1 + (ord(c) % 250) for c in text]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}


def test_evaluate_measures_the_runner_like_a_model(int8):
    from hetero_llm.evaluate import format_table, measure_decode, measure_prefill, perplexity, run_bench

    model, path = int8
    runner, tok = OnnxCausalLM(path), ToyTokenizer()
    with reference_backends(model):
        ours = perplexity(model, tok, max_tokens=300, window=128, progress=False)
    theirs = perplexity(runner, tok, max_tokens=300, window=128, progress=False)
    assert theirs.tokens == ours.tokens and abs(theirs.nll - ours.nll) <= 1e-4 * abs(ours.nll)
    ids = prompt_ids(1, 8)
    assert measure_decode(runner, ids, 5) > 0 and measure_prefill(runner, ids) > 0
    result = run_bench({"hetero_llm": model, "onnxruntime": runner}, tok, repeats=1, new_tokens=3, prompt_len=16,
                       perplexity_tokens=200, progress=False)
    assert result.variant("onnxruntime").weight_mb > 0
    assert "hetero_llm vs onnxruntime: decode" in format_table(result)


def test_cli_bench_onnx_adds_an_onnxruntime_side(monkeypatch, tmp_path, capsys):
    from hetero_llm import cli, evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda name, **_: (tiny(), ToyTokenizer()))
    code = cli.main(["bench", "tiny", "--onnx", "--no-peer", "--quantize", "int8", "--repeats", "1",
                     "--new-tokens", "2", "--prompt-len", "8", "--ppl-tokens", "0", "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["original", "hetero_llm", "onnxruntime"]
    assert "onnxruntime" in capsys.readouterr().out
    assert cli.build_parser().parse_args(["bench", "smollm2"]).onnx is None  # off unless asked


# -- the real model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_int8_logits_and_tokens(tmp_path):
    from hetero_llm.evaluate import load_model

    try:
        model, tok = load_model("smollm2")
    except hetero_llm.ModelLoadError as exc:
        pytest.skip(str(exc))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())  # lm_head is tied: counted once
    hetero_llm.accelerate(model)
    start = time.perf_counter()
    path = export_onnx(model, tmp_path / "onnx", check=False)
    export_s = time.perf_counter() - start
    assert (path / "model.onnx").stat().st_size < 0.3 * fp32_bytes
    runner = OnnxCausalLM(path)
    ids = tok("The capital of France is a city that", return_tensors="pt").input_ids
    with torch.inference_mode():
        fast = model(ids).logits
    with reference_backends(model):
        with torch.inference_mode():
            exact = model(ids).logits
            want = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    got = runner(input_ids=ids).logits
    assert rel(got, exact) <= TOL["same_math"] and rel(got, fast) <= TOL["fast_backends"]
    assert torch.equal(runner.generate(ids, max_new_tokens=16, min_new_tokens=16), want)
    assert rel(OnnxCausalLM(path, matmul="int8")(input_ids=ids).logits, exact) <= TOL["ort_int8"]
    print(f"SmolLM2 export: {export_s:.1f} s")
