"""Turn a BenchResult into a text table, a JSON file and a PNG chart."""
from __future__ import annotations

from pathlib import Path

from ..errors import HeteroLLMError
from .bench import BenchResult
from .peers import PEERS

ACCELERATED = "hetero_llm"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(ratio: float | None, digits: int = 2) -> str:
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.{digits}f}%"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _tokens(v) -> str:
    """Greedy tokens against the baseline's: "identical", or the teacher-forced agreement."""
    if v.tokens_identical is None:
        return "-"
    return "identical" if v.tokens_identical else f"{100 * v.token_agreement:.1f}%"


def _rows(result: BenchResult) -> list[list[str]]:
    base = result.baseline
    header = [
        "variant", "decode tok/s", f"vs {base}", "prefill tok/s", f"vs {base}",
        "weights MB", "peak RSS +MB", "perplexity", f"ppl vs {base}", f"tokens vs {base}",
    ]
    rows = [header]
    for v in result.variants:
        # Wrong output is no speedup: its ratios are not shown as one.
        speed = (lambda ratio: "FAIL") if v.accuracy_failure else _x
        rows.append([
            v.name,
            _num(v.decode_tok_s, 1),
            speed(result.ratio(v.name, "decode_tok_s")),
            _num(v.prefill_tok_s, 1),
            speed(result.ratio(v.name, "prefill_tok_s")),
            _num(v.weight_mb, 1),
            _num(v.peak_rss_delta_mb, 1),
            _num(v.perplexity, 3),
            _pct(result.ratio(v.name, "perplexity")),
            _tokens(v),
        ])
    return rows


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # The name column reads best left-aligned, numbers right-aligned.
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _peer_lines(result: BenchResult) -> list[str]:
    """One line per (hetero_llm, peer) pair present, ratios taken between the two."""
    names = {v.name for v in result.variants}
    if ACCELERATED not in names or result.variant(ACCELERATED).accuracy_failure:
        return []
    lines = []
    # ONNX Runtime sides (`hetero-llm bench --onnx`) run our exported model: compared the same way.
    others = [v.name for v in result.variants if v.name.startswith("onnxruntime")]
    for peer in [p for p in PEERS if p in names] + others:
        text = (
            f"{ACCELERATED} vs {peer}: "
            f"decode {_x(result.ratio(ACCELERATED, 'decode_tok_s', peer))}, "
            f"prefill {_x(result.ratio(ACCELERATED, 'prefill_tok_s', peer))}"
        )
        ours = result.ratio(ACCELERATED, "perplexity")
        theirs = result.ratio(peer, "perplexity")
        if ours is not None and theirs is not None:
            text += f", perplexity {_pct(ours, 1)} vs {_pct(theirs, 1)}"
        lines.append(text)
    return lines


def _title(result: BenchResult) -> str:
    s = result.settings
    parts = [
        f"decode {s.get('new_tokens', '?')} tokens",
        f"prefill {s.get('prompt_len', '?')} tokens",
        f"median of {s.get('repeats', '?')} interleaved rounds",
        f"{s.get('threads', '?')} threads",
    ]
    if s.get("ppl_tokens"):
        parts.append(f"perplexity on {s['ppl_tokens']} tokens")
    return f"{result.model or 'model'}: " + ", ".join(parts)


def format_table(result: BenchResult) -> str:
    """Aligned before/after table; ratios are against the first (baseline) variant.

    When a ``hetero_llm`` variant and a known peer were both measured, a line per
    peer compares them directly.
    """
    lines = [_title(result), "", *_align(_rows(result))]
    peer_lines = _peer_lines(result)
    if peer_lines:
        lines += ["", *peer_lines]
    failures = [f"{v.name}: FAILED: {v.accuracy_failure}" for v in result.variants if v.accuracy_failure]
    if failures:
        lines += ["", *failures]
    return "\n".join(lines)


def save_json(result: BenchResult, path) -> Path:
    """Write ``result.to_json()`` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.to_json() + "\n", encoding="utf-8")
    return path


def _bar_panel(ax, names, values, title, digits) -> None:
    shown = [0.0 if v is None else v for v in values]
    bars = ax.bar(names, shown, color=[f"C{i}" for i in range(len(names))])
    labels = ["n/a" if v is None else f"{v:.{digits}f}" for v in values]
    ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.margins(y=0.15)  # room for the value labels above the tallest bar


def save_chart(result: BenchResult, path) -> Path:
    """Save a PNG with bar charts of decode tok/s, prefill tok/s and perplexity."""
    try:
        # A bare Figure renders PNG through Agg without pyplot, so no display is
        # needed and the caller's global backend (a notebook's, say) is left alone.
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise HeteroLLMError("saving a chart needs matplotlib: pip install matplotlib") from exc

    names = [v.name for v in result.variants]
    panels = [
        ([v.decode_tok_s for v in result.variants], "decode tok/s (higher is better)", 1),
        ([v.prefill_tok_s for v in result.variants], "prefill tok/s (higher is better)", 1),
    ]
    if any(v.perplexity is not None for v in result.variants):
        panels.append(([v.perplexity for v in result.variants], "perplexity (lower is better)", 2))
    fig = Figure(figsize=(4.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (values, title, digits) in zip(axes, panels):
        _bar_panel(ax, names, values, title, digits)
    fig.suptitle(result.model or "benchmark")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path
