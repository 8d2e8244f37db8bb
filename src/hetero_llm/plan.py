"""The Plan: pure data describing what to do to each module, and why.

A plan can be made on one machine, saved as JSON, edited, and applied on
another. `to_json`/`from_json` round-trip exactly (floats are written with
repr precision).
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import PlanMismatchError

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanEntry:
    """The decision for one module.

    action: "quantize" | "swap" (replaced by a faster equivalent) | "keep"
    (left as is, on purpose) | "skip" (left as is: we do not know it).
    decode_us_before/after: predicted time per decoded token on `device`.
    """

    name: str
    module_type: str
    role: str
    action: str
    device: str
    kernel: str
    quant: str | None = None
    prune: str | None = None
    shard: str | None = None
    reason: str = ""
    params: int = 0
    decode_us_before: float = 0.0
    decode_us_after: float = 0.0


@dataclass(frozen=True)
class Fusion:
    """Linears that read one input, computed as a single matmul.

    kind "qkv" (or "gate_up"): the members become slices of one fused matmul.
    kind "gated_mlp": the MLP module at `name` is replaced whole by a fused one.
    """

    name: str
    members: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class Prediction:
    """Whole-model predictions from the cost model.

    decode_ms_*: one decode step (all sequences of the workload's batch), before and after.
    prefill_ms_*: one prompt of the workload's length. alternatives: decode ms/step of
    placements the planner costed and did not choose (e.g. accelerate's device_map offload),
    so a plan shows what it beat.
    """

    decode_ms_before: float
    decode_ms_after: float
    weight_mb_before: float
    weight_mb_after: float
    prefill_ms_before: float = 0.0
    prefill_ms_after: float = 0.0
    alternatives: dict[str, float] = field(default_factory=dict)

    @property
    def decode_speedup(self) -> float:
        return self.decode_ms_before / self.decode_ms_after if self.decode_ms_after > 0 else 1.0


@dataclass(frozen=True)
class RankShare:
    """What one rank holds: its pipeline stage's layers, its tp slice, and the weight bytes."""

    rank: int
    stage: int
    tp_rank: int
    layers: tuple[int, int]
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]
    vocab: tuple[int, int] | None
    weight_mb: float


@dataclass(frozen=True)
class ParallelPlan:
    tp: int
    pp: int
    vocab_parallel: bool
    micro_batches: int
    timeout_s: float
    ranks: tuple[RankShare, ...]
    single_weight_mb: float  # the same plan in one process, for comparison

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParallelPlan":
        def share(r: dict) -> RankShare:
            vocab = r.get("vocab")
            return RankShare(**{**r, "layers": tuple(r["layers"]), "q_heads": tuple(r["q_heads"]),
                                "kv_heads": tuple(r["kv_heads"]), "mlp": tuple(r["mlp"]),
                                "vocab": None if vocab is None else tuple(vocab)})
        return cls(**{**d, "ranks": tuple(share(r) for r in d["ranks"])})

    def stage_of_layer(self, index: int) -> int:
        return next(r.stage for r in self.ranks if r.layers[0] <= index < r.layers[1])


@dataclass(frozen=True)
class Plan:
    """Every decision hetero_llm makes for one model on one machine."""

    model_type: str
    family: str | None
    device: str
    hardware: dict[str, Any]
    options: dict[str, Any]
    entries: tuple[PlanEntry, ...]
    fusions: tuple[Fusion, ...] = ()
    model_settings: dict[str, Any] = field(default_factory=dict)
    prediction: Prediction | None = None
    notes: tuple[str, ...] = ()
    # Multi-device placement: top-level blocks (embedding, decoder layers, final norm, lm_head)
    # -> execution device ("cpu", "cuda:0", ...). Empty: the whole model runs on `device`.
    device_map: dict[str, str] = field(default_factory=dict)
    # Blocks whose weights stay in CPU memory and are copied to their device every forward.
    offload: tuple[str, ...] = ()
    # tp/pp > 1: what each rank of the torchrun job holds. None: one process.
    parallel: ParallelPlan | None = None
    version: int = PLAN_VERSION

    # -- lookups -------------------------------------------------------------
    def entry(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def devices(self) -> list[str]:
        """Every device the plan runs on, main device first."""
        main = "cuda:0" if self.device == "cuda" else self.device
        return list(dict.fromkeys([main, *self.device_map.values()]))

    def device_of(self, name: str) -> str:
        """Execution device of module `name`: its block's entry in device_map, else the main device."""
        for prefix, dev in self.device_map.items():
            if name == prefix or name.startswith(prefix + "."):
                return dev
        return "cuda:0" if self.device == "cuda" else self.device

    def by_action(self, action: str) -> list[PlanEntry]:
        return [e for e in self.entries if e.action == action]

    def with_entry(self, name: str, **changes: Any) -> "Plan":
        """A copy with one entry edited (pinning a decision by hand).

        A fused group that involves the edited module is dropped (its other
        members run unfused), since its members may no longer match.
        """
        self.entry(name)
        broken = [f for f in self.fusions if name == f.name or name in f.members]
        unfuse = {m for f in broken for m in f.members} | {f.name for f in broken}

        def edit(e: PlanEntry) -> PlanEntry:
            if e.name == name:
                return replace(e, **changes)
            if e.name in unfuse:
                return replace(e, kernel=e.kernel.split("+", 1)[0] if "+fused:" in e.kernel else e.kernel)
            return e
        settings, notes = self.model_settings, self.notes
        # The decode steps need every attention fused, and the native one INT8 linears: an edit that may
        # break that decodes with transformers' loop (re-plan to get the step back).
        decode = settings.get("decode")
        if ((decode in ("cuda_graph", "static", "native") and any(f.kind == "rotary_attention" for f in broken))
                or (decode == "native" and {"action", "quant"} & set(changes))):
            settings = {**settings, "decode": "transformers"}
            notes = tuple(n for n in notes if not n.startswith("decode:")) + (
                f"decode: transformers' generate loop (the edit of {name} may break what decode={decode!r} needs)",)
        return replace(self, entries=tuple(edit(e) for e in self.entries),
                       fusions=tuple(f for f in self.fusions if f not in broken), model_settings=settings, notes=notes)

    # -- serialization -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["entries"] = [asdict(e) for e in self.entries]
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict):
            raise PlanMismatchError(f"not a valid hetero_llm plan: expected a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise PlanMismatchError(
                f"plan version {version!r} is not supported by this hetero_llm (reads version "
                f"{PLAN_VERSION}); re-plan the model with hetero_llm.plan().")
        try:
            pred = d.get("prediction")
            return cls(
                model_type=d["model_type"], family=d["family"], device=d["device"],
                hardware=d["hardware"], options=d["options"],
                entries=tuple(PlanEntry(**e) for e in d["entries"]),
                fusions=tuple(Fusion(f["name"], tuple(f["members"]), f["kind"]) for f in d["fusions"]),
                model_settings=dict(d.get("model_settings", {})),
                prediction=Prediction(**pred) if pred else None,
                notes=tuple(d.get("notes", ())), device_map=dict(d.get("device_map", {})),
                offload=tuple(d.get("offload", ())),
                parallel=ParallelPlan.from_dict(d["parallel"]) if d.get("parallel") else None, version=version)
        except (KeyError, TypeError) as exc:
            raise PlanMismatchError(f"not a valid hetero_llm plan: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanMismatchError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # -- display -------------------------------------------------------------
    def rows(self, full: bool = False) -> list[dict[str, str]]:
        from .plan_display import plan_rows
        return plan_rows(self, full)

    def table(self, full: bool = False) -> str:
        """Plain-text table; layers with identical decisions are grouped unless full=True."""
        from .plan_display import plan_table
        return plan_table(self, full)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from .plan_display import plan_html
        return plan_html(self, html.escape)
