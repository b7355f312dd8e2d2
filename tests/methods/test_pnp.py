"""PnP-ADMM and RED with a denoiser D(x, sigma): exact fixed points on analytic priors, the non-convex seed problem,
and end-to-end runs on small CT and MR problems of odd size with a tiny untrained network.

What is exactly true (medrecon/methods/pnp.py):

* PnP-ADMM, Gaussian prior N(mu, S): the MMSE denoiser at sigma_d is the proximal map of sigma_d^2 (-log pi), so
  ADMM (data term 1/2 ||Ax - y||^2, penalty rho) converges to the posterior mean of the Gaussian problem with noise
  variance rho sigma_d^2, for ANY sigma_d; with rho = s_y^2 / sigma_d^2 that is the true posterior mean. (For a
  non-Gaussian prior it is not: the seed mixture gives a sigma_d- and start-dependent point.)
* RED: a stationary point of -log p(y|x) - lam sigma^2 log p_sigma(x), the MAP under the sigma-smoothed prior; for a
  Gaussian prior the posterior mean under N(mu, S + sigma^2 I) with noise variance lam sigma^2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medrecon.methods.pnp  # noqa: F401  (registers pnp_admm, pnp_red)
from medrecon.diffusion.analytic import DenseOperator, GaussianMixturePrior, GaussianPrior, linear_gaussian_problem
from medrecon.diffusion.dc import operator_norm_sq
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _spec, ct_problem, slice_prior

F64 = torch.float64
EXACT = {"weights": "absolute", "dtype": "float64", "cg_iter": 64, "cg_tol": 1e-14}


def _gaussian_problem():
    """The d = 64 linear-Gaussian problem with a float64 operator (so the fixed point is checked to 1e-10)."""
    prior, _, prob = linear_gaussian_problem()
    prob.operator.in_dtype = prob.operator.out_dtype = F64
    prob.y = prob.y.to(F64)
    return prior, prob, prob.operator.m, prob.y, float(prob.noise_std)


@pytest.mark.parametrize("sigma_d", [0.3, 1.0])
def test_pnp_admm_with_a_gaussian_prior_converges_to_the_posterior_mean(sigma_d):
    prior, prob, a, y, s_y = _gaussian_problem()
    bayes = {**EXACT, "iterations": 500, "sigma_d": sigma_d, "rho": s_y**2 / sigma_d**2}
    r = METHODS["pnp_admm"](prob, bayes, prior.as_prior())
    assert r.nfe == 500 and r.info["network_calls"] == 500 and r.samples.shape == (1, 1, 8, 8)
    exact = prior.posterior(a, y, s_y).mean
    assert float((r.samples.reshape(-1) - exact).abs().max()) < 1e-10       # measured 3e-14
    # any other rho: the posterior mean with noise variance rho sigma_d^2 (prior strength rho sigma_d^2)
    rho = 4 * s_y**2 / sigma_d**2
    r = METHODS["pnp_admm"](prob, {**bayes, "rho": rho}, prior.as_prior())
    other = prior.posterior(a, y, (rho * sigma_d**2) ** 0.5).mean
    assert float((r.samples.reshape(-1) - other).abs().max()) < 1e-10
    assert float((other - exact).abs().max()) > 0.05                         # so the check above tells them apart


def test_pnp_admm_relative_rho_is_a_fraction_of_the_operator_norm():
    prior, prob, *_ = _gaussian_problem()
    norm_sq = operator_norm_sq(prob.operator)
    p = {**EXACT, "iterations": 20, "sigma_d": 0.5}
    absolute = METHODS["pnp_admm"](prob, {**p, "rho": 0.1 * norm_sq}, prior.as_prior()).samples
    relative = METHODS["pnp_admm"](prob, {**p, "rho": 0.1, "weights": "relative"}, prior.as_prior()).samples
    assert torch.allclose(absolute, relative, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver, iterations", [("fixed_point", 300), ("gradient", 600)])
@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_red_with_a_gaussian_prior_converges_to_the_map_under_the_smoothed_prior(solver, iterations, sigma):
    prior, prob, a, y, s_y = _gaussian_problem()
    smoothed = GaussianPrior(prior.mean, prior.cov + sigma**2 * torch.eye(64, dtype=F64))
    # the Bayes weight (noise variance s_y^2) and another one; gradient descent with the small Bayes weight
    # (0.01 .. 0.11) crawls along the null space of A (measured error 0.29 after 600 iterations): only lam = 2
    lams = (s_y**2 / sigma**2, 2.0) if solver == "fixed_point" else (2.0,)
    for lam in lams:
        r = METHODS["pnp_red"](prob, {**EXACT, "iterations": iterations, "sigma_d": sigma, "lam": lam,
                                      "solver": solver}, prior.as_prior())
        expected = smoothed.posterior(a, y, (lam * sigma**2) ** 0.5).mean
        err = float((r.samples.reshape(-1) - expected).abs().max())
        print(f"RED {solver} sigma {sigma} lam {lam:.4g}: max error {err:.2g}")
        assert err < 1e-7                                                   # measured 3e-14 .. 6e-8
        unsmoothed = prior.posterior(a, y, (lam * sigma**2) ** 0.5).mean
        assert float((expected - unsmoothed).abs().max()) > 0.01             # the smoothing is what is checked


# --------------------------------------------------------------------------------- the seed mixture (1D)

SEED_Y, SEED_SY = 0.5, 0.8


def _seed_mixture() -> GaussianMixturePrior:
    return GaussianMixturePrior([0.3, 0.5, 0.2], [[-2.5], [0.0], [1.5]], [[0.09], [0.16], [0.09]])


def _seed_problem(init: float | None = None) -> ReconProblem:
    """x in R (a 1 x 1 x 1 image), A = 1, y = 0.5, s_y = 0.8 (docs: wave2 notes, section 0.2)."""
    op = DenseOperator(torch.eye(1, dtype=F64), (1, 1, 1))
    op.in_dtype = op.out_dtype = F64
    start = None if init is None else torch.full((1, 1, 1), init, dtype=F64)
    return ReconProblem(y=torch.tensor([[SEED_Y]], dtype=F64), operator=op, modality="CT", image_shape=(1, 1, 1),
                        noise_std=SEED_SY, init=start)


def _seed_run(method: str, sigma: float, init: float | None = None, **over) -> float:
    weight = {"pnp_admm": "rho", "pnp_red": "lam"}[method]
    p = {**EXACT, "cg_iter": 1, "iterations": 300, "sigma_d": sigma, weight: SEED_SY**2 / sigma**2,
         "init": None if init is None else "given", **over}
    return float(METHODS[method](_seed_problem(init), p, _seed_mixture().as_prior()).samples)


def test_pnp_admm_on_the_seed_mixture_depends_on_sigma_d_and_on_the_start():
    """Reference fixed points (wave2 notes 6.1): 0.1001 / 0.1269 / 0.3496 for sigma_d = 0.1 / 0.4 / 0.8 (Bayes rho).
    Only sigma_d = s_y with A = 1 gives the posterior mean (the fixed point is then Tweedie's D(y, s_y)); the
    problem is non-convex, so at sigma_d = 0.1 the start picks the mode."""
    mix = _seed_mixture()
    post_mean = float(mix.posterior(torch.ones(1, 1), torch.tensor([SEED_Y]), SEED_SY).mean[0])
    assert post_mean == pytest.approx(0.3496, abs=1e-4)
    assert _seed_run("pnp_admm", 0.8) == pytest.approx(post_mean, abs=1e-10)
    tweedie = mix.denoise(torch.tensor([[SEED_Y]], dtype=F64), torch.tensor(SEED_SY, dtype=F64))
    assert _seed_run("pnp_admm", 0.8) == pytest.approx(float(tweedie), abs=1e-10)
    assert _seed_run("pnp_admm", 0.4) == pytest.approx(0.12693, abs=1e-5)   # measured 0.126926
    assert _seed_run("pnp_admm", 0.1) == pytest.approx(0.10006, abs=1e-5)   # ~ the MAP 0.1000
    assert _seed_run("pnp_admm", 0.1, init=-2.5) == pytest.approx(-2.13013, abs=1e-5)
    assert _seed_run("pnp_admm", 0.1, init=1.5) == pytest.approx(1.36887, abs=1e-5)
    # at sigma_d = 0.4 the smoothed modes have merged: every start reaches the same point
    assert _seed_run("pnp_admm", 0.4, init=-2.5) == pytest.approx(_seed_run("pnp_admm", 0.4), abs=1e-10)


@pytest.mark.parametrize("solver", ["fixed_point", "gradient"])
def test_red_on_the_seed_mixture_is_the_map_under_the_smoothed_prior(solver):
    """RED's fixed point = argmax p(y|x) p_sigma(x), found here on a 1e-5 grid (notes 6.2: 0.1013 / 0.1851 / 0.3941)."""
    mix = _seed_mixture()
    grid = torch.linspace(-4, 4, 800_001, dtype=F64)
    for sigma, ref in [(0.05, 0.1013), (0.4, 0.1851), (0.8, 0.3941)]:
        log_post = mix.log_prob(grid[:, None], sigma) - 0.5 * (SEED_Y - grid) ** 2 / SEED_SY**2
        argmax = float(grid[log_post.argmax()])
        got = _seed_run("pnp_red", sigma, solver=solver, iterations=2000 if sigma < 0.1 else 300)
        assert got == pytest.approx(argmax, abs=2e-5) and got == pytest.approx(ref, abs=1e-4)


# --------------------------------------------------------------------------------- end to end, tiny networks


def _mr_problem(h: int, w: int) -> tuple[ReconProblem, Prior]:
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=6, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1).astype(np.float32))
    x = torch.stack([mag, 0.5 * mag]).to(torch.complex64)
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(2, h, w))
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                  meta={"kind": "slice", "normalisation": mr})
    return prob, prior


