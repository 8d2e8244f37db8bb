"""Edits of the exported ONNX graph, with the `onnx` package: names, an optional input, checks."""
from __future__ import annotations

from typing import Any

LOGITS_TO_KEEP = "logits_to_keep"
_INT64_MAX = 2**63 - 1


def strip_prefix(model: Any, prefix: str) -> None:
    """Initializers are named after the wrapper's attribute path ("wrapped.model.layers.0...");
    give them the model's own names."""
    renames = {i.name: i.name[len(prefix):] for i in model.graph.initializer if i.name.startswith(prefix)}
    taken = {i.name for i in model.graph.initializer} | {v.name for v in model.graph.input}
    renames = {old: new for old, new in renames.items() if new not in taken}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def lm_head_matmul(model: Any, logits: str = "logits") -> Any:
    """The MatMul that computes the logits (reached from the output through Add/Cast/Identity)."""
    producers = _producers(model)
    node = producers.get(logits)
    while node is not None and node.op_type in ("Add", "Cast", "Identity"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        found = "nothing" if node is None else node.op_type
        raise ValueError(f"the logits come from {found}, not from a MatMul: cannot find the lm_head")
    return node


def add_logits_to_keep(model: Any, logits: str = "logits") -> None:
    """An optional int64 input `logits_to_keep` (shape (1,), default 0 = every position): only
    the last n positions enter the lm_head, as transformers' `logits_to_keep=n`.

    The input is also an initializer, so a runtime that does not feed it (an Optimum-style
    runner) gets the default and every position's logits.
    """
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    node = lm_head_matmul(model, logits)
    hidden = node.input[0]
    kept = f"{hidden}_kept"
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.int64), LOGITS_TO_KEEP))
    model.graph.initializer.append(numpy_helper.from_array(np.array([_INT64_MAX], dtype=np.int64),
                                                           "logits_to_keep_end"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, dtype=np.int64), "logits_to_keep_axis"))
    model.graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    # start = -n: 0 keeps everything (as Python's x[:, -0:]), n keeps the last n positions.
    neg = helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_to_keep_start"], name="logits_to_keep_neg")
    cut = helper.make_node("Slice", [hidden, "logits_to_keep_start", "logits_to_keep_end", "logits_to_keep_axis"],
                           [kept], name="logits_to_keep_slice")
    index = list(model.graph.node).index(node)
    model.graph.node.insert(index, cut)
    model.graph.node.insert(index, neg)
    node.input[0] = kept
    for out in model.graph.output:  # its sequence axis is no longer the input's
        if out.name == logits and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_param = "kept"


def int8_initializers(model: Any) -> dict[str, int]:
    """name -> bytes of every INT8 initializer a DequantizeLinear reads."""
    from onnx import TensorProto

    read = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for init in model.graph.initializer:
        if init.name in read and init.data_type == TensorProto.INT8:
            n = 1
            for d in init.dims:
                n *= d
            out[init.name] = n
    return out


def set_dim_names(model: Any, names: dict[str, dict[int, str]]) -> None:
    """Name the dynamic axes of graph inputs/outputs (name -> {axis: dim name})."""
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, label in names.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and not dims[axis].dim_value:
                dims[axis].dim_param = label
