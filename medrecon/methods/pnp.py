"""Plug-and-play ADMM and RED with the diffusion slice prior's own denoiser D(x, sigma).

Two optimisation methods that use a Gaussian denoiser as their only image model:

* ``pnp_admm``: plug-and-play ADMM (Venkatakrishnan, Bouman, Wohlberg, GlobalSIP 2013) with a learned,
  noise-level-conditioned denoiser, optionally with a decreasing noise schedule and no dual variable (the
  half-quadratic splitting of DPIR: Zhang, Li, Zuo, Zhang, Van Gool, Timofte, TPAMI 2021, ``cszn/DPIR``).
* ``pnp_red``: regularisation by denoising (Romano, Elad, Milanfar, SIAM J. Imaging Sci. 2017, reference
  MATLAB code ``google/RED@bbc0275``: ``minimizers/RunFP.m``, ``RunSD.m``).

Why the diffusion prior's denoiser and no training kind of its own: the PnP rows of the PaDIS tables ([42]
PnP-ADMM, [46] PnP-RED) use learned CNN denoisers; the diffusion prior that the workflow already trains
(kind ``slice``, loaded like DDS) *is* a learned MMSE denoiser for every noise level sigma
(``D(x, sigma) = E[x0 | x0 + sigma n = x]``), so both methods run on it at a fixed or annealed sigma, and
the workflow trains nothing extra.

Everything is in the operator's image domain; ``D`` is applied through the prior's affine map and the slice
canvas (:class:`~medrecon.methods.sampling.SliceLayout`, so any slice size works), and ``sigma_d`` is in the
prior's (network) units, e.g. [-1, 1] for CT (image-domain level ``sigma_d / scale``).

PnP-ADMM, per iteration k (scaled form; ``x0`` = the ``init`` image, else the prior's background)::

    v = x0, u = 0
    x = argmin 1/2 ||A x - y||^2 + rho_k/2 ||x - (v - u)||^2     # cg_iter CG steps from v - u (cg_normal)
    v = D(x + u, sigma_k)
    u = u + x - v                                             # splitting: hqs keeps u = 0 (DPIR)
    return v

With ``ztv: true`` the x-update also carries DDS's 3D regulariser ``ztv_lambda ||D_z x||_1`` (finite
differences across slices), solved by one ADMM iteration of :func:`~medrecon.diffusion.dc.ztv_admm_step` per
PnP iteration (its split variable and dual carried over, as in DDS) with the PnP proximal term as its ``prox``:
the 2D denoiser regularises each slice, z-TV ties the slices together (the slice-by-slice denoiser alone leaves a
worse slice consistency than TV). ``ztv_rho`` is that ADMM's penalty, ``ztv_lambda`` the weight.

``sigma_k = sigma_d`` (fixed) or, with ``sigma_max``, geometric from sigma_max down to sigma_d over the
iterations (DPIR's log-spaced schedule), with ``rho_k = rho (sigma_d / sigma_k)^2`` (DPIR's
``rho_k ~ 1 / sigma_k^2``; equal to rho at the end). **Fixed point** (fixed sigma): for a Gaussian prior
N(mu, S) the MMSE denoiser is exactly the proximal map of ``sigma^2 (-log pi)``
(``mu + S (S + sigma^2 I)^-1 (z - mu) = prox``), so ADMM converges (convex problem, any rho > 0) to
``argmin 1/2 ||A x - y||^2 + rho sigma_img^2 (-log pi(x))``: the posterior mean of the Gaussian problem
with noise variance ``rho sigma_img^2``; it is the true posterior mean exactly when
``rho = s_y^2 / sigma_img^2`` (absolute weights). For a non-Gaussian prior the fixed point depends on
sigma_d and on the start (tests/methods/test_pnp.py).

RED: objective ``1/2 ||A x - y||^2 + lam/2 x^T (x - D(x, sigma))`` with gradient (RED's symmetric-Jacobian
assumptions) ``A^H (A x - y) + lam (x - D(x, sigma))``. ``solver: fixed_point`` (RED's RunFP)::

    x_{k+1} = argmin 1/2 ||A x - y||^2 + lam/2 ||x - D(x_k, sigma)||^2      # cg_iter CG steps from D(x_k)

``solver: gradient`` (RunSD): ``x <- x - mu (A^H (A x - y) + lam (x - D(x, sigma)))``, with
``mu = step / (||A||^2 + lam)``. **Fixed point**: by Tweedie ``x - D(x, sigma) = -sigma^2 grad log p_sigma(x)``,
so both solvers stop at a stationary point of ``1/2 ||A x - y||^2 - lam sigma_img^2 log p_sigma(x)``: the
MAP under the sigma-smoothed prior p_sigma; for a Gaussian prior, the posterior mean under the prior
N(mu, S + sigma^2 I) with noise variance ``lam sigma_img^2`` (exact; tested), i.e. the
Bayes weight is ``lam = s_y^2 / sigma_img^2``.

Weights: ``rho`` and ``lam`` are fractions of ||A||^2 by default (``weights: relative``,
:func:`medrecon.diffusion.dc.absolute_dc_weights`, as DDS), ``weights: absolute`` takes them in the
operator's units. Deterministic: ``samples`` is 1 (the key exists because every sampler has it); NFE =
iterations (one denoiser call each).

Departures, on purpose: the x-update (PnP-ADMM) and RED's linear system are solved by early-stopped CG
warm-started at the proximal point (v - u, resp. D(x_k)) rather than exactly (Venkatakrishnan) or by RED's
inner minimal-residual steps from the previous x; no clipping to the image range (RunFP clips to [0, 255]);
the noise schedule of the annealed variant is geometric between ``sigma_max`` and ``sigma_d`` (DPIR: from
49/255 to the measurement noise level) and ADMM keeps its dual unless ``splitting: hqs``; the denoiser is the
diffusion prior's, not a separately trained CNN (see above); RED's ADMM solver and Hu et al.'s monotone
variant are not implemented.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from medrecon.diffusion.canvas import prior_background
from medrecon.diffusion.dc import ZTVState, absolute_dc_weights, cg_normal, operator_norm_sq, ztv_admm_step
from medrecon.diffusion.denoiser import Prior
from medrecon.errors import ConfigError
from medrecon.methods.sampling import DTYPES, SLICE_PRIOR_LOADER, SliceLayout, check_params, init_image, reset_nfe
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

# Defaults chosen on 4 slices of a held-out 64 x 64 chest phantom (seed 200, 5 mm pixels), parallel beam, Poisson
# noise I0 = 1e5, with the shipped phantom slice prior data/priors/ct_slice.pt (PSNR in the [-1000, 1000] HU window;
# FBP 22.96 dB at 20 views, 16.72 at 8). pnp_admm, 30 iterations, 20 views: rho 0.002 / 0.005 / 0.01 / 0.05 / 0.2
# -> 32.63 / 32.61 / 32.44 / 29.62 / 26.32 dB (sigma_d 0.05); sigma_d 0.02 / 0.1 -> 30.24 / 27.88 (rho 0.05);
# annealed from sigma_max 0.5 -> 32.44 (rho 0.01), hqs 28.58 (rho 0.05); 8 views: rho 0.005 / 0.02 -> 25.81 / 25.61.
# At rho 0.05 the iterates keep moving (relative change 5% per iteration: the learned denoiser is not
# non-expansive); at rho <= 0.01 they settle (< 0.1%). pnp_red (fixed point, 50 iterations), 20 views: lam 0.05 /
# 0.01 / 0.005 / 0.002 -> 28.72 / 30.32 / 30.74 / 30.97 dB at sigma_d 0.05; sigma_d 0.03 with lam 0.01 / 0.005 ->
# 31.06 / 31.25, sigma_d 0.02 lam 0.002 -> 31.32; 8 views (sigma_d 0.03): lam 0.005 / 0.01 -> 25.16 / 25.13. Not
# tuned on MR (no phantom MR slice prior is shipped) or on real anatomy.
PNP_ADMM_DEFAULTS: dict[str, Any] = {
    "iterations": 30, "sigma_d": 0.05, "sigma_max": None, "splitting": "admm", "rho": 0.005, "cg_iter": 10,
    "cg_tol": 1e-6, "weights": "relative", "samples": 1, "dtype": "float32", "init": None,
    # 3D consistency: z-TV in the x-update (DDS's z-TV ADMM step with PnP's proximal term; relative weights
    # as DDS's: ztv_rho a fraction of ||A||^2, ztv_lambda of ||A^H y||_inf)
    "ztv": False, "ztv_rho": 0.004, "ztv_lambda": 7e-4,
}
PNP_RED_DEFAULTS: dict[str, Any] = {
    "iterations": 50, "sigma_d": 0.03, "lam": 0.005, "solver": "fixed_point", "step": 1.0, "cg_iter": 10,
    "cg_tol": 1e-6, "weights": "relative", "samples": 1, "dtype": "float32", "init": None,
}


class _Setup:
    """What both methods share: checked params, layout, A^H y, the start and the image-domain denoiser."""

    def __init__(self, name: str, problem: ReconProblem, params: dict, prior: Prior) -> None:
        p = check_params(name, params)
        if int(p["samples"]) != 1:
            raise ConfigError(f"{name}: samples must be 1, got {p['samples']} (the method is deterministic)",
                              fix="set samples: 1")
        if int(p["iterations"]) < 1:
            raise ConfigError(f"{name}: iterations must be >= 1, got {p['iterations']}", fix="e.g. iterations: 30")
        if not float(p["sigma_d"]) > 0:
            raise ConfigError(f"{name}: sigma_d must be > 0, got {p['sigma_d']}",
                              fix="give the denoiser's noise level in the prior's units, e.g. sigma_d: 0.05")
        if int(p["cg_iter"]) < 0:
            raise ConfigError(f"{name}: cg_iter must be >= 0, got {p['cg_iter']}", fix="e.g. cg_iter: 10")
        self.name, self.p, self.prior, self.problem = name, p, prior, problem
        self.lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
        self.op = self.lay.op
        with torch.no_grad():
            self.aty = self.op.adjoint(self.lay.y)
        self.den = self.lay.denoiser
        self.cond = prior.batch_cond(1)
        reset_nfe(self.den)

    def weight(self, key: str) -> float:
        """``key`` (lam or rho) in the operator's units (relative: times ||A||^2)."""
        v = float(self.p[key])
        if v < 0:
            raise ConfigError(f"{self.name}: {key} must be >= 0, got {v}", fix=f"e.g. {key}: 0.005")
        return absolute_dc_weights(self.op, self.aty, {"lam": v, "weights": self.p["weights"]})["lam"]

    def start(self) -> torch.Tensor:
        """(1, *image_shape): the ``init`` image (computed by the reconstruct step), else the prior's background
        (empty space), from which the first data step starts."""
        x = init_image(self.name, self.problem, self.p)
        if x is not None:
            return x.expand(*self.lay.image_shape).reshape(1, *self.lay.image_shape).clone()
        bg = torch.full(self.lay.batch_shape(1), prior_background(self.prior), dtype=self.lay.dtype,
                        device=self.lay.y.device)
        return self.lay.image(bg, 1)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x, sigma) in the image domain, for x (1, *image_shape); sigma in the prior's units."""
        s = torch.tensor(sigma, dtype=self.lay.dtype, device=x.device)
        return self.lay.image(self.den(self.lay.batch(x), s, self.cond), 1)

    def result(self, x: torch.Tensor, t0: float, n_it: int, extra: dict[str, Any]) -> ReconResult:
        with torch.no_grad():
            res = self.lay.residual_norms(x).mean()
        info = {"method": self.name, "params": self.p, "time_s": time.perf_counter() - t0,
                "final_residual_norm_mean": float(res), **extra,
                "network_calls": int(getattr(self.den, "nfe", n_it))}
        return ReconResult(samples=x, nfe=n_it, info=info)


