"""Slab-wise reconstruction: plan slabs with a halo, and blend finished slabs back into one volume.

Why: a 512-slice volume must not be held in memory at once, and on a cluster its slabs are independent jobs.
For operators that act slice by slice (parallel/fan-beam CT, 2D MRI) the measurement of slices
``lo..hi`` depends only on those slices, so a slab is its own inverse problem. Methods that couple slices
(3D TV, DiffusionBlend's slab prior, PaDIS-3D's d x P x P patches) see ``halo`` extra slices on each side,
so no method sees an artificial edge inside the volume; the slabs are blended back with weights that
ramp (raised cosine) across the 2 x halo slices two neighbouring slabs share, and are 1 elsewhere.

The plan depends only on (depth, size, halo), never on how slabs are grouped into jobs, and each slab's
sampler noise comes from its own stream ``(seed, slab index)``: one job or many give identical volumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.errors import ConfigError, InputError
from medrecon.volume import Geometry, Volume, slab_ranges


@dataclass(frozen=True)
class Slab:
    """Slab ``index``: it owns slices ``start..stop-1`` (core) and is reconstructed over ``lo..hi-1``."""

    index: int
    start: int
    stop: int
    lo: int
    hi: int

    @property
    def name(self) -> str:
        return f"slab_{self.index:04d}.zarr"


def slab_settings(rcfg: dict[str, Any]) -> dict[str, int]:
    """``reconstruct.slab`` of a validated config (defaults from the schema), with the relations between its keys
    checked (the schema checks each key's type and range)."""
    s = dict(rcfg["slab"])
    if s["size"] < 0 or s["halo"] < 0 or s["jobs"] < 1:
        raise ConfigError(f"reconstruct.slab must have size >= 0, halo >= 0, jobs >= 1 (got {s}).",
                          fix="e.g. reconstruct.slab: {size: 64, halo: 4, jobs: 1}; size 0 = whole volume.")
    if s["size"] and 2 * s["halo"] > s["size"]:
        raise ConfigError(f"reconstruct.slab.halo ({s['halo']}) is more than half the slab size ({s['size']}): "
                          "a slab's two blending ramps would overlap.",
                          fix="use a halo of at most size / 2 (a few slices is enough).")
    return {k: int(v) for k, v in s.items()}


def plan_slabs(depth: int, size: int, halo: int, separable: bool) -> list[Slab]:
    """The slabs of a ``depth``-slice volume; one whole-volume slab when ``size`` is 0 or >= depth, or when
    the operator couples slices (cone beam, 3D k-space), which cannot be cut."""
    if not separable or size <= 0 or size >= depth:
        return [Slab(0, 0, depth, 0, depth)]
    return [Slab(i, *r) for i, r in enumerate(slab_ranges(depth, size, halo))]


def part_slabs(plan: list[Slab], part: int, parts: int) -> list[Slab]:
    """Slabs of job ``part`` out of ``parts``: contiguous runs of the plan (a job may get none)."""
    if not 0 <= part < parts:
        raise ConfigError(f"slab part {part} is outside 0..{parts - 1}.", fix="pass --part I/N with 0 <= I < N.")
    bounds = np.linspace(0, len(plan), parts + 1).round().astype(int)
    return plan[bounds[part]:bounds[part + 1]]


def blend_weights(slab: Slab, depth: int, halo: int) -> np.ndarray:
    """Weights over ``slab.lo..slab.hi-1``: raised-cosine ramps across the slices shared with a neighbour.

    The boundary ``start`` with the slab below is shared over ``start-halo..start+halo-1``: this slab's weight
    rises there as the lower one's falls, by complementary raised cosines, so the weights of the slabs covering
    any slice add up to exactly 1 (also where the volume ends inside a halo). At the volume's ends, and with
    ``halo`` 0, the weight stays 1.
    """
    z = np.arange(slab.lo, slab.hi, dtype=np.float64) + 0.5
    w = np.ones_like(z)
    if halo > 0 and slab.start > 0:
        t = np.clip((z - (slab.start - halo)) / (2 * halo), 0, 1)
        w = np.minimum(w, 0.5 - 0.5 * np.cos(math.pi * t))
    if halo > 0 and slab.stop < depth:
        t = np.clip(((slab.stop + halo) - z) / (2 * halo), 0, 1)
        w = np.minimum(w, 0.5 - 0.5 * np.cos(math.pi * t))
    return w


def sub_geometry(geometry: Geometry, lo: int) -> Geometry:
    """The geometry of slices ``lo..`` of a volume: same spacing and directions, origin moved to slice ``lo``."""
    origin = geometry.index_to_lps(np.array([lo, 0, 0]))
    return Geometry(geometry.spacing, tuple(origin.tolist()), geometry.direction)


def find_slabs(folders: list[Path]) -> dict[int, Volume]:
    """Finished slab volumes in ``folders`` by index (a slab written twice is an error: parts overlap)."""
    found: dict[int, Volume] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("slab_*.zarr")):
            vol = Volume.open(path)
            idx = int(vol.meta["slab"]["index"])
            if idx in found:
                raise InputError(f"slab {idx} appears twice ({found[idx].path} and {path}).",
                                 fix="delete the slab folders and re-run the reconstruct jobs.")
            found[idx] = vol
    return found


