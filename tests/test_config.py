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
    (lambda: PruneConfig(method="sparse"), "choose one of"),
    (lambda: PruneConfig(method="wnada"), "Did you mean 'wanda'"),
    (lambda: PruneConfig(method="wanda", sparsity=1.0), "fraction"),
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


# -- PruneConfig --------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    PruneConfig(),
    PruneConfig(method="magnitude"),
    PruneConfig(method="magnitude", sparsity=0.7, scope="global", lm_head=True),
    PruneConfig(method="wanda", sparsity=0.6),
    PruneConfig(method="wanda", pattern="4:8"),
    PruneConfig(method="2:4"),
    PruneConfig(method="1:4"),
    PruneConfig(method="structured"),
    PruneConfig(method="structured", mlp=0.5, heads=0.25, criterion="magnitude"),
    PruneConfig(method="structured", mlp=0.0, heads=0.5),
])
def test_prune_config_dict_round_trip(config):
    d = config.to_dict()
    assert d["version"] == CONFIG_VERSION
    assert json.loads(json.dumps(d)) == d
    again = PruneConfig.from_dict(json.loads(json.dumps(d)))
    assert again == config and hash(again) == hash(config)
    assert Options.from_dict(json.loads(json.dumps(Options.from_kwargs(prune=config).to_dict()))).prune == config


@pytest.mark.parametrize("shortcut, n, m, sparsity", [("2:4", 2, 4, 0.5), ("1:4", 1, 4, 0.75), ("4:8", 4, 8, 0.5),
                                                      (" 2:4 ", 2, 4, 0.5)])
def test_nm_shortcut_means_magnitude_in_that_pattern(shortcut, n, m, sparsity):
    for config in (PruneConfig(method=shortcut), Options.from_kwargs(prune=shortcut).prune):
        assert config.method == "magnitude" and config.pattern == shortcut.strip()
        assert config.nm == (n, m) and config.sparsity == sparsity
        assert config == PruneConfig(method="magnitude", pattern=shortcut.strip())
    assert not PruneConfig(method=shortcut).needs_calibration


@pytest.mark.parametrize("prune, method", [("magnitude", "magnitude"), ("Wanda", "wanda"),
                                           ("structured", "structured"), ("none", "none")])
def test_prune_string_shortcuts(prune, method):
    config = Options.from_kwargs(prune=prune).prune
    assert config == PruneConfig(method=method)
    assert config.nm is None and config.pattern == "unstructured"


def test_prune_defaults_and_calibration_needs():
    assert PruneConfig(method="magnitude").sparsity == 0.5
    assert PruneConfig(method="structured").mlp == 0.25 and PruneConfig(method="structured").heads == 0.0
    assert PruneConfig(method="wanda").needs_calibration
    assert PruneConfig(method="structured").needs_calibration  # criterion="wanda" by default
    assert not PruneConfig(method="structured", criterion="magnitude").needs_calibration
    assert not PruneConfig(method="magnitude").needs_calibration
    assert not PruneConfig().needs_calibration


@pytest.mark.parametrize("make, hint", [
    (lambda: PruneConfig(method="magnitude", sparsity=1.0), "fraction"),
    (lambda: PruneConfig(method="magnitude", sparsity=-0.1), "fraction"),
    (lambda: PruneConfig(method="magnitude", sparsity="x"), "fraction"),
    (lambda: PruneConfig(method="magnitude", sparsity=True), "fraction"),
    (lambda: PruneConfig(method="magnitude", pattern="3:2"), "0 < N < M"),
    (lambda: PruneConfig(method="magnitude", pattern="0:4"), "0 < N < M"),
    (lambda: PruneConfig(method="magnitude", pattern="2:4:8"), "'unstructured' or 'N:M'"),
    (lambda: PruneConfig(method="magnitude", pattern="foo"), "'unstructured' or 'N:M'"),
    (lambda: PruneConfig(method="magnitude", pattern=4), "'unstructured' or 'N:M'"),
    (lambda: PruneConfig(method="3:2"), "0 < N < M"),
    (lambda: PruneConfig(method="2:4", pattern="1:4"), "already names the pattern"),
    (lambda: PruneConfig(method="magnitude", pattern="2:4", sparsity=0.3), "sets the sparsity to 0.5"),
    (lambda: PruneConfig(method="wanda", pattern="1:4", sparsity=0.6), "sets the sparsity to 0.75"),
    (lambda: PruneConfig(method="magnitude", pattern="2:4", scope="global"), "scope='global'"),
    (lambda: PruneConfig(method="magnitude", scope="model"), "PruneConfig.scope"),
    (lambda: PruneConfig(method="magnitude", mlp=0.5), "PruneConfig.mlp does not apply"),
    (lambda: PruneConfig(method="wanda", heads=0.5), "PruneConfig.heads does not apply"),
    (lambda: PruneConfig(method="magnitude", criterion="magnitude"), "PruneConfig.criterion does not apply"),
    (lambda: PruneConfig(method="structured", sparsity=0.3), "PruneConfig.sparsity does not apply"),
    (lambda: PruneConfig(method="structured", pattern="2:4"), "does not apply"),
    (lambda: PruneConfig(method="structured", scope="global"), "PruneConfig.scope does not apply"),
    (lambda: PruneConfig(method="structured", mlp=0.0, heads=0.0), "removes nothing"),
    (lambda: PruneConfig(method="structured", mlp=1.0), "PruneConfig.mlp"),
    (lambda: PruneConfig(method="structured", heads=-0.5), "PruneConfig.heads"),
    (lambda: PruneConfig(method="structured", criterion="random"), "PruneConfig.criterion"),
    (lambda: PruneConfig(method="none", sparsity=0.3), "does not apply to method='none'"),
    (lambda: PruneConfig(method="none", lm_head=True), "does not apply to method='none'"),
    (lambda: PruneConfig(method="wnada"), "Did you mean 'wanda'"),
    (lambda: PruneConfig(method="structred"), "Did you mean 'structured'"),
    (lambda: PruneConfig(method="lottery"), "choose one of"),
    (lambda: PruneConfig(method=None), "must be a string"),
    (lambda: PruneConfig(method="magnitude", lm_head="yes"), "lm_head"),
    (lambda: PruneConfig(method="magnitude", lm_head=1), "lm_head"),
    (lambda: Options.from_kwargs(prune="2:3:4"), "choose one of"),
    (lambda: Options.from_kwargs(prune=0.5), "PruneConfig"),
    (lambda: PruneConfig.from_dict({"method": "magnitude", "amount": 0.5}), "amount"),
])
def test_bad_prune_values_are_typed_errors(make, hint):
    with pytest.raises(InvalidOptionError, match=hint) as info:
        make()
    assert isinstance(info.value, ValueError)
