"""DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, "Solving 3D Inverse Problems using Pre-trained 2D Diffusion
Models", CVPR 2023).

Follows ``HJ-harry/DiffusionMBIR@592ea29`` (``controllable_generation_TV.py:get_pc_radon_ADMM_TV_vol``, the
function the shipped 3D CT script ``inverse_problem_solver_AAPM_3d_total.py`` calls, with score_sde's
``sampling.py`` ``ReverseDiffusionPredictor`` and ``LangevinCorrector``; docs/algorithms.md section
"DiffusionMBIR"). A 2D slice prior is run on every slice of the volume, and the slices are coupled by a
total-variation penalty along z in the data-consistency step. Per step i = 0 .. steps-1 of the geometric VE grid
``sigma_i = sigma_min (sigma_max / sigma_min)^(1 - i / (steps - 1))`` (sigma_steps = 0):

1. predictor (reverse diffusion), on every slice: ``s = (D(x, sigma_i) - x) / sigma_i^2``,
   ``x <- x + (sigma_i^2 - sigma_{i+1}^2) s + sqrt(sigma_i^2 - sigma_{i+1}^2) z``;
2. corrector (one Langevin step at the same sigma_i): ``s = (D(x, sigma_i) - x) / sigma_i^2``,
   ``eps = 2 (snr ||z|| / ||s||)^2`` (snr 0.16), ``x <- x + eps s + sqrt(2 eps) z``;
3. data consistency on the whole volume of the noisy state, in the image domain: with ``ztv`` one ADMM
   iteration of min 1/2 ||Ax - y||^2 + ztv_lambda ||D_z x||_1 whose x-update is ``cg_iter`` (reference: 1) CG
   steps on ``(A^H A + rho D_z^T D_z) x = A^H y + rho D_z^T (z - u)``, with (z, u) persistent across steps
   (:func:`medrecon.diffusion.dc.ztv_admm_step`); without ``ztv`` (2D, or per-slice), ``cg_iter`` CG steps on
   the normal equations (:func:`medrecon.diffusion.dc.cg_normal`). One data step per predictor-corrector
   pair, after the corrector, as both reference functions (3D and 2D) do: not one after each of the two.

After the loop (``final_consistency``; the reference's CT function with ``final_consistency=True``, its MRI
function has no such step) one normalised back-projection step ``x <- x + A^T (y - A x) / A^T A 1``
("Kaczmarz" in the reference). It is a SIRT step, a valid preconditioner only where ``A^T A 1 > 0`` (a
nonnegative operator: CT); unset, it runs for ``dc: hard`` on CT whose ``A^T A 1`` is nonnegative, and asking
for it on another operator (MR, a signed matrix) is a ConfigError. The output is that last state (the
reference returns it, not a denoised estimate): it keeps noise of level sigma_min in the prior domain.
NFE = 2 per step (the reference: 2000 steps, 4000 NFE per slice; default here 100 steps for CPUs). The
reference's single CG step per diffusion step assumes its 2000 steps: measured on an 8 x 64 x 64 chest phantom
(20 views, Poisson noise, the demo slice prior), PSNR 21.3 dB at 100 steps and 23.8 dB at 300 with
``cg_iter: 1``, 27.7 dB at 100 steps with ``cg_iter: 5`` (FBP 21.8 dB, DDS 24.8 dB); the default stays 1.

``dc: noise_aware`` (medrecon's addition, docs/algorithms.md section 3): the reference's data step solves the
noise-free normal equations and ignores sigma_y; on a 1D problem with A = 1 it returns y itself with zero
spread. The noise-aware step treats the noisy state x_pred (noise sigma_i in the prior domain, sigma_i / |scale|
in the image domain) as a second measurement of x: it adds ``gamma/2 ||x - x_pred||^2`` with
``gamma = sigma_y^2 scale^2 / sigma_i^2`` to the objective above (which is ||Ax - y||^2 / sigma_y^2 times
sigma_y^2), i.e. ``(A^H A + rho D_z^T D_z + gamma I) x = A^H y + rho D_z^T (z - u) + gamma x_pred``; sigma_y
is the ``sigma_y`` parameter, else problem.noise_std (sigma_y = 0 is the hard step; CT measurements with
Poisson noise record no single sigma_y: set it, e.g. the RMS of sqrt(exp(y) / I0) over the rays). Its final
back-projection step is off by default (it would force the noise back into the image).

Departures, on purpose:

* The prior is medrecon's (VP epsilon or EDM denoiser D(x, sigma), not a VE score network): the predictor and
  corrector use the score (D - x)/sigma^2 in VE form; ``sigma_max`` defaults to (and is clamped to) the
  prior's largest trained sigma (about 157 for the linear VP schedule; the reference's VE prior: 378), the
  chain starts from N(0, sigma_max^2) (plus the starting image with a warm start, as DDS's ``init``/``start``).
* Operators are exact (ASTRA/SigPy, matched adjoints), so the one CG step is the exact steepest-descent step
  with line search; ``rho``, ``ztv_lambda`` are dimensionless by default (``weights: relative``, fractions of
  ||A||^2 and ||A^H y||_inf, :func:`medrecon.diffusion.dc.absolute_dc_weights`) and default to DDS's values,
  which were tuned for the same ADMM step (the reference uses rho = 10, lambda = 0.04 for both methods).
* Corrector step size: the reference averages the per-slice norms of a chunk of 12 slices of the one volume;
  here ``snr_norm: sample`` averages them over all slices of each posterior sample (samples stay
  independent), ``snr_norm: batch`` over the whole pass (the score_sde convention; needed where one slice
  has too few pixels for a stable norm, e.g. the 1D analytic checks).
* Posterior samples are independent CG systems (the reference has one volume); inner products are Hermitian
  (complex multi-coil MRI through the 2-channel prior and the SENSE operator; the reference's BRATS MRI is
  single-coil magnitude). In the final step pixels where A^T A 1 vanishes (no ray) are left alone.
* Slices of any size are padded to the network's multiple with the background (:class:`SliceLayout`); the
  padded part of the state is never touched by data consistency.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from medrecon.diffusion.dc import ZTVState, absolute_dc_weights, cg_normal, ztv_admm_step
from medrecon.diffusion.denoiser import Prior
from medrecon.errors import ConfigError, InputError
from medrecon.methods.sampling import (
    DTYPES,
    SLICE_PRIOR_LOADER,
    SliceLayout,
    check_params,
    reset_nfe,
    sample_chunks,
    warm_start_image,
)
from medrecon.physics.operator import LinearOperator
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

MBIR_DEFAULTS: dict[str, Any] = {
    "steps": 100, "snr": 0.16, "snr_norm": "sample", "sigma_max": None, "sigma_min": 0.01, "dc": "hard",
    "ztv": None, "rho": 0.004, "ztv_lambda": 7e-4, "cg_iter": 1, "cg_tol": 1e-6, "weights": "relative",
    "final_consistency": None, "sigma_y": None, "samples": 1, "sample_batch": None, "dtype": "float32", "init": None,
    "start": 1.0,
}


def ve_sigmas(sigma_max: float, sigma_min: float, steps: int) -> torch.Tensor:
    """The reference's geometric grid, descending, with a trailing 0 (float64, steps + 1 entries)."""
    if steps == 1:
        grid = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        k = torch.arange(steps - 1, -1, -1, dtype=torch.float64) / (steps - 1)
        grid = sigma_min * (sigma_max / sigma_min) ** k
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def _check(p: dict, prior: Prior, n_slices_axis: int) -> tuple[float, float, bool, bool | None]:
    """Value checks; returns (sigma_max, sigma_min, ztv, final_consistency as given)."""
    if int(p["steps"]) < 1:
        raise ConfigError(f"diffusionmbir: steps must be >= 1, got {p['steps']}", fix="e.g. steps: 100")
    if float(p["snr"]) < 0:
        raise ConfigError(f"diffusionmbir: snr must be >= 0, got {p['snr']}", fix="the reference uses snr: 0.16")
    for key, allowed in (("dc", ("hard", "noise_aware")), ("snr_norm", ("sample", "batch"))):
        if p[key] not in allowed:
            raise ConfigError(f"diffusionmbir: {key} must be one of {list(allowed)}, got {p[key]!r}",
                              fix=f"use {key}: {allowed[0]}")
    if int(p["cg_iter"]) < 1:
        raise ConfigError(f"diffusionmbir: cg_iter must be >= 1, got {p['cg_iter']}",
                          fix="the reference uses cg_iter: 1")
    trained = float(prior.vp_schedule().sigmas[-1])
    s_max = trained if p["sigma_max"] is None else min(float(p["sigma_max"]), trained)
    s_min = float(p["sigma_min"])
    if not 0 < s_min < s_max:
        raise ConfigError(f"diffusionmbir: need 0 < sigma_min < sigma_max, got {s_min} and {s_max} (sigma_max "
                          f"is clamped to the prior's largest trained sigma {trained:.4g})",
                          fix="the reference uses sigma_min: 0.01; leave sigma_max unset")
    ztv = n_slices_axis > 1 if p["ztv"] is None else bool(p["ztv"])
    if ztv and n_slices_axis < 2:
        raise ConfigError("diffusionmbir: ztv needs a volume (Z, Y, X) with at least 2 slices; this problem has one",
                          fix="set ztv: false (or leave it unset) for 2D problems")
    return s_max, s_min, ztv, p["final_consistency"]


