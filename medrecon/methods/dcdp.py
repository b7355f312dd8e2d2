"""DCDP: Decoupled Data Consistency with Diffusion Purification (Li, Kwon, Liang, Alkhouri, Ravishankar, Qu,
"Decoupled Data Consistency with Diffusion Purification for Image Restoration", 2024).

Follows ``Morefre/Decoupled-Data-Consistency-with-Diffusion-Purification-for-Image-Restoration@fa89ad3``
(``dcdp.py``: ``Purification_Schedule``, ``CSGM_Solver_Pixel_Space``, ``Diffusion_Purified_CSGM``; the
latent version ``DCDP-LDM/dcdp.py`` with ``CSGM_Solver_Latent_Space`` and ``--data_consistency_type``;
``docs/algorithms.md`` section 10). The reference has no CT or MRI experiment; this is medrecon's, built from it.
Two registered methods, because a registration has one prior kind:

* ``dcdp``: pixel-space diffusion prior (kind ``slice``, loaded as for DDS);
* ``dcdp_latent``: latent diffusion prior + its autoencoder (kind ``latent``, loaded as for ReSample), with
  the reference's two data-consistency spaces (``dc_space: pixel | latent``).

The algorithm, per outer iteration k = 1..K (``steps``: the reference's ``total_num_iterations``, K = 10),
from a start x^(0) (the zero image, or the ``init`` method's result):

1. **Data consistency, decoupled from the diffusion**: ``dc_iter`` iterations on
   ``1/2 ||A x - y||^2 + lam/2 ||x - v_{k-1}||^2`` warm-started at the last purified image v_{k-1}
   (x^(0) at k = 1). ``dc: cg`` (default): conjugate gradients on ``(A^H A + lam I) x = A^H y + lam v``
   (:func:`medrecon.diffusion.dc.cg_normal`, an early-stopped Krylov solve); ``dc: gd``: the reference's
   solver, heavy-ball gradient descent (SGD with ``momentum`` 0.9) with step ``step / (||A||^2 + lam)``.
   ``lam = 0`` is the reference as shipped (its ``use_weight_decay`` is off in every config): early stopping
   is then the only tie to the prior; ``lam > 0`` is the slides' half-quadratic-splitting proximal term
   ``mu ||x - v||^2`` with ``lam = 2 mu``.
2. **Diffusion purification**: t_k from the purification schedule (``schedule: linear`` from ``t_start``
   down to ``t_end``, or ``constant``; reference T0 = 400, T_end = 0, a final 0 becomes 1), the estimate
   diffused forward to VP index ``t_k - 1`` (``x_t = sqrt(ab) x + sqrt(1 - ab) z``), then either
   ``purification: ddim``: DDIM (``eta``, reference 0 = deterministic) over ``min(ddim_steps, t_k)``
   timesteps (reference 20) evenly spaced in [0, t_k - 1] of the prior's own 1000-step schedule, down to
   x0; or ``purification: tweedie``: one Tweedie step ``x0 = D(x_t)`` (the reference's fast variant).
   In ``dcdp_latent`` the purification runs on latents: ``dc_space: pixel`` fits the decoded image and
   re-encodes it; ``dc_space: latent`` fits ``z`` through the decoder (Adam, below) and re-encodes
   ``encode(decode(z))`` before purifying, both as the reference.

The output is the last purified image (the reference returns it); ``output: consistent`` returns the last
data-consistency iterate instead (the reference's "before purification" number, which it reports as better
for noiseless data). DCDP is an optimiser, not a posterior sampler: with ``lam = 0`` and an invertible A
it returns (near) the least-squares point whatever the noise (tests/methods/test_dcdp.py measures it);
several ``samples`` differ only through the purification noise.

Choices and departures, on purpose:

* **Step sizes are dimensionless.** The reference's SGD learning rates (1e3-1e5) are for a *mean*-reduced
  MSE on its own operators; here ``step`` is a fraction of ``1 / (||A||^2 + lam)`` (power iteration,
  :func:`~medrecon.diffusion.dc.operator_norm_sq`) and ``lam`` (``weights: relative``, as DDS) a fraction of
  ||A||^2, so one value means the same on any geometry. CG (the default) is step-free and needs far fewer
  iterations than the reference's 100 SGD steps, hence ``dc_iter`` 10 (not tuned on real data).
* **Start.** The reference starts from 0 in its network domain (mid-grey); medrecon starts from the zero
  *image* (air for CT, no signal for MR), or from a classical reconstruction (``init``, a warm start as DDS's).
  ``dc_space: latent`` starts from N(0, I) latents, as the reference, or from the encoded ``init``.
* **Latent-space data consistency uses Adam** (:func:`medrecon.methods.resample.minimise_mse`, ``latent_lr``,
  ``latent_iters``), as the reference's ``CSGM_Solver_Latent_Space`` default optimiser, not the SGD of its
  run script (its learning rate depends on the operator's scale), and it stops each slice at the noise level
  (``noise_stop * noise_std^2``, the discrepancy principle, as ReSample) or ``stop_mse``.
* The DDIM grid inside [0, t_k) is ``round(linspace(t_k - 1, 0, n))``, the reference's respacing (guided
  diffusion's ``space_timesteps``), except at t_k = 1: the reference then builds its chain for t = 2 and
  starts denoising at index 1 while the noise was added at index 0; medrecon denoises at index 0, the level
  of the noise (so its last purification perturbs by sigma 0.010 rather than 0.015). The reference's
  ``clip_denoised`` (x0 clamped to [-1, 1]) is the prior's business here (``EpsilonDenoiser(clip=...)``),
  off by default.
* Inner products are Hermitian (complex MR); samples are independent CG systems; the operator is the exact
  ASTRA/SigPy one; slices of any size are centred on canvases padded with the background
  (:class:`~medrecon.methods.sampling.SliceLayout`), data consistency sees the crop.

NFE = network evaluations along one chain: sum over k of the DDIM steps (e.g. 9 x 20 + 1 for the reference's
K = 10, T0 = 400), or K for Tweedie purification.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from medrecon.diffusion.dc import absolute_dc_weights, cg_normal, operator_norm_sq
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.latent import LatentPrior, randn_like_gen
from medrecon.diffusion.schedules import VPSchedule, ddim_step, diffuse
from medrecon.errors import ConfigError
from medrecon.methods.resample import minimise_mse
from medrecon.methods.sampling import (
    DTYPES,
    SLICE_PRIOR_LOADER,
    SliceLayout,
    check_params,
    init_image,
    reset_nfe,
    sample_chunks,
)
from medrecon.physics.operator import LinearOperator
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

DCDP_DEFAULTS: dict[str, Any] = {
    "steps": 10,                # outer iterations K (reference total_num_iterations: 10 for deblurring, SR)
    "t_start": 400,             # purification timestep of the first iteration (reference T0 = 400)
    "t_end": 0,                 # ... and of the last (linear schedule; 0 becomes 1, as the reference)
    "schedule": "linear",       # linear | constant (t_start every iteration)
    "purification": "ddim",     # ddim (reference "full_ddim") | tweedie (one-step, the fast variant)
    "ddim_steps": 20,           # DDIM steps per purification (at most t_k)
    "eta": 0.0,                 # DDIM eta of the purification (reference 0: the probability-flow ODE)
    "dc": "cg",                 # cg (early-stopped CG) | gd (heavy-ball gradient descent, the reference's SGD)
    "dc_iter": 10,              # data-consistency iterations per outer iteration (reference SGD: 100)
    "step": 1.0,                # gd: step as a fraction of 1 / (||A||^2 + lam)
    "momentum": 0.9,            # gd: heavy-ball momentum (reference 0.9)
    "lam": 0.0,                 # proximal weight to the last purified image (reference: off)
    "weights": "relative",      # lam as a fraction of ||A||^2 (relative) or in the operator's units (absolute)
    "cg_tol": 1e-6,
    "output": "purified",       # purified (reference) | consistent (the last data-consistency iterate)
    "samples": 1, "sample_batch": None, "dtype": "float32", "init": None,
}
DCDP_LATENT_DEFAULTS: dict[str, Any] = {
    **DCDP_DEFAULTS,
    "dc_space": "pixel",        # pixel (fit the decoded image, re-encode) | latent (fit z through the decoder)
    "latent_lr": 1e-2,          # dc_space latent: Adam learning rate on the (unit-variance) latents
    "latent_iters": 100,        # dc_space latent: Adam iterations per outer iteration (reference: 100)
    "stop_mse": 0.0,            # dc_space latent: absolute MSE stop per slice
    "noise_stop": 1.0,          # dc_space latent: stop at noise_stop * noise_std^2 (0 = off)
}
_CHOICES = {"schedule": ("linear", "constant"), "purification": ("ddim", "tweedie"), "dc": ("cg", "gd"),
            "output": ("purified", "consistent"), "dc_space": ("pixel", "latent")}


def purification_timesteps(iterations: int, t_start: int, t_end: int = 0, schedule: str = "linear") -> list[int]:
    """The reference's ``Purification_Schedule``: ``linear`` goes from ``t_start`` down to ``t_end`` in
    ``iterations`` rounded steps, ``constant`` repeats ``t_start``; a 0 becomes 1 (the least noise)."""
    if schedule == "constant":
        ts = [int(t_start)] * int(iterations)
    else:
        frac = torch.linspace(0, 1, int(iterations), dtype=torch.float64)
        ts = [round(float(f) * (t_start - t_end) + 1e-6) + int(t_end) for f in frac.flip(0)]
    return [max(1, t) for t in ts]


def purification_pairs(t_k: int, ddim_steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs of the DDIM chain of one purification: min(ddim_steps, t_k) timesteps evenly spaced
    in [0, t_k - 1], descending from t_k - 1 (the level the estimate is diffused to); the last t_next is -1."""
    n = min(int(ddim_steps), int(t_k))
    grid = [round(float(v)) for v in torch.linspace(t_k - 1, 0, n, dtype=torch.float64)] if n > 1 \
        else [int(t_k) - 1]
    return list(zip(grid, [*grid[1:], -1], strict=True))


