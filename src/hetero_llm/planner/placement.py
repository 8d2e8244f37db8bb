"""From a GPU plan to a placement across GPU and CPU when the GPU's budget is too small.

Builds the blocks (split.py decides), merges the CPU-planned entries and fused groups of the
blocks that leave the GPU, and re-predicts the decode step.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..config import Options
from ..hardware import Hardware
from .cost import CostModel
from ..plan import Fusion, PlanEntry, Prediction
from .predict import attention_style, entry_weight_bytes
from .profile import ModuleProfile
from .split import CPU_RESERVE, GPU_RESERVE, Block, block_of, place_entries, plan_split

KV_CONTEXT_FACTOR = 2  # the KV cache is sized for the prompt plus as many new tokens


def _blocks(profiles: list[ModuleProfile], tied: set[str], gpu_entries: dict[str, PlanEntry],
            cpu_entries: dict[str, PlanEntry], layers_prefix: str | None, kv_per_layer: float) -> list[Block]:
    shares = {side: any(e.action == "quantize" and e.role == "embed" for e in es.values())
              for side, es in (("gpu", gpu_entries), ("cpu", cpu_entries))}
    grouped: dict[str, list[ModuleProfile]] = {}
    for p in profiles:
        grouped.setdefault(block_of(p.name, layers_prefix), []).append(p)
    blocks = []
    for name, ps in grouped.items():
        is_layer = bool(layers_prefix) and name.startswith(layers_prefix + ".")
        roles = {p.role for p in ps}
        # A tied embedding shares its table with lm_head: it stays with the head, on the GPU.
        kind = "layer" if is_layer else "embed" if roles == {"embed"} and not tied else "other"
        size = {side: sum(entry_weight_bytes(p, es[p.name], shares[side], p.name in tied) for p in ps)
                for side, es in (("gpu", gpu_entries), ("cpu", cpu_entries))}
        blocks.append(Block(name, kind, tuple(gpu_entries[p.name] for p in ps),
                            tuple(cpu_entries[p.name] for p in ps), size["gpu"], size["cpu"],
                            kv_per_layer if is_layer else 0.0))
    return blocks


def split_for_budget(spec, profiles: list[ModuleProfile], tied: set[str], hardware: Hardware,
                     options: Options, entries: dict[str, PlanEntry], fusions: list[Fusion], gpu_cm: CostModel,
                     kv_bytes: float, hidden: int, prediction: Prediction,
                     cpu_plan: Callable[[], tuple]) -> tuple | None:
    """(entries, fusions, prediction, device_map, offload, notes) of a split, or None if the
    model fits on the GPU and nothing is pinned elsewhere."""
    placement = options.placement
    budgets = [placement.max_memory.get(f"cuda:{g.index}", GPU_RESERVE * g.memory_bytes) for g in hardware.gpus]
    gpu_budget = budgets[0]
    cpu_budget = placement.max_memory.get("cpu", CPU_RESERVE * hardware.cpu.memory_bytes)
    work = options.workload
    kv_layer = kv_bytes * work.batch_size * work.prompt_len * KV_CONTEXT_FACTOR
    weights = prediction.weight_mb_after * 2**20
    n_layers = sum(1 for p in profiles if p.kind == "attention")
    if not placement.device_map and weights + n_layers * kv_layer <= gpu_budget:
        return None
    cpu_entries, cpu_fusions, _, _ = cpu_plan()
    layers_prefix = spec.layers if spec is not None else None
    blocks = _blocks(profiles, tied, entries, cpu_entries, layers_prefix, kv_layer)
    styles = [attention_style(e.kernel) for e in entries.values() if e.role == "attention"]
    step = gpu_cm.step_us(styles[0] if styles else "sdpa")
    crossing = 4.0 * work.batch_size * hidden  # one step's hidden states, fp32 at most
    split = plan_split(blocks, gpu_cm, dict(placement.device_map), budgets, cpu_budget, crossing, step)
    if split is None:
        return None
    placed = place_entries(list(entries.values()), split, layers_prefix, cpu_entries)
    on_cpu = {b for b, d in split.device_map.items() if d == "cpu"}
    merged = [f for f in fusions if block_of(f.name, layers_prefix) not in on_cpu]
    merged += [f for f in cpu_fusions if block_of(f.name, layers_prefix) in on_cpu]
    held = sum(b.cpu_bytes if split.device_map.get(b.name) == "cpu" else b.gpu_bytes for b in blocks)
    alternatives = dict(split.alternatives)
    if len(hardware.gpus) > 1:
        alternatives.update(tensor_parallel_ms(blocks, gpu_cm, step, len(hardware.gpus), hidden * work.batch_size))
    # prefill_ms: not predicted across devices yet (0 hides it)
    pred = replace(prediction, decode_ms_after=split.decode_ms, alternatives=alternatives,
                   prefill_ms_before=0.0, prefill_ms_after=0.0,
                   weight_mb_after=held / 2**20)
    gpu_gib = sum(b.gpu_bytes + b.kv_bytes for b in blocks
                  if split.device_map.get(b.name, "cuda:0") != "cpu" and b.name not in split.offload) / 2**30
    n_gpus = len({d for d in split.device_map.values() if d != "cpu"})
    n_cpu = sum(1 for b in blocks if b.kind == "layer" and b.name in on_cpu)
    n_off = sum(1 for b in blocks if b.name in split.offload)
    notes = [f"split across devices: {n_cpu} layers computed on the CPU, {n_off} streamed to the GPU, "
             f"the rest on {n_gpus} GPU(s) ({gpu_gib:.1f} GiB of weights and KV cache; GPU 0's budget "
             f"{gpu_budget / 2**30:.1f} GiB)",
             *split.notes]
    return placed, merged, pred, split.device_map, split.offload, notes


ALLREDUCE_US = 15.0  # one small all-reduce over NVLink (latency-bound at decode)
NVLINK_GBS = 300.0


def tensor_parallel_ms(blocks: list[Block], gpu: CostModel, step_us: float, n_gpus: int,
                       activation_elems: int) -> dict[str, float]:
    """Predicted decode ms/step of tp = 2, 4, ... (up to n_gpus) over torchrun: each rank
    streams 1/tp of the weights, and every layer pays two all-reduces of its activations."""
    out = {}
    tp = 2
    while tp <= n_gpus:
        allreduce = ALLREDUCE_US + 2 * activation_elems * 2 / (NVLINK_GBS * 1e3)
        t = step_us
        for b in blocks:
            linears = sum(e.decode_us_after for e in b.gpu if e.role not in ("attention",) and "norm" not in e.role)
            rest = b.us("gpu") - linears
            t += linears / tp + rest + (2 * allreduce if b.kind == "layer" else 0.0)
        out[f"tp={tp} over torchrun, all on GPUs"] = t / 1e3
        tp *= 2
    return out
