"""DDNM / DDNM+: Denoising Diffusion Null-space Model (Wang, Yu, Zhang, ICLR 2023).

Follows ``wyhuai/DDNM@00b58ea`` (``functions/svd_ddnm.py: ddnm_diffusion, ddnm_plus_diffusion``,
``functions/svd_operators.py: Lambda, Lambda_noise``, ``guided_diffusion/diffusion.py:
simplified_ddnm_plus, get_schedule_jump``). Per forward step t -> t' of a uniform DDIM grid (default 100
steps, the repository's ``T_sampling``):

1. x0_hat = D(x_t / sqrt(ab_t), sigma_t) (Tweedie; eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t));
2. range-null-space correction in the image domain: x0' = x0_hat - lambda_t A^+ (A x0_hat - y), which for
   lambda_t = 1 is x0' = A^+ y + (I - A^+ A) x0_hat: the range part comes from the data, the null-space part
   from the prior (paper Eq. 13 and 17);
3. ``variant: ddnm`` (noiseless): x_{t'} = sqrt(ab') x0' + sqrt(1 - ab') (eta z + sqrt(1 - eta^2) eps_hat)
   (the repository's DDIM with eta, default 0.85; ``ddim_step(..., convention="dds")``);
   ``variant: ddnm+`` (noisy data, paper section 3.3 and Appendix I): with a = sqrt(ab'), s = sqrt(1 - ab')
   and sigma_y the noise level of A^+ y: lambda_t = 1 when s >= a sigma_y, else s sqrt(1 - eta^2) / (a
   sigma_y); the range-space part of the re-noising is fresh noise of std sqrt(s^2 - a^2 sigma_y^2) (first
   case) or s eta (second case), so that it and the data noise carried by lambda_t A^+ y add up to s; the
   null-space part is re-noised as in DDNM (``Lambda`` and ``Lambda_noise`` of the SVD code, with every
   singular value replaced by one, see below). sigma_y = 0 runs DDNM (as the repository does);
4. time travel (RePaint's schedule, ``travel_length`` l, ``travel_repeat`` r): after the forward step from
   grid index j to j-1 with j < T - l a multiple of l, the chain jumps back l grid steps by
   x_{t+l} = sqrt(ab_{t+l}) x0_hat + sqrt(1 - ab_{t+l}) z from the last x0_hat (uncorrected, as in the
   repository), r - 1 times. r = 1 (the default, and the repository's configs) is no travel.

The last forward step returns x0' itself: for ``ddnm`` A x = y up to the CG tolerance.

A^+ without an SVD: ``A^+ b`` is CG from zero on ``A^H A x = A^H b``
(:func:`medrecon.diffusion.dc.pinv_normal`, the minimum-norm solution), ``cg_iter`` iterations (default 30)
or until the relative residual is below ``cg_tol``. ddnm+ needs a second solve per step, ``A^+ A v`` to
split the re-noising into its range and null-space parts (batched with the first).

Warm start as DDS (``init``, ``start``; CCDF): the chain starts at the step ``start`` of the way from the end of
the grid from the starting image diffused forward.

Departures, on purpose:

* The repository's DDNM+ needs the SVD of A (per singular value s_i it uses sigma_y / s_i); CT and multi-coil
  MRI have none, so medrecon uses the *scalar* form of the paper's Eq. 19 (the repository's ``--simplified``
  path) with sigma_y in image units: by default ``problem.noise_std / ||A||`` (the level of A^+ n along the
  largest singular value: exact for operators whose non-zero singular values are all equal, such as
  single-coil Cartesian MRI with an orthonormal FFT; optimistic for CT, whose small singular values amplify
  the noise more), or the ``sigma_y`` parameter (image units) when set. It is converted into the prior's
  units with the prior's scale. The re-noising split (step 3) is the SVD code's with all singular values equal,
  which the simplified code only approximates (it scales eps and z by gamma_t and uses ab' where the paper has
  sqrt(ab'); those slips are not reproduced).
* The correction is done in the operator's image domain (the prior's affine map in between, exact since it is
  affine); slices of any size live on padded canvases (:class:`~medrecon.methods.sampling.SliceLayout`) and the
  padded region is null space (re-noised as DDIM).
* ``schedule: ve`` (a VE-DDNM row appears in PaDIS's table) is not offered: the slice priors are VP-trained and
  the VP DDIM chain above is the same update written in VE variables; an EDM-grid variant would need an EDM
  prior.
* Samples are independent CG systems; noise levels are per real component (complex MR: per real/imag channel;
  a recorded complex noise_std is divided by sqrt(2)).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch

from medrecon.diffusion.dc import operator_norm_sq, pinv_normal
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddim_step, diffuse
from medrecon.errors import ConfigError
from medrecon.methods.sampling import (
    DTYPES,
    SLICE_PRIOR_LOADER,
    SliceLayout,
    check_params,
    reset_nfe,
    sample_chunks,
    warm_start_image,
)
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

DDNM_DEFAULTS: dict[str, Any] = {
    "variant": "ddnm", "steps": 100, "eta": 0.85, "travel_length": 1, "travel_repeat": 1, "cg_iter": 30,
    "cg_tol": 1e-6, "sigma_y": None, "samples": 1, "sample_batch": None, "dtype": "float32", "init": None,
    "start": 1.0,
}


def travel_schedule(n_steps: int, length: int, repeat: int) -> list[int]:
    """Grid indices visited by a time-travel chain (RePaint's ``get_schedule_jump``, written afresh).

    Starts at ``n_steps - 1``, ends at -1 (the clean image); each move is one grid step. Below every index
    j < n_steps - length that is a multiple of ``length`` the chain goes back up ``length`` steps, ``repeat - 1``
    times. ``repeat = 1`` is the plain chain n-1, ..., 0, -1.
    """
    n, length, repeat = int(n_steps), int(length), int(repeat)
    jumps = {j: repeat - 1 for j in range(0, n - length, length)}
    out: list[int] = []
    t = n
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(length):
                t += 1
                out.append(t)
    out.append(-1)
    return out


def _check(p: dict) -> None:
    if p["variant"] not in ("ddnm", "ddnm+"):
        raise ConfigError(f"ddnm: variant must be 'ddnm' or 'ddnm+', got {p['variant']!r}",
                          fix="ddnm for noiseless data, ddnm+ for noisy data")
    if not 0.0 <= float(p["eta"]) <= 1.0:
        raise ConfigError(f"ddnm: eta must lie in [0, 1], got {p['eta']}", fix="DDNM uses eta: 0.85")
    if int(p["travel_length"]) < 1 or int(p["travel_repeat"]) < 1:
        raise ConfigError(f"ddnm: travel_length and travel_repeat must be >= 1, got {p['travel_length']}, "
                          f"{p['travel_repeat']}", fix="travel_repeat: 1 turns time travel off")
    if int(p["cg_iter"]) < 1:
        raise ConfigError(f"ddnm: cg_iter must be >= 1, got {p['cg_iter']}",
                          fix="the pseudo-inverse needs CG iterations, e.g. cg_iter: 30")
    if p["sigma_y"] is not None and float(p["sigma_y"]) < 0:
        raise ConfigError(f"ddnm: sigma_y must be >= 0, got {p['sigma_y']}",
                          fix="leave sigma_y unset to derive it from the measurement's noise_std")


def image_noise_level(problem: ReconProblem, p: dict, lay: SliceLayout) -> float:
    """sigma_y of DDNM+ in image units, per real component: the parameter, else noise_std / ||A|| (complex data:
    noise_std is the circular complex std, medrecon's MR convention, so each of re/im has noise_std / sqrt(2)),
    else 0 (noiseless)."""
    if p["sigma_y"] is not None:
        return float(p["sigma_y"])
    if not problem.noise_std:
        return 0.0
    per_component = float(problem.noise_std) / (math.sqrt(2.0) if lay.op.out_dtype.is_complex else 1.0)
    return per_component / math.sqrt(operator_norm_sq(lay.op, problem.y.device))


def ddnm_plus_coefficients(a: float, s: float, sigma: float, eta: float) -> tuple[float, float, float]:
    """(lambda_t, range-space fresh-noise std, range-space eps weight) of DDNM+ for one singular value 1.

    a = sqrt(ab'), s = sqrt(1 - ab'), sigma = sigma_y in the prior's units (``Lambda``/``Lambda_noise``).
    """
    if s >= a * sigma:
        return 1.0, math.sqrt(max(s * s - (a * sigma) ** 2, 0.0)), 0.0
    return s * math.sqrt(max(1.0 - eta * eta, 0.0)) / (a * sigma), s * eta, 0.0


@register_method(
    "ddnm", defaults=DDNM_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Wang, Yu, Zhang: Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model, ICLR 2023",
    memory_copies=64, init="param")
def ddnm(problem: ReconProblem, params: dict, prior: Prior,
         generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by DDNM / DDNM+; see the module docstring for params."""
    p = check_params("ddnm", params)
    _check(p)
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    op = lay.op
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]), float(p["start"]))
    grid = [t for t, _ in pairs]                       # descending; index k of the chain -> grid[-1 - k]
    n_run = len(grid)
    path = travel_schedule(n_run, int(p["travel_length"]), int(p["travel_repeat"]))
    n_forward = sum(1 for i, j in itertools.pairwise(path) if j < i)
    start_image = warm_start_image("ddnm", problem, p)
    den = lay.denoiser
    reset_nfe(den)
    eta = float(p["eta"])
    sigma_img = image_noise_level(problem, p, lay)
    sigma_prior = sigma_img * abs(float(prior.scale))
    plus = p["variant"] == "ddnm+" and sigma_prior > 0
    cg_iter, tol = int(p["cg_iter"]), float(p["cg_tol"])
    with torch.no_grad():
        aty = op.adjoint(lay.y)

    def t_of(k: int) -> int:
        return grid[n_run - 1 - k] if k >= 0 else -1

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return lay.noise(shape, generator)

    t_start = time.perf_counter()
    outs, lambdas = [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, n_forward, len(chunks))
    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        x = randn(shape)
        if start_image is not None:
            x = diffuse(lay.batch(start_image.expand(n, *lay.image_shape)), sched.alpha_bar(t_of(path[0])), x)
        x0_last = None
        with torch.no_grad():
            for i, j in itertools.pairwise(path):
                t, t_next = t_of(i), t_of(j)
                ab_next = sched.alpha_bar(t_next)
                if j > i:                                   # time travel back from the last x0_hat
                    x = diffuse(x0_last, ab_next, randn(shape))
                    continue
                ab = sched.alpha_bar(t)
                sigma = ((1 - ab) / ab).sqrt()
                x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                eps = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(lay.dtype)
                x0_last = x0
                xi = lay.image(x0, n)
                rhs = op.normal(xi) - aty                   # A^H (A x0_hat - y)
                noise = randn(shape) if t_next >= 0 else None
                a, s = float(ab_next.sqrt()), float((1 - ab_next).sqrt())
                if not plus:
                    corr = pinv_normal(op, rhs, cg_iter, tol, n_batch=1)
                    x0c = x0 - lay.batch_delta(corr)
                    x = ddim_step(x0c, eps, ab, ab_next, eta, noise, "dds")
                    lam = 1.0
                else:
                    lam, d1_range, d2_range = ddnm_plus_coefficients(a, s, sigma_prior, eta)
                    d1_null, d2_null = s * eta, s * math.sqrt(max(1 - eta * eta, 0.0))
                    renoise = d1_null * noise + d2_null * eps if noise is not None else torch.zeros_like(x0)
                    # the range part of the re-noising replaced: P_r (range_noise - null_noise), P_r = A^+ A
                    diff = (d1_range - d1_null) * noise + (d2_range - d2_null) * eps if noise is not None \
                        else None
                    if diff is not None:
                        both = pinv_normal(op, torch.cat([rhs, op.normal(lay.image_delta(diff, n))]), cg_iter,
                                           tol, n_batch=1)
                        corr, diff_r = both[:n], both[n:]
                        renoise = renoise + lay.batch_delta(diff_r)
                    else:
                        corr = pinv_normal(op, rhs, cg_iter, tol, n_batch=1)
                    x0c = x0 - lam * lay.batch_delta(corr)
                    x = (a * x0c + renoise).to(lay.dtype)
                lambdas.append(lam)
                if report:
                    report(lay.image(x0c, n), t=int(t), sigma=float(sigma))
        outs.append(lay.image(x, n))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": "ddnm", "params": p, "time_s": time.perf_counter() - t_start,
            "variant_run": "ddnm+" if plus else "ddnm", "sigma_y_image": sigma_img,
            "lambda_min": min(lambdas) if lambdas else 1.0,
            "scaled_steps": sum(1 for v in lambdas if v < 1.0) // max(1, len(chunks)),
            "final_residual_norm_mean": float(res),
            "network_calls": int(getattr(den, "nfe", n_forward)), "time_travel_steps": len(path) - 1 - n_forward}
    # NFE = network evaluations along one sample's chain (forward steps, time travel included)
    return ReconResult(samples=samples, nfe=n_forward, info=info)