def _ztv_weights(s: _Setup) -> dict[str, float] | None:
    """PnP-ADMM's z-TV weights in the operator's units, or None without ``ztv``. Like DDS's 3D step, relative
    weights scale with ||A||^2 and with the whole volume's ||A^H y||_inf (slab-wise runs pass it)."""
    p = s.p
    if not p["ztv"]:
        return None
    if len(s.lay.image_shape) < 3 or s.lay.image_shape[-3] < 2:
        raise ConfigError("pnp_admm: ztv needs two slices or more (Z, Y, X); this problem has one",
                          fix="set ztv: false for 2D problems")
    if float(p["ztv_rho"]) <= 0 or float(p["ztv_lambda"]) < 0:
        raise ConfigError(f"pnp_admm: ztv_rho must be > 0 and ztv_lambda >= 0, got {p['ztv_rho']} and "
                          f"{p['ztv_lambda']}", fix="e.g. ztv_rho: 0.004, ztv_lambda: 7e-4 (relative)")
    return absolute_dc_weights(s.op, s.aty, {"rho": p["ztv_rho"], "ztv_lambda": p["ztv_lambda"], "ztv": True,
                                             "weights": p["weights"]}, s.problem.adjoint_abs_max)


def _sigmas(p: dict) -> list[float]:
    """Fixed sigma_d, or geometric from sigma_max down to sigma_d (DPIR's log-spaced schedule)."""
    n, lo = int(p["iterations"]), float(p["sigma_d"])
    if p["sigma_max"] is None:
        return [lo] * n
    hi = float(p["sigma_max"])
    if hi < lo:
        raise ConfigError(f"pnp_admm: sigma_max {hi} is below sigma_d {lo}",
                          fix="set sigma_max above sigma_d (annealed from sigma_max to sigma_d), or null (fixed)")
    if n == 1:
        return [lo]
    return [math.exp(math.log(hi) + (math.log(lo) - math.log(hi)) * k / (n - 1)) for k in range(n)]


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(new).clamp_min(1e-30))


