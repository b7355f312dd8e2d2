"""Ingest dispatcher: any supported input (DICOM folder/file, NIfTI, medrecon zarr, phantom) → Volume(s).

The format is chosen from the path: ``.nii``/``.nii.gz`` → NIfTI, ``.zarr`` → an existing medrecon volume
(copied slab by slab, so previous outputs can be study inputs), ``phantom:KIND?seed=N&shape=Z,Y,X&
spacing=DZ,DY,DX`` → a generated phantom (so a synthetic training set is a few lines of config, not
shipped data), anything else → DICOM.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medrecon.budget import check_ingest_budget
from medrecon.config import PHANTOM_PREFIX
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import provenance
from medrecon.volume import Geometry, Volume

log = logging.getLogger("medrecon.io.ingest")


def axis_codes(geometry: Geometry) -> str:
    """Where the array's x, y, z axes point in the patient (LPS letters, e.g. ``"LPS"`` for the default grid:
    x toward the patient's left, y posterior, z superior; a flipped axis gives R, A or I)."""
    d = geometry.direction_matrix        # columns: the z, y, x axes in LPS
    codes = []
    for col in (2, 1, 0):
        v = d[:, col]
        k = int(np.argmax(np.abs(v)))
        codes.append("LPS"[k] if v[k] > 0 else "RAI"[k])
    return "".join(codes)


def describe_volume(path: str | Path) -> str:
    """One line about a written volume: modality, shape, spacing, orientation, value range."""
    vol = Volume.open(path)
    g = vol.geometry
    z, y, x = vol.shape
    text = (f"{vol.meta.get('modality', '?')} volume {path}: {z} x {y} x {x} voxels (z, y, x), spacing "
            f"{g.spacing[0]:.4g} x {g.spacing[1]:.4g} x {g.spacing[2]:.4g} mm, orientation {axis_codes(g)} "
            f"(x, y, z toward {', '.join(axis_codes(g))}), origin ({', '.join(f'{o:.1f}' for o in g.origin)}) mm")
    vr = vol.meta.get("value_range")
    if isinstance(vr, list | tuple) and len(vr) == 2:
        text += f", values {vr[0]:.4g}..{vr[1]:.4g} {vol.meta.get('units', '')}".rstrip()
    return text


def _log_outputs(paths: list[Path]) -> list[Path]:
    for p in paths:
        log.info("wrote %s", describe_volume(p))
    return paths


def input_format(src: str | Path) -> str:
    """'phantom', 'nifti', 'zarr' or 'dicom' by the path's name."""
    if str(src).startswith(PHANTOM_PREFIX):
        return "phantom"
    name = Path(src).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".zarr"):
        return "zarr"
    return "dicom"


def copy_volume(src: Path, out: Path, meta_extra: dict[str, Any] | None = None,
                memory_mb: float | None = None) -> list[Path]:
    """Copy a medrecon volume slab by slab (re-stamping provenance), e.g. a generated phantom."""
    vol = Volume.open(src)
    check_ingest_budget(src, vol.shape, memory_mb)
    meta = {k: v for k, v in vol.meta.items() if k not in ("format", "geometry", "value_range", "complete")}
    meta["source_volume"] = {"path": str(src), "provenance": vol.meta.get("provenance")}
    meta.update(meta_extra or {})
    with Volume.create(out, vol.shape, vol.geometry, meta, vol.chunk_depth) as w:
        for (start, stop, _lo, _hi), data in vol.iter_slabs():
            bad = int((~np.isfinite(data)).sum())
            if bad:  # a store written with allow_nonfinite: name the source, not the output being written
                raise InputError(f"{src} has {bad} NaN/Inf voxels in slices {start}..{stop - 1}.", path=src,
                                 fix="fix or mask those voxels before ingest (NaN has no meaning for a "
                                     "reconstruction).")
            w.write_slab(start, data)
    return [out]


def parse_phantom_spec(spec: str) -> dict[str, Any]:
    """``phantom:ct_chest?seed=3&shape=24,128,128&spacing=2.5,2.5,2.5`` → keyword arguments."""
    from urllib.parse import parse_qs

    body = spec[len(PHANTOM_PREFIX):]
    kind, _, query = body.partition("?")
    q = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()}
    unknown = set(q) - {"seed", "shape", "spacing"}
    if unknown or not kind:
        raise ConfigError(f"Bad phantom input {spec!r} (unknown keys {sorted(unknown)}).",
                          fix="write phantom:KIND?seed=N&shape=Z,Y,X&spacing=DZ,DY,DX")
    try:
        return {"kind": kind, "seed": int(q.get("seed", 0)),
                "shape": tuple(int(v) for v in q.get("shape", "32,128,128").split(",")),
                "spacing": tuple(float(v) for v in q.get("spacing", "2.0,1.5,1.5").split(","))}
    except ValueError as err:
        raise ConfigError(f"Bad phantom input {spec!r}: {err}.",
                          fix="write phantom:KIND?seed=N&shape=Z,Y,X&spacing=DZ,DY,DX") from err


def ingest(src: str | Path, out: str | Path, config: dict[str, Any], *, modality: str | None = None,
           series: str | None = None, timepoint: int | None = None) -> list[Path]:
    """Ingest ``src`` into ``out`` (one ``.zarr`` store, or a directory of stores) per ``config['ingest']``
    (a validated config: :func:`medrecon.config.validate` fills the defaults)."""
    memory_mb = config["memory_mb"]
    if input_format(src) == "phantom":
        from medrecon.io.phantoms import write_phantom_volume

        spec = parse_phantom_spec(str(src))
        if len(spec["shape"]) == 3:  # a malformed shape is write_phantom_volume's error to report
            check_ingest_budget(src, spec["shape"], memory_mb)
        log.info("ingest: phantom %s (seed %d, shape %s, spacing %s mm)", spec["kind"], spec["seed"],
                 spec["shape"], spec["spacing"])
        return _log_outputs([write_phantom_volume(**spec, out_zarr=out)])
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"Input {src} does not exist.", fix="check the subject's 'input' path in the config.")
    opts = config["ingest"]
    meta_extra = {"provenance": provenance({"ingest": opts}, seeds={})}
    if modality:
        meta_extra["modality"] = modality
    fmt = input_format(src)
    log.info("ingest: %s input %s -> %s", fmt, src, out)
    if fmt == "zarr":
        return _log_outputs(copy_volume(src, out, meta_extra, memory_mb))
    if fmt == "nifti":
        from medrecon.io.nifti import ingest_nifti

        return _log_outputs(ingest_nifti(src, out, on_4d=opts["on_4d"], timepoint=timepoint,
                                         meta_extra=meta_extra, memory_mb=memory_mb))
    from medrecon.io.dicom import DicomOptions, ingest_dicom

    options = DicomOptions(**{k: v for k, v in opts.items() if k in DicomOptions.__dataclass_fields__})
    return _log_outputs(ingest_dicom(src, out, options, series=series, timepoint=timepoint,
                                     meta_extra=meta_extra, memory_mb=memory_mb))
