"""DiffusionMBIR against exact answers: with no data it samples the mixture prior; on the 1D seed problem its
hard data consistency returns y (the documented bias) and the noise-aware variant is measurably closer to the
exact posterior; the final back-projection step fits an underdetermined A exactly; the ADMM pieces it adds
(one CG step, the proximal term) match closed forms; and it runs end to end on small CT (ASTRA, odd size) and
complex multi-coil MR (Sense2D) problems, deterministically, with z-TV coupling the slices.

"SE" is the Monte Carlo standard error; tolerances are 4 SE unless stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import medrecon.methods  # noqa: F401  (registers the methods)
from medrecon.diffusion.analytic import (
    DenseOperator,
    GaussianMixturePrior,
    GaussianPrior,
    linear_gaussian_problem,
)
from medrecon.diffusion.dc import ZTVState, diff_z, diff_z_adjoint, ztv_admm_step
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError, InputError
from medrecon.methods.diffusionmbir import backprojection_step, ve_sigmas
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import MU_WATER, _net, _spec, ct_problem, slice_prior

F64 = torch.float64
SEED = dict(weights=[0.3, 0.5, 0.2], means=[[-2.5], [0.0], [1.5]], covs=[[0.09], [0.16], [0.09]])
N_MC = 20_000
STEPS = 100


def _seed_problem(a: float) -> ReconProblem:
    """The 1D seed example (y = 0.5, sigma_y = 0.8) with A = a (a = 0: no data)."""
    return ReconProblem(y=torch.tensor([0.5], dtype=F64), operator=DenseOperator(torch.full((1, 1), a, dtype=F64),
                                                                                   (1, 1)),
                        modality="CT", image_shape=(1, 1, 1), noise_std=0.8)


def _run_seed(a: float, dc: str, seed: int = 0) -> torch.Tensor:
    prior = GaussianMixturePrior(**SEED).as_prior()
    # snr_norm batch: one slice of one pixel has no stable per-sample norm (score_sde's batch average)
    r = METHODS["diffusionmbir"](_seed_problem(a), {"samples": N_MC, "steps": STEPS, "dtype": "float64",
                                                    "snr_norm": "batch", "dc": dc},
                                 prior, torch.Generator().manual_seed(seed))
    assert r.samples.shape == (N_MC, 1, 1, 1) and r.nfe == 2 * STEPS and r.info["network_calls"] == 2 * STEPS
    return r.samples.reshape(-1)


def _mass_below(mix: GaussianMixturePrior, t: float) -> float:
    sd = mix.covs[:, 0, 0].sqrt()
    return float((mix.weights * 0.5 * (1 + torch.erf((t - mix.means[:, 0]) / sd / math.sqrt(2)))).sum())


# ---------------------------------------------------------------------------------------------------------
# exact answers in 1D


def test_without_data_the_pc_sampler_reproduces_the_mixture_prior():
    """A = 0: 100 steps of predictor + corrector with the exact mixture denoiser give the prior's mean, std and
    the mass of the -2.5 mode (x < -1.25). Exact -0.450 / 1.4992 / 0.3004; measured -0.438 / 1.4998 / 0.299
    (notes, 2000 steps: -0.447 / 1.4995 / 0.2999)."""
    mix = GaussianMixturePrior(**SEED)
    mean, std, mass = float(mix.mean[0]), float(mix.cov[0, 0].sqrt()), _mass_below(mix, -1.25)
    assert (mean, std, mass) == pytest.approx((-0.45, 1.4992, 0.3004), abs=1e-4)
    x = _run_seed(0.0, "hard")
    assert abs(float(x.mean()) - mean) < 4 * std / math.sqrt(N_MC)
    assert abs(float(x.std()) - std) < 4 * std / math.sqrt(2 * N_MC)
    assert abs(float((x < -1.25).double().mean()) - mass) < 4 * math.sqrt(mass * (1 - mass) / N_MC)


def _exact_seed_posterior() -> tuple[float, float]:
    post = GaussianMixturePrior(**SEED).posterior(torch.ones(1, 1), torch.tensor([0.5]), 0.8)
    return float(post.mean[0]), float(post.cov[0, 0].sqrt())


def test_hard_data_consistency_ignores_the_noise_and_returns_y():
    """The reference's data step solves the noise-free normal equations: with A = 1 its one CG step sets x = y
    at every step, so every sample is y = 0.5 (exact posterior: mean 0.3496, std 0.6199). A known bias."""
    mean, std = _exact_seed_posterior()
    assert (mean, std) == pytest.approx((0.3496, 0.6199), abs=1e-4)
    x = _run_seed(1.0, "hard")
    assert float(x.mean()) == pytest.approx(0.5, abs=1e-9) and float(x.std()) < 1e-9


def test_noise_aware_data_consistency_is_measurably_closer_to_the_posterior():
    """dc: noise_aware (gamma = sigma_y^2 / sigma_i^2): measured mean 0.2947, std 0.6758 with 100 steps (0.3076 /
    0.7141 with 200) against the exact 0.3496 / 0.6199 and hard DC's 0.5 / 0. Closer in both, still biased
    (the mean is 0.055 = 11 SE low): the measured numbers are asserted so that a change shows."""
    mean, std = _exact_seed_posterior()
    x = _run_seed(1.0, "noise_aware")
    m, s = float(x.mean()), float(x.std())
    se_m, se_s = 0.68 / math.sqrt(N_MC), 0.68 / math.sqrt(2 * N_MC)
    assert abs(m - 0.2947) < 4 * se_m and abs(s - 0.6758) < 4 * se_s, (m, s)
    assert abs(m - mean) < 0.5 * abs(0.5 - mean) and abs(s - std) < 0.15 * std
    assert m < mean - 8 * se_m      # the remaining bias


def test_final_backprojection_step_fits_an_underdetermined_operator():
    """A = [1, 1] on a 2-pixel image: after the reference's final step x + A^T (y - A x) / A^T A 1 every sample
    satisfies A x = y (to float32 rounding, the operator's dtype), while the samples still spread along the
    null space."""
    mix = GaussianMixturePrior([0.5, 0.5], [[-1.0, 0.5], [1.0, 0.0]], [[0.2, 0.3], [0.3, 0.2]])
    op = DenseOperator(torch.ones(1, 2, dtype=F64), (1, 2))
    prob = ReconProblem(y=torch.tensor([0.7], dtype=F64), operator=op, modality="CT", image_shape=(1, 1, 2))
    r = METHODS["diffusionmbir"](prob, {"samples": 200, "steps": 30, "dtype": "float64", "snr_norm": "batch"},
                                 mix.as_prior(), torch.Generator().manual_seed(1))
    x = r.samples.reshape(200, 2)
    assert float((x.sum(1) - 0.7).abs().max()) < 1e-6 and float((x[:, 0] - x[:, 1]).std()) > 0.1
    assert r.info["final_consistency"] is True
    # pixels A never sees are left alone (A^T A 1 = 0 there)
    op0 = DenseOperator(torch.tensor([[1.0, 0.0]], dtype=F64), (1, 2))
    got = backprojection_step(op0, torch.tensor([[2.0]], dtype=F64), torch.tensor([[[0.5, -3.0]]], dtype=F64))
    assert got.tolist() == [[[2.0, -3.0]]]
    # a signed matrix (A^T A 1 has negative entries): the step would be an arbitrary rescaling, so it is skipped
    _, _, lg = linear_gaussian_problem()
    r = METHODS["diffusionmbir"](lg, {"steps": 3, "dtype": "float64"}, GaussianPrior(torch.zeros(64), torch.ones(64))
                                 .as_prior(), None)
    assert r.info["final_consistency"] is False
    with pytest.raises(ConfigError, match="final_consistency needs"):
        METHODS["diffusionmbir"](lg, {"steps": 3, "final_consistency": True}, GaussianPrior(torch.zeros(64),
                                 torch.ones(64)).as_prior(), None)


def test_one_cg_step_and_the_proximal_term_match_closed_forms():
    """ztv_admm_step with n_cg = 1 is steepest descent with exact line search on B = A^T A + rho D^T D (+ prox I);
    at convergence the prox variant solves (B + prox I) x = A^T y + rho D^T (z - u) + prox x0; (z, u) persist."""
    g = torch.Generator().manual_seed(5)
    op = DenseOperator(torch.randn(6, 4, generator=g, dtype=F64), (2, 2))
    y = torch.randn(3, 6, generator=g, dtype=F64)
    x0 = torch.randn(1, 3, 2, 2, generator=g, dtype=F64)
    rho, prox = 0.7, 0.3

    def b_apply(x):
        return op.normal(x) + rho * diff_z_adjoint(diff_z(x)) + prox * x

    rhs = op.adjoint(y) + prox * x0
    r = rhs - b_apply(x0)
    x1 = x0 + (r * r).sum() / (r * b_apply(r)).sum() * r
    state = ZTVState()
    got = ztv_admm_step(op, y, x0, state, rho, 0.1, n_cg=1, n_batch=1, tol=0, prox=prox)
    torch.testing.assert_close(got, x1, rtol=1e-12, atol=1e-12)
    z1, u1 = state.z.clone(), state.u.clone()
    assert float(z1.abs().sum()) > 0
    # second call: the right-hand side carries rho D^T (z - u) of the first; solve it exactly to compare
    x2 = ztv_admm_step(op, y, got, state, rho, 0.1, n_cg=200, n_batch=1, tol=0, prox=prox)
    dense = torch.stack([b_apply(e.reshape(1, 3, 2, 2)).reshape(-1) for e in torch.eye(12, dtype=F64)], 1)
    rhs2 = op.adjoint(y) + rho * diff_z_adjoint(z1 - u1) + prox * got
    want = torch.linalg.solve(dense, rhs2.reshape(-1)).reshape(1, 3, 2, 2)
    torch.testing.assert_close(x2, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("dc", "mean_bound", "std_bound"), [
    # measured with 400 samples (MC error of the mean 0.013): hard 0.114 / 0.229, noise-aware 0.130 / 0.393 (the
    # noise-aware step over-disperses here, sigma_y = 0.1 against a unit prior); DDS: 0.10 / 0.13
    ("hard", 0.16, 0.30),
    ("noise_aware", 0.18, 0.45),
])
def test_posterior_mean_and_std_error_on_the_linear_gaussian_problem(dc, mean_bound, std_bound):
    """Relative errors of the per-pixel posterior mean and std against the exact linear-Gaussian posterior
    (d = 64, a signed matrix: no final back-projection step); the prior mean's error is 1."""
    prior, post, prob = linear_gaussian_problem()
    r = METHODS["diffusionmbir"](prob, {"samples": 400, "dtype": "float64", "dc": dc}, prior.as_prior(),
                                 torch.Generator().manual_seed(4))
    x = r.samples.reshape(400, -1).double()
    mean_rel = float((x.mean(0) - post.mean).norm() / post.mean.norm())
    std_rel = float((x.std(0) - post.std).norm() / post.std.norm())
    assert mean_rel < mean_bound and std_rel < std_bound, (mean_rel, std_rel)
    assert r.info["final_consistency"] is False


def test_sigma_grid_is_the_references_geometric_grid_clamped_to_the_prior():
    s = ve_sigmas(100.0, 0.01, 5)
    assert s.tolist() == pytest.approx([100.0, 10.0, 1.0, 0.1, 0.01, 0.0])
    prob = _seed_problem(1.0)
    r = METHODS["diffusionmbir"](prob, {"steps": 3, "sigma_max": 1e4, "dtype": "float64"},
                                 GaussianMixturePrior(**SEED).as_prior(), None)
    assert r.info["sigma_max"] == pytest.approx(float(VPSchedule().sigmas[-1]))   # about 157


# ---------------------------------------------------------------------------------------------------------
# CT and MR end to end


def _gaussian_ct_prior(h: int, w: int) -> Prior:
    """Exact Gaussian prior per slice (mean half water, std half water, i.i.d. pixels) in units of water."""
    gp = GaussianPrior(torch.full((h * w,), 0.5, dtype=F64), torch.full((h * w,), 0.25, dtype=F64))
    return Prior(gp, scale=1 / MU_WATER, offset=0.0)


def _ellipse(h: int, w: int, depth: int = 3) -> torch.Tensor:
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    inside = ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.35 * w)) ** 2 < 1
    return torch.from_numpy(np.repeat(inside[None], depth, 0) * MU_WATER)


