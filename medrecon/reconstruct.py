"""Run one registered reconstruction method on a measurement store and write the result as a Volume.

This is where the image domain meets the user's units: methods return samples in the operator's domain
(linear attenuation in 1/mm for CT, complex image for MR); here they become HU (CT) or magnitude (MR),
the posterior mean is the output volume, and for several samples the posterior std is stored beside it
(``<out>/std``). Runtime, peak memory (CPU RSS, CUDA max allocated) and NFE are recorded in the output's
attributes so the evaluate step reads them from the job's own record.
"""

from __future__ import annotations

import importlib
import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError, DeviceError
from medrecon.measurement import Measurement
from medrecon.provenance import provenance
from medrecon.recon.registry import METHOD_MODALITIES, METHODS, ReconProblem
from medrecon.volume import Volume

log = logging.getLogger("medrecon.reconstruct")

# Modules that register methods when imported (one method per file, see design.md).
_METHOD_MODULES = (
    "medrecon.recon.classical", "medrecon.recon.ct_fbp", "medrecon.recon.mri_classical",
    "medrecon.methods.dps", "medrecon.methods.dds", "medrecon.methods.diffusionblend", "medrecon.methods.padis",
    "medrecon.methods.resample",
)

# Which loader turns a checkpoint into the prior a method expects (default: a whole-slice prior).
_PRIOR_LOADERS = {
    "padis": "medrecon.diffusion.patches:patch_prior_from_checkpoint",
    "padis3d": "medrecon.diffusion.patches:patch_prior_from_checkpoint",
    "diffusionblend": "medrecon.diffusion.slab_data:slab_prior_from_checkpoint",
    "diffusionblend++": "medrecon.diffusion.slab_data:slab_prior_from_checkpoint",
    # ReSample: two checkpoints, the autoencoder and the latent prior trained on it
    "resample": "medrecon.diffusion.latent:load_latent_prior",
    "latent_dps": "medrecon.diffusion.latent:load_latent_prior",
}
_DEFAULT_PRIOR_LOADER = "medrecon.diffusion.checkpoint:prior_from_checkpoint"


def prior_loader(method: str):
    module, _, name = _PRIOR_LOADERS.get(method, _DEFAULT_PRIOR_LOADER).partition(":")
    return getattr(importlib.import_module(module), name)


def load_methods() -> dict:
    """Import every method module that exists so the registry is complete."""
    for name in _METHOD_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    return METHODS


def pick_device(setting: str) -> torch.device:
    """'auto' → CUDA when available else CPU; 'cuda' on a machine without one is a clear error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceError("reconstruct.device is 'cuda' but this machine has no CUDA GPU.",
                          fix="set reconstruct.device: auto (or cpu), or run on a GPU node.")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def to_output_units(samples: torch.Tensor, measurement: Measurement) -> np.ndarray:
    """Image-domain samples → HU (CT) or magnitude (MR), float32 numpy (S, z, y, x)."""
    if measurement.modality == "CT":
        from medrecon.physics.ct_geometry import mu_to_hu

        mu_water = measurement.meta["operator_units"]["mu_water"]
        return np.asarray(mu_to_hu(samples.detach().cpu().double(), mu_water), dtype=np.float32)
    x = samples.detach().cpu()
    return (x.abs() if x.is_complex() else x).numpy().astype(np.float32)


def reconstruct(measurement_path: str | Path, out: str | Path, method: str, config: dict[str, Any],
                prior_path: str | Path | list[str | Path] | None = None) -> Volume:
    """Reconstruct ``measurement_path`` with ``method`` (config['reconstruct']) into the Volume ``out``.

    ``prior_path`` is one checkpoint, or several for methods whose prior has several parts (ReSample:
    autoencoder then latent prior).
    """
    methods = load_methods()
    if method not in methods:
        raise ConfigError(f"Unknown reconstruction method {method!r}.",
                          fix=f"use one of: {', '.join(sorted(methods))}.")
    meas = Measurement.open(measurement_path)
    if meas.modality not in METHOD_MODALITIES[method]:
        raise ConfigError(f"Method {method!r} does not apply to {meas.modality} data ({measurement_path}).",
                          fix=f"list it under reconstruct.methods.{METHOD_MODALITIES[method][0]} instead.")
    rcfg = config["reconstruct"]
    params = dict(rcfg.get("params", {}).get(method, {}))
    device = pick_device(rcfg.get("device", "auto"))
    seed = int(rcfg.get("seed", 0))
    # Sampler noise is drawn on the CPU and moved: the same seed gives the same noise on any device.
    generator = torch.Generator().manual_seed(seed)
    prior = None
    paths = [] if prior_path is None else [prior_path] if isinstance(prior_path, str | Path) else list(prior_path)
    if paths:
        load = prior_loader(method)
        # Methods work in the operator's image domain: attenuation (1/mm) for CT, the native image for MR.
        if meas.modality == "CT":
            prior = load(*paths, device=device, expect_modality="CT", image_units="attenuation",
                         mu_water=float(meas.meta["operator_units"]["mu_water"]))
        else:
            prior = load(*paths, device=device, expect_modality="MR")

    op = meas.operator(device)
    y = torch.from_numpy(meas.read()).to(device)
    problem = ReconProblem(y=y, operator=op, modality=meas.modality, image_shape=meas.image_shape,
                           noise_std=meas.meta.get("noise", {}).get("std"),
                           meta={**meas.meta, "spacing": list(meas.image_geometry.spacing)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = methods[method](problem, params, prior, generator)
    runtime = time.perf_counter() - t0
    record = {
        "runtime_s": runtime,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cuda_max_allocated_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "nfe": int(result.nfe),
        "samples": int(result.samples.shape[0]),
    }
    from medrecon.metrics import data_residual

    record["data_residual"] = data_residual(op, result.samples.mean(dim=0), y)
    log.info("%s on %s: %.2f s, NFE %d, residual %.4f", method, measurement_path, runtime, result.nfe,
             record["data_residual"])
    images = to_output_units(result.samples, meas)
    mean = images.mean(axis=0)
    meta = {
        "modality": meas.modality,
        "units": "HU" if meas.modality == "CT" else meas.meta.get("image_units", "arbitrary"),
        "kind": "reconstruction", "method": method, "params": params, "record": record, "info": result.info,
        "measurement": str(measurement_path), "prior": [str(p) for p in paths] or None,
        "provenance": provenance({"reconstruct": rcfg, "method": method}, seeds={"reconstruct": seed},
                                 device=str(device)),
    }
    with Volume.create(out, mean.shape, meas.image_geometry, meta) as w:
        w.write(mean)
        if images.shape[0] > 1:
            with w.child("std", {**meta, "kind": "posterior_std"}) as c:
                c.write(images.std(axis=0, ddof=1))
    return Volume.open(out)
