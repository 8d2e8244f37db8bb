"""A decode step captured once as a CUDA graph and replayed for every later token.

A decode step of a small batch is hundreds of small kernels: launched one by one from Python,
the GPU waits for the host between them. Replaying a graph launches them all at once.

The capture follows torch's rules (torch.cuda.graphs): the first step runs eagerly on the
capture stream (Triton picks its launch configurations then, cuBLAS sets up its workspace,
and the result is the real first token), then the same step is captured, which runs nothing.
Captures are serialized by a lock, and "thread_local" capture lets other threads keep using
the GPU meanwhile (one model serving several threads).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

_CAPTURE_LOCK = threading.Lock()


class CapturedStep:
    """`step()` (a function of fixed buffers returning a tensor) as a CUDA graph.

    `first()` runs the step eagerly and captures it; `replay()` runs the captured graph and
    returns a copy of its output (the graph's own output buffer is overwritten by the next
    replay). `warmup_s` is the time `first()` took, eager step included.
    """

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.error: str | None = None
        self.warmup_s = 0.0

    def first(self) -> torch.Tensor:
        """The eager step's result; the graph is in `self.graph`, or None with `self.error` when
        capturing failed (the result is right either way: the capture itself runs nothing)."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with _CAPTURE_LOCK:
            with torch.cuda.stream(stream):
                result = self.step()
            torch.cuda.current_stream().wait_stream(stream)
            result.record_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    output = self.step()
            except Exception as e:  # noqa: BLE001 - whatever stops a capture, the eager step still works
                self.error = f"{type(e).__name__}: {e}"
            else:
                self.graph, self.output = graph, output
        torch.cuda.synchronize()
        self.warmup_s = time.perf_counter() - start
        return result

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output.clone()
