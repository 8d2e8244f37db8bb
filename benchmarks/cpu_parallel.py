"""SmolLM2-135M decode on this CPU: one process vs tp=2 vs pp=2 (torchrun, gloo), same run.

    python benchmarks/cpu_parallel.py [--rounds 3] [--tokens 64] [--quantize int8 none] [--json F]

Every configuration is a fresh launch (one process with all cores, or a 2-process
torchrun job with one core each); launches are interleaved over rounds and medians
reported. Each launch also checks its greedy tokens and logits against the same model
accelerated in one process, so speed is reported next to accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The three primary colors are"


def worker(quantize: str, parallel: str, tokens: int, out: Path) -> None:
    import torch

    import hetero_llm
    from hetero_llm.evaluate import load_model

    model, tok = load_model("smollm2")
    ids = tok(PROMPT, return_tensors="pt")
    options = {"tp": 2} if parallel == "tp" else {"pp": 2} if parallel == "pp" else {}
    ref_tokens = ref_logits = None
    if options:  # the one-process answer, for the accuracy columns
        ref, _ = load_model("smollm2")
        hetero_llm.accelerate(ref, quantize=quantize, device="cpu")
        with torch.inference_mode():
            ref_logits = ref(**ids).logits
            ref_tokens = ref.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        del ref
    hetero_llm.accelerate(model, quantize=quantize, device="cpu", **options)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=8, do_sample=False)  # warm-up
        start = time.perf_counter()
        out_tokens = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - start
        logits = model(**ids).logits
    rank = int(os.environ.get("RANK", "0"))
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                  list(model.parameters()) + list(model.buffers())}.values())
    result = {"tok_s": tokens / seconds, "weight_mb": weights / 2**20}
    if ref_tokens is not None:
        result["greedy_same"] = bool(torch.equal(out_tokens, ref_tokens))
        result["max_logit_diff"] = (logits - ref_logits).abs().max().item()
    if rank == 0:
        out.write_text(json.dumps(result))


def launch(quantize: str, parallel: str, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(Path(__file__).resolve()), "--worker", quantize, parallel, str(tokens), str(out)]
        if parallel == "one":
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   *args]
        env = {**os.environ, "HETERO_LLM_MEASURE": os.environ.get("HETERO_LLM_MEASURE", "0")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{parallel} {quantize} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantize", nargs="+", default=["int8", "none"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for q in args.quantize:
            for parallel in ("one", "tp", "pp"):
                runs.setdefault((q, parallel), []).append(launch(q, parallel, args.tokens))
    rows = []
    print(f"{'quantize':8} {'layout':6} {'tok/s':>7} {'vs one':>7} {'MB/rank':>8}  accuracy vs one process")
    for q in args.quantize:
        one = statistics.median(r["tok_s"] for r in runs[(q, "one")])
        for parallel in ("one", "tp", "pp"):
            rs = runs[(q, parallel)]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            acc = "-" if parallel == "one" else (
                f"greedy same: {all(r['greedy_same'] for r in rs)}, "
                f"max |logit diff| {max(r['max_logit_diff'] for r in rs):.2e}")
            print(f"{q:8} {parallel:6} {tok_s:7.1f} {tok_s / one:6.2f}x {rs[0]['weight_mb']:8.1f}  {acc}")
            rows.append({"quantize": q, "layout": parallel, "tok_s": tok_s, "ratio": tok_s / one,
                         "runs": [r["tok_s"] for r in rs], **{k: v for k, v in rs[0].items() if k != "tok_s"}})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
