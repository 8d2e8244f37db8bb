"""The semi-sparse pass: 2:4-pruned linears the planner put on sparse tensor cores get their
weight stored as torch's SparseSemiStructuredTensor (kept values plus 2-bit indices, ~56% of
the bytes), so F.linear runs the cuSPARSELt / CUTLASS 2:4 kernels.

It runs last, after "place" and "kernels": the weight must already be on its GPU, and the
kernels pass concatenates q/k/v and gate/up weights into one fused nn.Linear (torch.cat takes
no sparse tensors), so the fused linear is what gets converted. load() replays it after
place_pass. Every conversion is checked (2:4 pattern, GPU capability, one small matmul
against the dense weight); a linear that fails any check stays dense with a HeteroLLMWarning,
so this pass never raises and never leaves a linear on a kernel that did not work.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HeteroLLMWarning
from ..kernels.dispatch import fuses_residual
from ..fused.modules import GatedMLP, RotaryAttention
from ..plan import Fusion, Plan

# The 2:4 kernel and its limits (the planner reads them to decide, this pass to convert).
SPARSE_KERNEL = "torch-sparse24"  # F.linear on a torch.sparse.SparseSemiStructuredTensor weight
SPARSE_MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere (sm_80) and newer
SPARSE_DTYPES = ("float16", "bfloat16")
# torch's limits on the weight (rows = out_features, cols = in_features), each a positive multiple:
# CUTLASS (32, 64) for fp16/bf16, cuSPARSELt (16, 16) (torch/sparse/semi_structured.py,
# _DTYPE_SHAPE_CONSTRAINTS); the stricter pair fits whichever backend torch picks on the GPU.
SPARSE_MIN_ROWS, SPARSE_MIN_COLS = 32, 64

# The linear a fused group's matmul lives in, after the kernels pass (fused/apply.py):
# RotaryAttention.qkv, GatedMLP.gate_up; other kinds: FusedProjection "hetero_<kind>" on the parent.
_FUSED_LINEAR = {"rotary_attention": "qkv", "gated_mlp": "gate_up"}
_CHECK_ROWS = 16  # tokens of the conversion's test matmul (a multiple of both backends' input tile)
_CHECK_RTOL = 2e-2  # of the largest output: fp16/bf16 rounding passes, a wrong layout does not
_DENSE_CHUNK = 4096  # columns of the identity multiplied at a time when decompressing cuSPARSELt


def is_semi_sparse(t: object) -> bool:
    return isinstance(t, torch.sparse.SparseSemiStructuredTensor)


def dense_weight(t: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) tensor of a semi-structured weight, bit-exact (any other tensor as is)."""
    if not is_semi_sparse(t):
        return t
    if t.meta is not None:  # CUTLASS keeps values and indices apart: torch decompresses them directly
        return t.to_dense()
    # cuSPARSELt: W @ I, by column blocks (a whole identity would be in x in). Exact: every output
    # is one weight times 1 plus zeros, accumulated in fp32.
    rows, cols = t.shape
    out = torch.empty(rows, cols, dtype=t.dtype, device=t.device)
    for start in range(0, cols, _DENSE_CHUNK):
        width = min(_DENSE_CHUNK, cols - start)
        eye = torch.zeros(cols, width, dtype=t.dtype, device=t.device)
        eye.diagonal(-start).fill_(1)
        out[:, start:start + width] = torch.mm(t, eye)
    return out


def fused_linear_name(fusion: Fusion) -> str:
    """Where the kernels pass puts the one linear that computes `fusion`'s members."""
    if fusion.kind in _FUSED_LINEAR:
        return f"{fusion.name}.{_FUSED_LINEAR[fusion.kind]}"
    parent = fusion.members[0].rpartition(".")[0]
    return f"{parent}.hetero_{fusion.kind}.linear" if parent else f"hetero_{fusion.kind}.linear"


def sparse_targets(plan: Plan) -> dict[str, tuple[str, ...]]:
    """Linear module name -> the plan entries it computes, for entries on SPARSE_KERNEL."""
    fused = {m: f for f in plan.fusions if f.kind != "decoder_layer" for m in f.members}
    out: dict[str, tuple[str, ...]] = {}
    for e in plan.entries:
        if e.kernel.split("+", 1)[0] != SPARSE_KERNEL:
            continue
        f = fused.get(e.name)
        name = e.name if f is None else fused_linear_name(f)
        out[name] = out.get(name, ()) + (e.name,)
    return out


def _unusable(w: torch.Tensor) -> str | None:
    """Why this machine cannot run `w` as a 2:4 sparse tensor (None: it can try)."""
    if not torch.cuda.is_available() or w.device.type != "cuda":
        return f"its weight is on {w.device.type}, not a CUDA GPU"
    cc = torch.cuda.get_device_capability(w.device)
    if cc < SPARSE_MIN_CAPABILITY:
        return f"this GPU (sm_{cc[0]}{cc[1]}) has no sparse tensor cores (compute capability 8.0+)"
    return None


