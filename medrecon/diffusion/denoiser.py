"""The denoiser interface every sampler uses, adapters for trained networks, and the ``Prior`` bundle.

A *denoiser* is a callable ``D(x, sigma, cond=None) -> E[x0 | x]`` for ``x = x0 + sigma * n`` (VE form,
``n ~ N(0, I)``), with ``x`` of shape ``(B, ...)`` and ``sigma`` a scalar or a ``(B,)`` tensor. Everything
else follows from it: the score is ``(D(x) - x) / sigma^2`` (Tweedie), a VP state ``x_t`` is denoised as
``D(x_t / sqrt(ab_t), sigma_t)``, and an EDM sampler calls it directly. Trained networks (epsilon- or
EDM-parameterised) and analytic priors (:mod:`medrecon.diffusion.analytic`) all implement it, so every
sampler can be run against a posterior that is known exactly.

A denoiser counts its evaluations in ``.nfe`` (one batched call = one evaluation, however many slices or
samples the batch holds); samplers report it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medrecon.diffusion.schedules import VPSchedule


def sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a tensor broadcastable against ``x`` (B, ...): scalars stay 0-d, (B,) gets trailing 1s."""
    s = torch.as_tensor(sigma, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def sigma_batch(sigma: torch.Tensor | float, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """``sigma`` as a (B,) tensor (networks take one timestep per batch element)."""
    s = torch.as_tensor(sigma, device=device)
    return s.expand(batch) if s.ndim == 0 else s.reshape(batch)


class Denoiser:
    """Base class: ``__call__`` counts the evaluation and defers to :meth:`denoise`."""

    nfe: int = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float,
                 cond: dict | None = None) -> torch.Tensor:
        self.nfe += 1
        return self.denoise(x, sigma, cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        """E[x0 | x] for x = x0 + sigma n."""
        raise NotImplementedError

    def reset_nfe(self) -> None:
        """Zero the evaluation counter (samplers call this at their start)."""
        self.nfe = 0


def score(D: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor | float,
          cond: dict | None = None) -> torch.Tensor:
    """Tweedie: grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    s = sigma_like(sigma, x)
    return (D(x, sigma, cond) - x) / s**2


def _net_dtype(net: Any, fallback: torch.dtype) -> torch.dtype:
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p.dtype
    return fallback


class EpsilonDenoiser(Denoiser):
    """Wrap an epsilon-predicting network ``net(x_t, timesteps, **cond) -> eps`` trained on integer VP steps.

    The network's signature is MONAI's ``DiffusionModelUNet(x, timesteps, class_labels=...)``. For a
    noise level ``sigma`` the adapter uses the trained step nearest in log-sigma (exactly the step when
    sigma came from the schedule), feeds ``x_t = sqrt(ab_t) x`` and returns ``x - sigma * eps``.
    ``clip=(lo, hi)`` (or a number c for (-c, c)) clamps x0 as DPS's ``clip_denoised`` does; default none.
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: VPSchedule,
                 clip: float | tuple[float, float] | None = None) -> None:
        self.net = net
        self.schedule = schedule
        self.clip = (-float(clip), float(clip)) if isinstance(clip, int | float) else clip
        self.nfe = 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        b = x.shape[0]
        s = sigma_batch(sigma, b).to(torch.float64).cpu()
        t = self.schedule.nearest_timestep(s)
        ab = self.schedule.alpha_bar(t).to(device=x.device)
        ab_b = ab.reshape(-1, *([1] * (x.ndim - 1)))
        dt = _net_dtype(self.net, x.dtype)
        x_t = (ab_b.sqrt().to(x.dtype) * x).to(dt)
        eps = self.net(x_t, t.to(x.device), **(cond or {})).to(x.dtype)
        x0 = x - sigma_like(s.to(device=x.device, dtype=x.dtype), x) * eps
        if self.clip is not None:
            x0 = x0.clamp(*self.clip)
        return x0


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw ``net(c_in x, c_noise, **cond)``.

    ``D = c_skip x + c_out F`` with ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``,
    ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = log(s)/4`` (sd = sigma_data). At sigma = 0 it returns x.
    """

    def __init__(self, net: Callable[..., torch.Tensor], sigma_data: float = 0.5) -> None:
        self.net = net
        self.sigma_data = float(sigma_data)
        self.nfe = 0

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for a tensor of noise levels (float64)."""
        s = sigma.to(torch.float64)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = s.clamp_min(1e-20).log() / 4
        return c_skip, c_out, c_in, c_noise

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        s = sigma_batch(sigma, x.shape[0], x.device)
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        view = (-1, *([1] * (x.ndim - 1)))
        dt = _net_dtype(self.net, x.dtype)
        f = self.net((c_in.reshape(view).to(x.dtype) * x).to(dt), c_noise.to(dt), **(cond or {})).to(x.dtype)
        return c_skip.reshape(view).to(x.dtype) * x + c_out.reshape(view).to(x.dtype) * f


@dataclass
class Prior:
    """A denoiser plus the affine map between the operator's image domain and the prior's domain.

    ``x_prior = scale * x_image + offset`` and ``x_image = (x_prior - offset) / scale``. For CT the image
    domain is attenuation (1/mm) and e.g. a HU window maps to [-1, 1]; for MR a robust percentile sets
    ``scale`` (offset 0). ``channels = 2`` packs a complex image as (real, imag) channels; the offset
    then shifts the real part only (it is added as a real number to the complex image). Data consistency
    composes the operator with :meth:`from_prior`, which is affine, so CG on it is exact.

    The layout is per 2D slice: image tensors ``(..., Y, X)`` map to prior tensors ``(..., C, Y, X)``;
    samplers flatten the leading dims (samples x slices) into the network batch. ``cond`` values are
    tensors with one entry per slice (leading dim Z); samplers tile them over samples. ``schedule`` is the
    VP schedule VP samplers walk (an ``EpsilonDenoiser``'s own schedule if not given).
    """

    denoiser: Callable[..., torch.Tensor]
    scale: float = 1.0
    offset: float = 0.0
    channels: int = 1
    cond: dict[str, torch.Tensor] | None = None
    schedule: VPSchedule | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 2):
            raise ValueError(f"Prior.channels must be 1 (real) or 2 (complex as real/imag), "
                             f"got {self.channels}")
        if self.scale == 0:
            raise ValueError("Prior.scale must be non-zero")

    def vp_schedule(self) -> VPSchedule:
        """The schedule for VP samplers: explicit, else the denoiser's, else the DDPM default."""
        if self.schedule is not None:
            return self.schedule
        sched = getattr(self.denoiser, "schedule", None)
        return sched if isinstance(sched, VPSchedule) else VPSchedule()

    def to_prior(self, x_image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., Y, X) image domain (real or complex) -> (..., C, Y, X) real prior domain."""
        z = x_image * self.scale + self.offset
        if self.channels == 2:
            z = torch.view_as_real(z.to(torch.complex128 if dtype == torch.float64 else torch.complex64))
            return z.movedim(-1, -3).to(dtype)
        if z.is_complex():
            raise ValueError("a complex image needs a Prior with channels=2 (real/imag); this one has 1")
        return z.unsqueeze(-3).to(dtype)

    def from_prior(self, x_prior: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(..., C, Y, X) prior domain -> (..., Y, X) image domain (complex when C = 2); differentiable."""
        if x_prior.shape[-3] != self.channels:
            raise ValueError(f"prior tensor has {x_prior.shape[-3]} channels, the Prior expects "
                             f"{self.channels}")
        z = torch.complex(x_prior[..., 0, :, :], x_prior[..., 1, :, :]) if self.channels == 2 \
            else x_prior[..., 0, :, :]
        x = (z - self.offset) / self.scale
        return x if dtype is None else x.to(dtype)

    def batch_cond(self, n_samples: int) -> dict[str, torch.Tensor] | None:
        """``cond`` tiled for a batch laid out as (samples, slices) flattened."""
        if not self.cond:
            return None
        return {k: v.repeat(n_samples, *([1] * (v.ndim - 1))) for k, v in self.cond.items()}

    def pack(self, x_image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Image tensor (*lead, Y, X) -> network batch (prod(lead), C, Y, X) in the prior domain."""
        z = self.to_prior(x_image, dtype)
        return z.reshape(-1, *z.shape[-3:])

    def unpack(self, x_batch: torch.Tensor, lead: tuple[int, ...],
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inverse of :meth:`pack`: (N, C, Y, X) -> image tensor (*lead, Y, X) (differentiable)."""
        return self.from_prior(x_batch.reshape(*lead, *x_batch.shape[-3:]), dtype)
