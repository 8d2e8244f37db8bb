"""Serve a text-generation model from NVIDIA Triton Inference Server, through PyTriton.

    from hetero_llm.serving.triton_server import bind_text_generation, started_triton

    with started_triton(TritonConfig(http_port=8000)) as triton:
        bind_text_generation(triton, model, tokenizer, model_name="smollm2")
        triton.serve()                              # until Ctrl-C

PyTriton (PyPI ``nvidia-pytriton``) runs the real ``tritonserver`` binary. A request reaches the
model through Triton's Python backend: a *stub* process, started by the server for each model
instance, hands the tensors over shared memory to the function bound here, which runs in this
process, next to the model. Two things about that stub must hold; ``started_triton`` makes the
first hold and refuses with a ``TritonSetupError`` where the second does not:

1. The stub must embed *this* interpreter's libpython. The stub (pytriton ships one per Python
   minor version) links ``libpython3.X.so.1.0`` with no rpath, so the loader takes the first one
   it finds, usually the distribution's (Debian 12: 3.11.2), while the stub finds its standard
   library through ``python3`` on PATH, which pytriton points at this interpreter (say pyenv's
   3.11.7). A 3.11.2 C core running the 3.11.7 pure-Python stdlib fails as soon as the proxy
   starts its shared-memory manager: ``multiprocessing.resource_tracker`` (3.11.6+) calls
   ``_thread.RLock._recursion_count()``, which the older C ``_thread`` lacks. We start the server
   with ``LD_LIBRARY_PATH`` leading to a directory holding only this interpreter's libpython.
2. numpy must be what pytriton declares (0.7: ``numpy<2``). The stub's pybind11 predates numpy 2
   (it imports ``numpy.core.multiarray``) and misreads its arrays: under numpy 2, ``[1, 2, 3]``
   arrives as ``[1, 1, 1]`` and outputs are rejected ("output tensor shape does not match size").

Requests are served one prompt at a time (Triton batching off), so every answer is exactly the
greedy ``model.generate()`` of that prompt alone; see ``bind_text_generation``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TritonSetupError
from .text import context_problem, greedy_kwargs, prompt_ids

PROMPT, MAX_NEW_TOKENS, TEXT = "prompt", "max_new_tokens", "text"
INSTALL_HINT = "pip install 'hetero_llm[triton]'  (nvidia-pytriton, which needs numpy<2)"


def _pytriton_triton_class():
    try:
        from pytriton.triton import Triton
    except ImportError as exc:
        raise TritonSetupError(f"PyTriton is not installed ({exc}); {INSTALL_HINT}") from exc
    return Triton


def libpython_path() -> Path:
    """This interpreter's shared libpython: the one Triton's Python stub must load.

    Raises TritonSetupError for a Python built without a shared library (``--enable-shared``):
    the stub would then load some other libpython, or none.
    """
    soname, libdir = sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LIBDIR")
    if soname and libdir and ".so" in soname and (Path(libdir) / soname).is_file():
        return Path(libdir) / soname
    raise TritonSetupError(
        f"this Python has no shared libpython ({soname!r} not found in {libdir!r}), so Triton's "
        "Python stub would embed another interpreter's; use a Python built with --enable-shared "
        "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11), a distribution's "
        "Python or conda")


def check_numpy_supported() -> None:
    """Refuse a numpy outside the range pytriton declares: its stub would misread every tensor."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires = metadata.requires("nvidia-pytriton") or []
    except metadata.PackageNotFoundError:
        return  # a source checkout of pytriton: nothing declared to check against
    for line in requires:
        req = Requirement(line)
        if req.name == "numpy" and req.marker is None and \
                not req.specifier.contains(np.__version__, prereleases=True):
            raise TritonSetupError(
                f"nvidia-pytriton needs numpy{req.specifier}, found numpy {np.__version__}: its "
                "Python stub (a pybind11 older than numpy 2) would corrupt every request "
                f"([1, 2, 3] arrives as [1, 1, 1]); pip install 'numpy{req.specifier}' or {INSTALL_HINT}")


@contextlib.contextmanager
def _env_prepended(name: str, directory: Path) -> Iterator[None]:
    """os.environ[name] starts with `directory` inside the block only (children inherit it)."""
    old = os.environ.get(name)
    os.environ[name] = f"{directory}{os.pathsep}{old}" if old else str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def check_ports_free(config: Any) -> None:
    """Refuse ports already taken: tritonserver would exit at once, and pytriton only report a
    timeout, 70 s later, with no word of why."""
    def field(name: str, default: Any) -> Any:
        value = getattr(config, name, None) if config is not None else None
        return default if value is None else value

    http_address = field("http_address", "0.0.0.0")
    endpoints = [("allow_http", "HTTP", http_address, field("http_port", 8000)),
                 ("allow_grpc", "gRPC", field("grpc_address", "0.0.0.0"), field("grpc_port", 8001)),
                 ("allow_metrics", "metrics", field("metrics_address", http_address), field("metrics_port", 8002))]
    for allow, what, address, port in endpoints:
        if not field(allow, True):
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            try:
                s.bind((address, port))
            except OSError as exc:
                raise TritonSetupError(f"the {what} port {address}:{port} is not free ({exc.strerror}); "
                                       "stop what uses it or choose another port") from exc


