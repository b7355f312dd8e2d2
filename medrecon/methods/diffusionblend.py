"""DiffusionBlend and DiffusionBlend++: 3D reconstruction with a 3-slice slab prior and score blending.

Song, Hu, Luo, Fessler, Shen, "DiffusionBlend: Learning 3D Image Prior through Position-aware Diffusion
Score Blending for 3D Computed Tomography Reconstruction", NeurIPS 2024. Reference code
``efzero/DiffusionBlend@05dc7fc`` (``eval_3D_blend_cond_lidc.py``; ``docs/algorithms.md`` section 4).

The prior (:mod:`medrecon.diffusion.slab_data`) models groups of 3 slices, stacked as channels, with a
label for their spacing (0: adjacent ``i, i+1, i+2``; 1: strided ``i, i+s, i+2s``). The sampler walks the
whole volume on a DDIM grid (default 50 steps) and at every step:

1. **Blend.** The slices are split into groups by a *partition* (:func:`partition`) and each group goes
   through the network as one slab (in batches of ``batch_size`` slabs); every slice takes its Tweedie
   estimate x0_hat from exactly one group. DiffusionBlend uses adjacent triplets ``[o+3k, o+3k+3)`` with
   the offset ``o in {0,1,2}`` redrawn every step, so the partition boundaries move and the scores blend
   across them; DiffusionBlend++ alternates that with the fixed cross-slice ("jump") partition, groups
   ``{b+m, b+m+s, b+m+2s}`` (m < s) in blocks of ``3s`` slices, starting with the jump partition as the
   reference does. Blending x0_hat is blending the scores (same noise level for every slice).
2. **Data consistency** on the whole volume, in the operator's image domain, warm-started at x0_hat:
   ``cg_iter`` CG steps on ``(A^H A + lam I) x = A^H y + lam x0_hat`` (the engine's ``cg_normal``), or with
   ``ztv: true`` one ADMM iteration of ``min 1/2||Ax-y||^2 + ztv_lambda ||D_z x||_1`` with the (z, u)
   state kept across steps, as the reference (and DDS 3D) do.
3. **DDIM update with DDS's eta** (default 0.85): ``x' = sqrt(ab') x0' + sqrt(1-ab')(eta z + sqrt(1-eta^2)
   eps_hat)``; the last step returns x0'.

The sampler is operator-agnostic: CT (``ct-parallel``/``ct-fan``) and multi-coil MRI (complex slices as 2
channels, so a slab has 6) go through the same code.

Deliberate departures from the reference:

* Random initialisation and the data-consistency result are used, as in the LIDC script; the AAPM script
  (``eval_3DCT_blendcond.py``) discards DC and starts from the noised ground truth (``docs/algorithms.md`` 4.8).
  ``init``/``start`` give DDS's warm start (a classical reconstruction diffused to the step ``start`` of the
  way from the end, :mod:`medrecon.methods.dds`), the measurement-only version of that AAPM start.
* Any number of slices: the reference needs a multiple of 9. Slices a partition leaves over at the ends
  are covered by an overlapping edge group (adjacent: ``[0, 3)`` and ``[Z-3, Z)``; jump: the block
  ``[Z-3s, Z)``) whose estimates are used only for the slices nothing else covers, so every slice still
  gets exactly one estimate per step. A volume thinner than ``3s`` slices has no complete jump block and
  DiffusionBlend++ uses the adjacent partition at those steps; one thinner than 3 slices repeats its last
  slice to fill the slab.
* Any in-plane size (the reference: 256 x 256): slabs are padded to the network's multiple with the
  background, as every whole-slice sampler's are (:mod:`medrecon.diffusion.canvas`).
* The operator has an exact adjoint (ASTRA/SigPy), so CG is the real CG; ``rho``/``lam`` (fractions of
  ||A||^2) and ``ztv_lambda`` (of ||A^H y||_inf) are dimensionless by default, as in :mod:`medrecon.methods.dds`
  (the reference hard-codes rho = 0.001, lambda = 5e-5 for its torch Radon, whose back projector is not the
  adjoint; ``weights: absolute`` takes values in the operator's units). CG inner products are Hermitian;
  each posterior sample is its own CG system; DC composes A with the prior's affine image map (no
  [0, 1] <-> [-1, 1] rescaling by hand).
* Labels 0/1 instead of the reference's class ids 1/3 (an encoding choice, see ``slab_data``).
* ``average_overlaps: true`` is a documented variant, off by default as in the released code: every
  sliding window (stride-1 triplets, or all strided triplets at jump steps) is evaluated and each slice
  averages the estimates of the windows that contain it (about 3x the network cost). The reference has
  this only as commented-out code (``206f4e2``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from medrecon.diffusion.dc import ZTVState, absolute_dc_weights, cg_normal, ztv_admm_step
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddim_step, diffuse
from medrecon.diffusion.slab_data import (
    DEFAULT_STRIDE,
    LABEL_ADJACENT,
    LABEL_STRIDED,
    SLAB,
    from_slab_channels,
    to_slab_channels,
)
from medrecon.errors import ConfigError, InputError
from medrecon.methods.sampling import (
    DTYPES,
    SliceLayout,
    check_params,
    reset_nfe,
    sample_chunks,
    warm_start_image,
)
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

# rho / ztv_lambda: DDS's validated relative values (medrecon.methods.dds), the same 3D data consistency.
BLEND_DEFAULTS: dict[str, Any] = {
    "steps": 50, "eta": 0.85, "cg_iter": 5, "lam": 0.0, "cg_tol": 1e-6, "ztv": False, "rho": 0.004,
    "ztv_lambda": 7e-4, "weights": "relative", "stride": DEFAULT_STRIDE, "batch_size": 16,
    "average_overlaps": False, "samples": 1, "sample_batch": None, "dtype": "float32", "init": None, "start": 1.0,
}
KINDS = ("adjacent", "jump", "alternate")
_SLAB_LOADER = "medrecon.diffusion.slab_data:slab_prior_from_checkpoint"
_PAPER = ("Song, Hu, Luo, Fessler, Shen: DiffusionBlend: Learning 3D Image Prior through Position-aware Diffusion "
          "Score Blending for 3D Computed Tomography Reconstruction, NeurIPS 2024")


@dataclass(frozen=True)
class Partition:
    """Groups of 3 slices evaluated at one step and how their estimates make the per-slice estimate.

    ``groups`` (G, 3) slice indices in z order (= channel order of the slab); ``labels`` (G,) spacing
    labels; ``weights`` (G, 3) the weight of each group member's estimate for its slice: a slice's
    estimate is the weighted mean over the members that are that slice. In an exclusive partition every
    slice has exactly one member of weight 1 (the others 0); with ``overlap`` the weights are all 1.
    """

    groups: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    kind: str
    offset: int

    def sources(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(group, member) supplying each slice, each (depth,); only for exclusive partitions."""
        used = self.weights > 0
        z = self.groups[used]
        if z.numel() != depth or not torch.equal(torch.sort(z).values, torch.arange(depth)):
            raise ValueError("not an exclusive partition: a slice has zero or several sources")
        g, m = used.nonzero(as_tuple=True)
        order = torch.argsort(z)
        return g[order], m[order]

    def counts(self, depth: int) -> torch.Tensor:
        """Total weight each slice receives (1 everywhere for an exclusive partition)."""
        return torch.zeros(depth, dtype=torch.float64).index_add_(0, self.groups.reshape(-1),
                                                                  self.weights.reshape(-1))


