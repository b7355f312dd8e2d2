"""Noise schedules (VP/DDPM and EDM) and the update rules that move a sample along them.

Conventions shared by every sampler in medrecon:

* The *VE form* is the common currency: a noisy image is ``x = x0 + sigma * n`` with ``n ~ N(0, I)``, and a
  denoiser returns ``E[x0 | x]`` for that ``sigma`` (see :mod:`medrecon.diffusion.denoiser`).
* A VP (DDPM) state ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n`` is the VE state ``x_t / sqrt(ab_t)`` at
  ``sigma_t = sqrt((1 - ab_t) / ab_t)``; ``ab`` is short for alpha-bar (``alphas_cumprod``).
* Integer VP timesteps run 0..N-1 as in DDPM/DDIM/DDS; ``t = -1`` means "no noise" (``ab = 1``), which is
  how the reference codes express the last step of a reverse chain (DDS ``compute_alpha`` prepends beta=0).

All schedule arithmetic is float64: at ``t = 999`` of the linear schedule ``ab ~ 4e-5`` and float32 loses
digits that the DDIM coefficients need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from medrecon.errors import ConfigError

_F64 = torch.float64


@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta variance-preserving schedule of DDPM (Ho et al. 2020), as used by DDS and DPS.

    ``betas = linspace(beta_start, beta_end, num_train_steps)``; ``alphas_cumprod = cumprod(1 - betas)``.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_steps: int = 1000

    def __post_init__(self) -> None:
        if not (0 < self.beta_start < self.beta_end < 1):
            raise ConfigError(f"VPSchedule needs 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                              f"{self.beta_end}", fix="use the DDPM defaults beta_start=1e-4, beta_end=0.02")
        if int(self.num_train_steps) < 2:
            raise ConfigError(f"VPSchedule needs num_train_steps >= 2, got {self.num_train_steps}",
                              fix="use the DDPM default num_train_steps=1000")

    @property
    def betas(self) -> torch.Tensor:
        """Per-step betas, float64, shape (N,)."""
        return torch.linspace(self.beta_start, self.beta_end, int(self.num_train_steps), dtype=_F64)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t = prod_{s<=t} (1 - beta_s), float64, shape (N,)."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        """VE-equivalent noise level of every trained step, increasing in t, float64 (N,)."""
        ab = self.alphas_cumprod
        return ((1.0 - ab) / ab).sqrt()

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha-bar at integer steps ``t`` (any shape); ``t = -1`` gives exactly 1."""
        t = torch.as_tensor(t, dtype=torch.long)
        if bool(((t < -1) | (t >= self.num_train_steps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_train_steps - 1}], got {t.tolist()}")
        padded = torch.cat([torch.ones(1, dtype=_F64), self.alphas_cumprod])
        return padded[t + 1]

    def sigma_of_t(self, t: torch.Tensor | int) -> torch.Tensor:
        """sqrt((1 - ab_t) / ab_t): the noise level of ``x_t / sqrt(ab_t)`` in VE form (0 at t = -1)."""
        ab = self.alpha_bar(t)
        return ((1.0 - ab) / ab).sqrt()

    def t_of_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous timestep of a noise level, by linear interpolation of t in log-sigma.

        Exact (up to rounding) at the trained sigmas; clamped to [0, N-1] outside their range, because a
        network has never seen a timestep outside it.
        """
        sigma = torch.as_tensor(sigma, dtype=_F64)
        logs = self.sigmas.log()
        ls = sigma.clamp_min(1e-300).log().clamp(logs[0], logs[-1])
        hi = torch.searchsorted(logs, ls.reshape(-1).contiguous()).clamp(1, len(logs) - 1)
        lo = hi - 1
        frac = (ls.reshape(-1) - logs[lo]) / (logs[hi] - logs[lo])
        return (lo.to(_F64) + frac).reshape(sigma.shape)

    def nearest_timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The trained step whose sigma is nearest in log-sigma (exact for sigmas taken from the schedule)."""
        sigma = torch.as_tensor(sigma, dtype=_F64)
        logs = self.sigmas.log()
        ls = sigma.clamp_min(1e-300).log().reshape(-1).contiguous()
        hi = torch.searchsorted(logs, ls).clamp(1, len(logs) - 1)
        lo = hi - 1
        pick_hi = (logs[hi] - ls).abs() < (ls - logs[lo]).abs()
        return torch.where(pick_hi, hi, lo).reshape(sigma.shape)

    def ddim_timesteps(self, n_steps: int) -> torch.Tensor:
        """Descending uniform grid of ``n_steps`` trained steps, as DDIM ("uniform") and DDS use it.

        With ``skip = N // n_steps`` the grid is ``{(n_steps - 1) * skip, ..., skip, 0}``; for N = 1000 and
        n_steps = 50 that is {980, 960, ..., 20, 0}, identical to DDS's ``range(0, 1000, skip)`` reversed.
        When n_steps does not divide N the grid still has exactly n_steps entries (DDS's ``range`` would
        have one more). ``n_steps = N`` gives every step (ancestral DDPM).
        """
        n_steps = int(n_steps)
        if not 1 <= n_steps <= self.num_train_steps:
            raise ConfigError(f"number of sampling steps must be in [1, {self.num_train_steps}], "
                              f"got {n_steps}",
                              fix="set the sampler's 'steps' to at most the schedule's num_train_steps")
        skip = self.num_train_steps // n_steps
        return torch.arange(n_steps - 1, -1, -1, dtype=torch.long) * skip

    def step_pairs(self, n_steps: int, start: float = 1.0) -> list[tuple[int, int]]:
        """(t, t_next) pairs of the reverse chain on :meth:`ddim_timesteps`; the last t_next is -1.

        ``start`` < 1 keeps only the last ``round(start * n_steps)`` pairs (at least one): the chain of a warm
        start (CCDF, Chung, Sim, Ye, CVPR 2022) that begins from a starting image diffused to the first t
        (:func:`diffuse`)."""
        ts = self.ddim_timesteps(n_steps).tolist()
        pairs = list(zip(ts, [*ts[1:], -1], strict=True))
        if not 0.0 < float(start) <= 1.0:
            raise ConfigError(f"start must lie in (0, 1], got {start}",
                              fix="start: 1 samples from noise; e.g. start: 0.2 with an init runs the last fifth")
        return pairs[len(pairs) - max(1, round(float(start) * len(pairs))):]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in checkpoints and recon attributes)."""
        return {"kind": "vp", "beta_schedule": "linear", "beta_start": float(self.beta_start),
                "beta_end": float(self.beta_end), "num_train_steps": int(self.num_train_steps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VPSchedule:
        """Inverse of :meth:`to_dict`; rejects other beta schedules instead of silently using linear."""
        if d.get("beta_schedule", "linear") != "linear":
            raise ConfigError(f"unsupported beta_schedule {d.get('beta_schedule')!r}",
                              fix="medrecon implements the linear DDPM schedule only; use 'linear'")
        return cls(float(d.get("beta_start", 1e-4)), float(d.get("beta_end", 0.02)),
                   int(d.get("num_train_steps", 1000)))


@dataclass(frozen=True)
class EDMSchedule:
    """Karras et al. (2022) noise levels: the sampling grid and the log-normal training distribution."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max) or self.rho <= 0:
            raise ConfigError(f"EDMSchedule needs 0 < sigma_min < sigma_max and rho > 0, got "
                              f"{self.sigma_min}, {self.sigma_max}, {self.rho}",
                              fix="use the EDM defaults sigma_min=0.002, sigma_max=80, rho=7")

    def sigmas(self, n: int, append_zero: bool = True) -> torch.Tensor:
        """Descending Karras grid of n levels from sigma_max to sigma_min (float64), then 0 if asked."""
        n = int(n)
        if n < 1:
            raise ConfigError(f"EDM sampling needs at least 1 step, got {n}", fix="set steps >= 1")
        i = torch.arange(n, dtype=_F64) / max(n - 1, 1)
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        s = (a + i * (b - a)) ** self.rho
        return torch.cat([s, torch.zeros(1, dtype=_F64)]) if append_zero else s

    def training_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise levels: log(sigma) ~ N(p_mean, p_std^2) as in EDM (float64, shape (n,))."""
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=_F64)).exp()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"kind": "edm", "sigma_min": float(self.sigma_min), "sigma_max": float(self.sigma_max),
                "rho": float(self.rho), "p_mean": float(self.p_mean), "p_std": float(self.p_std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EDMSchedule:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: float(d[k]) for k in ("sigma_min", "sigma_max", "rho", "p_mean", "p_std") if k in d})


def schedule_from_dict(d: dict[str, Any]) -> VPSchedule | EDMSchedule:
    """Rebuild a schedule from its ``to_dict`` (e.g. a checkpoint's), dispatching on ``kind``."""
    kind = d.get("kind")
    if kind == "vp":
        return VPSchedule.from_dict(d)
    if kind == "edm":
        return EDMSchedule.from_dict(d)
    raise ConfigError(f"unknown schedule kind {kind!r} in {d}", fix="kind must be 'vp' or 'edm'")


# ----------------------------------------------------------------------------------------------------------
# Reverse-chain updates on the VP schedule. They take ab (alpha-bar) values rather than integer steps so the
# same code serves full, subsampled and custom grids; ab_next = 1 is the final step to x0.


def _ab(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=_F64).to(like.device)


def diffuse(x0: torch.Tensor, ab: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x0): sqrt(ab) x0 + sqrt(1 - ab) noise, in x0's dtype."""
    a = _ab(ab, x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: torch.Tensor | float, ab_next: torch.Tensor | float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """Ancestral DDPM step x_t -> x_{t'} from the Gaussian q(x_{t'} | x_t, x0 = x0_hat).

    For a subsampled grid this is the exact q-posterior between the two grid points (DDPM with
    ``alpha = ab_t / ab_next``), i.e. DDIM with eta = 1. Posterior variance ("fixed small", as in DDPM's
    and DPS's ``posterior_variance``); no noise when ``ab_next = 1``.
    """
    ab_t, ab_next = _ab(ab_t, x_t), _ab(ab_next, x_t)
    alpha = ab_t / ab_next
    c0 = ab_next.sqrt() * (1 - alpha) / (1 - ab_t)
    ct = alpha.sqrt() * (1 - ab_next) / (1 - ab_t)
    var = (1 - ab_next) / (1 - ab_t) * (1 - alpha)
    out = c0 * x0 + ct * x_t
    if noise is not None:
        out = out + var.sqrt() * noise
    return out.to(x_t.dtype)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor | float, ab_next: torch.Tensor | float,
              eta: float, noise: torch.Tensor | None, convention: str = "ddim") -> torch.Tensor:
    """DDIM update to x_{t'} from a clean estimate ``x0`` and a noise estimate ``eps``.

    ``convention="ddim"`` (Song et al.): ``s = eta sqrt((1-ab')/(1-ab)) sqrt(1-ab/ab')`` and
    ``x' = sqrt(ab') x0 + sqrt(1-ab'-s^2) eps + s z``; eta = 0 is deterministic DDIM, eta = 1 is ancestral.
    ``convention="dds"`` (DDS code, ``solver_2d.py``): ``x' = sqrt(ab') x0 + sqrt(1-ab') (eta z +
    sqrt(1-eta^2) eps)``; the noise fraction is eta regardless of the step size, so DDS's eta = 0.85
    re-noises far more than DDIM's eta = 0.85.
    """
    ab_t, ab_next = _ab(ab_t, x0), _ab(ab_next, x0)
    if convention == "ddim":
        s = eta * ((1 - ab_next) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_next).clamp_min(0).sqrt()
        c_eps = (1 - ab_next - s**2).clamp_min(0).sqrt()
    elif convention == "dds":
        s = eta * (1 - ab_next).sqrt()
        c_eps = math.sqrt(max(1.0 - eta**2, 0.0)) * (1 - ab_next).sqrt()
    else:
        raise ConfigError(f"unknown eta convention {convention!r}", fix="use 'ddim' or 'dds'")
    out = ab_next.sqrt() * x0 + c_eps * eps
    if noise is not None and float(s) > 0:
        out = out + s * noise
    return out.to(x0.dtype)


@torch.no_grad()
def sample_vp(denoiser: Any, shape: tuple[int, ...], schedule: VPSchedule, n_steps: int,
              generator: torch.Generator | None = None, eta: float = 1.0, convention: str = "ddim",
              cond: dict | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Unconditional VP sampling with a VE-form denoiser ``D(x, sigma, cond)``: draws from the prior.

    ``eta = 1`` with ``convention="ddim"`` is ancestral DDPM sampling (on a subsampled grid: the exact
    q-posterior between grid points); ``eta = 0`` is deterministic DDIM (probability-flow discretisation).
    Used to check a prior's denoiser and, for an analytic posterior, as the exact-score reference sampler.
    """
    x = torch.randn(shape, generator=generator, dtype=_F64).to(device=device, dtype=dtype)
    for t, t_next in schedule.step_pairs(n_steps):
        ab, ab_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        sigma = ((1 - ab) / ab).sqrt()
        x0 = denoiser(x / ab.sqrt().to(dtype), sigma.to(device=device, dtype=dtype), cond)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        noise = torch.randn(shape, generator=generator, dtype=_F64).to(device=device, dtype=dtype)
        x = ddim_step(x0, eps.to(dtype), ab, ab_next, eta, noise if t_next >= 0 else None, convention)
    return x
