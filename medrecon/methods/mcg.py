"""MCG: Manifold Constrained Gradient (Chung, Sim, Ryu, Ye, NeurIPS 2022).

Follows ``HJ-harry/MCG_diffusion@d5bfd15``: the VP sampler of ``guided_diffusion/gaussian_diffusion.py``
(``p_sample_loop_progressive``, ``sample_method == "MCG"``) and the CT solver of ``controllable_generation.py``
(``get_pc_radon_MCG``). Per step t -> t' of the VP grid (default 1000 ancestral steps, as the reference):

1. x0_hat = D(x_t / sqrt(ab_t), sigma_t) (Tweedie), with autograd through the denoiser (as DPS,
   :mod:`medrecon.methods.dps`);
2. x' = ancestral DDPM step from x_t given x0_hat (:func:`~medrecon.diffusion.schedules.ddpm_step`);
3. manifold constrained gradient: x'' = x' - zeta grad_{x_t} ||y - A x0_hat|| (the non-squared norm, as both
   reference samplers; the paper writes the squared norm with a step alpha);
4. projection onto the noisy measurement set at level t': with y_{t'} = y + sigma' A z (z ~ N(0, I), the
   VE form of q(y_{t'} | y) = sqrt(ab') y + sqrt(1 - ab') A z), x_{t'} = x'' - lamb A^+ (A x'' - y_{t'}) in VE
   variables. For inpainting (the repository's mask A, A^+ = A^T) this is its
   ``x'' (1 - mask) + q_sample(y) mask``; the gradient's range part is overwritten, which is the repository's
   ``norm_grad * (1 - mask)``. The last step (sigma' = 0) projects onto A x = y itself.

A^+ without an SVD: CG from zero on the normal equations (:func:`medrecon.diffusion.dc.pinv_normal`,
``cg_iter`` iterations, the minimum-norm solution).

Departures, on purpose:

* The CT solver of the repository is a VE predictor-corrector sampler (2000 steps, NCSN++ score model) whose
  data step is a relaxed SART-like update ``lamb A^T (y - A x) / A^T A 1`` (lamb 1 -> 0.6) after a gradient of
  ``||A_FBP^+ (y - A x0_hat)||`` restricted to the unmeasured views, with the *noiseless* y (its
  ``measurement_noise`` flag is off). medrecon runs the paper's VP algorithm (the repository's VP sampler) on the
  slice prior for both CT and MRI, with the exact minimum-norm projection; ``lamb`` < 1 relaxes it.
* The noisy measurement is taken at the next level t' (paper, Algorithm 1); the VP code uses the current t.
* ``zeta`` is in the operator's units (as DPS's) and must be tuned per operator; the residual norm is per
  operator application (per slice for a per-slice operator). Measurement noise is not modelled: the final
  projection fits the noise (MCG targets noiseless problems).
* Slices of any size live on padded canvases (:class:`~medrecon.methods.sampling.SliceLayout`); the gradient is
  zero in the padding, which is null space and untouched by the projection.
"""

from __future__ import annotations

import time

import torch

from medrecon.diffusion.dc import pinv_normal
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddpm_step
from medrecon.errors import ConfigError
from medrecon.methods.sampling import DTYPES, SLICE_PRIOR_LOADER, SliceLayout, check_params, reset_nfe, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method


@register_method(
    "mcg", defaults={"steps": 1000, "zeta": 1.0, "lamb": 1.0, "cg_iter": 30, "cg_tol": 1e-6, "samples": 1,
                     "sample_batch": None, "dtype": "float32"},
    prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Chung, Sim, Ryu, Ye: Improving Diffusion Models for Inverse Problems using Manifold Constraints, "
          "NeurIPS 2022",
    memory_copies=128)
def mcg(problem: ReconProblem, params: dict, prior: Prior,
        generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by MCG; params: steps, zeta, lamb, cg_iter, cg_tol, samples, dtype."""
    p = check_params("mcg", params)
    if not 0.0 < float(p["lamb"]) <= 1.0:
        raise ConfigError(f"mcg: lamb must lie in (0, 1], got {p['lamb']}",
                          fix="lamb: 1 is the exact projection onto the measurement set")
    if float(p["zeta"]) < 0:
        raise ConfigError(f"mcg: zeta must be >= 0, got {p['zeta']}", fix="zeta: 0 turns the gradient off")
    if int(p["cg_iter"]) < 1:
        raise ConfigError(f"mcg: cg_iter must be >= 1, got {p['cg_iter']}",
                          fix="the projection needs CG iterations, e.g. cg_iter: 30")
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    op = lay.op
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]))
    den, zeta, lamb = lay.denoiser, float(p["zeta"]), float(p["lamb"])
    cg_iter, tol = int(p["cg_iter"]), float(p["cg_tol"])
    reset_nfe(den)
    with torch.no_grad():
        aty = op.adjoint(lay.y)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return lay.noise(shape, generator)

    t_start = time.perf_counter()
    outs, last_norm = [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        x = randn(shape)
        for t, t_next in pairs:
            ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
            sigma = ((1 - ab) / ab).sqrt()
            x = x.detach().requires_grad_(zeta > 0)
            with torch.set_grad_enabled(zeta > 0):          # zeta = 0: no graph through the network
                x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                xi = lay.image(x0, n)
                norms = lay.residual_norms(xi)
            grad = lay.canvas.zero_padding(torch.autograd.grad(norms.sum(), x)[0]) if zeta > 0 else 0.0
            with torch.no_grad():
                noise = randn(shape) if t_next >= 0 else None
                x = ddpm_step(x.detach(), x0.detach(), ab, ab_next, noise) - zeta * grad
                # projection onto {A v = y + sigma' A z} of the VE state v = x / sqrt(ab')
                sig_next = float(((1 - ab_next) / ab_next).sqrt())
                v = x / ab_next.sqrt().to(lay.dtype)
                rhs = op.normal(lay.image(v, n)) - aty
                if sig_next > 0:
                    rhs = rhs - sig_next * op.normal(lay.image_delta(randn(shape), n))
                v = v - lamb * lay.batch_delta(pinv_normal(op, rhs, cg_iter, tol, n_batch=1))
                x = (ab_next.sqrt() * v).to(lay.dtype)
            if report:
                report(xi.detach(), t=int(t), sigma=float(sigma))
        outs.append(lay.image(x.detach(), n))
        last_norm.append(norms.detach().reshape(-1))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": "mcg", "params": p, "time_s": time.perf_counter() - t_start,
            "final_x0_residual_norm_mean": float(torch.cat(last_norm).mean()),
            "final_residual_norm_mean": float(res)}
    return ReconResult(samples=samples, nfe=int(getattr(den, "nfe", len(pairs))), info=info)