def _assemble(depth: int, groups: list[list[int]], kind: str, label: int, offset: int) -> Partition:
    """Exclusive partition from main groups (in order) plus edge groups: each slice's first cover wins."""
    covered = [False] * depth
    kept, weights = [], []
    for grp in groups:
        w = []
        for z in grp:
            w.append(0.0 if covered[z] else 1.0)
            covered[z] = True
        if any(w):
            kept.append(grp)
            weights.append(w)
    if not all(covered):  # pragma: no cover - guarded by construction; a failure here is a bug
        raise AssertionError(f"partition of {depth} slices leaves {covered.count(False)} uncovered")
    g = torch.tensor(kept, dtype=torch.long)
    return Partition(g, torch.full((len(kept),), label, dtype=torch.long),
                     torch.tensor(weights, dtype=torch.float64), kind, offset)


def _adjacent(depth: int, offset: int, overlap: bool) -> Partition:
    if depth < SLAB:  # repeat the last slice to fill the slab; only the first occurrence is used
        return _assemble(depth, [[min(k, depth - 1) for k in range(SLAB)]], "adjacent", LABEL_ADJACENT, 0)
    if overlap:
        g = torch.arange(depth - SLAB + 1)[:, None] + torch.arange(SLAB)
        return Partition(g, torch.full((len(g),), LABEL_ADJACENT), torch.ones(g.shape, dtype=torch.float64),
                         "adjacent-overlap", 0)
    main = [[z0 + k for k in range(SLAB)] for z0 in range(offset, depth - SLAB + 1, SLAB)]
    head = [list(range(SLAB))]                     # covers the slices before the first triplet
    tail = [list(range(depth - SLAB, depth))]      # covers those after the last one
    return _assemble(depth, main + head + tail, "adjacent", LABEL_ADJACENT, offset)


