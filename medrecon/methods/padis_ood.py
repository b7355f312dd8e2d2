"""padis_ood: self-supervised adaptation of a PaDIS patch prior to ONE measurement (SCD with a patch network).

Paper: Hu, Song, Fessler, Shen, "Patch-Based Diffusion Models Beat Whole-Image Models for Mismatched Distribution
Inverse Problems", arXiv 2410.11730 (single-measurement setting: "a self-supervised loss that helps the network
output maintain consistency with the measurement"). No code is public; its whole-image comparator is SCD
(Barbano et al.), and the construction here is SCD with PaDIS's patch network (``docs/algorithms.md`` section 17,
algorithms-wave2 5.2): the chain, the LoRA and the loss are exactly :mod:`medrecon.methods.scd`'s
(:func:`~medrecon.methods.scd.run_scd`, :mod:`medrecon.diffusion.adapt`), with net_theta the stitched whole-image
denoiser of :class:`~medrecon.diffusion.patches.PatchDenoiser` (random non-overlapping patch grid redrawn at every
evaluation, so at every adaptation iteration too, from a generator of its own so that the chain's grids do not
depend on the number of adaptation steps; coordinate channels; padding ring forced to the background).
LoRA goes into the patch UNet (shared by every patch, slice and sample of a pass).

Per step t -> s of a VP DDIM grid (the patch prior is EDM-parameterised; a VP state is denoised as
D(x_t / sqrt(ab_t), sigma_t), which is the same posterior mean): eps_base with LoRA off; adaptation (K Adam steps
on mean |A u - y|^2 + tv TV(u), u = CG_gamma(crop(D_theta))) at the adaptation steps; x_s = sqrt(ab_s) u + c1 z +
c2 eps_base on the padded state (u padded with the background). The adapted weights are an output
(``info["artifacts"]["adapted"]``, written by the reconstruct step beside the reconstruction).

Departures (hyperparameters of the patch version are not published), on purpose:
* The state is the padded image (PaDIS's), started at the background diffused to the first step's level.
* Only the steps with sigma_t <= ``sigma_max`` (PaDIS's 10) run: the patch network is trained on EDM's
  ln sigma ~ N(-1.2, 1.2^2), and the VP grid's first sigmas (~157) lie far outside it. ``steps`` is the grid over
  the whole schedule (100 steps: about 60 run).
* Defaults are SCD's (``conditional_sampling.py``), not tuned for patches; ``patch_size: null`` picks a trained
  size that tiles (:func:`medrecon.methods.padis.choose_patch_size`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.patches import PatchDenoiser, crop_image, pad_image, reference_lengths
from medrecon.errors import ConfigError
from medrecon.methods.padis import _PATCH_LOADER, _geometry, choose_patch_size
from medrecon.methods.sampling import DTYPES, SliceLayout
from medrecon.methods.scd import SCD_DEFAULTS, SCD_PAPER, Chain, check_scd_params, run_scd
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

PADIS_OOD_DEFAULTS: dict[str, Any] = {**SCD_DEFAULTS, "sigma_max": 10.0, "patch_size": None, "max_batch": 256}
_PAPER = ("Hu, Song, Fessler, Shen: Patch-Based Diffusion Models Beat Whole-Image Models for Mismatched "
          "Distribution Inverse Problems (arXiv 2410.11730), self-supervised single-measurement setting, built as "
          "SCD with the PaDIS patch prior; SCD: " + SCD_PAPER)


@register_method("padis_ood", defaults=PADIS_OOD_DEFAULTS, prior="patch", loader=_PATCH_LOADER, paper=_PAPER,
                 memory_copies=64)
def padis_ood(problem: ReconProblem, params: dict, prior: Prior, generator: torch.Generator | None = None
              ) -> ReconResult:
    """Samples (S, *image_shape) by SCD adaptation of a 2D patch prior; adapted LoRA in ``info["artifacts"]``."""
    p = check_scd_params("padis_ood", params)
    if float(p["sigma_max"]) <= 0:
        raise ConfigError(f"padis_ood: sigma_max must be > 0, got {p['sigma_max']}", fix="PaDIS uses sigma_max 10")
    geom = _geometry(prior, three_d=False)
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]], multiple=1)   # padding: the patch grid's own
    pw = int(geom["pad_width"])
    pads = (pw, pw)
    lengths = tuple(lay.image_shape[-2:])
    mult = int(prior.meta.get("network_multiple", 1))
    psize = p["patch_size"]
    try:
        if psize is None:
            psize = choose_patch_size(lengths, pads, list(geom["patch_sizes"]), mult, "stitch")
        psize = int(psize)
        if psize % mult:
            raise ConfigError(f"patch_size {psize} is not a multiple of {mult} (the network halves it "
                              f"{int(math.log2(mult))} times)", fix=f"use a multiple of {mult}")
        seeds = torch.randint(0, 2**62, (2,), generator=generator).tolist() if generator is not None else [0, 1]
        chain_grids, adapt_grids = (torch.Generator().manual_seed(int(s)) for s in seeds)
        pad_value = float(geom["pad_value"])
        spatial = tuple(n + 2 * pw for n in lengths)

        def wrap(den: Any, grids: torch.Generator = chain_grids) -> PatchDenoiser:
            return PatchDenoiser(den, (psize, psize), pads, mode="stitch", max_batch=int(p["max_batch"]),
                                 pad_value=pad_value, generator=grids, reference=reference_lengths(geom, False))

        wrap(prior.denoiser).tilings(spatial)        # validates the patch size now, with a clear message
    except ConfigError as err:
        raise ConfigError(f"padis_ood: the patch prior cannot tile this {'x'.join(map(str, lengths))} image: "
                          f"{err.message}", fix=err.fix) from err

    def shape(n: int) -> tuple[int, ...]:
        return (n * lay.n_slices, prior.channels, *spatial)

    def to_image(state: torch.Tensor, n: int) -> torch.Tensor:
        return lay.image(crop_image(state, pads), n)

    def to_state(img: torch.Tensor) -> torch.Tensor:
        return pad_image(lay.batch(img), pads, pad_value)

    def init(n: int, ab: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Air (the background) diffused to the first step's level: sqrt(ab) bg + sqrt(1 - ab) z."""
        z = lay.noise(shape(n), gen)
        return (ab.sqrt() * pad_value + (1 - ab).sqrt() * z).to(lay.dtype)

    chain = Chain(lay=lay, shape=shape, to_image=to_image, to_state=to_state, wrap=wrap, init=init,
                  wrap_adapt=lambda den: wrap(den, adapt_grids))
    res = run_scd("padis_ood", problem, p, prior, generator, chain, sigma_max=float(p["sigma_max"]))
    res.info.update(patch_shape=[psize, psize], pad=list(pads), params={**p, "patch_size": psize})
    return res
