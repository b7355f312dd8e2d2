"""The reconstruction grid: one in-plane size and/or pixel spacing (and optionally slice spacing) per study.

Real scans come in every size and spacing; a diffusion prior learns anatomy at one scale. The ``grid``
section of the config fixes the grid of the *reconstruction problem*, and the ``resample`` step puts every
ingested volume on it (``<subject>/reference.zarr``) before anything else sees it: ``measure`` simulates
there, ``evaluate`` scores against it, ``train`` learns from it. The ingested volume stays untouched.

Definition (canonical form, stored as ``grid`` in volumes, measurements, checkpoints and reconstructions)::

    {"size": [ny, nx] | None, "spacing": [dy, dx] | None, "slice_spacing": dz | None}

* ``size`` only: the whole in-plane field of view (FOV) fits ``ny x nx`` pixels of one isotropic spacing
  ``max(FOV_y / ny, FOV_x / nx)``; the shorter side is padded with background, centred. This is the
  "256 or 512 pixels" users know, and it keeps the FOV.
* ``spacing`` only: pixels of that size; the number of pixels follows the FOV (any size).
* both: pixels of that spacing, centre-cropped / padded to ``size``.
* ``slice_spacing``: resample along z too (None keeps the native slices, bit for bit when nothing else
  changes either).

Interpolation: a Gaussian anti-aliasing filter of ``sigma = (factor - 1) / 2`` input pixels on every axis
that shrinks (the rule of ``skimage.transform.resize``), then (tri)linear interpolation
(``scipy.ndimage.affine_transform``, order 1), which cannot overshoot, so CT stays in physical HU.
Grid centres coincide with the FOV centre; orientation (direction cosines) is kept; outside the FOV is
background (-1000 HU for CT, 0 for MR). Output slabs are computed one chunk at a time from the input slices
they need (plus the filter's support), so memory is one slab.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medrecon.errors import ConfigError
from medrecon.provenance import config_hash, provenance
from medrecon.volume import Geometry, Volume, default_chunk_depth, volume_fingerprint

log = logging.getLogger("medrecon.grid")

INTERPOLATION = "gaussian anti-aliasing (sigma = (factor - 1) / 2 px where shrinking) + linear (order 1)"
BACKGROUND = {"CT": -1000.0, "MR": 0.0}
_KEYS = ("size", "spacing", "slice_spacing")


def resolve_grid(section: dict[str, Any] | None) -> dict[str, Any]:
    """The canonical grid definition of a config ``grid`` section (None or {} = the native grid)."""
    section = dict(section or {})
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}", fix=f"use only {list(_KEYS)}")

    def pair(name: str, value: Any, cast: type) -> list | None:
        if value is None:
            return None
        vals = [value, value] if np.isscalar(value) else list(value)
        if len(vals) != 2 or not all(np.isfinite(float(v)) and float(v) > 0 for v in vals):
            raise ConfigError(f"grid.{name} must be a positive number or a pair [y, x], got {value!r}",
                              fix=f"e.g. grid.{name}: {'64' if cast is int else '1.5'}")
        return [cast(v) for v in vals]

    dz = section.get("slice_spacing")
    if dz is not None and not float(dz) > 0:
        raise ConfigError(f"grid.slice_spacing must be > 0 mm, got {dz!r}", fix="e.g. grid.slice_spacing: 3.0")
    return {"size": pair("size", section.get("size"), int), "spacing": pair("spacing", section.get("spacing"), float),
            "slice_spacing": None if dz is None else float(dz)}


def definition(record: dict[str, Any]) -> dict[str, Any]:
    """The canonical definition inside a grid record (which also says how and from what it was made)."""
    return resolve_grid({k: record.get(k) for k in _KEYS})


def describe(grid: dict[str, Any] | None) -> str:
    """A grid definition (or record) in words, for messages."""
    if grid is None:
        return "no recorded grid"
    g = definition(grid)
    parts = []
    if g["size"]:
        parts.append(f"{g['size'][0]} x {g['size'][1]} px")
    if g["spacing"]:
        parts.append(f"{g['spacing'][0]:g} x {g['spacing'][1]:g} mm pixels")
    elif g["size"]:
        parts.append("spacing from the field of view")
    if not parts:
        parts.append("native in-plane grid")
    parts.append(f"{g['slice_spacing']:g} mm slices" if g["slice_spacing"] else "native slices")
    return ", ".join(parts)


def same_grid(a: dict[str, Any], b: dict[str, Any], *, with_slices: bool = True, rtol: float = 1e-3) -> bool:
    """Whether two grid definitions are the same (``with_slices``: the slice spacing counts too)."""
    a, b = definition(a), definition(b)
    for key in _KEYS if with_slices else _KEYS[:2]:
        x, y = a[key], b[key]
        if (x is None) != (y is None):
            return False
        if x is not None and not np.allclose(x, y, rtol=rtol, atol=0):
            return False
    return True


@dataclass(frozen=True)
class GridPlan:
    """How a volume maps onto a grid: output shape and geometry, and per axis (z, y, x) the input index of
    output voxel 0 (``offset``), the input pixels per output pixel (``zoom``) and the anti-aliasing sigma."""

    shape: tuple[int, int, int]
    geometry: Geometry
    zoom: tuple[float, float, float]
    offset: tuple[float, float, float]
    sigma: tuple[float, float, float]

    @property
    def identity(self) -> bool:
        return all(z == 1.0 for z in self.zoom) and all(o == 0.0 for o in self.offset)


def plan_grid(shape: tuple[int, int, int], geometry: Geometry, grid: dict[str, Any] | None) -> GridPlan:
    """Where the grid's voxels lie in the input volume (centres of the FOVs coincide; orientation is kept)."""
    g = resolve_grid(grid)
    n = np.asarray(shape, dtype=float)
    sp = np.asarray(geometry.spacing, dtype=float)
    fov = n * sp
    if g["spacing"] is not None:
        out_sp_yx = np.asarray(g["spacing"], dtype=float)
    elif g["size"] is not None:
        s = float(max(fov[1] / g["size"][0], fov[2] / g["size"][1]))
        out_sp_yx = np.array([s, s])
    else:
        out_sp_yx = sp[1:]
    size_yx = (np.asarray(g["size"]) if g["size"] is not None
               else np.maximum(1, np.round(fov[1:] / out_sp_yx - 1e-6)).astype(int))
    if g["slice_spacing"] is not None:
        out_dz = g["slice_spacing"]
        nz = max(1, round(fov[0] / out_dz - 1e-6))
    else:
        out_dz, nz = sp[0], int(shape[0])
    out_shape = (nz, int(size_yx[0]), int(size_yx[1]))
    out_sp = np.array([out_dz, *out_sp_yx])
    zoom = out_sp / sp
    # Input index i of output index o: centres aligned, i = (n_in - 1)/2 + (o - (n_out - 1)/2) * zoom.
    offset = (n - 1) / 2 - (np.asarray(out_shape, dtype=float) - 1) / 2 * zoom
    same = np.isclose(zoom, 1.0, rtol=1e-9, atol=0) & np.isclose(offset, 0.0, atol=1e-9)
    zoom = np.where(same, 1.0, zoom)
    offset = np.where(same, 0.0, offset)
    sigma = np.maximum(0.0, (zoom - 1.0) / 2.0)
    origin = geometry.index_to_lps(offset) if not same.all() else np.asarray(geometry.origin)
    geom = Geometry(tuple(out_sp.tolist()), tuple(np.asarray(origin).tolist()), geometry.direction)
    return GridPlan(out_shape, geom, tuple(zoom.tolist()), tuple(offset.tolist()), tuple(sigma.tolist()))


