"""The evaluate step: one JSON of metrics per (subject, method), read back by the study tables.

Image metrics come from :mod:`medrecon.metrics` in the configured window (CT: ``evaluate.ct_window`` HU;
MR: the reference's robust percentile range), inside the body mask when configured. Runtime, peak memory,
NFE and the data-consistency residual are read from the reconstruction's own record (they are measured in
the reconstruct job, where the complex MR image and the device are available; NFE only for methods with a
learned prior, solver iterations separately, :func:`cost_metrics`). With several posterior
samples, the coverage of the posterior std is reported next to the accuracy.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from medrecon import metrics
from medrecon.errors import InputError
from medrecon.measurement import Measurement
from medrecon.provenance import provenance, to_jsonable
from medrecon.volume import Volume, volume_fingerprint

log = logging.getLogger("medrecon.evaluate")


def window_for(ref: Volume, cfg: dict[str, Any]) -> tuple[float, float]:
    ev = cfg["evaluate"]
    if ref.modality == "CT":
        lo, hi = ev["ct_window"]
        return float(lo), float(hi)
    p_lo, p_hi = ev["mr_percentiles"]
    return metrics.robust_range(ref, p_lo, p_hi)


def source_measurement(rec: Volume) -> Measurement | None:
    """The measurement a reconstruction was made from, when its store is still there (it may be deleted)."""
    path = rec.meta.get("measurement")
    try:
        return Measurement.open(path) if path else None
    except InputError as err:
        log.info("cannot check which volume %s was measured from: %s", rec.path, err)
        return None


def check_same_volume(reference: Volume, rec: Volume) -> None:
    """Refuse to score a reconstruction against a volume other than the one its measurement was made from.

    Different grids are always refused; on the same grid the measurement's ``reference_fingerprint`` (see
    :func:`medrecon.volume.volume_fingerprint`) must match the reference's, when the measurement is there.
    """
    meas = source_measurement(rec)
    origin = (f" It was reconstructed from measurement {meas.path}, made from volume "
              f"{meas.meta.get('reference_volume')}." if meas else "")
    fix = "evaluate against the volume that was measured, or re-run measure and reconstruct on this reference."
    if reference.shape != rec.shape or not reference.geometry.isclose(rec.geometry):
        raise InputError(
            f"Reconstruction {rec.path} (shape {rec.shape}, spacing {rec.geometry.spacing}) is not on the grid of "
            f"its reference {reference.path} (shape {reference.shape}, spacing {reference.geometry.spacing})."
            + origin, path=reference.path, fix=fix)
    stored = meas.meta.get("reference_fingerprint") if meas else None
    if stored is not None and stored != volume_fingerprint(reference):
        raise InputError(f"Reference {reference.path} is not the volume that was measured for {rec.path}: same "
                         f"grid, different content (or a different ingest of it).{origin}", path=reference.path,
                         fix=fix)


def iterations(info: dict[str, Any] | None) -> int | None:
    """Solver iterations recorded by an iterative method (``n_iter``); for a slab-wise run the largest over
    the slabs (each slab runs the same solver); None when the method records none."""
    info = info or {}
    if isinstance(info.get("n_iter"), int | float):
        return int(info["n_iter"])
    per_slab = [s.get("n_iter") for s in info.get("slabs") or [] if isinstance(s, dict)]
    per_slab = [int(v) for v in per_slab if isinstance(v, int | float)]
    return max(per_slab) if per_slab else None


def cost_metrics(meta: dict[str, Any]) -> dict[str, Any]:
    """Runtime, memory, data residual, posterior samples, NFE and iterations of a reconstruction, from its
    own record.

    NFE (number of function evaluations) counts evaluations of the learned prior network, so it is kept
    only for methods that ran with a prior; the record's ``nfe`` of a classical method counts operator
    applications and is left out. Iterations come from the method's ``info`` (``n_iter``) where it has one.
    """
    record = meta.get("record", {})
    # samples: the output is the posterior mean of that many samples (1: a single sample, or a point estimate)
    out = {k: record[k] for k in ("runtime_s", "peak_rss_mb", "cuda_max_allocated_mb", "data_residual", "samples")
           if record.get(k) is not None}
    if meta.get("prior") and record.get("nfe") is not None:
        out["nfe"] = record["nfe"]
    n_iter = iterations(meta.get("info"))
    if n_iter is not None:
        out["iterations"] = n_iter
    return out


def evaluate(reference: str | Path, recon: str | Path, out: str | Path, cfg: dict[str, Any],
             subject: str, method: str, slab: int | None = None) -> dict[str, Any]:
    """Compute the metrics of ``recon`` against ``reference`` and write them to the JSON ``out``.

    Volumes are streamed ``slab`` slices at a time (default :func:`metrics.evaluation_slab`): memory does
    not grow with the number of slices, and the numbers do not depend on ``slab``.
    """
    ref, rec = Volume.open(reference), Volume.open(recon)
    check_same_volume(ref, rec)
    window = window_for(ref, cfg)
    mask = cfg["evaluate"]["mask"]
    threshold = metrics.default_body_threshold(ref.modality, window)
    result = metrics.evaluate_volumes(ref, rec, window, mask=mask, body_threshold=threshold, slab=slab)
    scalars = {k: result[k] for k in metrics.SCALAR_KEYS}
    scalars.update(cost_metrics(rec.meta))
    std = rec.posterior_std()
    if std is not None:
        cov = metrics.coverage_volumes(rec, std, ref, mask=mask, body_threshold=threshold, slab=slab)
        scalars.update(cov)
        n = int(rec.meta.get("record", {}).get("samples", 0)) or None
        for k in (1, 2):
            scalars[f"cov{k}_expected"] = metrics.expected_coverage(k, n)
    notes = list(result.get("notes", []))
    grid = ref.meta.get("grid")
    if grid is not None:
        from medrecon.grid import describe

        notes.append(f"reference = the ingested volume {grid['source_shape']} at {grid['source_spacing']} mm "
                     f"resampled onto the study grid ({describe(grid)}; {grid['interpolation']})")
    doc = {
        "subject": subject, "method": method, "modality": ref.modality, "window": list(window),
        "units": ref.meta.get("units"), "prior": rec.meta.get("prior"),
        "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()},
        "per_slice": {"psnr": result["psnr_per_slice"], "ssim": result["ssim_per_slice"]},
        "info": result.get("info", {}), "notes": notes,
        "reference": str(reference), "recon": str(recon),
        # Scored on the study's reconstruction grid: the reference is the ingested volume resampled onto it.
        "reference_grid": ref.meta.get("grid"),
        "provenance": provenance({"evaluate": cfg["evaluate"]}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(doc), indent=1))
    tmp.replace(out)
    return doc
