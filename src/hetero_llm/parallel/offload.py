"""CPU offload of one block: weights in (pinned) CPU memory, streamed to its device every forward.

This is accelerate's device_map offload, with accelerate's hook machinery (`AlignDevicesHook`,
`add_hook_to_module`, `remove_hook_from_module`): between forwards the block's parameters and
persistent buffers are meta tensors and the real ones sit in `weights_map`; `pre_forward` copies
them to the execution device, `post_forward` drops them. What differs from accelerate's own use:

- one hook per block (accelerate puts one on every submodule that holds tensors);
- accelerate's `set_module_tensor_to_device` empties the CUDA cache after *every tensor* it puts
  on a GPU by default, so each step pays cudaMalloc again for every weight; here it does not,
  and the copies from pinned memory are asynchronous (stream-ordered before the block's kernels);
- inputs are not moved: the placement's transfer hooks already brought them, once per step.
"""
from __future__ import annotations

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
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
        for name, t in tensors.items():
            target = "meta" if name in self.weights_map else self.execution_device
            set_module_tensor_to_device(module, name, target, clear_cache=False)
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        # No cache emptying per tensor (accelerate's default): the next step would pay cudaMalloc
        # for every weight again. Inputs are not moved: the placement's hooks did that.
        for name, value in self.weights_map.items():
            set_module_tensor_to_device(module, name, self.execution_device, value=value,
                                        non_blocking=value.is_pinned(), clear_cache=False)
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        for name in self.weights_map:
            set_module_tensor_to_device(module, name, "meta")
        return output


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


def offload_block(block: nn.Module, execution_device: torch.device) -> list:
    """Attach a StreamedWeights hook to `block`; returns the handles to remove with the placement.

    Besides the accelerate hook (removed by remove_hook_from_module, which puts the CPU weights
    back), a state-dict hook makes `state_dict()` return the CPU weights instead of the meta
    tensors the module holds between forwards, so save() still writes real data.
    """
    pin = execution_device.type == "cuda" and torch.cuda.is_available()
    weights = cpu_weights(block, pin)
    hook = StreamedWeights(execution_device=execution_device, offload=True, io_same_device=False,
                           weights_map=weights, offload_buffers=True, place_submodules=True)
    add_hook_to_module(block, hook)
    return [block.register_state_dict_post_hook(_RealWeights(weights))]


class _RealWeights:
    """state_dict post-hook: the offloaded weights' CPU values in place of their meta stand-ins."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name, value in self.weights.items():
            key = prefix + name
            if key in state_dict and state_dict[key].is_meta:
                state_dict[key] = value


def remove_offload(block: nn.Module) -> None:
    """Detach the hook; accelerate puts the CPU weights back into the module."""
    remove_hook_from_module(block)
    # accelerate restores `forward` as an instance attribute: the class's own method, bound. Drop
    # it, so the block is as it was (an instance forward of our own, a fused layer's, stays).
    restored = block.__dict__.get("forward")
    if getattr(restored, "__func__", None) is getattr(type(block), "forward", None):
        del block.forward