def _input_range(plan: GridPlan, o0: int, o1: int, depth: int) -> tuple[int, int]:
    """Input slices (lo, hi) that output slices o0..o1-1 need, with the anti-aliasing filter's support."""
    first = plan.offset[0] + o0 * plan.zoom[0]
    last = plan.offset[0] + (o1 - 1) * plan.zoom[0]
    margin = math.ceil(4.0 * plan.sigma[0]) + 1
    return max(0, math.floor(first) - margin), min(depth, math.ceil(last) + 1 + margin)


def resample_slab(vol: Volume | _Slices, plan: GridPlan, o0: int, o1: int, background: float) -> np.ndarray:
    """Output slices ``o0 .. o1-1`` of ``vol`` on ``plan``'s grid (float32)."""
    if plan.identity:
        return vol.read_slab(o0, o1)
    lo, hi = _input_range(plan, o0, o1, vol.shape[0])
    data = vol.read_slab(lo, hi).astype(np.float64)
    if any(s > 0 for s in plan.sigma):
        # Anti-aliasing: the slab's margin holds the filter's support; at the volume's ends 'nearest'.
        data = ndimage.gaussian_filter(data, sigma=plan.sigma, mode="nearest", truncate=4.0)
    # Edge slices repeated once along z so that z stays 'nearest' while y/x outside the FOV are background.
    data = np.pad(data, ((1, 1), (0, 0), (0, 0)), mode="edge")
    offset = (plan.offset[0] + o0 * plan.zoom[0] - lo + 1, plan.offset[1], plan.offset[2])
    out = ndimage.affine_transform(data, np.asarray(plan.zoom), offset=offset, output_shape=(o1 - o0, *plan.shape[1:]),
                                   order=1, mode="constant", cval=background, prefilter=False)
    return out.astype(np.float32)


