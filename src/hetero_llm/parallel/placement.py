"""The place pass: put the model on the device(s) the plan chose.

With an empty `plan.device_map` the whole model goes to `plan.device`. With a device map, each
top-level block (embedding, decoder layers, final norm, lm_head, ...) goes to its device, and:

- activations cross a device boundary once per forward per tensor: a forward pre-hook on each
  block that may receive tensors from elsewhere brings them over through a `Transport`, which
  copies the tensors every layer shares (cos/sin, mask, position ids) once per step;
- blocks in `plan.offload` keep their weights in (pinned) CPU memory and stream them to their
  execution device at every forward, with accelerate's AlignDevicesHook, as accelerate's own
  device_map offload does;
- the logits come back to the device of the inputs (else the first block's), so generate() works.

The weights move now, so the passes after this one (kernels) build their modules on the right
device. The hooks are attached at the model's first forward (`attach_placement`), because those
passes still replace modules (a swapped norm would lose its hook; a fused projection of an
offloaded block would be built from weights no longer there). Everything is recorded on
`model.hetero_placement` and undone by `remove_placement(model)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import HardwareError, PlanMismatchError
from ..plan import Plan
from .offload import offload_block, remove_offload
from .transfer import InputsTo, LogitsTo, OutputsOn, Transport, canonical


@dataclass
class Placement:
    """What place_pass did to one model: enough to finish (attach) and to undo it."""

    labels: dict[str, str]  # block name -> device label, in the model's module order
    offload: tuple[str, ...]
    transport: Transport
    handles: list = field(default_factory=list)  # torch RemovableHandles of our hooks
    offloaded: list[str] = field(default_factory=list)  # blocks carrying an accelerate hook
    attached: bool = False
    previous_device_map: dict | None = None  # a dispatched model's own hf_device_map, restored on removal

    @property
    def main(self) -> str:
        return next(iter(self.labels.values()))


def place_pass(model: nn.Module, plan: Plan) -> None:
    """Put `model` where `plan` says (see the module docstring); hooks attach at the first forward."""
    if not plan.device_map:
        _place_whole(model, plan.device)
        return
    labels = {name: canonical(plan.device_of(name)) for name in _blocks(model, plan)}
    _check_devices(labels, available_devices())
    place(model, labels, plan.offload, {label: physical_device(label) for label in set(labels.values())})


def place(model: nn.Module, labels: dict[str, str], offload: tuple[str, ...] = (),
          resolve: dict[str, torch.device] | None = None) -> Placement:
    """Move each block of `labels` (name -> device label) to `resolve[label]` and arm the hooks.

    `resolve` maps labels to physical devices (identity by default); tests map "cuda:1" to the
    CPU to exercise boundaries on a machine without GPUs.
    """
    resolve = resolve or {label: physical_device(label) for label in set(labels.values())}
    _check_blocks(model, labels, offload)
    labels = _weightless_follow_main(model, labels)
    remove_placement(model)
    for name, label in labels.items():
        model.get_submodule(name).to("cpu" if name in offload else resolve[label])
    _move_unplaced(model, labels, resolve[next(iter(labels.values()))])
    placement = Placement(labels, tuple(offload), Transport(resolve),
                          previous_device_map=getattr(model, "hf_device_map", None))
    model.hetero_placement = placement
    model.hetero_transfers = placement.transport.counter
    model.hf_device_map = {name: _accelerate_style(label, name in offload) for name, label in labels.items()}
    placement.handles.append(model.register_forward_pre_hook(_attach_on_first_forward))
    return placement


def _place_whole(model: nn.Module, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("the plan puts the model on a CUDA GPU but this machine has none; "
                            "re-plan here with hetero_llm.plan(model) or use device='cpu'.")
    current = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if current != {device}:
        model.to(device)


def _blocks(model: nn.Module, plan: Plan) -> list[str]:
    """The device map's blocks in the model's module order (a proxy for execution order)."""
    names = [name for name, _ in model.named_modules() if name in plan.device_map]
    missing = sorted(set(plan.device_map) - set(names))
    if missing:
        raise PlanMismatchError(f"the plan's device_map names {missing[:3]}, which this model lacks; make the "
                                "plan from this model: hetero_llm.plan(model).")
    return names


def available_devices() -> list[str]:
    """Device labels this machine can run on."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def physical_device(label: str) -> torch.device:
    """The torch device a label runs on (tests replace this to pretend a GPU is the CPU)."""
    return torch.device(label)


