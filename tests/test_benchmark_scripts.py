"""The GPU benchmark scripts' code paths, run once on CPU with tiny shapes.

A lent GPU is rare and its time is short: a typo in a benchmark must not cost it. This runs
each function of benchmarks/gpu_kernels.py under Triton's interpreter (in a child process, which
must set TRITON_INTERPRET before triton is imported) in fp32 at toy sizes, and checks the rows
and the target summary it would print. The figures mean nothing here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRITON = pytest.importorskip("triton", reason="needs Triton (its interpreter runs the kernels on CPU)")

SMOKE = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import gpu_kernels as K
K.DEVICE, K.DTYPE = "cpu", torch.float32
rows = (K.bench_prefill(40, 2, 2, 1, d=64) + K.bench_prefill(40, 4, 2, 1, d=64)
        + K.bench_decode(300, 1, 1, h=4, hk=2, d=64) + K.bench_linear_add(3, 40, 48, 1, K._linear_add_eager)
        + K.bench_rms_norm(5, 96, 1, K._add_rms_norm_eager))
rows = [r for r in rows]
print(json.dumps(dict(rows=rows, summary=K.summary(rows, 1.0))))
"""


def test_kernel_benchmark_functions_run_and_summarize():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SMOKE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    variants = {(r["op"].split()[0], r["variant"]) for r in rows}
    assert {("prefill", "triton"), ("prefill", "sdpa-flash"), ("prefill", "sdpa-gqa"), ("decode", "triton"),
            ("linear_add", "triton"), ("linear_add", "compiled"), ("add+rms_norm", "triton")} <= variants
    for r in rows:  # every variant computed the same function (fp32 here)
        assert r["err"] < 1e-4, r
        assert r["ms"] > 0 and r["speedup"] > 0
    assert len(out["summary"]) == 4 and all(s.split()[0] in ("MET", "MISSED") for s in out["summary"])


def test_benchmark_scripts_say_so_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the scripts would run the full benchmarks")
    for script in ("gpu_kernels.py", "e2e_prefill_gpu.py", "gpu_int8_linear.py", "e2e_gpu.py"):
        proc = subprocess.run([sys.executable, f"benchmarks/{script}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "No CUDA GPU here" in proc.stdout


def test_split_benchmark_smoke_runs_both_variants_on_cpu(tmp_path):
    """benchmarks/split_gpu.py --smoke: the hetero_llm split/offload and accelerate's dispatch paths,
    a tiny model, 2 tokens; the JSON a GPU run would write."""
    out = tmp_path / "split.json"
    proc = subprocess.run([sys.executable, "benchmarks/split_gpu.py", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result["times"]) == {"hetero_llm", "accelerate-offload"}
    assert result["offload"] and 0.0 <= result["greedy_agree"] <= 1.0
    assert "decode_ms_after" in result["predicted"] and "alternatives" in result["predicted"]
    assert "hetero_llm / accelerate-offload decode" in proc.stdout


def test_split_benchmark_says_so_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run the full benchmark")
    proc = subprocess.run([sys.executable, "benchmarks/split_gpu.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No CUDA GPU here" in proc.stdout


E2E_SIDES = ("eager", "static+compile", "hetero bf16", "hetero int8")


def _e2e_smoke(tmp_path, *models: str) -> tuple[dict, str]:
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "benchmarks/e2e_gpu.py", "--smoke", "--json", str(out)]
    proc = subprocess.run(cmd + (["--models", ",".join(models)] if models else []), check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_e2e_benchmark_smoke_times_every_side_and_batch(tmp_path):
    """benchmarks/e2e_gpu.py --smoke: the four sides on a tiny random Llama on the CPU (prompt 16, 4 new
    tokens, batches 1 and 2, 2 rounds), perplexity on a slice; the JSON and summary a GPU run writes."""
    result, stdout = _e2e_smoke(tmp_path)
    rows = {(r["batch"], r["side"]): r for r in result["rows"]}
    assert set(rows) == {(b, s) for b in (1, 2) for s in E2E_SIDES}
    assert all(r["model"] == "tiny" for r in result["rows"])
    for r in rows.values():
        assert r["tok_s"] > 0 and r["ttft_ms"] > 0 and r["warmup_s"] > 0, r
        assert len(r["same_tokens"]) == len(r["same_prefix"]) == r["batch"]
        assert all(0.0 <= f <= 1.0 for f in r["same_tokens"]) and all(0 <= n <= 4 for n in r["same_prefix"])
        assert (r["roofline"] is not None) == (r["batch"] == 1)
        assert r["peak_gb"] is None  # GPU memory: not measured on the CPU
    assert rows[(2, "eager")]["same_tokens"] == [1.0, 1.0] and rows[(1, "eager")]["vs_eager"] == 1.0
    assert rows[(1, "hetero int8")]["weight_gb"] < rows[(1, "hetero bf16")]["weight_gb"]
    assert set(result["perplexity"]["tiny"]) == {"eager", "hetero bf16", "hetero int8"}
    assert {"torch", "triton", "transformers"} <= set(result["versions"]) and result["copy_gbps"] > 0
    assert len(result["summary"]) == 6
    for line in result["summary"]:
        assert line.split()[0] in ("MET", "MISSED") and line in stdout
    assert "without torch.compile" in stdout and "Targets (issue 8" in stdout


def test_e2e_benchmark_smoke_loads_smollm2(tmp_path):
    """The SmolLM2 path of benchmarks/e2e_gpu.py (load, four sides, perplexity with its tokenizer), on the CPU."""
    result, _ = _e2e_smoke(tmp_path, "smollm2")
    if "smollm2" in result["skipped"]:
        pytest.skip(result["skipped"]["smollm2"])
    assert {(r["batch"], r["side"]) for r in result["rows"]} == {(b, s) for b in (1, 2) for s in E2E_SIDES}
    ppl = result["perplexity"]["smollm2"]
    assert ppl["hetero bf16"] == pytest.approx(ppl["eager"], rel=1e-3)  # fp32 on the CPU: the same model
    assert ppl["hetero int8"] == pytest.approx(ppl["eager"], rel=0.05)
    assert result["summary"][0].startswith("MISSED not measured")  # the targets are read on the 8B shape


def test_gpu_check_smoke_runs_every_stage_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh is what a lent GPU runs, once, in 10 minutes: its --smoke path runs
    every stage here so that a typo cannot waste that time."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.split("== gpu_check summary")[1]
    for stage in ("env", "e2e-tiny", "e2e-8b-b1", "gpu-tests"):
        assert f"{stage}: rc=0" in summary, summary
    assert "MET" in summary or "MISSED" in summary  # the target lines are read from the logs
    assert (tmp_path / "e2e_8b_b1.json").is_file() and (tmp_path / "gpu-tests.log").is_file()