def grid_record(grid: dict[str, Any] | None, src: Volume, plan: GridPlan) -> dict[str, Any]:
    """What a volume on the grid records about it (its definition, how it was made and from what)."""
    return {**resolve_grid(grid), "interpolation": "none (already on the grid)" if plan.identity else INTERPOLATION,
            "source_shape": list(src.shape), "source_spacing": list(src.geometry.spacing),
            "source_fingerprint": volume_fingerprint(src)}


class _Slices:
    """Slices ``first .. stop-1`` of a volume, read like a volume (shape, geometry, read_slab)."""

    def __init__(self, vol: Volume, first: int, stop: int) -> None:
        if not 0 <= first < stop <= vol.shape[0]:
            raise ConfigError(f"slices [{first}, {stop}) are not inside the {vol.shape[0]} slices of {vol.path}",
                              path=vol.path, fix=f"use 0 <= first < stop <= {vol.shape[0]} (subjects[].slices)")
        self.vol, self.first = vol, first
        self.shape = (stop - first, *vol.shape[1:])
        self.geometry = Geometry(vol.geometry.spacing, tuple(vol.geometry.index_to_lps(np.array([first, 0, 0]))),
                                 vol.geometry.direction)

    def read_slab(self, z0: int, z1: int) -> np.ndarray:
        return self.vol.read_slab(self.first + z0, self.first + z1)


def resample(volume_path: str | Path, out: str | Path, grid: dict[str, Any] | None,
             slices: tuple[int, int] | None = None) -> Volume:
    """Write ``volume_path`` (only ``slices`` [first, stop) of it, if given) resampled onto ``grid`` as the
    volume ``out`` (the study's reference volume)."""
    vol = Volume.open(volume_path)
    src = vol if slices is None else _Slices(vol, *slices)
    g = resolve_grid(grid)
    plan = plan_grid(src.shape, src.geometry, g)
    background = BACKGROUND.get(vol.modality or "", 0.0)
    keep = {k: v for k, v in vol.meta.items()
            if k not in ("format", "geometry", "value_range", "complete", "provenance", "grid")}
    meta = {**keep, "grid": {**grid_record(g, vol, plan), "source_slices": None if slices is None else list(slices)},
            "provenance": provenance({"grid": g}, source={"path": str(vol.path),
                                                          "provenance_hash": config_hash(vol.meta.get("provenance"))})}
    log.info("%s %s (spacing %s mm) -> %s on the grid '%s' (spacing %s mm)%s", vol.path, list(src.shape),
             [round(s, 4) for s in src.geometry.spacing], list(plan.shape), describe(g),
             [round(s, 4) for s in plan.geometry.spacing], " - unchanged" if plan.identity else "")
    depth = default_chunk_depth(plan.shape)
    with Volume.create(out, plan.shape, plan.geometry, meta, depth) as w:
        for o0 in range(0, plan.shape[0], depth):
            o1 = min(o0 + depth, plan.shape[0])
            w.write_slab(o0, resample_slab(src, plan, o0, o1, background))
    return Volume.open(out)


def volume_grid(vol: Volume) -> dict[str, Any] | None:
    """The grid definition a volume is on (None: not made by :func:`resample`)."""
    rec = vol.meta.get("grid")
    return None if rec is None else definition(rec)
