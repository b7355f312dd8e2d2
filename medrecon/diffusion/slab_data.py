"""Slab priors for DiffusionBlend: 3 slices stacked as channels, with a label that encodes their spacing.

DiffusionBlend (Song, Hu, Luo, Fessler, Shen, NeurIPS 2024) learns a "3D patch" prior with a 2D UNet
whose input channels carry 3 slices of a volume. This module is the single place that fixes that layout,
so training (:class:`SlabDataset`) and sampling (:mod:`medrecon.methods.diffusionblend`) cannot disagree:

* **Channels**: slice-major. A slab of slices ``(z_a, z_b, z_c)`` with ``C`` channels per slice (1 for CT,
  2 = real/imag for complex MR) is ``(3*C, H, W)`` = ``[z_a ch0..chC-1, z_b ..., z_c ...]``; CT slabs have 3
  channels, MR slabs 6 (:func:`to_slab_channels`, :func:`from_slab_channels`).
* **Labels** (the network's class embedding, ``num_class_embeds = 2``) encode the spacing between the
  slices: ``LABEL_ADJACENT = 0`` for ``(i, i+1, i+2)``, ``LABEL_STRIDED = 1`` for ``(i, i+s, i+2s)`` with
  the stride ``s`` (3, as in the reference). The reference code uses class ids 1 and 3 out of a
  1000-entry embedding; medrecon uses the two it needs. The stride is a property of the trained prior:
  sample with the stride it was trained with.
* **Items**: every valid start of both spacings in every training volume (so the two labels are about
  equally frequent for volumes much deeper than ``2s``; the reference draws each with probability 1/2).
  Normalisation, square fitting and flips are those of :class:`~medrecon.diffusion.datasets.SliceDataset`
  (the slices are read through one), with one flip draw per slab so its 3 slices stay aligned.

It also loads a trained slab checkpoint as a :class:`~medrecon.diffusion.denoiser.Prior` whose
``channels`` is the per-slice count (1 or 2), as the samplers' slice layout expects, and whose ``meta``
marks it ``kind = "slab"``; its denoiser takes slab batches ``(B, 3*C, H, W)`` with ``class_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.diffusion.checkpoint import load_checkpoint
from medrecon.diffusion.datasets import SliceDataset, TrainingDataset, _flip, build_slice_dataset, training_phase
from medrecon.diffusion.denoiser import EDMDenoiser, EpsilonDenoiser, Prior
from medrecon.diffusion.kinds import register_kind
from medrecon.diffusion.normalisation import prior_affine
from medrecon.diffusion.schedules import VPSchedule
from medrecon.diffusion.train import resolve_train_config, train
from medrecon.errors import ConfigError, InputError
from medrecon.volume import Volume

SLAB = 3                 # slices per slab (the network's channel groups)
LABEL_ADJACENT = 0       # slices (i, i+1, i+2)
LABEL_STRIDED = 1        # slices (i, i+s, i+2s), s = the stride
NUM_LABELS = 2
DEFAULT_STRIDE = 3


def to_slab_channels(t: torch.Tensor) -> torch.Tensor:
    """(..., 3, C, H, W) slices of slabs -> (..., 3*C, H, W) network channels (slice-major)."""
    return t.flatten(-4, -3)


def from_slab_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., 3*C, H, W) network channels -> (..., 3, C, H, W); inverse of :func:`to_slab_channels`."""
    if t.shape[-3] != SLAB * channels:
        raise ValueError(f"slab tensor has {t.shape[-3]} channels, expected {SLAB} x {channels}")
    return t.unflatten(-3, (SLAB, channels))


def slice_channels(network_channels: int) -> int:
    """Per-slice channels of a slab network with ``network_channels`` inputs (3 -> 1 CT, 6 -> 2 MR)."""
    if network_channels not in (SLAB, 2 * SLAB):
        raise ConfigError(f"a slab prior has {SLAB} (CT) or {2 * SLAB} (complex MR) channels, got {network_channels}",
                          fix=f"set network.in_channels to {SLAB} for CT or {2 * SLAB} for complex MR")
    return network_channels // SLAB


