"""DDS: Decomposed Diffusion Sampler (Chung, Lee, Ye, ICLR 2024).

Follows ``HJ-harry/DDS@509b140`` (``solver_2d.py``, ``solver_3d.py``, ``utils.py:CG``; see
``docs/algorithms.md`` section 2). Per step of a uniform DDIM grid (default 50 steps):

1. x0_hat = D(x_t / sqrt(ab_t), sigma_t)  (Tweedie; eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t));
2. data consistency in the image domain, warm-started at from_prior(x0_hat): ``cg_iter`` (default 5)
   CG steps on ``(A^H A + lam I) x = A^H y + lam x0_hat`` (lam = 0: DDS noiseless; lam = 1/gamma: DDS's
   noisy variant), or, with ``ztv: true``, one ADMM iteration of min 1/2||Ax-y||^2 + ztv_lambda ||D_z x||_1
   with persistent (z, u) (DDS 3D CT);
3. x_{t'} = sqrt(ab') x0' + sqrt(1-ab') (eta z + sqrt(1-eta^2) eps_hat)  (DDS's eta, default 0.85), or the
   DDIM-paper eta with ``eta_convention: ddim``. The last step returns x0' itself.

Warm start (``init``, ``start``; Chung, Sim, Ye, "Come-Closer-Diffuse-Faster", CVPR 2022): with
``init: tv`` (any classical method of the modality, run with its defaults by the reconstruct step) and
``start: s < 1`` the chain starts at the step ``s`` of the way from the end of the grid, from the starting
image diffused forward to that noise level, and runs only the last ``round(s * steps)`` steps.

Departures, on purpose: the operator is the exact one (ASTRA/SigPy with matched adjoints), so CG is the
real CG; ``lam``, ``rho`` (fractions of ||A||^2) and ``ztv_lambda`` (a fraction of ||A^H y||_inf) are
dimensionless by default (``weights: relative``, :func:`medrecon.diffusion.dc.absolute_dc_weights`; DDS's
rho=10, lambda=0.04 are absolute for its own torch Radon, ``weights: absolute`` keeps that convention);
CG inner products are Hermitian (DDS: bilinear); samples are independent CG systems (and slices too
with ``cg_per_slice``); data consistency composes A with the prior's affine image map; the single-coil
MRI projection shortcut of DDS is not implemented (use CG, which subsumes it); slices of any size are padded
to the network's multiple with the background (:mod:`medrecon.diffusion.canvas`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from medrecon.diffusion.dc import ZTVState, absolute_dc_weights, cg_normal, ztv_admm_step
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

# rho and ztv_lambda (relative, see absolute_dc_weights): chosen with ztv on the real validation CT of
# config/real.yaml (benchmarks/real_sweep.py; 30 views): ztv_lambda 2e-5 / 1e-4 / 5e-4 / 7e-4 / 1e-3 / 2e-3 gave
# coronal PSNR 35.5 / 35.9 / 36.7 / 36.8 / 36.6 / 35.8 dB (4-8 samples), rho 0.004 over 0.001 and 0.02.
DDS_DEFAULTS: dict[str, Any] = {
    "steps": 50, "eta": 0.85, "eta_convention": "dds", "cg_iter": 5, "lam": 0.0, "cg_per_slice": False,
    "cg_tol": 1e-6, "ztv": False, "rho": 0.004, "ztv_lambda": 7e-4, "weights": "relative", "samples": 1,
    "sample_batch": None, "dtype": "float32", "init": None, "start": 1.0,
}


@register_method(
    "dds", defaults=DDS_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Chung, Lee, Ye: Decomposed Diffusion Sampler for Accelerating Large-Scale Inverse Problems, ICLR 2024",
    memory_copies=64, init="param")
def dds(problem: ReconProblem, params: dict, prior: Prior,
        generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by DDS; see the module docstring for params."""
    p = check_params("dds", params)
    if not 0.0 <= float(p["eta"]) <= 1.0:
        raise ConfigError(f"dds: eta must lie in [0, 1], got {p['eta']}", fix="DDS uses eta: 0.85")
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    op = lay.op
    if p["ztv"] and len(lay.image_shape) < 3:
        raise ConfigError("dds: ztv needs a volume (Z, Y, X); this problem has one slice",
                          fix="set ztv: false for 2D problems")
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]), float(p["start"]))
    start_image = warm_start_image("dds", problem, p)
    den = lay.denoiser
    reset_nfe(den)
    with torch.no_grad():
        aty = op.adjoint(lay.y)
    w = absolute_dc_weights(op, aty, p, problem.adjoint_abs_max)
    n_sys_dims = 1 + (len(lay.image_shape) - len(op.in_shape) if p["cg_per_slice"] else 0)
    t_start = time.perf_counter()
    outs = []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        state = ZTVState()
        x = lay.noise(shape, generator)
        if start_image is not None:     # CCDF: the starting image diffused forward to the first step's level
            x = diffuse(lay.batch(start_image.expand(n, *lay.image_shape)), sched.alpha_bar(pairs[0][0]), x)
        with torch.no_grad():
            for t, t_next in pairs:
                ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
                sigma = ((1 - ab) / ab).sqrt()
                x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                eps = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(lay.dtype)
                xi = lay.image(x0, n)
                if p["ztv"]:
                    xi = ztv_admm_step(op, None, xi, state, w["rho"], w["ztv_lambda"],
                                       int(p["cg_iter"]), axis=-3, n_batch=1, tol=float(p["cg_tol"]), aty=aty)
                else:
                    xi = cg_normal(op, None, xi, int(p["cg_iter"]), w["lam"], float(p["cg_tol"]),
                                   n_batch=n_sys_dims, aty=aty)
                x0 = lay.batch(xi)
                if report:
                    report(xi, t=int(t), sigma=float(sigma))
                noise = lay.noise(shape, generator) \
                    if t_next >= 0 else None
                x = ddim_step(x0, eps, ab, ab_next, float(p["eta"]), noise, p["eta_convention"])
        outs.append(lay.image(x, n))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": "dds", "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res)}
    # NFE = network evaluations along one sample's chain (one per step run), as the papers count it; the
    # batched calls it took (more when samples or slab groups are split into passes) are in info
    info["network_calls"] = int(getattr(den, "nfe", len(pairs)))
    return ReconResult(samples=samples, nfe=len(pairs), info=info)
