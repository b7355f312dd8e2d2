"""Any in-plane size for whole-slice networks: a background-padded canvas around the image.

A MONAI ``DiffusionModelUNet`` with L levels halves its input L - 1 times, so it only takes sides that are
multiples of ``2^(L-1)`` (a latent prior's pixels: of ``f * 2^(L-1)`` for an autoencoder downsampling by f).
Real volumes have any size (101 x 122, primes). The samplers therefore never hand the network the image
itself but a *canvas*: the image centred (as training's ``fit_square`` centres it) in the smallest frame
whose sides are multiples, the rest filled with the **background**, the value air takes in the network
domain as training saw it (:func:`medrecon.diffusion.normalisation.background`: -1 for the default CT
window, i.e. -1000 HU; 0 for MR). Not reflection (near the edge of the field of view it would invent
anatomy the operator never saw), not zero in network units (mid-grey, water, for a CT window).

What the diffusion process needs. At noise level sigma a padded pixel of ``x_t`` must look like noisy
background, ``sqrt(ab) b + sqrt(1 - ab) eps``; padding ``x_t`` with the constant b would show the network
a noise-free strip next to noise, which it never saw in training. medrecon pads the *clean* quantity
instead and lets the sampler's own update make the noise:

* the sampler state lives on the canvas (initial noise fills it all);
* :class:`CanvasDenoiser` returns the background in the padded region: the Tweedie estimate of a pixel
  known to be background is that value, which is exact for the prior "image, surrounded by air";
* image-domain steps (data consistency, residuals) see the cropped image only, and the clean estimate
  goes back to the canvas padded with the background (:meth:`Canvas.pad`); a guidance gradient (DPS) is
  kept to the image (:meth:`Canvas.zero_padding`).

The DDIM / DDPM update then re-noises the padded region with the noise estimate ``eps_hat = (x_t - sqrt(ab)
b) / sqrt(1 - ab)``, which there *is* the state's own noise: the padded region of ``x_t`` stays an exact
noisy background at every step, and the network always sees in-distribution input. Padding is done in
one place, :class:`medrecon.methods.sampling.SliceLayout`, which DDS, DPS, DiffusionBlend and the latent
samplers share; patch priors (PaDIS) tile any size instead (:mod:`medrecon.diffusion.patches`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medrecon.diffusion.denoiser import Denoiser
from medrecon.diffusion.normalisation import KINDS, background


def network_multiple(denoiser: Any) -> int:
    """The factor the sides of a denoiser's input must be multiples of (1 when it has no such constraint).

    Read from ``denoiser.size_multiple`` or its network's (``denoiser.net.size_multiple``, which
    :class:`medrecon.diffusion.networks.DiffusionUNet` has); analytic denoisers take any size.
    """
    for obj in (denoiser, getattr(denoiser, "net", None)):
        m = getattr(obj, "size_multiple", None)
        if m:
            return max(1, int(m))
    return 1


def prior_background(prior: Any) -> float:
    """Network-domain value of air for a prior: ``meta["background"]``, else its normalisation's background,
    else the prior value of image 0 (``offset``; attenuation 0 is air for CT, 0 is no signal for MR)."""
    meta = getattr(prior, "meta", None) or {}
    if "background" in meta:
        return float(meta["background"])
    norm = meta.get("normalisation")
    if isinstance(norm, dict) and norm.get("kind") in KINDS:
        return background(norm)
    return float(getattr(prior, "offset", 0.0))


def prior_label(prior: Any) -> str:
    """How error messages name a prior: its checkpoint (and trained size) when known."""
    meta = getattr(prior, "meta", None) or {}
    name = meta.get("checkpoint") or f"{meta.get('kind', 'diffusion')} prior"
    size = meta.get("image_size")
    return f"{name} (trained on {size}x{size} images)" if size else str(name)


@dataclass(frozen=True)
class Canvas:
    """An ``height x width`` image centred in the smallest frame whose sides are multiples of ``multiple``."""

    height: int
    width: int
    multiple: int = 1
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.multiple < 1:
            raise ValueError(f"canvas needs positive sizes, got {self.height}x{self.width} (multiple {self.multiple})")

    @property
    def shape(self) -> tuple[int, int]:
        """Padded (H, W)."""
        m = self.multiple
        return -(-self.height // m) * m, -(-self.width // m) * m

    @property
    def identity(self) -> bool:
        """True when no padding is needed (the image already has multiple sides)."""
        return self.shape == (self.height, self.width)

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) padding; the odd pixel goes after, as ``fit_square`` does."""
        ph, pw = self.shape[0] - self.height, self.shape[1] - self.width
        return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> (..., H', W') with the background around the image (differentiable)."""
        if self.identity:
            return x
        top, bottom, left, right = self.widths
        lead = x.shape[:-2]
        flat = x.reshape(-1, 1, *x.shape[-2:])
        out = F.pad(flat, (left, right, top, bottom), mode="constant", value=float(self.value))
        return out.reshape(*lead, *out.shape[-2:])

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H', W') -> (..., H, W): the image part of a canvas."""
        if self.identity:
            return x
        if tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"expected a {self.shape} canvas, got {tuple(x.shape[-2:])}")
        top, _, left, _ = self.widths
        return x[..., top:top + self.height, left:left + self.width]

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean (H', W'), True in the padded region."""
        inside = torch.zeros(self.shape, dtype=torch.bool, device=device)
        top, _, left, _ = self.widths
        inside[top:top + self.height, left:left + self.width] = True
        return ~inside

    def fill(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """The canvas ``x`` with its padded region set to ``value`` (the image part untouched)."""
        if self.identity:
            return x
        return torch.where(self.mask(x.device), torch.full((), float(value), dtype=x.dtype, device=x.device), x)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """The canvas ``x`` with its padded region set to the background."""
        return self.fill(x, self.value)

    def zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its padded region set to 0: a likelihood gradient there is an artifact of the network's
        receptive field (padded pixels of x_t are air plus independent noise, they say nothing about y)."""
        return self.fill(x, 0.0)


class CanvasDenoiser(Denoiser):
    """``inner`` on canvases: input (B, C, H', W') in VE form, output with the background in the padded region.

    Counts its own evaluations (one per call, like the wrapped denoiser); :meth:`reset_nfe` resets both.
    """

    def __init__(self, inner: Callable[..., torch.Tensor], canvas: Canvas) -> None:
        self.inner, self.canvas = inner, canvas
        self.schedule = getattr(inner, "schedule", None)
        self.nfe = 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.canvas.shape:
            raise ValueError(f"CanvasDenoiser expects {self.canvas.shape} canvases, got {tuple(x.shape)}")
        return self.canvas.force(self.inner(x, sigma, cond))

    def reset_nfe(self) -> None:
        self.nfe = 0
        if hasattr(self.inner, "reset_nfe"):
            self.inner.reset_nfe()
