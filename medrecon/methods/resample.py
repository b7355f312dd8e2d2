"""ReSample: latent diffusion with hard data consistency and stochastic resampling (Song, Kwon, Zhang, Hu,
Qu, Shen, "Solving inverse problems with latent diffusion models via hard data consistency", ICLR 2024).

Follows ``soominkwon/resample@3e332b2`` (``DDIMSampler.resample_sampling``; ``docs/algorithms.md`` section 6).
The reference has no CT or MRI pipeline; this is medrecon's, built from that sampler. Per step of a
uniform DDIM grid on the latent prior's VP schedule (``steps``, default 500 as the reference;
``index`` counts down steps-1 .. 0):

1. ``z0 = D(z_t)`` (Tweedie through the latent UNet), DDIM step to ``z'`` (``eta``, default 0), and a
   **latent DPS step** ``z' -= dps_scale * ab_t * grad_{z_t} sum ||y - A(decode(z0))||`` (norm per
   operator application, as :mod:`medrecon.methods.dps`; the reference passes ``0.5 * ab_t``).
2. **Hard data consistency** when ``index % dc_every == 0``, ``0 < index <= steps - steps // splits``
   (reference: every 10 steps, skipping the first third):
   a. from ``z'`` take ``inter_steps`` further unconditional DDIM steps (eta 0) and use the Tweedie
      estimate at the state reached as ``z0_hat`` (reference: 5 steps, "time travel");
   b. middle part (``index >= steps // splits``) or ``variant: pixel``: **pixel-space** optimisation of
      ``MSE(y, A x)`` over the autoencoder's pixels from ``decode(z0_hat)`` (AdamW, ``pixel_lr`` 1e-2,
      at most ``pixel_iters`` 2000), then ``z0* = encode(x)``; last part: **latent-space** optimisation of
      ``MSE(y, A(decode(z)))`` from ``z0_hat`` (AdamW, ``latent_lr`` 5e-3, at most ``latent_iters`` 500,
      also stopping when the loss exceeds its value ``stall_window`` = 200 iterations earlier);
   c. **stochastic resampling** (Proposition 2, :func:`medrecon.diffusion.latent.stochastic_resample`):
      ``z_t' ~ N((s2 sqrt(ab') z0* + (1-ab') z') / (s2 + 1 - ab'), s2 (1-ab') / (s2 + 1 - ab') I)``,
      ``s2 = gamma (1-ab')/(1-ab) (1 - ab/ab')`` with ``gamma`` = 40 (reference default).
3. After the loop one more latent optimisation of the final latent (``final_opt``), then decode.

Choices and departures, on purpose:

* **Early stopping at the noise level.** The reference stops an optimisation when the MSE drops below
  1e-6 (its tasks are noiseless); medrecon's measurements are noisy, and fitting below the noise fits
  the noise. Each operator application (a slice, or the volume for 3D operators) stops when its MSE
  reaches ``max(stop_mse, noise_stop * noise_std**2)`` (the discrepancy principle; ``noise_std`` from the
  measurement; ``E|n|^2 = noise_std^2`` per measured value, complex or real). Slices that have stopped
  keep the value at which they stopped while the others go on, so one slice never drags another.
* **All slices in one batch**, samples x slices through the UNet and the autoencoder; per-slice AdamW
  is exact batching because Adam is element-wise.
* **MSE in the operator's units, variables in the prior's.** The optimisers work on the autoencoder's
  normalised pixels (or latents), so AdamW's learning rates keep their meaning (Adam is invariant to the
  loss scale); ``dps_scale`` is not scale-free and must be tuned per operator, as DPS's zeta.
* **weight_decay 0** (the reference uses AdamW's default 0.01, which shrinks the image towards 0, i.e.
  towards mid-grey in a [-1, 1] CT window); set ``weight_decay: 0.01`` to reproduce it.
* The Tweedie estimate is the exact one, ``(z - sqrt(1-ab) eps) / sqrt(ab)``: one reference variant uses
  ``(1-ab)`` instead of its square root ("pseudo_x0"). The time-travel estimate is taken with one extra
  denoiser call at the state reached (reference: the last step's epsilon at the earlier time).
* The autoencoder is medrecon's own AutoencoderKL (KL-f4 by default) trained on the study's slices, not
  the reference's VQ-f4 fine-tuned from CelebA-HQ; complex MR is 2 channels (real, imaginary).
* **Any slice size.** The autoencoder halves a slice log2(f) times and the latent UNet its latent again, so
  the slice is centred on a canvas whose sides are multiples of ``f * 2^(levels-1)``, padded with the
  background (air) in the autoencoder's pixel units (:mod:`medrecon.diffusion.canvas`); the latent covers
  the canvas. Residuals and both consistency fits measure the cropped slice only; a pixel-space fit starts
  from the decoded canvas with its padded region reset to the background, so what is re-encoded is the
  slice surrounded by air, as in training.
* ``variant: pixel`` is the fast variant the reference README mentions: pixel-space consistency at
  every event and a final pixel-space fit of the decoded image (the output is that image).

``latent_dps`` is the same sampler without step 2 and 3 (Latent-DPS, the paper's baseline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from medrecon.diffusion.canvas import network_multiple
from medrecon.diffusion.latent import LatentPrior, randn_like_gen, stochastic_resample
from medrecon.diffusion.schedules import ddim_step
from medrecon.errors import ConfigError
from medrecon.methods.sampling import DTYPES, SliceLayout, check_params, reset_nfe, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

LATENT_DPS_DEFAULTS: dict[str, Any] = {"steps": 500, "eta": 0.0, "dps_scale": 0.5, "samples": 1,
                                       "sample_batch": None, "dtype": "float32"}
RESAMPLE_DEFAULTS: dict[str, Any] = {
    **LATENT_DPS_DEFAULTS,
    "variant": "full",          # full (pixel, then latent consistency) | pixel (fast: pixel space only)
    "gamma": 40.0,              # resampling variance factor (reference: 40, "change for each task")
    "dc_every": 10,             # hard consistency every k DDIM steps
    "splits": 3,                # first 1/splits: none; middle: pixel space; last 1/splits: latent space
    "inter_steps": 5,           # unconditional DDIM steps before the z0 estimate ("time travel")
    "pixel_lr": 1e-2, "pixel_iters": 2000,
    "latent_lr": 5e-3, "latent_iters": 500,
    "stall_window": 200,        # latent optimisation stops when the loss exceeds its value this many its ago
    "stop_mse": 1e-6,           # absolute MSE stop (the reference's, noiseless)
    "noise_stop": 1.0,          # stop at noise_stop * noise_std^2 (discrepancy principle); 0 = off
    "weight_decay": 0.0,        # AdamW weight decay (reference: torch's default 0.01)
    "final_opt": True,          # one more consistency fit after the last step
}
_VARIANTS = ("full", "pixel")
# Two checkpoints: the autoencoder, then the latent prior trained on it.
_LATENT_LOADER = "medrecon.diffusion.latent:load_latent_prior"


def _params(method: str, params: dict | None, prior: Any) -> dict[str, Any]:
    p = check_params(method, params)
    if not isinstance(prior, LatentPrior):
        raise ConfigError(f"{method} needs a latent prior (an autoencoder and a latent diffusion checkpoint), "
                          f"got {type(prior).__name__}",
                          fix="train kind 'autoencoder' then kind 'latent' and load them with "
                              "medrecon.diffusion.latent.load_latent_prior")
    if not 0.0 <= float(p["eta"]) <= 1.0:
        raise ConfigError(f"{method}: eta must lie in [0, 1], got {p['eta']}", fix="the reference uses eta: 0")
    if "variant" in p:
        if p["variant"] not in _VARIANTS:
            raise ConfigError(f"{method}: variant must be one of {_VARIANTS}, got {p['variant']!r}",
                              fix="use 'full' (as published) or 'pixel' (fast)")
        ints = ("dc_every", "splits", "pixel_iters", "latent_iters")
        if any(int(p[k]) < 1 for k in ints) or int(p["inter_steps"]) < 0 or int(p["stall_window"]) < 0:
            raise ConfigError(f"{method}: {list(ints)} must be >= 1 and inter_steps, stall_window >= 0",
                              fix="the reference uses dc_every 10, splits 3, inter_steps 5, stall_window 200")
        if float(p["gamma"]) < 0 or float(p["pixel_lr"]) <= 0 or float(p["latent_lr"]) <= 0:
            raise ConfigError(f"{method}: gamma must be >= 0 and learning rates > 0",
                              fix="the reference uses gamma 40, pixel_lr 1e-2, latent_lr 5e-3")
    return p


def minimise_mse(v0: torch.Tensor, mse_fn: Callable[[torch.Tensor], torch.Tensor], lr: float, iters: int,
                 threshold: float, stall_window: int = 0, weight_decay: float = 0.0) -> tuple[torch.Tensor, int]:
    """AdamW on ``v`` (rows = network batch) of ``mse_fn(v) -> (A,)`` (one MSE per operator application).

    Application ``a`` owns rows ``a*r .. (a+1)*r-1`` (r = rows / A). It stops, keeping its current rows,
    when its MSE is <= ``threshold`` or (``stall_window`` > 0) exceeds its value ``stall_window``
    iterations earlier; the loop ends when all have stopped or after ``iters`` iterations.
    Returns the result and the number of iterations run.
    """
    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=lr, weight_decay=weight_decay)
    out = v.detach().clone()
    done: torch.Tensor | None = None
    history: list[torch.Tensor] = []
    for it in range(iters):
        mse = mse_fn(v)
        cur = mse.detach()
        if done is None:
            done = torch.zeros(cur.shape, dtype=torch.bool, device=cur.device)
            rows_per = v.shape[0] // cur.numel()
        newly = cur <= threshold
        if stall_window and it >= stall_window:
            newly |= cur > history[it - stall_window]
        newly &= ~done
        if bool(newly.any()):
            rows = newly.repeat_interleave(rows_per)
            out[rows] = v.detach()[rows]
            done |= newly
        if bool(done.all()):
            return out, it
        history.append(cur)
        (grad,) = torch.autograd.grad(mse.sum(), v)
        v.grad = grad
        opt.step()
    if done is not None:
        rows = (~done).repeat_interleave(rows_per)
        out[rows] = v.detach()[rows]
    return out, iters


def _sample(method: str, problem: ReconProblem, p: dict[str, Any], prior: LatentPrior, hard: bool,
            generator: torch.Generator | None) -> ReconResult:
    codec, den, sched = prior.codec, prior.denoiser, prior.schedule
    # Pixels on a canvas the autoencoder (factor f) and then the latent UNet (multiple m) can halve: sides
    # multiples of f * m, background around the slice; data consistency sees the crop (lay.image).
    lay = SliceLayout(problem, prior.pixel_prior(), DTYPES[p["dtype"]],
                      multiple=codec.factor * network_multiple(den))
    cz, h, w = codec.latent_shape(*lay.canvas.shape, path=problem.meta.get("path"))
    steps = int(p["steps"])
    pairs = sched.step_pairs(steps)
    m_per_app = math.prod(lay.op.out_shape)
    noise_std = float(problem.noise_std or 0.0)
    threshold = max(float(p.get("stop_mse", 0.0)), float(p.get("noise_stop", 0.0)) * noise_std**2)
    eta, dps_scale = float(p["eta"]), float(p["dps_scale"])
    reset_nfe(den)
    stats = {"pixel_events": 0, "latent_events": 0, "pixel_iters": 0, "latent_iters": 0}
    t_start = time.perf_counter()

    def mse_of_image(x_img: torch.Tensor) -> torch.Tensor:
        return (lay.residual_norms(x_img) ** 2 / m_per_app).reshape(-1)

    def tweedie(z: torch.Tensor, t: int) -> torch.Tensor:
        ab = sched.alpha_bar(t)
        return den(z / ab.sqrt().to(z.dtype), ((1 - ab) / ab).sqrt().to(z.dtype), None)

    def fit(kind: str, start: torch.Tensor, n: int, final: bool = False) -> torch.Tensor:
        """Pixel- or latent-space consistency fit; returns a latent (or, final pixel fit, the pixels)."""
        if kind == "pixel":
            with torch.no_grad():   # the padded region is background in clean space (see diffusion.canvas)
                x_start = lay.canvas.force(codec.decode(start))
            x, its = minimise_mse(x_start, lambda v: mse_of_image(lay.image(v, n)), float(p["pixel_lr"]),
                                  int(p["pixel_iters"]), threshold, 0, float(p["weight_decay"]))
            if not final:
                with torch.no_grad():
                    x = codec.encode(x)
            out = x
        else:
            out, its = minimise_mse(start, lambda v: mse_of_image(lay.image(codec.decode(v), n)),
                                    float(p["latent_lr"]), int(p["latent_iters"]), threshold,
                                    int(p["stall_window"]), float(p["weight_decay"]))
        stats[f"{kind}_events"] += 1
        stats[f"{kind}_iters"] += its
        return out

    split = steps // int(p["splits"]) if hard else 0
    outs, residuals = [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    for n in chunks:
        z = torch.randn((n * lay.n_slices, cz, h, w), generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else None).to(lay.dtype)
        for i, (t, t_next) in enumerate(pairs):
            ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
            z = z.detach().requires_grad_(True)
            z0 = tweedie(z, t)
            xi = lay.image(codec.decode(z0), n)
            norms = lay.residual_norms(xi)
            (grad,) = torch.autograd.grad(norms.sum(), z)
            with torch.no_grad():
                eps = ((z - ab.sqrt() * z0) / (1 - ab).sqrt()).to(lay.dtype)
                noise = randn_like_gen(z, generator) if eta > 0 and t_next >= 0 else None
                z_prime = ddim_step(z0.detach(), eps, ab, ab_next, eta, noise) - dps_scale * float(ab) * grad
            index = steps - 1 - i
            if report:
                report(xi, t=int(t))
            if not (hard and 0 < index <= steps - split and index % int(p["dc_every"]) == 0):
                z = z_prime.detach()
                continue
            with torch.no_grad():
                zs, t_s = z_prime.detach(), t_next
                for t_a, t_b in pairs[i + 1:i + 1 + int(p["inter_steps"])]:
                    a_a, a_b = sched.alpha_bar(t_a), sched.alpha_bar(t_b)
                    x0 = tweedie(zs, t_a)
                    zs = ddim_step(x0, ((zs - a_a.sqrt() * x0) / (1 - a_a).sqrt()).to(lay.dtype), a_a, a_b, 0.0,
                                   None)
                    t_s = t_b
                z0_hat = tweedie(zs, t_s) if t_s >= 0 else zs
            kind = "pixel" if p["variant"] == "pixel" or index >= split else "latent"
            z0_star = fit(kind, z0_hat, n)
            z = stochastic_resample(z0_star, z_prime.detach(), ab, ab_next, float(p["gamma"]), generator)
        z = z.detach()
        if hard and p["final_opt"]:
            if p["variant"] == "pixel":
                img = lay.image(fit("pixel", z, n, final=True), n)
            else:
                img = lay.image(codec.decode(fit("latent", z, n)), n)
        else:
            with torch.no_grad():
                img = lay.image(codec.decode(z), n)
        img = img.detach()
        with torch.no_grad():
            residuals.append(mse_of_image(img))
        outs.append(img)
    samples = torch.cat(outs)
    res = torch.cat(residuals)
    info = {"method": method, "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_mse_mean": float(res.mean()), "final_residual_mse_max": float(res.max()),
            "stop_mse": threshold, "latent_shape": [cz, h, w], "canvas": list(lay.canvas.shape),
            # the output is a decoded latent: it cannot beat the autoencoder's round trip (its PSNR ceiling)
            "ceiling_psnr_db": prior.meta.get("autoencoder_roundtrip_psnr_db"), **stats}
    return ReconResult(samples=samples, nfe=int(getattr(den, "nfe", len(pairs))), info=info)


@register_method(
    "resample", defaults=RESAMPLE_DEFAULTS, prior="latent", loader=_LATENT_LOADER,
    paper="Song, Kwon, Zhang, Hu, Qu, Shen: Solving Inverse Problems with Latent Diffusion Models via Hard Data "
          "Consistency (ReSample), ICLR 2024", memory_copies=128)
def resample(problem: ReconProblem, params: dict, prior: LatentPrior,
             generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by ReSample; see the module docstring for params."""
    return _sample("resample", problem, _params("resample", params, prior), prior, True,
                   generator)


@register_method(
    "latent_dps", defaults=LATENT_DPS_DEFAULTS, prior="latent", loader=_LATENT_LOADER,
    paper="Latent DPS (DPS on a latent diffusion prior), the baseline of ReSample (Song et al., ICLR 2024)",
    memory_copies=128)
def latent_dps(problem: ReconProblem, params: dict, prior: LatentPrior,
               generator: torch.Generator | None = None) -> ReconResult:
    """Latent-DPS (ReSample without hard consistency): params steps, eta, dps_scale, samples, dtype."""
    return _sample("latent_dps", problem, _params("latent_dps", params, prior), prior, False,
                   generator)