@register_method(
    "pnp_admm", defaults=PNP_ADMM_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER, init="param", memory_copies=64,
    paper="Venkatakrishnan, Bouman, Wohlberg: Plug-and-Play Priors for Model Based Reconstruction, GlobalSIP "
          "2013 (learned denoiser: Zhang et al., DPIR, TPAMI 2021)")
def pnp_admm(problem: ReconProblem, params: dict, prior: Prior,
             generator: torch.Generator | None = None) -> ReconResult:
    """PnP-ADMM (or DPIR's HQS) with the diffusion prior's denoiser; see the module docstring."""
    s = _Setup("pnp_admm", problem, params, prior)
    p = s.p
    if p["splitting"] not in ("admm", "hqs"):
        raise ConfigError(f"pnp_admm: splitting must be admm or hqs, got {p['splitting']!r}",
                          fix="admm (scaled dual, Venkatakrishnan) or hqs (no dual, DPIR)")
    sigmas = _sigmas(p)
    rho = s.weight("rho")
    if rho <= 0:
        raise ConfigError("pnp_admm: rho must be > 0", fix="e.g. rho: 0.005 (a fraction of ||A||^2)")
    ztv = _ztv_weights(s)
    state = ZTVState()
    t0 = time.perf_counter()
    report = StepReporter(problem.progress, len(sigmas))
    v = s.start()
    u = torch.zeros_like(v)
    x = v
    change = float("nan")
    with torch.no_grad():
        for sigma in sigmas:
            rho_k = rho * (float(p["sigma_d"]) / sigma) ** 2
            if ztv is None:
                x = cg_normal(s.op, None, v - u, int(p["cg_iter"]), rho_k, float(p["cg_tol"]), n_batch=1,
                              aty=s.aty)
            else:   # argmin 1/2||Ax - y||^2 + ztv_lambda ||D_z x||_1 + rho_k/2 ||x - (v - u)||^2, one ADMM step
                x = ztv_admm_step(s.op, None, v - u, state, ztv["rho"], ztv["ztv_lambda"], int(p["cg_iter"]),
                                  axis=-3, n_batch=1, tol=float(p["cg_tol"]), aty=s.aty, prox=rho_k)
            v_new = s.denoise(x + u, sigma)
            change = _relative_change(v_new, v)
            v = v_new
            if p["splitting"] == "admm":
                u = u + x - v
            if report:
                report(v, sigma=sigma, rho=rho_k)
    primal = _relative_change(x, v)
    return s.result(v, t0, len(sigmas), {"rho_abs": rho, "final_change": change, "final_primal_residual": primal})


