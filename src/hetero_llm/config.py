"""Frozen, validated, versioned option dataclasses.

Every option accepts a string shortcut (``quantize="int8"``) or its config
dataclass (``quantize=QuantConfig(scheme="int8", lm_head=False)``). Configs are
validated at construction and round-trip through plain dicts, so a plan can
record exactly what was asked.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InvalidOptionError

CONFIG_VERSION = 1


def _choice(option: str, value: Any, allowed: tuple[str, ...], later: tuple[str, ...] = ()) -> str:
    """Validate a string option; `later` are names we know but do not implement yet."""
    if not isinstance(value, str):
        raise InvalidOptionError(f"{option} must be a string, one of {allowed}; got {value!r}")
    v = value.strip().lower()
    if v in allowed:
        return v
    if v in later:
        raise InvalidOptionError(
            f"{option}={value!r} is not available in this version of hetero_llm. "
            f"Use one of {allowed}.")
    hint = difflib.get_close_matches(v, allowed + later, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise InvalidOptionError(f"unknown {option}={value!r}; choose one of {allowed}.{did_you_mean}")


def _bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{option} must be True or False; got {value!r}")
    return value


def _positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{option} must be a positive integer; got {value!r}")
    return value


class FrozenDict(dict):
    """A read-only dict, so that configs holding one stay hashable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config mappings are read-only; build a new config instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]


def _overrides(value: Any, schemes: tuple[str, ...], later: tuple[str, ...]) -> dict[str, str]:
    """Per-module scheme pins: {fnmatch pattern of module names: scheme}."""
    if not isinstance(value, dict):
        raise InvalidOptionError("QuantConfig.overrides must be a dict of module-name patterns to schemes, e.g. "
                                 f"{{'*.mlp.down_proj': 'none'}}; got {value!r}")
    out = {}
    for pattern, scheme in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise InvalidOptionError(f"QuantConfig.overrides keys must be non-empty module-name patterns; got {pattern!r}")
        out[pattern] = _choice(f"QuantConfig.overrides[{pattern!r}]", scheme, schemes, later)
    return FrozenDict(out)


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def parse_bytes(option: str, value: Any) -> int:
    """A memory size: an int of bytes, or a string like "8GiB", "512MB", "1.5 GB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidOptionError(f"{option} must be a number of bytes or a size such as '8GiB' or '512MB'; "
                                 f"got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None])


def _device_name(option: str, value: Any, extra: tuple[str, ...] = ()) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = f"cuda:{value}"  # accelerate's convention: a GPU index
    v = value.strip().lower() if isinstance(value, str) else None
    if v is None or not (_DEVICE.fullmatch(v) or v in extra):
        allowed = "'cpu', 'cuda', 'cuda:N' or a GPU index" + "".join(f", {e!r}" for e in extra)
        raise InvalidOptionError(f"{option} must be {allowed}; got {value!r}")
    return "cuda:0" if v == "cuda" else v


def _max_memory(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise InvalidOptionError(f"max_memory must be a dict such as {{'cuda': '8GiB', 'cpu': '64GiB'}}; got {value!r}")
    return FrozenDict({_device_name("a max_memory key", k): parse_bytes(f"max_memory[{k!r}]", v)
                       for k, v in value.items()})


def _device_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidOptionError("device_map must be a dict of module names to devices, e.g. "
                                 f"{{'model.layers.30': 'cpu'}}; got {value!r}")
    out = {}
    for name, dev in value.items():
        if not isinstance(name, str):
            raise InvalidOptionError(f"device_map keys must be module names (str); got {name!r}")
        out[name] = _device_name(f"device_map[{name!r}]", dev, ("offload",))
    return FrozenDict(out)


class _Config:
    """dict round trip shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise InvalidOptionError(f"{cls.__name__} has no fields {sorted(unknown)}; known: {sorted(known)}")
        if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise InvalidOptionError(
                f"{cls.__name__} version {data.get('version')!r} is not supported (this hetero_llm reads "
                f"version {CONFIG_VERSION}); re-create the config with this version.")
        return cls(**data)


