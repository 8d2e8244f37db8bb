"""CPU offload of one block: weights in (pinned) CPU memory, streamed to its device every forward.

This is accelerate's device_map offload, with accelerate's hook machinery (`AlignDevicesHook`,
`add_hook_to_module`, `remove_hook_from_module`): the block's parameters and persistent buffers
live in `weights_map` on the CPU; `pre_forward` copies them to the execution device,
`post_forward` drops the copies. What differs from accelerate's own use:

- between forwards the module holds the CPU tensors themselves, not meta stand-ins: they cost
  nothing more (the same storage), and `model.device`, `state_dict()` (so save()) and deepcopy
  see real weights even when the offloaded block is the model's first;
- one hook per block (accelerate puts one on every submodule that holds tensors);
- accelerate's `set_module_tensor_to_device` empties the CUDA cache after *every tensor* it puts
  on a GPU by default, so each step pays cudaMalloc again for every weight; here it does not,
  and the copies from pinned memory are asynchronous (stream-ordered before the block's kernels);
- inputs are not moved: the placement's transfer hooks already brought them, once per step.
"""
from __future__ import annotations

import torch
from accelerate.hooks import (
    AlignDevicesHook,
    add_hook_to_module,
    remove_hook_from_module,
)
from accelerate.utils import named_module_tensors, set_module_tensor_to_device
from torch import nn


class StreamedWeights(AlignDevicesHook):
    """AlignDevicesHook(offload=True) over an explicit list of the block's offloaded tensors.

    AlignDevicesHook with place_submodules=True and offload_buffers=True matches submodules'
    non-persistent buffers by their bare names against full names (accelerate 1.15), so it fails
    on, or offloads and then loses, derived buffers such as Int8Linear's `scale_bf16`. Here the
    offloaded names are exactly `weights_map`'s keys; every other tensor of the block (the
    non-persistent buffers, recomputed from the weights and small) stays on the execution device.
    """

    def init_hook(self, module: nn.Module) -> nn.Module:
        tensors = dict(named_module_tensors(module, include_buffers=True, recurse=True))
        self.original_devices = {name: t.device for name, t in tensors.items()}
        for name in tensors:
            self._put(module, name, torch.device("cpu") if name in self.weights_map else self.execution_device)
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        for name in self.weights_map:
            self._put(module, name, self.execution_device)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        for name in self.weights_map:
            self._put(module, name, torch.device("cpu"))
        return output

    def _put(self, module: nn.Module, name: str, device: torch.device) -> None:
        # No cache emptying per tensor (accelerate's default): the next step would pay cudaMalloc
        # for every weight again. Offloaded tensors come from weights_map (pinned: asynchronous).
        value = self.weights_map.get(name)
        set_module_tensor_to_device(module, name, device, value=value, clear_cache=False,
                                    non_blocking=value is not None and value.is_pinned())


def cpu_weights(block: nn.Module, pin: bool) -> dict[str, torch.Tensor]:
    """The block's parameters and persistent buffers as CPU tensors (pinned when `pin`), by name."""
    transient = {f"{prefix}.{b}" if prefix else b
                 for prefix, m in block.named_modules() for b in m._non_persistent_buffers_set}
    weights = {}
    for name, t in named_module_tensors(block, include_buffers=True, recurse=True):
        if name in transient:
            continue
        t = t.detach().to("cpu")
        weights[name] = t.pin_memory() if pin else t
    return weights


def offload_block(block: nn.Module, execution_device: torch.device) -> None:
    """Attach a StreamedWeights hook to `block` (remove_offload takes it off)."""
    pin = execution_device.type == "cuda" and torch.cuda.is_available()
    hook = StreamedWeights(execution_device=execution_device, offload=True, io_same_device=False,
                           weights_map=cpu_weights(block, pin), offload_buffers=True, place_submodules=True)
    add_hook_to_module(block, hook)


def remove_offload(block: nn.Module) -> None:
    """Detach the hook; accelerate puts the CPU weights back into the module (they are there already)."""
    remove_hook_from_module(block)
    # accelerate restores `forward` as an instance attribute: the class's own method, bound. Drop
    # it, so the block is as it was (an instance forward of our own, a fused layer's, stays).
    restored = block.__dict__.get("forward")
    if getattr(restored, "__func__", None) is getattr(type(block), "forward", None):
        del block.forward
