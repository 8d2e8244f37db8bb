"""linear_add: y = x·Wᵀ + bias + residual, the adds in the GEMM's epilogue.

Without CUDA the Triton kernel runs on CPU under the interpreter (see triton_helpers), in fp32
and fp16; bf16 is checked on the GPU only. The AOT tests compile every configuration for sm_80
and sm_90 and check shared memory and the tensor-core instructions.

Accuracy rule (from the issue): the max abs error against a float64 reference is at most twice
that of the same-dtype torch ops a model runs today (addmm, then + residual). In fp16/bf16 the
output rounding dominates both, so the rule holds per call. In fp32 the max of a few hundred
outputs is a draw of one- or two-ulp events, so fp32 errors are pooled over a test's calls.
Odd shapes are also checked exactly, with integer data whose sums every order gets right.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (AOT_ARCHS, DEVICE, KERNELS_RUN_HERE, SMEM_BYTES, TRITON, aot_compile,
                            aot_spec, assert_works_without_triton, check_accuracy_rule, gpu,
                            needs_cuda, ptx_loops, run_file_in_fresh_process, runs_kernels, uses_mma,
                            uses_wgmma)
# isort: on
import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hetero_llm.errors import InvalidOptionError

LA = importlib.import_module("hetero_llm.kernels.linear_add")
# Every distinct launch configuration, named by its first place in the table ("bucket-index");
# a config listed in two buckets (64x128 tiles, say) is the same kernel, tested once.
CONFIGS, BUCKET = {}, {}
for _m, _cfgs in LA.LINEAR_ADD_CONFIGS.items():
    for _i, _cfg in enumerate(_cfgs):
        if _cfg not in CONFIGS.values():
            CONFIGS[f"{_m}-{_i}"], BUCKET[f"{_m}-{_i}"] = _cfg, _m
CPU_DTYPES = (torch.float32, torch.float16)
TERMS = {"plain": (False, False), "bias": (True, False), "residual": (False, True), "both": (True, True)}
ODD_M = (1, 3, 17, 130)
ODD_NK = ((77, 100), (257, 77), (100, 257))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def on(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def problem(lead, n, k, dtype, bias=True, residual=True, seed=0, ints=False):
    """x (*lead, k), weight (n, k), bias (n,), residual (*lead, n): normal data scaled so y is
    O(1), or small integers whose every partial sum is exact in fp16 (|y| < 2048)."""
    g = gen(seed)
    if ints:
        draw = lambda *s, hi: torch.randint(-hi, hi + 1, s, generator=g).to(dtype)  # noqa: E731
        return (draw(*lead, k, hi=2), draw(n, k, hi=2), draw(n, hi=8) if bias else None,
                draw(*lead, n, hi=8) if residual else None)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(*lead, n, generator=g).to(dtype) if residual else None
    return x, w, b, r


def truth(x, w, b, r):
    """float64, unrounded."""
    return LA.linear_add_ref(*(t.double() if t is not None else None for t in (x, w, b, r)))


def torch_op(x, w, b, r):
    """What a model runs today, in x's dtype: addmm (or matmul), then the residual add."""
    x2 = x.reshape(-1, x.shape[-1])
    y = (torch.addmm(b, x2, w.T) if b is not None else x2 @ w.T).reshape(*x.shape[:-1], -1)
    return y + r if r is not None else y


def check_rule(dtype, calls):
    """calls: (y, x, w, b, r) tuples; the rule per call in 16-bit, pooled in fp32."""
    check_accuracy_rule(dtype, ((y, torch_op(x, w, b, r), truth(x, w, b, r)) for y, x, w, b, r in calls))


# -- the kernel under the interpreter (or on the GPU) -------------------------------------------

@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_odd_shapes_are_exact(dtype):
    """Every M bucket's default config on partial tiles in M, N and K, 2-D and 3-D x; the four
    epilogues (bias and residual, with and without) take turns over the shapes."""
    shapes = [((m,), n, k) for m in ODD_M for n, k in ODD_NK] + [((2, 9), 77, 100)]
    for i, (lead, n, k) in enumerate(shapes):
        bias, residual = list(TERMS.values())[i % len(TERMS)]
        x, w, b, r = problem(lead, n, k, dtype, bias, residual, seed=i, ints=True)
        got = LA.linear_add_triton(*on(x, w, b, r)).cpu()
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert torch.equal(got, LA.linear_add_ref(x, w, b, r)), (lead, n, k, bias, residual)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_strided_operands_are_read_in_place(dtype):
    """Weight and x as views with non-unit strides (a transposed weight, a column slice of x)."""
    x, w, b, r = problem((17,), 77, 100, dtype, ints=True)
    xd, wd, bd, rd = on(x, w, b, r)  # the views are made on the device: .to() would pack them
    w_t = wd.T.contiguous().T  # (N, K) with strides (1, N): the (K, N) buffer, never copied
    x_view = torch.cat([xd, xd, xd], 1)[:, 100:200]  # row stride 300
    r_view = torch.cat([rd, rd], 1)[:, 77:]  # row stride 154
    assert w_t.stride() == (1, 77) and x_view.stride() == (300, 1)
    got = LA.linear_add_triton(x_view, w_t, bd, r_view).cpu()
    assert torch.equal(got, LA.linear_add_ref(x, w, b, r))


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_random_data_accuracy(dtype):
    calls = []
    shapes = [((m,), n, k) for m in ODD_M for n, k in ODD_NK] + [((2, 9), 257, 100)]
    for i, (lead, n, k) in enumerate(shapes):
        x, w, b, r = problem(lead, n, k, dtype, seed=10 + i)
        calls.append((LA.linear_add_triton(*on(x, w, b, r)).cpu(), x, w, b, r))
    check_rule(dtype, calls)


