"""INT8 linear kernels on the GPU against bf16 cuBLAS, measured in the same run.

    python benchmarks/gpu_int8_linear.py [--json results.json] [--rounds 5]

Rows:
- W8A16 GEMV, batch 1, (N, K) in (4096, 4096) and (14336, 4096): int8_linear_triton (tuned,
  and each decode configuration forced) vs torch.nn.functional.linear with a bf16 weight.
  Bandwidth-bound: GB/s counts every byte read and written once; compare with the device's
  measured copy bandwidth printed first.
- W8A8 GEMM at M = 4096: int8_gemm_triton on pre-quantized activations, and w8a8_linear_triton
  including the per-token quantization, vs bf16 cuBLAS. TFLOP/s = 2 M N K / time.
- W8A16 GEMM at M = 512, for information.

Timing: triton.testing.do_bench (CUDA events, L2 flushed before every run, median), the
variants interleaved round by round, the median over rounds reported with its spread. Errors:
max |y - ref| / max |ref| against the fp32 torch reference, on fresh random data.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from gpu_common import copy_bandwidth, gpu_ready, interleaved, print_table, rel_err

GEMV_SHAPES = [(4096, 4096), (14336, 4096)]


def weights(n: int, k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8)
    scale = torch.rand(n, generator=g, device="cuda") * 2e-3 + 1e-4
    return q, scale, (q.float() * scale[:, None]).to(torch.bfloat16)


def bench_gemv(n: int, k: int, rounds: int) -> list[dict]:
    from hetero_llm.kernels import int8_linear as L

    q, scale, w16 = weights(n, k, seed=n)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = L.int8_linear_ref(x.float(), q, scale)
    fns = {"cublas-bf16": lambda: F.linear(x, w16), "int8-tuned": lambda: L.int8_linear_triton(x, q, scale)}
    for i, cfg in enumerate(L.W8A16_CONFIGS[4]):
        fns[f"int8-cfg{i}"] = lambda cfg=cfg: L.int8_linear_triton(x, q, scale, config=cfg)
    t = interleaved(fns, rounds)
    base = t["cublas-bf16"]["ms"]
    rows = []
    for name, r in t.items():
        out = fns[name]()
        wbytes = n * k * (2 if name.startswith("cublas") else 1) + (0 if name.startswith("cublas") else 4 * n)
        nbytes = wbytes + 2 * k + 2 * n
        rows.append(dict(op=f"GEMV M=1 N={n} K={k}", variant=name, **r, speedup=base / r["ms"],
                         gbps=nbytes / r["ms"] / 1e6, err=rel_err(out, ref),
                         config=_picked(L, n, k) if name == "int8-tuned" else ""))
    return rows


def _picked(L, n: int, k: int) -> str:
    """The decode configuration the launcher's timing chose (its key: see int8_linear_triton)."""
    from hetero_llm.kernels import triton_utils as U

    cfg = U._BEST.get(("w8a16", 4, n, k, torch.bfloat16, 0, False, False))
    return f"cfg{L.W8A16_CONFIGS[4].index(cfg)}" if cfg in L.W8A16_CONFIGS[4] else "?"


def bench_w8a8(n: int, k: int, m: int, rounds: int) -> list[dict]:
    from hetero_llm.kernels import int8_gemm as G

    q, scale, w16 = weights(n, k, seed=n + 1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = G.quantize_per_token_triton(x)
    ref = G.w8a8_linear_ref(x.float(), q, scale)
    fns = {"cublas-bf16": lambda: F.linear(x, w16),
           "int8-gemm": lambda: G.int8_gemm_triton(xq, xs, q, scale, out_dtype=torch.bfloat16),
           "w8a8-linear": lambda: G.w8a8_linear_triton(x, q, scale),
           "quantize": lambda: G.quantize_per_token_triton(x)}
    t = interleaved(fns, rounds)
    base = t["cublas-bf16"]["ms"]
    rows = []
    for name, r in t.items():
        out = fns[name]()
        err = rel_err(out, ref) if name != "quantize" else float(
            (out[0].cpu() != G.quantize_per_token_ref(x)[0].cpu()).sum())  # mismatched int8 codes
        flops = 2 * m * n * k if name != "quantize" else 0
        rows.append(dict(op=f"W8A8 M={m} N={n} K={k}", variant=name, **r, speedup=base / r["ms"],
                         tflops=flops / r["ms"] / 1e9, err=err))
    return rows


def bench_w8a16_gemm(n: int, k: int, m: int, rounds: int) -> list[dict]:
    from hetero_llm.kernels import int8_linear as L

    q, scale, w16 = weights(n, k, seed=n + 2)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = L.int8_linear_ref(x.float(), q, scale)
    fns = {"cublas-bf16": lambda: F.linear(x, w16), "int8-w8a16": lambda: L.int8_linear_triton(x, q, scale)}
    t = interleaved(fns, rounds)
    base = t["cublas-bf16"]["ms"]
    return [dict(op=f"W8A16 GEMM M={m} N={n} K={k}", variant=name, **r, speedup=base / r["ms"],
                 tflops=2 * m * n * k / r["ms"] / 1e9, err=rel_err(fns[name](), ref))
            for name, r in t.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    if not gpu_ready():
        return 0
    import triton
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"{device}; measured copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for n, k in GEMV_SHAPES:
        rows += bench_gemv(n, k, args.rounds)
    for n, k in GEMV_SHAPES:
        rows += bench_w8a8(n, k, 4096, args.rounds)
    rows += bench_w8a16_gemm(4096, 4096, 512, args.rounds)
    print_table(rows, bandwidth, baseline="vs bf16")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_gbps=bandwidth, torch=torch.__version__,
                           triton=triton.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