def _noise_std(problem: ReconProblem, p: dict) -> float:
    """sigma_y for ``dc: noise_aware`` (0 for hard data consistency)."""
    if p["dc"] != "noise_aware":
        return 0.0
    if p["sigma_y"] is not None:
        if float(p["sigma_y"]) < 0:
            raise ConfigError(f"diffusionmbir: sigma_y must be >= 0, got {p['sigma_y']}",
                              fix="leave sigma_y unset to use the measurement's noise_std")
        return float(p["sigma_y"])
    if problem.noise_std is None:
        raise InputError("diffusionmbir: dc: noise_aware needs the measurement noise level, and this problem's "
                         "noise_std is unknown (CT with Poisson noise records none)",
                         fix="use dc: hard, set sigma_y (in measurement units), or record noise_std")
    return float(problem.noise_std)


def backprojection_normaliser(op: LinearOperator, image_shape: tuple[int, ...], device: torch.device | None = None
                               ) -> torch.Tensor | None:
    """``A^T A 1`` (1, *image_shape) when it is real and nonnegative (a nonnegative operator such as CT), else None:
    only then is the reference's final step a (SIRT) preconditioned step rather than an arbitrary rescaling."""
    if op.in_dtype.is_complex:
        return None
    with torch.no_grad():
        norm = op.normal(torch.ones((1, *image_shape), dtype=op.in_dtype, device=device))
    return norm if float(norm.min()) >= -1e-6 * max(float(norm.max()), 0.0) else None


