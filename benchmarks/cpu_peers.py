"""hetero_llm against the CPU peers on the same weights, in one run: llama.cpp (Q8_0) and OpenVINO GenAI.

What a CPU user would otherwise run. All four systems read the same weights: the bundled SmolLM2-135M
(or, with `--model llama-1b`, a 1.1B Llama shape with random weights written once as safetensors),
converted to GGUF with llama.cpp's own `convert_hf_to_gguf.py` and quantized to Q8_0 with its
`llama-quantize`; OpenVINO GenAI's LLMPipeline loads the same Q8_0 GGUF. Rounds are interleaved (the
starting system rotates), each figure is the median of the rounds, and every system uses the same
number of threads. Decode: tokens per second generating `--new-tokens` tokens, generation alone as
llama-bench's `tg` times it (for the transformers models: generate() of 1 + N tokens minus generate()
of 1 token after the same chat prompt; the whole generate() rate, prompt included, is printed beside).
Prefill: a `--prompt-len` prompt (llama-bench's `pp`; OpenVINO: its time to first token).

Accuracy beside the speed: perplexity of the original and of hetero_llm on the pydoc text
(hetero_llm.evaluate, 512-token windows), and llama.cpp's own `llama-perplexity` on the same text for
its F32 and Q8_0 files (the relative change is what compares; the absolute values use its windows).

The peers are never dependencies of hetero_llm. Build llama.cpp once (~8 min on 2 cores):

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \\
        && cmake --build build -j2 --target llama-bench llama-quantize llama-perplexity

OpenVINO GenAI in a virtualenv of its own: `python -m venv ov && ov/bin/pip install openvino-genai`.

    python benchmarks/cpu_peers.py --llama-cpp .../vendor/llama.cpp [--openvino-python ov/bin/python]
        [--model smollm2|llama-1b] [--repeats 3] [--out benchmarks/results/cpu_peers_smollm2.json]

Without --llama-cpp only the original and hetero_llm are timed (the same measurements, no peers).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import hetero_llm
from hetero_llm._files import cache_dir
from hetero_llm.evaluate import load_model
from hetero_llm.evaluate.models import smollm2_dir
from hetero_llm.evaluate.perplexity import default_text, perplexity
from hetero_llm.evaluate.timing import chat_prompt_ids, measure_decode, measure_prefill, prompt_ids, weight_bytes
from hetero_llm.hardware import inspect_hardware

OPENVINO_SCRIPT = r"""
import json, sys, time
import openvino_genai as ov
path, prompt_len, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = ov.LLMPipeline(path, "CPU", INFERENCE_NUM_THREADS=threads)
tok = pipe.get_tokenizer()
text = open(sys.argv[5]).read()
import numpy as np
import openvino
ids = openvino.Tensor(np.array([tok.encode(text).input_ids.data[0][:prompt_len]], dtype=np.int64))
config = ov.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
pipe.generate("Hello", ov.GenerationConfig(max_new_tokens=4))  # warm-up
out = pipe.generate(["Write a short story about the sea."], config)
decode = out.perf_metrics.get_throughput().mean  # tokens/s after the first
one = ov.GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=False)
res = pipe.generate(ids, one)  # exactly prompt_len tokens
ttft = res.perf_metrics.get_ttft().mean / 1e3  # ms -> s
tokens = res.perf_metrics.get_num_input_tokens()
print(json.dumps({"decode_tok_s": decode, "prefill_tok_s": tokens / ttft, "prompt_tokens": tokens}))
"""


def run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def model_dir(name: str) -> Path:
    """Safetensors + tokenizer of the benchmarked model (written once for the random 1B shape)."""
    if name == "smollm2":
        return smollm2_dir()
    out = cache_dir() / "peers" / "llama-1b-shape"
    if (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, out)
    return out


def gguf_files(llama_cpp: Path, source: Path, name: str) -> tuple[Path, Path]:
    """(F32 GGUF, Q8_0 GGUF) of `source`, made once with llama.cpp's converter and quantizer."""
    out = cache_dir() / "peers"
    out.mkdir(parents=True, exist_ok=True)
    f32, q8 = out / f"{name}-f32.gguf", out / f"{name}-q8_0.gguf"
    if not f32.exists():
        # The converter picks its writer from config.json's "architectures", which a model converted
        # from GGUF by transformers leaves empty: convert a view of the directory that names it.
        config = json.loads((source / "config.json").read_text())
        config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
        with tempfile.TemporaryDirectory() as view:
            for item in source.iterdir():
                if item.name != "config.json":
                    os.symlink(item, Path(view) / item.name)
            (Path(view) / "config.json").write_text(json.dumps(config))
            env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
            run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), view, "--outtype", "f32",
                 "--outfile", str(f32)], env=env)
    if not q8.exists():
        run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f32), str(q8), "Q8_0"])
    return f32, q8


