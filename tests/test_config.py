"""Option configs: string shortcuts, frozen dataclasses, dict round trips, validation."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hetero_llm import InvalidOptionError, KernelConfig, Options, PlacementConfig, PruneConfig, QuantConfig
from hetero_llm.config import CONFIG_VERSION, OPTION_NAMES

CONFIG_CLASSES = (QuantConfig, PruneConfig, KernelConfig, PlacementConfig)


def test_defaults():
    o = Options()
    assert o.quantize == QuantConfig(scheme="auto", lm_head=True)
    assert o.prune == PruneConfig(method="none")
    assert o.kernels == KernelConfig(backend="auto", fuse_projections=True, fuse_norms=True)
    assert o.placement == PlacementConfig(device="auto", tp=1, pp=1)
    assert Options.from_kwargs() == o
    assert all(c().version == CONFIG_VERSION for c in CONFIG_CLASSES)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(quantize="int8"), dict(quantize=QuantConfig(scheme="int8"))),
    (dict(quantize="int8-asym"), dict(quantize=QuantConfig(scheme="int8-asym"))),
    (dict(quantize="none"), dict(quantize=QuantConfig(scheme="none"))),
    (dict(quantize=" INT8 "), dict(quantize=QuantConfig(scheme="int8"))),  # normalized
    (dict(kernels="torch"), dict(kernels=KernelConfig(backend="torch"))),
    (dict(prune="none"), dict(prune=PruneConfig())),
    (dict(device="cpu"), dict(placement=PlacementConfig(device="cpu"))),
    (dict(device="CUDA", tp=1, pp=1), dict(placement=PlacementConfig(device="cuda"))),
    (dict(quantize=None), {}),  # None means the default
])
def test_string_shortcuts(kwargs, expected):
    assert Options.from_kwargs(**kwargs) == dataclasses.replace(Options(), **expected)


def test_config_objects_are_taken_as_given():
    q = QuantConfig(scheme="int8-asym", lm_head=False)
    k = KernelConfig(backend="torch", fuse_projections=False, fuse_norms=False)
    o = Options.from_kwargs(quantize=q, kernels=k, prune=PruneConfig())
    assert o.quantize is q and o.kernels is k


def test_shortcut_stored_normalized():
    assert QuantConfig(scheme="Int8-Asym").scheme == "int8-asym"
    assert KernelConfig(backend=" Torch").backend == "torch"
    assert PlacementConfig(device="CPU").device == "cpu"


@pytest.mark.parametrize("config", [QuantConfig(), PruneConfig(), KernelConfig(), PlacementConfig(), Options()])
def test_configs_are_frozen(config):
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, getattr(config, field))
    hash(config)  # frozen dataclasses of hashables are hashable


@pytest.mark.parametrize("config", [
    QuantConfig(), QuantConfig(scheme="int8-asym", lm_head=False), PruneConfig(),
    KernelConfig(backend="torch", fuse_projections=False), PlacementConfig(device="cpu"),
])
def test_config_dict_round_trip(config):
    d = config.to_dict()
    assert d["version"] == CONFIG_VERSION
    assert json.loads(json.dumps(d)) == d  # plain JSON data
    assert type(config).from_dict(d) == config


def test_options_dict_round_trip():
    o = Options.from_kwargs(quantize=QuantConfig(scheme="int8-asym", lm_head=False),
                            kernels=KernelConfig(fuse_norms=False), device="cpu")
    d = o.to_dict()
    assert set(d) == {"quantize", "prune", "kernels", "placement", "workload"}
    assert d["quantize"] == {"scheme": "int8-asym", "granularity": "channel", "group_size": 128,
                             "smooth_alpha": 0.5, "outlier_channels": 0, "lm_head": False, "embeddings": True,
                             "overrides": {}, "version": CONFIG_VERSION}
    assert Options.from_dict(json.loads(json.dumps(d))) == o


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(InvalidOptionError, match="bits"):
        QuantConfig.from_dict({"scheme": "int8", "bits": 4})


def test_from_dict_validates_values():
    with pytest.raises(InvalidOptionError):
        QuantConfig.from_dict({"scheme": "int9"})
    with pytest.raises(InvalidOptionError):
        PlacementConfig.from_dict({"device": "cpu", "tp": 0})
    assert PlacementConfig.from_dict({"device": "cpu", "tp": 2}).tp == 2  # tensor parallel is available


@pytest.mark.parametrize("make, hint", [
    (lambda: QuantConfig(scheme="int9"), "Did you mean 'int8'"),
    (lambda: QuantConfig(scheme="int4"), "not available"),
    (lambda: QuantConfig(granularity="row"), "granularity"),
    (lambda: QuantConfig(group_size=0), "positive integer"),
    (lambda: QuantConfig(smooth_alpha=1.5), r"\[0.0, 1.0\]"),
    (lambda: QuantConfig(smooth_alpha="0.5"), "number"),
    (lambda: QuantConfig(outlier_channels=-1), ">= 0"),
    (lambda: QuantConfig(embeddings="yes"), "True or False"),
    (lambda: QuantConfig(scheme="w8a8", granularity="group"), "per-channel"),
    (lambda: QuantConfig(scheme="fp8"), "not available"),
    (lambda: QuantConfig(scheme=""), "choose one of"),
    (lambda: QuantConfig(scheme=8), "must be a string"),
    (lambda: QuantConfig(lm_head="yes"), "lm_head"),
    (lambda: QuantConfig(lm_head=1), "lm_head"),
    (lambda: PruneConfig(method="2:4"), "not available"),
    (lambda: PruneConfig(method="wanda"), "not available"),
    (lambda: PruneConfig(method="sparse"), "choose one of"),
    (lambda: KernelConfig(backend="cuda"), "choose one of"),
    (lambda: KernelConfig(backend="tourch"), "Did you mean 'torch'"),
    (lambda: PlacementConfig(device="tpu"), "choose one of"),
    (lambda: PlacementConfig(tp=-1), "positive integer"),
    (lambda: PlacementConfig(pp=2, micro_batches=1.5), "micro_batches"),
    (lambda: PlacementConfig(tp=2, timeout_s=float("inf")), "timeout_s"),
    (lambda: PlacementConfig(tp=0), "positive integer"),
    (lambda: PlacementConfig(tp=-1), "positive integer"),
    (lambda: PlacementConfig(tp=True), "positive integer"),
    (lambda: PlacementConfig(pp="1"), "positive integer"),
    (lambda: PlacementConfig(tp=1.0), "positive integer"),
    (lambda: Options.from_kwargs(quantize=8), "QuantConfig"),
    (lambda: Options.from_kwargs(prune=KernelConfig()), "PruneConfig"),
    (lambda: Options.from_kwargs(tp=None), "positive integer"),
    (lambda: Options.from_kwargs(qunatize="int8"), "Did you mean 'quantize'"),
    (lambda: Options.from_kwargs(zzz=1), "known options"),
])
def test_invalid_values_raise_invalid_option(make, hint):
    with pytest.raises(InvalidOptionError, match=hint) as info:
        make()
    assert isinstance(info.value, ValueError)


def test_unknown_option_message_lists_known_options():
    with pytest.raises(InvalidOptionError) as info:
        Options.from_kwargs(speed="max")
    assert all(name in str(info.value) for name in OPTION_NAMES)


@pytest.mark.parametrize("field", ["fuse_projections", "fuse_norms"])
def test_kernel_flags_must_be_bool(field):
    with pytest.raises(InvalidOptionError, match=field):
        KernelConfig(**{field: "no"})


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_unknown_config_version_is_refused(cls):
    d = cls().to_dict()
    d["version"] = CONFIG_VERSION + 1
    with pytest.raises(InvalidOptionError, match="version"):
        cls.from_dict(d)


def test_empty_device_is_refused_like_other_empty_options():
    with pytest.raises(InvalidOptionError):
        Options.from_kwargs(device="")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_memory={"cuda": "lots"}), "size such as"),
    (dict(max_memory={"tpu": "8GiB"}), "max_memory key"),
    (dict(max_memory=["8GiB"]), "max_memory must be a dict"),
    (dict(device_map={"model.layers.0": "disk"}), "device_map"),
    (dict(device_map={3: "cpu"}), "module names"),
    (dict(device_map="auto"), "device_map must be a dict"),
    (dict(batch_size=0), "batch_size"),
    (dict(prompt_len=-1), "prompt_len"),
])
def test_bad_placement_and_workload_options_are_typed_errors(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        Options.from_kwargs(**kwargs)


def test_bad_scheme_overrides_are_typed_errors():
    with pytest.raises(InvalidOptionError, match="overrides"):
        QuantConfig(overrides={"*.down_proj": "fp4"})
    with pytest.raises(InvalidOptionError, match="overrides must be a dict"):
        QuantConfig(overrides=["*.down_proj"])


def test_placement_options_normalize_and_round_trip():
    o = Options.from_kwargs(max_memory={"cuda": "1.5GB", 1: 1024, "cpu": "2GiB"},
                            device_map={"lm_head": "CUDA", "model.layers.3": "offload"}, batch_size=4)
    assert dict(o.placement.max_memory) == {"cuda:0": 1_500_000_000, "cuda:1": 1024, "cpu": 2 * 2**30}
    assert dict(o.placement.device_map) == {"lm_head": "cuda:0", "model.layers.3": "offload"}
    hash(o)
    assert Options.from_dict(json.loads(json.dumps(o.to_dict()))) == o