def _params(method: str, params: dict | None, prior: Any, schedule_steps: int | None = None) -> dict[str, Any]:
    p = check_params(method, params)
    for key, options in _CHOICES.items():
        if key in p and p[key] not in options:
            raise ConfigError(f"{method}: {key} must be one of {list(options)}, got {p[key]!r}",
                              fix=f"use {key}: {options[0]} (as the reference)")
    ints = ("steps", "ddim_steps", "t_start") + (("latent_iters",) if "latent_iters" in p else ())
    if any(int(p[k]) < 1 for k in ints) or int(p["dc_iter"]) < 0 or int(p["t_end"]) < 0:
        raise ConfigError(f"{method}: {list(ints)} must be >= 1 and dc_iter, t_end >= 0",
                          fix="the reference uses steps 10, t_start 400, t_end 0, ddim_steps 20")
    if int(p["t_end"]) > int(p["t_start"]) or int(p["steps"]) > int(p["t_start"]):
        raise ConfigError(f"{method}: needs t_end <= t_start and steps <= t_start, got t_start "
                          f"{p['t_start']}, t_end {p['t_end']}, steps {p['steps']}",
                          fix="the reference uses t_start 400, t_end 0, steps 10")
    if schedule_steps is not None and int(p["t_start"]) > schedule_steps:
        raise ConfigError(f"{method}: t_start {p['t_start']} exceeds the prior's {schedule_steps} training steps",
                          fix=f"set t_start <= {schedule_steps}")
    if not 0.0 <= float(p["eta"]) <= 1.0 or not 0.0 <= float(p["momentum"]) < 1.0:
        raise ConfigError(f"{method}: eta must lie in [0, 1] and momentum in [0, 1), got {p['eta']}, "
                          f"{p['momentum']}", fix="the reference uses eta 0 and momentum 0.9")
    if float(p["step"]) <= 0 or float(p["lam"]) < 0 or float(p.get("latent_lr", 1.0)) <= 0:
        raise ConfigError(f"{method}: step and latent_lr must be > 0 and lam >= 0",
                          fix="use step: 1.0, lam: 0 (the reference: no proximal term)")
    return p


