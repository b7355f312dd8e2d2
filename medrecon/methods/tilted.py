"""Tilted transport: posterior sampling with a denoising oracle (Bruna & Han, NeurIPS 2024, arXiv 2407.00745).

No public reference code exists; this follows the paper's talk and our derivation of its VE form (summary and
measured numbers: ``docs/algorithms.md`` section 14). For y = A x0 + n, n ~ N(0, sigma_y^2 I),
the *tilted* distribution at VE noise level sigma,

    nu_sigma(x) ~ p_sigma(x) exp(-1/2 (A x - y)^T (sigma_y^2 I - sigma^2 A A^T)^-1 (A x - y)),

exists for sigma < sigma* = sigma_y / s_max, and if x ~ nu_sigma then the *unconditional* prior reverse chain
from sigma to 0 ends at the exact posterior p(x0 | y) (the tilt is exactly transported to the likelihood). So:

1. sigma~ = the largest trained noise level <= ``sigma_frac * sigma*`` (s_max by power iteration,
   :func:`medrecon.diffusion.dc.operator_norm_sq`, in prior units);
2. stage 1 draws nu_sigma~: ``stage1: ula`` runs ``ula_steps`` unadjusted Langevin steps
   ``x += h (score(x) + grad log tilt(x)) + sqrt(2 h) z`` with the denoiser's score ``(D(x, sigma~) - x) / sigma~^2``
   and ``grad log tilt = -A^T w``, ``w = (sigma_y^2 I - sigma~^2 A A^T)^-1 (A x - y)`` by warm-started CG in
   measurement space (SPD below sigma*), ``h = ula_step / (1/sigma~^2 + s_max^2/(sigma_y^2 - sigma~^2 s_max^2))``;
   ``stage1: exact`` (analytic mixture priors only: validation) draws nu_sigma~ exactly, since it is then a
   Gaussian mixture (prior components widened by sigma~^2, times a Gaussian likelihood with noise covariance
   ``sigma_y^2 I - sigma~^2 A A^T``);
3. stage 2 runs ancestral DDPM (the exact q-posterior step between grid points) from the VP step of sigma~ to 0
   with the prior's denoiser: every trained step (``steps: null``) or ``steps`` uniform ones.

Exact in the limit (exact stage 1, fine stage-2 grid) for linear-Gaussian likelihoods; the tests assert it on
the talk-001 mixture and a d = 64 linear-Gaussian problem. ULA is only as good as its mixing: it is fine when
nu is log-concave (Gaussian priors, well-conditioned high-noise problems) and fails on multimodal nu; sparse-view
CT and undersampled MRI have large null spaces where the tilt is flat, so stage 1 is then an image-scale sampling
problem at small sigma* (a validation/reference sampler, not a promise for 8-view CT; wave2 section 2.3).

Departures / choices (no reference code to depart from): the tilt is written with h = +A^T y / sigma_y^2 (the
talk's slide has conflicting signs; the 1D test pins it); ULA starts from ``sigma~ z`` around the zero
image (with ``ula_steps`` enough to forget it); sigma_y is per real component (complex MR ``noise_std``
/ sqrt(2)); A is composed with the prior's affine map, so the whole chain lives in the prior domain; the
padded canvas region (any slice size, :class:`~medrecon.methods.sampling.SliceLayout`) is untilted.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from medrecon.diffusion.analytic import GaussianMixturePrior
from medrecon.diffusion.dc import operator_norm_sq
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddpm_step
from medrecon.errors import ConfigError
from medrecon.methods.ddrm import UnitLayout, real_noise_std
from medrecon.methods.sampling import DTYPES, SLICE_PRIOR_LOADER, SliceLayout, check_params, reset_nfe, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

F64 = torch.float64

TILTED_DEFAULTS: dict[str, Any] = {
    "sigma_frac": 0.95, "stage1": "ula", "ula_steps": 500, "ula_step": 0.05, "cg_iter": 20, "cg_tol": 1e-8,
    "steps": None, "sigma_y": None, "samples": 1, "sample_batch": None, "dtype": "float32",
}


class PriorDomainOperator:
    """A composed with the prior's affine image map, on canvas batches: ``A_p x = A(from_prior(x)) - A(from_prior(0))``
    (linear), its real adjoint, and ``y_p = y - A(from_prior(0))``; real inner products (Re of Hermitian)."""

    def __init__(self, lay: SliceLayout) -> None:
        self.lay = lay
        self.op = lay.op
        self.out_dims = lay.out_dims
        zero = torch.zeros(lay.batch_shape(1), dtype=lay.dtype, device=lay.y.device)
        with torch.no_grad():
            self.b = self.op.forward(lay.image(zero, 1))[0]     # A(from_prior(0)): the affine part
        self.y = lay.y - self.b

    def forward(self, x_batch: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            return self.op.forward(self.lay.image(x_batch, n)) - self.b

    def adjoint(self, w: torch.Tensor, n: int) -> torch.Tensor:
        """The real adjoint of :meth:`forward` into the canvas batch (zero in the padded region)."""
        with torch.no_grad():
            x = self.op.adjoint(w)
        prior = self.lay.prior
        if prior.channels == 2:
            x = torch.view_as_real(x.to(torch.complex128 if self.lay.dtype == F64 else torch.complex64))
            x = x.movedim(-1, -3)
        else:
            x = x.unsqueeze(-3)
        x = x.reshape(n * self.lay.n_slices, prior.channels, *x.shape[-2:]) / prior.scale
        c = self.lay.canvas
        return x.to(self.lay.dtype) if c.identity else c.zero_padding(c.pad(x.to(self.lay.dtype)))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Real inner product per operator application (keeps the out dims as size 1)."""
        return (a.conj() * b).real.sum(dim=self.out_dims, keepdim=True) if a.is_complex() \
            else (a * b).sum(dim=self.out_dims, keepdim=True)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where b > 0, else 0 (a converged system: float32 has no 1e-300 to clamp to)."""
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _cg(apply, rhs: torch.Tensor, x: torch.Tensor, dot, n_iter: int, tol: float) -> torch.Tensor:
    """CG on an SPD ``apply`` in measurement space, each operator application its own system."""
    r = rhs - apply(x)
    p = r.clone()
    rr = dot(r, r)
    stop = tol**2 * dot(rhs, rhs)
    for _ in range(n_iter):
        if bool((rr <= stop).all()):
            break
        ap = apply(p)
        alpha = _safe_div(rr, dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        p = r + _safe_div(rr_new, rr) * p
        rr = rr_new
    return x


def exact_tilted_draw(lay: SliceLayout, sigma: float, sigma_y: float, n: int,
                      generator: torch.Generator | None) -> torch.Tensor:
    """n exact draws of nu_sigma (canvas batch) for an analytic :class:`GaussianMixturePrior` on one operator
    unit per prior slice: the prior widened by sigma^2, conditioned on y with noise covariance
    ``sigma_y^2 I - sigma^2 A A^T`` (whitened through its eigendecomposition)."""
    den = lay.prior.denoiser
    units = UnitLayout(lay)
    if not isinstance(den, GaussianMixturePrior) or units.units != 1 or not lay.canvas.identity \
            or den.dim != units.d or units.groups != 1:
        raise ConfigError("tilted: stage1 'exact' needs an analytic Gaussian-mixture prior on a single "
                          "unpadded slice (a validation mode)", fix="use stage1: ula")
    a, b = units.matrix(0)
    y = units.real_measurement(lay.y)[0].cpu() - b
    cov = sigma_y**2 * torch.eye(a.shape[0], dtype=F64) - sigma**2 * (a @ a.T)
    lam, q = torch.linalg.eigh(cov)
    if float(lam.min()) <= 0:
        raise ConfigError(f"tilted: sigma~ = {sigma:.4g} is not below sigma* (the tilt does not exist)",
                          fix="use sigma_frac < 1")
    w = q / lam.sqrt()                                  # cov^-1/2 = Q diag(lam^-1/2) Q^T (Q^T dropped: isometry)
    widened = GaussianMixturePrior(den.weights, den.means, den.covs + sigma**2 * torch.eye(den.dim, dtype=F64))
    post = widened.posterior(w.T @ a, w.T @ y, 1.0)
    x = post.sample(n, generator)
    return x.reshape(lay.batch_shape(n)).to(lay.y.device, lay.dtype)


@register_method(
    "tilted", defaults=TILTED_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER,
    paper="Bruna, Han: Posterior Sampling with Denoising Oracles via Tilted Transport, NeurIPS 2024",
    memory_copies=64)
def tilted(problem: ReconProblem, params: dict, prior: Prior,
           generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, *image_shape) by tilted transport; see the module docstring for params."""
    p = check_params("tilted", params)
    if p["stage1"] not in ("ula", "exact"):
        raise ConfigError(f"tilted: stage1 must be 'ula' or 'exact', got {p['stage1']!r}",
                          fix="use stage1: ula (any prior) or exact (analytic mixture priors)")
    if not 0.0 < float(p["sigma_frac"]) < 1.0:
        raise ConfigError(f"tilted: sigma_frac must lie in (0, 1), got {p['sigma_frac']}",
                          fix="use sigma_frac: 0.95 (the tilt blows up at sigma*)")
    if int(p["ula_steps"]) < 0 or not float(p["ula_step"]) > 0:
        raise ConfigError("tilted: ula_steps must be >= 0 and ula_step > 0",
                          fix="use ula_steps: 500, ula_step: 0.05")
    sigma_y = real_noise_std(problem, p["sigma_y"], "tilted")
    if sigma_y <= 0:
        raise ConfigError("tilted: the tilt needs measurement noise (sigma* = sigma_y / ||A|| is 0 here)",
                          fix="use a noisy measurement, set sigma_y > 0, or a sampler with hard data consistency (dds)")
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    aop = PriorDomainOperator(lay)
    s_max = math.sqrt(operator_norm_sq(lay.op)) / abs(float(prior.scale))
    sigma_star = sigma_y / s_max
    sched = prior.vp_schedule()
    sigmas = sched.sigmas
    below = torch.nonzero(sigmas <= float(p["sigma_frac"]) * sigma_star).reshape(-1)
    if len(below) == 0:
        raise ConfigError(f"tilted: sigma* = sigma_y / ||A|| = {sigma_star:.3g} (prior units) is below the "
                          f"schedule's smallest noise level {float(sigmas[0]):.3g}",
                          fix="the data are too precise for a tilt at a trained level; use dds or ddrm")
    t_tilde = int(below[-1])
    sig = float(sigmas[t_tilde])
    ts = list(range(t_tilde, -1, -1))
    if p["steps"] is not None:
        k = int(p["steps"])
        if not 1 <= k <= len(ts):
            raise ConfigError(f"tilted: steps must lie in [1, {len(ts)}] (trained steps below sigma~), got {k}",
                              fix="use steps: null (every trained step)")
        ts = sorted({round(t_tilde * (1 - i / k)) for i in range(k)}, reverse=True)
    pairs = list(zip(ts, [*ts[1:], -1], strict=True))
    n_ula = int(p["ula_steps"]) if p["stage1"] == "ula" else 0
    h = float(p["ula_step"]) / (1 / sig**2 + s_max**2 / (sigma_y**2 - sig**2 * s_max**2))
    den = lay.denoiser
    reset_nfe(den)
    t_start = time.perf_counter()
    outs = []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, n_ula + len(pairs), len(chunks))
    sig_t = torch.tensor(sig, dtype=lay.dtype)
    for n in chunks:
        shape = lay.batch_shape(n)
        cond = prior.batch_cond(n)
        with torch.no_grad():
            if p["stage1"] == "exact":
                x = exact_tilted_draw(lay, sig, sigma_y, n, generator)
            else:
                z = torch.randn(shape, generator=generator, dtype=F64).to(problem.y.device, lay.dtype)
                x = lay.batch(torch.zeros((n, *lay.image_shape), dtype=lay.op.in_dtype, device=z.device)) + sig * z
                w = torch.zeros_like(aop.forward(x, n))

                def apply(v: torch.Tensor, n: int = n) -> torch.Tensor:
                    return sigma_y**2 * v - sig**2 * aop.forward(aop.adjoint(v, n), n)

                for i in range(n_ula):
                    w = _cg(apply, aop.forward(x, n) - aop.y, w, aop.dot, int(p["cg_iter"]), float(p["cg_tol"]))
                    x0 = den(x, sig_t, cond)
                    g = (x0 - x) / sig**2 - aop.adjoint(w, n)
                    z = torch.randn(shape, generator=generator, dtype=F64).to(problem.y.device, lay.dtype)
                    x = x + h * g + math.sqrt(2 * h) * z
                    if report:
                        report(lay.image(x0, n), t=t_tilde, sigma=sig, stage=1, i_ula=i)
            # stage 2: the prior's ancestral chain from sigma~ (VP state sqrt(ab) x) to 0
            x = x * sched.alpha_bar(t_tilde).sqrt().to(lay.dtype)
            for t, t_next in pairs:
                ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
                sigma = ((1 - ab) / ab).sqrt()
                x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                noise = torch.randn(shape, generator=generator, dtype=F64).to(problem.y.device, lay.dtype) \
                    if t_next >= 0 else None
                x = ddpm_step(x, x0, ab, ab_next, noise)
                if report:
                    report(lay.image(x0, n), t=int(t), sigma=float(sigma), stage=2)
        outs.append(lay.image(x, n))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    nfe = n_ula + len(pairs)
    info = {"method": "tilted", "params": p, "time_s": time.perf_counter() - t_start, "sigma_y": sigma_y,
            "s_max": s_max, "sigma_star": sigma_star, "sigma_tilde": sig, "t_tilde": t_tilde, "ula_step_h": h,
            "final_residual_norm_mean": float(res), "network_calls": int(getattr(den, "nfe", nfe))}
    return ReconResult(samples=samples, nfe=nfe, info=info)
