"""`hetero-llm inspect | plan | bench | eval` from a shell."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from .errors import HeteroLLMError

BENCH_OUT = "hetero_llm_results"


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default="auto",
                   help="auto | int8 | int8-asym | w8a8 | none (default: auto); w8a8 calibrates on 16 samples "
                        "of the bundled text that the perplexity text does not include")
    p.add_argument("--prune", default="none",
                   help="none | magnitude | wanda | 2:4 (any N:M) | structured (default: none); wanda and "
                        "structured calibrate on 64 samples of the bundled text that the perplexity text does not include")
    p.add_argument("--kernels", default="auto", help="auto | torch (default: auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--no-strict", action="store_true",
                   help="handle unknown architectures generically instead of refusing")


def _options(args) -> dict:
    return dict(quantize=args.quantize, prune=args.prune, kernels=args.kernels, device=args.device)


def _calibration(args, tokenizer):
    """Samples for what calibrates (W8A8 smoothing, Wanda-style pruning); None otherwise."""
    from .config import PruneConfig
    from .evaluate.perplexity import calibration_samples
    if PruneConfig(method=args.prune).needs_calibration:  # pruning ranks better with more text
        return calibration_samples(tokenizer, n=64, seq_len=256)
    if str(args.quantize).strip().lower() == "w8a8":
        return calibration_samples(tokenizer, n=16, seq_len=256)
    return None


def _meta_model(path: Path):
    """A weightless model from a config (config.json or a folder holding one): plans any size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path.parent if path.is_file() else path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _model_for_plan(name: str):
    from .evaluate import load_model
    path = Path(name)
    has_weights = path.is_dir() and any(path.glob("*.safetensors"))
    if path.exists() and not has_weights:
        return _meta_model(path)
    return load_model(name)[0]


def cmd_inspect(args) -> int:
    from .hardware import inspect_hardware
    hw = inspect_hardware()
    print(hw.to_json() if args.json else hw)
    if args.measure:
        _measure_again(hw)
    return 0


def _measure_again(hw) -> None:
    """Redo this CPU's cached measurements (after a busy first run, or new hardware settings)."""
    from .measure import cached_cpu_costs
    from .quant import cpu_prefill
    choice, ms = cpu_prefill.remeasure()
    for size, shape in cpu_prefill.TIMING_SHAPES.items():
        times = ", ".join(f"{s} {t:.2f} ms" for s, t in ms[size].items())
        print(f"INT8 prompt GEMM (+add, +SiLU gate), {shape[0]} rows x {shape[1]}x{shape[2]} weight: {times} "
              f"-> {choice[size]}")
    costs = cached_cpu_costs(hw, refresh=True)
    if costs is None:
        print("cost-model measurements are off (HETERO_LLM_MEASURE=0)")
        return
    print(f"cost model: memory read {costs.read_gbs:.1f} GB/s, one small op {costs.op_us:.1f} us; per linear kernel "
          "(call us, GB/s, prompt GFLOP/s):")
    for name, c in sorted(costs.linears.items()):
        print(f"  {name:28s} {c.call_us:8.1f} {c.gbs:8.1f} {c.gemm_gflops:8.1f}")


def cmd_plan(args) -> int:
    from .api import plan
    model = _model_for_plan(args.model)
    p = plan(model, hardware=args.hardware, strict=not args.no_strict, max_memory=_memory(args.max_memory),
             device_map=_memory(args.device_map), batch_size=args.batch_size, prompt_len=args.prompt_len,
             **_options(args))
    print(p.to_json() if args.json else p.table(full=args.full))
    return 0


def _variants(args):
    """Fresh copies of the model: original, hetero_llm, and the peer a CPU user would pick."""
    from .api import accelerate
    from .evaluate import load_model, torch_dynamic_int8
    import torch

    dtype = getattr(torch, args.dtype)  # the original runs in it; hetero_llm starts from the same model
    original, tokenizer = load_model(args.model, dtype=dtype)
    accelerated = accelerate(load_model(args.model, dtype=dtype)[0], strict=not args.no_strict,
                             calibration_data=_calibration(args, tokenizer), **_options(args))
    variants = {"original": original, "hetero_llm": accelerated}
    if not args.no_peer:
        variants["torch-dynamic-int8"] = torch_dynamic_int8(load_model(args.model)[0])  # fp32 only
    return variants, tokenizer


ONNX_MODES = {"float": ("onnxruntime", "float"), "int8": ("onnxruntime-int8", "int8")}


