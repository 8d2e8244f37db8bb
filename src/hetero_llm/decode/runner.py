"""generate() with a static KV cache and a captured decode step, on the model instance.

`install` binds two methods on the model instance (its class is untouched):

- `generate`: when the call can take it (greedy or sampling, one sequence per prompt, no
  padding, no cache of the caller's), checks out a *session* (a transformers StaticCache sized
  for the call, and the decode step captured for it) and passes its cache to transformers'
  own generate(), which therefore runs unchanged: logits processors, stopping criteria,
  streamers all work. Other calls go to generate() as they are.
- `forward`: a call with a session's cache and one token per sequence runs the session's step
  (a CUDA-graph replay on the GPU); everything else, the prefill included, is the model's
  own forward.

Sessions are pooled per (batch size, cache length rounded up to CAPACITY_STEP), so the next
generate() of that shape reuses the cache and the graph: capture (the "warm-up") happens once
per shape, and `report()` says how long it took. A session serves one call at a time: threads
calling generate() at once get different sessions; up to MAX_IDLE_SESSIONS stay for later calls.
"""
from __future__ import annotations

import copy
import functools
import threading
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import HeteroLLMWarning
from ..integrations import hf_adapter as hf
from ..integrations.transformers import ArchitectureSpec
from .._modules import model_dtype
from .step import DecodeStep

MODES = ("cuda_graph", "static", "native")

CAPACITY_STEP = 256  # cache lengths are rounded up to this, so nearby lengths share a session
# Idle sessions kept between calls (each holds its cache and graph); the least recently used goes
# first. Calls at once each get a session however many there are: each needs a cache anyway.
MAX_IDLE_SESSIONS = 8


@functools.lru_cache(maxsize=None)
def _session_cache_class():
    class SessionCache(hf.static_cache_class()):
        """A StaticCache that transformers does not compile around: the session captures the
        decode step itself, and generate() then passes the plain 2-D mask (no per-step 4-D
        mask for a step that does not read it)."""

        @property
        def is_compileable(self) -> bool:
            return False

    return SessionCache


@dataclass
class Session:
    """One static cache and the decode step (captured or eager) that runs against it."""

    batch: int
    capacity: int
    cache: object
    device: torch.device
    dtype: torch.dtype
    step: DecodeStep | None = None
    captured: object = None  # graph.CapturedStep, once the first decode step ran
    graph_failed: str | None = None

    @property
    def prefilled(self) -> bool:
        return hf.layer_is_initialized(self.cache.layers[0])


@dataclass
class DecodeStats:
    warmup_s: list = field(default_factory=list)  # one entry per captured graph
    graphs: int = 0
    graph_steps: int = 0
    eager_steps: int = 0
    native_steps: int = 0  # decode="native": steps run by the compiled CPU layer loop
    sessions_created: int = 0
    fallbacks: dict = field(default_factory=dict)  # reason -> generate() calls left to transformers
    loops: dict = field(default_factory=dict)  # decode="native": calls per token loop (decode.greedy)