def backprojection_step(op: LinearOperator, y: torch.Tensor, x: torch.Tensor,
                        norm: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's final step ``x + A^T (y - A x) / A^T A 1``; pixels where A^T A 1 is below 1e-6 of its
    largest value (no ray through them) are not updated."""
    with torch.no_grad():
        if norm is None:
            norm = backprojection_normaliser(op, tuple(x.shape[1:]), x.device)
            if norm is None:
                raise ConfigError("diffusionmbir: the final back-projection step needs A^T A 1 >= 0 (a nonnegative "
                                  "operator such as CT); this operator's is not",
                                  fix="set final_consistency: false")
        top = float(norm.max())
        ok = norm > 1e-6 * top if top > 0 else torch.zeros_like(norm, dtype=torch.bool)
        step = op.adjoint(y - op.forward(x)) / torch.where(ok, norm, torch.ones_like(norm))
        return x + torch.where(ok, step, torch.zeros_like(step))


def _corrector_step(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, snr: float, n: int,
                    per_sample: bool) -> torch.Tensor:
    """score_sde's Langevin step size 2 (snr ||z|| / ||s||)^2 from per-slice norms averaged per sample (or over
    the batch), broadcast over the (samples * slices, C, H, W) batch."""
    gn = torch.linalg.vector_norm(s.reshape(s.shape[0], -1), dim=1)
    zn = torch.linalg.vector_norm(z.reshape(z.shape[0], -1), dim=1)
    if per_sample:
        gn, zn = gn.reshape(n, -1).mean(1), zn.reshape(n, -1).mean(1)
        eps = 2 * (snr * zn / gn.clamp_min(1e-30)) ** 2
        eps = eps.repeat_interleave(s.shape[0] // n)
    else:
        eps = (2 * (snr * zn.mean() / gn.mean().clamp_min(1e-30)) ** 2).expand(s.shape[0])
    eps = eps.reshape(-1, *([1] * (x.ndim - 1)))
    return x + eps * s + (2 * eps).sqrt() * z


@register_method(
    "diffusionmbir", defaults=MBIR_DEFAULTS, prior="slice",
    loader=SLICE_PRIOR_LOADER,
    paper="Chung, Ryu, McCann, Klasky, Ye: Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models, "
          "CVPR 2023", memory_copies=64, init="param")
def diffusionmbir(problem: ReconProblem, params: dict, prior: Prior,
                  generator: torch.Generator | None = None) -> ReconResult:
    """Samples (S, *image_shape) by DiffusionMBIR; see the module docstring for params."""
    p = check_params("diffusionmbir", params)
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    op = lay.op
    n_z = lay.image_shape[-3] if len(lay.image_shape) >= 3 else 1
    s_max, s_min, ztv, final = _check(p, prior, n_z)
    norm = backprojection_normaliser(op, lay.image_shape, problem.y.device) if final is not False else None
    if final is None:           # the reference's CT default, where the step is well defined
        final = p["dc"] == "hard" and problem.modality == "CT" and norm is not None
    elif final and norm is None:
        raise ConfigError("diffusionmbir: final_consistency needs A^T A 1 >= 0 (a nonnegative operator such as CT);"
                          " this operator's is not (complex or signed)", fix="set final_consistency: false")
    sigma_y = _noise_std(problem, p)
    sigmas = ve_sigmas(s_max, s_min, int(p["steps"]))
    if not 0.0 < float(p["start"]) <= 1.0:
        raise ConfigError(f"diffusionmbir: start must lie in (0, 1], got {p['start']}",
                          fix="start: 1 samples from noise; e.g. start: 0.2 with an init runs the last fifth")
    n_run = max(1, round(float(p["start"]) * int(p["steps"])))
    first = int(p["steps"]) - n_run
    start_image = warm_start_image("diffusionmbir", problem, p)
    den = lay.denoiser
    reset_nfe(den)
    with torch.no_grad():
        aty = op.adjoint(lay.y)
    w = absolute_dc_weights(op, aty, {**p, "ztv": ztv}, problem.adjoint_abs_max)
    scale2 = float(prior.scale) ** 2
    mask = None if lay.canvas.identity else lay.canvas.mask(problem.y.device)
    per_sample = p["snr_norm"] == "sample"
    snr = float(p["snr"])
    t_start = time.perf_counter()
    outs = []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, n_run, len(chunks))

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return lay.noise(shape, generator)

    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        state = ZTVState()
        x = float(sigmas[first]) * noise(shape)
        if start_image is not None:     # warm start: the starting image at the first step's noise level (VE)
            x = x + lay.batch(start_image.expand(n, *lay.image_shape))
        xi = lay.image(x, n)
        with torch.no_grad():
            for i in range(first, int(p["steps"])):
                sig, sig_next = sigmas[i], sigmas[i + 1]
                sig_t = sig.to(lay.dtype)
                # 1. predictor: reverse-diffusion step from sigma_i to sigma_{i+1}
                var = float(sig ** 2 - sig_next ** 2)
                score = (den(x, sig_t, cond) - x) / float(sig) ** 2
                x = x + var * score + math.sqrt(var) * noise(shape)
                # 2. corrector: one Langevin step at sigma_i
                score = (den(x, sig_t, cond) - x) / float(sig) ** 2
                x = _corrector_step(x, score, noise(shape), snr, n, per_sample)
                # 3. data consistency on the volume of the noisy state
                xi = lay.image(x, n)
                prox = sigma_y ** 2 * scale2 / float(sig) ** 2
                if ztv:
                    xi = ztv_admm_step(op, None, xi, state, w["rho"], w["ztv_lambda"], int(p["cg_iter"]),
                                       axis=-3, n_batch=1, tol=float(p["cg_tol"]), aty=aty, prox=prox)
                else:
                    xi = cg_normal(op, None, xi, int(p["cg_iter"]), prox, float(p["cg_tol"]), n_batch=1, aty=aty)
                xb = lay.batch(xi)
                x = xb if mask is None else torch.where(mask, x, xb)
                if report:
                    report(xi, sigma=float(sig))
        if final:
            xi = backprojection_step(op, lay.y, xi, norm)
        outs.append(xi)
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": "diffusionmbir", "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res), "sigma_max": s_max, "sigma_min": s_min, "ztv": ztv,
            "final_consistency": final, "noise_std": sigma_y}
    # NFE per sample chain = 2 per step run (predictor + corrector), as the paper counts it (4000 for 2000 steps)
    info["network_calls"] = int(getattr(den, "nfe", 2 * n_run))
    return ReconResult(samples=samples, nfe=2 * n_run, info=info)