def _refusal(w: torch.Tensor) -> str | None:
    """Why `w` cannot become a 2:4 sparse tensor here (None: it can)."""
    unusable = _unusable(w)
    if unusable is not None:
        return unusable
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"{w.dtype} weights (2:4 sparse tensors take float16/bfloat16)"
    rows, cols = w.shape
    if rows % SPARSE_MIN_ROWS or cols % SPARSE_MIN_COLS:
        return f"weight {rows}x{cols} (rows must be a multiple of {SPARSE_MIN_ROWS}, columns of {SPARSE_MIN_COLS})"
    if int((w.reshape(-1, 4) != 0).sum(dim=1).max()) > 2:  # 4 consecutive inputs of a row hold > 2 values
        return "the weight is not 2:4 sparse (was the prune pass skipped?)"
    return None


def _checked(w: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """`sparse` if one small matmul with it matches the dense weight's; raises otherwise."""
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(_CHECK_ROWS, w.shape[1], generator=g, device=w.device, dtype=w.dtype)
    want, got = F.linear(x, w).float(), F.linear(x, sparse).float()
    err, scale = (got - want).abs().max(), want.abs().max()
    if not bool(torch.isfinite(got).all()) or err > _CHECK_RTOL * scale + 1e-3:
        raise RuntimeError(f"its 2:4 matmul differs from the dense one by {float(err):.3g} (outputs up to "
                           f"{float(scale):.3g})")
    return sparse


def to_semi_sparse(w: torch.Tensor) -> torch.Tensor:
    """`w` as a checked SparseSemiStructuredTensor: torch's default backend (cuSPARSELt where it is
    built in), else CUTLASS. Raises RuntimeError with every backend's error if none works."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    errors = []
    with warnings.catch_warnings():  # torch's "prototype API" notice: the plan chose it on purpose
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype.*")
        for convert in (to_sparse_semi_structured, SparseSemiStructuredTensorCUTLASS.from_dense):
            try:
                return _checked(w, convert(w))
            except Exception as e:  # noqa: BLE001 - any failure means: try the next backend, then dense
                errors.append(f"{getattr(convert, '__qualname__', convert)}: {e}")
    raise RuntimeError("; ".join(errors))


def _adds_residual_in_epilogue(model: nn.Module, name: str, module: nn.Module) -> bool:
    """o_proj / down_proj of a fused block on the Triton path: linear_add reads the weight itself."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return (isinstance(parent, (RotaryAttention, GatedMLP)) and fuses_residual(parent.backend, module)
            and module in (getattr(parent, "o_proj", None), getattr(parent, "down_proj", None)))


@torch.no_grad()
def _convert(model: nn.Module, name: str) -> str | None:
    """Put module `name`'s weight on 2:4 sparse tensor cores; returns why not, or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return "the model has no such module (the plan does not describe it)"
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not an nn.Linear"
    if _adds_residual_in_epilogue(model, name, module):
        return "its residual add runs in the matmul's epilogue (Triton linear_add), which reads a dense weight"
    w = module.weight
    if is_semi_sparse(w):
        return None  # already converted
    why = _refusal(w)
    if why is not None:
        return why
    try:
        sparse = to_semi_sparse(w.detach().contiguous())
    except RuntimeError as e:
        return f"conversion failed ({e})"
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return None


def semi_sparse_pass(model: nn.Module, plan: Plan) -> list[tuple[str, str, str]]:
    """Store the weights the plan puts on SPARSE_KERNEL as 2:4 sparse tensors, in place; returns
    (name, "Linear", what it became) per converted linear. Linears that cannot be converted stay
    dense, named in one HeteroLLMWarning."""
    targets = sparse_targets(plan)
    if not targets:
        return []
    fusions = {fused_linear_name(f): f for f in plan.fusions if f.kind != "decoder_layer"}
    done, dense = [], []
    for name, entries in targets.items():
        f = fusions.get(name)
        if f is not None and set(entries) != set(f.members):
            why = f"it also computes {sorted(set(f.members) - set(entries))}, which the plan keeps dense"
        else:
            why = _convert(model, name)
        if why is None:
            done.append((name, "Linear", "2:4 SparseSemiStructuredTensor weight"))
        else:
            dense.append(f"{name}: {why}")
    if dense:
        more = f" (and {len(dense) - 1} more)" if len(dense) > 1 else ""
        warnings.warn(f"{len(dense)} of {len(targets)} linears the plan puts on 2:4 sparse tensor cores stay dense, "
                      f"as fast as without the sparse kernel: {dense[0]}{more}", HeteroLLMWarning, stacklevel=3)
    return done
