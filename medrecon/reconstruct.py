"""Run one registered reconstruction method on a measurement store and write the result as a Volume.

This is where the image domain meets the user's units: methods return samples in the operator's domain
(linear attenuation in 1/mm for CT, complex image for MR); here they become HU (CT) or magnitude (MR),
the posterior mean is the output volume, and for several samples the posterior std is stored beside it
(``<out>/std``). Runtime, peak memory (CPU RSS, CUDA max allocated) and NFE are recorded in the output's
attributes so the evaluate step reads them from the job's own record.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.budget import check_memory_budget
from medrecon.device import pick_device
from medrecon.errors import ConfigError, InputError
from medrecon.measurement import Measurement
from medrecon.provenance import config_hash, peak_rss_mb, provenance
from medrecon.recon.progress import logging_progress
from medrecon.recon.registry import ReconProblem, get_method, load_all, validate_params
from medrecon.recon.slabs import (
    Slab,
    find_slabs,
    gather,
    merge_records,
    part_slabs,
    plan_slabs,
    slab_settings,
    sub_geometry,
)
from medrecon.volume import Volume, replace_dir

log = logging.getLogger("medrecon.reconstruct")

def check_prior_grids(paths: list[str | Path], meas: Measurement, method: str) -> None:
    """Refuse a prior trained on another reconstruction grid than the measurement's (:mod:`medrecon.grid`).

    A prior knows anatomy at the pixel scale it was trained at; applied at another scale it is silently wrong.
    Measurements simulated from a volume that was not put on a grid (library use, tests) are not checked.
    """
    from medrecon.diffusion.checkpoint import read_grid
    from medrecon.grid import describe, same_grid

    meas_grid = meas.meta.get("grid")
    if meas_grid is None:
        return
    fix = ("train the prior on this grid (the workflow's train rule uses the study's grid), point "
           "reconstruct.priors at one trained on it, or set the study's grid to the prior's")
    for path in paths:
        grid, uses_slices, own = read_grid(path)
        if not own:       # a latent prior: its autoencoder (checked too) fixes the grid
            continue
        if grid is None:
            raise ConfigError(f"Prior {path} for {method!r} records no reconstruction grid (trained on slices "
                              f"resized in pixels), so it cannot be checked against the measurement's grid "
                              f"({describe(meas_grid)}).", fix=fix)
        if not same_grid(grid, meas_grid, with_slices=uses_slices):
            raise ConfigError(f"Prior {path} for {method!r} was trained on the grid ({describe(grid)}) but the "
                              f"measurement {meas.path} is on the grid ({describe(meas_grid)}).", fix=fix)


def _rescale_per_volume_prior(prior: Any, meas: Measurement, stats: VolumeStats) -> dict[str, Any] | None:
    """For an MR prior trained with per-volume normalisation (``scope: volume``: each training volume divided by
    its own percentile, because scanner units differ by orders of magnitude), estimate this volume's divisor
    from its own data, as training did: the percentile of |A^H y| over the whole measurement (one streamed pass,
    :class:`VolumeStats`, so every slab uses the same value). Measured on the demo: within 4 % of the
    reference's own percentile (0.844 vs 0.813, 1073 vs 1044), where the stored training median (1032) was
    1000x off for a phantom in other units and DDS diverged (6.5 dB)."""
    norm = getattr(prior, "meta", {}).get("normalisation") or {}
    if meas.modality != "MR" or norm.get("kind") != "mr_percentile" or norm.get("scope") != "volume":
        return None
    value = stats.adjoint_abs_percentile(float(norm["percentile"]))
    if not value > 0:
        raise InputError(f"measurement {meas.path}: |A^H y| has percentile {value}; cannot set the prior's scale.",
                         path=meas.path, fix="check the measurement (all zeros?)")
    prior.scale = 1.0 / value
    log.info("per-volume MR prior: this volume's %.1fth percentile of |A^H y| = %.4g (training median %.4g)",
             norm["percentile"], value, norm.get("value") or float("nan"))
    return {"value": value, "from": f"{norm['percentile']}th percentile of |A^H y| of this measurement",
            "training_median": norm.get("value")}


def to_output_units(samples: torch.Tensor, measurement: Measurement) -> np.ndarray:
    """Image-domain samples → HU (CT) or magnitude (MR), float32 numpy (S, z, y, x)."""
    if measurement.modality == "CT":
        from medrecon.physics.ct_geometry import mu_to_hu

        mu_water = measurement.meta["operator_units"]["mu_water"]
        return np.asarray(mu_to_hu(samples.detach().cpu().double(), mu_water), dtype=np.float32)
    x = samples.detach().cpu()
    return (x.abs() if x.is_complex() else x).numpy().astype(np.float32)


class VolumeStats:
    """Whole-volume statistics that slab-wise methods need to behave as on the whole volume, computed on first
    use (one adjoint per slab, streamed) so methods that never ask (FBP, the samplers) pay nothing:
    ``adjoint_abs_max`` = ||A^H y||_inf, the scale of the relative weights of CT TV and MR L1-wavelet / TV, and
    for non-Cartesian MRI ``gridding_abs_max`` (density-compensated A^H y)."""

    def __init__(self, meas: Measurement, op: Any, plan: list[Slab], device: torch.device) -> None:
        self._args = (meas, op, plan, device)
        self._stats: dict[str, float] | None = None
        self._samples: list[np.ndarray] = []

    def get(self, key: str, default: Any = None) -> Any:
        if self._stats is None:
            self._stats, self._samples = self._compute(*self._args)
        return self._stats.get(key, default)

    def adjoint_abs_percentile(self, percentile: float) -> float:
        """The ``percentile`` of |A^H y| over the whole volume (strided samples of the same pass)."""
        from medrecon.diffusion.normalisation import percentile_value

        self.get("adjoint_abs_max")
        return percentile_value(self._samples, percentile)

    @staticmethod
    def _compute(meas: Measurement, op: Any, plan: list[Slab], device: torch.device
                 ) -> tuple[dict[str, float], list[np.ndarray]]:
        stats, samples = {"adjoint_abs_max": 0.0}, []
        with torch.no_grad():
            for s in plan:
                sub = op.slab(s.start, s.stop) if hasattr(op, "slab") and len(plan) > 1 else op
                y = torch.from_numpy(meas.read_slab(s.start, s.stop)).to(device)
                mag = sub.adjoint(y).abs()
                stats["adjoint_abs_max"] = max(stats["adjoint_abs_max"], float(mag.max()))
                flat = mag.cpu().numpy().reshape(-1)
                samples.append(flat[:: max(1, flat.size // 1_000_000)])
                if hasattr(sub, "gridding"):
                    grid = float(sub.gridding(y.to(torch.complex64)).abs().max())
                    stats["gridding_abs_max"] = max(stats.get("gridding_abs_max", 0.0), grid)
        return stats, samples


MODALITY_KEYS = ("CT", "MR")


def modality_params(value: dict, modality: str) -> dict:
    """A method's study parameters for one modality: ``reconstruct.params.<method>`` may hold ``CT:`` / ``MR:``
    sub-mappings that override the shared keys for that modality (e.g. DDS's z-TV and warm start chosen on CT,
    its MR start from L1-wavelet), since one method often needs different settings per modality."""
    shared = {k: v for k, v in value.items() if k not in MODALITY_KEYS}
    own = value.get(modality) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"reconstruct.params: the {modality} entry must be a mapping of parameters, got {own!r}",
                          fix=f"write e.g. {modality}: {{samples: 8}} under the method's params")
    return {**shared, **own}


def _initial_image(method: str, params: dict, problem: ReconProblem, per_slice: bool,
                   all_params: dict | None = None) -> torch.Tensor | None:
    """The starting image the method documents (registry ``init``).

    ``"fbp"``: FBP for per-slice CT, else none. ``"param"``: the method's ``init`` parameter names a classical
    method of the modality (e.g. ``tv``, ``fbp``, ``l1_wavelet``) whose reconstruction, with the study's
    parameters of that method (``all_params[name]``, i.e. reconstruct.params), is the start (a warm start, as
    CCDF / SDEdit-style samplers use it); None or "none": no start.
    """
    mode = get_method(method).init
    if mode == "fbp":
        if problem.modality != "CT" or not per_slice:
            return None
        from medrecon.recon.ct_fbp import fbp

        with torch.no_grad():
            return fbp(problem.operator, problem.y)
    if mode != "param" or params.get("init") in (None, "none"):
        return None
    name = str(params["init"])
    starts = sorted(m for m, spec in load_all().items() if spec.prior is None and problem.modality in spec.modalities)
    if name not in starts:
        raise ConfigError(f"{method}: init {name!r} is not a classical {problem.modality} method",
                          fix=f"use one of {starts} or none")
    with torch.no_grad():
        return get_method(name).run(problem, dict((all_params or {}).get(name, {})), None, None).samples[0]


def _slab_problem(meas: Measurement, op: Any, slab: Slab, per_slice: bool, device: torch.device,
                  stats: VolumeStats | None = None, method: str | None = None,
                  params: dict | None = None, all_params: dict | None = None, n_slabs: int = 1) -> ReconProblem:
    """The inverse problem of one slab (for a per-slice operator: slices lo..hi-1 and their data), with the
    starting image ``method`` wants (:func:`_initial_image`) and, with ``method``, a progress callback that
    logs the method's steps (``"<method> slab i/N step k/K, elapsed X s, ETA Y s, residual R"``,
    :func:`~medrecon.recon.progress.logging_progress`)."""
    z, y_, x_ = meas.image_shape
    if per_slice and (slab.lo, slab.hi) != (0, z):
        op = op.slab(slab.lo, slab.hi) if hasattr(op, "slab") else op
        y = torch.from_numpy(meas.read_slab(slab.lo, slab.hi)).to(device)
        shape = (slab.hi - slab.lo, y_, x_)
    else:
        y = torch.from_numpy(meas.read()).to(device)
        shape = meas.image_shape
    problem = ReconProblem(y=y, operator=op, modality=meas.modality, image_shape=shape,
                           noise_std=meas.meta.get("noise", {}).get("std"),
                           meta={**meas.meta, "spacing": list(meas.image_geometry.spacing),
                                 "slab": {"range": [slab.start, slab.stop, slab.lo, slab.hi]},
                                 "volume_stats": stats or {}})
    if method is not None:
        problem.init = _initial_image(method, params or {}, problem, per_slice, all_params)
        # step lines in the job log: every tenth of the steps, at least every 30 s (residual on those only)
        problem.progress = logging_progress(log, f"{method} slab {slab.index + 1}/{n_slabs}", problem.operator,
                                            problem.y)
    return problem


def _solve(method: str, problem: ReconProblem, params: dict, prior: Any, generator: torch.Generator,
           device: torch.device, core: slice) -> tuple[Any, dict[str, Any]]:
    """Run the method on one problem; its record (time, memory, NFE, residual on the core slices)."""
    from medrecon.metrics import data_residual

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = get_method(method).run(problem, params, prior, generator)
    runtime = time.perf_counter() - t0
    mean = result.samples.mean(dim=0)
    y_core = problem.y[core]
    den = float(y_core.abs().double().pow(2).sum())
    resid = data_residual(problem.operator, mean[core], y_core)
    record = {
        "runtime_s": runtime,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_max_allocated_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "nfe": int(result.nfe),
        "samples": int(result.samples.shape[0]),
        "data_residual": resid,
        "residual_num": resid**2 * den, "residual_den": den,
    }
    return result, record


def write_artifacts(out: Path, info: dict[str, Any], y: torch.Tensor, slab_index: int | None = None
                    ) -> dict[str, Any]:
    """A method's outputs besides the image, written beside the reconstruction; ``info`` with their records.

    A method may return ``info["artifacts"] = {name: bytes or a torch-saveable object}`` (e.g. the LoRA weights
    scd/padis_ood adapted to this measurement). Each is written to ``<out>.<name>.pt`` (``<out>.<name>.slab<i>.pt``
    for slab i of a slab-wise run) and replaced in ``info`` by its path, sha256 and size and the sha256 of the
    measurement it was made from, so the provenance names which subject a file belongs to. Nothing reads these
    files back: every run adapts from its base prior.
    """
    arts = info.get("artifacts")
    if not arts:
        return info
    measured = hashlib.sha256(y.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    records = {}
    for name, obj in arts.items():
        if isinstance(obj, bytes):
            data = obj
        else:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
        path = out.with_name(f"{out.name}.{name}{'' if slab_index is None else f'.slab{slab_index}'}.pt")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
        records[name] = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                         "measurement_sha256": measured}
    return {**info, "artifacts": records}


def _write(out: Path, images: np.ndarray, geometry: Any, meta: dict[str, Any]) -> None:
    """Posterior mean as the volume; the std beside it (``<out>/std``) when there are several samples."""
    with Volume.create(out, images.shape[1:], geometry, meta) as w:
        w.write(images.mean(axis=0))
        if images.shape[0] > 1:
            with w.child("std", {**meta, "kind": "posterior_std"}) as c:
                c.write(images.std(axis=0, ddof=1))


def _slab_generator(seed: int, slab: Slab, n_slabs: int) -> torch.Generator:
    """Sampler noise: the job seed for a whole volume; for slab i its own stream (seed, i), so the result does
    not depend on how slabs are grouped into jobs."""
    if n_slabs == 1:
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, slab.index]).generate_state(1)[0]))


def reconstruct(measurement_path: str | Path, out: str | Path, method: str, config: dict[str, Any],
                prior_path: str | Path | list[str | Path] | None = None,
                part: tuple[int, int] | None = None) -> Volume | Path:
    """Reconstruct ``measurement_path`` with ``method`` (config['reconstruct']) into the Volume ``out``.

    ``prior_path`` is one checkpoint, or several for methods whose prior has several parts (ReSample:
    autoencoder then latent prior). Per-slice geometries are reconstructed slab by slab
    (``reconstruct.slab``, see :mod:`medrecon.recon.slabs`): finished slabs are kept in ``<out>.slabs/`` until
    the blended volume is written, so an interrupted job resumes from its last finished slab. With
    ``part=(i, n)`` only job i of n runs and ``out`` is a folder of slab volumes for :func:`gather_parts`.
    """
    spec = get_method(method)
    meas = Measurement.open(measurement_path)
    if meas.modality not in spec.modalities:
        raise ConfigError(f"Method {method!r} does not apply to {meas.modality} data ({measurement_path}).",
                          fix=f"list it under reconstruct.methods.{spec.modalities[0]} instead.")
    rcfg = config["reconstruct"]
    study_params = {name: modality_params(value, meas.modality) for name, value in rcfg["params"].items()}
    params = dict(study_params.get(method, {}))
    validate_params(method, params)       # a typo in the config fails here, before any prior is loaded
    settings = slab_settings(rcfg)
    device = pick_device(rcfg["device"], "reconstruct.device")
    seed = int(rcfg["seed"])
    op = meas.operator(device)
    per_slice = len(op.in_shape) == 2
    plan = plan_slabs(meas.image_shape[0], settings["size"], settings["halo"], per_slice)
    whole = len(plan) == 1
    check_memory_budget(measurement_path, meas.image_shape, 0 if whole else settings["size"], method,
                        config["memory_mb"], halo=0 if whole else settings["halo"])
    paths = [] if prior_path is None else [prior_path] if isinstance(prior_path, str | Path) else list(prior_path)
    prior = None
    if paths:
        check_prior_grids(paths, meas, method)
        if spec.loader is None:
            raise ConfigError(f"Method {method!r} takes no prior, but prior(s) {', '.join(map(str, paths))} "
                              "were given.", fix=f"drop the prior for {method!r} (reconstruct.priors, --prior).")
        load = spec.load_prior()
        # Methods work in the operator's image domain: attenuation (1/mm) for CT, the native image for MR.
        if meas.modality == "CT":
            prior = load(*paths, device=device, expect_modality="CT", image_units="attenuation",
                         mu_water=float(meas.meta["operator_units"]["mu_water"]))
        else:
            prior = load(*paths, device=device, expect_modality="MR")
    stats = VolumeStats(meas, op, plan, device)       # computed on first use only
    prior_scale = _rescale_per_volume_prior(prior, meas, stats) if prior is not None else None
    meta = {
        "modality": meas.modality,
        "units": "HU" if meas.modality == "CT" else meas.meta.get("image_units", "arbitrary"),
        "kind": "reconstruction", "method": method, "params": params,
        "measurement": str(measurement_path), "prior": [str(p) for p in paths] or None,
        "grid": meas.meta.get("grid"), "prior_scale": prior_scale,
        "provenance": provenance({"reconstruct": rcfg, "method": method}, seeds={"reconstruct": seed},
                                 device=str(device)),
    }
    # What makes a finished slab reusable on a re-run: everything that changes its numbers.
    digest = config_hash({"reconstruct": rcfg, "method": method, "measurement": meas.meta.get("provenance"),
                          "priors": [(str(p), Path(p).stat().st_mtime_ns) for p in paths]})
    out = Path(out)
    todo = plan if part is None else part_slabs(plan, *part)
    # Where finished slabs go: a part job's folder (renamed into place at the end), or the single job's scratch
    # folder beside the output (kept across an interruption); a one-slab plan writes the output directly.
    if part is not None:
        folder: Path | None = _tmp_folder(out)
    else:
        folder = out.with_name(out.name + ".slabs") if len(plan) > 1 else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for slab in todo:
        target = None if folder is None else folder / slab.name
        if target is not None and _finished_slab(target, digest):
            log.info("%s: slab %d already finished (%s)", method, slab.index, target)
            continue
        problem = _slab_problem(meas, op, slab, per_slice, device, stats if len(plan) > 1 else None, method,
                                params, study_params, len(plan))
        core = slice(slab.start - slab.lo, slab.stop - slab.lo) if per_slice else slice(None)
        result, record = _solve(method, problem, params, prior, _slab_generator(seed, slab, len(plan)),
                                device, core)
        log.info("%s on %s slab %d/%d (slices %d..%d): %.2f s, NFE %d, residual %.4f", method, measurement_path,
                 slab.index + 1, len(plan), slab.lo, slab.hi - 1, record["runtime_s"], record["nfe"],
                 record["data_residual"])
        images = to_output_units(result.samples, meas)
        info = write_artifacts(out, result.info, problem.y, None if target is None else slab.index)
        if target is None:       # the whole volume in one piece
            _write(out, images, meas.image_geometry, {**meta, "record": record, "info": info})
            return Volume.open(out)
        slab_meta = {**meta, "record": record, "info": info, "config_digest": digest,
                     "slab": {"index": slab.index, "count": len(plan), "depth": meas.image_shape[0],
                              "range": [slab.start, slab.stop, slab.lo, slab.hi], "halo": settings["halo"],
                              "volume_geometry": meas.image_geometry.to_dict()}}
        _write(target, images, sub_geometry(meas.image_geometry, slab.lo), slab_meta)
    if part is not None:
        replace_dir(folder, out)
        return out
    vol = gather_parts([folder], out, base_meta=meta)
    shutil.rmtree(folder, ignore_errors=True)
    return vol


def _tmp_folder(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _finished_slab(path: Path, digest: str | None) -> bool:
    """A slab volume from an earlier (interrupted) run of the same configuration."""
    if not path.exists():
        return False
    try:
        vol = Volume.open(path)
    except InputError:
        shutil.rmtree(path, ignore_errors=True)     # unfinished: redo it
        return False
    return digest is not None and vol.meta.get("config_digest") == digest


def gather_parts(folders: list[str | Path], out: str | Path, base_meta: dict[str, Any] | None = None) -> Volume:
    """Blend the slab volumes found in ``folders`` into the volume ``out`` (the gather of a scattered run)."""
    slabs = find_slabs([Path(f) for f in folders])
    if not slabs:
        raise InputError(f"no slab volumes in {', '.join(map(str, folders))}.",
                         fix="run `medrecon reconstruct --part I/N` for every part first.")
    first = slabs[min(slabs)].meta
    keep = ("modality", "units", "kind", "method", "params", "measurement", "prior", "provenance")
    meta = dict(base_meta) if base_meta else {k: first[k] for k in keep if k in first}
    ordered = [slabs[i] for i in sorted(slabs)]
    meta["record"] = merge_records([v.meta["record"] for v in ordered])
    meta["info"] = {"slabs": [{"range": v.meta["slab"]["range"], **(v.meta.get("info") or {})} for v in ordered],
                    "halo": first["slab"]["halo"]}
    log.info("gathering %d slabs into %s (data residual %.4f)", len(slabs), out, meta["record"]["data_residual"])
    return gather(slabs, out, meta)
