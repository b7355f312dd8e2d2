"""Intensity normalisation between a volume's physical units and a prior's network domain.

This module is the single source of truth for that map: training normalises with :func:`to_network`,
checkpoints store the normalisation dict, and :func:`prior_affine` turns the same dict into the
``Prior.scale`` / ``Prior.offset`` the samplers use (``x_prior = scale * x_image + offset``).

Two kinds (plain dicts, JSON-able, stored in checkpoints and recon attributes):

``{"kind": "ct_window", "hu_min": -1000, "hu_max": 1000, "range": [-1, 1]}``
    HU window ``[hu_min, hu_max]`` -> ``[0, 1]`` -> ``range``. The map is affine and its inverse exact;
    training clips to the window (the network never sees values outside ``range``), inference does not
    clip (data consistency may legitimately leave the window).
``{"kind": "mr_percentile", "percentile": 99.5, "value": v, "scope": "dataset"}``
    magnitude (or complex) image divided by ``v``, a robust percentile of the training magnitudes, so
    typical tissue lies in [0, 1]. No offset, so complex images keep their phase. ``scope="dataset"``: one
    ``v`` over all training volumes (stored). ``scope="volume"``: each training volume is divided by its own
    percentile (scanner gains differ); the stored ``v`` is then the median over volumes, and a sampler
    should re-estimate the scale from its own data with :func:`percentile_value`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError

KINDS = ("ct_window", "mr_percentile")
HU_WATER = 0.0
_MAX_PERCENTILE_SAMPLES = 4_000_000  # voxels kept per volume when estimating a percentile


def default_normalisation(modality: str) -> dict[str, Any]:
    """The normalisation a modality gets when the config gives none."""
    if modality == "CT":
        return {"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "range": [-1.0, 1.0]}
    if modality == "MR":
        return {"kind": "mr_percentile", "percentile": 99.5, "value": None, "scope": "dataset"}
    raise ConfigError(f"no default intensity normalisation for modality {modality!r}", fix="use CT or MR")


def validate_normalisation(norm: dict[str, Any], modality: str | None = None) -> dict[str, Any]:
    """Check a normalisation dict (and that it suits ``modality``); returns a normalised copy with floats."""
    if not isinstance(norm, dict) or norm.get("kind") not in KINDS:
        raise ConfigError(f"normalisation must be a dict with kind in {KINDS}, got {norm!r}",
                          fix='e.g. {"kind": "ct_window", "hu_min": -1000, "hu_max": 1000}')
    n = copy.deepcopy(norm)
    if n["kind"] == "ct_window":
        if modality not in (None, "CT"):
            raise ConfigError(f"normalisation 'ct_window' is for CT, but the modality is {modality}",
                              fix="use kind 'mr_percentile' for MR")
        extra = sorted(set(n) - {"kind", "hu_min", "hu_max", "range"})
        lo, hi = float(n.get("hu_min", -1000.0)), float(n.get("hu_max", 1000.0))
        r = [float(v) for v in n.get("range", [-1.0, 1.0])]
        if extra or not hi > lo or len(r) != 2 or not r[1] > r[0]:
            raise ConfigError(f"invalid ct_window normalisation {norm}",
                              fix="needs hu_min < hu_max and range [a, b] with a < b (no other keys)")
        return {"kind": "ct_window", "hu_min": lo, "hu_max": hi, "range": r}
    if modality not in (None, "MR"):
        raise ConfigError(f"normalisation 'mr_percentile' is for MR, but the modality is {modality}",
                          fix="use kind 'ct_window' for CT")
    extra = sorted(set(n) - {"kind", "percentile", "value", "scope"})
    p = float(n.get("percentile", 99.5))
    v = n.get("value")
    scope = n.get("scope", "dataset")
    if extra or not 0 < p <= 100 or scope not in ("dataset", "volume") or (v is not None and not float(v) > 0):
        raise ConfigError(f"invalid mr_percentile normalisation {norm}",
                          fix="needs 0 < percentile <= 100, scope 'dataset' or 'volume', value > 0 or null")
    return {"kind": "mr_percentile", "percentile": p, "value": None if v is None else float(v), "scope": scope}


def affine(norm: dict[str, Any]) -> tuple[float, float]:
    """``(a, b)`` with ``network = a * native + b`` (native = HU for CT, stored magnitude units for MR)."""
    if norm["kind"] == "ct_window":
        lo, hi = norm["hu_min"], norm["hu_max"]
        r0, r1 = norm["range"]
        a = (r1 - r0) / (hi - lo)
        return a, r0 - a * lo
    if norm.get("value") is None:
        raise ConfigError("the mr_percentile normalisation has no value yet",
                          fix="fit it on the training volumes (fit_normalisation) or give 'value'")
    return 1.0 / float(norm["value"]), 0.0


def network_range(norm: dict[str, Any]) -> tuple[float, float] | None:
    """Clip range used in training (CT window range), or None when nothing is clipped (MR)."""
    return tuple(norm["range"]) if norm["kind"] == "ct_window" else None


def background(norm: dict[str, Any]) -> float:
    """Network-domain value of empty space (air): used to pad slices to the training shape."""
    return float(norm["range"][0]) if norm["kind"] == "ct_window" else 0.0


def to_network(x: np.ndarray | torch.Tensor, norm: dict[str, Any], clip: bool = False,
               value: float | None = None) -> np.ndarray | torch.Tensor:
    """Native intensities -> network domain. ``clip`` clamps to the CT range (training); ``value`` overrides
    the MR divisor (per-volume scope)."""
    if value is not None and norm["kind"] == "mr_percentile":
        a, b = 1.0 / float(value), 0.0
    else:
        a, b = affine(norm)
    y = x * a + b
    rng = network_range(norm)
    if clip and rng is not None:
        y = y.clamp(*rng) if isinstance(y, torch.Tensor) else np.clip(y, *rng)
    return y


def from_network(y: np.ndarray | torch.Tensor, norm: dict[str, Any]) -> np.ndarray | torch.Tensor:
    """Network domain -> native intensities (exact inverse of the unclipped :func:`to_network`)."""
    a, b = affine(norm)
    return (y - b) / a


def prior_affine(norm: dict[str, Any], image_units: str = "native", mu_water: float | None = None
                 ) -> tuple[float, float]:
    """``(scale, offset)`` for :class:`medrecon.diffusion.denoiser.Prior` (``x_prior = scale * x + offset``).

    ``image_units`` is the domain of the operator's image: ``"native"`` (HU for CT, stored units for MR) or,
    for CT, ``"attenuation"`` (linear attenuation in 1/mm, HU = 1000 (mu - mu_water) / mu_water), which
    needs ``mu_water`` (the measurement's ``measure.ct.mu_water``).
    """
    a, b = affine(norm)
    if image_units == "native":
        return a, b
    if image_units == "attenuation":
        if norm["kind"] != "ct_window":
            raise ConfigError("image_units 'attenuation' only applies to CT priors", fix="use 'native' for MR")
        if mu_water is None or not mu_water > 0:
            raise ConfigError(f"image_units 'attenuation' needs mu_water > 0, got {mu_water}",
                              fix="pass the measurement's mu_water (1/mm), e.g. 0.0192")
        # network = a * HU + b = a * (1000/mu_w) * mu + (b - 1000 a)
        return a * 1000.0 / float(mu_water), b - 1000.0 * a
    raise ConfigError(f"unknown image_units {image_units!r}", fix="use 'native' or 'attenuation'")


def percentile_value(samples: Iterable[np.ndarray], percentile: float) -> float:
    """Robust scale: the ``percentile`` of ``|x|`` over strided subsamples of the given arrays.

    Deterministic (fixed stride, no RNG) and bounded in memory: each array contributes at most ~4 M voxels.
    """
    parts = []
    for arr in samples:
        flat = np.abs(np.asarray(arr)).reshape(-1)
        stride = max(1, math.ceil(flat.size / _MAX_PERCENTILE_SAMPLES))
        parts.append(flat[::stride].astype(np.float64))
    if not parts:
        raise ConfigError("no data to estimate the MR normalisation percentile from",
                          fix="give at least one training volume")
    v = float(np.percentile(np.concatenate(parts), percentile))
    if not v > 0:
        raise ConfigError(f"the {percentile}th percentile of the training magnitudes is {v} (empty images?)",
                          fix="check the training volumes or raise 'percentile'")
    return v
