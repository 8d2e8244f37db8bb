"""Triton Inference Server through PyTriton: the real tritonserver, real HTTP on localhost.

The fast tests serve a tiny random Llama (accelerated) from a server started in-process on free
ports; the slow ones run examples/serve_triton.py as users do, with the real SmolLM2. Requests
go through pytriton's ModelClient and through plain urllib (KServe v2 JSON), and every answer
must equal the model's own greedy generate() of that prompt, computed here without the helper.
"""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from concurrency import run_together
from tiny_shapes import TINY_SHAPES

import hetero_llm
from hetero_llm.serving import triton_server
from hetero_llm.serving.triton_server import (
    TritonSetupError,
    bind_text_generation,
    started_triton,
)

pytest.importorskip("pytriton.triton", reason="needs hetero_llm[triton] (nvidia-pytriton)")
from pytriton.client import ModelClient
from pytriton.triton import TritonConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_triton.py"
PROMPTS = ["hello world", "Triton, bitte: ünïcödé → ok", "a", "The quick brown fox jumps over the lazy dog."]
NEW = 12
DEFAULT_NEW = 7  # what the tiny server generates when a request gives no max_new_tokens
SERVER_PROCESSES = {"tritonserver", "triton_python_backend_stub"}


class CharTokenizer:
    """One token per character, decoded into a non-ASCII range: UTF-8 both ways, no download."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        return {"input_ids": torch.tensor([[1 + ord(c) % 250 for c in text]])}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0xC0 + int(i)) for i in ids if not (skip_special_tokens and int(i) == 0))


def tiny_accelerated():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide init so that greedy text varies from token to token (the default 0.02 repeats one)
    config = LlamaConfig(vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=0, pad_token_id=0, initializer_range=0.2, **TINY_SHAPES["llama"])
    return hetero_llm.accelerate(LlamaForCausalLM(config).eval())


def direct(model, tokenizer, prompt: str, new: int, chat: bool = False) -> str:
    """The model's own greedy generate() of one prompt, decoded without the prompt."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (held together while chosen, so never the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def local_config(log_file: Path) -> tuple[TritonConfig, str]:
    """Every endpoint on 127.0.0.1, on free ports; the server's log in a file, not in pytest's output."""
    http, grpc, metrics = free_ports(3)
    config = TritonConfig(http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=grpc,
                          metrics_address="127.0.0.1", metrics_port=metrics, exit_timeout_secs=15, log_file=log_file)
    return config, f"http://127.0.0.1:{http}"


def server_processes(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if p.name() in SERVER_PROCESSES]


def skip_unless_stub_can_run() -> None:
    """A clear skip where this environment cannot host Triton's Python stub (see the module)."""
    try:
        triton_server.check_numpy_supported()
        triton_server.libpython_path()
    except TritonSetupError as exc:
        pytest.skip(str(exc))


def kserve_infer(url: str, model: str, prompts: list[str], new: int | None = None) -> list[str]:
    """POST /v2/models/<model>/infer, KServe v2 JSON, as any HTTP client would."""
    inputs = [{"name": "prompt", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}]
    if new is not None:
        inputs.append({"name": "max_new_tokens", "shape": [1], "datatype": "INT32", "data": [new]})
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        (output,) = json.load(response)["outputs"]
    assert output["name"] == "text" and output["datatype"] == "BYTES" and output["shape"] == [len(prompts)]
    return output["data"]


def client_infer(url: str, model: str, prompt: str, new: int) -> str:
    with ModelClient(url, model, init_timeout_s=120, inference_timeout_s=120) as client:
        result = client.infer_sample(prompt=np.array([prompt.encode()]), max_new_tokens=np.array([new], np.int32))
    (text,) = result["text"]
    return text.decode("utf-8")


# ---------------------------------------------------------------- the tiny model, in-process


@pytest.fixture(scope="module")
def tiny():
    return tiny_accelerated(), CharTokenizer()


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """(url, model, tokenizer): the tiny model bound as "tiny", 2 instances (generations at once)."""
    skip_unless_stub_can_run()
    model, tokenizer = tiny
    config, url = local_config(tmp_path_factory.mktemp("triton") / "server.log")
    with started_triton(config) as triton:
        bind_text_generation(triton, model, tokenizer, model_name="tiny", default_max_new_tokens=DEFAULT_NEW,
                             instances=2)
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def expected(tiny):
    model, tokenizer = tiny
    return {p: direct(model, tokenizer, p, NEW) for p in PROMPTS}


def test_model_client_gets_the_models_own_text(served, expected):
    url = served[0]
    for prompt in PROMPTS:
        assert client_infer(url, "tiny", prompt, NEW) == expected[prompt]


def test_kserve_json_over_plain_http(served, expected):
    url, model, tokenizer = served
    assert kserve_infer(url, "tiny", PROMPTS, NEW) == [expected[p] for p in PROMPTS]  # several in one request
    # no max_new_tokens: the bound default
    assert kserve_infer(url, "tiny", PROMPTS[:1]) == [direct(model, tokenizer, PROMPTS[0], DEFAULT_NEW)]


def test_two_concurrent_requests(served, expected):
    url = served[0]
    a, b = PROMPTS[0], PROMPTS[3]
    got = run_together([lambda: client_infer(url, "tiny", a, NEW), lambda: kserve_infer(url, "tiny", [b], NEW)[0]])
    assert got == [expected[a], expected[b]]


