"""What every Triton kernel module shares: the optional import, launch-config timing, tile order.

Importing this works without Triton (TRITON_AVAILABLE is then False and `jit` returns the plain
function, never launched), so the torch references beside each kernel always import.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..errors import HardwareError

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; the launchers say what is missing
    triton = tl = None

TRITON_AVAILABLE = triton is not None
GROUP_M = 8  # GEMM tile order: 8 row-tiles share each weight tile while it is in L2


def jit(fn):
    """triton.jit where Triton is installed; without it the plain function, never launched."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn


def interpreted() -> bool:
    """Whether kernels defined in this process run on Triton's CPU interpreter (TRITON_INTERPRET=1
    when triton was first imported)."""
    return TRITON_AVAILABLE and not isinstance(_probe, triton.runtime.JITFunction)


@jit
def _probe(x):
    pass


@jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP_M row tiles at a time down each column
    of tiles, so that consecutive programs share weight tiles while they are in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    return pid_m, (pid % (GROUP_M * tiles_n)) // group_rows



@jit
def load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile, masked (zeros outside) only along the dims that need it: the full tiles of a
    main loop load with no predicate at all."""
    if MASK_ROWS and MASK_COLS:
        t = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        t = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        t = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        t = tl.load(ptrs)
    return t


# -- launch helpers ----------------------------------------------------------------------------

_BEST: dict = {}


def pick_config(key, candidates, launch, device: torch.device) -> dict:
    """The fastest of `candidates` for `key`, timed once per process (median, L2 flushed).

    Off the GPU (the interpreter) the first candidate is taken: timing it would mean nothing.
    A candidate the chip cannot run (too much shared memory, say) is skipped. Timing
    synchronizes, so make the first call for a shape outside CUDA-graph capture (a warm-up).
    """
    if key in _BEST:
        return _BEST[key]
    best, errors = candidates[0], []
    if len(candidates) > 1 and device.type == "cuda":
        from triton.testing import do_bench

        times = []
        for cfg in candidates:
            try:
                times.append(do_bench(lambda: launch(cfg), warmup=5, rep=25, return_mode="median"))
            except Exception as e:  # noqa: BLE001 - one unrunnable config must not stop the rest
                errors.append(e)
                times.append(math.inf)
        if all(math.isinf(t) for t in times):
            raise errors[0]
        best = candidates[times.index(min(times))]
    _BEST[key] = best
    return best


def require_triton(what: str, available: bool) -> None:
    """Raise a typed, actionable error when Triton could not be imported."""
    if not available:
        raise HardwareError(f"{what} needs Triton, which is not importable here. Install it "
                            "(pip install triton, Linux only) or call the torch reference instead.")


def on_device(x: torch.Tensor, kernel):
    """Launch on x's GPU (Triton launches on the current device). CPU tensors are only valid
    for a kernel defined under the interpreter (TRITON_INTERPRET=1 at its definition)."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if isinstance(kernel, triton.runtime.JITFunction):
        raise HardwareError(f"the Triton kernels need CUDA tensors; got a {x.device} tensor. Move "
                            "it to the GPU, or call the torch reference.")
    return contextlib.nullcontext()


def m_bucket(m: int, table: dict):
    """The key of the first table entry whose largest M covers m (None for the rest)."""
    for limit in table:
        if limit is not None and m <= limit:
            return limit
    return None




def runs_triton(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can take `x`: a CUDA tensor, or any tensor under the interpreter."""
    return TRITON_AVAILABLE and (x.is_cuda or interpreted())