def _jump(depth: int, stride: int, overlap: bool) -> Partition:
    span = (SLAB - 1) * stride
    if overlap:
        g = torch.arange(depth - span)[:, None] + stride * torch.arange(SLAB)
        return Partition(g, torch.full((len(g),), LABEL_STRIDED), torch.ones(g.shape, dtype=torch.float64),
                         "jump-overlap", 0)
    block = SLAB * stride
    starts = [b * block for b in range(depth // block)]
    if depth % block:
        starts.append(depth - block)               # an end-aligned block covers the remainder
    groups = [[b + m + k * stride for k in range(SLAB)] for b in starts for m in range(stride)]
    return _assemble(depth, groups, "jump", LABEL_STRIDED, 0)


def partition(depth: int, step: int, kind: str, offset: int | torch.Generator = 0, stride: int = DEFAULT_STRIDE,
              overlap: bool = False) -> Partition:
    """The groups of a ``depth``-slice volume at sampler step ``step`` (0-based).

    ``kind``: ``"adjacent"`` (DiffusionBlend), ``"jump"`` or ``"alternate"`` (DiffusionBlend++: jump at even
    steps, adjacent at odd ones). ``offset`` of the adjacent triplets: an int (taken mod 3; the function
    is then pure) or a ``torch.Generator`` from which it is drawn uniformly in {0, 1, 2} at adjacent steps
    only. A jump step on a volume thinner than ``3 * stride`` slices uses the adjacent partition.
    ``overlap``: every sliding window instead of a partition (the ``average_overlaps`` variant).
    """
    depth, stride = int(depth), int(stride)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if stride < 2:
        raise ConfigError(f"stride must be >= 2, got {stride}", fix=f"use the reference's stride {DEFAULT_STRIDE}")
    if kind not in KINDS:
        raise ValueError(f"partition kind must be one of {KINDS}, got {kind!r}")
    if kind == "alternate":
        kind = "jump" if step % 2 == 0 else "adjacent"
    if kind == "jump" and depth >= SLAB * stride:
        return _jump(depth, stride, overlap)
    if isinstance(offset, torch.Generator):
        off = int(torch.randint(0, SLAB, (1,), generator=offset))
    else:
        off = int(offset) % SLAB
    return _adjacent(depth, off, overlap)


def blend(estimates: torch.Tensor, part: Partition, depth: int) -> torch.Tensor:
    """Per-slice estimates (n, depth, ...) from group estimates (n, G, 3, ...) by the partition's weights."""
    n, g = estimates.shape[:2]
    w = part.weights.to(device=estimates.device, dtype=estimates.dtype)
    flat = estimates.reshape(n, g * SLAB, *estimates.shape[3:])
    idx = part.groups.reshape(-1).to(estimates.device)
    out = torch.zeros((n, depth, *estimates.shape[3:]), device=estimates.device, dtype=estimates.dtype)
    out.index_add_(1, idx, flat * w.reshape(1, -1, *([1] * (flat.ndim - 2))))
    count = part.counts(depth).to(device=estimates.device, dtype=estimates.dtype)
    return out / count.reshape(1, -1, *([1] * (out.ndim - 2)))


def denoise_slabs(denoiser: Any, x: torch.Tensor, sigma: torch.Tensor, part: Partition, batch_size: int
                  ) -> torch.Tensor:
    """Tweedie estimates of every group: ``x`` (n, Z, C, H, W) VE-form slices -> (n, G, 3, C, H, W).

    Slabs of all samples go through ``denoiser`` in batches of ``batch_size`` with their spacing labels.
    """
    n, c = x.shape[0], x.shape[2]
    slabs = to_slab_channels(x[:, part.groups.to(x.device)]).reshape(-1, SLAB * c, *x.shape[-2:])
    labels = part.labels.to(x.device).repeat(n)
    outs = [denoiser(slabs[i:i + batch_size], sigma, {"class_labels": labels[i:i + batch_size]})
            for i in range(0, len(slabs), batch_size)]
    return from_slab_channels(torch.cat(outs), c).reshape(n, len(part.groups), SLAB, c, *x.shape[-2:])


def _check_setup(method: str, problem: ReconProblem, prior: Prior, p: dict[str, Any]) -> None:
    if not 0.0 <= float(p["eta"]) <= 1.0:
        raise ConfigError(f"{method}: eta must lie in [0, 1], got {p['eta']}", fix="the reference uses eta: 0.85")
    if int(p["batch_size"]) < 1:
        raise ConfigError(f"{method}: batch_size must be >= 1, got {p['batch_size']}", fix="e.g. batch_size: 16")
    if int(p["stride"]) < 2:
        raise ConfigError(f"{method}: stride must be >= 2, got {p['stride']}",
                          fix=f"use the stride the prior was trained with (default {DEFAULT_STRIDE})")
    if len(problem.image_shape) != 3:
        raise InputError(f"{method} reconstructs volumes (Z, Y, X); this problem's image is "
                         f"{tuple(problem.image_shape)}", fix="give a volume measurement, or use dds for 2D")
    if prior.meta.get("kind") != "slab":
        raise ConfigError(f"{method} needs a slab prior (3 slices as channels with spacing labels); this prior's "
                          f"kind is {prior.meta.get('kind')!r}",
                          fix="train one with train.kind: slab and load it with slab_prior_from_checkpoint")


def blend_sample(problem: ReconProblem, params: dict | None, prior: Prior, generator: torch.Generator | None,
                 method: str) -> ReconResult:
    """The DiffusionBlend sampler; ``method`` "diffusionblend" (adjacent) or "diffusionblend++" (alternate)."""
    p = check_params(method, params)
    _check_setup(method, problem, prior, p)
    kind = "adjacent" if method == "diffusionblend" else "alternate"
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])
    op, depth, dev = lay.op, lay.image_shape[0], lay.y.device
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]), float(p["start"]))
    start_image = warm_start_image(method, problem, p)
    den = lay.denoiser
    reset_nfe(den)
    # Partition offsets come from their own stream, seeded once from the sampler's generator, so the
    # partition sequence does not depend on how many samples are drawn per pass.
    gen_dev = generator.device if generator is not None else torch.device("cpu")   # CUDA generators draw on CUDA
    part_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev)))
    parts = [partition(depth, k, kind, part_gen, int(p["stride"]), bool(p["average_overlaps"]))
             for k in range(len(pairs))]
    with torch.no_grad():
        aty = op.adjoint(lay.y)
    w = absolute_dc_weights(op, aty, p, problem.adjoint_abs_max)
    t_start = time.perf_counter()
    outs, res_prior, res_dc = [], [], []
    slab_evals = 0
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    for n in chunks:
        shape = lay.batch_shape(n)
        state = ZTVState()
        x = torch.randn(shape, generator=generator, dtype=torch.float64, device=gen_dev).to(device=dev, dtype=lay.dtype)
        if start_image is not None:     # warm start, as in DDS
            x = diffuse(lay.batch(start_image.expand(n, *lay.image_shape)), sched.alpha_bar(pairs[0][0]), x)
        step_rp, step_rd = [], []
        with torch.no_grad():
            for (t, t_next), part in zip(pairs, parts, strict=True):
                ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
                sigma = ((1 - ab) / ab).sqrt().to(lay.dtype)
                xs = (x / ab.sqrt().to(lay.dtype)).reshape(n, depth, *shape[1:])
                x0 = blend(denoise_slabs(den, xs, sigma, part, int(p["batch_size"])), part, depth).reshape(shape)
                slab_evals += n * len(part.groups)
                eps = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).to(lay.dtype)
                xi = lay.image(x0, n)
                step_rp.append(float(lay.residual_norms(xi).mean()))
                if p["ztv"]:
                    xi = ztv_admm_step(op, None, xi, state, w["rho"], w["ztv_lambda"],
                                       int(p["cg_iter"]), axis=-3, n_batch=1, tol=float(p["cg_tol"]), aty=aty)
                else:
                    xi = cg_normal(op, None, xi, int(p["cg_iter"]), w["lam"], float(p["cg_tol"]),
                                   n_batch=1, aty=aty)
                step_rd.append(float(lay.residual_norms(xi).mean()))
                x0 = lay.batch(xi)
                if report:
                    report(xi, t=int(t), sigma=float(sigma), partition=part.kind)
                noise = torch.randn(shape, generator=generator, dtype=torch.float64, device=gen_dev).to(
                    device=dev, dtype=lay.dtype) if t_next >= 0 else None
                x = ddim_step(x0, eps, ab, ab_next, float(p["eta"]), noise, "dds")
        outs.append(lay.image(x, n))
        res_prior.append(step_rp)
        res_dc.append(step_rd)
    samples = torch.cat(outs)
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    chunks = torch.tensor(res_prior, dtype=torch.float64), torch.tensor(res_dc, dtype=torch.float64)
    info = {"method": method, "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res),
            # mean ||y - A x|| per operator application at each step, before (prior x0_hat) and after DC
            "residual_prior": chunks[0].mean(0).tolist(), "residual_dc": chunks[1].mean(0).tolist(),
            "partitions": [(part.kind, part.offset) for part in parts], "slab_evaluations": slab_evals}
    # NFE = network evaluations along one sample's chain (one per step run), as the papers count it; the
    # batched calls it took (more when samples or slab groups are split into passes) are in info
    info["network_calls"] = int(getattr(den, "nfe", len(pairs)))
    return ReconResult(samples=samples, nfe=len(pairs), info=info)


@register_method("diffusionblend", defaults=BLEND_DEFAULTS, prior="slab", loader=_SLAB_LOADER, paper=_PAPER,
                 memory_copies=64, init="param")
def diffusionblend(problem: ReconProblem, params: dict, prior: Prior,
                   generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, Z, Y, X) by DiffusionBlend (adjacent partitions, random offsets)."""
    return blend_sample(problem, params, prior, generator, "diffusionblend")


@register_method("diffusionblend++", defaults=BLEND_DEFAULTS, prior="slab", loader=_SLAB_LOADER,
                 paper=_PAPER + " (DiffusionBlend++)", memory_copies=64, init="param")
def diffusionblend_pp(problem: ReconProblem, params: dict, prior: Prior,
                      generator: torch.Generator | None = None) -> ReconResult:
    """Posterior samples (S, Z, Y, X) by DiffusionBlend++ (alternating jump and adjacent partitions)."""
    return blend_sample(problem, params, prior, generator, "diffusionblend++")
