"""Run the Triton kernels in tests with or without a GPU, and compile them ahead of time for Hopper.

Without CUDA the kernels run on CPU tensors under the Triton interpreter. Triton decides at
*definition* time whether a function is interpreted: `triton.jit` returns an
InterpretedFunction or a JITFunction according to TRITON_INTERPRET, and Triton's own library
functions (tl.zeros, tl.sum, tl.cdiv, ...) are defined when `triton` is first imported. So the
variable must be set before anything imports triton; setting it later, or only around the import
of our kernel module, leaves tl.zeros compiled and the interpreter fails on it.

- This module sets TRITON_INTERPRET=1 on import when there is no CUDA and triton is not yet
  imported, so test files import it first; the kernels then run in this process. (The variable
  stays set for the rest of the process: without CUDA no Triton kernel could run otherwise.)
- When something imported triton earlier (transformers' model code does, through torch's
  compiler stack), the interpreter cannot start in this process. The kernel tests then skip
  here and `run_file_in_fresh_process` runs the file again in a child process whose
  environment sets the variable from the start.
- The compiler, conversely, needs triton imported *without* the interpreter. `aot_compile` runs
  in a child process (`python triton_helpers.py`), builds PTX and a cubin for sm_90 with the
  ptxas bundled in the Triton wheel (no GPU needed), and returns what the tests check.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HOPPER_SMEM_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
# The most shared memory one block may opt in to, per compute capability (CUDA programming
# guide, "Technical Specifications per Compute Capability"): A100 163 KiB, H100/H200 227 KiB.
SMEM_BYTES = {80: 163 * 1024, 90: HOPPER_SMEM_BYTES}
AOT_ARCHS = tuple(SMEM_BYTES)
TRITON = importlib.util.find_spec("triton") is not None
REPO = Path(__file__).resolve().parents[2]


def _interpreter_ready() -> bool:
    """Whether kernels defined from now on run on the interpreter; sets it up if still possible."""
    if ON_GPU or not TRITON:
        return False
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton: see above
        return True
    from triton.language import standard  # imported already: is its library interpreted?
    return type(standard.zeros).__name__ == "InterpretedFunction"


INTERPRETED = _interpreter_ready() if __name__ != "__main__" else False  # the AOT child compiles
KERNELS_RUN_HERE = TRITON and (ON_GPU or INTERPRETED)
runs_kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason="no Triton" if not TRITON else "triton was imported before the interpreter could be "
    "enabled; test_kernels_in_a_fresh_process runs this file in a child process instead")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def run_file_in_fresh_process(path: str, timeout: float = 600) -> None:
    """Run the kernel tests of one file under the interpreter in a child pytest; fail with its log."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path),
           "-k", "not fresh_process and not aot"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child pytest failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout, proc.stdout[-3000:]


def assert_python_ok(code: str) -> None:
    """Run `python -c code` in the repository; fail with its stderr unless it exits with 0."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_works_without_triton(body: str, *refused: str) -> None:
    """In a child process where `import triton` fails (torch and HardwareError imported): run
    `body`, then each of the `refused` calls, which must raise a HardwareError naming Triton."""
    code = ["import sys; sys.modules['triton'] = None", "import torch",
            "from hetero_llm.errors import HardwareError", textwrap.dedent(body)]
    for call in refused:
        code += [f"try:\n    {call}\nexcept HardwareError as e:\n    assert 'Triton' in str(e)",
                 f"else:\n    raise AssertionError({f'no error from {call}'!r})"]
    assert_python_ok("\n".join(code) + "\n")


# -- the accuracy rule: at most twice the error of the torch op a model runs today -----------

class AccuracyRule:
    """Max abs errors against a float64 `exact` of our output and of the same-dtype torch op,
    over one or more calls, and the rule: ours <= 2x torch's. Where torch is exact, the bound is
    instead `floor_ulps` times the eps of `dtype` times the largest |exact| (0.5: half an ulp)."""

    def __init__(self, dtype: torch.dtype, floor_ulps: float = 0.5):
        self.dtype, self.floor_ulps = dtype, floor_ulps
        self.ours, self.torch, self.scale = 0.0, 0.0, 0.0

    def add(self, ours: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor) -> AccuracyRule:
        self.ours = max(self.ours, (ours.double() - exact).abs().max().item())
        self.torch = max(self.torch, (torch_out.double() - exact).abs().max().item())
        self.scale = max(self.scale, exact.abs().max().item())
        return self

    def check(self) -> None:
        bound = 2 * self.torch  # the rule
        if self.torch == 0:  # torch exact: allow a fraction of an ulp of the largest output
            bound = self.floor_ulps * torch.finfo(self.dtype).eps * self.scale
        assert self.ours <= bound, f"error {self.ours:.3g} > 2x torch's {self.torch:.3g}"


def check_accuracy_rule(dtype: torch.dtype, calls) -> None:
    """calls: (ours, torch_out, exact) per call. The rule holds per call in 16-bit, where the
    output rounding dominates both errors; in fp32 the max of a few hundred outputs is a draw of
    one- or two-ulp events, so the errors are pooled over the calls."""
    if dtype == torch.float32:
        rule = AccuracyRule(dtype)
        for call in calls:
            rule.add(*call)
        rule.check()
    else:
        for call in calls:
            AccuracyRule(dtype).add(*call).check()


# -- ahead-of-time compilation (in a child process, without the interpreter) ------------------

_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
              torch.int8: "*i8", torch.int32: "*i32"}


def aot_spec(module: str, call, arch: int = 90) -> dict:
    """A JSON-able compile spec from a launcher's (kernel, grid, args, kwargs), built on meta
    tensors: the AOT tests compile exactly the call the launcher would make, for compute
    capability `arch` (80: A100, 90: H100/H200)."""
    kernel, _grid, args, kwargs = call
    kwargs = dict(kwargs)
    spec = dict(module=module, kernel=kernel.__name__, num_warps=kwargs.pop("num_warps", 4),
                num_stages=kwargs.pop("num_stages", 3), arch=arch)
    values = {name: _PTR_TYPES[a.dtype] if isinstance(a, torch.Tensor) else a
              for name, a in zip(kernel.arg_names, args)}
    return dict(spec, args={**values, **kwargs})


def aot_compile(specs: list[dict], timeout: float = 600) -> list[dict]:
    """Compile each spec (see `aot_spec`) for its arch in one child process, one result per spec:
    shared (bytes), num_warps, ptx (text), sass (text, "" where cuobjdump is missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "specs.json"
        spec_file.write_text(json.dumps(specs))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, __file__, str(spec_file), tmp], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-6000:]}"
        results = json.loads((Path(tmp) / "results.json").read_text())
        for r in results:
            ptx_path, sass_path = r.pop("ptx_path"), r.pop("sass_path")
            r["ptx"] = Path(ptx_path).read_text()
            r["sass"] = Path(sass_path).read_text() if sass_path else ""
    return results


