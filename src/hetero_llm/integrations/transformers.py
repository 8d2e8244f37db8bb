"""Declarative role tables for transformers architectures.

One `ArchitectureSpec` per family says where the decoder blocks live and which
submodule plays which role (q/k/v/o, gate/up/down, norms). The generic passes
read these tables; nothing here patches transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedArchitectureError
from .hf_adapter import is_conv1d

# Roles a linear layer can play. "linear" is the generic role of a Linear the
# table does not know (strict=False on an unknown architecture).
LINEAR_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc_in", "fc_out",
                "lm_head", "linear")
NORM_ROLES = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm")  # q/k: per head, before rotary


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things are in one architecture family.

    `roles` maps a role to a path relative to one decoder block; `model_roles`
    maps a role to a path from the model root. `fusions` lists linear groups
    that read the same input and may be computed as one matmul.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    roles: dict[str, str]
    model_roles: dict[str, str]
    norm_style: str = "rms"  # "rms": w * norm(x); "rms_plus_one": (1 + w) * norm(x); "layer": LayerNorm
    fusions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    linear_kind: str = "linear"  # "linear": weight (out, in); "conv1d": GPT-2's Conv1D, weight (in, out)
    # Name of the activation module when the MLP computes down(act(gate(x)) * up(x)):
    # such an MLP may be replaced whole by one fused module.
    gated_mlp_act: str | None = None
    # "rotary": Llama-style attention (fused qkv, rotary from position_embeddings,
    # SDPA) that may be replaced whole by fused.modules.RotaryAttention.
    attention_style: str | None = None
    # The module that turns position ids into rotary (cos, sin) tables, shared by all layers
    # (hetero_llm.decode's step calls it once per token).
    rotary_embedding: str | None = None
    # Tensor parallel: attention attributes that hold head counts, set to a rank's local
    # "heads", "kv_heads" or "width" (heads x head_dim). "config.X" overrides X in a per-module
    # view of the config, for attention code that reads the model config.
    tp_attention: dict[str, str] = field(default_factory=dict)
    # Structured pruning: the config attributes holding the sizes it changes ("mlp": MLP width;
    # "heads", "kv_heads", "head_dim": only where attention takes its head size from the config
    # rather than hidden_size / heads, so removing heads keeps head_dim).
    shrink_config: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    def children(self, role: str | None = None) -> frozenset[str]:
        """The direct children the table names of one decoder layer (`role` None) or of the
        module playing `role` in it ("attention", "mlp"): every module there is one the table
        describes, so a swap of that module that meets any other child must refuse, not drop it.
        A gated MLP's activation module counts as a child of "mlp"."""
        prefix = "" if role is None else self.roles.get(role, "\0") + "."
        paths = [p for p in self.roles.values() if p.startswith(prefix) and p != prefix[:-1]]
        if role == "mlp" and self.gated_mlp_act:
            paths.append(prefix + self.gated_mlp_act)
        return frozenset(p[len(prefix):].split(".", 1)[0] for p in paths)

    def unknown_children(self, module: torch.nn.Module, role: str) -> list[str]:
        """The children of `module` (playing `role`) the table does not name, sorted."""
        return sorted(set(dict(module.named_children())) - self.children(role))