def gather(slabs: dict[int, Volume], out: str | Path, meta: dict[str, Any], chunk_depth: int | None = None
           ) -> Volume:
    """Blend finished slab volumes into the volume ``out``, chunk by chunk (memory: one output chunk plus the
    slab parts that overlap it); the posterior std (``<slab>/std``) is blended with the same weights."""
    if not slabs:
        raise InputError(f"no slab volumes to gather into {out}.", fix="run the reconstruct part jobs first.")
    first = slabs[min(slabs)].meta["slab"]
    depth, n = int(first["depth"]), int(first["count"])
    missing = sorted(set(range(n)) - set(slabs))
    if missing:
        raise InputError(f"slabs {missing} of {n} are missing for {out}.",
                         fix="run the missing reconstruct part jobs (snakemake does this) and gather again.")
    plan = {i: Slab(i, *(int(v) for v in slabs[i].meta["slab"]["range"])) for i in range(n)}
    ref = slabs[0]
    shape = (depth, *ref.shape[1:])
    geometry = Geometry.from_dict(ref.meta["slab"]["volume_geometry"])
    halo = int(first["halo"])
    weights = {i: blend_weights(s, depth, halo) for i, s in plan.items()}
    has_std = all((v.path / "std").exists() for v in slabs.values())

    def blend(writer: Any, child: str | None) -> None:
        step = writer.chunk_depth
        for z0 in range(0, depth, step):
            z1 = min(z0 + step, depth)
            acc = np.zeros((z1 - z0, *shape[1:]), dtype=np.float64)
            wsum = np.zeros(z1 - z0, dtype=np.float64)
            for i, s in plan.items():
                a, b = max(z0, s.lo), min(z1, s.hi)
                if a >= b:
                    continue
                vol = slabs[i] if child is None else Volume.open(slabs[i].path / child)
                w = weights[i][a - s.lo:b - s.lo]
                acc[a - z0:b - z0] += w[:, None, None] * vol.read_slab(a - s.lo, b - s.lo)
                wsum[a - z0:b - z0] += w
            writer.write_slab(z0, acc / wsum[:, None, None])

    with Volume.create(out, shape, geometry, meta, chunk_depth) as w:
        blend(w, None)
        if has_std:
            with w.child("std", {**meta, "kind": "posterior_std"}) as c:
                blend(c, "std")
    return Volume.open(out)


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One job record from the slabs': times and NFE add up, peak memory is the largest, and the data residual
    is recombined from each slab's core numerator and denominator (``sqrt(sum num / sum den)``)."""
    out: dict[str, Any] = {
        "runtime_s": sum(r["runtime_s"] for r in records),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "nfe": sum(int(r["nfe"]) for r in records),
        "samples": records[0]["samples"],
        "slabs": len(records),
    }
    cuda = [r["cuda_max_allocated_mb"] for r in records if r.get("cuda_max_allocated_mb") is not None]
    out["cuda_max_allocated_mb"] = max(cuda) if cuda else None
    den = sum(r["residual_den"] for r in records)
    out["data_residual"] = math.sqrt(sum(r["residual_num"] for r in records) / den) if den > 0 else float("nan")
    return out
