"""RMSNorm (+ residual add) in one Triton kernel, and the `rms_norm` dispatcher around it.

Without CUDA the kernel runs on CPU under the interpreter (see triton_helpers), in fp32 and
fp16; bf16 is checked on the GPU only. The AOT tests compile representative launches for sm_80
and sm_90.

Accuracy rule (from the issue): the max abs error against a float64 reference is at most twice
that of the same-dtype transformers-style torch ops (x + residual, then Llama's rms_norm_ref,
or Gemma's fp32 form for offset 1). In 16-bit the output rounding dominates, so the rule holds
per call; in fp32 the max of a few rows is a draw of one- or two-ulp events, so fp32 errors are
pooled over a test's calls.
"""
from __future__ import annotations

# isort: off
# triton_helpers first: it enables the interpreter, which must happen before triton is imported.
from triton_helpers import (AOT_ARCHS, DEVICE, KERNELS_RUN_HERE, SMEM_BYTES, TRITON, aot_compile,
                            aot_spec, assert_works_without_triton, check_accuracy_rule, gpu,
                            needs_cuda, ptx_lines, run_file_in_fresh_process, runs_kernels)
# isort: on
import importlib

import pytest
import torch
import torch.nn.functional as F

from hetero_llm.errors import InvalidOptionError

RN = importlib.import_module("hetero_llm.kernels.rms_norm")
EPS = 1e-6
CPU_DTYPES = (torch.float32, torch.float16)
ROWS = (1, 2, 7, 33)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def problem(rows, hidden, dtype, offset=0.0, residual=True, seed=0):
    """x, residual (or None) and a weight around 1 (Llama) or around 0 (Gemma's offset 1)."""
    g = gen(seed)
    lead = rows if isinstance(rows, tuple) else (rows,)
    x = (torch.randn(*lead, hidden, generator=g) * 2).to(dtype)
    r = torch.randn(*lead, hidden, generator=g).to(dtype) if residual else None
    w = (torch.randn(hidden, generator=g) * 0.5 + (1.0 - offset)).to(dtype)
    return x, r, w


def truth(s, w, offset):
    """float64, unrounded: the norm of the stored residual stream s."""
    h = s.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * (offset + w.double())


def torch_ops(x, r, w, offset):
    """transformers' ops in x's dtype: (y, s)."""
    return RN.rms_norm_residual_ref(x, r if r is not None else torch.zeros_like(x), w, EPS, offset)


def check_rule(dtype, calls):
    """calls: (y, s, x, r, w, offset) tuples; the rule per call in 16-bit, pooled in fp32, on CPU."""
    def measured(y, s, x, r, w, offset):
        ty, _ = torch_ops(x.cpu(), None if r is None else r.cpu(), w.cpu(), offset)
        return y.cpu(), ty, truth(s.cpu(), w.cpu(), offset)

    check_accuracy_rule(dtype, (measured(*call) for call in calls))


def run_kernel(x, r, w, offset):
    """(y, s) from the Triton launcher; s is x itself without a residual."""
    args = [t.to(DEVICE) if t is not None else None for t in (x, w, r)]
    out = RN.rms_norm_triton(args[0], args[1], EPS, residual=args[2], offset=offset)
    return out if r is not None else (out, args[0])


# -- the kernel under the interpreter (or on the GPU) -------------------------------------------

@runs_kernels
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("hidden", (77, 576, 1000))
@pytest.mark.parametrize("offset", (0.0, 1.0))
@pytest.mark.parametrize("residual", (False, True), ids=("norm", "add+norm"))
def test_kernel_accuracy(dtype, hidden, offset, residual):
    calls = []
    for rows in ROWS:  # 1 to 33 rows: one per program, or packed 2-16 per program
        x, r, w = problem(rows, hidden, dtype, offset, residual, seed=rows)
        y, s = run_kernel(x, r, w, offset)
        assert y.shape == x.shape and y.dtype == dtype and s.dtype == dtype
        if residual:
            assert torch.equal(s.cpu(), x + r)  # one rounding, as torch's add: bitwise
        calls.append((y, s, x, r, w, offset))
    check_rule(dtype, calls)


