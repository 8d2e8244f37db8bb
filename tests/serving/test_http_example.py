"""examples/serve_http.py: real HTTP on localhost (uvicorn), streamed tokens, the model's own text.

The app is the example's own `build_app`, served by a uvicorn server on a free port in a
background thread; requests go over a socket with urllib, as any client's would.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import hetero_llm
from hetero_llm.errors import ModelLoadError
from concurrency import run_together

uvicorn = pytest.importorskip("uvicorn", reason="the HTTP example needs hetero_llm[serve] (fastapi, uvicorn)")
pytest.importorskip("fastapi", reason="the HTTP example needs hetero_llm[serve] (fastapi, uvicorn)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "serve_http.py"
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours."]
NEW = 24


def load_example():
    spec = importlib.util.spec_from_file_location("serve_http", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served():
    from hetero_llm.evaluate import load_model

    try:
        model, tokenizer = load_model("smollm2")
    except (ModelLoadError, ImportError) as exc:
        pytest.skip(str(exc))
    hetero_llm.accelerate(model)
    example = load_example()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(example.build_app(model, tokenizer), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, tokenizer, example
    server.should_exit = True
    thread.join(timeout=30)


def post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


def stream(base: str, prompt: str) -> tuple[list[str], list[float]]:
    """The text pieces of a streamed answer and when each arrived (seconds since the request)."""
    start, pieces, times = time.perf_counter(), [], []
    with post(f"{base}/generate", {"prompt": prompt, "max_new_tokens": NEW}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return pieces, times
            pieces.append(json.loads(line[len("data: "):])["text"])
            times.append(time.perf_counter() - start)
    raise AssertionError("the stream ended without [DONE]")


def direct(model, tokenizer, example, prompt: str) -> str:
    ids = example.prompt_ids(tokenizer, prompt, chat=True)
    with torch.inference_mode():
        out = model.generate(**example.greedy_kwargs(ids, NEW))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_streamed_text_is_the_models_own(served):
    base, model, tokenizer, example = served
    for prompt in PROMPTS:
        pieces, times = stream(base, prompt)
        assert "".join(pieces) == direct(model, tokenizer, example, prompt)
        assert len(pieces) > 3 and times[0] < times[-1]  # pieces arrive as they are decoded


def test_non_streamed_answer_and_health(served):
    base, model, tokenizer, example = served
    with post(f"{base}/generate", {"prompt": PROMPTS[1], "max_new_tokens": NEW, "stream": False}) as resp:
        assert json.load(resp)["text"] == direct(model, tokenizer, example, PROMPTS[1])
    with urllib.request.urlopen(f"{base}/health", timeout=30) as resp:
        health = json.load(resp)
    assert health["ok"] and health["plan"]["device"] == "cpu"


def test_concurrent_requests_each_get_their_own_text(served):
    base, model, tokenizer, example = served
    got = run_together([lambda p=p: "".join(stream(base, p)[0]) for p in PROMPTS * 2])
    assert got == [direct(model, tokenizer, example, p) for p in PROMPTS * 2]


def test_bad_requests_are_refused_with_422(served):
    base = served[0]
    for body in ({"prompt": ""}, {"prompt": "hi", "max_new_tokens": 0}, {"max_new_tokens": 5}):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(f"{base}/generate", body)
        assert err.value.code == 422
