"""PaDIS: Patch Diffusion Inverse Solver (Hu, Song, Xu, Shen, Fessler, NeurIPS 2024), and a 3D variant.

Follows ``jasonhu4/PaDIS@1970ef2``, ``inverse_nodist.py:dps`` (what its ``main`` calls; ``docs/algorithms.md``
section 5.3). The prior is a patch denoiser with coordinate channels, made into a whole-image denoiser D by
:class:`medrecon.diffusion.patches.PatchDenoiser` (random non-overlapping grid over the zero-padded image,
padding ring forced to the background). The state x is the *padded* image in the prior domain. On an EDM
grid sigma_i = (s_max^(1/rho) + i/(S-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (rho = 7), for each level,
``inner`` times (reference: S = 100, inner = 10, s_max = 10, s_min = 0.003, zeta = 0.3):

1. D = D(x, sigma_i) with a new random grid (autograd through the network); score s = (D - x) / sigma_i^2;
2. DPS step on the non-squared residual: x <- x - zeta grad_x || y - A(crop(D)) ||;
   (``guidance: landweber``, medrecon's option: x <- x - (zeta / L) grad_x 1/2 || y - A(crop(D)) ||^2 with
   L = ||A||^2 in the prior domain by power iteration, so zeta is dimensionless and transfers between
   geometries; see the departures below);
3. Langevin step with the score of step 1: x <- x + (alpha/2) s + sqrt(alpha) z, alpha = langevin *
   sigma_i^2 (reference: 0.5); no noise at the last level.

Initialisation: the problem's ``init`` (e.g. FBP) if given, else the adjoint A^H y scaled by the least-squares
factor <A A^H y, y> / ||A A^H y||^2; mapped to the prior domain, clamped to the training range (CT window;
reference: FBP clamped to [0, 1]) and padded. All slices of a volume (and all samples of a pass) are one
network batch (chunked by ``max_batch`` patches). Complex MR images are 2 channels (real, imag).

Ablation variants (the paper's Table 2, rows other than "Whole image diffusion", which is ``dps``/``dds`` with
a whole-image prior): ``mode`` picks how patch outputs become D (:data:`~medrecon.diffusion.patches.PATCH_MODES`:
``stitch`` = PaDIS; ``average`` = "Patch Averaging", reference ``denoisedOverlap``; ``tile`` = "Patch
Stitching", reference ``denoisedTile``; both on a fixed grid with ``patch_overlap`` pixels between neighbours,
reference 8), and ``sampler`` picks the sampling algorithm around D (reference ``inverse_nodist.py``):

* ``dps`` (default): steps 1-3 above.
* ``langevin`` ("Langevin dynamics", reference ``langevin``): x starts as the background + sigma_max N(0, I)
  on the whole padded canvas (the reference's background is 0; the FBP is not used); per level, ``inner``
  (10) times: s = (D(x, sigma_i) - x) / sigma_i^2; data step at x itself, x <- x + zeta min(40, 200 sigma_i)
  A^T r / ||r|| with r = y - A crop(x) (no network in the gradient); x <- x + (alpha/2) s + sqrt(alpha) z
  with alpha = ``langevin`` sigma_i^2 (reference 1.0); no noise at the last level.
* ``pc`` ("Predictor-corrector", Song et al. 2021, reference ``pc_sampling``): x starts as the background +
  sigma_max N(0, I) on the image, the ring at the background; for i < S - 1 (S - 1 levels, so the output is
  at noise level sigma_min): predictor x <- x + (sigma_i^2 - sigma_{i+1}^2) s + sqrt(sigma_i^2 -
  sigma_{i+1}^2) z with s at sigma_i; data step x + zeta A^T r / ||r||; then ``inner`` (1) corrector steps:
  s = (D(x, sigma_i) - x) / sigma_{i+1}^2, eps = 2 snr ||z|| / ||s|| (snr 0.16), x <- x + eps s +
  sqrt(2 eps) z, and a data step x + zeta min(40, 200 sigma_i) A^T r / ||r||. ``corrector: song`` is Song et
  al.'s Algorithm 2 instead: D at sigma_{i+1} and eps = 2 (snr ||z|| / ||s||)^2 (the reference's mixes two
  levels and lacks the square; measured on an exact Gaussian prior: variance 0.87 of the target vs 1.04).
* ``ddnm`` ("VE-DDNM", reference ``langevin(ddnm=True)``): as ``langevin`` without its data step (``zeta``
  unused), the score taken towards the range-null-space estimate x0 = A^+ y + (I - A^+ A) D = D + A^+ (y - A D).

Ablation departures, on purpose:
* ``average``/``tile`` grids start at the image's first pixel (the reference's ``denoisedTile`` starts at
  padded pixel 4) and must stay inside the padded image; see :func:`~medrecon.diffusion.patches.mode_tiling`.
* VE-DDNM's A^+ is the least-squares pseudo-inverse by ``pinv_iters`` (20) CG iterations on the normal
  equations from 0 (the min-norm solution as it converges); the reference uses its FBP as "A^+" for CT.
* ``langevin``/``pc`` ||z|| and ||s|| (and ||r||) are per batch element: one 2D slice (``padis``) or one volume
  (``padis3d``) of one sample, as the reference's per-image norms.
* ``guidance: landweber`` applies to the data steps of ``langevin``/``pc`` too: x - (zeta / L) grad 1/2 ||r||^2,
  without the min(40, 200 sigma) factor (a dimensionless step needs none).
* ``inner: null`` and ``langevin: null`` mean each sampler's reference value (10 and 0.5 for ``dps``, 10 and
  1.0 for ``langevin``/``ddnm``, 1 corrector step for ``pc``).

``padis3d`` (beyond the paper): the same sampler with d x P x P slab patches and 3 coordinate channels
(z, y, x) through a 2D network that takes the d slices as channels (see :mod:`medrecon.diffusion.patches`),
so the prior couples neighbouring slices; the volume is padded in z too.

Departures, on purpose:
* Exact operators (ASTRA/SigPy), so zeta does not transfer from the reference's ODL geometry; re-tune it.
  A fixed step on the non-squared norm moves the image by zeta ||A^T r|| / ||r|| whatever the residual, so
  it cannot bring the residual below about zeta ||A||^2 / 2 (measured: residual norm 6.3 at zeta 3, 22 at
  zeta 10 on 8-view CT; the noise norm is far lower): the reference gets away with it over 1000 network
  evaluations of small steps. ``guidance: landweber`` is a Landweber step through the denoiser, which
  converges at a CPU budget of tens of evaluations.
* The residual norm is per operator application (per slice for per-slice operators), as in
  :mod:`medrecon.methods.dps`, so the step does not depend on the number of slices.
* Coordinates are normalised by the same padded size in training and inference (the checkpoint's pad).
  An image of another size (any size: odd, prime, non-square; the grid tiles each axis separately) gets
  coordinates with their trained meaning: its image pixels are stretched onto the trained image's
  coordinate range and the padding ring keeps the trained ring's (:func:`~medrecon.diffusion.patches.
  coordinate_channels` with the median training shape as ``reference``), so the network never sees an
  edge pixel at a coordinate that in training was padding.
* ``patch_size: null`` picks a trained-range size that tiles the padded image (:func:`choose_patch_size`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from medrecon.diffusion.dc import cg_normal
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.patches import (
    FIXED_GRID_MODES,
    PATCH_MODES,
    PatchDenoiser,
    crop_image,
    mode_tiling,
    pad_image,
    reference_lengths,
    ring_mask,
)
from medrecon.diffusion.schedules import EDMSchedule
from medrecon.errors import ConfigError, InputError
from medrecon.methods.sampling import DTYPES, SliceLayout, check_params, reset_nfe, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

PADIS_DEFAULTS: dict[str, Any] = {
    "steps": 100, "inner": None, "sigma_max": 10.0, "sigma_min": 0.003, "rho": 7.0, "zeta": 0.3,
    "langevin": None, "patch_size": None, "mode": "stitch", "max_batch": 256, "init_clamp": "auto",
    "samples": 1, "sample_batch": None, "dtype": "float32", "guidance": "norm",
    # the paper's ablation rows (Table 2): sampler dps|langevin|pc|ddnm, mode stitch|average|tile (+ overlap)
    "sampler": "dps", "patch_overlap": 8, "snr": 0.16, "corrector": "reference", "pinv_iters": 20,
}
SAMPLERS = {
    "dps": "PaDIS: DPS step through the denoiser + Langevin step, inner times per level (reference `dps`)",
    "langevin": "Langevin dynamics row: data step at x + Langevin step, from noise (reference `langevin`)",
    "pc": "predictor-corrector row: reverse-SDE predictor + Langevin corrector (reference `pc_sampling`)",
    "ddnm": "VE-DDNM row: Langevin on the range-null-space estimate (reference `langevin(ddnm=True)`)",
}
_PATCH_LOADER = "medrecon.diffusion.patches:patch_prior_from_checkpoint"
_PAPER = ("Hu, Song, Xu, Shen, Fessler: Learning Image Priors through Patch-based Diffusion Models for Solving "
          "Inverse Problems (PaDIS), NeurIPS 2024")


def _geometry(prior: Prior, three_d: bool) -> dict[str, Any]:
    geom = prior.meta.get("patch")
    if not isinstance(geom, dict):
        raise ConfigError("this method needs a patch prior (prior.meta['patch'] with its padding)",
                          fix="load the prior with medrecon.diffusion.patches.patch_prior_from_checkpoint")
    if bool(geom.get("depth")) != three_d:
        want, got = ("padis3d", "2D") if geom.get("depth") else ("padis", "3D")
        raise ConfigError(f"the prior has {'3D slab' if geom.get('depth') else '2D'} patches; use method {want!r} "
                          f"(not the {got} one)", fix=f"set the method to {want!r} or use a matching prior")
    return geom


def choose_patch_size(lengths: tuple[int, ...], pads: tuple[int, ...], trained: list[int], multiple: int,
                      mode: str, overlap: int = 8) -> int:
    """Patch size for ``patch_size: null``: a multiple of ``multiple`` within the trained sizes that tiles.

    Prefers the largest size whose grid can move by at least min(pad + 1, P // 2) origins on every axis
    (the reference's 56 for N = 256, pad 24), else the largest admissible size (fixed grid; always for the
    fixed-grid modes "average" and "tile").
    """
    ok = []
    lo = max(multiple, min(trained))
    for p in range(max(trained) - max(trained) % multiple, lo - 1, -multiple):
        tiles = [mode_tiling(n, w, p, mode, overlap) for n, w in zip(lengths, pads, strict=True)]
        if all(t is not None for t in tiles):
            ok.append((p, all(t.n_offsets >= min(t.pad + 1, p // 2) for t in tiles)))
    if not ok:
        raise ConfigError(f"no patch size in [{min(trained)}, {max(trained)}] (multiple of {multiple}) tiles images "
                          f"of {lengths} padded by {pads}",
                          fix="reconstruct on a larger image grid, set params.patch_size to a trained size that "
                              "tiles, or use a prior trained on smaller patches or a larger pad_width")
    moving = [p for p, good in ok if good and mode not in FIXED_GRID_MODES]
    return moving[0] if moving else ok[0][0]


def _init_clamp(param: Any, prior: Prior) -> tuple[float, float] | None:
    if param == "auto":
        norm = prior.meta.get("normalisation") or {}
        return tuple(norm["range"]) if norm.get("kind") == "ct_window" else None
    if param is None:
        return None
    lo, hi = (float(v) for v in param)
    return lo, hi


def _resolve(p: dict, name: str) -> dict:
    """Sampler-dependent defaults (``inner``, ``langevin`` null) filled in, and every choice checked."""
    sampler = p["sampler"]
    if sampler not in SAMPLERS:
        raise ConfigError(f"{name}: unknown sampler {sampler!r}",
                          fix="use one of " + ", ".join(f"{k!r} ({v})" for k, v in SAMPLERS.items()))
    if p["mode"] not in PATCH_MODES:
        raise ConfigError(f"{name}: unknown mode {p['mode']!r}",
                          fix="use one of " + ", ".join(f"{k!r} ({v})" for k, v in PATCH_MODES.items()))
    if p["guidance"] not in ("norm", "landweber"):
        raise ConfigError(f"{name}: guidance must be 'norm' or 'landweber' (got {p['guidance']!r})",
                          fix="norm = the reference's step on ||y - A D(x)||; landweber = zeta / L on the squared one")
    if p["corrector"] not in ("reference", "song"):
        raise ConfigError(f"{name}: corrector must be 'reference' or 'song' (got {p['corrector']!r})",
                          fix="reference = the PaDIS code's predictor-corrector; song = Song et al. 2021, Alg. 2")
    out = dict(p)
    if out["inner"] is None:
        out["inner"] = 1 if sampler == "pc" else 10
    if out["langevin"] is None:
        out["langevin"] = 0.5 if sampler == "dps" else 1.0
    bad = [(int(out["steps"]) >= 1, "steps >= 1"), (int(out["inner"]) >= 1, "inner >= 1"),
           (float(out["langevin"]) >= 0, "langevin >= 0"), (float(out["zeta"]) >= 0, "zeta >= 0"),
           (int(out["patch_overlap"]) >= 0, "patch_overlap >= 0"), (float(out["snr"]) > 0, "snr > 0"),
           (int(out["pinv_iters"]) >= 1, "pinv_iters >= 1"),
           (sampler != "pc" or int(out["steps"]) >= 2, "steps >= 2 for the predictor-corrector sampler")]
    for ok, what in bad:
        if not ok:
            raise ConfigError(f"{name}: needs {what} (got {p})",
                              fix="PaDIS uses steps 100, inner 10, langevin 0.5, zeta 0.3 (padis defaults)")
    return out


def _sample(problem: ReconProblem, params: dict, prior: Prior, generator: torch.Generator | None,
            three_d: bool, name: str) -> ReconResult:
    p = _resolve(check_params(name, params), name)
    sampler = p["sampler"]
    geom = _geometry(prior, three_d)
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]], multiple=1)   # padding: the patch grid's own
    op, dt = lay.op, lay.dtype
    shape = lay.image_shape
    if three_d and len(shape) != 3:
        raise InputError(f"{name} reconstructs a volume (Z, Y, X); this problem's image is {shape}",
                         fix="use method 'padis' for single images")
    pw, depth = int(geom["pad_width"]), geom.get("depth")
    pads = (int(geom["pad_z"]), pw, pw) if three_d else (pw, pw)
    lengths = tuple(shape[-3:]) if three_d else tuple(shape[-2:])
    inplane = (lengths[-2:], pads[-2:])
    psize = p["patch_size"]
    mult = int(prior.meta.get("network_multiple", 1))
    ckpt = prior.meta.get("checkpoint")
    label = (f"patch prior{' ' + str(ckpt) if ckpt else ''} (trained on patches of {list(geom['patch_sizes'])} "
             f"pixels, padding {pw})")
    shape_txt = "x".join(str(n) for n in lengths)
    try:
        if psize is None:
            psize = choose_patch_size(*inplane, list(geom["patch_sizes"]), mult, p["mode"], int(p["patch_overlap"]))
        psize = int(psize)
        if psize % mult:
            raise ConfigError(f"patch_size {psize} is not a multiple of {mult} (the network halves it "
                              f"{int(math.log2(mult))} times)", fix=f"use a multiple of {mult}")
        patch_shape = (int(depth), psize, psize) if three_d else (psize, psize)
        offset_gen = torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0)
        den = PatchDenoiser(prior.denoiser, patch_shape, pads, mode=p["mode"], max_batch=int(p["max_batch"]),
                            pad_value=float(geom["pad_value"]), generator=offset_gen,
                            reference=reference_lengths(geom, three_d), overlap=int(p["patch_overlap"]))
        spatial = tuple(n + 2 * w for n, w in zip(lengths, pads, strict=True))
        tilings = den.tilings(spatial)   # validates the patch size now, with a clear message
    except ConfigError as err:   # say which prior and which image, whatever part refused
        raise ConfigError(f"{name}: the {label} cannot tile this {shape_txt} image: {err.message}",
                          fix=err.fix) from err
    sigmas = EDMSchedule(float(p["sigma_min"]), float(p["sigma_max"]), float(p["rho"])).sigmas(
        int(p["steps"]), append_zero=False)
    clamp = _init_clamp(p["init_clamp"], prior)
    zeta, lang, landweber = float(p["zeta"]), float(p["langevin"]), p["guidance"] == "landweber"
    if landweber and zeta > 0:
        # L = ||A||^2 in the prior domain (x_image = (x_prior - offset) / scale): zeta is then dimensionless.
        lip = (op.norm(generator=torch.Generator().manual_seed(0), device=lay.y.device) / abs(prior.scale)) ** 2
        zeta = zeta / max(lip, 1e-30)

    z0 = None
    if sampler == "dps":
        with torch.no_grad():
            if problem.init is not None:
                x_init = problem.init.to(op.in_dtype)
                if tuple(x_init.shape) != tuple(shape):
                    raise InputError(f"{name}: init image has shape {tuple(x_init.shape)}, expected {shape}",
                                     fix="give an init of the reconstruction's image shape (or none)")
            else:
                aty = op.adjoint(lay.y)
                a_aty = op.forward(aty)
                c = torch.vdot(a_aty.flatten(), lay.y.flatten()).real / a_aty.abs().pow(2).sum().clamp_min(1e-30)
                x_init = aty * c
            z0 = prior.to_prior(x_init, dt)                                   # (*lead, C, Y, X)
            if clamp is not None:
                z0 = z0.clamp(*clamp)
    pad_value = float(geom["pad_value"])

    def to_state(z: torch.Tensor, n: int) -> torch.Tensor:
        """Prior-domain image (n, *lead, C, Y, X) -> padded state."""
        if three_d:
            return pad_image(z.movedim(-3, 1), pads, pad_value)      # (n, C, Z, Y, X) padded
        return pad_image(z.reshape(-1, *z.shape[-3:]), pads, pad_value)

    def to_batch(state: torch.Tensor) -> torch.Tensor:
        """Padded state -> cropped denoiser-layout batch (n * slices, C, Y, X)."""
        c = crop_image(state, pads)
        return c.movedim(1, 2).reshape(-1, *c.shape[1:2], *c.shape[-2:]) if three_d else c

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device, dt)

    def dc_step(x: torch.Tensor, n: int, factor: float) -> torch.Tensor:
        """Data step at x itself (Langevin / predictor-corrector): the reference's x + zeta factor A^T r / ||r||
        = x - zeta factor grad ||y - A crop(x)|| (autograd through the operator only, no network), or with
        ``landweber`` x - (zeta / L) grad 1/2 ||r||^2."""
        if zeta == 0:
            return x
        xg = x.detach().requires_grad_(True)
        nrm = lay.residual_norms(lay.image(to_batch(xg), n))
        loss = nrm.pow(2).sum() / 2 if landweber else nrm.sum()
        (grad,) = torch.autograd.grad(loss, xg)
        return (x - (1.0 if landweber else factor) * zeta * grad).detach()

    def per_item_norm(v: torch.Tensor) -> torch.Tensor:
        """||v|| per batch element (one 2D image / one volume of one sample), broadcastable against v."""
        return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(-1, *([1] * (v.ndim - 1)))

    n_img_dims = len(op.in_shape)

    def ddnm_x0(d: torch.Tensor, n: int) -> torch.Tensor:
        """VE-DDNM's range-null-space estimate A^+ y + (I - A^+ A) D = D + A^+ (y - A D) on the image."""
        img = lay.image(to_batch(d), n)
        r = lay.y - op.forward(img)
        corr = cg_normal(op, r, torch.zeros_like(img), n_iter=int(p["pinv_iters"]), n_batch=img.ndim - n_img_dims)
        return to_state(prior.to_prior(img + corr, dt), n)

    reset_nfe(prior.denoiser)
    t_start = time.perf_counter()
    outs, last = [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    levels = len(sigmas) - 1 if sampler == "pc" else len(sigmas)
    report = StepReporter(problem.progress, levels, len(chunks))
    inner, sig = int(p["inner"]), sigmas.tolist()
    for n in chunks:
        if sampler == "dps":
            x = to_state(z0.expand(n, *z0.shape).contiguous(), n)
        else:   # the reference's langevin / pc start from noise at sigma_max around its background 0 (no FBP)
            img_shape = (n, *lay.lead, prior.channels, *shape[-2:])
            blank = to_state(torch.full(img_shape, pad_value, dtype=dt, device=lay.y.device), n)
            x = blank + float(sig[0]) * noise(blank)
            if sampler == "pc":   # reference: noise on the image only, the padding ring at the background
                x = torch.where(ring_mask(blank.shape[2:], pads, blank.device), blank, x)
        norms = None
        for i in range(levels):
            sigma = sig[i]
            if sampler == "dps":
                alpha = lang * sigma**2
                for _ in range(inner):
                    x = x.detach().requires_grad_(zeta > 0)
                    d = den(x, sigma)
                    xi = lay.image(to_batch(d), n)
                    norms = lay.residual_norms(xi)
                    if zeta > 0:
                        loss = norms.pow(2).sum() / 2 if landweber else norms.sum()
                        (grad,) = torch.autograd.grad(loss, x)
                    with torch.no_grad():
                        s = (d - x) / sigma**2
                        x = x - zeta * grad if zeta > 0 else x
                        x = x + (alpha / 2) * s
                        if i < len(sig) - 1:
                            x = x + math.sqrt(alpha) * noise(x)
                norms = norms.detach()
            elif sampler in ("langevin", "ddnm"):
                alpha = lang * sigma**2
                for _ in range(inner):
                    with torch.no_grad():
                        d = den(x, sigma)
                        target = ddnm_x0(d, n) if sampler == "ddnm" else d
                        s = (target - x) / sigma**2
                    if sampler == "langevin":
                        x = dc_step(x, n, min(40.0, 200.0 * sigma))
                    with torch.no_grad():
                        x = x + (alpha / 2) * s
                        if i < len(sig) - 1:
                            x = x + math.sqrt(alpha) * noise(x)
            else:   # predictor-corrector
                s_next = sig[i + 1]
                with torch.no_grad():
                    d = den(x, sigma)
                    s = (d - x) / sigma**2
                    step = sigma**2 - s_next**2
                    x = x + step * s + math.sqrt(step) * noise(x)                   # predictor (reverse VE SDE)
                x = dc_step(x, n, 1.0)
                for _ in range(inner):                                              # corrector (Langevin)
                    with torch.no_grad():
                        z = noise(x)
                        d = den(x, sigma if p["corrector"] == "reference" else s_next)
                        s = (d - x) / s_next**2
                        ratio = float(p["snr"]) * per_item_norm(z) / per_item_norm(s).clamp_min(1e-30)
                        eps = 2 * ratio if p["corrector"] == "reference" else 2 * ratio**2
                        x = x + eps * s + (2 * eps).sqrt() * z
                    x = dc_step(x, n, min(40.0, 200.0 * sigma))
            if report:
                report(lay.image(to_batch(d), n).detach(), sigma=float(sigma))
        x = x.detach()
        outs.append(lay.image(to_batch(x), n))
        if sampler != "dps":   # the dps loop already has the residual of its last denoised image
            with torch.no_grad():
                norms = lay.residual_norms(lay.image(to_batch(d), n))
        last.append(norms.detach().reshape(-1))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": name, "params": {**p, "patch_size": psize}, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res), "last_denoised_residual_norm_mean": float(torch.cat(last).mean()),
            "patch_shape": list(patch_shape), "pad": list(pads),
            "grid_origins": [1 if p["mode"] in FIXED_GRID_MODES else t.n_offsets for t in tilings],
            "patch_evaluations": den.nfe}
    return ReconResult(samples=samples, nfe=den.nfe, info=info)


@register_method("padis", init="fbp", defaults=PADIS_DEFAULTS, prior="patch", loader=_PATCH_LOADER,
                 paper=_PAPER, memory_copies=64)
def padis(problem: ReconProblem, params: dict, prior: Prior, generator: torch.Generator | None = None
          ) -> ReconResult:
    """Posterior samples (S, *image_shape) by PaDIS (2D patch prior, slices batched); see module docstring."""
    return _sample(problem, params, prior, generator, three_d=False, name="padis")


@register_method("padis3d", init="fbp", defaults=PADIS_DEFAULTS, prior="patch", loader=_PATCH_LOADER,
                 paper=_PAPER + "; 3D variant: d x P x P slab patches (train.patch.depth), beyond the paper",
                 memory_copies=64)
def padis3d(problem: ReconProblem, params: dict, prior: Prior, generator: torch.Generator | None = None
            ) -> ReconResult:
    """Posterior samples (S, Z, Y, X) by PaDIS with d x P x P slab patches (3D variant)."""
    return _sample(problem, params, prior, generator, three_d=True, name="padis3d")