def _check_devices(labels: dict[str, str], available: list[str]) -> None:
    for name, label in labels.items():
        if label not in available:
            raise HardwareError(
                f"the plan runs {name} on {label}, which this machine does not have (it has "
                f"{', '.join(available)}); re-plan here with hetero_llm.plan(model), passing "
                "max_memory={...} to split the model across the devices that are here.")


def _check_blocks(model: nn.Module, labels: dict[str, str], offload: tuple[str, ...]) -> None:
    """Offload names placed blocks; tied weights share a device and an offload."""
    unknown = [name for name in offload if name not in labels]
    if unknown:
        raise PlanMismatchError(f"plan.offload names {unknown[:3]}, which the device_map does not place; "
                                "list offloaded blocks in plan.device_map with their execution device.")
    owner: dict[int, str] = {}
    for name in labels:
        for t in list(model.get_submodule(name).parameters()) + list(model.get_submodule(name).buffers()):
            other = owner.setdefault(id(t), name)
            if other != name and (labels[other], other in offload) != (labels[name], name in offload):
                raise PlanMismatchError(
                    f"{other} and {name} share a tied weight but the plan places them apart "
                    f"({labels[other]} / {labels[name]}); give both the same device (and offload).")


def _weightless_follow_main(model: nn.Module, labels: dict[str, str]) -> dict[str, str]:
    """Blocks without weights (rotary embeddings) run on the main device, whatever the map says.

    They compute on their input's device (LlamaRotaryEmbedding moves its inv_freq there), so
    placing one elsewhere would only add crossings: the hidden states over to it and its cos/sin
    back to the layers on the main side.
    """
    main = next(iter(labels.values()))
    out = {}
    for name, label in labels.items():
        block = model.get_submodule(name)
        transient = {b for _, m in block.named_modules() for b in m._non_persistent_buffers_set}
        weightless = not any(True for _ in block.parameters()) and all(
            n.rsplit(".", 1)[-1] in transient for n, _ in block.named_buffers())
        out[name] = main if weightless else label
    return out


def _move_unplaced(model: nn.Module, labels: dict[str, str], device: torch.device) -> None:
    """Tensors of modules outside every block go to the main device, one module at a time."""
    def inside(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in labels)
    for name, module in model.named_modules():
        if inside(name):
            continue
        for key, p in module._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)  # in place: a tie to another module survives
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)


def _accelerate_style(label: str, offloaded: bool) -> int | str:
    """hf_device_map values as accelerate writes them: transformers reads this map to skip its
    single-device shortcuts (eager static-cache allocation, compiling over a CPU offload)."""
    if offloaded or label == "cpu":
        return "cpu"
    return int(label.split(":")[1]) if label.startswith("cuda:") else label


def _attach_on_first_forward(model: nn.Module, args: tuple) -> None:
    attach_placement(model)


def attach_placement(model: nn.Module) -> None:
    """Attach the transfer and offload hooks to the model's final modules (idempotent).

    Called by the model's first forward; call it yourself to attach earlier, once every pass has run.
    """
    placement: Placement | None = getattr(model, "hetero_placement", None)
    if placement is None or placement.attached:
        return
    placement.handles.pop(0).remove()  # the first-forward hook
    transport, labels = placement.transport, placement.labels
    previous = None
    for i, (name, label) in enumerate(labels.items()):
        block = model.get_submodule(name)
        # The first block may get inputs from anywhere; the others from the block before, or,
        # like cos/sin and the mask, from the main device.
        if i == 0 or label != previous or label != placement.main:
            placement.handles.append(block.register_forward_pre_hook(InputsTo(transport, label), with_kwargs=True))
        if transport.pretends(label):
            placement.handles.append(block.register_forward_hook(OutputsOn(transport, label)))
        if name in placement.offload:
            offload_block(block, transport.devices[label])
            placement.offloaded.append(name)
        previous = label
    placement.handles.append(model.register_forward_hook(LogitsTo(transport, placement.main), with_kwargs=True))
    placement.attached = True


def remove_placement(model: nn.Module) -> None:
    """Remove every hook place_pass added; weights stay where they are (offloaded ones on the CPU)."""
    placement: Placement | None = getattr(model, "hetero_placement", None)
    if placement is None:
        return
    for handle in placement.handles:
        handle.remove()
    for name in placement.offloaded:
        remove_offload(model.get_submodule(name))  # puts the CPU weights back in the module
    for attr in ("hetero_placement", "hetero_transfers", "hf_device_map"):
        if attr in model.__dict__:
            delattr(model, attr)
    if placement.previous_device_map is not None:
        model.hf_device_map = placement.previous_device_map