def llama_bench(llama_cpp: Path, gguf: Path, prompt_len: int, new_tokens: int, threads: int) -> dict:
    out = run([str(llama_cpp / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", str(prompt_len),
               "-n", str(new_tokens), "-t", str(threads), "-r", "1", "-o", "json"])
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] > 0)
    tg = next(r for r in rows if r["n_gen"] > 0)
    return {"decode_tok_s": tg["avg_ts"], "prefill_tok_s": pp["avg_ts"]}


def llama_perplexity(llama_cpp: Path, gguf: Path, text_file: Path, threads: int, chunks: int) -> float | None:
    binary = llama_cpp / "build" / "bin" / "llama-perplexity"
    if not binary.exists():
        return None
    done = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text_file), "-c", "512", "--chunks",
                           str(chunks), "-t", str(threads)], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    return float(found.group(1)) if found else None


def openvino(python: str, gguf: Path, prompt_len: int, new_tokens: int, threads: int, text_file: Path) -> dict:
    out = run([python, "-c", OPENVINO_SCRIPT, str(gguf), str(prompt_len), str(new_tokens), str(threads),
               str(text_file)])
    return json.loads(out.strip().splitlines()[-1])


READ_BYTES = 2**30  # the memory-read reference: summing 1 GiB (no cache holds it)


