"""Warm starts (CCDF): the reconstruct step computes the starting image a sampler's ``init`` names."""

from __future__ import annotations

import pytest
import torch

from medrecon.errors import ConfigError
from medrecon.recon.ct_fbp import fbp
from medrecon.recon.registry import METHODS
from medrecon.reconstruct import _initial_image
from tests.methods.test_anysize import ct_problem, slab_prior, slice_prior


@pytest.fixture()
def problem():
    return ct_problem(20, 23, depth=3)


def test_init_names_a_classical_method_whose_result_is_the_start(problem):
    tv = METHODS["tv"](problem, {}, None, None).samples[0]
    assert torch.equal(_initial_image("dds", {"init": "tv"}, problem, per_slice=True), tv)
    assert torch.allclose(_initial_image("dds", {"init": "fbp"}, problem, per_slice=True), fbp(problem.operator,
                                                                                               problem.y))
    # the study's parameters of the named method (reconstruct.params.tv) make the start
    tv3 = METHODS["tv"](problem, {"lam": 3e-4}, None, None).samples[0]
    assert torch.equal(_initial_image("dds", {"init": "tv"}, problem, True, {"tv": {"lam": 3e-4}}), tv3)
    assert not torch.equal(tv3, tv)
    assert _initial_image("dds", {}, problem, per_slice=True) is None
    assert _initial_image("dds", {"init": "none"}, problem, per_slice=True) is None
    # PaDIS documents an FBP start of its own; classical methods have none
    assert torch.allclose(_initial_image("padis", {}, problem, per_slice=True), fbp(problem.operator, problem.y))
    assert _initial_image("tv", {"init": "zeros"}, problem, per_slice=True) is None


@pytest.mark.parametrize("bad", ["sense", "dds", "nonsense"])
def test_init_that_is_not_a_classical_method_of_the_modality_is_refused(problem, bad):
    with pytest.raises(ConfigError, match="classical CT method"):
        _initial_image("dds", {"init": bad}, problem, per_slice=True)


def test_dds_from_the_tv_start_runs_only_the_last_steps(problem):
    problem.init = _initial_image("dds", {"init": "tv"}, problem, per_slice=True)
    res = METHODS["dds"](problem, {"steps": 20, "init": "tv", "start": 0.25}, slice_prior(),
                         torch.Generator().manual_seed(0))
    assert res.nfe == 5 and res.samples.shape == (1, 3, 20, 23) and bool(torch.isfinite(res.samples).all())


@pytest.mark.parametrize("method", ["diffusionblend", "diffusionblend++"])
def test_diffusionblend_takes_the_same_warm_start(problem, method):
    problem.init = _initial_image(method, {"init": "fbp"}, problem, per_slice=True)
    res = METHODS[method](problem, {"steps": 10, "init": "fbp", "start": 0.3}, slab_prior(),
                          torch.Generator().manual_seed(0))
    assert res.nfe == 3 and bool(torch.isfinite(res.samples).all())
    problem.init = None
    with pytest.raises(ConfigError, match="starting image"):
        METHODS[method](problem, {"steps": 10, "start": 0.3}, slab_prior(), None)


def test_modality_entries_override_a_methods_shared_params():
    from medrecon.reconstruct import modality_params

    value = {"steps": 50, "samples": 1, "CT": {"init": "tv", "samples": 8}, "MR": {"init": "l1_wavelet"}}
    assert modality_params(value, "CT") == {"steps": 50, "samples": 8, "init": "tv"}
    assert modality_params(value, "MR") == {"steps": 50, "samples": 1, "init": "l1_wavelet"}
    assert modality_params({"steps": 5}, "MR") == {"steps": 5}
    with pytest.raises(ConfigError, match="CT entry must be a mapping"):
        modality_params({"CT": 3}, "CT")