def _number(option: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidOptionError(f"{option} must be a number in [{lo}, {hi}]; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class QuantConfig(_Config):
    """How weights (and, for W8A8, activations) are quantized.

    scheme: "auto" (the planner picks per device: weight-only INT8 on CPU),
    "int8" (symmetric weight-only, W8A16), "int8-asym" (with a zero point),
    "w8a8" (symmetric per-channel weights and INT8 activations quantized per
    token at run time), or "none".
    granularity: weight scales "channel" (one per output row), "group" (one per
    `group_size` inputs of a row) or "tensor". Weight-only schemes only.
    smooth_alpha: W8A8 SmoothQuant migration strength in [0, 1]; 0 turns
    smoothing off. Needs calibration_data when > 0.
    outlier_channels: W8A8: per linear, this many input channels with the
    largest calibrated activations stay in floating point. Needs calibration_data.
    lm_head: quantize the output projection (always weight-only: logits are the
    most sensitive output). embeddings: store the token embedding as INT8 rows
    (a tied lm_head then shares those INT8 weights).
    """

    scheme: str = "auto"
    granularity: str = "channel"
    group_size: int = 128
    smooth_alpha: float = 0.5
    outlier_channels: int = 0
    lm_head: bool = True
    embeddings: bool = True
    overrides: dict[str, str] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    SCHEMES = ("auto", "int8", "int8-asym", "w8a8", "none")
    GRANULARITIES = ("channel", "group", "tensor")
    LATER = ("int4", "fp8")

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", _choice("quantize", self.scheme, self.SCHEMES, self.LATER))
        object.__setattr__(self, "granularity",
                           _choice("QuantConfig.granularity", self.granularity, self.GRANULARITIES))
        _positive_int("QuantConfig.group_size", self.group_size)
        object.__setattr__(self, "smooth_alpha", _number("QuantConfig.smooth_alpha", self.smooth_alpha, 0.0, 1.0))
        if isinstance(self.outlier_channels, bool) or not isinstance(self.outlier_channels, int) \
                or self.outlier_channels < 0:
            raise InvalidOptionError(f"QuantConfig.outlier_channels must be an integer >= 0; "
                                     f"got {self.outlier_channels!r}")
        _bool("QuantConfig.lm_head", self.lm_head)
        _bool("QuantConfig.embeddings", self.embeddings)
        object.__setattr__(self, "overrides", _overrides(self.overrides, self.SCHEMES[1:], self.LATER))
        if self.scheme == "w8a8" and self.granularity != "channel":
            raise InvalidOptionError("quantize='w8a8' uses per-channel weight scales (the integer matmul "
                                     "applies one scale per output); drop granularity or use scheme='int8'.")

    @property
    def needs_calibration(self) -> bool:
        uses_w8a8 = self.scheme == "w8a8" or "w8a8" in self.overrides.values()
        return uses_w8a8 and (self.smooth_alpha > 0 or self.outlier_channels > 0)

    def override_for(self, module_name: str) -> str | None:
        """The scheme pinned for `module_name` (the last matching pattern wins), or None."""
        found = None
        for pattern, scheme in self.overrides.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                found = scheme
        return found


_NM = re.compile(r"(\d+):(\d+)")


def _fraction(option: str, value: Any, hi: float = 0.95) -> float:
    """A share of weights or channels to remove: 0 <= value <= hi (removing all is never useful)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= hi:
        raise InvalidOptionError(f"{option} must be a fraction in [0, {hi}] (the share removed); got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PruneConfig(_Config):
    """Weight pruning, applied before quantization.

    method: "none"; "magnitude" (zero the smallest |w|); "wanda" (zero the smallest
    |w| x ||x||, the input activation norm measured on calibration_data: keeps the weights
    that meet large activations); "structured" (remove whole MLP channels and attention
    KV-head groups, physically shrinking the model: the path that speeds up CPU decode).
    The shortcut prune="2:4" (any "N:M") means magnitude pruning in that pattern.

    magnitude / wanda:
      sparsity: share of each pruned linear's weights set to zero (default 0.5).
      pattern: "unstructured", or "N:M" (keep N of every M consecutive inputs; "2:4" runs on
        the sparse tensor cores of GPUs with compute capability 8.0+ where the planner predicts
        a win; elsewhere the zeros are stored dense).
      scope: "layer" (every pruned linear reaches `sparsity`; wanda compares weights within
        each output row, as its paper does) or "global" (one threshold over all of them).
      reconstruct (wanda; default True with scope="layer"): after choosing which weights to zero,
        re-fit the kept ones by least squares on the calibration activations (SparseGPT's
        update), so each layer's output stays close to the dense one.
    structured:
      mlp: share of each layer's MLP intermediate channels removed (default 0.25).
      heads: share of each layer's KV-head groups removed (a group is one KV head with the
        query heads that read it; rounded down to whole groups).
      criterion: "wanda" (channel importance = activation norm x weight norm on calibration_data)
        or "magnitude" (weight norms only, no data needed).
      reconstruct (default True with criterion="wanda"): re-fit the output projections (down, o)
        by least squares so they make up for the removed channels on the calibration activations.
    lm_head: also prune the output projection (default False: logits are the most sensitive).
    Embeddings and norms are never pruned.
    """

    method: str = "none"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: str = "layer"
    mlp: float = 0.25
    heads: float = 0.0
    criterion: str = "wanda"
    reconstruct: bool | None = None
    lm_head: bool = False
    version: int = CONFIG_VERSION

    METHODS = ("none", "magnitude", "wanda", "structured")
    SCOPES = ("layer", "global")
    CRITERIA = ("wanda", "magnitude")

    def __post_init__(self) -> None:
        method = self.method.strip().lower() if isinstance(self.method, str) else self.method
        if isinstance(method, str) and _NM.fullmatch(method):  # prune="2:4"
            if self.pattern not in ("unstructured", method):
                raise InvalidOptionError(f"PruneConfig(method={self.method!r}) already names the pattern; "
                                         f"drop pattern={self.pattern!r}.")
            object.__setattr__(self, "pattern", method)
            method = "magnitude"
        object.__setattr__(self, "method", _choice("prune", method, self.METHODS))
        object.__setattr__(self, "pattern", self._pattern(self.pattern))
        object.__setattr__(self, "scope", _choice("PruneConfig.scope", self.scope, self.SCOPES))
        object.__setattr__(self, "criterion", _choice("PruneConfig.criterion", self.criterion, self.CRITERIA))
        object.__setattr__(self, "sparsity", _fraction("PruneConfig.sparsity", self.sparsity))
        object.__setattr__(self, "mlp", _fraction("PruneConfig.mlp", self.mlp))
        object.__setattr__(self, "heads", _fraction("PruneConfig.heads", self.heads))
        _bool("PruneConfig.lm_head", self.lm_head)
        if self.nm is not None:
            self._check_nm()
        self._check_relevant()
        self._resolve_reconstruct()

    def _resolve_reconstruct(self) -> None:
        fits = (self.method == "wanda" and self.scope == "layer") or \
            (self.method == "structured" and self.criterion == "wanda")
        if self.reconstruct is None:
            object.__setattr__(self, "reconstruct", fits)
            return
        _bool("PruneConfig.reconstruct", self.reconstruct)
        if self.reconstruct and not fits:
            raise InvalidOptionError(
                "PruneConfig.reconstruct re-fits weights layer by layer on calibration activations: it needs "
                "method='wanda' with scope='layer', or method='structured' with criterion='wanda' (got "
                f"method={self.method!r}, scope={self.scope!r}, criterion={self.criterion!r}).")

    @staticmethod
    def _pattern(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidOptionError(f"PruneConfig.pattern must be 'unstructured' or 'N:M' such as '2:4'; got {value!r}")
        v = value.strip().lower()
        if v == "unstructured" or _NM.fullmatch(v):
            return v
        raise InvalidOptionError(f"PruneConfig.pattern must be 'unstructured' or 'N:M' such as '2:4'; got {value!r}")

    def _check_nm(self) -> None:
        n, m = self.nm  # type: ignore[misc]
        if not 0 < n < m or m > 64:
            raise InvalidOptionError(f"pattern {self.pattern!r}: N:M keeps N of every M weights, 0 < N < M <= 64 "
                                     "(e.g. '2:4' or '4:8').")
        implied = 1.0 - n / m
        if self.sparsity not in (0.5, implied):
            raise InvalidOptionError(f"pattern {self.pattern!r} sets the sparsity to {implied:g}; drop "
                                     f"sparsity={self.sparsity:g} (or use pattern='unstructured').")
        if self.scope != "layer":
            raise InvalidOptionError(f"pattern {self.pattern!r} prunes within each group of {m} inputs; "
                                     "scope='global' applies to unstructured pruning only.")
        object.__setattr__(self, "sparsity", implied)

    def _check_relevant(self) -> None:
        """Settings of another method are a mistake worth naming, not something to ignore."""
        default = PruneConfig.__dataclass_fields__
        unstructured = ("sparsity", "pattern", "scope")
        structured = ("mlp", "heads", "criterion")
        if self.method == "structured":
            stray = [f for f in unstructured if getattr(self, f) != default[f].default]
            if self.mlp == 0 and self.heads == 0:
                raise InvalidOptionError("prune='structured' with mlp=0 and heads=0 removes nothing; "
                                         "set PruneConfig(method='structured', mlp=0.25) or heads=.")
        else:
            stray = [f for f in structured if getattr(self, f) != default[f].default]
            if self.method == "none":
                stray += [f for f in unstructured + ("lm_head",) if getattr(self, f) != default[f].default]
        if stray:
            raise InvalidOptionError(f"PruneConfig.{stray[0]} does not apply to method={self.method!r}; "
                                     f"{', '.join(unstructured)} go with 'magnitude'/'wanda', "
                                     f"{', '.join(structured)} with 'structured'.")

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, else None."""
        match = _NM.fullmatch(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda" or (self.method == "structured" and self.criterion == "wanda")


@dataclass(frozen=True)
class KernelConfig(_Config):
    """Which kernels run the model.

    backend: "auto" (the fastest available per device: Triton's fused kernels on a CUDA GPU
    with Triton, torch ops on CPU), "triton" (insist on the Triton kernels: an error where they
    cannot run; on CPU they run only under TRITON_INTERPRET=1, slowly, for debugging) or
    "torch" (torch ops only). fuse_projections: compute q/k/v (and gate/up) as one matmul.
    fuse_norms: replace RMSNorm's several ops with one fused kernel.
    decode: how generate() decodes one token per step (Llama-style families): "cuda_graph" (a
    static KV cache and hetero_llm's decode step, captured once per batch size and cache length
    as a CUDA graph; GPU only), "static" (the same step and cache, run eagerly), "native" (CPU: every
    decoder layer of a step in one compiled call; symmetric INT8 fp32 models), "transformers"
    (transformers' own generate loop, untouched) or "auto" (the fastest that applies here).
    """

    backend: str = "auto"
    fuse_projections: bool = True
    fuse_norms: bool = True
    decode: str = "auto"
    version: int = CONFIG_VERSION

    BACKENDS = ("auto", "triton", "torch")
    DECODE = ("auto", "cuda_graph", "static", "native", "transformers")
    LATER = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _choice("kernels", self.backend, self.BACKENDS, self.LATER))
        object.__setattr__(self, "decode", _choice("KernelConfig.decode", self.decode, self.DECODE, ()))
        _bool("KernelConfig.fuse_projections", self.fuse_projections)
        _bool("KernelConfig.fuse_norms", self.fuse_norms)


@dataclass(frozen=True)
class PlacementConfig(_Config):
    """Where the model runs.

    device: "auto", "cpu" or "cuda" (the main device; "auto" picks a GPU when there is one).
    max_memory: bytes each device may hold for weights and KV cache, e.g.
    {"cuda": "8GiB", "cpu": "64GiB"} (keys "cpu", "cuda", "cuda:N"; default: what the
    hardware has, minus a reserve). A model over the GPU budget is split across GPU and CPU.
    device_map: pins, {module name: "cpu" | "cuda[:N]" | "offload"} for the embedding, a
    decoder layer (e.g. "model.layers.30"), the final norm or lm_head. "cpu" computes that
    block on the CPU; "offload" keeps its weights in CPU memory and streams them to the GPU
    every step. The planner places everything not pinned.
    tp, pp: tensor- and pipeline-parallel degrees inside a torchrun job (world size = tp * pp).
    vocab_parallel: with tp > 1, split the embedding and lm_head over the vocabulary too
    (less memory per rank; one all-reduce and one all-gather per step) instead of replicating them.
    micro_batches: with pp > 1, how many pieces a batched prompt is cut into so the stages
    work at once (0: one per sequence, up to 4 * pp).
    timeout_s: how long a rank waits for another before every rank stops with an error.
    """

    device: str = "auto"
    tp: int = 1
    pp: int = 1
    max_memory: dict[str, int] = field(default_factory=dict)
    device_map: dict[str, str] = field(default_factory=dict)
    vocab_parallel: bool = True
    micro_batches: int = 0
    timeout_s: float = 60.0
    version: int = CONFIG_VERSION

    DEVICES = ("auto", "cpu", "cuda")

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", _choice("device", self.device, self.DEVICES))
        object.__setattr__(self, "max_memory", _max_memory(self.max_memory))
        object.__setattr__(self, "device_map", _device_map(self.device_map))
        _positive_int("tp", self.tp)
        _positive_int("pp", self.pp)
        _bool("vocab_parallel", self.vocab_parallel)
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 0:
            raise InvalidOptionError(f"micro_batches must be an int >= 0 (0: automatic); got {self.micro_batches!r}")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise InvalidOptionError(f"timeout_s must be a positive number of seconds, e.g. 60; got {timeout!r}")
        object.__setattr__(self, "timeout_s", float(timeout))
        if (self.tp > 1 or self.pp > 1) and self.device_map:
            raise InvalidOptionError("device_map pins and tp/pp > 1 cannot be combined: a sharded model places "
                                     "each rank's part on that rank's device. Drop device_map (or use tp=pp=1).")


_SHORTCUT_FIELD = {"quantize": (QuantConfig, "scheme"), "prune": (PruneConfig, "method"),
                   "kernels": (KernelConfig, "backend")}
OPTION_NAMES = ("quantize", "prune", "kernels", "decode", "device", "tp", "pp", "max_memory", "device_map",
                "vocab_parallel", "micro_batches", "timeout_s", "batch_size", "prompt_len")


@dataclass(frozen=True)
class WorkloadConfig(_Config):
    """What the planner optimizes for: `batch_size` sequences decoded together after a
    `prompt_len`-token prompt (sizes the KV cache and the prefill prediction)."""

    batch_size: int = 1
    prompt_len: int = 512
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _positive_int("batch_size", self.batch_size)
        _positive_int("prompt_len", self.prompt_len)


@dataclass(frozen=True)
class Options(_Config):
    """All user options of plan()/accelerate(), validated."""

    quantize: QuantConfig = QuantConfig()
    prune: PruneConfig = PruneConfig()
    kernels: KernelConfig = KernelConfig()
    placement: PlacementConfig = PlacementConfig()
    workload: WorkloadConfig = WorkloadConfig()

    @classmethod
    def from_kwargs(cls, **options: Any) -> "Options":
        """Build from accelerate()'s keyword options; unknown names are an error."""
        unknown = [k for k in options if k not in OPTION_NAMES]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], OPTION_NAMES, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise InvalidOptionError(
                f"unknown option {unknown[0]!r}; known options: {', '.join(OPTION_NAMES)}.{did_you_mean}")
        built: dict[str, Any] = {}
        for name, (config_cls, field_name) in _SHORTCUT_FIELD.items():
            value = options.get(name)
            if value is None:
                built[name] = config_cls()
            elif isinstance(value, config_cls):
                built[name] = value
            elif isinstance(value, str):
                built[name] = config_cls(**{field_name: value})
            else:
                raise InvalidOptionError(
                    f"{name} must be a string or a {config_cls.__name__}; got {type(value).__name__}")
        if options.get("decode") is not None:  # shortcut for KernelConfig(decode=...)
            built["kernels"] = replace(built["kernels"], decode=options["decode"])
        device = options.get("device")
        built["placement"] = PlacementConfig(device="auto" if device is None else device,
                                             tp=options.get("tp", 1), pp=options.get("pp", 1),
                                             max_memory=options.get("max_memory") or {},
                                             device_map=options.get("device_map") or {},
                                             vocab_parallel=options.get("vocab_parallel", True),
                                             micro_batches=options.get("micro_batches", 0),
                                             timeout_s=options.get("timeout_s", 60.0))
        built["workload"] = WorkloadConfig(batch_size=options.get("batch_size", 1),
                                           prompt_len=options.get("prompt_len", 512))
        return cls(**built)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Options":
        return cls(quantize=QuantConfig.from_dict(data["quantize"]),
                   prune=PruneConfig.from_dict(data["prune"]),
                   kernels=KernelConfig.from_dict(data["kernels"]),
                   placement=PlacementConfig.from_dict(data["placement"]),
                   workload=WorkloadConfig.from_dict(data.get("workload", {})))
