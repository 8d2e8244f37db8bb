"""What the GPU benchmarks share: interleaved timing, the copy-bandwidth ceiling, errors, tables.

Timing: triton.testing.do_bench (CUDA events, L2 flushed before every run, median), the
variants interleaved round by round, the median over rounds reported with its spread.
"""
from __future__ import annotations

import statistics
import time

import torch


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| in float64; NaN when y holds a non-finite value."""
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("nan")
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _host_clock(fn, warmup: int = 0, rep: int = 0, return_mode: str = "median") -> float:
    """One timed call, in ms: the CPU smoke runs of the benchmarks, where do_bench cannot run."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(fns: dict, rounds: int, rep_ms: int = 60) -> dict:
    """Median and spread (min, max over rounds) of each fn's per-round median time in ms."""
    for fn in fns.values():  # compile, tune and warm up outside the timed rounds
        fn()
    if torch.cuda.is_available():
        from triton.testing import do_bench
        torch.cuda.synchronize()
    else:
        do_bench = _host_clock
    times = {name: [] for name in fns}
    for i in range(rounds):
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]  # no fixed position
        for name, fn in order:
            times[name].append(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    return {name: dict(ms=statistics.median(t), lo=min(t), hi=max(t)) for name, t in times.items()}


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * (1 << 28) * 4 / ms / 1e6


def print_table(rows: list[dict], copy_gbps: float, baseline: str = "vs peer") -> None:
    """One line per variant; GB/s also as a fraction of the measured copy bandwidth."""
    print(f"{'op':<40} {'variant':<16} {'ms':>9} {'spread':>17} {baseline:>8} "
          f"{'GB/s':>11} {'TFLOP/s':>8} {'max rel err':>11}  config")
    for r in rows:
        gbps = f"{r['gbps']:.0f} ({r['gbps'] / copy_gbps:.0%})" if r.get("gbps") else ""
        tflops = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        spread = f"{r['lo']:.4f}-{r['hi']:.4f}"
        err = f"{r['err']:.2e}" if r.get("err") is not None else ""
        print(f"{r['op']:<40} {r['variant']:<16} {r['ms']:>9.4f} {spread:>17} {r['speedup']:>7.2f}x "
              f"{gbps:>11} {tflops:>8} {err:>11}  {r.get('config', '')}")


def gpu_ready() -> bool:
    """Whether a CUDA GPU and Triton are here; says why not otherwise."""
    if not torch.cuda.is_available():
        print("No CUDA GPU here: nothing to benchmark (the kernels' CPU tests run under the "
              "Triton interpreter instead).")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Triton is not installed: nothing to benchmark.")
        return False
    return True
