"""Plan rendering: a plain-text table for terminals, HTML for Jupyter.

Each function takes a `Plan` (plan.py), which imports this module to render itself: the
functions read its attributes and do not import it back."""
from __future__ import annotations

import re
from typing import Callable

_INDEX = re.compile(r"\.(\d+)\.")
COLUMNS = ("module", "type", "role", "action", "kernel", "quant", "prune", "shard", "decode µs", "reason")


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)


def plan_rows(plan, full: bool = False) -> list[dict[str, str]]:
    """Rows for display; identical decisions in numbered layers collapse into one row."""
    groups: dict[tuple, list] = {}
    for e in plan.entries:
        m = None if full else _INDEX.search(e.name)
        pattern = _INDEX.sub(".{i}.", e.name, count=1) if m else e.name
        key = (pattern, e.module_type, e.role, e.action, e.kernel, e.quant, e.prune, e.shard, e.reason,
               round(e.decode_us_before, 1), round(e.decode_us_after, 1))
        groups.setdefault(key, []).append(int(m.group(1)) if m else None)
    rows = []
    for key, idx in groups.items():
        pattern, mtype, role, action, kernel, quant, prune, shard, reason, before, after = key
        name = pattern.replace("{i}", "{" + _ranges([i for i in idx if i is not None]) + "}")
        count = f" ×{len(idx)}" if len(idx) > 1 else ""
        timing = f"{before:g} → {after:g}{count}" if (before or after) else ""
        rows.append(dict(zip(COLUMNS, (name, mtype, role, action, kernel, quant or "-", prune or "-",
                                       shard or "-", timing, reason))))
    return rows


def _header(plan) -> list[str]:
    hw = plan.hardware.get("name", "?")
    lines = [f"hetero_llm plan · {plan.model_type} (family: {plan.family or 'unknown'}) · "
             f"device {plan.device} · hardware: {hw}"]
    p = plan.prediction
    if p is not None and plan.device_map:  # the model as it was would not fit: compare with the alternatives
        lines.append(f"predicted decode: {p.decode_ms_after:.2f} ms/step across {', '.join(plan.devices)} · "
                     f"weights {p.weight_mb_before:.1f} MB → {p.weight_mb_after:.1f} MB")
    elif p is not None:
        lines.append(f"predicted decode: {p.decode_ms_before:.2f} ms/token → {p.decode_ms_after:.2f} ms/token "
                     f"({p.decode_speedup:.2f}x) · weights {p.weight_mb_before:.1f} MB → {p.weight_mb_after:.1f} MB")
    if p is not None and p.prefill_ms_after:
        lines.append(f"predicted prompt ({plan.options.get('workload', {}).get('prompt_len', '?')} tokens): "
                     f"{p.prefill_ms_before:.1f} ms → {p.prefill_ms_after:.1f} ms")
    for name, ms in (p.alternatives.items() if p is not None else ()):
        lines.append(f"alternative: {name}: {ms:.2f} ms/step ({ms / p.decode_ms_after:.1f}x the plan's time)")
    counts = {a: len(plan.by_action(a)) for a in ("quantize", "swap", "keep", "skip")}
    lines.append("modules: " + ", ".join(f"{n} {a}" for a, n in counts.items() if n)
                 + (f"; {len(plan.fusions)} fused groups" if plan.fusions else ""))
    if plan.model_settings:
        lines.append("model: " + ", ".join(f"{k}={v}" for k, v in plan.model_settings.items()))
    lines.extend(f"note: {n}" for n in plan.notes)
    lines.extend(_rank_lines(plan))
    return lines


def _span(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1] - 1}" if r[1] - r[0] > 1 else str(r[0])


def _rank_lines(plan) -> list[str]:
    """One line per rank of a tp/pp plan: what that process holds."""
    par = plan.parallel
    if par is None:
        return []
    lines = [f"ranks: tp={par.tp} x pp={par.pp} (torchrun --nproc-per-node {par.tp * par.pp}), "
             f"timeout {par.timeout_s:g} s; one process would hold {par.single_weight_mb:.1f} MB"]
    for r in par.ranks:
        parts = [f"rank {r.rank}: stage {r.stage} layers {_span(r.layers)}"]
        if par.tp > 1:
            parts.append(f"q heads {_span(r.q_heads)}, kv heads {_span(r.kv_heads)}, mlp {r.mlp[0]}:{r.mlp[1]}")
            parts.append(f"vocab {r.vocab[0]}:{r.vocab[1]}" if r.vocab else "vocab replicated")
        parts.append(f"{r.weight_mb:.1f} MB ({r.weight_mb / max(par.single_weight_mb, 1e-9):.2f}x)")
        lines.append("  " + " · ".join(parts))
    return lines


def plan_table(plan, full: bool = False) -> str:
    rows = plan_rows(plan, full)
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS[:-1]}
    def fmt(r: dict[str, str]) -> str:
        return "  ".join(r[c].ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + r["reason"]
    sep = "-" * (sum(widths.values()) + 2 * len(widths) + 6)
    body = [fmt(dict(zip(COLUMNS, COLUMNS))), sep] + [fmt(r) for r in rows]
    return "\n".join(_header(plan) + [""] + body)


def plan_html(plan, esc: Callable[[str], str]) -> str:
    head = "".join(f"<div>{esc(line)}</div>" for line in _header(plan))
    th = "".join(f"<th style='text-align:left'>{esc(c)}</th>" for c in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{esc(r[c])}</td>" for c in COLUMNS) + "</tr>"
                  for r in plan_rows(plan))
    return f"<div class='hetero-llm-plan'>{head}<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>"