class DecodeRunner:
    """The sessions of one model and the choice between them and transformers' own path."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r} is not one of {MODES}")
        self.model, self.spec, self.mode = model, spec, mode
        self.use_graphs = mode == "cuda_graph"
        self.stats = DecodeStats()
        self._lock = threading.Lock()
        self._free: list[Session] = []  # most recently used last
        self._busy: dict[int, Session] = {}  # id(cache) -> session, while a generate() holds it

    def __deepcopy__(self, memo):
        # A copied model gets its own sessions (caches and graphs belong to the original's weights).
        return DecodeRunner(copy.deepcopy(self.model, memo), self.spec, self.mode)

    # -- sessions ----------------------------------------------------------------------------

    def checkout(self, batch: int, length: int) -> Session:
        """An idle session of this batch size whose cache holds `length` tokens, or a new one."""
        weight = next(self.model.parameters())
        with self._lock:
            self._free = [s for s in self._free if (s.device, s.dtype) == (weight.device, weight.dtype)]
            fits = [s for s in self._free if s.batch == batch and s.capacity >= length]
            if fits:
                session = min(fits, key=lambda s: s.capacity)
                self._free.remove(session)
            else:
                capacity = -(-length // CAPACITY_STEP) * CAPACITY_STEP
                cache = hf.new_static_cache(_session_cache_class(), self.model.config, capacity)
                session = Session(batch, capacity, cache, weight.device, weight.dtype)
                self.stats.sessions_created += 1
            self._busy[id(session.cache)] = session
        session.cache.reset()
        return session

    def release(self, session: Session, keep: bool = True) -> None:
        """Back to the pool; `keep=False` when the caller now holds its cache (it is not reused)."""
        with self._lock:
            self._busy.pop(id(session.cache), None)
            if keep:
                self._free.append(session)
            del self._free[:-MAX_IDLE_SESSIONS]  # the least recently used caches and graphs are freed

    def session_of(self, cache) -> Session | None:
        session = self._busy.get(id(cache))
        return session if session is not None and session.cache is cache else None

    def clear(self) -> None:
        """Free every idle cache and graph (their GPU memory goes back to torch's allocator)."""
        with self._lock:
            self._free.clear()

    # -- one decode step ----------------------------------------------------------------------

    def decode(self, session: Session, input_ids: torch.Tensor) -> torch.Tensor:
        if session.step is None:
            session.step = self._new_step(session)
        session.step.ids.copy_(input_ids)
        if session.captured is not None:
            self._count("graph_steps")
            return session.captured.replay()
        if self.use_graphs and session.graph_failed is None and session.device.type == "cuda":
            return self._capture(session)
        self._count("native_steps" if self.mode == "native" else "eager_steps")
        return session.step()

    def _new_step(self, session: Session) -> DecodeStep:
        if self.mode != "native":
            return DecodeStep(self.model, self.spec, session.cache, session.batch)
        from .native import NativeStep

        return NativeStep(self.model, self.spec, session.cache, session.batch)

    def _count(self, what: str) -> None:
        with self._lock:  # threads decode at once
            setattr(self.stats, what, getattr(self.stats, what) + 1)

    def _capture(self, session: Session) -> torch.Tensor:
        from .graph import CapturedStep

        captured = CapturedStep(session.step)
        logits = captured.first()  # this token's logits, from the eager step
        if captured.graph is None:
            session.graph_failed = captured.error
            warnings.warn(f"hetero_llm could not capture the decode step as a CUDA graph ({captured.error}); "
                          "this cache shape decodes without one (slower, same results).", HeteroLLMWarning,
                          stacklevel=4)
            self._count("eager_steps")
            return logits
        session.captured = captured
        with self._lock:
            self.stats.graphs += 1
            self.stats.warmup_s.append(captured.warmup_s)
        return logits

    def report(self) -> dict:
        s = self.stats
        with self._lock:
            idle = [(x.batch, x.capacity) for x in self._free]
        warmup = list(s.warmup_s)
        if self.mode == "native":  # the compiled step's warm-up: building it (first time) or loading it
            from ..kernels import cpu_decode
            warmup = [round(cpu_decode.build_seconds(), 2)]
        return dict(mode=self.mode, graphs=s.graphs, warmup_s=warmup, graph_steps=s.graph_steps,
                    eager_steps=s.eager_steps, native_steps=s.native_steps,
                    sessions_created=s.sessions_created, idle_sessions=idle, fallbacks=dict(s.fallbacks),
                    loops=dict(s.loops))

    def note_loop(self, problem: str | None) -> None:
        """Count a session call by the loop that runs it: hetero_llm's greedy loop, or transformers'."""
        key = "hetero_llm greedy" if problem is None else f"transformers ({problem})"
        with self._lock:
            self.stats.loops[key] = self.stats.loops.get(key, 0) + 1

    def note_fallback(self, reason: str) -> None:
        with self._lock:
            self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1


# -- the methods bound on the model ------------------------------------------------------------

def _decode_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, use_cache=None, logits_to_keep=None, **kwargs):
    # `logits_to_keep` is named so that callers that read the signature (transformers' generate(), which
    # then computes the prompt's logits for its last position only) see that the model takes it.
    runner: DecodeRunner = self.hetero_decode
    if logits_to_keep is not None:
        kwargs["logits_to_keep"] = logits_to_keep
    cache = hf.take_cache(kwargs, past_key_values)  # `cache=` from transformers >= 5.25
    session = runner.session_of(cache) if cache is not None else None
    if (session is not None and inputs_embeds is None and input_ids is not None and session.prefilled
            and tuple(input_ids.shape) == (session.batch, 1) and not kwargs.get("output_attentions")
            and not kwargs.get("output_hidden_states") and kwargs.get("labels") is None):
        return hf.causal_lm_output(runner.decode(session, input_ids), cache)
    if cache is not None:
        kwargs[hf.cache_argument(self)] = cache
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