def test_ct_with_an_exact_prior_on_an_odd_grid_fits_the_data_and_beats_the_prior_mean():
    """10-view parallel-beam CT of a 3 x 21 x 23 water ellipse, exact Gaussian prior, 50 steps, 4 samples:
    measured relative error of the sample mean 0.380 (prior mean: 0.866), residual 0.059 of ||y||; with 5 CG
    steps 0.267 / 0.0087."""
    h, w = 21, 23
    prob = ct_problem(h, w)
    truth = _ellipse(h, w)
    r = METHODS["diffusionmbir"](prob, {"steps": 50, "samples": 4, "dtype": "float64"}, _gaussian_ct_prior(h, w),
                                 torch.Generator().manual_seed(0))
    x = r.samples.double()
    assert x.shape == (4, 3, h, w) and r.info["ztv"] is True and r.nfe == 100
    err = float((x.mean(0) - truth).norm() / truth.norm())
    base = float((0.5 * MU_WATER - truth).norm() / truth.norm())
    resid = float(torch.linalg.vector_norm(prob.y - prob.operator.forward(x[0].float())))
    assert base == pytest.approx(0.866, abs=0.01) and err < 0.45, err
    assert resid < 0.1 * float(torch.linalg.vector_norm(prob.y))


def test_ztv_couples_slices():
    """A strong z-TV weight makes the slices of each sample agree more than without z-TV."""
    h, w = 21, 23
    prob = ct_problem(h, w)
    pr = _gaussian_ct_prior(h, w)
    jumps = []
    for extra in ({"ztv": False}, {"ztv": True, "rho": 0.5, "ztv_lambda": 0.5}):
        r = METHODS["diffusionmbir"](prob, {"steps": 30, "samples": 2, "dtype": "float64", **extra}, pr,
                                     torch.Generator().manual_seed(3))
        jumps.append(float(diff_z(r.samples).abs().mean()))
    assert jumps[1] < 0.5 * jumps[0], jumps