class SlabDataset(TrainingDataset):
    """3-slice slabs of training volumes with a spacing label (see the module docstring).

    Built on a :class:`SliceDataset` (which supplies normalised, square-fitted slices without flips);
    ``stride`` is the spacing of the strided slabs (label 1).
    """

    kind = "slab"
    num_class_embeds = NUM_LABELS

    def __init__(self, slices: SliceDataset, stride: int = DEFAULT_STRIDE) -> None:
        if int(stride) < 2:
            raise ConfigError(f"slab stride must be >= 2 (1 is the adjacent slab), got {stride}",
                              fix=f"use the reference's stride {DEFAULT_STRIDE}")
        self.slices, self.stride = slices, int(stride)
        self.image_size = slices.image_size
        self.slice_channels = slices.channels
        self.channels = SLAB * slices.channels
        src = slices.source
        first = np.cumsum([0] + [v.shape[0] for v in src.volumes])  # global slice index of each volume's z=0
        items = []
        for label, step in ((LABEL_ADJACENT, 1), (LABEL_STRIDED, self.stride)):
            for vi, v in enumerate(src.volumes):
                items += [(int(first[vi] + z0), step, label) for z0 in range(v.shape[0] - (SLAB - 1) * step)]
        if not any(label == LABEL_STRIDED for _, _, label in items):
            depths = [v.shape[0] for v in src.volumes]
            raise ConfigError(f"no training volume has the {(SLAB - 1) * self.stride + 1} slices a strided slab "
                              f"(stride {self.stride}) needs; depths are {depths}",
                              fix="train on deeper volumes or lower the slab stride")
        self.items = np.asarray(items, dtype=np.int64)  # (start slice, step, label)

    def __len__(self) -> int:
        return len(self.items)

    def label_counts(self) -> dict[int, int]:
        """How many items each label has (logged with training)."""
        labels, counts = np.unique(self.items[:, 2], return_counts=True)
        return {int(k): int(c) for k, c in zip(labels, counts, strict=True)}

    def slab(self, index: int) -> tuple[np.ndarray, int]:
        """Item ``index`` unaugmented: (3, H, W) normalised slices (one channel each) and its label."""
        start, step, label = (int(v) for v in self.items[index])
        return np.stack([self.slices.image(start + k * step) for k in range(SLAB)]), label

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        img, label = self.slab(index)
        img = _flip(img, self.slices.flips, rng)          # one draw per axis for the whole slab
        if self.slice_channels == 2:
            # magnitude volumes as complex images: one phase (map) for the slab, as SliceDataset draws it
            phase = training_phase(img.shape[-2:], rng, self.slices.random_phase)
            img = np.stack([img * np.cos(phase), img * np.sin(phase)], axis=1)
        else:
            img = img[:, None]
        x = to_slab_channels(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
        return {"x": x, "class_labels": torch.tensor(label, dtype=torch.long)}

    def provenance(self) -> list[dict[str, Any]]:
        return self.slices.provenance()


def build_slab_dataset(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume],
                       stride: int = DEFAULT_STRIDE) -> tuple[SlabDataset, str, dict[str, Any]]:
    """The slab dataset for a resolved training config (``kind: slab``): slices as the slice prior reads them.

    ``medrecon train`` reaches this through :func:`train_slab_prior` (the stride is then the default 3).
    """
    net_channels = int(cfg["network"].get("in_channels", SLAB))
    per_slice = slice_channels(net_channels)
    slice_cfg = {**cfg, "kind": "slice", "network": {**cfg["network"], "in_channels": per_slice}}
    slices, modality, norm = build_slice_dataset(slice_cfg, volumes)
    return SlabDataset(slices, stride), modality, norm


@register_kind("slab", "3 slices as channels with a spacing label: the prior of DiffusionBlend")
def train_slab_prior(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], out: str | Path,
                     resume: bool = True) -> Path:
    """``medrecon train`` for ``kind: slab``: the slab dataset of ``volumes`` through the training loop."""
    c = resolve_train_config(cfg)
    dataset, modality, norm = build_slab_dataset(c, volumes)
    return train(c, dataset, out, modality=modality, normalisation=norm, resume=resume).checkpoint


def slab_prior_from_checkpoint(path: str | Path, device: torch.device | str = "cpu", *,
                               image_units: str = "native", mu_water: float | None = None,
                               expect_modality: str | None = None,
                               expect_normalisation: dict[str, Any] | None = None, ema: bool = True,
                               clip: float | tuple[float, float] | None = None) -> Prior:
    """A :class:`Prior` for a slab checkpoint (arguments as ``checkpoint.prior_from_checkpoint``).

    ``Prior.channels`` is per slice; ``meta["kind"] == "slab"`` and ``meta["slab"] == 3`` tell the
    sampler that the denoiser takes ``(B, 3*C, H, W)`` slabs with ``class_labels``.
    """
    lp = load_checkpoint(path, expect_modality=expect_modality, expect_kind="slab",
                         expect_normalisation=expect_normalisation, device=device, ema=ema)
    if lp.spec.get("num_class_embeds") is None or int(lp.spec["num_class_embeds"]) < NUM_LABELS:
        raise InputError(f"slab prior {lp.path} has no class embedding for the {NUM_LABELS} spacing labels",
                         path=lp.path, fix="re-train it with medrecon's slab dataset (train.kind: slab)")
    if lp.objective == "epsilon":
        if not isinstance(lp.schedule, VPSchedule):
            raise InputError(f"{lp.path}: an epsilon prior needs a VP schedule, found {lp.schedule}.",
                             path=lp.path, fix="re-train the prior")
        denoiser: Any = EpsilonDenoiser(lp.network, lp.schedule, clip=clip)
    else:
        denoiser = EDMDenoiser(lp.network, sigma_data=lp.sigma_data or 0.5)
    scale, offset = prior_affine(lp.normalisation, image_units, mu_water)
    meta = {"checkpoint": str(lp.path), "hash": lp.hash, "kind": "slab", "slab": SLAB, "modality": lp.modality,
            "objective": lp.objective, "normalisation": lp.normalisation, "step": lp.step,
            "image_size": lp.spec.get("image_size"), "ema": lp.ema, "image_units": image_units}
    return Prior(denoiser=denoiser, scale=scale, offset=offset, channels=slice_channels(int(lp.spec["in_channels"])),
                 schedule=lp.schedule if isinstance(lp.schedule, VPSchedule) else None, meta=meta)
