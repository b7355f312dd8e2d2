"""TPDM: two perpendicular 2D diffusion priors for 3D volumes (Lee, Chung, Park, Park, Ryu, Ye, "Improving 3D
Imaging with Pre-Trained Perpendicular 2D Diffusion Models", ICCV 2023).

Follows ``hyn2028/tpdm@5927141`` (``controllable_generation.py``: ``get_tpdm_sv_ct``, ``get_tpdm_cs_mri``;
``tpdm_utils.py``: ``is_primary_tern``, ``check_K``). The paper models the volume's density as a product of
two 2D slice densities taken in perpendicular directions, p(x) ~ prod_z p_xy(x_z) prod_y p_zx(x_y) (a product of
experts), and samples it by *alternating* the reverse-diffusion steps between the two slice priors: the
**primary** prior, on the planes the measurement is taken slice by slice on (the reference's data step needs
that layout; medrecon: the axial slice prior, every (y, x) slice), and the **auxiliary** prior (a slice prior
trained on coronal (z, x) or sagittal (z, y) planes of the same volumes, ``train.<name>.plane``;
:mod:`medrecon.diffusion.datasets`), which sees the same volume permuted so that its batch is the stack of
perpendicular planes.

Per step i of a uniform DDIM grid (``steps``, default 50), as DDS (:mod:`medrecon.methods.dds`) does it:

1. pick the prior: with ``turns: cyclic`` (the reference's integer K) the auxiliary prior takes the steps
   with ``i % K == K - 1`` and the primary prior the other K - 1 of every K; with ``turns: random`` (the
   reference's float K) each step is auxiliary with probability 1/K (drawn once per sample pass from a side
   generator, :func:`side_generator`);
2. x0_hat = D(x_t / sqrt(ab_t), sigma_t) with that prior (Tweedie): the primary one on the axial slices, the
   auxiliary one on the perpendicular planes of the volume (permuted, each plane on its own canvas);
3. on primary steps, data consistency as DDS: ``cg_iter`` CG steps on ``(A^H A + lam I) x = A^H y + lam
   x0_hat`` warm-started at x0_hat (the reference applies its data-consistency (DPS) step on primary turns
   only and runs the auxiliary prior unconditionally; ``aux_dc: true`` applies CG after auxiliary steps too);
4. x_{t'} = sqrt(ab') x0' + sqrt(1-ab') (eta z + sqrt(1-eta^2) eps_hat) (DDS's eta, default 0.85, or
   ``eta_convention: ddim``); the last step returns x0'.

With ``turns: cyclic`` and K > steps every step is primary: the chain is DDS, number for number (tested).
Warm start (``init``, ``start``) as DDS: the chain starts at the ``start`` fraction of the grid from the
starting image diffused forward, and the turn count i starts there.

Departures, on purpose:

* **DDS-style sampler instead of the reference's VE predictor-corrector.** The reference runs score-SDE's
  reverse-diffusion predictor + Langevin corrector (VE SDE, N = 2000 for CT/MRI) with a DPS gradient step for
  the data; medrecon's slice priors are VP/epsilon (or EDM) networks and its 3D solvers use DDS's Tweedie +
  CG + DDIM step, so TPDM here is that step with the prior alternated as TPDM alternates it (issue 16). The
  alternation rule (integer K deterministic, K-1 primary then 1 auxiliary; float K random with 1/K) is the
  reference's. The reference's default for inverse problems is K = 2; it is ours.
* **Any volume size.** Both priors are applied on background-padded canvases (:mod:`medrecon.diffusion.canvas`).
  The state lives on the primary prior's canvases (as in DDS); for an auxiliary step its image part is
  re-viewed as perpendicular planes and put on the auxiliary prior's canvas, whose padded region (z beyond
  the volume, and x or y to the network's multiple) is filled with *fresh* noisy background
  ``sqrt(ab) b + sqrt(1-ab) n``: in distribution the same as the persistent noisy background the primary
  canvas keeps, and never seen by the output (the estimate there is b). n, like the random turns, comes from
  a side generator seeded from the sampler's seed, so the chain's own noise is DDS's draw for draw. The
  auxiliary estimate comes back to the primary canvas padded with the background, so the DDIM update keeps
  the primary canvas' padded region exact noisy background, as in DDS.
* Data consistency is DDS's CG on the exact operator (ASTRA / SigPy), relative weights
  (:func:`medrecon.diffusion.dc.absolute_dc_weights`); DDS's ztv ADMM is not offered (the auxiliary prior is
  TPDM's answer to the z-coupling it provides).
* The perpendicular prior is trained on the volumes' own coronal (sagittal) planes at their z pixel scale,
  padded to the square training size (no resampling to isotropic voxels; the reference's volumes were
  isotropic), so it denoises the planes of a volume on the same grid at the scale it learned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medrecon.diffusion.canvas import Canvas, CanvasDenoiser, network_multiple, prior_background
from medrecon.diffusion.dc import absolute_dc_weights, cg_normal
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddim_step, diffuse
from medrecon.errors import ConfigError, InputError
from medrecon.methods.sampling import DTYPES, SliceLayout, check_params, reset_nfe, sample_chunks, warm_start_image
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

TPDM_DEFAULTS: dict[str, Any] = {
    "steps": 50, "eta": 0.85, "eta_convention": "dds", "cg_iter": 5, "lam": 0.0, "cg_per_slice": False,
    "cg_tol": 1e-6, "weights": "relative", "samples": 1, "sample_batch": None, "dtype": "float32",
    "init": None, "start": 1.0,
    "K": 2,                 # alternation ratio: every K-th step auxiliary (cyclic), or with probability 1/K (random)
    "turns": "cyclic",      # cyclic (reference: integer K) | random (reference: float K)
    "aux_dc": False,        # data consistency after auxiliary steps too (reference: primary steps only)
}
TURNS = ("cyclic", "random")
# Which perpendicular planes an auxiliary prior may see, and how a (samples, Z, C, Y, X) batch becomes theirs.
AUX_PLANES = ("coronal", "sagittal")
_TO_PLANES = {"coronal": (0, 3, 2, 1, 4), "sagittal": (0, 4, 2, 1, 3)}      # -> (n, Y, C, Z, X) / (n, X, C, Z, Y)
_FROM_PLANES = {"coronal": (0, 3, 2, 1, 4), "sagittal": (0, 3, 2, 4, 1)}    # inverse permutations
_SIDE_SEED = 0x5450444D   # "TPDM": the side generator's seed is the sampler's xor this


@dataclass
class PerpendicularPriors:
    """TPDM's two slice priors: ``primary`` on axial slices, ``aux`` on ``plane`` (coronal/sagittal) planes.

    Both must map the image to the same prior domain (normalisation, channels): the sampler's state is one
    volume in that domain. ``meta`` and ``scale`` are the primary's (the reconstruct step reads the
    normalisation from ``meta`` and sets ``scale`` of a per-volume MR prior: that sets both priors).
    """

    primary: Prior
    aux: Prior
    plane: str = "coronal"

    def __post_init__(self) -> None:
        if self.plane not in AUX_PLANES:
            raise InputError(f"TPDM's second prior must be a perpendicular one ({' or '.join(AUX_PLANES)} planes), "
                             f"got {self.plane!r} planes",
                             fix="train the second prior with plane: coronal (or sagittal) on the same volumes")
        p, a = self.primary, self.aux
        if p.channels != a.channels:
            raise InputError(f"TPDM's priors have {p.channels} and {a.channels} channels",
                             fix="train both priors for the same modality and network.in_channels")
        same = abs(p.scale - a.scale) <= 1e-6 * abs(p.scale) and abs(p.offset - a.offset) <= 1e-6 * max(1.0,
                                                                                                     abs(p.offset))
        if not same or prior_background(p) != prior_background(a):
            raise InputError("TPDM's axial and perpendicular priors map images to different prior domains "
                             f"(scale {p.scale:g} vs {a.scale:g}, offset {p.offset:g} vs {a.offset:g})",
                             fix="train both priors with the same normalisation (train.<name>.normalisation)")
        if a.cond:
            raise InputError("TPDM's perpendicular prior is conditional; it needs an unconditional slice prior",
                             fix="train the perpendicular prior as a plain slice prior (kind: slice)")

    @property
    def meta(self) -> dict[str, Any]:
        return {**self.primary.meta, "perpendicular": dict(self.aux.meta), "plane": self.plane}

    @property
    def scale(self) -> float:
        return self.primary.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.primary.scale = value
        self.aux.scale = value


def load_tpdm_priors(*paths: str | Path, device: torch.device | str = "cpu", **kw: Any) -> PerpendicularPriors:
    """The two checkpoints of TPDM, in this order: the axial slice prior and the coronal (or sagittal) one.

    ``kw`` as :func:`medrecon.diffusion.checkpoint.prior_from_checkpoint` (image units, modality, ...). A prior
    of the wrong plane, in either place, is an InputError naming it.
    """
    from medrecon.diffusion.checkpoint import prior_from_checkpoint

    if len(paths) != 2:
        raise ConfigError(f"tpdm takes two prior checkpoints (axial, then coronal or sagittal), got {len(paths)}: "
                          f"{', '.join(map(str, paths))}",
                          fix="set reconstruct.priors.<modality>.tpdm: [axial_prior.pt, coronal_prior.pt] (train "
                              "the second with plane: coronal)")
    axial, perpendicular = paths
    primary = prior_from_checkpoint(axial, device, expect_plane="axial", **kw)
    aux = prior_from_checkpoint(perpendicular, device, expect_plane=AUX_PLANES, **kw)
    if primary.meta.get("normalisation") != aux.meta.get("normalisation"):
        raise InputError(f"TPDM's priors {axial} and {perpendicular} were trained with different normalisations "
                         f"({primary.meta.get('normalisation')} vs {aux.meta.get('normalisation')})",
                         path=perpendicular, fix="train both on the same volumes with the same normalisation")
    return PerpendicularPriors(primary, aux, aux.meta["plane"])


def as_priors(prior: Any) -> PerpendicularPriors:
    """``prior`` as :class:`PerpendicularPriors` (also from a pair (axial, perpendicular) of Priors, whose
    plane is the second one's ``meta["plane"]``, coronal if unrecorded)."""
    if isinstance(prior, PerpendicularPriors):
        return prior
    if isinstance(prior, Sequence) and len(prior) == 2 and all(isinstance(p, Prior) for p in prior):
        return PerpendicularPriors(prior[0], prior[1], str(prior[1].meta.get("plane", "coronal")))
    raise ConfigError(f"tpdm needs two slice priors (axial, then coronal or sagittal), got {type(prior).__name__}",
                      fix="list two checkpoints for tpdm in reconstruct.priors: [axial prior, coronal prior] "
                          "(train the second with plane: coronal)")


class PlaneView:
    """The auxiliary prior's view of a volume held on the primary prior's canvases.

    :meth:`estimate` maps the state x_t (samples * Z, C, H1, W1) to the auxiliary prior's Tweedie estimate on
    the same canvases: image part re-viewed as perpendicular planes, each centred on the auxiliary canvas
    (padded region: fresh noisy background), denoised, and brought back padded with the background.
    """

    def __init__(self, lay: SliceLayout, aux: Prior, plane: str) -> None:
        self.lay, self.plane = lay, plane
        z, y, x = lay.image_shape
        self.rows, self.cols = (z, x) if plane == "coronal" else (z, y)
        self.n_planes = y if plane == "coronal" else x
        self.background = prior_background(aux)
        self.canvas = Canvas(self.rows, self.cols, multiple=network_multiple(aux.denoiser), value=self.background)
        self.denoiser = aux.denoiser if self.canvas.identity else CanvasDenoiser(aux.denoiser, self.canvas)

    def estimate(self, x: torch.Tensor, n: int, ab: torch.Tensor, sigma: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        lay, c = self.lay, x.shape[1]
        z, y, xx = lay.image_shape
        vol = lay.canvas.crop(x).reshape(n, z, c, y, xx)
        planes = vol.permute(*_TO_PLANES[self.plane]).reshape(n * self.n_planes, c, self.rows, self.cols)
        if not self.canvas.identity:
            noise = torch.randn((planes.shape[0], c, *self.canvas.shape), generator=generator,
                                dtype=torch.float64).to(x.device, x.dtype)
            noisy_bg = (ab.sqrt() * self.background + (1 - ab).sqrt() * noise).to(x.dtype)
            planes = torch.where(self.canvas.mask(x.device), noisy_bg, self.canvas.pad(planes))
        x0 = self.canvas.crop(self.denoiser(planes / ab.sqrt().to(x.dtype), sigma.to(x.dtype), None))
        x0 = x0.reshape(n, self.n_planes, c, self.rows, self.cols).permute(*_FROM_PLANES[self.plane])
        return lay.canvas.pad(x0.reshape(n * z, c, y, xx))


def side_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A second generator, seeded from ``generator``'s seed, for what DDS does not draw (padding noise of the
    auxiliary canvas, random turns): same seed -> same numbers, and the chain's noise stays DDS's."""
    if generator is None:
        return None
    return torch.Generator(device=generator.device).manual_seed((generator.initial_seed() ^ _SIDE_SEED) % 2**63)


def _turns(p: dict[str, Any], n_steps: int, generator: torch.Generator | None) -> list[bool]:
    """Per step: True when the auxiliary prior takes it (the reference's ``not is_primary_tern``)."""
    k = p["K"]
    if p["turns"] == "cyclic":
        return [i % int(k) == int(k) - 1 for i in range(n_steps)]
    draws = torch.rand(n_steps, generator=generator, dtype=torch.float64)
    return [bool(u < 1.0 / float(k)) for u in draws]


def _check(p: dict[str, Any], problem: ReconProblem) -> None:
    if not 0.0 <= float(p["eta"]) <= 1.0:
        raise ConfigError(f"tpdm: eta must lie in [0, 1], got {p['eta']}", fix="DDS uses eta: 0.85")
    if p["turns"] not in TURNS:
        raise ConfigError(f"tpdm: turns must be one of {TURNS}, got {p['turns']!r}",
                          fix="cyclic: every K-th step auxiliary (the reference's integer K); random: probability 1/K")
    k = p["K"]
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ConfigError(f"tpdm: K must be a number, got {k!r}", fix="the reference uses K: 2")
    if p["turns"] == "cyclic" and (float(k) != int(k) or int(k) < 2):
        raise ConfigError(f"tpdm: with turns: cyclic K must be an integer >= 2, got {k}",
                          fix="K: 2 alternates the priors (the reference's default); K larger than steps is DDS")
    if p["turns"] == "random" and float(k) < 1.0:
        raise ConfigError(f"tpdm: with turns: random K must be >= 1 (auxiliary probability 1/K), got {k}",
                          fix="e.g. K: 2.0 (each step auxiliary with probability 0.5)")
    if len(problem.image_shape) != 3:
        raise ConfigError(f"tpdm needs a volume (Z, Y, X); this problem's image has shape {tuple(problem.image_shape)}",
                          fix="use dds for single slices; tpdm couples slices through its perpendicular prior")


@register_method(
    "tpdm", defaults=TPDM_DEFAULTS, prior="slice", loader="medrecon.methods.tpdm:load_tpdm_priors",
    paper="Lee, Chung, Park, Park, Ryu, Ye: Improving 3D Imaging with Pre-Trained Perpendicular 2D Diffusion "
          "Models (TPDM), ICCV 2023",
    memory_copies=72, init="param")
def tpdm(problem: ReconProblem, params: dict, prior: Any, generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, Z, Y, X) by TPDM with DDS steps; see the module docstring for params."""
    p = check_params("tpdm", params)
    _check(p, problem)
    priors = as_priors(prior)
    primary = priors.primary
    lay = SliceLayout(problem, primary, DTYPES[p["dtype"]])
    op = lay.op
    view = PlaneView(lay, priors.aux, priors.plane)
    sched = primary.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]), float(p["start"]))
    start_image = warm_start_image("tpdm", problem, p)
    den = lay.denoiser
    reset_nfe(den)
    reset_nfe(view.denoiser)
    with torch.no_grad():
        aty = op.adjoint(lay.y)
    w = absolute_dc_weights(op, aty, p, problem.adjoint_abs_max)
    n_sys_dims = 1 + (len(lay.image_shape) - len(op.in_shape) if p["cg_per_slice"] else 0)
    t_start = time.perf_counter()
    outs = []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    aux_steps = 0
    side = side_generator(generator)
    for n in chunks:
        aux_turn = _turns(p, len(pairs), side)
        shape = lay.batch_shape(n)
        cond = primary.batch_cond(n)
        x = torch.randn(shape, generator=generator, dtype=torch.float64).to(problem.y.device, lay.dtype)
        if start_image is not None:     # CCDF: the starting image diffused forward to the first step's level
            x = diffuse(lay.batch(start_image.expand(n, *lay.image_shape)), sched.alpha_bar(pairs[0][0]), x)
        with torch.no_grad():
            for i, (t, t_next) in enumerate(pairs):
                ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
                sigma = ((1 - ab) / ab).sqrt()
                if aux_turn[i]:
                    x0 = view.estimate(x, n, ab, sigma, side)
                else:
                    x0 = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                eps = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(lay.dtype)
                xi = lay.image(x0, n)
                if not aux_turn[i] or p["aux_dc"]:
                    xi = cg_normal(op, None, xi, int(p["cg_iter"]), w["lam"], float(p["cg_tol"]),
                                   n_batch=n_sys_dims, aty=aty)
                    x0 = lay.batch(xi)
                if report:
                    report(xi, t=int(t), sigma=float(sigma), prior="perpendicular" if aux_turn[i] else "axial")
                noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(problem.y.device, lay.dtype) \
                    if t_next >= 0 else None
                x = ddim_step(x0, eps, ab, ab_next, float(p["eta"]), noise, p["eta_convention"])
        aux_steps += sum(aux_turn)
        outs.append(lay.image(x, n))
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": "tpdm", "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res), "plane": priors.plane,
            "aux_steps": int(aux_steps), "primary_steps": int(len(pairs) * len(chunks) - aux_steps),
            "aux_canvas": list(view.canvas.shape), "canvas": list(lay.canvas.shape)}
    # NFE = network evaluations along one sample's chain: one per step, by one prior or the other
    info["network_calls"] = int(getattr(den, "nfe", 0)) + int(getattr(view.denoiser, "nfe", 0))
    return ReconResult(samples=samples, nfe=len(pairs), info=info)