@register_method(
    "pnp_red", defaults=PNP_RED_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER, init="param", memory_copies=64,
    paper="Romano, Elad, Milanfar: The Little Engine that Could: Regularization by Denoising (RED), SIAM J. "
          "Imaging Sciences 2017")
def pnp_red(problem: ReconProblem, params: dict, prior: Prior,
            generator: torch.Generator | None = None) -> ReconResult:
    """RED (fixed-point or gradient solver) with the diffusion prior's denoiser; see the module docstring."""
    s = _Setup("pnp_red", problem, params, prior)
    p = s.p
    if p["solver"] not in ("fixed_point", "gradient"):
        raise ConfigError(f"pnp_red: solver must be fixed_point or gradient, got {p['solver']!r}",
                          fix="fixed_point (RED's RunFP, CG per iteration) or gradient (RunSD)")
    lam = s.weight("lam")
    sigma = float(p["sigma_d"])
    n_it = int(p["iterations"])
    mu = 0.0
    if p["solver"] == "gradient":
        step = float(p["step"])
        if not 0 < step < 2:
            raise ConfigError(f"pnp_red: step must lie in (0, 2), got {step}",
                              fix="step is a fraction of 1 / (||A||^2 + lam); 1.0 is safe")
        mu = step / (operator_norm_sq(s.op, s.aty.device) + lam)
    elif lam <= 0:
        raise ConfigError("pnp_red: the fixed-point solver needs lam > 0",
                          fix="set lam > 0 (e.g. 0.005, a fraction of ||A||^2), or solver: gradient")
    t0 = time.perf_counter()
    report = StepReporter(problem.progress, n_it)
    x = s.start()
    change = float("nan")
    with torch.no_grad():
        for _ in range(n_it):
            d = s.denoise(x, sigma)
            if p["solver"] == "fixed_point":
                x_new = cg_normal(s.op, None, d, int(p["cg_iter"]), lam, float(p["cg_tol"]), n_batch=1, aty=s.aty)
            else:
                x_new = x - mu * (s.op.normal(x) - s.aty + lam * (x - d))
            change = _relative_change(x_new, x)
            x = x_new
            if report:
                report(x, sigma=sigma)
    return s.result(x, t0, n_it, {"lam_abs": lam, "step_abs": mu, "final_change": change})