class _DataConsistency:
    """Step 1 in the image domain: ``dc_iter`` CG or heavy-ball iterations on 1/2||Ax-y||^2 + lam/2||x-v||^2
    from v. Operator constants (A^H y, the absolute lam, ||A||^2) are computed once."""

    def __init__(self, op: LinearOperator, y: torch.Tensor, p: dict[str, Any], adjoint_abs_max: float | None):
        self.op, self.p = op, p
        with torch.no_grad():
            self.aty = op.adjoint(y)
        self.lam = absolute_dc_weights(op, self.aty, {"lam": p["lam"], "weights": p["weights"]},
                                       adjoint_abs_max)["lam"]
        self.lr = 0.0
        if p["dc"] == "gd" and int(p["dc_iter"]) > 0:
            self.lr = float(p["step"]) / (operator_norm_sq(op, self.aty.device) + self.lam)

    @torch.no_grad()
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        n_iter = int(self.p["dc_iter"])
        if self.p["dc"] == "cg":
            return cg_normal(self.op, None, v, n_iter, self.lam, float(self.p["cg_tol"]), n_batch=1, aty=self.aty)
        x, buf, mom = v.clone(), None, float(self.p["momentum"])
        for _ in range(n_iter):   # torch.optim.SGD's heavy ball: buf = m buf + g; x -= lr buf
            g = self.op.normal(x) - self.aty
            if self.lam:
                g = g + self.lam * (x - v)
            buf = g if buf is None else mom * buf + g
            x = x - self.lr * buf
        return x


