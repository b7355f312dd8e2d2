"""Analytic priors (Gaussian, Gaussian mixture) with exact denoisers and exact linear-Gaussian posteriors.

They implement the denoiser interface of :mod:`medrecon.diffusion.denoiser` exactly at every noise
level, so any sampler can be run on a problem whose posterior is known in closed form:

* Gaussian N(mu, S): ``E[x0 | x] = mu + S (S + s^2 I)^-1 (x - mu)``.
* Mixture sum_k w_k N(mu_k, S_k): the marginal at noise s is sum_k w_k N(mu_k, S_k + s^2 I); the denoiser
  is the responsibility-weighted sum of the per-component posterior means.
* Linear-Gaussian data ``y = A x0 + n``, ``n ~ N(0, s_y^2 I)``: each component's posterior is Gaussian
  and its weight is multiplied by its evidence N(y; A mu_k, A S_k A^T + s_y^2 I).

Every covariance is held as an eigendecomposition (U, lambda), which makes all of the above a projection,
a per-eigenvalue shrinkage and a back-projection, batched over samples and noise levels, in float64.
Inputs ``(B, *shape)`` are flattened to ``(B, d)`` and results returned in the caller's shape and dtype,
so the same object serves vectors (tests) and image slices (samplers; see :meth:`as_prior`).

:class:`DenseOperator` and :func:`linear_gaussian_problem` give the sampler tests and ``benchmarks/fidelity.py``
one shared problem whose posterior is known exactly.
"""

from __future__ import annotations

import math

import torch

from medrecon.diffusion.denoiser import Denoiser, Prior, sigma_batch
from medrecon.physics.operator import LinearOperator
from medrecon.recon.registry import ReconProblem

_F64 = torch.float64


def _softmax_k(logr: torch.Tensor) -> torch.Tensor:
    """Softmax over the component axis 0 of (K, B)."""
    r = (logr - logr.max(dim=0, keepdim=True).values).exp()
    return r / r.sum(dim=0, keepdim=True)


def _as64(a: object) -> torch.Tensor:
    """A float64 copy; complex input is refused rather than silently losing its imaginary part."""
    t = torch.as_tensor(a).detach()
    if t.is_complex():
        raise ValueError("analytic priors are real; for complex data stack [Re A; Im A] and [Re y; Im y] "
                         "(a real A acting on real/imag channels) before calling posterior()")
    return t.to(_F64).clone()