def test_bad_request_fails_alone_and_the_server_goes_on(served, expected):
    url = served[0]
    for prompts, new, says in [(["x"], 0, "max_new_tokens must be at least 1"),
                               ([""], NEW, "the prompt is empty"),
                               (["x"], 10_000, "exceed the model's context of 256 tokens")]:
        with pytest.raises(urllib.error.HTTPError) as info:
            kserve_infer(url, "tiny", prompts, new)
        assert info.value.code >= 400 and says in info.value.read().decode()

    def bad():
        with pytest.raises(urllib.error.HTTPError):
            kserve_infer(url, "tiny", ["x"], 0)

    # sent together, the bad request fails alone: no batch to take a good one down with it
    good = run_together([bad, lambda: kserve_infer(url, "tiny", PROMPTS[:1], NEW)])[1]
    assert good == [expected[PROMPTS[0]]]


def test_stubs_embed_this_interpreters_libpython(served):
    """The root cause of the `_recursion_count` failure, checked directly: every stub process
    maps this interpreter's libpython, not the system's."""
    ours = triton_server.libpython_path().resolve()
    stubs = [p for p in server_processes(psutil.Process()) if p.name() == "triton_python_backend_stub"]
    assert len(stubs) == 2  # one per instance
    for stub in stubs:
        libpythons = {Path(m.path).resolve() for m in stub.memory_maps() if "libpython" in Path(m.path).name}
        assert libpythons == {ours}


def test_server_stops_and_frees_its_port_when_the_block_ends(tmp_path):
    skip_unless_stub_can_run()
    config, url = local_config(tmp_path / "server.log")
    before = {p.pid for p in server_processes(psutil.Process())}
    with started_triton(config):
        started = {p.pid for p in server_processes(psutil.Process())} - before
        assert started and urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10).status == 200
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in started)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5)


def test_a_taken_port_is_refused_before_the_server_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc, metrics = free_ports(2)
        config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=grpc,
                              metrics_address="127.0.0.1", metrics_port=metrics)
        with pytest.raises(TritonSetupError, match=f"HTTP port 127.0.0.1:{port} is not free"):
            triton_server.check_ports_free(config)
    triton_server.check_ports_free(config)  # free again once closed


def test_numpy_outside_pytritons_range_is_refused(monkeypatch):
    from importlib import metadata

    if not any(r.replace(" ", "").startswith("numpy<2") for r in metadata.requires("nvidia-pytriton") or []):
        pytest.skip("this pytriton does not declare numpy<2")
    monkeypatch.setattr(np, "__version__", "2.4.6")
    with pytest.raises(TritonSetupError, match="corrupt every request"):
        triton_server.check_numpy_supported()
    monkeypatch.setattr(np, "__version__", "1.26.4")
    triton_server.check_numpy_supported()


def test_python_without_shared_libpython_is_refused(monkeypatch):
    static = {"INSTSONAME": "libpython3.11.a", "LIBDIR": "/nonexistent"}
    monkeypatch.setattr(triton_server.sysconfig, "get_config_var", static.get)
    with pytest.raises(TritonSetupError, match="--enable-shared"):
        triton_server.libpython_path()


# ---------------------------------------------------------------- the example, with SmolLM2


@pytest.fixture(scope="module")
def smollm2_reference():
    from hetero_llm.evaluate import load_model

    skip_unless_stub_can_run()  # before the model's load: nothing to compare it with otherwise
    try:
        model, tokenizer = load_model("smollm2")
    except hetero_llm.ModelLoadError as exc:
        pytest.skip(str(exc))
    return hetero_llm.accelerate(model), tokenizer


@pytest.fixture(scope="module")
def example_server(smollm2_reference, tmp_path_factory):
    """examples/serve_triton.py in its own process, as users run it; stopped with SIGTERM."""
    skip_unless_stub_can_run()
    http, grpc, metrics = free_ports(3)
    # a file, not a pipe: the server logs a lot, and a full pipe nobody reads would block it
    log = tmp_path_factory.mktemp("serve_triton") / "example.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--port", str(http), "--grpc-port", str(grpc),
                                 "--metrics-port", str(metrics)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(proc, log, f"{url}/v2/models/smollm2/ready", timeout=300)
        children = server_processes(psutil.Process(proc.pid))
        (server,) = [c for c in children if c.name() == "tritonserver"]
        args = server.cmdline()
        workspace = Path(args[args.index("--model-repository") + 1]).parent
        libs = Path(server.environ()["LD_LIBRARY_PATH"].split(":")[0])  # started_triton's libpython link
        assert libs.name.startswith("hetero_llm_triton_libs_")
        yield url
        proc.send_signal(signal.SIGTERM)  # as `docker stop` does; the example treats it as Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not workspace.exists() and not libs.exists()  # the server's copy and our link: removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen, log: Path, ready_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the example exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(ready_url, timeout=5).status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"the example was not ready within {timeout} s")


@pytest.mark.slow
def test_example_serves_smollm2_text_equal_to_generate(example_server, smollm2_reference):
    model, tokenizer = smollm2_reference
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours."]
    expected = [direct(model, tokenizer, p, 24, chat=True) for p in prompts]
    assert "Paris" in expected[0]
    assert [client_infer(example_server, "smollm2", p, 24) for p in prompts] == expected
    assert kserve_infer(example_server, "smollm2", prompts, 24) == expected
    got = run_together([lambda: client_infer(example_server, "smollm2", prompts[0], 24),
                        lambda: kserve_infer(example_server, "smollm2", [prompts[1]], 24)[0]])
    assert got == expected[:2]


def test_example_parses_its_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_triton", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--port", "9000", "--no-chat"])
    assert (args.port, args.grpc_port, args.metrics_port, args.no_chat, args.model_name) == \
        (9000, 8001, 8002, True, "smollm2")
