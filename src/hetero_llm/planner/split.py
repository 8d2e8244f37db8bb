"""Placement across devices when the model does not fit in GPU memory.

The model is cut into top-level blocks (embedding, each decoder layer, final norm, lm_head).
Everything starts on the GPU; while the GPU's weights and KV cache exceed its budget, the
first blocks move off it (embedding, then layers 0, 1, ...), so the CPU part is one prefix and
activations cross the boundary once per step. Each moved layer is costed both ways:

- computed on the CPU, with the CPU's own plan for it (INT8 weight-only on the CPU kernels);
- kept in CPU memory and streamed to the GPU every step (pinned copies), then computed there.

The cheaper way is chosen; the other, and accelerate's device_map offload under the same budget
(fill the GPU in module order, stream the rest from pageable memory every step), are recorded in
the prediction's alternatives. User pins (device_map) are kept as given.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .cost import CostModel, transfer_us
from ..plan import PlanEntry

GPU_RESERVE = 0.9  # share of GPU memory for weights and KV cache; the rest is CUDA context and activations
CPU_RESERVE = 0.8


@dataclass(frozen=True)
class Block:
    """A top-level block and the entries inside it, planned for the GPU and for the CPU."""

    name: str
    kind: str  # "embed" | "layer" | "other"
    gpu: tuple[PlanEntry, ...]
    cpu: tuple[PlanEntry, ...]
    gpu_bytes: int
    cpu_bytes: int
    kv_bytes: float  # KV cache this block holds for the workload (layers only)

    def us(self, side: str, after: bool = True) -> float:
        entries = self.gpu if side == "gpu" else self.cpu
        return sum(e.decode_us_after if after else e.decode_us_before for e in entries)


@dataclass(frozen=True)
class Split:
    """The chosen placement: block -> device, the offloaded blocks, predicted ms and why."""

    device_map: dict[str, str]
    offload: tuple[str, ...]
    decode_ms: float
    alternatives: dict[str, float]
    notes: tuple[str, ...]
    moved: dict[str, str]  # block -> reason, for the entries' reasons


def block_of(name: str, layers_prefix: str | None) -> str:
    """The top-level block a module belongs to: "model.layers.3" for its sublayers, else itself
    cut at the first level under the model body."""
    if layers_prefix and name.startswith(layers_prefix + "."):
        rest = name[len(layers_prefix) + 1:]
        return f"{layers_prefix}.{rest.split('.', 1)[0]}"
    return name


def _fits(blocks: list[Block], on_gpu: set[str], budget: float) -> bool:
    return sum(b.gpu_bytes + b.kv_bytes for b in blocks if b.name in on_gpu) <= budget


def _moved_us(b: Block, gpu: CostModel, stream: bool) -> float:
    if stream:  # weights copied from pinned CPU memory every step, then the GPU computes
        return transfer_us(gpu.costs, b.gpu_bytes, pinned=True) + b.us("gpu")
    return b.us("cpu")


def _accelerate_offload_ms(blocks: list[Block], gpu: CostModel, budget: float) -> float:
    """accelerate's infer_auto_device_map + dispatch_model under the same budget: the GPU is
    filled in module order (leaving room for the largest layer, as accelerate does) and every
    other block streams from pageable CPU memory each step, in the model's dtype, unfused."""
    room = budget - max(b.gpu_bytes for b in blocks)
    used, t = 0.0, gpu.step_us("sdpa")
    for b in blocks:
        t += b.us("gpu", after=False)
        if used + b.gpu_bytes + b.kv_bytes <= room:
            used += b.gpu_bytes + b.kv_bytes
        else:
            t += transfer_us(gpu.costs, b.gpu_bytes, pinned=False)
    return t / 1e3


def _fill_gpus(blocks: list[Block], on_gpu: list[str], budgets: list[float]) -> dict[str, str]:
    """Contiguous runs of GPU blocks over GPUs 0, 1, ... in order (one crossing per GPU boundary)."""
    out, gpu, used = {}, 0, 0.0
    size = {b.name: b.gpu_bytes + b.kv_bytes for b in blocks}
    for name in on_gpu:
        if used + size[name] > budgets[gpu] and gpu + 1 < len(budgets) and used > 0:
            gpu, used = gpu + 1, 0.0
        out[name] = f"cuda:{gpu}"
        used += size[name]
    return out


