"""DDNM / DDNM+: the time-travel schedule, exactness in the range space with the CG pseudo-inverse, measured
moments against the exact posterior of a Gaussian prior (noiseless and noisy), and end to end runs on small
CT (ASTRA parallel beam) and MR (SENSE) problems of odd size with tiny untrained networks.

Monte Carlo: "SE" is the standard error of the estimated quantity, stated where used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import medrecon.methods.ddnm  # noqa: F401  (registers ddnm)
from medrecon.diffusion.analytic import DenseOperator, GaussianMixturePrior, linear_gaussian_problem
from medrecon.diffusion.dc import operator_norm_sq
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError
from medrecon.methods.ddnm import ddnm_plus_coefficients, travel_schedule
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _spec, ct_problem, slice_prior

F64 = torch.float64


# --------------------------------------------------------------------------------- time travel


def test_travel_schedule_is_repaints_jump_schedule():
    # written out by hand from RePaint's rule (T = 5, l = 1, r = 2): below 3, 2, 1, 0 the chain goes back once
    assert travel_schedule(5, 1, 2) == [4, 3, 4, 3, 2, 3, 2, 1, 2, 1, 0, 1, 0, -1]
    assert travel_schedule(4, 1, 1) == [3, 2, 1, 0, -1]                       # r = 1: no travel
    path = travel_schedule(10, 3, 3)
    assert path[0] == 9 and path[-1] == -1
    assert all(abs(a - b) == 1 for a, b in itertools.pairwise(path))
    # jumps at j < 10 - 3 that are multiples of 3 (0, 3, 6), twice each: 3 steps back and 3 down again each time
    assert len(path) - 1 == 10 + 3 * 2 * 3 * 2


# --------------------------------------------------------------------------------- exact linear-Gaussian problem


def _noiseless(seed: int = 5):
    """The d = 64 linear-Gaussian problem (A 32 x 64) with noiseless data y = A x_true; the exact posterior is the
    prior conditioned on A x = y (noise 1e-5, which the float64 formulas resolve)."""
    prior, _, prob = linear_gaussian_problem()
    a = prob.operator.m
    x_true = prior.sample(1, torch.Generator().manual_seed(seed))[0]
    y = a @ x_true
    post = prior.posterior(a, y, 1e-5)
    pn = ReconProblem(y=y.float(), operator=DenseOperator(a, (1, 8, 8)), modality="CT", image_shape=(1, 8, 8))
    return prior, post, pn, a, y


def _moments(x: torch.Tensor, post) -> tuple[float, float, float, float]:
    """Relative errors of the mean and of the per-pixel std, the std ratio, and 1 SE of the mean's error."""
    n = x.shape[0]
    mean_rel = float((x.mean(0) - post.mean).norm() / post.mean.norm())
    std_rel = float((x.std(0) - post.std).norm() / post.std.norm())
    ratio = float(x.std(0).mean() / post.std.mean())
    se = float(post.std.norm() / math.sqrt(n) / post.mean.norm())
    return mean_rel, std_rel, ratio, se