def read_gbs() -> dict:
    """Plain DRAM read bandwidth now (torch.sum over 1 GiB on all threads; best of 3): measured in
    every round, since on a shared machine it changes with the neighbours (seen: 30 to 60 GB/s)."""
    data = torch.ones(READ_BYTES // 4)
    data.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return {"read_gbs": READ_BYTES / best / 1e9}


def streamed_bytes(model) -> int:
    """Weight bytes one decode step reads: all of them but the input embedding's table (one row
    is read), unless the head shares it."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    def storages(m):
        return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    # Tied: the head reads the whole table (hetero_llm's INT8 head holds the embedding, not its tensors).
    shared = bool(getattr(model.config, "tie_word_embeddings", False)) or (
        head is not None and bool(storages(embed) & storages(head)))
    return weight_bytes(model) - (0 if shared else weight_bytes(embed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree with build/bin (skipped if not given)")
    p.add_argument("--openvino-python", help="a python with openvino-genai installed (skipped if not given)")
    p.add_argument("--model", choices=("smollm2", "llama-1b"), default="smollm2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity tokens (0: skip)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    threads = torch.get_num_threads()
    hw = inspect_hardware()
    source = model_dir(args.model)
    if args.openvino_python and not args.llama_cpp:
        raise SystemExit("OpenVINO GenAI reads the Q8_0 GGUF that llama.cpp's tools make: give --llama-cpp too")
    f32, q8 = gguf_files(args.llama_cpp, source, args.model) if args.llama_cpp else (None, None)
    original, tokenizer = load_model(str(source))
    accelerated = hetero_llm.accelerate(copy.deepcopy(original))
    decode_prompt, prefill_prompt = chat_prompt_ids(tokenizer), prompt_ids(tokenizer, args.prompt_len)
    text_file = Path(tempfile.mkdtemp()) / "pydoc.txt"
    text_file.write_text(default_text())

    def hf_system(model):
        def measure() -> dict:
            # llama-bench's tg times generation alone; generate() also runs the prompt first. So decode
            # is timed as generate(1 + N tokens) - generate(1 token): N tokens of pure generation.
            first = measure_decode(model, decode_prompt, 1)
            total = measure_decode(model, decode_prompt, 1 + args.new_tokens)
            return {"decode_tok_s": args.new_tokens / (total - first),
                    "generate_tok_s": (1 + args.new_tokens) / total,
                    "prefill_tok_s": args.prompt_len / measure_prefill(model, prefill_prompt)}
        return measure

    systems = {
        "original (HF fp32)": hf_system(original),
        "hetero_llm INT8": hf_system(accelerated),
    }
    if args.llama_cpp:
        systems["llama.cpp Q8_0"] = lambda: llama_bench(args.llama_cpp, q8, args.prompt_len, args.new_tokens, threads)
    if args.openvino_python:
        systems["OpenVINO GenAI (Q8_0 GGUF)"] = lambda: openvino(args.openvino_python, q8, args.prompt_len,
                                                                 args.new_tokens, threads, text_file)
    for name in ("original (HF fp32)", "hetero_llm INT8"):
        systems[name]()  # warm-up: lazy initialisation, kernel builds, allocator growth
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    names = list(systems)
    reads: list[dict] = []
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(systems[name]())
            print(f"round {r + 1}: {name}: {runs[name][-1]}", flush=True)
        reads.append(read_gbs())
        print(f"round {r + 1}: memory read {reads[-1]['read_gbs']:.1f} GB/s", flush=True)

    table = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    ppl = {}
    if args.ppl_tokens:
        for name, model in (("original (HF fp32)", original), ("hetero_llm INT8", accelerated)):
            ppl[name] = perplexity(model, tokenizer, max_tokens=args.ppl_tokens, progress=False).perplexity
        if args.llama_cpp:
            chunks = max(1, args.ppl_tokens // 512)
            ppl["llama.cpp F32"] = llama_perplexity(args.llama_cpp, f32, text_file, threads, chunks)
            ppl["llama.cpp Q8_0"] = llama_perplexity(args.llama_cpp, q8, text_file, threads, chunks)
    result = {
        "model": args.model, "cpu": hw.cpu.model, "isa": list(hw.cpu.isa), "threads": threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "hetero_llm": hetero_llm.__version__},
        "env": {k: v for k, v in os.environ.items() if k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                               "HETERO_LLM_CPU_ISA")},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "median": table, "runs": runs, "perplexity": ppl,
        "memory_read_gbs": [x["read_gbs"] for x in reads], "hetero_llm_bytes_per_token": streamed_bytes(accelerated),
        "decode_mode": accelerated.hetero_plan.model_settings.get("decode"),
    }
    print(f"\n{args.model} on {hw.cpu.model} ({', '.join(hw.cpu.isa)}), {threads} threads; "
          f"medians of {args.repeats} interleaved rounds\n")
    print(f"| system | decode tok/s | generate() tok/s, prompt included | prefill tok/s ({args.prompt_len} tokens) |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in table.items():
        whole = f"{row['generate_tok_s']:.1f}" if "generate_tok_s" in row else "-"
        print(f"| {name} | {row['decode_tok_s']:.1f} | {whole} | {row['prefill_tok_s']:.1f} |")
    ours, ref = table["hetero_llm INT8"], table["original (HF fp32)"]
    if "llama.cpp Q8_0" in table:
        peer = table["llama.cpp Q8_0"]
        print(f"\nhetero_llm vs llama.cpp Q8_0: decode {ours['decode_tok_s'] / peer['decode_tok_s']:.2f}x, "
              f"prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x")
    else:
        print("\nllama.cpp not timed (no --llama-cpp); see this script's docstring to build it")
    print(f"hetero_llm vs the original: decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x, "
          f"prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x")
    per_token = streamed_bytes(accelerated)
    streams = [per_token * run["decode_tok_s"] / 1e9 for run in runs["hetero_llm INT8"]]
    fractions = [a / b["read_gbs"] for a, b in zip(streams, reads)]
    read_list = ", ".join(f"{x['read_gbs']:.1f}" for x in reads)
    print(f"hetero_llm decode streams {per_token / 1e6:.0f} MB of weights per token: "
          f"{statistics.median(streams):.1f} GB/s, {100 * statistics.median(fractions):.0f}% of the memory read "
          f"bandwidth measured in the same rounds (torch.sum over 1 GiB: {read_list} GB/s)")
    if ppl:
        print("perplexity:", ", ".join(f"{k} {v:.3f}" if v else f"{k} -" for k, v in ppl.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
