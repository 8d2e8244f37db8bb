"""save()/load(): exact round trips for every scheme, and typed errors for damaged saves."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hetero_llm
from hetero_llm.config import QuantConfig
from hetero_llm.errors import HardwareError, HeteroLLMError, ModelLoadError, PlanMismatchError
from hetero_llm.serialize import MANIFEST, WEIGHTS
from tiny_shapes import TINY_SHAPES

SCHEMES = {
    "int8": QuantConfig(scheme="int8"),
    "int8-asym": QuantConfig(scheme="int8-asym"),
    "int8-g32": QuantConfig(scheme="int8", granularity="group", group_size=32),
    "int8-tensor": QuantConfig(scheme="int8-asym", granularity="tensor"),
    "w8a8": QuantConfig(scheme="w8a8", outlier_channels=3),
    "w8a8-nocal": QuantConfig(scheme="w8a8", smooth_alpha=0.0),
    "float-embeddings": QuantConfig(scheme="int8", embeddings=False),
    "none": QuantConfig(scheme="none"),
}


BASE = dict(vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**BASE, **TINY_SHAPES[family]})
    return AutoModelForCausalLM.from_config(config).eval()


def ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 200, (1, n), generator=torch.Generator().manual_seed(seed))


def accelerated(family: str = "llama", scheme: str = "int8") -> torch.nn.Module:
    q = SCHEMES[scheme]
    calib = [ids(16, s) for s in range(3)] if q.needs_calibration else None
    return hetero_llm.accelerate(tiny(family), quantize=q, calibration_data=calib)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_bit_exact(tmp_path, scheme):
    model = accelerated("llama", scheme)
    hetero_llm.save(model, tmp_path / "m")
    loaded = hetero_llm.load(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = ids()
    with torch.inference_mode():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.hetero_plan == model.hetero_plan
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    out = loaded.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(x, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("family", [f for f in ("qwen2", "qwen3", "gemma", "gpt2", "opt", "phi3", "mistral")
                                    if f in TINY_SHAPES])
def test_round_trip_other_architectures(tmp_path, family):
    model = accelerated(family)
    hetero_llm.save(model, tmp_path / "m")
    loaded = hetero_llm.load(tmp_path / "m")
    x = ids()
    with torch.inference_mode():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_tied_int8_table_is_stored_once_and_stays_tied(tmp_path):
    model = accelerated("gpt2")  # GPT-2 ties lm_head to wte
    hetero_llm.save(model, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / WEIGHTS), "pt") as f:
        names = set(f.keys())
    assert "transformer.wte.qweight" in names and not any(n.startswith("lm_head") for n in names)
    loaded = hetero_llm.load(tmp_path / "m")
    assert loaded.lm_head.qweight is loaded.transformer.wte.qweight


def test_float_tied_weights_are_saved_once(tmp_path):
    model = accelerated("gpt2", "none")
    hetero_llm.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = hetero_llm.load(tmp_path / "m")
    assert torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)


def test_saved_files_hold_no_pickle(tmp_path):
    hetero_llm.save(accelerated(), tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {WEIGHTS, MANIFEST, "config.json", "generation_config.json"}
    for p in (tmp_path / "m").iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["plan"]["version"] >= 1
    assert set(manifest["files"]) == {WEIGHTS, "config.json", "generation_config.json"}


def test_save_refuses_plain_models_and_nonempty_dirs(tmp_path):
    with pytest.raises(HeteroLLMError, match="accelerate"):
        hetero_llm.save(tiny(), tmp_path / "plain")
    model = accelerated()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(HeteroLLMError, match="overwrite=True"):
        hetero_llm.save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"  # nothing lost
    hetero_llm.save(model, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "notes.txt").exists()
    assert hetero_llm.load(tmp_path / "busy") is not None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_failed_save_leaves_the_old_save_intact(tmp_path, monkeypatch):
    model = accelerated()
    hetero_llm.save(model, tmp_path / "m")
    before = (tmp_path / "m" / WEIGHTS).read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        hetero_llm.save(model, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.fixture
def saved(tmp_path):
    hetero_llm.save(accelerated(), tmp_path / "m")
    return tmp_path / "m"


def _rewrite_manifest(path, **changes):
    m = json.loads((path / MANIFEST).read_text())
    m.update(changes)
    (path / MANIFEST).write_text(json.dumps(m))


def test_truncated_weights_are_refused(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="checksum"):
        hetero_llm.load(saved)


def test_one_flipped_byte_is_refused(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-100] ^= 0x01  # inside the tensor data: safetensors alone would not notice
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum"):
        hetero_llm.load(saved)


def test_missing_or_damaged_manifest(saved, tmp_path):
    with pytest.raises(ModelLoadError, match="hetero_llm.save"):
        hetero_llm.load(tmp_path)  # no manifest here
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        hetero_llm.load(saved)


def test_future_format_version_is_refused(saved):
    _rewrite_manifest(saved, format_version=99)
    with pytest.raises(ModelLoadError, match="format 1"):
        hetero_llm.load(saved)


def test_missing_file_is_refused(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        hetero_llm.load(saved)


def test_files_from_different_saves_are_refused(saved, tmp_path):
    other = accelerated("qwen2")
    hetero_llm.save(other, tmp_path / "other")
    # The qwen2 weights with the llama manifest: checksums catch it.
    (saved / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    with pytest.raises(ModelLoadError, match="checksum"):
        hetero_llm.load(saved)


def test_consistent_checksums_but_wrong_tensors_are_refused(saved):
    # A hand-edited save whose checksums were updated: the tensors still must fit.
    from safetensors.torch import load_file, save_file
    from hetero_llm.serialize import sha256_file as _sha256
    tensors = load_file(str(saved / WEIGHTS))
    name = next(n for n in tensors if n.endswith("qweight"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(saved / WEIGHTS))
    m = json.loads((saved / MANIFEST).read_text())
    m["files"][WEIGHTS] = {"sha256": _sha256(saved / WEIGHTS), "bytes": (saved / WEIGHTS).stat().st_size}
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PlanMismatchError, match="do not fit"):
        hetero_llm.load(saved)


def test_gpu_plan_without_gpu(saved):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    m = json.loads((saved / MANIFEST).read_text())
    m["plan"]["device"] = "cuda"
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(HardwareError, match="CUDA"):
        hetero_llm.load(saved)


def test_load_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("load() must not unpickle")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert hetero_llm.load(saved) is not None
