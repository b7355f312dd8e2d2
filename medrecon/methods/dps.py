"""DPS: Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye, ICLR 2023).

Follows ``DPS2022/diffusion-posterior-sampling@effbde7`` (``condition_methods.py: PosteriorSampling``,
``gaussian_diffusion.py``): ancestral DDPM steps on the linear VP schedule and, after each step, a
gradient step on the *non-squared* residual norm through the denoiser:

    x0_hat = D(x_t / sqrt(ab_t), sigma_t)                    (Tweedie; autograd through the network)
    x'     = DDPM ancestral step from x_t given x0_hat
    x_{t-1} = x' - zeta * grad_{x_t} || y - A(from_prior(x0_hat)) ||

This is the paper's Algorithm 1 with step ``zeta_i = zeta' / ||y - A x0_hat||`` on the *squared* norm and
``zeta' = zeta / 2`` (``guidance: norm``, the default). ``guidance: gaussian`` instead plugs DPS's
likelihood approximation ``log p(y | x_t) ~ -||y - A x0_hat||^2 / (2 s_y^2)`` into the reverse SDE with its
exact weight (DDPM: ``beta_t / sqrt(alpha_t)`` times the score), scaled by zeta (1 = the Bayes weight);
it needs ``noise_std`` and is the form in which DPS's bias can be compared with exact posteriors (it
would be exact with the true ``p(y | x_t)``). It is explicit and becomes unstable when the likelihood
is stiff (``||A||^2 / s_y^2`` large compared with 1 / beta_t), which is why DPS normalises by the norm.

The gradient passes through the operator's ``forward`` (whose backward is the exact adjoint) and the
affine prior->image map. Norms are Hermitian for complex (MR) data.

Departures, on purpose:
* ``zeta`` does not transfer from the paper (images in [-1, 1], blur/inpainting operators): our operators
  have physical scaling (ASTRA projections in mm, orthonormal FFTs), so zeta must be re-tuned per
  operator and recorded in the config; the default 1.0 is only a starting point.
* The residual norm is taken per operator application: per slice for a per-slice operator (each slice
  is its own DPS problem, so the step does not depend on the number of slices), per volume for a 3D one.
* ``steps < 1000`` subsamples the grid uniformly (:meth:`VPSchedule.ddim_timesteps`) and takes the exact
  DDPM q-posterior step between grid points. No clipping of x0_hat unless the denoiser does it
  (``EpsilonDenoiser(clip=1)`` reproduces DPS's ``clip_denoised``).

Any slice size: the state lives on a canvas padded to the network's multiple with the background
(:class:`SliceLayout`, :mod:`medrecon.diffusion.canvas`); the residual is taken on the cropped slice.

The module also holds the small layout helper shared with :mod:`medrecon.methods.dds`,
:mod:`medrecon.methods.diffusionblend` and the latent samplers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from medrecon.diffusion.canvas import Canvas, CanvasDenoiser, network_multiple, prior_background
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddpm_step
from medrecon.errors import ConfigError, InputError
from medrecon.physics.operator import LinearOperator
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

DPS_DEFAULTS: dict[str, Any] = {"steps": 1000, "zeta": 1.0, "guidance": "norm", "samples": 1,
                                "sample_batch": None, "dtype": "float32"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_params(method: str, params: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge ``params`` over ``defaults``; an unknown key is a config error (a typo must not pass)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for method {method!r}",
                          fix=f"use only {sorted(defaults)} under the method's params in the config")
    out = {**defaults, **params}
    if int(out["samples"]) < 1:
        raise ConfigError(f"{method}: samples must be >= 1, got {out['samples']}",
                          fix="set samples: 1 or more")
    if out["dtype"] not in _DTYPES:
        raise ConfigError(f"{method}: dtype must be one of {sorted(_DTYPES)}, got {out['dtype']!r}",
                          fix="use float32 (networks) or float64 (analytic checks)")
    return out


@dataclass
class SliceLayout:
    """How a problem's image (*lead, Y, X) maps to the denoiser batch (samples * prod(lead), C, Y', X').

    (Y', X') is the :class:`~medrecon.diffusion.canvas.Canvas`: the slice centred in the smallest frame whose
    sides are multiples of ``multiple`` (default: what the prior's network needs), padded with the prior's
    background. This is the one place where samplers pad: the state and the denoiser live on the canvas
    (:attr:`denoiser` returns the background in the padded region), image-domain steps see the crop.
    ``multiple=1`` turns it off (PaDIS tiles any size itself).
    """

    problem: ReconProblem
    prior: Prior
    dtype: torch.dtype
    multiple: int | None = None

    def __post_init__(self) -> None:
        p, op = self.problem, self.problem.operator
        shape = tuple(p.image_shape)
        n_in = len(op.in_shape)
        if len(shape) < 2 or len(shape) < n_in or tuple(shape[len(shape) - n_in:]) != tuple(op.in_shape):
            raise InputError(f"image shape {shape} does not end with the operator's input shape "
                             f"{tuple(op.in_shape)}", fix="the measurement store and the operator disagree; "
                             "re-run the measure step for this volume")
        if op.in_dtype.is_complex != (self.prior.channels == 2):
            kind = "complex" if op.in_dtype.is_complex else "real"
            raise InputError(f"the operator's image is {kind} but the prior has {self.prior.channels} "
                             "channel(s)",
                             fix="use a 2-channel (real/imag) prior for complex MR images, 1 channel for CT")
        self.image_shape = shape
        self.lead = shape[:-2]
        self.n_slices = math.prod(self.lead)
        self.out_dims = tuple(range(-len(op.out_shape), 0))
        self.y = p.y.to(op.out_dtype)
        mult = network_multiple(self.prior.denoiser) if self.multiple is None else int(self.multiple)
        self.canvas = Canvas(*shape[-2:], multiple=mult, value=prior_background(self.prior))
        self._denoiser: Any = None

    @property
    def op(self) -> LinearOperator:
        return self.problem.operator

    @property
    def denoiser(self) -> Any:
        """The prior's denoiser on canvases (itself when no padding is needed)."""
        if self._denoiser is None:
            self._denoiser = self.prior.denoiser if self.canvas.identity \
                else CanvasDenoiser(self.prior.denoiser, self.canvas)
        return self._denoiser

    def image(self, x_batch: torch.Tensor, n: int) -> torch.Tensor:
        """Denoiser batch (canvases) of n samples -> image domain (n, *image_shape), in the operator's dtype."""
        return self.prior.unpack(self.canvas.crop(x_batch), (n, *self.lead), self.op.in_dtype)

    def batch(self, x_image: torch.Tensor) -> torch.Tensor:
        """Image domain (n, *image_shape) -> denoiser batch (canvases, background around) in the prior domain."""
        return self.canvas.pad(self.prior.pack(x_image, self.dtype))

    def batch_shape(self, n: int) -> tuple[int, ...]:
        return (n * self.n_slices, self.prior.channels, *self.canvas.shape)

    def residual_norms(self, x_image: torch.Tensor) -> torch.Tensor:
        """||y - A x|| per operator application (Hermitian for complex data)."""
        return torch.linalg.vector_norm(self.y - self.op.forward(x_image), dim=self.out_dims)


def sample_chunks(total: int, per_pass: int | None) -> list[int]:
    """Split ``total`` samples into passes of at most ``per_pass`` (all at once when None)."""
    per = total if not per_pass else max(1, int(per_pass))
    return [min(per, total - i) for i in range(0, total, per)]


def reset_nfe(denoiser: Any) -> None:
    if hasattr(denoiser, "reset_nfe"):
        denoiser.reset_nfe()


@register_method("dps")
def dps(problem: ReconProblem, params: dict, prior: Prior,
        generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by DPS; params: steps, zeta, samples, sample_batch, dtype."""
    p = check_params("dps", params, DPS_DEFAULTS)
    if p["guidance"] not in ("norm", "gaussian"):
        raise ConfigError(f"dps: guidance must be 'norm' or 'gaussian', got {p['guidance']!r}",
                          fix="use 'norm' (DPS as published) or 'gaussian' (needs the noise level)")
    if p["guidance"] == "gaussian" and not problem.noise_std:
        raise ConfigError("dps: guidance 'gaussian' needs the measurement noise level; this problem has none",
                          fix="record noise_std in the measurement, or use guidance: norm")
    lay = SliceLayout(problem, prior, _DTYPES[p["dtype"]])
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]))
    den, zeta = lay.denoiser, float(p["zeta"])
    reset_nfe(den)
    t_start = time.perf_counter()
    outs, last_norm = [], []
    for n in sample_chunks(int(p["samples"]), p["sample_batch"]):
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(problem.y.device, lay.dtype)
        for t, t_next in pairs:
            ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
            sigma = ((1 - ab) / ab).sqrt()
            x = x.detach().requires_grad_(True)
            x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
            norms = lay.residual_norms(lay.image(x0, n))
            if p["guidance"] == "norm":
                (grad,) = torch.autograd.grad(norms.sum(), x)
                step = zeta
            else:
                (grad,) = torch.autograd.grad((norms**2).sum() / (2 * float(problem.noise_std) ** 2), x)
                alpha = ab / ab_next
                step = zeta * float((1 - alpha) / alpha.sqrt())
            grad = lay.canvas.zero_padding(grad)
            with torch.no_grad():
                noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(problem.y.device, lay.dtype) \
                    if t_next >= 0 else None
                x = ddpm_step(x, x0.detach(), ab, ab_next, noise) - step * grad
        outs.append(lay.image(x.detach(), n))
        last_norm.append(norms.detach().reshape(-1))
    samples = torch.cat(outs)
    info = {"method": "dps", "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(torch.cat(last_norm).mean())}
    return ReconResult(samples=samples, nfe=int(getattr(den, "nfe", len(pairs))), info=info)