def _purify(den: Any, sched: VPSchedule, x0: torch.Tensor, t_k: int, p: dict[str, Any], cond: Any,
            generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """Step 2 on a network batch (prior domain): diffuse to index t_k - 1, then DDIM or Tweedie back to x0.
    Returns the purified batch and the network evaluations of one chain."""
    dt = x0.dtype
    ab0 = sched.alpha_bar(int(t_k) - 1)
    x = diffuse(x0, ab0, randn_like_gen(x0, generator))
    if p["purification"] == "tweedie":
        return den(x / ab0.sqrt().to(dt), ((1 - ab0) / ab0).sqrt().to(dt), cond), 1
    pairs = purification_pairs(t_k, int(p["ddim_steps"]))
    eta = float(p["eta"])
    for t, t_next in pairs:
        ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
        x0_hat = den(x / ab.sqrt().to(dt), ((1 - ab) / ab).sqrt().to(dt), cond)
        eps = ((x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()).to(dt)
        noise = randn_like_gen(x, generator) if eta > 0 and t_next >= 0 else None
        x = ddim_step(x0_hat, eps, ab, ab_next, eta, noise)
    return x, len(pairs)


def _start_image(method: str, problem: ReconProblem, p: dict[str, Any], n: int, shape: tuple[int, ...]
                 ) -> torch.Tensor | None:
    """x^(0) for n samples: the ``init`` method's image when one is named, else None (the caller's default)."""
    x = init_image(method, problem, p)
    return None if x is None else x.expand(n, *shape).clone()


def _finish(method: str, p: dict[str, Any], lay: SliceLayout, outs: list[torch.Tensor], dc_last: list[torch.Tensor],
            timesteps: list[int], nfe: int, den: Any, t_start: float, **extra: Any) -> ReconResult:
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
        res_dc = lay.residual_norms(torch.cat(dc_last)).mean()
    info = {"method": method, "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res), "dc_residual_norm_mean": float(res_dc),
            "timesteps": timesteps, "network_calls": int(getattr(den, "nfe", nfe)), **extra}
    return ReconResult(samples=samples, nfe=nfe, info=info)


@register_method(
    "dcdp", defaults=DCDP_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Li, Kwon, Liang, Alkhouri, Ravishankar, Qu: Decoupled Data Consistency with Diffusion Purification for "
          "Image Restoration, arXiv 2403.06054, 2024", memory_copies=64, init="param")
def dcdp(problem: ReconProblem, params: dict, prior: Prior,
         generator: torch.Generator | None = None) -> ReconResult:
    """DCDP with a pixel-space prior: (S, *image_shape) estimates; see the module docstring for params."""
    p = _params("dcdp", params, prior)
    if isinstance(prior, LatentPrior):
        raise ConfigError("dcdp needs a pixel-space (slice) prior, got a latent prior",
                          fix="use dcdp_latent for a latent prior, or train kind 'slice' for dcdp")
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    sched = prior.vp_schedule()
    p = _params("dcdp", p, prior, sched.num_train_steps)
    den = lay.denoiser
    reset_nfe(den)
    dc = _DataConsistency(lay.op, lay.y, p, problem.adjoint_abs_max)
    timesteps = purification_timesteps(int(p["steps"]), int(p["t_start"]), int(p["t_end"]), p["schedule"])
    t0 = time.perf_counter()
    outs, dc_last, nfe = [], [], 0
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(timesteps), len(chunks))
    for n in chunks:
        cond = prior.batch_cond(n)
        v = _start_image("dcdp", problem, p, n, lay.image_shape)
        if v is None:
            v = torch.zeros((n, *lay.image_shape), dtype=lay.op.in_dtype, device=problem.y.device)
        nfe = 0
        with torch.no_grad():
            for t_k in timesteps:
                x = dc(v)
                z, calls = _purify(den, sched, lay.batch(x), t_k, p, cond, generator)
                nfe += calls
                v = lay.image(z, n)
                if report:
                    report(v, t=int(t_k) - 1, sigma=float(sched.sigma_of_t(int(t_k) - 1)))
        outs.append(x if p["output"] == "consistent" else v)
        dc_last.append(x)
    return _finish("dcdp", p, lay, outs, dc_last, timesteps, nfe, den, t0)


@register_method(
    "dcdp_latent", defaults=DCDP_LATENT_DEFAULTS, prior="latent",
    loader="medrecon.diffusion.latent:load_latent_prior",
    paper="Li, Kwon, Liang, Alkhouri, Ravishankar, Qu: Decoupled Data Consistency with Diffusion Purification for "
          "Image Restoration (latent, DCDP-LDM), arXiv 2403.06054, 2024", memory_copies=128, init="param")
def dcdp_latent(problem: ReconProblem, params: dict, prior: LatentPrior,
                generator: torch.Generator | None = None) -> ReconResult:
    """DCDP with a latent prior (purification on latents); see the module docstring for params."""
    p = _params("dcdp_latent", params, prior)
    if not isinstance(prior, LatentPrior):
        raise ConfigError(f"dcdp_latent needs a latent prior (an autoencoder and a latent diffusion checkpoint), "
                          f"got {type(prior).__name__}",
                          fix="train kind 'autoencoder' then kind 'latent' (loaded by "
                              "medrecon.diffusion.latent.load_latent_prior), or use dcdp with a slice prior")
    from medrecon.diffusion.canvas import network_multiple

    codec, den, sched = prior.codec, prior.denoiser, prior.schedule
    p = _params("dcdp_latent", p, prior, sched.num_train_steps)
    lay = SliceLayout(problem, prior.pixel_prior(), DTYPES[p["dtype"]],
                      multiple=codec.factor * network_multiple(den))
    cz, h, w = codec.latent_shape(*lay.canvas.shape, path=problem.meta.get("path"))
    reset_nfe(den)
    dc = _DataConsistency(lay.op, lay.y, p, problem.adjoint_abs_max)
    m_per_app = math.prod(lay.op.out_shape)
    threshold = max(float(p["stop_mse"]), float(p["noise_stop"]) * float(problem.noise_std or 0.0) ** 2)
    timesteps = purification_timesteps(int(p["steps"]), int(p["t_start"]), int(p["t_end"]), p["schedule"])
    t0 = time.perf_counter()
    outs, dc_last, nfe, latent_its = [], [], 0, 0
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(timesteps), len(chunks))

    def encode(x_img: torch.Tensor) -> torch.Tensor:      # image -> latent (slice on a background canvas)
        return codec.encode(lay.batch(x_img))

    def decode(z: torch.Tensor, n: int) -> torch.Tensor:  # latent -> image (the crop of the decoded canvas)
        return lay.image(codec.decode(z), n)

    for n in chunks:
        start = _start_image("dcdp_latent", problem, p, n, lay.image_shape)
        if p["dc_space"] == "pixel":
            x = start if start is not None else \
                torch.zeros((n, *lay.image_shape), dtype=lay.op.in_dtype, device=problem.y.device)
            z = None
        else:
            with torch.no_grad():
                z = encode(start) if start is not None else randn_like_gen(
                    torch.empty((n * lay.n_slices, cz, h, w), dtype=lay.dtype, device=problem.y.device), generator)
        nfe = 0
        for k, t_k in enumerate(timesteps):
            if p["dc_space"] == "pixel":
                with torch.no_grad():
                    x = dc(x if k == 0 else decode(z, n))
                    z = encode(x)
            else:
                z, its = minimise_mse(
                    z, lambda v, n=n: (lay.residual_norms(decode(v, n)) ** 2 / m_per_app).reshape(-1),
                    float(p["latent_lr"]), int(p["latent_iters"]), threshold)
                latent_its += its
                with torch.no_grad():
                    x = decode(z, n)
                    z = encode(x)       # the reference re-encodes encode(decode(z)) before purifying
            with torch.no_grad():
                z, calls = _purify(den, sched, z, t_k, p, None, generator)
                nfe += calls
                if report:
                    report(decode(z, n), t=int(t_k) - 1, sigma=float(sched.sigma_of_t(int(t_k) - 1)))
        with torch.no_grad():
            outs.append(x if p["output"] == "consistent" else decode(z, n))
        dc_last.append(x.detach())
    return _finish("dcdp_latent", p, lay, outs, dc_last, timesteps, nfe, den, t0, latent_shape=[cz, h, w],
                   canvas=list(lay.canvas.shape), latent_iters_run=latent_its,
                   ceiling_psnr_db=prior.meta.get("autoencoder_roundtrip_psnr_db"))