def _decode_generate(self, inputs=None, generation_config=None, *args, **kwargs):
    """transformers' generate() (same arguments, same results), with hetero_llm's decode step
    for the calls it can take: see hetero_llm.decode.runner and docs/decode.md."""
    runner: DecodeRunner = self.hetero_decode
    plain = type(self).generate
    if args:  # logits_processor and the rest given by position: transformers' own path
        runner.note_fallback("arguments after generation_config given by position")
        return plain(self, inputs, generation_config, *args, **kwargs)
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    config = call_settings(self, generation_config, kwargs)
    why, length = why_not_session(self, input_ids, config, kwargs)
    if why is None and runner.mode == "native":
        why = native_now_problem(self, input_ids.shape[0])
    if why:
        runner.note_fallback(why)
        return plain(self, inputs, generation_config=generation_config, **kwargs)
    loop_problem = None
    if runner.mode == "native":  # the CPU step is fast enough that transformers' loop shows: skip it
        from .greedy import greedy_problem

        loop_problem = greedy_problem(config, kwargs, input_ids.shape[1])
        runner.note_loop(loop_problem)
    session = runner.checkout(input_ids.shape[0], length)
    keep = True
    if runner.mode == "native" and loop_problem is None:
        from .greedy import greedy_generate

        try:
            return greedy_generate(self, runner, session, input_ids, config, kwargs.get("streamer"))
        except BaseException:
            keep = False  # the cache may hold a half-written step
            raise
        finally:
            runner.release(session, keep)
    kwargs[hf.cache_argument(self)] = session.cache
    try:
        out = plain(self, inputs, generation_config=generation_config, **kwargs)
        keep = hf.output_cache(out) is not session.cache  # returned: the caller owns it now
        return out
    except BaseException:
        keep = False  # the cache may hold a half-written step
        raise
    finally:
        runner.release(session, keep)


def call_settings(model: nn.Module, generation_config, kwargs: dict):
    """The call's generation config: the one given (else the model's), updated by the call's
    keyword arguments, as transformers' generate() reads them. A copy: the caller's is kept."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    return config


def why_not_session(model: nn.Module, input_ids, config, kwargs: dict) -> tuple[str | None, int]:
    """(reason this generate() call goes to transformers unchanged, or None; cache length it needs).
    `config`: the call's settings (call_settings)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        return "inputs are not a (batch, length) tensor of token ids", 0
    for name in (*hf.CACHE_ARGUMENTS, "inputs_embeds", "assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(name) is not None:
            return f"{name} given", 0
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return "beam search or several sequences per prompt", 0
    if config.cache_implementation is not None or config.use_cache is False:
        return "a cache implementation chosen by the caller", 0
    if input_ids.device != next(model.parameters()).device:
        return "inputs on another device than the model", 0
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "padding (a batch of prompts of different lengths)", 0
    # Without a mask transformers reads pad tokens in the prompt as padding, unless the pad
    # token is also the end-of-sequence token (chat templates put it inside prompts).
    pad, eos = config.pad_token_id, config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if mask is None and pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return "padding (a batch of prompts of different lengths)", 0
    # max_length counts the prompt, but transformers reads an unset one as 20 *new* tokens:
    # input + max_length covers both (a longer cache costs memory, never time).
    new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20)
    return None, input_ids.shape[1] + max(int(new), 1)


def native_now_problem(model: nn.Module, batch: int) -> str | None:
    """What keeps the native step from this call although it was installed: more sequences than it
    decodes at once, or the model cast or moved since."""
    from ..kernels.cpu_decode import MAX_ROWS

    if batch > MAX_ROWS:
        return f"a batch of {batch} sequences (the native CPU step decodes up to {MAX_ROWS} at once)"
    dtype = model_dtype(model)
    if dtype != torch.float32:
        return f"the model was cast to {str(dtype).replace('torch.', '')} after accelerate() (the native step is fp32)"
    if next(model.parameters()).device.type != "cpu":
        return "the model was moved off the CPU after accelerate()"
    return None


def install(model: nn.Module, spec: ArchitectureSpec, mode: str) -> DecodeRunner:
    """Bind the session-aware generate() and forward() on this model instance."""
    runner = DecodeRunner(model, spec, mode)
    model.hetero_decode = runner
    model.forward = types.MethodType(_decode_forward, model)
    model.generate = types.MethodType(_decode_generate, model)
    return runner


def uninstall(model: nn.Module) -> None:
    for name in ("forward", "generate", "hetero_decode"):
        model.__dict__.pop(name, None)
