"""Moving activations between the devices of a split model, each distinct tensor once.

In transformers' decoder loop every layer receives the *same* position embeddings (cos, sin),
attention mask and position ids from the model's forward. A hook that simply called `.to()` on
each layer's inputs would copy those again at every layer on the far side of a boundary. The
`Transport` keeps, per destination device, the copy of each source tensor it made, keyed by
`id()` and checked by a weak reference: the next step's tensors are new objects and miss, and
an entry goes away when its source dies, so nothing outlives the step that made it.

Devices are named by *labels* ("cpu", "cuda:0", ...), each resolved to a physical torch device.
When two labels resolve to one physical device (tests on a CPU-only machine pretend that
"cuda:1" is the CPU), the transport is *simulated*: a move is a copy, and the tensors a block
produces are tagged with its label, so the same boundary logic and the same counts as on real
devices can be checked anywhere.
"""
from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def canonical(label: str) -> str:
    """'cuda' means the first GPU, as Plan.devices has it."""
    return "cuda:0" if label == "cuda" else label


def _eager(fn: Callable) -> Callable:
    """Keep a hook out of torch.compile graphs (weak references and dicts do not trace), as
    accelerate does for its own hooks; torch._dynamo is only imported at the first call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not hasattr(wrapper, "_disabled"):
            wrapper._disabled = torch.compiler.disable(fn)
        return wrapper._disabled(*args, **kwargs)
    return wrapper


@dataclass
class TransferCounter:
    """Activation copies between devices, per (source, destination) label pair."""

    count: dict[tuple[str, str], int] = field(default_factory=dict)
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)

    def record(self, src: str, dst: str, nbytes: int) -> None:
        self.count[(src, dst)] = self.count.get((src, dst), 0) + 1
        self.bytes[(src, dst)] = self.bytes.get((src, dst), 0) + nbytes

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def reset(self) -> None:
        self.count.clear()
        self.bytes.clear()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter (nor change in place)
        return -1


class Transport:
    """Brings tensors to a labelled device, copying each live source tensor at most once there."""

    def __init__(self, devices: dict[str, torch.device], counter: TransferCounter | None = None):
        self.devices = {canonical(k): torch.device(v) for k, v in devices.items()}
        self.counter = counter if counter is not None else TransferCounter()
        physical = list(self.devices.values())
        self.simulated = len(set(physical)) < len(physical)
        self._copies: dict[str, dict[int, tuple]] = {label: {} for label in self.devices}
        self._tags: dict[int, tuple] = {}  # simulation only: id -> (weakref, label)

    def __deepcopy__(self, memo: dict) -> Transport:
        # Copies and tags refer to the original's live tensors: a copy starts empty. The counter
        # goes through memo so the copied model's `hetero_transfers` is the copy's counter.
        return Transport(self.devices, copy.deepcopy(self.counter, memo))

    # -- where a tensor is ----------------------------------------------------
    def pretends(self, label: str) -> bool:
        """Simulation: whether `label` names a device other than the one its tensors are on."""
        return canonical(str(self.devices[label])) != label

    def label_of(self, t: torch.Tensor) -> str:
        if self.simulated:
            for candidate in (t, t._base):
                entry = self._tags.get(id(candidate)) if candidate is not None else None
                if entry is not None and entry[0]() is candidate:
                    return entry[1]
        return canonical(str(t.device))

    def tag(self, obj: Any, label: str) -> None:
        """Simulation: mark the tensors in `obj` as living on `label` (a block's outputs)."""
        if isinstance(obj, torch.Tensor):
            self._remember(self._tags, obj, label)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                self.tag(item, label)
        elif isinstance(obj, dict):
            for item in obj.values():
                self.tag(item, label)

    @staticmethod
    def _remember(table: dict[int, tuple], t: torch.Tensor, *value: Any) -> None:
        key = id(t)

        def forget(ref: weakref.ref) -> None:  # the source died: its id may be reused
            if table.get(key, (None,))[0] is ref:
                del table[key]
        table[key] = (weakref.ref(t, forget), *value)

    # -- moving -------------------------------------------------------------
    def fetch(self, t: torch.Tensor, dst: str) -> torch.Tensor:
        """`t` on `dst`: the copy made earlier this step if `t` is alive and unchanged, else a new one."""
        copies = self._copies[dst]
        hit = copies.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == _version(t):
            return hit[2]
        src, device = self.label_of(t), self.devices[dst]
        if self.simulated:
            moved = t.to(device, copy=True)
            self.tag(moved, dst)
        else:  # host-to-device may overlap; device-to-host must be complete before the CPU reads it
            moved = t.to(device, non_blocking=t.device.type == "cpu" and device.type != "cpu")
        self.counter.record(src, dst, t.numel() * t.element_size())
        self._remember(copies, t, _version(t), moved)
        return moved

    def bring(self, obj: Any, dst: str) -> Any:
        """`obj` with every tensor in it (through tuples, lists and dicts) on `dst`.

        Returns `obj` itself when nothing had to move; other objects (a KV cache) are left as
        they are: each cache layer lives on its own layer's device and never crosses.
        """
        if isinstance(obj, torch.Tensor):
            return obj if self.label_of(obj) == dst else self.fetch(obj, dst)
        if isinstance(obj, (tuple, list)):
            items = [self.bring(item, dst) for item in obj]
            if all(a is b for a, b in zip(items, obj)):
                return obj
            return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
        if isinstance(obj, dict):
            moved = {k: self.bring(v, dst) for k, v in obj.items()}
            if all(moved[k] is v for k, v in obj.items()):
                return obj
            if type(obj) is dict:
                return moved
            obj = copy.copy(obj)  # a ModelOutput: keep its class
            for k, v in moved.items():
                obj[k] = v
            return obj
        return obj


class InputsTo:
    """Forward pre-hook (with kwargs): a block's tensor inputs, brought to the block's device."""

    def __init__(self, transport: Transport, label: str):
        self.transport, self.label = transport, label

    @_eager
    def __call__(self, module, args, kwargs):
        new_args, new_kwargs = self.transport.bring(args, self.label), self.transport.bring(kwargs, self.label)
        if new_args is args and new_kwargs is kwargs:
            return None
        return new_args, new_kwargs


class OutputsOn:
    """Forward hook, simulation only: tags a block's outputs with the device it pretends to be."""

    def __init__(self, transport: Transport, label: str):
        self.transport, self.label = transport, label

    def __call__(self, module, args, output):
        self.transport.tag(output, self.label)


class LogitsTo:
    """Forward hook (with kwargs) on the whole model: the logits back on the device of the input
    ids (generate() appends the next token to them there), as accelerate's io_same_device does;
    the main device when there are none. Copies only when the last block left them elsewhere."""

    def __init__(self, transport: Transport, label: str):
        self.transport, self.label = transport, label

    @_eager
    def __call__(self, module, args, kwargs, output):
        logits = output.get("logits") if isinstance(output, dict) else None
        if not isinstance(logits, torch.Tensor):
            return output
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = inputs if inputs is not None else kwargs.get("inputs_embeds")
        dst = self.transport.label_of(inputs) if isinstance(inputs, torch.Tensor) else self.label
        if dst in self.transport.devices and self.transport.label_of(logits) != dst:
            output["logits"] = self.transport.fetch(logits, dst)
        return output