_LLAMA_BLOCK = {
    "attention": "self_attn",
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "mlp": "mlp", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
_LLAMA_MODEL = {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
_LLAMA_FUSIONS = (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up")))
_LLAMA_SHRINK = {"mlp": "intermediate_size", "heads": "num_attention_heads",
                 "kv_heads": "num_key_value_heads", "head_dim": "head_dim"}


_QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def _llama_like(family: str, model_types: tuple[str, ...], roles: dict[str, str] | None = None,
                **kw) -> ArchitectureSpec:
    """A family laid out as Llama; `roles`: the parts it adds (as q/k norms)."""
    return ArchitectureSpec(family=family, model_types=model_types, layers="model.layers",
                            roles={**_LLAMA_BLOCK, **(roles or {})}, model_roles=dict(_LLAMA_MODEL),
                            fusions=_LLAMA_FUSIONS, gated_mlp_act="act_fn",
                            attention_style="rotary", rotary_embedding="model.rotary_emb",
                            shrink_config=dict(_LLAMA_SHRINK), **kw)


ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",), notes="q/k/v carry biases"),
    _llama_like("qwen3", ("qwen3",), roles=_QK_NORMS, notes="q and k RMS-normalized per head before rotary"),
    _llama_like("gemma", ("gemma",), norm_style="rms_plus_one",
                notes="RMSNorm scales by (1 + weight); embeddings scaled by sqrt(hidden)"),
    ArchitectureSpec(
        family="phi3", model_types=("phi3",), layers="model.layers",
        roles={"attention": "self_attn", "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
               "mlp": "mlp", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        model_roles=dict(_LLAMA_MODEL), notes="q/k/v and gate/up are already fused in the checkpoint",
        tp_attention={"num_key_value_heads": "kv_heads", "config.num_attention_heads": "heads"},
        shrink_config=dict(_LLAMA_SHRINK)),
    ArchitectureSpec(
        family="gpt2", model_types=("gpt2",), layers="transformer.h",
        roles={"attention": "attn", "qkv": "attn.c_attn", "o": "attn.c_proj", "mlp": "mlp",
               "fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj", "attn_norm": "ln_1", "mlp_norm": "ln_2"},
        model_roles={"embed": "transformer.wte", "pos_embed": "transformer.wpe",
                     "final_norm": "transformer.ln_f", "lm_head": "lm_head"},
        norm_style="layer", linear_kind="conv1d", notes="Conv1D layers store weights as (in, out)",
        tp_attention={"num_heads": "heads", "split_size": "width", "embed_dim": "width"},
        shrink_config={"mlp": "n_inner"}),
    ArchitectureSpec(
        family="opt", model_types=("opt",), layers="model.decoder.layers",
        roles={"attention": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
               "v": "self_attn.v_proj", "o": "self_attn.out_proj", "fc_in": "fc1", "fc_out": "fc2",
               "attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
        model_roles={"embed": "model.decoder.embed_tokens", "pos_embed": "model.decoder.embed_positions",
                     "final_norm": "model.decoder.final_layer_norm", "lm_head": "lm_head"},
        norm_style="layer", fusions=(("qkv", ("q", "k", "v")),),
        tp_attention={"num_heads": "heads", "embed_dim": "width"}, shrink_config={"mlp": "ffn_dim"}),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}


def spec_by_family(family: str | None) -> ArchitectureSpec | None:
    return next((a for a in ARCHITECTURES if a.family == family), None)


def supported_model_types() -> tuple[str, ...]:
    """Every `config.model_type` with a role table."""
    return tuple(sorted(_BY_MODEL_TYPE))


def model_type_of(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def spec_for(model: torch.nn.Module) -> ArchitectureSpec | None:
    """The role table of this model's family, or None when we have none."""
    return _BY_MODEL_TYPE.get(model_type_of(model))


def require_spec(model: torch.nn.Module) -> ArchitectureSpec:
    spec = spec_for(model)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"hetero_llm has no role table for model_type {model_type_of(model)!r}. "
            f"Supported: {', '.join(supported_model_types())}. Pass strict=False to quantize its "
            "Linear layers generically and leave the rest untouched (listed as skipped in the plan).")
    return spec


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def block_module(model: torch.nn.Module, spec: ArchitectureSpec, role: str, index: int = 0) -> torch.nn.Module | None:
    """The module playing `role` in decoder layer `index`, or None when the table has no such role."""
    path = spec.roles.get(role)
    return None if path is None else model.get_submodule(f"{spec.layers}.{index}.{path}")


def _in_features(module: torch.nn.Module) -> int:
    """Input width of a Linear, a quantized linear, or GPT-2's Conv1D (weight stored (in, out))."""
    if is_conv1d(module):
        return module.weight.shape[0]
    return module.in_features


def block_sizes(model: torch.nn.Module, spec: ArchitectureSpec) -> tuple[int, int, int, int]:
    """(query heads, KV heads, head_dim, MLP width) of a decoder layer (all layers are alike)."""
    config = model.config
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    attn = block_module(model, spec, "attention")
    head_dim = int(getattr(attn, "head_dim", 0) or getattr(config, "head_dim", 0) or config.hidden_size // heads)
    down = block_module(model, spec, "down") or block_module(model, spec, "fc_out")
    return heads, kv_heads, head_dim, _in_features(down)


@dataclass
class RoleMap:
    """Module name -> role, for one model instance; plus the per-block fusion groups."""

    roles: dict[str, str] = field(default_factory=dict)
    fusion_groups: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)  # (name, members, kind)
    missing: list[str] = field(default_factory=list)
    # Attention / MLP modules with children the table does not describe (name -> those children):
    # not replaced whole (their q/k/v or gate/up still share one matmul).
    unknown_children: dict[str, list[str]] = field(default_factory=dict)


def map_roles(model: torch.nn.Module, spec: ArchitectureSpec) -> RoleMap:
    """Resolve the table against a model instance: which named module plays which role."""
    result = RoleMap()
    for role, path in spec.model_roles.items():
        if _get(model, path) is not None:
            result.roles[path] = role
    blocks = _get(model, spec.layers)
    if blocks is None:
        raise UnsupportedArchitectureError(
            f"{spec.family}: expected decoder blocks at {spec.layers!r} but the model has none; "
            "was the model wrapped or restructured? Pass strict=False to handle it generically.")
    for i in range(len(blocks)):
        prefix = f"{spec.layers}.{i}"
        for role, rel in spec.roles.items():
            name = f"{prefix}.{rel}"
            if _get(model, name) is None:
                result.missing.append(name)
            else:
                result.roles[name] = role
        for fused_role, members in spec.fusions:
            names = tuple(f"{prefix}.{spec.roles[m]}" for m in members)
            if not all(n in result.roles for n in names):
                continue
            # A fused module that replaces its whole parent is named after it, and only planned
            # when the parent has no child the table does not know (it would be dropped).
            whole = {"gate_up": ("mlp", "gated_mlp", bool(spec.gated_mlp_act)),
                     "qkv": ("attention", "rotary_attention", spec.attention_style == "rotary")}.get(fused_role)
            if whole is not None and whole[2]:
                parent = f"{prefix}.{spec.roles[whole[0]]}"
                unknown = spec.unknown_children(model.get_submodule(parent), whole[0])
                if not unknown:
                    result.fusion_groups.append((parent, names, whole[1]))
                    continue
                result.unknown_children[parent] = unknown
            result.fusion_groups.append((f"{prefix}.{fused_role}", names, fused_role))
    return result