def _onnx_variants(args, variants: dict, tokenizer, workdir: Path) -> dict:
    """The accelerated model exported to ONNX in `workdir`, run by ONNX Runtime (CPU): one side
    per matmul mode asked for (`--onnx float|int8|both`)."""
    from .api import accelerate
    from .evaluate import load_model
    from .export import OnnxCausalLM, export_onnx
    source = variants["hetero_llm"]
    if source.hetero_plan.device != "cpu":  # ONNX Runtime runs here on the CPU: export a CPU plan
        source = accelerate(load_model(args.model)[0], strict=not args.no_strict,
                            calibration_data=_calibration(args, tokenizer), **{**_options(args), "device": "cpu"})
    if not args.quiet:
        print(f"exporting the accelerated model to ONNX in {workdir} ...", flush=True)
    path = export_onnx(source, workdir / "onnx")
    modes = ("float", "int8") if args.onnx == "both" else (args.onnx,)
    return {ONNX_MODES[m][0]: OnnxCausalLM(path, threads=args.threads, matmul=ONNX_MODES[m][1]) for m in modes}


def _set_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def _judge(model, agreed, args) -> str | None:
    """Why the accelerated model's tokens fail its bar (evaluate.agreement.verdict), or None."""
    from .evaluate.agreement import verdict
    quantized = bool(model.hetero_plan.by_action("quantize"))
    return verdict(agreed, "int8" if quantized else "none", pruned=str(args.prune).lower() != "none")


def _refuse_if_failed(failure: str | None) -> None:
    if failure:
        from .errors import AccuracyError
        raise AccuracyError(f"hetero_llm: {failure}. Its speed is not a speedup; please report this with the "
                            "model, the options and `pip list` (transformers version).")


def cmd_bench(args) -> int:
    from .evaluate import format_table, run_bench, save_chart, save_json
    from .evaluate.agreement import Agreement
    _set_threads(args.threads)
    variants, tokenizer = _variants(args)
    print(variants["hetero_llm"].hetero_plan)
    print()
    # The ONNX file lives as long as its sessions need it: through the run, then removed.
    with tempfile.TemporaryDirectory(prefix="hetero_llm_onnx_") if args.onnx else contextlib.nullcontext() as workdir:
        if args.onnx:
            variants.update(_onnx_variants(args, variants, tokenizer, Path(workdir)))
        result = run_bench(variants, tokenizer, repeats=args.repeats, new_tokens=args.new_tokens,
                           prompt_len=args.prompt_len, perplexity_tokens=args.ppl_tokens or None,
                           progress=not args.quiet, model_name=args.model)
    ours = result.variant("hetero_llm")
    ours.accuracy_failure = _judge(variants["hetero_llm"],
                                   Agreement(ours.tokens_identical, ours.token_agreement, ours.first_difference,
                                             result.settings["agreement_tokens"]), args)
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = save_json(result, out / "bench.json")
    print(f"\nwrote {json_path}")
    try:
        print(f"wrote {save_chart(result, out / 'bench.png')}")
    except HeteroLLMError as exc:  # matplotlib missing: the table and JSON still stand
        print(f"chart skipped: {exc}")
    _refuse_if_failed(ours.accuracy_failure)
    return 0


def cmd_eval(args) -> int:
    from .api import accelerate
    from .evaluate import load_model, perplexity, torch_dynamic_int8
    _set_threads(args.threads)
    text = Path(args.text).read_text() if args.text else None
    original, tokenizer = load_model(args.model)
    models = {"original": original,
              "hetero_llm": accelerate(load_model(args.model)[0], strict=not args.no_strict,
                                       calibration_data=_calibration(args, tokenizer), **_options(args))}
    if args.peer:
        models["torch-dynamic-int8"] = torch_dynamic_int8(load_model(args.model)[0])
    results = {name: perplexity(m, tokenizer, text, max_tokens=args.max_tokens or None, window=args.window,
                                progress=not args.quiet) for name, m in models.items()}
    agreed = _eval_agreement(models, tokenizer, args.agreement_tokens)
    failure = _judge(models["hetero_llm"], agreed["hetero_llm"], args) if agreed else None
    base = results["original"].perplexity
    print(f"{'variant':<20} {'perplexity':>10} {'vs original':>12} {'tokens':>7} {'greedy tokens vs original':>26}")
    for name, r in results.items():
        tokens = agreed[name].describe() if name in agreed else "-"
        print(f"{name:<20} {r.perplexity:>10.4f} {100 * (r.perplexity / base - 1):>+11.2f}% {r.tokens:>7} "
              f"{tokens:>26}")
    if failure:
        print(f"hetero_llm: FAILED: {failure}")
    if args.json:
        out = {n: {**(vars(r) if hasattr(r, "__dict__") else r._asdict()),
                   **({"greedy_tokens": vars(agreed[n])} if n in agreed else {})} for n, r in results.items()}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    _refuse_if_failed(failure)
    return 0


