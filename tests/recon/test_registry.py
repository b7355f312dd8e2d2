"""Every registered method, checked the same way: what `medrecon methods` lists and reconstruct relies on.

A new method module is picked up here without editing this file (the parametrisation is the registry).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medrecon import config as cfgmod
from medrecon.errors import ConfigError
from medrecon.recon.registry import METHOD_PACKAGES, METHODS, REGISTRY, get_method, load_all, validate_params
from medrecon.reconstruct import modality_params

ROOT = Path(__file__).resolve().parents[2]
load_all()
NAMES = sorted(REGISTRY)

# The methods medrecon has shipped so far: none may disappear from the registry by accident.
SHIPPED = {"fbp", "fdk", "sirt", "cgls", "tv", "zero_filled", "sense", "l1_wavelet", "mri_tv", "dds", "dps",
           "diffusionblend", "diffusionblend++", "padis", "padis3d", "resample", "latent_dps"}


def test_registry_holds_every_shipped_method():
    assert SHIPPED <= set(REGISTRY)
    assert set(METHODS) == set(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_method_registration_is_complete(name):
    spec = REGISTRY[name]
    assert spec.name == name and METHODS[name] is spec.run
    assert spec.modalities and set(spec.modalities) <= {"CT", "MR"}
    assert spec.module.rsplit(".", 1)[0] in METHOD_PACKAGES
    assert isinstance(spec.defaults, dict) and all(isinstance(k, str) for k in spec.defaults)
    assert spec.paper.strip() and "\n" not in spec.paper
    assert spec.memory_copies > 0
    assert spec.init in (None, "fbp", "param")
    assert spec.init != "param" or "init" in spec.defaults      # the parameter that names the start
    assert validate_params(name, None) == spec.defaults
    assert validate_params(name, {}) is not spec.defaults          # a copy: a method may not edit its defaults


@pytest.mark.parametrize("name", NAMES)
def test_prior_kind_and_loader(name):
    from medrecon.diffusion.kinds import training_kinds

    spec = REGISTRY[name]
    if spec.prior is None:
        assert spec.loader is None
        with pytest.raises(ConfigError, match="takes no prior"):
            spec.load_prior()
        return
    assert spec.prior in training_kinds(), f"{name}: prior kind {spec.prior!r} is not a training kind"
    assert callable(spec.load_prior())


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_one_clear_error(name):
    spec = REGISTRY[name]
    with pytest.raises(ConfigError) as err:
        spec.run(None, {"no_such_param": 1})              # refused before the method looks at the problem
    text = str(err.value)
    assert "no_such_param" in text and repr(name) in text
    for key in spec.defaults:
        assert key in text
    assert err.value.fix and f"reconstruct.params.{name}" in err.value.fix


@pytest.mark.parametrize("name", NAMES)
def test_a_known_parameter_overrides_its_default(name):
    spec = REGISTRY[name]
    if not spec.defaults:
        return
    key = sorted(spec.defaults)[0]
    assert validate_params(name, {key: "x"})[key] == "x"


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        get_method("dsp")
    assert "dsp" in str(err.value) and "dps" in err.value.fix and "fbp" in err.value.fix


CONFIGS = sorted({*ROOT.glob("config.yaml"), *ROOT.glob("config/*.yaml")})


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_shipped_configs_use_registered_methods_and_parameters(config):
    """The study configs name only registered methods, for their modality, with parameters they have."""
    cfg = cfgmod.validate(yaml.safe_load(config.read_text()), str(config))
    for modality, names in cfg["reconstruct"]["methods"].items():
        for name in names:
            assert modality in get_method(name).modalities, (config, modality, name)
    for name, params in cfg["reconstruct"]["params"].items():
        for modality in get_method(name).modalities:     # CT:/MR: entries override the shared keys
            validate_params(name, modality_params(params, modality))
    for modality, priors in cfg["reconstruct"]["priors"].items():
        for name in priors:
            assert get_method(name).prior is not None, (config, modality, name)


def test_schema_default_methods_are_registered():
    cfg = cfgmod.validate({})
    for modality, names in cfg["reconstruct"]["methods"].items():
        for name in names:
            assert modality in get_method(name).modalities


def test_training_kinds_are_the_checkpoint_kinds():
    """Every kind a checkpoint may declare has a registered training, and no training writes another kind."""
    from medrecon.diffusion.checkpoint import KINDS
    from medrecon.diffusion.kinds import training_kinds

    kinds = training_kinds()
    assert set(kinds) == set(KINDS)
    assert all(k.description and callable(k.train) for k in kinds.values())


def test_unknown_training_kind_lists_the_kinds(tmp_path):
    from medrecon.diffusion.kinds import train_prior

    with pytest.raises(ConfigError) as err:
        train_prior({"kind": "slices"}, [], tmp_path / "p.pt")
    assert "slices" in str(err.value) and "slab" in err.value.fix and "latent" in err.value.fix
