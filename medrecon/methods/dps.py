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
(:class:`~medrecon.methods.sampling.SliceLayout`, :mod:`medrecon.diffusion.canvas`); the residual is taken on
the cropped slice.
"""

from __future__ import annotations

import time

import torch

from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddpm_step
from medrecon.errors import ConfigError
from medrecon.methods.sampling import DTYPES, SLICE_PRIOR_LOADER, SliceLayout, check_params, reset_nfe, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method


@register_method(
    "dps", defaults={"steps": 1000, "zeta": 1.0, "guidance": "norm", "samples": 1, "sample_batch": None,
                     "dtype": "float32"},
    prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Chung, Kim, McCann, Klasky, Ye: Diffusion Posterior Sampling for General Noisy Inverse Problems, ICLR 2023",
    memory_copies=128)
def dps(problem: ReconProblem, params: dict, prior: Prior,
        generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by DPS; params: steps, zeta, samples, sample_batch, dtype."""
    p = check_params("dps", params)
    if p["guidance"] not in ("norm", "gaussian"):
        raise ConfigError(f"dps: guidance must be 'norm' or 'gaussian', got {p['guidance']!r}",
                          fix="use 'norm' (DPS as published) or 'gaussian' (needs the noise level)")
    if p["guidance"] == "gaussian" and not problem.noise_std:
        raise ConfigError("dps: guidance 'gaussian' needs the measurement noise level; this problem has none",
                          fix="record noise_std in the measurement, or use guidance: norm")
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]))
    den, zeta = lay.denoiser, float(p["zeta"])
    reset_nfe(den)
    t_start = time.perf_counter()
    outs, last_norm = [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        x = lay.noise(shape, generator)
        for t, t_next in pairs:
            ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
            sigma = ((1 - ab) / ab).sqrt()
            x = x.detach().requires_grad_(True)
            x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
            xi = lay.image(x0, n)
            norms = lay.residual_norms(xi)
            if p["guidance"] == "norm":
                (grad,) = torch.autograd.grad(norms.sum(), x)
                step = zeta
            else:
                (grad,) = torch.autograd.grad((norms**2).sum() / (2 * float(problem.noise_std) ** 2), x)
                alpha = ab / ab_next
                step = zeta * float((1 - alpha) / alpha.sqrt())
            grad = lay.canvas.zero_padding(grad)
            with torch.no_grad():
                noise = lay.noise(shape, generator) \
                    if t_next >= 0 else None
                x = ddpm_step(x, x0.detach(), ab, ab_next, noise) - step * grad
            if report:
                report(xi, t=int(t), sigma=float(sigma))
        outs.append(lay.image(x.detach(), n))
        last_norm.append(norms.detach().reshape(-1))
    samples = torch.cat(outs)
    info = {"method": "dps", "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(torch.cat(last_norm).mean())}
    return ReconResult(samples=samples, nfe=int(getattr(den, "nfe", len(pairs))), info=info)