def _eval_agreement(models: dict, tokenizer, new_tokens: int) -> dict:
    """Greedy tokens of each model on the bench's chat prompt against the original's."""
    if not new_tokens:
        return {}
    from .evaluate.agreement import agreement, greedy_tokens
    from .evaluate.timing import chat_prompt_ids
    prompt = chat_prompt_ids(tokenizer)
    reference = greedy_tokens(models["original"], prompt, new_tokens)
    return {name: agreement(m, prompt, reference) for name, m in models.items() if name != "original"}


def cmd_check_predictions(args) -> int:
    from .evaluate.predictions import TOLERANCE, check_predictions
    _set_threads(args.threads)
    labels = [o.strip() for o in args.options.split(",")] if args.options else None
    check = check_predictions(args.model, new_tokens=args.new_tokens, repeats=args.repeats, labels=labels,
                              prefill_tokens=args.prompt_len, progress=not args.quiet)
    print(check.table())
    worst = max(abs(e) for e in check.errors().values())
    print(f"worst error {100 * worst:.1f}% (target: within ±{100 * TOLERANCE:.0f}%): "
          f"{'MET' if worst <= TOLERANCE else 'MISSED'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(check.to_dict(), indent=1))
        print(f"wrote {args.json}")
    return 0


def _memory(text: str | None) -> dict:
    """"cuda=8GiB,cpu=64GiB" -> {"cuda": "8GiB", "cpu": "64GiB"}."""
    if not text:
        return {}
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetero-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_inspect_parser, _plan_parser, _check_predictions_parser, _bench_parser, _eval_parser):
        add(sub)
    return parser


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show this machine's hardware")
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure", action="store_true",
                   help="measure this CPU's kernels again and replace the cached figures (~15 s)")
    p.set_defaults(func=cmd_inspect)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show the plan for a model (a folder, a config.json, or 'smollm2')")
    p.add_argument("model")
    p.add_argument("--hardware", default=None, help="a profile such as h100-80gb or cpu-16core (default: this machine)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--full", action="store_true", help="one row per module instead of grouped layers")
    p.add_argument("--max-memory", default=None,
                   help="memory budgets, e.g. cuda=8GiB,cpu=64GiB (a model over the GPU budget is split)")
    p.add_argument("--device-map", default=None,
                   help="pins, e.g. model.layers.31=cpu,lm_head=cuda (values cpu, cuda[:N], offload)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    _add_options(p)
    p.set_defaults(func=cmd_plan)


def _check_predictions_parser(sub) -> None:
    p = sub.add_parser("check-predictions",
                       help="predicted vs measured decode and prompt tokens/s on this CPU, per quantization option")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens of the timed prompt (0: decode only)")
    p.add_argument("--options", default=None,
                   help="comma-separated options to check (default all): original, none, int8 (auto), "
                        "int8-asym, int8 per-group 128, w8a8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the check (measurements, predictions, costs) here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_check_predictions)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="decode/prefill speed, memory and perplexity: original vs accelerated vs peer")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens of text for perplexity (0 skips it)")
    p.add_argument("--no-peer", action="store_true", help="skip torch's quantize_dynamic peer")
    p.add_argument("--onnx", nargs="?", const="float", default=None, choices=("float", "int8", "both"),
                   help="also export the accelerated model to ONNX and run it with ONNX Runtime (CPU) in the same "
                        "run: 'float' (default) dequantizes the INT8 weights once at load and runs fp32 matmuls; "
                        "'int8' lets ONNX Runtime run int8 matmuls on activations quantized in blocks of 32; "
                        "'both' adds both sides (needs onnx, onnxscript, onnxruntime)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the dtype the model is loaded in, for the original and before accelerate() "
                        "(transformers 5 loads most checkpoints in bfloat16); default float32")
    p.add_argument("--out", default=BENCH_OUT, help=f"folder for bench.json and bench.png (default: {BENCH_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_options(p)
    p.set_defaults(func=cmd_bench)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of the original and accelerated model on a text")
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--text", default=None, help="a text file (default: CPython's pydoc_data.topics)")
    p.add_argument("--max-tokens", type=int, default=8192, help="0 scores the whole text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--peer", action="store_true", help="also score torch's quantize_dynamic")
    p.add_argument("--agreement-tokens", type=int, default=128,
                   help="greedy tokens compared with the original's on the bench prompt (0 skips the check)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true")
    _add_options(p)
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HeteroLLMError as exc:
        print(f"hetero-llm: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
