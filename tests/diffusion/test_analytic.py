"""Analytic priors: exact denoisers against Monte Carlo, Tweedie against autograd, exact posteriors against
quadrature / the information form, and the time-t likelihood score DPS approximates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrecon.diffusion.analytic import GaussianMixturePrior, GaussianPrior
from medrecon.diffusion.denoiser import score

F64 = torch.float64
SEED_PRIOR = dict(weights=[0.3, 0.5, 0.2], means=[[-2.5], [0.0], [1.5]], covs=[[0.09], [0.16], [0.09]])



def _mix2d() -> GaussianMixturePrior:
    covs = torch.tensor([[[0.30, 0.12], [0.12, 0.20]], [[0.10, -0.05], [-0.05, 0.40]],
                         [[0.2, 0.0], [0.0, 0.05]]])
    return GaussianMixturePrior([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.5, 1.0], [0.5, -2.0]], covs)


def _binned_check(x: torch.Tensor, x0: torch.Tensor, d: torch.Tensor, edges: list[torch.Tensor],
                  min_count: int = 400) -> int:
    """Tower property per bin B of x: E[x0 | x in B] = E[D(x) | x in B], exactly, whatever the bin width.

    Compares bin means of x0 (Monte Carlo) and of D(x) within 4 standard errors of their difference
    (SE from the spread of x0 - D(x) in the bin). Returns the number of bins checked.
    """
    idx = torch.zeros(len(x), dtype=torch.long)
    for j, e in enumerate(edges):
        idx = idx * (len(e) + 1) + torch.bucketize(x[:, j].contiguous(), e)
    checked = 0
    for b in torch.unique(idx):
        m = idx == b
        n = int(m.sum())
        if n < min_count:
            continue
        diff = (x0[m] - d[m])
        se = diff.std(0) / math.sqrt(n)
        assert bool((diff.mean(0).abs() <= 4 * se + 1e-12).all()), (b, diff.mean(0), se)
        checked += 1
    return checked


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_mixture_denoiser_equals_monte_carlo_conditional_mean_1d(sigma):
    # 400k prior draws, bins of width 0.1 with >= 400 draws; tolerance 4 SE per bin
    prior = GaussianMixturePrior(**SEED_PRIOR)
    g = torch.Generator().manual_seed(10)
    x0 = prior.sample(400_000, g)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
    d = prior(x, sigma)
    assert _binned_check(x, x0, d, [torch.arange(-6.0, 6.0, 0.1, dtype=F64)]) >= 20
    # and the denoiser is far from the identity, so the check has teeth: mean |D(x) - x| is large
    assert float((d - x).abs().mean()) > 0.3 * sigma**2 / (sigma**2 + 0.5)


def test_mixture_denoiser_equals_monte_carlo_conditional_mean_2d_full_covariances():
    # 400k draws in 2D, 0.25 x 0.25 bins with >= 400 draws, sigma = 0.7, tolerance 4 SE per bin and axis
    prior = _mix2d()
    g = torch.Generator().manual_seed(11)
    x0 = prior.sample(400_000, g)
    x = x0 + 0.7 * torch.randn(x0.shape, generator=g, dtype=F64)
    d = prior(x, torch.full((len(x),), 0.7, dtype=F64))
    e = torch.arange(-4.0, 4.0, 0.25, dtype=F64)
    assert _binned_check(x, x0, d, [e, e]) >= 40


def test_tweedie_score_is_gradient_of_log_marginal():
    prior = _mix2d()
    g = torch.Generator().manual_seed(12)
    for sigma in (0.05, 0.6, 3.0):
        x = (prior.sample(64, g) + sigma * torch.randn(64, 2, generator=g, dtype=F64)).requires_grad_(True)
        (grad,) = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
        # rounding in D is amplified by 1/sigma^2 (400x at sigma = 0.05)
        torch.testing.assert_close(score(prior, x.detach(), sigma), grad, rtol=1e-6, atol=1e-6)


def test_log_prob_normalised_and_sample_moments():
    prior = GaussianMixturePrior(**SEED_PRIOR)
    grid = torch.linspace(-6, 6, 24001, dtype=F64)[:, None]
    assert float(torch.trapezoid(prior.log_prob(grid).exp(), grid[:, 0])) == pytest.approx(1.0, abs=1e-9)
    p2 = _mix2d()
    s = p2.sample(200_000, torch.Generator().manual_seed(13))
    # 200k draws: SE of each mean coordinate ~ 1.4/447 = 0.003 -> allow 0.015; covariance entries 0.02
    torch.testing.assert_close(s.mean(0), p2.mean, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), p2.cov, atol=0.02, rtol=0)


def test_gaussian_equals_one_component_mixture_and_diag_equals_full():
    g = torch.Generator().manual_seed(14)
    l = torch.randn(5, 5, generator=g, dtype=F64)
    cov = l @ l.T + 0.1 * torch.eye(5, dtype=F64)
    mu = torch.randn(5, generator=g, dtype=F64)
    gp = GaussianPrior(mu, cov)
    x = torch.randn(7, 5, generator=g, dtype=F64)
    sig = torch.rand(7, generator=g, dtype=F64) * 3
    # E[x0|x] = mu + S (S + s^2 I)^-1 (x - mu), one solve per sample
    eye = torch.eye(5, dtype=F64)
    want = torch.stack([mu + cov @ torch.linalg.solve(cov + s**2 * eye, xi - mu)
                        for xi, s in zip(x, sig, strict=True)])
    torch.testing.assert_close(gp(x, sig), want, rtol=1e-10, atol=1e-10)
    var = torch.rand(5, generator=g, dtype=F64) + 0.2
    torch.testing.assert_close(GaussianPrior(mu, var)(x, sig), GaussianPrior(mu, torch.diag(var))(x, sig))
    # image-shaped input is flattened and returned in shape and dtype
    img = torch.randn(3, 1, 2, 2)
    out = GaussianPrior(torch.zeros(4), torch.ones(4))(img, 1.0)
    assert out.shape == img.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, img / 2)
    with pytest.raises(ValueError, match="flatten"):
        gp(torch.zeros(2, 4), 1.0)


def test_gaussian_posterior_matches_information_form():
    g = torch.Generator().manual_seed(15)
    d, m, s_y = 6, 4, 0.3
    l = torch.randn(d, d, generator=g, dtype=F64)
    cov = l @ l.T + 0.5 * torch.eye(d, dtype=F64)
    mu = torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(m, d, generator=g, dtype=F64)
    y = torch.randn(m, generator=g, dtype=F64)
    post = GaussianPrior(mu, cov).posterior(a, y, s_y)
    prec = np.linalg.inv(cov.numpy()) + a.numpy().T @ a.numpy() / s_y**2
    cov_p = np.linalg.inv(prec)
    mean_p = cov_p @ (np.linalg.solve(cov.numpy(), mu.numpy()) + a.numpy().T @ y.numpy() / s_y**2)
    np.testing.assert_allclose(post.cov.numpy(), cov_p, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(post.mean.numpy(), mean_p, rtol=1e-9, atol=1e-10)
    assert isinstance(post, GaussianPrior)


def test_seed_mixture_posterior_matches_quadrature():
    """The 1D seed example: y = 0.5 = x + n, sigma_y = 0.8 -> the -2.5 mode keeps weight ~0.001."""
    prior = GaussianMixturePrior(**SEED_PRIOR)
    post = prior.posterior(torch.ones(1, 1), torch.tensor([0.5]), 0.8)
    grid = torch.linspace(-8, 8, 160001, dtype=F64)
    unnorm = prior.log_prob(grid[:, None]).exp() * torch.exp(-0.5 * ((0.5 - grid) / 0.8) ** 2)
    dens = unnorm / torch.trapezoid(unnorm, grid)
    mean_q = torch.trapezoid(grid * dens, grid)
    std_q = torch.trapezoid((grid - mean_q) ** 2 * dens, grid).sqrt()
    assert float(post.mean[0]) == pytest.approx(float(mean_q), abs=1e-8)
    assert float(post.cov.sqrt()[0, 0]) == pytest.approx(float(std_q), abs=1e-8)
    assert float(std_q) == pytest.approx(0.62, abs=0.005)
    assert float(post.weights[0]) == pytest.approx(0.0012, abs=0.0001)
    torch.testing.assert_close(post.log_prob(grid[::100, None]).exp(), dens[::100], rtol=1e-7, atol=1e-10)


def test_exact_likelihood_score_completes_the_posterior_and_dps_approximates_it():
    """D_prior + sigma^2 grad log p(y|x) = D_posterior (Bayes for scores); DPS's point estimate drops
    Cov(x0|x) and is right only as sigma -> 0."""
    g = torch.Generator().manual_seed(16)
    d, m, s_y = 8, 5, 0.2
    l = torch.randn(d, d, generator=g, dtype=F64)
    prior = GaussianPrior(torch.randn(d, generator=g, dtype=F64), l @ l.T / d + 0.3 * torch.eye(d, dtype=F64))
    a = torch.randn(m, d, generator=g, dtype=F64)
    y = a @ prior.sample(1, g)[0] + s_y * torch.randn(m, generator=g, dtype=F64)
    post = prior.posterior(a, y, s_y)
    rel_dps = {}
    for sigma in (1e-3, 0.1, 1.0, 10.0):
        x = prior.sample(16, g) + sigma * torch.randn(16, d, generator=g, dtype=F64)
        lik = prior.likelihood_score_t(x, sigma, a, y, s_y)
        torch.testing.assert_close(prior(x, sigma) + sigma**2 * lik, post(x, sigma), rtol=1e-6, atol=1e-7)
        # DPS: grad_x log N(y; A D(x), s_y^2 I) = J^T A^T (y - A D(x)) / s_y^2, J = dD/dx (autograd)
        xr = x.clone().requires_grad_(True)
        (dps,) = torch.autograd.grad((-((y - prior(xr, sigma) @ a.T) ** 2).sum() / (2 * s_y**2)), xr)
        rel_dps[sigma] = float((dps - lik).norm() / lik.norm())
    assert rel_dps[1e-3] < 1e-3
    assert rel_dps[1.0] > 0.5 and rel_dps[10.0] > 0.5


def test_mixture_posterior_reweights_by_evidence_in_2d():
    prior = _mix2d()
    a = torch.tensor([[1.0, 0.5]], dtype=F64)
    y = torch.tensor([1.2], dtype=F64)
    post = prior.posterior(a, y, 0.4)
    # brute force on a grid: posterior mass of each component's region and the posterior mean
    ax = torch.linspace(-7, 7, 701, dtype=F64)
    xx, yy = torch.meshgrid(ax, ax, indexing="ij")
    pts = torch.stack([xx.ravel(), yy.ravel()], 1)
    lik = torch.exp(-0.5 * ((y - pts @ a.T)[:, 0] / 0.4) ** 2)
    w = prior.log_prob(pts).exp() * lik
    w = w / w.sum()
    torch.testing.assert_close((w[:, None] * pts).sum(0), post.mean, atol=1e-6, rtol=0)
    resp = prior.responsibilities(pts)  # p(k | x) under the prior = p(k | x, y) since y depends on x only
    torch.testing.assert_close((w[:, None] * resp).sum(0), post.weights, atol=1e-6, rtol=0)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixturePrior([0.5, 0.5], [[0.0, 1.0]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixturePrior([1.0], [[0.0, 1.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianMixturePrior([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="analytic priors are real"):
        GaussianPrior(torch.zeros(2), torch.ones(2)).posterior(torch.ones(1, 2, dtype=torch.complex128),
                                                                torch.ones(1), 0.1)