@runs_kernels
@pytest.mark.parametrize("hidden", (1, 16, 4096, 16384))
def test_row_sizes_and_leading_dims(hidden):
    """Powers of two up to the register limit, one-element rows, 3-D x, strided rows."""
    x, r, w = problem((2, 3), hidden, torch.float16, seed=hidden)
    y, s = run_kernel(x, r, w, 0.0)
    assert y.shape == s.shape == (2, 3, hidden)
    check_rule(torch.float16, [(y, s, x, r, w, 0.0)])
    wide = torch.cat([x, x], -1)[..., hidden:]  # rows with stride 2 * hidden
    assert torch.equal(run_kernel(wide, None, w, 0.0)[0].cpu(), run_kernel(x, None, w, 0.0)[0].cpu())


@runs_kernels
def test_mixed_dtypes_and_empty_inputs():
    x, r, w = problem(5, 40, torch.float16)
    y, s = RN.rms_norm_triton(*[t.to(DEVICE) for t in (x, w.float())], EPS, residual=r.to(DEVICE))
    assert y.dtype == torch.float32 and s.dtype == torch.float16  # as torch's promotion
    check_rule(torch.float16, [(y, s, x, r, w.float(), 0.0)])
    e = torch.zeros(0, 40, dtype=torch.float16, device=DEVICE)
    y, s = RN.rms_norm_triton(e, w.to(DEVICE), EPS, residual=e)
    assert y.shape == s.shape == (0, 40)


# -- the dispatcher and the torch path ---------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("hidden", (7, 48, 1000))
def test_rms_norm_without_residual_is_unchanged_on_cpu(dtype, hidden):
    """Bitwise today's code path: torch's F.rms_norm for fp32, Llama's ops otherwise."""
    x, _, w = problem((3, 5), hidden, dtype, residual=False)
    got = RN.rms_norm(x, w, EPS)
    before = F.rms_norm(x, (hidden,), w, EPS) if dtype == torch.float32 else RN.rms_norm_ref(x, w, EPS)
    assert isinstance(got, torch.Tensor) and got.dtype == before.dtype
    assert torch.equal(got, before)
    mixed = RN.rms_norm(x, w.float(), EPS)  # Gemma's module passes an fp32 weight
    assert torch.equal(mixed, F.rms_norm(x, (hidden,), w.float(), EPS) if dtype == torch.float32
                       else RN.rms_norm_ref(x, w.float(), EPS))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_rms_norm_with_residual_on_cpu(dtype):
    x, r, w = problem((2, 9), 64, dtype)
    y, s = RN.rms_norm(x, w, EPS, residual=r)
    assert torch.equal(s, x + r) and torch.equal(y, RN.rms_norm(x + r, w, EPS))
    ry, rs = RN.rms_norm_residual_ref(x, r, w, EPS)
    assert torch.equal(rs, s) and torch.equal(ry, RN.rms_norm_ref(x + r, w, EPS))


def test_gemma_reference_form():
    x, r, w = problem(4, 33, torch.bfloat16, offset=1.0)
    y, s = RN.rms_norm_residual_ref(x, r, w, EPS, offset=1.0)
    h = s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + EPS)
    assert y.dtype == torch.bfloat16 and torch.equal(y, (h * (1.0 + w.float())).to(torch.bfloat16))


def test_dispatcher_keeps_autograd():
    x, r, w = [t.to(DEVICE) for t in problem(3, 16, torch.float32)]
    y, _ = RN.rms_norm(x, w.requires_grad_(True), EPS, residual=r)
    assert y.requires_grad  # the torch ops, which autograd sees, even on CUDA