CASES = {
    "admm": ("pnp_admm", {"iterations": 4}),
    "admm-annealed-hqs": ("pnp_admm", {"iterations": 4, "sigma_max": 0.5, "splitting": "hqs"}),
    "admm-ztv": ("pnp_admm", {"iterations": 4, "ztv": True}),
    "red": ("pnp_red", {"iterations": 4}),
    "red-gradient": ("pnp_red", {"iterations": 4, "solver": "gradient"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_end_to_end_on_odd_sized_ct_and_mr_with_a_tiny_network(modality, case):
    method, params = CASES[case]
    h, w = 21, 23
    prob, prior = (ct_problem(h, w, 2), slice_prior()) if modality == "CT" else _mr_problem(h, w)
    res = METHODS[method](prob, params, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 2, h, w) and res.samples.dtype == prob.operator.in_dtype
    assert bool(torch.isfinite(res.samples).all())
    assert res.nfe == 4 and res.info["network_calls"] == 4
    again = METHODS[method](prob, params, prior, torch.Generator().manual_seed(1))
    assert torch.equal(res.samples, again.samples)                 # deterministic (the generator is unused)
    empty = float(torch.linalg.vector_norm(prob.y))
    print(f"{modality} {case}: residual {res.info['final_residual_norm_mean']:.4g} (empty image {empty:.4g})")
    # fits the data far better than empty space: measured 0.005-0.11 of the empty image's after 4 iterations
    assert res.info["final_residual_norm_mean"] < 0.2 * empty


def test_annealed_schedule_and_its_rho():
    calls: list[dict] = []
    prob = ct_problem(21, 23, 1)
    prob.progress = calls.append
    METHODS["pnp_admm"](prob, {"iterations": 3, "sigma_d": 0.05, "sigma_max": 0.8, "rho": 0.1}, slice_prior())
    assert [c["i"] for c in calls] == [0, 1, 2]
    assert [c["sigma"] for c in calls] == pytest.approx([0.8, 0.2, 0.05])        # geometric, ends at sigma_d
    rho_abs = calls[-1]["rho"]
    assert [c["rho"] for c in calls] == pytest.approx([rho_abs / 256, rho_abs / 16, rho_abs])


def test_the_init_image_is_the_start():
    prior, prob, *_ = _gaussian_problem()
    prob.init = torch.full((1, 8, 8), 3.0, dtype=F64)
    calls: list[dict] = []
    prob.progress = calls.append
    p = {**EXACT, "iterations": 1, "sigma_d": 0.5, "lam": 1e-9, "solver": "gradient", "step": 1e-9}
    METHODS["pnp_red"](prob, {**p, "init": "tv"}, prior.as_prior())
    assert torch.allclose(calls[0]["x0"], prob.init[None], atol=1e-6)
    calls.clear()
    METHODS["pnp_red"](prob, p, prior.as_prior())                 # init unset: the prior's background (0)
    assert float(calls[0]["x0"].abs().max()) < 1e-6


@pytest.mark.parametrize("method, params, match", [
    ("pnp_admm", {"samples": 2}, "samples must be 1"),
    ("pnp_admm", {"sigma_d": 0.0}, "sigma_d must be > 0"),
    ("pnp_admm", {"iterations": 0}, "iterations must be >= 1"),
    ("pnp_admm", {"splitting": "dual"}, "splitting must be admm or hqs"),
    ("pnp_admm", {"sigma_max": 0.01}, "below sigma_d"),
    ("pnp_admm", {"rho": 0.0}, "rho must be > 0"),
    ("pnp_admm", {"weights": "bogus"}, "unknown weights"),
    ("pnp_admm", {"ztv": True}, "ztv needs two slices or more"),
    ("pnp_red", {"solver": "admm"}, "solver must be fixed_point or gradient"),
    ("pnp_red", {"solver": "gradient", "step": 2.5}, r"step must lie in \(0, 2\)"),
    ("pnp_red", {"lam": 0.0}, "needs lam > 0"),
    ("pnp_red", {"lam": -1.0}, "lam must be >= 0"),
])
def test_bad_parameters_are_one_clear_error(method, params, match):
    with pytest.raises(ConfigError, match=match) as err:
        METHODS[method](ct_problem(9, 11, 1), params, slice_prior())
    assert err.value.fix


def test_init_without_a_starting_image_is_refused():
    with pytest.raises(ConfigError, match="no starting image") as err:
        METHODS["pnp_admm"](ct_problem(9, 11, 1), {"init": "tv"}, slice_prior())
    assert "init: none" in err.value.fix


@pytest.mark.parametrize("method", ["pnp_admm", "pnp_red"])
def test_the_reconstruct_step_computes_the_start_init_names(method):
    from medrecon.recon.ct_fbp import fbp
    from medrecon.reconstruct import _initial_image

    prob = ct_problem(20, 23, 2)
    prob.init = _initial_image(method, {"init": "fbp"}, prob, per_slice=True)
    assert torch.allclose(prob.init, fbp(prob.operator, prob.y))
    calls: list[dict] = []
    prob.progress = calls.append
    res = METHODS[method](prob, {"iterations": 2, "init": "fbp"}, slice_prior())
    assert res.nfe == 2 and bool(torch.isfinite(res.samples).all()) and len(calls) == 2


def test_ztv_ties_the_slices_together():
    """z-TV in the x-update: the larger ztv_lambda, the smaller the slice-to-slice differences of the result.
    Measured sum |D_z v|: plain 6.40, ztv_lambda 0 4.70 (the split's quadratic term, its z starting at 0, smooths
    the first iterations), ztv_lambda 0.05 1.27."""
    prob = ct_problem(21, 23, 4)      # four equal slices; independent noise per slice makes them differ
    g = torch.Generator().manual_seed(0)
    prob.y = prob.y + 0.1 * float(prob.y.std()) * torch.randn(prob.y.shape, generator=g)
    prior = slice_prior()

    def z_variation(params: dict) -> float:
        v = METHODS["pnp_admm"](prob, {"iterations": 6, **params}, prior).samples[0]
        return float((v[1:] - v[:-1]).abs().sum())

    plain = z_variation({})
    free = z_variation({"ztv": True, "ztv_lambda": 0.0})
    tied = z_variation({"ztv": True, "ztv_lambda": 0.05})
    print(f"sum |D_z v|: plain {plain:.4g}, ztv_lambda 0 {free:.4g}, ztv_lambda 0.05 {tied:.4g}")
    assert free < plain
    assert tied < 0.5 * free


def test_ztv_weights_must_be_positive():
    with pytest.raises(ConfigError, match="ztv_rho must be > 0") as err:
        METHODS["pnp_admm"](ct_problem(9, 11, 2), {"ztv": True, "ztv_rho": 0.0}, slice_prior())
    assert err.value.fix
