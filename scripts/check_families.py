"""Every causal-LM architecture the installed transformers ships, built tiny from its config:
`accelerate(model, strict=False)` must work (greedy tokens identical with quantize="none") or refuse
with a typed HeteroLLMError, never raise anything else.

    python scripts/check_families.py [--json out.json] [--only llama,qwen3] [--timeout 60]

Per family it prints one line: whether a tiny model could be built and generate at all, then the
outcome of quantize="none" (dynamic cache, static cache, left-padded batch: "identical" or what
differed) and of the default plan (INT8). Exit status 1 if any family gave an untyped exception or
different tokens. Random weights, 2 layers: this checks contracts, not accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import signal
import sys
import time
import warnings

import torch

NEW_TOKENS = 6
MAX_PARAMS = 300_000_000  # what a "tiny" build may hold (the fallback keeps the real widths)


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def stop(*_):
        raise Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def build(model_type: str):
    """A tiny model of `model_type`: the self-check's tiny config, else the layers-only fallback."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from hetero_llm.integrations.tiny import layers_only_config, tiny_config

    errors = []
    for shrink in (tiny_config, layers_only_config):
        try:
            config = shrink(CONFIG_MAPPING[model_type]())
            with torch.device("meta"):  # sized before anything is allocated
                params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if params > MAX_PARAMS:
                raise ValueError(f"{params / 1e6:.0f}M parameters with two layers")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).float().eval()
            references(model)
            return model, shrink.__name__
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - try the next way, report the first
            errors.append(f"{shrink.__name__}: {_short(e)}")
    raise ValueError(" | ".join(errors))


def _vocab(model) -> int:
    from hetero_llm.integrations.hf_adapter import text_config

    return int(min(getattr(text_config(model.config), "vocab_size", 512) or 512, 512))


def scenarios(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, 7), generator=g)
    batch = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones_like(batch)
    batch[1, :3], mask[1, :3] = 0, 0
    return {"dynamic": dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
            "static": dict(input_ids=ids, attention_mask=torch.ones_like(ids), cache_implementation="static"),
            "left-padded": dict(input_ids=batch, attention_mask=mask)}


def generate(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)


def references(model) -> dict:
    """Tokens of the original per scenario it supports (a scenario it cannot run is left out)."""
    out = {}
    for name, inputs in scenarios(_vocab(model)).items():
        try:
            out[name] = generate(model, inputs)
        except Exception as e:  # noqa: BLE001 - transformers' own limit, not ours
            if name == "dynamic":
                raise
    return out


def accelerated_outcome(original, refs: dict, **options) -> tuple[str, bool]:
    """(what happened, ok) for accelerate(copy, strict=False, **options)."""
    from hetero_llm import HeteroLLMError, accelerate

    model = copy.deepcopy(original)
    try:
        model = accelerate(model, strict=False, **options)
    except HeteroLLMError as e:
        return f"refused ({type(e).__name__})", True
    except Exception as e:  # noqa: BLE001 - the finding
        return f"UNTYPED {_short(e)}", False
    parts = "+".join(_parts(model)) or "linears only"
    outcome = []
    for name, want in refs.items():
        try:
            got = generate(model, scenarios(_vocab(original))[name])
        except Exception as e:  # noqa: BLE001
            return f"generate UNTYPED {_short(e)} [{name}]", False
        if options.get("quantize") == "none" and not torch.equal(got, want):
            outcome.append(f"DIFFERS [{name}]")
    if options.get("quantize") == "none":
        return (f"identical [{','.join(refs)}] ({parts})", True) if not outcome else (" ".join(outcome), False)
    plan = model.hetero_plan
    kept = sum(1 for e in plan.entries if e.reason.startswith("self-check"))
    int8 = f"{len(plan.by_action('quantize'))} INT8" + (f", {kept} kept in float by the self-check" if kept else "")
    return f"generates [{','.join(refs)}] ({parts}; {int8})", True


def _parts(model) -> tuple[str, ...]:
    from hetero_llm.planner.swaps import plan_parts

    return plan_parts(model.hetero_plan)


def check(model_type: str, timeout: int) -> dict:
    row = {"family": model_type}
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            original, row["config"] = build(model_type)
            refs = references(original)
    except Exception as e:  # noqa: BLE001 - not buildable tiny, or not a text generator
        row.update(built=False, why=str(e) if isinstance(e, ValueError) else _short(e), ok=True)
        return row
    row["built"] = True
    for label, options in (("none", dict(quantize="none")), ("default", {})):
        try:
            with time_limit(timeout):
                row[label], ok = accelerated_outcome(original, refs, **options)
        except Timeout as e:
            row[label], ok = f"TIMEOUT {e}", False
        row["ok"] = row.get("ok", True) and ok
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="comma-separated model types")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per family and step")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    families = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(families)} causal-LM types")
    rows = []
    for family in families:
        row = check(family, args.timeout)
        rows.append(row)
        if row["built"]:
            print(f"{family:28} {'ok ' if row['ok'] else 'BAD'} none: {row['none']} | default: {row['default']}",
                  flush=True)
        else:
            print(f"{family:28} --- not built tiny: {row['why']}", flush=True)
    built = [r for r in rows if r["built"]]
    bad = [r["family"] for r in rows if not r["ok"]]
    identical = [r for r in built if r["none"].startswith("identical")]
    refused = [r for r in built if r["none"].startswith("refused")]
    print(f"\n{len(rows)} types: {len(rows) - len(built)} cannot be built tiny or generate on their own; of "
          f"{len(built)} built: {len(identical)} identical with quantize='none', {len(refused)} refused with a "
          f"typed error, {len(bad)} failing{': ' + ', '.join(bad) if bad else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
