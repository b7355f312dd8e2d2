"""MCG: its measured bias on the 1D seed example and on the d = 64 linear-Gaussian problem (exact posteriors from
:mod:`medrecon.diffusion.analytic`), the projection onto the data, and end to end runs on small odd-sized CT and
MR problems with tiny untrained networks."""

from __future__ import annotations

import math

import pytest
import torch

import medrecon.methods.mcg  # noqa: F401  (registers mcg)
from medrecon.diffusion.analytic import DenseOperator, GaussianMixturePrior, linear_gaussian_problem
from medrecon.errors import ConfigError
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_ddnm import run_end_to_end

F64 = torch.float64
SEED = dict(weights=[0.3, 0.5, 0.2], means=[[-2.5], [0.0], [1.5]], covs=[[0.09], [0.16], [0.09]])


def test_mcg_on_the_seed_problem_collapses_onto_the_data():
    """y = x + N(0, 0.8^2), y = 0.5: the exact posterior has mean 0.350 and std 0.620. MCG projects onto the
    measurement set at every step and onto A x = y at the last, so every sample is x = y: mean 0.5 and std 0
    (measured to 1e-7). MCG ignores the noise: biased by construction, asserted so that a change shows."""
    prior = GaussianMixturePrior(**SEED)
    post = prior.posterior(torch.ones(1, 1), torch.tensor([0.5]), 0.8)
    prob = ReconProblem(y=torch.tensor([0.5]), operator=DenseOperator(torch.ones(1, 1, dtype=F64), (1, 1)),
                        modality="CT", image_shape=(1, 1, 1), noise_std=0.8)
    n = 500
    r = METHODS["mcg"](prob, {"samples": n, "steps": 100, "dtype": "float64"}, prior.as_prior(),
                       torch.Generator().manual_seed(1))
    x = r.samples.reshape(-1)
    assert r.nfe == 100 and bool(torch.isfinite(x).all())
    assert float(post.mean[0]) == pytest.approx(0.350, abs=0.001)
    assert float(post.cov[0, 0].sqrt()) == pytest.approx(0.620, abs=0.005)
    assert float(x.mean()) == pytest.approx(0.5, abs=1e-5) and float(x.std()) < 1e-5


@pytest.mark.parametrize(("zeta", "mean_lo", "mean_hi", "ratio_lo", "ratio_hi"), [
    # measured (400 samples, 100 steps): zeta 0 (projection only): mean error 0.19, std error 0.19, std ratio
    # 1.15; zeta 0.3: 0.086 / 0.106 / 0.91. 1 SE of the mean's error: 0.013.
    (0.0, 0.15, 0.24, 1.08, 1.22),
    (0.3, 0.04, 0.13, 0.85, 0.97),
])
def test_mcg_on_the_linear_gaussian_problem_is_biased_and_fits_the_noise(zeta, mean_lo, mean_hi, ratio_lo,
                                                                         ratio_hi):
    prior, post, prob = linear_gaussian_problem()
    n = 400
    r = METHODS["mcg"](prob, {"samples": n, "steps": 100, "zeta": zeta, "dtype": "float64"}, prior.as_prior(),
                       torch.Generator().manual_seed(1))
    x = r.samples.reshape(n, -1).double()
    a, y = prob.operator.m, prob.y.double()
    mean_rel = float((x.mean(0) - post.mean).norm() / post.mean.norm())
    std_rel = float((x.std(0) - post.std).norm() / post.std.norm())
    ratio = float(x.std(0).mean() / post.std.mean())
    se = float(post.std.norm() / math.sqrt(n) / post.mean.norm())
    print(f"zeta {zeta}: mean {mean_rel:.3f} (SE {se:.3f}) std {std_rel:.3f} ratio {ratio:.3f}")
    assert mean_lo < mean_rel < mean_hi and ratio_lo < ratio < ratio_hi, (mean_rel, std_rel, ratio)
    # the final projection fits the noisy data exactly (float32 CG), far below the noise (||n|| ~ 0.1 sqrt(32))
    assert float(((x @ a.T) - y).norm(dim=1).max()) < 1e-3 * 0.1 * math.sqrt(32)


def test_relaxed_projection_and_determinism():
    prior, _, prob = linear_gaussian_problem()
    params = {"samples": 8, "steps": 20, "zeta": 0.3, "dtype": "float64"}
    a = METHODS["mcg"](prob, params, prior.as_prior(), torch.Generator().manual_seed(2))
    b = METHODS["mcg"](prob, params, prior.as_prior(), torch.Generator().manual_seed(2))
    assert torch.equal(a.samples, b.samples)
    half = METHODS["mcg"](prob, {**params, "lamb": 0.5}, prior.as_prior(), torch.Generator().manual_seed(2))
    # lamb = 0.5 halves the last correction: the residual stays well above the exact projection's
    assert half.info["final_residual_norm_mean"] > 100 * a.info["final_residual_norm_mean"]


@pytest.mark.parametrize(("params", "match"), [({"lamb": 0.0}, "lamb"), ({"zeta": -1.0}, "zeta"),
                                               ({"cg_iter": 0}, "cg_iter"), ({"stpes": 3}, "unknown parameter")])
def test_bad_parameters_are_one_clear_error(params, match):
    prior, _, prob = linear_gaussian_problem()
    with pytest.raises(ConfigError, match=match):
        METHODS["mcg"](prob, params, prior.as_prior(), None)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_mcg_end_to_end_on_odd_sizes(modality):
    resid, ynorm = run_end_to_end("mcg", {"steps": 4, "zeta": 1e-3}, modality, 21, 23)
    print(f"mcg {modality}: residual {resid:.3g} of {ynorm:.3g}")
    assert resid < 0.1 * ynorm        # the last step projects onto the data (30 CG iterations)