@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config(name, dtype):
    """Each config forced: two row and two column tiles, the second partial, K ragged (the
    masked loop) with bias and residual; then one partial tile with K a multiple of the tile
    (the unmasked loop) and a residual."""
    cfg = CONFIGS[name]
    bk = LA._block_k(cfg, dtype)
    shapes = (((cfg["BLOCK_M"] + 3,), cfg["BLOCK_N"] + 13, 2 * bk + 5, True),
              ((1, 3), 13, 2 * bk, False))
    calls = []
    for i, (lead, n, k, bias) in enumerate(shapes):
        x, w, b, r = problem(lead, n, k, dtype, bias=bias, seed=20 + i)
        got = LA.linear_add_triton(*on(x, w, b, r), config=cfg).cpu()
        assert got.shape == (*lead, n)
        calls.append((got, x, w, b, r))
    check_rule(dtype, calls)


# -- the torch path, the dispatcher and bad inputs -----------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("terms", TERMS)
def test_torch_path(dtype, terms):
    bias, residual = TERMS[terms]
    calls = []
    for i, (lead, n, k) in enumerate([((1,), 77, 100), ((3, 17), 257, 77), ((130,), 100, 257)]):
        x, w, b, r = problem(lead, n, k, dtype, bias, residual, seed=30 + i)
        got = LA.linear_add_torch(x, w, b, r)
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert torch.equal(LA.linear_add(x, w, b, r), got)  # CPU: the dispatcher's path
        xi, wi, bi, ri = problem(lead, n, k, dtype, bias, residual, seed=i, ints=True)
        assert torch.equal(LA.linear_add_torch(xi, wi, bi, ri), LA.linear_add_ref(xi, wi, bi, ri))
        calls.append((got, x, w, b, r))
    check_rule(dtype, calls)


def test_torch_path_keeps_autograd_and_empty_shapes():
    x, w, b, r = problem((4,), 6, 5, torch.float32)
    w.requires_grad_(True)
    LA.linear_add(x, w, b, r).sum().backward()
    assert w.grad is not None
    assert LA.linear_add(torch.zeros(0, 5), w.detach(), b, torch.zeros(0, 6)).shape == (0, 6)
    torch.testing.assert_close(LA.linear_add(torch.zeros(2, 0), torch.zeros(6, 0), b, r[:2]), r[:2] + b)


