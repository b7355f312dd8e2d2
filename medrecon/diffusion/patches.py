"""Patch diffusion priors (PaDIS): coordinate channels, padded patch training data, stitched whole-image denoiser.

Paper: Hu, Song, Xu, Shen, Fessler, "Learning Image Priors through Patch-based Diffusion Models for Solving
Inverse Problems", NeurIPS 2024; reference code ``jasonhu4/PaDIS@1970ef2`` (see ``docs/algorithms.md`` section 5).
The idea: the prior of a whole image is modelled as a product of patch priors, so the whole-image score is a
sum of patch scores. A network is trained on small patches of zero-padded images, told *where* each patch
lies by coordinate channels; at sampling time a non-overlapping grid of patches, shifted at random at every
evaluation, is denoised in one batch and the outputs are stitched into the whole-image denoiser.

What this module holds, and the one rule it enforces: :func:`coordinate_channels` is the single place where
a pixel's position becomes network input. Training items (:class:`PatchDataset`) and the inference denoiser
(:class:`PatchDenoiser`) both call it with the *padded* image shape, so positions are normalised identically
(pos = (idx / (R - 1) - 0.5) * 2, R = padded length of that axis; the reference normalises by different
padded sizes in training and inference, medrecon does not). An image of another size than the trained
one (any size: odd, prime, non-square) is first mapped onto the trained frame - image pixels stretched onto
the trained image, the padding ring onto the trained ring (:func:`reference_index`) - so a coordinate means
at inference what it meant in training: "this far across the field of view", or "this far into the air
around it".

Layout conventions
    2D patches ``(C, P, P)`` with 2 coordinate channels ``(y, x)``. 3D patches ``(C, d, P, P)`` (the
    ``padis3d`` variant, beyond the paper) go through the same *2D* UNet with the d slices as channels
    (``C * d`` channels, channel-major: :func:`to_slab_channels`) plus 3 coordinate channels ``(z, y, x)``
    where z is the slab's centre (:func:`slab_coords`). A 2D UNet on slabs is what DiffusionBlend does too;
    it couples neighbouring slices at the cost of one 2D forward pass per slab, where a 3D UNet would cost
    d times more on CPU.

Departures from the reference, on purpose
    * The padding value is the normalisation's background (air: -1 for a CT window mapped to [-1, 1], 0 for
      MR); the reference pads with 0 in its [0, 1] domain, which is also air. The padding ring of the
      denoised image is forced to that value.
    * The grid: per axis, ``k`` patches with stride P (stitching) or P/2 (``mode="overlap"``, averaged), and
      the grid origin is drawn uniformly from every offset in ``[0, pad]`` that keeps the grid inside the
      padded image and covering the image; ``k`` is chosen to allow the most offsets. For the reference's
      N = 256, pad 24, P = 56 this is the reference's grid (k = 5, 25 offsets). One origin per evaluation,
      shared by all slices and samples of the batch.
    * The paper's ablation rows (its Table 2), reference ``denoise_padding.py``: ``mode="average"`` is
      ``denoisedOverlap`` ("Patch Averaging": a *fixed* grid, stride P - ``overlap``, overlapping outputs
      averaged) and ``mode="tile"`` is ``denoisedTile`` ("Patch Stitching": the same fixed grid, each pixel
      taken from the *last* patch that covers it, no averaging). The reference starts the averaging grid at
      the image's first pixel and the tiling grid at padded pixel 4 (for pad 24); medrecon starts both at
      the largest admissible origin <= pad (the image's first pixel whenever the grid fits), and a grid is
      admissible only if it covers the image and stays inside the padded image (the reference asserts the
      latter on its one geometry).
    * Variable patch sizes in training: one size per batch (items of a batch must stack), drawn with the
      configured probabilities; the dataset's ``__getitems__`` (which torch's DataLoader calls with the
      whole batch of keys) picks it, and ``batch_multipliers`` (default P_max / P, the reference's ratio
      16/32/64 for 64/32/16) give small patches bigger batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medrecon.config.options import fill_defaults
from medrecon.diffusion.datasets import TrainingDataset, VolumeSlices, phase_mode, training_phase
from medrecon.diffusion.denoiser import Denoiser, sigma_batch
from medrecon.diffusion.kinds import register_kind
from medrecon.diffusion.normalisation import background, to_network, validate_normalisation
from medrecon.errors import ConfigError

PATCH_DEFAULTS: dict[str, Any] = {
    "pad_width": 24,                 # in-plane zero padding of training images (pixels); fixes the coordinates
    "patch_sizes": [16, 32, 64],     # training patch sizes P (pixels)
    "patch_probs": [0.2, 0.3, 0.5],  # their probabilities (reference: 0.4(1-p), 0.6(1-p), p with p = 0.5)
    "batch_multipliers": None,       # patches per key for each size; None = P_max // P (reference ratio)
    "depth": None,                   # None: 2D patches (padis); d: d x P x P slabs (padis3d)
    "pad_z": None,                   # 3D only: padding in z (slices); None = depth - 1
    "flips": ["x"],                  # random flips: subset of x, y (and z for 3D)
    "random_phase": False,           # MR, 2 channels: false, true (constant) or smooth (datasets.training_phase)
}


# ---------------------------------------------------------------------------------------------- coordinates


def reference_index(idx: torch.Tensor, length: int, pad: int, reference: int) -> torch.Tensor:
    """Map indices of a padded axis (image ``length``, ``pad`` each side) onto a padded axis whose image has
    ``reference`` pixels: the image is stretched linearly onto the reference image (first and last pixels
    onto first and last), the padding rings keep their width (left ring unchanged, right ring shifted)."""
    if length == reference:
        return idx
    core = idx - pad
    stretch = (reference - 1) / (length - 1) if length > 1 else 0.0
    inside = pad + core * stretch + (0.0 if length > 1 else (reference - 1) / 2)
    out = torch.where(core < 0, idx, inside)
    return torch.where(core > length - 1, idx + (reference - length), out)


def coordinate_channels(padded_shape: Sequence[int], start: Sequence[int] | None = None,
                        size: Sequence[int] | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, *, pad: Sequence[int] | None = None,
                        reference: Sequence[int] | None = None) -> torch.Tensor:
    """Position of every pixel of a window of the padded image, one channel per axis, in [-1, 1].

    Channel ``i`` holds ``(idx_i / (R_i - 1) - 0.5) * 2`` with ``idx_i`` the index along axis i of the
    *padded* image (length ``R_i``; 0 when R_i = 1). ``start``/``size`` select a window (default: all), so
    a training patch and the inference grid compute identical numbers. Returns ``(n_axes, *size)``.

    ``reference`` (image lengths per axis the prior was trained on, with ``pad`` the padding per axis) makes
    the coordinates of an image of *another* size mean what they meant in training: ``idx`` is first mapped
    by :func:`reference_index` (the image onto the trained image, the padding ring onto the trained ring)
    and normalised by the trained padded length. Without it an image larger than the trained one would put
    its edge pixels at coordinates that in training were padding (air), and a smaller one its padding at
    coordinates that were anatomy. For the trained size both forms are identical.
    """
    shape = [int(r) for r in padded_shape]
    start = [0] * len(shape) if start is None else [int(s) for s in start]
    size = shape if size is None else [int(s) for s in size]
    pads = [0] * len(shape) if pad is None else [int(p) for p in pad]
    refs = [r - 2 * p for r, p in zip(shape, pads, strict=True)] if reference is None else [int(n) for n in reference]
    axes = []
    for r, s, k, p, ref in zip(shape, start, size, pads, refs, strict=True):
        idx = reference_index(torch.arange(s, s + k, dtype=torch.float64), r - 2 * p, p, ref)
        r_ref = ref + 2 * p
        axes.append((idx / (r_ref - 1) - 0.5) * 2 if r_ref > 1 else torch.zeros(k, dtype=torch.float64))
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids).to(device=device, dtype=dtype)


def slab_coords(coords: torch.Tensor) -> torch.Tensor:
    """3D patch coordinates (3, d, P, P) -> (3, P, P) for the 2D slab network: z is the slab centre."""
    return coords.mean(dim=-3)


def to_slab_channels(x: torch.Tensor) -> torch.Tensor:
    """(..., C, d, P, P) -> (..., C * d, P, P), channel-major (the slab network's input layout)."""
    return x.reshape(*x.shape[:-4], x.shape[-4] * x.shape[-3], *x.shape[-2:])


def from_slab_channels(x: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`to_slab_channels`."""
    return x.reshape(*x.shape[:-3], x.shape[-3] // depth, depth, *x.shape[-2:])


# ---------------------------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class AxisTiling:
    """Grid along one axis: ``k`` patches of ``patch`` at ``origin + stride * j``, origin in [lo, hi]."""

    length: int
    pad: int
    patch: int
    stride: int
    k: int
    lo: int
    hi: int

    @property
    def n_offsets(self) -> int:
        return self.hi - self.lo + 1

    def starts(self, origin: int) -> torch.Tensor:
        return origin + self.stride * torch.arange(self.k)


def axis_tiling(length: int, pad: int, patch: int, stride: int | None = None) -> AxisTiling | None:
    """The grid with the most admissible origins for an image of ``length`` padded by ``pad``, or None.

    Admissible: the grid covers the image ``[pad, pad + length)`` and stays inside the padded image
    ``[0, length + 2 pad)``, with origin in ``[0, pad]``. The number of origins is ``e + 1`` for an
    overshoot ``e = extent - length <= pad``, so k is the smallest or next-smallest count that covers.
    """
    stride = patch if stride is None else int(stride)
    if patch < 1 or stride < 1 or stride > patch:
        raise ConfigError(f"invalid patch {patch} / stride {stride}", fix="use 1 <= stride <= patch")
    k0 = max(1, math.ceil((length - patch) / stride) + 1)
    best = None
    for k in range(k0, k0 + max(2, math.ceil(patch / stride) + 1)):
        extent = (k - 1) * stride + patch
        lo, hi = max(0, pad + length - extent), min(pad, length + 2 * pad - extent)
        if lo <= hi and (best is None or hi - lo > best.hi - best.lo):
            best = AxisTiling(length, pad, patch, stride, k, lo, hi)
    return best


def valid_patch_sizes(length: int, pad: int, candidates: Sequence[int]) -> list[int]:
    """Those patch sizes for which a non-overlapping grid exists on an axis (for error messages)."""
    return [p for p in candidates if axis_tiling(length, pad, p) is not None]


def patch_indices(padded_shape: Sequence[int], patch_shape: Sequence[int],
                  starts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear indices (n_patches, prod(patch)) into the flattened padded image of every patch of a grid."""
    n = len(padded_shape)
    strides = [math.prod(padded_shape[a + 1:]) for a in range(n)]
    total = torch.zeros((1,) * (2 * n), dtype=torch.long)
    for a in range(n):
        pos = starts[a].reshape(-1, 1) + torch.arange(patch_shape[a]).reshape(1, -1)   # (k_a, P_a)
        view = [1] * (2 * n)
        view[a], view[n + a] = pos.shape[0], pos.shape[1]
        total = total + (pos * strides[a]).reshape(view)
    k_total = math.prod(total.shape[:n])
    return total.reshape(k_total, math.prod(patch_shape))


def extract_patches(x: torch.Tensor, idx: torch.Tensor, patch_shape: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B * n_patches, C, *patch_shape): the patches ``idx`` of every batch element."""
    b, c = x.shape[:2]
    g = x.reshape(b, c, -1)[:, :, idx.to(x.device)]          # (B, C, n, p)
    return g.permute(0, 2, 1, 3).reshape(b * idx.shape[0], c, *patch_shape)


def stitch_patches(patches: torch.Tensor, idx: torch.Tensor, spatial: Sequence[int], b: int,
                   fill: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`extract_patches`: overlapping pixels averaged, pixels no patch covers set to ``fill``.

    ``weights`` (n_patches, prod(patch)), optional: each patch pixel's weight in that average (0/1 weights from
    :func:`last_cover_weights` make it "each pixel from the last patch covering it")."""
    n, p = idx.shape
    c = patches.shape[1]
    vals = patches.reshape(b, n, c, p).permute(0, 2, 1, 3).reshape(b, c, n * p)
    flat = idx.reshape(-1).to(patches.device)
    npix = math.prod(spatial)
    if weights is not None:
        w = weights.reshape(-1).to(device=patches.device, dtype=patches.dtype)
        vals = vals * w
        counts = torch.zeros(npix, dtype=patches.dtype, device=patches.device).index_add(0, flat, w)
    else:
        counts = torch.bincount(flat, minlength=npix).to(patches.dtype)
    out = torch.zeros(b, c, npix, dtype=patches.dtype, device=patches.device).index_add(2, flat, vals)
    out = torch.where(counts > 0, out / counts.clamp_min(1), torch.full_like(out, fill))
    return out.reshape(b, c, *spatial)


def last_cover_weights(idx: torch.Tensor, npix: int) -> torch.Tensor:
    """0/1 weights (n_patches, prod(patch)): 1 where patch i is the last (highest index) covering that pixel.

    The reference's ``denoisedTile`` writes its patches in grid order, so a later patch overwrites the pixels
    it shares with an earlier one; patch order here is the same row-major grid order (:func:`patch_indices`).
    """
    n, p = idx.shape
    owner = torch.full((npix,), -1, dtype=torch.long)
    order = torch.arange(n).repeat_interleave(p)
    owner = owner.scatter_reduce(0, idx.reshape(-1).cpu(), order, reduce="amax")
    return (owner[idx.cpu()] == torch.arange(n)[:, None]).to(torch.float64)


# ---------------------------------------------------------------------------------------------- denoiser


PATCH_MODES = {
    "stitch": "PaDIS: non-overlapping grid, new random shift per evaluation",
    "overlap": "half-overlapping grid (stride P/2), random shift, averaged",
    "average": "paper's Patch Averaging row: fixed grid, stride P - overlap, averaged",
    "tile": "paper's Patch Stitching row: fixed grid, stride P - overlap, last patch wins",
}
FIXED_GRID_MODES = ("average", "tile")


def mode_stride(mode: str, size: int, overlap: int = 8) -> int:
    """Grid stride along an axis with patches of ``size`` in a :data:`PATCH_MODES` mode."""
    if mode == "stitch":
        return size
    if mode == "overlap":
        return max(1, size // 2)
    return max(1, size - overlap)


def mode_tiling(length: int, pad: int, size: int, mode: str, overlap: int = 8) -> AxisTiling | None:
    """The grid of a :data:`PATCH_MODES` mode along one axis, or None if none fits.

    Random-shift modes: :func:`axis_tiling` (most admissible origins). Fixed-grid modes: the reference's
    ``denoisedOverlap`` loop - start at the image's first pixel (origin = pad), add patches every stride until
    the image's last pixel is covered - moved back towards 0 only if it would leave the padded image.
    """
    stride = mode_stride(mode, size, overlap)
    if mode not in FIXED_GRID_MODES:
        return axis_tiling(length, pad, size, stride)
    if size < 1 or overlap >= size:
        return None
    k = max(1, math.ceil((length - size) / stride) + 1)
    extent = (k - 1) * stride + size
    origin = min(pad, length + 2 * pad - extent)
    return AxisTiling(length, pad, size, stride, k, origin, origin) if origin >= 0 else None


class PatchDenoiser(Denoiser):
    """Whole-image denoiser of a padded image from a patch denoiser ``inner(x, sigma, {"coords": c})``.

    Input ``x`` is ``(B, C, *S)`` with S the *padded* spatial shape (2D, or 3D for slab priors); each call
    draws a new grid origin (from ``generator``), runs all patches of all batch elements through ``inner``
    in chunks of ``max_batch``, stitches (``mode="stitch"``) or averages half-overlapping patches
    (``mode="overlap"``), and sets the padding ring to ``pad_value``. ``patch_shape`` is (P, P) or (d, P, P).
    ``mode="average"`` / ``"tile"`` are the paper's ablation rows (fixed grid with ``overlap`` pixels between
    neighbours; averaged, or each pixel from the last patch covering it): see :data:`PATCH_MODES`.
    ``reference``: the image lengths per axis the prior was trained on (:func:`reference_lengths`), so that
    images of any other size get coordinates with the trained meaning (:func:`coordinate_channels`).
    """

    def __init__(self, inner: Callable[..., torch.Tensor], patch_shape: Sequence[int], pad: Sequence[int], *,
                 mode: str = "stitch", max_batch: int = 256, pad_value: float = 0.0,
                 generator: torch.Generator | None = None, reference: Sequence[int] | None = None,
                 overlap: int = 8) -> None:
        if mode not in PATCH_MODES:
            raise ConfigError(f"unknown patch mode {mode!r}",
                              fix="use one of " + ", ".join(f"{k!r} ({v})" for k, v in PATCH_MODES.items()))
        if int(overlap) < 0:
            raise ConfigError(f"patch overlap must be >= 0 (got {overlap})", fix="the reference uses 8 pixels")
        self.overlap = int(overlap)
        if len(patch_shape) not in (2, 3) or len(pad) != len(patch_shape):
            raise ValueError(f"patch_shape {patch_shape} and pad {pad} must both have 2 or 3 entries")
        self.inner, self.mode = inner, mode
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.pad = tuple(int(p) for p in pad)
        self.max_batch, self.pad_value = max(1, int(max_batch)), float(pad_value)
        self.generator = generator
        self.reference = None if reference is None else tuple(int(n) for n in reference)
        if self.reference is not None and len(self.reference) != len(self.pad):
            raise ValueError(f"reference {reference} needs one image length per axis of pad {pad}")
        self.last_origin: tuple[int, ...] | None = None
        self._coords: dict[tuple, torch.Tensor] = {}
        self.nfe = 0

    def tilings(self, spatial: Sequence[int]) -> list[AxisTiling]:
        """Per-axis grids for a padded spatial shape (ConfigError naming valid patch sizes if none exists)."""
        out = []
        nd = len(self.patch_shape)
        for a, (r, p, size) in enumerate(zip(spatial, self.pad, self.patch_shape, strict=True)):
            length = r - 2 * p
            overlap = self.overlap
            if self.mode in FIXED_GRID_MODES and overlap >= size:
                if a < nd - 2:   # slab depth d <= overlap: slabs at every slice (stride 1)
                    overlap = size - 1
                else:
                    raise ConfigError(f"patch_overlap {overlap} must be smaller than the patch size {size} (mode "
                                      f"{self.mode!r} steps the grid by size - overlap)",
                                      fix=f"set patch_overlap below {size} (the reference: 8 for 56-pixel patches)")
            t = mode_tiling(length, p, size, self.mode, overlap)
            if t is None:
                ok = [q for q in range(1, length + 2 * p + 1)
                      if mode_tiling(length, p, q, self.mode, overlap) is not None]
                raise ConfigError(
                    f"no patch grid of size {size} fits axis {a} (image {length}, padding {p}): the grid must "
                    f"cover the image and stay inside the padded image", fix=f"use a patch size in {ok[-8:]}")
            out.append(t)
        return out

    def grid(self, spatial: Sequence[int]) -> torch.Tensor:
        """Patch indices (n_patches, prod(patch)) of this evaluation's grid (sets ``last_origin``): a new random
        origin per call for "stitch"/"overlap", the fixed largest admissible origin for "average"/"tile"."""
        spatial = tuple(int(n) for n in spatial)
        tilings = self.tilings(spatial)
        if self.mode in FIXED_GRID_MODES:
            origin = tuple(t.hi for t in tilings)
        else:
            origin = tuple(int(torch.randint(t.lo, t.hi + 1, (1,), generator=self.generator)) for t in tilings)
        self.last_origin = origin
        return patch_indices(spatial, self.patch_shape, [t.starts(o) for t, o in zip(tilings, origin, strict=True)])

    def coords(self, spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (spatial, device, dtype)
        if key not in self._coords:
            self._coords[key] = coordinate_channels(spatial, device=device, dtype=dtype, pad=self.pad,
                                                    reference=self.reference)
        return self._coords[key]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        if cond:
            raise ValueError(f"PatchDenoiser takes no conditioning besides its coordinates, got {sorted(cond)}")
        nd = len(self.patch_shape)
        if x.ndim != 2 + nd:
            raise ValueError(f"expected (B, C, {'Z, ' if nd == 3 else ''}Y, X) padded images, got {tuple(x.shape)}")
        b, spatial = x.shape[0], tuple(x.shape[2:])
        idx = self.grid(spatial)
        patches = extract_patches(x, idx, self.patch_shape)                        # (B n, C, *P)
        coords = extract_patches(self.coords(spatial, x.device, x.dtype)[None], idx, self.patch_shape)
        if nd == 3:
            patches, coords = to_slab_channels(patches), slab_coords(coords)
        coords = coords.repeat(b, *([1] * (coords.ndim - 1)))
        n = idx.shape[0]
        sig = sigma_batch(sigma, b, x.device).repeat_interleave(n)
        outs = [self.inner(patches[i:i + self.max_batch], sig[i:i + self.max_batch],
                           {"coords": coords[i:i + self.max_batch]})
                for i in range(0, patches.shape[0], self.max_batch)]
        out = torch.cat(outs)
        if nd == 3:
            out = from_slab_channels(out, self.patch_shape[0])
        weights = last_cover_weights(idx, math.prod(spatial)) if self.mode == "tile" else None
        d = stitch_patches(out, idx, spatial, b, self.pad_value, weights)
        return torch.where(ring_mask(spatial, self.pad, x.device), torch.full_like(d, self.pad_value), d)


def reference_lengths(geom: dict[str, Any], three_d: bool) -> tuple[int, ...] | None:
    """Trained image lengths per axis ((Z,) Y, X) from a patch geometry: the median over the training shapes
    (each training image's coordinates were normalised by its own padded size). None for checkpoints that
    do not record them (coordinates then use the inference image's own padded size)."""
    shapes = geom.get("training_shapes")
    if not shapes:
        return None
    arr = np.asarray([[int(v) for v in sh[-3:]] for sh in shapes])
    med = [int(np.median(arr[:, a])) for a in range(3)]
    return tuple(med) if three_d else tuple(med[1:])


def ring_mask(spatial: Sequence[int], pad: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (*spatial) mask, True in the padding ring."""
    inside = torch.zeros(tuple(spatial), dtype=torch.bool, device=device)
    inside[tuple(slice(p, r - p) for r, p in zip(spatial, pad, strict=True))] = True
    return ~inside


def pad_image(x: torch.Tensor, pad: Sequence[int], value: float) -> torch.Tensor:
    """Pad the trailing len(pad) axes of ``x`` by ``pad`` on both sides with ``value``."""
    widths: list[int] = []
    for p in reversed(pad):
        widths += [int(p), int(p)]
    return torch.nn.functional.pad(x, widths, mode="constant", value=float(value))


def crop_image(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pad_image`."""
    n = len(pad)
    sl = tuple(slice(int(p), x.shape[x.ndim - n + a] - int(p)) for a, p in enumerate(pad))
    return x[(Ellipsis, *sl)]


# ---------------------------------------------------------------------------------------------- training data


def resolve_patch_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """PATCH_DEFAULTS filled in and checked; unknown keys are a ConfigError."""
    cfg = dict(cfg or {})
    c = fill_defaults(cfg, PATCH_DEFAULTS, what="patch option", where="the study's train.<name>.patch section")
    sizes = [int(s) for s in c["patch_sizes"]]
    probs = [float(p) for p in c["patch_probs"]]
    mult = [max(sizes) // s for s in sizes] if c["batch_multipliers"] is None \
        else [int(m) for m in c["batch_multipliers"]]
    depth = None if c["depth"] is None else int(c["depth"])
    pad_z = None if depth is None else (depth - 1 if c["pad_z"] is None else int(c["pad_z"]))
    flips = list(c["flips"])
    problems = [
        (len(sizes) >= 1 and min(sizes) >= 1, "patch_sizes must be positive integers"),
        (len(probs) == len(sizes) and min(probs) >= 0 and sum(probs) > 0,
         "patch_probs needs one non-negative number per patch size (not all 0)"),
        (len(mult) == len(sizes) and min(mult) >= 1, "batch_multipliers needs one integer >= 1 per patch size"),
        (int(c["pad_width"]) >= 0, "pad_width must be >= 0"),
        (depth is None or depth >= 1, "depth must be >= 1 (or null for 2D patches)"),
        (pad_z is None or pad_z >= 0, "pad_z must be >= 0"),
        (set(flips) <= ({"x", "y", "z"} if depth else {"x", "y"}), "flips must be a subset of x, y (z for 3D)"),
    ]
    for ok, msg in problems:
        if not ok:
            raise ConfigError(f"patch prior config: {msg} (got {cfg})", fix="correct it in the train.patch section")
    total = sum(probs)
    return {"pad_width": int(c["pad_width"]), "patch_sizes": sizes, "patch_probs": [p / total for p in probs],
            "batch_multipliers": mult, "depth": depth, "pad_z": pad_z, "flips": flips,
            "random_phase": phase_mode(c["random_phase"])}


def _crop_padded(img: np.ndarray, start: Sequence[int], size: Sequence[int], value: float) -> np.ndarray:
    """Window of ``img`` (C, *S) at ``start`` in image coordinates (may extend beyond it: filled with value)."""
    out = np.full((img.shape[0], *size), value, dtype=np.float32)
    src, dst = [], []
    for s, k, n in zip(start, size, img.shape[1:], strict=True):
        a, b = max(s, 0), min(s + k, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(slice(None), *dst)] = img[(slice(None), *src)]
    return out


class PatchDataset(TrainingDataset):
    """Random patches of zero-padded training images with their coordinate channels (kind ``"patch"``).

    ``reader(vi, z)`` returns slice z of image stack vi in the network domain as (C, Y, X) float32 (C = 1
    for magnitudes that ``complex_phase`` turns into 2 channels); ``shapes[vi] = (Z, Y, X)``. An item is
    ``{"x": (C, P, P) or (C*d, P, P), "coords": (2 or 3, P, P)}``; its patch size is drawn per *batch*.
    """

    kind = "patch"

    def __init__(self, reader: Callable[[int, int], np.ndarray], shapes: Sequence[Sequence[int]], channels: int,
                 patch: dict[str, Any], pad_value: float, complex_phase: bool = False,
                 data: list[dict[str, Any]] | None = None) -> None:
        self.reader, self.shapes = reader, [tuple(int(s) for s in sh) for sh in shapes]
        self.cfg = resolve_patch_config(patch)
        self.pad_value, self.complex_phase, self._data = float(pad_value), bool(complex_phase), data or []
        self.depth = self.cfg["depth"]
        self.image_channels = int(channels)
        self.channels = self.image_channels * (self.depth or 1)
        self.coord_channels = 3 if self.depth else 2
        self.image_size = max(self.cfg["patch_sizes"])
        self.index = [(vi, z) for vi, sh in enumerate(self.shapes) for z in range(sh[0])]
        if not self.index:
            raise ConfigError("no training slices for the patch prior", fix="give at least one training volume")
        p = self.cfg["pad_width"]
        small = [sh for sh in self.shapes if min(sh[1:]) + 2 * p < self.image_size]
        if small:
            raise ConfigError(f"training images {small[0][1:]} padded by {p} are smaller than the largest patch "
                              f"{self.image_size}", fix="lower train.patch.patch_sizes or raise pad_width")
        if self.depth and any(sh[0] + 2 * self.cfg["pad_z"] < self.depth for sh in self.shapes):
            raise ConfigError(f"a training volume has fewer than depth={self.depth} slices even with pad_z",
                              fix="raise train.patch.pad_z or lower depth")

    @classmethod
    def from_arrays(cls, images: Sequence[np.ndarray], patch: dict[str, Any], pad_value: float = 0.0
                    ) -> PatchDataset:
        """Image stacks already in the network domain, each (Z, C, Y, X) (tests, benchmarks)."""
        arrs = [np.ascontiguousarray(a, dtype=np.float32) for a in images]
        if any(a.ndim != 4 for a in arrs) or len({a.shape[1] for a in arrs}) != 1:
            raise ValueError("images must be (Z, C, Y, X) arrays with one channel count")
        return cls(lambda vi, z: arrs[vi][z], [(a.shape[0], *a.shape[2:]) for a in arrs], arrs[0].shape[1],
                   patch, pad_value, data=[{"arrays": [list(a.shape) for a in arrs]}])

    @classmethod
    def from_volumes(cls, source: VolumeSlices, normalisation: dict[str, Any], patch: dict[str, Any],
                     channels: int = 1, volume_values: Sequence[float] | None = None) -> PatchDataset:
        """Slices of training volumes at their native resolution (no resizing: patches see true detail)."""
        norm = validate_normalisation(normalisation, source.modality)
        if channels not in (1, 2) or (channels == 2 and source.modality != "MR"):
            raise ConfigError(f"patch priors have 1 channel (or 2 = complex for MR), got {channels} for "
                              f"{source.modality}", fix="set network.in_channels to 1 (CT) or 1/2 (MR)")
        values = None if volume_values is None else [float(v) for v in volume_values]

        def reader(vi: int, z: int) -> np.ndarray:
            value = None if values is None else values[vi]
            return np.asarray(to_network(source.read(vi, z), norm, clip=True, value=value), np.float32)[None]

        shapes = [tuple(v.shape) for v in source.volumes]
        return cls(reader, shapes, channels, patch, background(norm), complex_phase=channels == 2,
                   data=source.provenance())

    def __len__(self) -> int:
        return len(self.index)

    def geometry(self) -> dict[str, Any]:
        """What inference must know to use this prior: padding, patch sizes, depth, pad value, layout."""
        return {"pad_width": self.cfg["pad_width"], "pad_z": self.cfg["pad_z"], "depth": self.depth,
                "patch_sizes": self.cfg["patch_sizes"], "patch_probs": self.cfg["patch_probs"],
                "pad_value": self.pad_value, "image_channels": self.image_channels,
                "coords": "zyx-slab-centre" if self.depth else "yx", "training_shapes": [list(s) for s in self.shapes]}

    def provenance(self) -> list[dict[str, Any]]:
        """Training data plus the patch geometry (stored in the checkpoint's ``data``; read back at inference)."""
        return [*self._data, {"patch_geometry": self.geometry()}]

    def padded_shape(self, vi: int) -> tuple[int, ...]:
        """Padded (Z, Y, X) (3D) or (Y, X) (2D) of image stack vi: the frame the coordinates refer to."""
        z, y, x = self.shapes[vi]
        p = self.cfg["pad_width"]
        return (z + 2 * self.cfg["pad_z"], y + 2 * p, x + 2 * p) if self.depth else (y + 2 * p, x + 2 * p)

    def patch_at(self, vi: int, z: int, start: Sequence[int], size: int,
                 flips: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The item for a patch at ``start`` of the padded frame (2D: (y, x) in slice z; 3D: (z, y, x))."""
        padded = self.padded_shape(vi)
        psize = (self.depth, size, size) if self.depth else (size, size)
        read_start = [r - s - k if ax in flips else s
                      for s, k, r, ax in zip(start, psize, padded, ("zyx" if self.depth else "yx"), strict=True)]
        if self.depth:
            pz = self.cfg["pad_z"]
            nz = self.shapes[vi][0]
            blank = np.full((self.image_channels if not self.complex_phase else 1, *self.shapes[vi][1:]),
                            self.pad_value, np.float32)
            stack = np.stack([self.reader(vi, zz) if 0 <= zz < nz else blank
                              for zz in range(read_start[0] - pz, read_start[0] - pz + self.depth)], axis=1)
            p = self.cfg["pad_width"]
            img = _crop_padded(stack, (0, read_start[1] - p, read_start[2] - p), psize, self.pad_value)
        else:
            p = self.cfg["pad_width"]
            img = _crop_padded(self.reader(vi, z), [s - p for s in read_start], psize, self.pad_value)
        for ax in flips:
            img = np.flip(img, axis=1 + ("zyx" if self.depth else "yx").index(ax))
        coords = coordinate_channels(padded, start, psize)
        x = torch.from_numpy(np.ascontiguousarray(img))
        if self.depth:
            x, coords = to_slab_channels(x), slab_coords(coords)
        return {"x": x, "coords": coords}

    def draw_size(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.cfg["patch_sizes"], p=self.cfg["patch_probs"]))

    def sample(self, index: int, rng: np.random.Generator, size: int | None = None) -> dict[str, torch.Tensor]:
        size = self.draw_size(rng) if size is None else int(size)
        vi, z = self.index[index]
        padded = self.padded_shape(vi)
        psize = (self.depth, size, size) if self.depth else (size, size)
        start = [int(rng.integers(0, r - k + 1)) for r, k in zip(padded, psize, strict=True)]
        flips = [ax for ax in self.cfg["flips"] if rng.random() < 0.5]   # one draw per axis, always
        # a phase map over the patch's own extent (:func:`training_phase`; "smooth" is then a local piece of
        # a smooth field at most pi/2 across the patch)
        phase = torch.as_tensor(training_phase((size, size), rng, self.cfg["random_phase"]),
                                dtype=torch.float32)
        item = self.patch_at(vi, z, start, size, flips)
        if self.complex_phase:
            m = item["x"]
            item["x"] = torch.cat([m * torch.cos(phase), m * torch.sin(phase)]) if not self.depth else \
                to_slab_channels(torch.cat([from_slab_channels(m, self.depth) * torch.cos(phase),
                                            from_slab_channels(m, self.depth) * torch.sin(phase)]))
        return item

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """A whole batch: one patch size for all (drawn from the first key's seed), multiplied per size."""
        keys = list(keys)
        size = self.draw_size(np.random.default_rng([int(keys[0][1]), 0x9A7C]))
        mult = self.cfg["batch_multipliers"][self.cfg["patch_sizes"].index(size)]
        items = []
        for index, seed in keys:
            for j in range(mult):
                rng = np.random.default_rng([int(seed), j])
                i = int(index) if j == 0 else int(rng.integers(0, len(self)))
                items.append(self.sample(i, rng, size))
        return items


# ---------------------------------------------------------------------------------------------- train / load


@register_kind("patch", "patches with coordinate channels (train.<name>.patch; depth 3 for padis3d): PaDIS")
def _train_patch_kind(cfg: dict[str, Any], volumes: Sequence[Any], out: Any, resume: bool = True) -> Any:
    """``medrecon train`` for ``kind: patch``: the ``patch`` options travel beside the training config."""
    rest = {k: v for k, v in cfg.items() if k != "patch"}
    return train_patch_prior(rest, volumes, out, patch=cfg.get("patch"), resume=resume)


def train_patch_prior(cfg: dict[str, Any], volumes: Sequence[Any], out: Any, patch: dict[str, Any] | None = None,
                      resume: bool = True) -> Any:
    """Train a PaDIS patch prior (EDM loss) on training volumes; returns the checkpoint path ``out``.

    ``cfg`` is the ordinary training config (``train.resolve_train_config``) with ``kind: patch`` and
    ``loss: edm``; ``patch`` the options of :data:`PATCH_DEFAULTS`. The patch geometry is stored with the
    checkpoint (in its data provenance) so inference uses the same padding and coordinates.
    """
    from medrecon.diffusion.datasets import fit_normalisation
    from medrecon.diffusion.normalisation import default_normalisation
    from medrecon.diffusion.train import resolve_train_config, train
    from medrecon.volume import Volume

    c = resolve_train_config({**cfg, "kind": cfg.get("kind", "patch")})
    if c["kind"] != "patch" or c["loss"] != "edm":
        raise ConfigError(f"a PaDIS prior is trained with kind 'patch' and loss 'edm', got {c['kind']!r} / "
                          f"{c['loss']!r}", fix="set train.kind: patch and train.loss: edm")
    vols = [v if isinstance(v, Volume) else Volume.open(v) for v in volumes]
    if not vols:
        raise ConfigError("no training volumes given", fix="give at least one subject with role 'train'")
    modality = c["modality"] or vols[0].modality
    source = VolumeSlices(vols, modality, cache_bytes=c["cache_mb"] << 20)
    norm, per_volume = fit_normalisation(c["normalisation"] or default_normalisation(modality), source)
    channels = int(c["network"].get("in_channels", 1))
    c["network"] = {k: v for k, v in c["network"].items() if k not in ("in_channels", "out_channels")}
    ds = PatchDataset.from_volumes(source, norm, patch or {}, channels=channels, volume_values=per_volume)
    return train(c, ds, out, modality=modality, normalisation=norm, resume=resume).checkpoint


def patch_geometry(data: Sequence[dict[str, Any]], path: Any = None) -> dict[str, Any]:
    """The patch geometry stored in a checkpoint's data provenance (InputError naming the file if absent)."""
    from medrecon.errors import InputError

    for d in data:
        if isinstance(d, dict) and "patch_geometry" in d:
            return dict(d["patch_geometry"])
    raise InputError(f"prior checkpoint {path} has no patch geometry (padding, patch sizes)", path=path,
                     fix="train the prior with kind 'patch' (medrecon.diffusion.patches.train_patch_prior)")


def patch_prior_from_checkpoint(path: Any, device: torch.device | str = "cpu", *, image_units: str = "native",
                                mu_water: float | None = None, expect_modality: str | None = None,
                                expect_normalisation: dict[str, Any] | None = None, ema: bool = True) -> Any:
    """A :class:`~medrecon.diffusion.denoiser.Prior` whose denoiser is the *patch* EDM denoiser of a checkpoint.

    ``meta["patch"]`` holds the geometry the samplers need (pad widths, depth, trained patch sizes, pad
    value) and ``meta["network_multiple"]`` the factor every patch size must be a multiple of.
    """
    from medrecon.diffusion.checkpoint import load_checkpoint
    from medrecon.diffusion.denoiser import EDMDenoiser, Prior
    from medrecon.diffusion.normalisation import prior_affine
    from medrecon.errors import InputError

    lp = load_checkpoint(path, expect_modality=expect_modality, expect_kind="patch",
                         expect_normalisation=expect_normalisation, device=device, ema=ema)
    if lp.objective != "edm":
        raise InputError(f"{lp.path}: a patch prior must be EDM-trained, found objective {lp.objective!r}",
                         path=lp.path, fix="re-train it with train.loss: edm")
    geom = patch_geometry(lp.data, lp.path)
    scale, offset = prior_affine(lp.normalisation, image_units, mu_water)
    meta = {"checkpoint": str(lp.path), "hash": lp.hash, "kind": lp.kind, "modality": lp.modality,
            "objective": lp.objective, "normalisation": lp.normalisation, "step": lp.step, "ema": lp.ema,
            "image_units": image_units, "patch": geom, "network_multiple": 2 ** (len(lp.spec["channels"]) - 1)}
    return Prior(denoiser=EDMDenoiser(lp.network, sigma_data=lp.sigma_data or 0.5), scale=scale, offset=offset,
                 channels=int(geom["image_channels"]), meta=meta)