def test_tiny_network_on_an_odd_ct_volume_is_deterministic():
    """Untrained tiny UNet (sides padded to multiples of 4): shapes, finiteness, NFE = 2 network calls per step
    (all slices of a pass in one call), same seed -> same numbers, another seed -> other numbers."""
    prob = ct_problem(21, 23)
    prior = slice_prior()
    seen = []
    prob.progress = seen.append
    runs = [METHODS["diffusionmbir"](prob, {"steps": 4, "samples": 2}, prior, torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert runs[0].samples.shape == (2, 3, 21, 23) and bool(torch.isfinite(runs[0].samples).all())
    assert torch.equal(runs[0].samples, runs[1].samples) and not torch.equal(runs[0].samples, runs[2].samples)
    assert runs[0].nfe == 8 and runs[0].info["network_calls"] == 8 and runs[0].info["time_s"] > 0
    assert len(seen) == 12 and seen[3]["sigma"] == pytest.approx(0.01)


def test_warm_start_runs_the_last_steps_and_needs_an_init():
    prob = ct_problem(21, 23)
    with pytest.raises(ConfigError, match="starting image"):
        METHODS["diffusionmbir"](prob, {"steps": 10, "start": 0.3}, slice_prior(), None)
    prob.init = _ellipse(21, 23).float()
    r = METHODS["diffusionmbir"](prob, {"steps": 10, "start": 0.3, "init": "fbp"}, slice_prior(),
                                 torch.Generator().manual_seed(0))
    assert r.nfe == 6 and bool(torch.isfinite(r.samples).all())


def _mr_problem(noise_std: float | None) -> tuple[ReconProblem, Prior]:
    h, w = 21, 23
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=6, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 10) / 7.0) ** 2 + ((xx - 11) / 8.0) ** 2 < 1).astype(np.float32))
    x = torch.stack([mag, 0.5 * mag, mag]).to(torch.complex64)
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(3, h, w), noise_std=noise_std)
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                  meta={"kind": "slice", "normalisation": mr})
    return prob, prior