def _bad_calls():
    x, w, b, r = problem((3,), 6, 5, torch.float32)
    return {
        "transposed weight": lambda: (x, w.T, None, None),
        "K mismatch": lambda: (x[:, :4], w, None, None),
        "3-D weight": lambda: (x, w[None], None, None),
        "bias shape": lambda: (x, w, b[:5], None),
        "residual shape": lambda: (x, w, None, r.T),
        "weight dtype": lambda: (x, w.half(), None, None),
        "bias dtype": lambda: (x, w, b.double(), None),
        "residual dtype": lambda: (x, w, None, r.half()),
        "integer x": lambda: (x.int(), w.int(), None, None),
        "residual device": lambda: (x, w, None, r.to("meta")),
        "not a tensor": lambda: (x, w, [0.0] * 6, None),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_inputs_are_refused(case):
    args = _bad_calls()[case]()
    for fn in (LA.linear_add, LA.linear_add_torch, LA.linear_add_ref):
        with pytest.raises(InvalidOptionError, match="linear_add"):
            fn(*args)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_triton_launcher_refuses_other_dtypes():
    x, w, _, _ = problem((3,), 6, 5, torch.float64)
    with pytest.raises(InvalidOptionError, match="linear_add_torch"):
        LA.linear_add_triton(x, w)


def test_imports_and_torch_path_work_without_triton():
    assert_works_without_triton(
        "import importlib; LA = importlib.import_module('hetero_llm.kernels.linear_add')\n"
        "assert not LA.TRITON_AVAILABLE\n"
        "x, w, r = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 4)\n"
        "torch.testing.assert_close(LA.linear_add(x, w, None, r), x @ w.T + r)\n",
        "LA.linear_add_triton(x, w)")


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for sm_80 and sm_90 (no GPU needed) ------------------------------

AOT_M = {16: 16, 64: 64, 256: 256, None: 4096}  # the largest M of each bucket


def _spec(name, arch, dtype=torch.bfloat16, bias=True, residual=True, n=4096, k=4096):
    """The launcher's own call for an LLM shape (o_proj: N = K = 4096), on meta tensors."""
    cfg, m = CONFIGS[name], AOT_M[BUCKET[name]]
    meta = dict(device="meta", dtype=dtype)
    x, w = torch.empty(m, k, **meta), torch.empty(n, k, **meta)
    b = torch.empty(n, **meta) if bias else None
    r = torch.empty(m, n, **meta) if residual else None
    return aot_spec("linear_add", LA._linear_add_call(x, w, b, r, torch.empty(m, n, **meta), cfg), arch)


AOT = {f"{name}-bf16-sm{arch}": (name, arch, {}) for name in CONFIGS for arch in AOT_ARCHS}
AOT.update({  # the other dtypes and epilogues, on the largest (None-2) and smallest tiles
    "None-2-fp16-plain-sm90": ("None-2", 90, dict(dtype=torch.float16, bias=False, residual=False)),
    "16-0-fp16-residual-sm80": ("16-0", 80, dict(dtype=torch.float16, bias=False, k=14336)),
    "64-1-bf16-bias-sm90": ("64-1", 90, dict(residual=False)),
    "None-2-fp32-sm80": ("None-2", 80, dict(dtype=torch.float32)),
})


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    specs = {label: _spec(name, arch, **kw) for label, (name, arch, kw) in AOT.items()}
    labels = list(specs)
    halves = [labels[::2], labels[1::2]]  # two compiler processes: the work is CPU-bound
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda part: aot_compile([specs[lb] for lb in part]), halves)
        return {lb: r for part, results in zip(halves, done) for lb, r in zip(part, results)}


@pytest.mark.parametrize("label", AOT)
def test_aot_fits_and_uses_tensor_cores(compiled, label):
    r = compiled[label]
    name, arch, kw = AOT[label]
    cfg, dtype = CONFIGS[name], kw.get("dtype", torch.bfloat16)
    assert 0 < r["shared"] <= SMEM_BYTES[arch], f"{label}: {r['shared']} bytes of shared memory"
    assert r["num_warps"] == cfg["num_warps"]
    loop = max(ptx_loops(r["ptx"]), key=len)  # the K loop
    assert [ln for ln in loop if "cp.async" in ln], "the operand loads are not pipelined"
    if dtype == torch.float32:  # ieee fp32: FMAs, never TF32 tensor cores
        assert not uses_mma(r["ptx"]) and [ln for ln in loop if "fma.rn.f32" in ln]
        return
    assert uses_mma(r["ptx"]), label
    # Triton emits Hopper's warpgroup MMA for tiles of 64 rows and up on sm_90 (a warpgroup
    # per 64 rows); 16- and 32-row tiles, and every sm_80 build, use the warp-level mma.sync.
    assert uses_wgmma(r["ptx"]) == (arch == 90 and cfg["BLOCK_M"] >= 64), label


# -- on a GPU: bf16 and LLM shapes ------------------------------------------------------------

LLM_NK = {"o_proj": (4096, 4096), "down_proj": (4096, 14336)}


def _gpu_problem(lead, n, k, dtype, seed=0):
    return on(*problem(lead, n, k, dtype, seed=seed))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("m", (1, 16, 512, 2048))
@pytest.mark.parametrize("proj", LLM_NK)
def test_gpu_llm_shapes(dtype, m, proj):
    x, w, b, r = _gpu_problem((m,), *LLM_NK[proj], dtype, seed=m)
    got = LA.linear_add(x, w, b, r)
    assert torch.equal(got, LA.linear_add_triton(x, w, b, r))  # CUDA dispatches to Triton
    check_rule(dtype, [(got, x, w, b, r)])


@gpu
@needs_cuda
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_every_config(name):
    cfg, m = CONFIGS[name], {16: 13, 64: 50, 256: 200, None: 1000}[BUCKET[name]]
    x, w, b, r = _gpu_problem((m,), 4096, 4096, torch.bfloat16, seed=3)
    check_rule(torch.bfloat16, [(LA.linear_add_triton(x, w, b, r, config=cfg), x, w, b, r)])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("terms", TERMS)
def test_gpu_odd_shapes(dtype, terms):
    bias, residual = TERMS[terms]
    calls = []
    for i, (lead, n, k) in enumerate([((m,), n, k) for m in ODD_M for n, k in ODD_NK]):
        x, w, b, r = on(*problem(lead, n, k, dtype, bias, residual, seed=i))
        calls.append((LA.linear_add_triton(x, w, b, r), x, w, b, r))
    check_rule(dtype, calls)