@pytest.mark.parametrize(("eta", "mean_max", "std_lo", "std_hi"), [
    # measured (500 samples, 100 steps): eta 0.85 (default): mean 0.046, std error 0.079, std ratio 0.93;
    # eta 1: 0.053 / 0.23 / 0.77 (biased: too narrow); eta 0 (DDIM): 0.029 / 0.038 / 1.01. 1 SE of the mean's
    # error is 0.017 (1000 samples: 0.042 / 0.051 / 0.025, so the mean errors are mostly MC error).
    (0.85, 0.08, 0.88, 0.98),
    (1.0, 0.09, 0.70, 0.82),
    (0.0, 0.06, 0.96, 1.06),
])
def test_ddnm_is_exact_in_the_range_space_and_its_null_space_comes_from_the_prior(eta, mean_max, std_lo, std_hi):
    prior, post, prob, a, y = _noiseless()
    n = 500
    r = METHODS["ddnm"](prob, {"samples": n, "dtype": "float64", "eta": eta}, prior.as_prior(),
                        torch.Generator().manual_seed(1))
    assert r.samples.shape == (n, 1, 8, 8) and r.nfe == 100 and r.info["variant_run"] == "ddnm"
    x = r.samples.reshape(n, -1).double()
    # range space: A x = y to CG tolerance in float32 image arithmetic (measured max 3.7e-5 relative), i.e. the
    # range part of every sample is exactly A^+ y
    assert float(((x @ a.T) - y).norm(dim=1).max() / y.norm()) < 2e-4
    pinv = torch.linalg.pinv(a)
    range_part = x @ (pinv @ a).T
    assert float((range_part - pinv @ y).norm(dim=1).max() / (pinv @ y).norm()) < 2e-4
    # null space: from the prior, not constant
    null_std = (x - range_part).std(0).norm()
    assert float(null_std) > 0.5 * float(post.std.norm())
    mean_rel, std_rel, ratio, se = _moments(x, post)
    print(f"eta {eta}: mean {mean_rel:.3f} (SE {se:.3f}) std {std_rel:.3f} ratio {ratio:.3f}")
    assert mean_rel < mean_max and std_lo < ratio < std_hi, (mean_rel, std_rel, ratio)


def test_ddnm_plus_on_noisy_data_measured_against_the_exact_posterior():
    """y = A x + N(0, 0.1^2). sigma_y defaults to noise_std / ||A|| (0.0605 here). Measured (500 samples):
    DDNM mean 0.094, std error 0.17, ratio 0.83 (hard projection onto the noisy data); DDNM+ 0.111 / 0.112 /
    0.90. Both are biased (the exact posterior is not reached; 1 SE of the mean's error is 0.011, and 1000
    samples give the same numbers); DDNM+ keeps more of the posterior's spread."""
    prior, post, prob = linear_gaussian_problem()
    n = 500
    res = {}
    for variant in ("ddnm", "ddnm+"):
        r = METHODS["ddnm"](prob, {"samples": n, "dtype": "float64", "variant": variant}, prior.as_prior(),
                            torch.Generator().manual_seed(1))
        res[variant] = _moments(r.samples.reshape(n, -1).double(), post)
        assert r.info["variant_run"] == variant
        assert r.info["sigma_y_image"] == pytest.approx(0.1 / float(torch.linalg.matrix_norm(prob.operator.m, 2)),
                                                        rel=1e-3)
        print(variant, res[variant])
    m0, s0, q0, _ = res["ddnm"]
    m1, s1, q1, _ = res["ddnm+"]
    assert 0.06 < m0 < 0.13 and 0.78 < q0 < 0.88
    assert 0.08 < m1 < 0.15 and 0.86 < q1 < 0.95 and s1 < s0
    # sigma_y = 0 is DDNM (as in the reference code)
    r = METHODS["ddnm"](prob, {"samples": 2, "dtype": "float64", "variant": "ddnm+", "sigma_y": 0.0, "steps": 5},
                        prior.as_prior(), None)
    assert r.info["variant_run"] == "ddnm"


@pytest.mark.parametrize(("a", "s", "sigma", "eta"), [(0.9, 0.4, 0.1, 0.85), (0.99, 0.05, 0.2, 0.85),
                                                      (0.99, 0.05, 0.2, 0.0), (0.5, 0.8, 2.0, 0.5)])
def test_ddnm_plus_range_noise_adds_up_to_the_schedules_level(a, s, sigma, eta):
    """The data noise carried by lambda_t (a lambda sigma_y) and the fresh noise have total variance s^2."""
    lam, d1, d2 = ddnm_plus_coefficients(a, s, sigma, eta)
    assert 0 <= lam <= 1 and d2 == 0.0
    assert (a * lam * sigma) ** 2 + d1**2 == pytest.approx(s**2, rel=1e-12)
    assert lam == (1.0 if s >= a * sigma else pytest.approx(s * math.sqrt(1 - eta**2) / (a * sigma)))