class GaussianMixturePrior(Denoiser):
    """sum_k w_k N(mu_k, S_k) on R^d; ``covs`` full (K, d, d) or diagonal (K, d)."""

    def __init__(self, weights: object, means: object, covs: object) -> None:
        w, mu, c = _as64(weights).reshape(-1), _as64(means), _as64(covs)
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must have shape (K, d) with K = {w.shape[0]} weights, "
                             f"got {tuple(mu.shape)}")
        k, d = mu.shape
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.weights = w / w.sum()
        self.means = mu
        if c.shape == (k, d):
            if bool((c < 0).any()):
                raise ValueError("diagonal covariances must be non-negative")
            self.eigvals, self.eigvecs = c, None
        elif c.shape == (k, d, d):
            c = 0.5 * (c + c.transpose(-1, -2))
            lam, u = torch.linalg.eigh(c)
            if float(lam.min()) < -1e-9 * max(float(lam.abs().max()), 1.0):
                raise ValueError("covariances must be positive semi-definite")
            self.eigvals, self.eigvecs = lam.clamp_min(0), u
        else:
            raise ValueError(f"covs must have shape (K, d, d) or (K, d) = ({k}, {d}), got {tuple(c.shape)}")
        self.nfe = 0

    # ---- structure --------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def covs(self) -> torch.Tensor:
        """Full covariances (K, d, d)."""
        if self.eigvecs is None:
            return torch.diag_embed(self.eigvals)
        u = self.eigvecs
        return u @ torch.diag_embed(self.eigvals) @ u.transpose(-1, -2)

    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.ndim == 1 and x.shape[0] == self.dim:
            x = x.unsqueeze(0)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"input of shape {tuple(x.shape)} does not flatten to (B, {self.dim})")
        return flat.to(_F64), tuple(x.shape)

    # Internals use the layout (K, d, B): batch last, so the reductions over components and dimensions
    # are element-wise adds over contiguous rows (reducing a short last axis is ~10x slower in torch).
    def _proj(self, v: torch.Tensor) -> torch.Tensor:
        """Coordinates of v (K, d, B) in each component's eigenbasis."""
        return v if self.eigvecs is None else self.eigvecs.transpose(1, 2) @ v

    def _unproj(self, c: torch.Tensor) -> torch.Tensor:
        return c if self.eigvecs is None else self.eigvecs @ c

    def _terms(self, xt: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For xt (d, B): log(w_k N(x; mu_k, S_k + s^2 I)) (K, B), eigen-coords of x - mu_k and the
        marginal variances (K, d, B)."""
        c = self._proj(xt[None] - self.means[:, :, None])
        var = self.eigvals[:, :, None] + (sigma**2)[None, None, :]
        logn = -0.5 * ((c**2 / var).sum(1) + var.log().sum(1) + self.dim * math.log(2 * math.pi))
        return self.weights.log()[:, None] + logn, c, var

    # ---- denoiser interface -----------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        """Exact E[x0 | x0 + sigma n = x], any sigma >= 0 (sigma = 0 returns x on the support)."""
        flat, shape = self._flat(x)
        s = sigma_batch(sigma, flat.shape[0]).to(device=flat.device, dtype=_F64)
        logr, c, var = self._terms(flat.T, s)
        r = _softmax_k(logr)
        shrink = torch.where(var > 0, self.eigvals[:, :, None] / var.clamp_min(1e-300), torch.ones_like(var))
        means = self.means[:, :, None] + self._unproj(shrink * c)
        out = (r[:, None, :] * means).sum(0).T
        return out.reshape(shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log density of x (B, ...) under the prior (sigma = 0) or its noised marginal; shape (B,)."""
        flat, _ = self._flat(x)
        s = sigma_batch(sigma, flat.shape[0]).to(device=flat.device, dtype=_F64)
        logr, _, _ = self._terms(flat.T, s)
        return torch.logsumexp(logr, dim=0)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
        """p(component k | x) under the (noised) prior, (B, K)."""
        flat, _ = self._flat(x)
        s = sigma_batch(sigma, flat.shape[0]).to(device=flat.device, dtype=_F64)
        return _softmax_k(self._terms(flat.T, s)[0]).T

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent draws, (n, d) float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64) * self.eigvals[k].sqrt()
        if self.eigvecs is not None:
            z = torch.einsum("nkd,nd->nk", self.eigvecs[k], z)
        return self.means[k] + z

    # ---- moments ----------------------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        """Overall mean (d,)."""
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def cov(self) -> torch.Tensor:
        """Overall covariance (d, d) (law of total covariance)."""
        dm = self.means - self.mean
        return (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    # ---- inverse problems -------------------------------------------------------------------------------
    def _posterior_parts(self, a: torch.Tensor, y: torch.Tensor, noise_std: float):
        a, y = _as64(a), _as64(y).reshape(-1)
        if a.ndim != 2 or a.shape[1] != self.dim or a.shape[0] != y.shape[0]:
            raise ValueError(f"A must be (m, {self.dim}) and y (m,), got {tuple(a.shape)} and "
                             f"{tuple(y.shape)}")
        covs = self.covs
        sat = covs @ a.T                                               # (K, d, m)
        g = a @ sat + noise_std**2 * torch.eye(a.shape[0], dtype=_F64)  # (K, m, m) evidence covariance
        res = y[None] - self.means @ a.T                               # (K, m)
        sol = torch.linalg.solve(g, res[..., None])[..., 0]            # (K, m)
        mean = self.means + (sat @ sol[..., None])[..., 0]
        cov = covs - sat @ torch.linalg.solve(g, sat.transpose(-1, -2))
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        logdet = torch.linalg.slogdet(g)[1]
        log_ev = -0.5 * ((res * sol).sum(-1) + logdet + a.shape[0] * math.log(2 * math.pi))
        return mean, cov, log_ev

    def posterior(self, a: object, y: object, noise_std: float) -> GaussianMixturePrior:
        """Exact posterior for y = A x0 + N(0, noise_std^2 I): a mixture re-weighted by each evidence."""
        mean, cov, log_ev = self._posterior_parts(a, y, noise_std)
        w = torch.softmax(self.weights.log() + log_ev, dim=0)
        return GaussianMixturePrior(w, mean, cov)

    def as_prior(self, channels: int = 1, **kw) -> Prior:
        """This prior as a sampler :class:`Prior` for per-slice images with C*Y*X = d (scale 1, offset 0)."""
        return Prior(denoiser=self, channels=channels, **kw)


class GaussianPrior(GaussianMixturePrior):
    """N(mean, cov) on R^d (cov (d, d) or diagonal (d,)): the one-component mixture, plus time-t scores."""

    def __init__(self, mean: object, cov: object) -> None:
        mu, c = _as64(mean).reshape(-1), _as64(cov)
        super().__init__(torch.ones(1, dtype=_F64), mu[None], c[None])

    @property
    def mean(self) -> torch.Tensor:
        return self.means[0]

    @property
    def cov(self) -> torch.Tensor:
        return self.covs[0]

    @property
    def std(self) -> torch.Tensor:
        """Marginal standard deviations (d,)."""
        return self.cov.diagonal().clamp_min(0).sqrt()

    def posterior(self, a: object, y: object, noise_std: float) -> GaussianPrior:
        """Exact Gaussian posterior of y = A x0 + N(0, noise_std^2 I)."""
        mean, cov, _ = self._posterior_parts(a, y, noise_std)
        return GaussianPrior(mean[0], cov[0])

    def likelihood_score_t(self, x: torch.Tensor, sigma: torch.Tensor | float, a: object, y: object,
                           noise_std: float) -> torch.Tensor:
        """Exact grad_x log p(y | x) where x = x0 + sigma z (VE noising) and y = A x0 + N(0, s_y^2 I).

        p(y | x) = N(y; A m(x), A C A^T + s_y^2 I) with m(x) = D(x, sigma) and C = Cov(x0 | x) =
        S - S (S + sigma^2 I)^-1 S, so the score is J^T A^T (A C A^T + s_y^2 I)^-1 (y - A m) with
        J = S (S + sigma^2 I)^-1 (symmetric). DPS replaces A C A^T by 0 (a point estimate of x0), which is
        what the tests measure against. ``x`` is (B, d) (or (B, *shape)); ``sigma`` a scalar.
        """
        a, y = _as64(a), _as64(y).reshape(-1)
        flat, shape = self._flat(x)
        s2 = float(torch.as_tensor(sigma, dtype=_F64)) ** 2
        u, lam = self.eigvecs, self.eigvals[0]
        shrink = lam / (lam + s2) if s2 > 0 else torch.ones_like(lam)
        post_var = lam * (1 - shrink)
        if u is None:
            j = torch.diag(shrink)
            c = torch.diag(post_var)
        else:
            u = u[0]
            j = u @ torch.diag(shrink) @ u.T
            c = u @ torch.diag(post_var) @ u.T
        m = self.means[0][None] + (flat - self.means[0][None]) @ j.T
        g = a @ c @ a.T + noise_std**2 * torch.eye(a.shape[0], dtype=_F64)
        sol = torch.linalg.solve(g, (y[None] - m @ a.T).T).T           # (B, m)
        return (sol @ a @ j).reshape(shape).to(x.dtype)


class DenseOperator(LinearOperator):
    """y = M vec(x) for every leading batch element: a small dense matrix for analytic test problems
    (not registered, not stored in measurements)."""

    def __init__(self, m: torch.Tensor, in_shape: tuple[int, ...]) -> None:
        self.m = torch.as_tensor(m)
        self.in_shape, self.out_shape = tuple(in_shape), (self.m.shape[0],)
        self.in_dtype = self.out_dtype = torch.complex64 if self.m.is_complex() else torch.float32

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.ndim - len(self.in_shape)]
        return (x.reshape(*lead, -1).to(self.m.dtype) @ self.m.T).to(x.dtype)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y.to(self.m.dtype) @ self.m.conj()).to(y.dtype).reshape(*y.shape[:-1], *self.in_shape)

    @classmethod
    def example(cls) -> DenseOperator:
        return cls(torch.eye(2), (2,))

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    @classmethod
    def from_state(cls, params: dict, arrays: dict, device: torch.device | str = "cpu") -> DenseOperator:
        raise NotImplementedError("DenseOperator is for in-memory analytic problems only")


def linear_gaussian_problem(seed: int = 0) -> tuple[GaussianPrior, GaussianPrior, ReconProblem]:
    """d = 64 (8x8) prior N(0, K_se(l=2) + 0.05 I), A (32, 64) Gaussian / 8, sigma_y = 0.1: prior, exact
    posterior and the ReconProblem."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    pts = torch.stack([yy.ravel(), xx.ravel()], 1).double()
    cov = torch.exp(-torch.cdist(pts, pts) ** 2 / 8.0) + 0.05 * torch.eye(64, dtype=_F64)
    prior = GaussianPrior(torch.zeros(64, dtype=_F64), cov)
    a = torch.randn(32, 64, generator=g, dtype=_F64) / 8
    s_y = 0.1
    y = a @ prior.sample(1, g)[0] + s_y * torch.randn(32, generator=g, dtype=_F64)
    prob = ReconProblem(y=y.float(), operator=DenseOperator(a, (1, 8, 8)), modality="CT",
                        image_shape=(1, 8, 8), noise_std=s_y)
    return prior, prior.posterior(a, y, s_y), prob