@pytest.mark.parametrize("dc", ["hard", "noise_aware"])
def test_complex_multicoil_mr_on_an_odd_grid(dc):
    prob, prior = _mr_problem(0.01)
    r = METHODS["diffusionmbir"](prob, {"steps": 4, "dc": dc}, prior, torch.Generator().manual_seed(0))
    assert r.samples.shape == (1, 3, 21, 23) and r.samples.is_complex() and bool(torch.isfinite(r.samples).all())
    # the reference's MRI function has no final back-projection step, and A^H A 1 is complex here
    assert r.info["final_consistency"] is False and r.info["noise_std"] == (0.01 if dc != "hard" else 0)


def test_errors_are_clear():
    prob, prior = _mr_problem(None)
    with pytest.raises(InputError, match="noise_std"):
        METHODS["diffusionmbir"](prob, {"steps": 2, "dc": "noise_aware"}, prior, None)
    r = METHODS["diffusionmbir"](prob, {"steps": 2, "dc": "noise_aware", "sigma_y": 0.02}, prior, None)
    assert r.info["noise_std"] == 0.02
    with pytest.raises(ConfigError, match="final_consistency needs"):
        METHODS["diffusionmbir"](prob, {"steps": 2, "final_consistency": True}, prior, None)
    with pytest.raises(ConfigError, match="dc must be one of"):
        METHODS["diffusionmbir"](prob, {"dc": "soft"}, prior, None)
    with pytest.raises(ConfigError, match="sigma_min"):
        METHODS["diffusionmbir"](prob, {"sigma_min": 500.0}, prior, None)
    with pytest.raises(ConfigError, match="unknown parameter"):
        METHODS["diffusionmbir"](prob, {"stpes": 3}, prior, None)
    mix = GaussianMixturePrior(**SEED).as_prior()
    with pytest.raises(ConfigError, match="ztv needs a volume"):
        METHODS["diffusionmbir"](_seed_problem(1.0), {"ztv": True, "dtype": "float64"}, mix, None)