def test_ddnm_plus_on_the_seed_problem_is_biased():
    """1D seed problem (A = 1, so the scalar DDNM+ is exactly the reference's SVD form; sigma_y = 0.8): exact
    posterior mean 0.350, std 0.620. Measured (4000 samples): DDNM+ 0.281 / 0.288 (too narrow; SE of the mean
    0.005); DDNM returns y = 0.5 with std 0 (the hard projection)."""
    prior = GaussianMixturePrior(weights=[0.3, 0.5, 0.2], means=[[-2.5], [0.0], [1.5]], covs=[[0.09], [0.16], [0.09]])
    prob = ReconProblem(y=torch.tensor([0.5]), operator=DenseOperator(torch.ones(1, 1, dtype=F64), (1, 1)),
                        modality="CT", image_shape=(1, 1, 1), noise_std=0.8)
    n = 4000
    plus = METHODS["ddnm"](prob, {"samples": n, "dtype": "float64", "variant": "ddnm+"}, prior.as_prior(),
                           torch.Generator().manual_seed(3)).samples.reshape(-1)
    hard = METHODS["ddnm"](prob, {"samples": 50, "dtype": "float64"}, prior.as_prior(),
                           torch.Generator().manual_seed(3)).samples.reshape(-1)
    print(f"ddnm+ seed: mean {float(plus.mean()):.3f} std {float(plus.std()):.3f}")
    assert 0.26 < float(plus.mean()) < 0.30 and 0.27 < float(plus.std()) < 0.31
    assert float((hard - 0.5).abs().max()) < 1e-5


def test_warm_start_runs_the_last_steps_from_the_diffused_start():
    """CCDF warm start, as DDS: start 0.1 of 100 steps runs 10 network evaluations; started from the truth the
    sample stays closer to it than a cold run's."""
    prior, _, prob, _, _ = _noiseless()
    x_true = prior.sample(1, torch.Generator().manual_seed(5))[0].reshape(1, 8, 8)
    with pytest.raises(ConfigError, match="starting image"):
        METHODS["ddnm"](prob, {"start": 0.2}, prior.as_prior(), None)
    warm = ReconProblem(y=prob.y, operator=prob.operator, modality="CT", image_shape=prob.image_shape, init=x_true)
    params = {"samples": 16, "dtype": "float64", "start": 0.1}
    w = METHODS["ddnm"](warm, params, prior.as_prior(), torch.Generator().manual_seed(3))
    c = METHODS["ddnm"](prob, {**params, "start": 1.0}, prior.as_prior(), torch.Generator().manual_seed(3))
    assert w.nfe == 10 and c.nfe == 100
    err_w = float((w.samples - x_true).norm() / (x_true.norm() * 4))
    err_c = float((c.samples - x_true).norm() / (x_true.norm() * 4))
    print(f"warm {err_w:.3f} cold {err_c:.3f}")
    assert err_w < 0.8 * err_c                               # measured 0.34 against 0.51 (16 samples)
    tt = METHODS["ddnm"](warm, {**params, "travel_repeat": 2}, prior.as_prior(), torch.Generator().manual_seed(3))
    assert tt.nfe == 10 + 9                                  # one jump back at each grid index 0..8


def test_time_travel_counts_its_evaluations_and_runs_are_deterministic():
    prior, _, prob, a, y = _noiseless()
    params = {"samples": 4, "dtype": "float64", "steps": 10, "travel_length": 2, "travel_repeat": 2}
    r1 = METHODS["ddnm"](prob, params, prior.as_prior(), torch.Generator().manual_seed(3))
    r2 = METHODS["ddnm"](prob, params, prior.as_prior(), torch.Generator().manual_seed(3))
    assert torch.equal(r1.samples, r2.samples)
    # jumps below 0, 2, 4, 6 (< 10 - 2), once each, 2 steps back: 8 extra forward steps
    assert r1.nfe == 10 + 8 and r1.info["time_travel_steps"] == 8 and r1.info["network_calls"] == 18
    assert float(((r1.samples.reshape(4, -1).double() @ a.T) - y).norm(dim=1).max() / y.norm()) < 2e-4