def _bad_calls():
    x, r, w = problem(3, 16, torch.float32)
    return {
        "weight shape": lambda: (x, w[:8], r),
        "2-D weight": lambda: (x, w[None], r),
        "residual shape": lambda: (x, w, r[:2]),
        "residual dtype": lambda: (x, w, r.half()),
        "residual device": lambda: (x, w, r.to("meta")),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_inputs_are_refused(case):
    x, w, r = _bad_calls()[case]()
    with pytest.raises(InvalidOptionError, match="rms_norm"):
        RN.rms_norm(x, w, EPS, residual=r)
    if TRITON:
        with pytest.raises(InvalidOptionError, match="rms_norm"):
            RN.rms_norm_triton(x, w, EPS, residual=r)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_triton_launcher_refuses_what_it_cannot_hold():
    with pytest.raises(InvalidOptionError, match="rms_norm_ref"):
        RN.rms_norm_triton(torch.zeros(1, RN.RMS_MAX_HIDDEN + 1), torch.ones(RN.RMS_MAX_HIDDEN + 1), EPS)
    with pytest.raises(InvalidOptionError, match="CPU"):
        RN.rms_norm_triton(torch.zeros(1, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), EPS)


def test_imports_and_torch_path_work_without_triton():
    assert_works_without_triton(
        "import importlib; RN = importlib.import_module('hetero_llm.kernels.rms_norm')\n"
        "assert not RN.TRITON_AVAILABLE\n"
        "x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)\n"
        "y, s = RN.rms_norm(x, w, 1e-6, residual=r)\n"
        "assert torch.equal(s, x + r)\n",
        "RN.rms_norm_triton(x, w, 1e-6)")


@pytest.mark.skipif(KERNELS_RUN_HERE or not TRITON, reason="the kernels run in this process")
def test_kernels_in_a_fresh_process():
    run_file_in_fresh_process(__file__)


# -- ahead-of-time compilation for sm_80 and sm_90 (no GPU needed) ------------------------------

def _spec(hidden, dtype, residual, offset, arch, rows=4096):
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(rows, hidden, **meta)
    r, s = (torch.empty_like(x), torch.empty_like(x)) if residual else (None, None)
    call = RN._rms_norm_call(x, torch.empty(hidden, **meta), r, torch.empty_like(x), s, EPS, offset)
    return aot_spec("rms_norm", call, arch)


AOT = {f"{name}-sm{arch}": (args, arch) for arch in AOT_ARCHS for name, args in {
    "bf16-4096-add": (4096, torch.bfloat16, True, 0.0),
    "bf16-8192-add": (8192, torch.bfloat16, True, 0.0),
    "bf16-16384": (16384, torch.bfloat16, False, 1.0),
    "fp16-576": (576, torch.float16, False, 0.0),
    "fp32-4096-add-gemma": (4096, torch.float32, True, 1.0),
}.items()}


@pytest.fixture(scope="module")
def compiled():
    if not TRITON:
        pytest.skip("Triton is not installed")
    specs = {label: _spec(*args, arch) for label, (args, arch) in AOT.items()}
    return dict(zip(specs, aot_compile(list(specs.values()))))


@pytest.mark.parametrize("label", AOT)
def test_aot_compiles_with_wide_loads(compiled, label):
    r, ((hidden, _, residual, _), arch) = compiled[label], AOT[label]
    assert r["shared"] <= SMEM_BYTES[arch], f"{label}: {r['shared']} bytes of shared memory"
    assert r["num_warps"] == {576: 4, 4096: 8, 8192: 16, 16384: 16}[hidden]  # ~16 elements a thread
    # 16 bytes per thread per access (8 bf16, 4 fp32) for x, the residual, s and y
    loads, stores = ptx_lines(r["ptx"], "ld.global", ".v4"), ptx_lines(r["ptx"], "st.global", ".v4")
    assert len(loads) >= (2 if residual else 1) and len(stores) >= (2 if residual else 1), label


# -- on a GPU: bf16 and LLM shapes ------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("hidden", (4096, 8192))
@pytest.mark.parametrize("offset", (0.0, 1.0))
def test_gpu_llm_shapes(dtype, hidden, offset):
    x, r, w = [t.cuda() for t in problem(4096, hidden, dtype, offset, seed=hidden)]
    if offset:
        y, s = RN.rms_norm_triton(x, w, EPS, residual=r, offset=offset)
    else:
        y, s = RN.rms_norm(x, w, EPS, residual=r)  # CUDA: the dispatcher takes the kernel
        assert torch.equal(y, RN.rms_norm_triton(x, w, EPS, residual=r)[0])
    assert torch.equal(s, x + r)
    check_rule(dtype, [(y, s, x, r, w, offset)])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("hidden", (77, 576, 1000, 16384))
def test_gpu_odd_shapes(dtype, hidden):
    calls = []
    for rows in ROWS:
        x, r, w = problem(rows, hidden, dtype, seed=rows)
        y, s = RN.rms_norm_triton(x.cuda(), w.cuda(), EPS, residual=r.cuda())
        calls.append((y, s, x, r, w, 0.0))
    check_rule(dtype, calls)


@gpu
@needs_cuda
def test_gpu_dispatcher_falls_back_beyond_the_register_limit():
    x, r, w = [t.cuda() for t in problem(2, RN.RMS_MAX_HIDDEN * 2, torch.bfloat16)]
    y, s = RN.rms_norm(x, w, EPS, residual=r)
    assert torch.equal(s, x + r) and torch.equal(y, RN.rms_norm_ref(x + r, w, EPS))