@contextlib.contextmanager
def started_triton(config: Any = None, *, workspace: str | Path | None = None) -> Iterator[Any]:
    """A running ``pytriton.triton.Triton`` whose Python stubs embed this interpreter; stopped,
    and its files removed, when the block ends (an exception or Ctrl-C included).

    `config` is a ``pytriton.triton.TritonConfig`` (ports, addresses, ...). Bind models inside the
    block; they are loaded at once. Raises TritonSetupError where PyTriton is missing, numpy is
    outside its range, this Python has no shared libpython, or a port is taken.
    """
    triton_class = _pytriton_triton_class()
    check_numpy_supported()
    lib = libpython_path()
    check_ports_free(config)
    # Only libpython goes first on the server's library path: a whole LIBDIR (conda's, say) would
    # also put its libstdc++ and others ahead of the ones tritonserver was built against.
    libs = Path(tempfile.mkdtemp(prefix="hetero_llm_triton_libs_"))
    triton = None
    try:
        (libs / lib.name).symlink_to(lib)
        triton = triton_class(config=config, workspace=workspace)
        # tritonserver copies its environment when it starts, and passes it on to every stub it
        # starts later (one per model instance, at bind time): set it for the start alone.
        with _env_prepended("LD_LIBRARY_PATH", libs):
            triton.run()
        yield triton
    finally:
        if triton is not None:
            triton.stop()
        shutil.rmtree(libs, ignore_errors=True)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int, chat: bool = False) -> str:
    """The greedy completion of one prompt, without the prompt: what each request is answered.

    Raises ValueError (sent back to the client) for an empty prompt, max_new_tokens < 1, or a
    prompt plus new tokens longer than the model's context.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt, chat)
    problem = context_problem(model, ids.shape[1], max_new_tokens)
    if problem is not None:
        raise ValueError(problem)
    with torch.inference_mode():
        out = model.generate(**greedy_kwargs(ids, max_new_tokens))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_generation_infer(model, tokenizer, *, default_max_new_tokens: int = 64,
                          chat: bool = False) -> Callable[[list], list]:
    """A PyTriton infer function: for each request, the greedy completion of each of its prompts.

    A request holds ``prompt`` (BYTES, one or more UTF-8 strings) and optionally
    ``max_new_tokens`` (INT32, one value for all its prompts); the answer is ``text`` (BYTES,
    one completion per prompt, in order).
    """
    def infer(requests: list) -> list:
        answers = []
        for request in requests:
            prompts = [_as_text(p) for p in np.asarray(request[PROMPT]).reshape(-1)]
            given = MAX_NEW_TOKENS in request  # an optional input: absent from the request if not sent
            new = int(np.asarray(request[MAX_NEW_TOKENS]).reshape(-1)[0]) if given else default_max_new_tokens
            texts = [generate_text(model, tokenizer, p, max_new_tokens=new, chat=chat) for p in prompts]
            answers.append({TEXT: np.array([t.encode("utf-8") for t in texts], dtype=np.object_)})
        return answers

    return infer


def bind_text_generation(triton, model, tokenizer, *, model_name: str = "smollm2",
                         default_max_new_tokens: int = 64, chat: bool = False, instances: int = 1) -> None:
    """Bind `model` (accelerated or not) to a running `triton` as a text-generation model.

    Triton batching is off: each request is generated alone, one prompt at a time, greedy. So an
    answer is exactly what ``model.generate()`` gives that prompt by itself (a padded batch is
    not bit-identical to it), and a bad request fails alone rather than every request batched
    with it. Requests queue in Triton; `instances` > 1 runs that many generations at once, each
    on its own thread (``generate()`` on an accelerated model is thread-safe), which only pays
    where the cores are not already busy with one.
    """
    from pytriton.model_config import ModelConfig, Tensor

    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    infer_funcs = [text_generation_infer(model, tokenizer, default_max_new_tokens=default_max_new_tokens,
                                         chat=chat) for _ in range(instances)]
    triton.bind(
        model_name=model_name,
        infer_func=infer_funcs if instances > 1 else infer_funcs[0],
        inputs=[Tensor(name=PROMPT, dtype=bytes, shape=(-1,)),
                Tensor(name=MAX_NEW_TOKENS, dtype=np.int32, shape=(1,), optional=True)],
        outputs=[Tensor(name=TEXT, dtype=bytes, shape=(-1,))],
        config=ModelConfig(batching=False),
        strict=True,
    )