@pytest.mark.parametrize(("params", "match"), [
    ({"variant": "ddnm++"}, "variant"), ({"eta": 1.5}, "eta"), ({"travel_repeat": 0}, "travel"),
    ({"cg_iter": 0}, "cg_iter"), ({"sigma_y": -1.0}, "sigma_y"), ({"stpes": 3}, "unknown parameter"),
])
def test_bad_parameters_are_one_clear_error(params, match):
    prior, _, prob, _, _ = _noiseless()
    with pytest.raises(ConfigError, match=match):
        METHODS["ddnm"](prob, params, prior.as_prior(), None)


# --------------------------------------------------------------------------------- end to end, tiny networks


def mr_problem(h: int, w: int, depth: int = 2) -> tuple[ReconProblem, Prior]:
    """4-coil SENSE, 2x Cartesian undersampling, an ellipse with a phase; a tiny untrained 2-channel prior."""
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1)
                           .astype(np.float32))
    x = torch.stack([mag * (1 + 0.5j)] * depth).to(torch.complex64)
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(depth, h, w))
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                  meta={"kind": "slice", "normalisation": mr})
    return prob, prior


def run_end_to_end(method: str, params: dict, modality: str, h: int, w: int) -> tuple[float, float]:
    """Runs ``method`` on a small odd-sized CT or MR problem; returns (residual, ||y||) after shape checks."""
    if modality == "CT":
        prob, prior = ct_problem(h, w, 2), slice_prior()
    else:
        prob, prior = mr_problem(h, w)
    res = METHODS[method](prob, params, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 2, h, w) and res.samples.is_complex() == (modality == "MR")
    assert bool(torch.isfinite(res.samples).all())
    again = METHODS[method](prob, params, prior, torch.Generator().manual_seed(0))
    assert torch.equal(res.samples, again.samples)
    resid = float(torch.linalg.vector_norm(prob.y - prob.operator.forward(res.samples[0])))
    return resid, float(torch.linalg.vector_norm(prob.y))


def test_ddnm_plus_derives_sigma_y_from_the_noise_level_and_the_operator_norm():
    prob = dataclasses.replace(ct_problem(21, 23, 2), noise_std=0.05)
    res = METHODS["ddnm"](prob, {"steps": 3, "variant": "ddnm+"}, slice_prior(), torch.Generator().manual_seed(0))
    norm = math.sqrt(operator_norm_sq(prob.operator))
    assert res.info["sigma_y_image"] == pytest.approx(0.05 / norm, rel=1e-6) and res.info["variant_run"] == "ddnm+"
    assert bool(torch.isfinite(res.samples).all())
    mr, prior = mr_problem(21, 23)
    mr = dataclasses.replace(mr, noise_std=0.05)            # circular complex std: 0.05 / sqrt(2) per component
    res = METHODS["ddnm"](mr, {"steps": 3, "variant": "ddnm+"}, prior, torch.Generator().manual_seed(0))
    norm = math.sqrt(operator_norm_sq(mr.operator))
    assert res.info["sigma_y_image"] == pytest.approx(0.05 / math.sqrt(2) / norm, rel=1e-6)


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("variant", ["ddnm", "ddnm+"])
def test_ddnm_end_to_end_on_odd_sizes(modality, variant):
    params = {"steps": 4, "variant": variant, "travel_repeat": 2, "sigma_y": 1e-3}
    resid, ynorm = run_end_to_end("ddnm", params, modality, 21, 23)
    print(f"ddnm {variant} {modality}: residual {resid:.3g} of {ynorm:.3g}")
    if variant == "ddnm":       # the last step projects onto the data (30 CG iterations): measured 0.039 / 0.043
        assert resid < 0.1 * ynorm
    else:                       # DDNM+ does not correct at the last step (lambda = 0 there)
        assert resid < ynorm