def plan_split(blocks: list[Block], gpu: CostModel, pins: dict[str, str], budgets: list[float],
               cpu_budget: float, crossing_bytes: float, step_us: float) -> Split | None:
    """The cheapest placement within the budgets (one per GPU), or None when everything fits on GPU 0."""
    gpu_budget = sum(budgets)
    pinned_off = {n for n, d in pins.items() if d in ("cpu", "offload")}
    on_gpu = {b.name for b in blocks} - pinned_off
    if not pins and _fits(blocks, on_gpu, budgets[0]):
        return None
    movable = [b for b in blocks if b.name not in pins and b.kind in ("embed", "layer")]
    moved_auto: list[Block] = []
    for b in movable:  # a prefix: embedding first, then the first layers
        if _fits(blocks, on_gpu, gpu_budget):
            break
        on_gpu.discard(b.name)
        moved_auto.append(b)
    notes = []
    if not _fits(blocks, on_gpu, gpu_budget):
        notes.append(f"even with every decoder layer off the GPU the rest needs more than its budget "
                     f"({gpu_budget / 2**30:.1f} GiB): raise max_memory for the GPU")
    layers = [b for b in moved_auto if b.kind == "layer"]
    t_cpu = sum(_moved_us(b, gpu, stream=False) for b in layers)
    t_stream = sum(_moved_us(b, gpu, stream=True) for b in layers)
    stream = t_stream < t_cpu
    device_map, offload, moved = {}, [], {}
    gpu_of = _fill_gpus(blocks, [b.name for b in blocks if b.name in on_gpu and b.name not in pins], budgets)
    for b in blocks:
        pin = pins.get(b.name)
        if pin == "offload" or (b in layers and stream):
            device_map[b.name] = "cuda:0"
            offload.append(b.name)
        elif pin is not None:
            device_map[b.name] = pin
        else:
            device_map[b.name] = "cpu" if b in moved_auto and not (b in layers and stream) else gpu_of[b.name]
    for b in layers:
        how = "streamed to the GPU each step" if stream else "computed on the CPU"
        other = "computing it on the CPU" if stream else "streaming its weights to the GPU each step"
        moved[b.name] = (f"over the GPU budget ({gpu_budget / 2**30:.1f} GiB): {how}, predicted "
                         f"{_moved_us(b, gpu, stream):.0f} µs/step vs {_moved_us(b, gpu, not stream):.0f} µs {other}")
    for b in moved_auto:
        if b.kind == "embed":
            moved[b.name] = "over the GPU budget: the lookup runs on the CPU (one row per token)"
    crossings = sum(1 for a, b in zip(blocks, blocks[1:]) if device_map[a.name] != device_map[b.name])
    t_cross = crossings * transfer_us(gpu.costs, crossing_bytes, pinned=True)
    chosen = step_us + sum(_block_us(b, device_map, offload, gpu) for b in blocks) + t_cross
    alternatives = {"accelerate device_map, same budget": _accelerate_offload_ms(blocks, gpu, gpu_budget)}
    if layers:
        key = "moved layers computed on the CPU" if stream else "moved layers streamed to the GPU (pinned)"
        alternatives[key] = (chosen - (t_stream if stream else t_cpu) + (t_cpu if stream else t_stream)) / 1e3
    cpu_held = sum((b.gpu_bytes if b.name in offload else b.cpu_bytes) for b in blocks
                   if device_map[b.name] == "cpu" or b.name in offload)
    if cpu_held > cpu_budget:
        notes.append(f"the CPU part needs {cpu_held / 2**30:.1f} GiB, over its budget "
                     f"({cpu_budget / 2**30:.1f} GiB): the model does not fit this machine")
    return Split(device_map, tuple(offload), chosen / 1e3, alternatives, tuple(notes), moved)


def _block_us(b: Block, device_map: dict[str, str], offload: list[str], gpu: CostModel) -> float:
    if b.name in offload:
        return _moved_us(b, gpu, stream=True)
    return b.us("cpu") if device_map[b.name] == "cpu" else b.us("gpu")


def place_entries(entries: list[PlanEntry], split: Split, layers_prefix: str | None,
                  cpu_entries: dict[str, PlanEntry]) -> list[PlanEntry]:
    """The plan's entries after the split: CPU blocks take their CPU-planned entries."""
    out = []
    for e in entries:
        block = block_of(e.name, layers_prefix)
        dev = split.device_map.get(block, "cuda:0")
        chosen = cpu_entries[e.name] if dev == "cpu" else e
        reason = split.moved.get(block)
        if reason and e.name == block or (reason and e.role == "attention"):
            chosen = replace(chosen, reason=f"{reason}; {chosen.reason}" if chosen.reason else reason)
        out.append(replace(chosen, device="cpu" if dev == "cpu" else dev))
    return out