def _compile_one(spec: dict, out_dir: Path, index: int) -> dict:
    """Child side: build the signature as a launch would (ints equal to 1 become constants,
    multiples of 16 and pointers are marked 16-divisible) and compile for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"hetero_llm.kernels.{spec['module']}"), spec["kernel"])
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = spec["args"][param.name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, str) and value.startswith("*"):
            signature[param.name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):  # a scale: a launch passes Python floats as fp32
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", spec.get("arch", 90), 32),
                              options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    ptx_path = out_dir / f"{index}.ptx"
    ptx_path.write_text(compiled.asm["ptx"])
    return dict(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps, arch=spec.get("arch", 90),
                ptx_path=str(ptx_path), sass_path=_sass(compiled.asm["cubin"], out_dir, index))


def _sass(cubin: bytes, out_dir: Path, index: int) -> str:
    """Disassemble with the cuobjdump bundled in the Triton wheel; "" where it is missing."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - older Triton: no knob; SASS is a bonus, PTX is checked
        return ""
    cubin_path, sass_path = out_dir / f"{index}.cubin", out_dir / f"{index}.sass"
    cubin_path.write_bytes(cubin)
    proc = subprocess.run([tool, "-sass", str(cubin_path)], capture_output=True, text=True)
    if proc.returncode:
        return ""
    sass_path.write_text(proc.stdout)
    return str(sass_path)


def uses_wgmma(ptx: str) -> bool:
    """Whether the kernel issues Hopper's warpgroup MMA (only possible on sm_90)."""
    return "wgmma.mma_async" in ptx


def uses_mma(ptx: str) -> bool:
    """Whether the kernel uses tensor cores at all (Ampere's mma.sync or Hopper's wgmma)."""
    return "mma.sync" in ptx or uses_wgmma(ptx)


def ptx_lines(ptx: str, *needles: str) -> list[str]:
    """The lines of `ptx` (or SASS) that contain every one of `needles`."""
    return [ln.strip() for ln in ptx.splitlines() if all(s in ln for s in needles)]


def ptx_loops(ptx: str) -> list[list[str]]:
    """The bodies of the PTX loops: the lines from a label to a later branch back to it."""
    lines = ptx.splitlines()
    labels = {ln.split(":")[0]: i for i, ln in enumerate(lines) if ln.startswith("$L__BB")}
    loops = []
    for i, ln in enumerate(lines):
        target = ln.split("bra")[-1].strip(" \t;") if " bra" in ln or "\tbra" in ln else None
        if target in labels and labels[target] < i:
            loops.append([s.strip() for s in lines[labels[target]:i + 1]])
    return loops


if __name__ == "__main__":  # the AOT child: python triton_helpers.py SPECS.json OUT_DIR
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default; silences its warning
    specs_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = [_compile_one(s, out, i) for i, s in enumerate(json.loads(specs_path.read_text()))]
    (out / "results.json").write_text(json.dumps(results))
