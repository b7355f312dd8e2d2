"""The measure step: simulate a CT sinogram or multi-coil MRI k-space from a volume, with noise.

CT: HU → linear attenuation (``measure.ct.mu_water``) → ASTRA projection (parallel/fan per slice, cone in
3D on a GPU) → Poisson transmission noise with ``I0`` photons per ray (+ electronic noise) → noisy line
integrals. MR: magnitude × a smooth seeded phase (real images have one, and priors must cope) → SENSE /
NUFFT with simulated birdcage coils → complex Gaussian noise at ``snr_db``. Noise for slice ``z`` is drawn
from its own stream ``(seed, z)``, so the result does not depend on how the volume is cut into slabs.

Per-slice geometries are processed slab by slab, one chunk of the volume at a time, and ``y`` is chunked so
that each slab fills whole chunks (memory = one slab, flat in the number of slices: see
``tests/test_memory.py``); cone beam and 3D Cartesian MRI couple all slices and are simulated whole.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError, DeviceError, InputError
from medrecon.measurement import Measurement, measurement_writer
from medrecon.physics.operator import LinearOperator
from medrecon.provenance import provenance
from medrecon.volume import Volume, volume_fingerprint

log = logging.getLogger("medrecon.measure")


def _per_slice(op: LinearOperator, shape: tuple[int, int, int]) -> bool:
    return len(op.in_shape) == 2 and tuple(op.in_shape) == tuple(shape[1:])


def _finite(vol: Volume, z0: int, data: np.ndarray) -> np.ndarray:
    """``data`` (slices from ``z0``) if it has no NaN/Inf; else an InputError naming the volume and slices."""
    bad = ~np.isfinite(data)
    if bad.any():
        zs = np.flatnonzero(bad.reshape(len(data), -1).any(axis=1)) + z0
        raise InputError(f"Volume {vol.path} has {int(bad.sum())} NaN/Inf voxels (slices {zs[:10].tolist()}); "
                         "a measurement of it would be meaningless.", path=vol.path,
                         fix="fix or mask those voxels, then re-run ingest (NaN has no physical meaning).")
    return data


def _slabs(vol: Volume, op: LinearOperator):
    """(z0, z1, data) slabs: the volume's chunk depth for per-slice operators, else the whole volume."""
    if _per_slice(op, vol.shape):
        for (z0, z1, _lo, _hi), data in vol.iter_slabs():
            yield z0, z1, _finite(vol, z0, data)
    else:
        yield 0, vol.shape[0], _finite(vol, 0, vol.read())


def _require_cone_device(vol: Volume, device: torch.device) -> None:
    """Cone beam exists only on ASTRA CUDA; say so (naming the key) before any ASTRA 3D call."""
    from medrecon.physics.ct import CONE_FIX, CONE_NEEDS_GPU, require_cone_gpu

    try:
        require_cone_gpu()
    except DeviceError as err:
        raise DeviceError(f"measure.ct.beam is 'cone' for {vol.path}, but {CONE_NEEDS_GPU}", path=vol.path,
                          fix=CONE_FIX) from err
    if device.type != "cuda":
        raise DeviceError(f"measure.ct.beam is 'cone' for {vol.path}, but the measure device is {device}; "
                          "cone beam runs on CUDA only.", path=vol.path, fix="run with --device auto (or cuda).")


def measure_ct(vol: Volume, out: Path, cfg: dict[str, Any], seed: int, device: torch.device) -> Path:
    from medrecon.physics.ct import ct_operator
    from medrecon.physics.ct_geometry import CTGeometry, hu_to_mu
    from medrecon.physics.noise import ct_poisson_noise, noise_record

    ct = cfg["measure"]["ct"]
    geom = CTGeometry.from_config(ct, vol.shape, vol.geometry.spacing)
    if geom.beam == "cone":
        _require_cone_device(vol, device)
    op = ct_operator(geom)
    per_slice = _per_slice(op, vol.shape)
    y_shape = (vol.shape[0], *op.out_shape) if per_slice else tuple(op.out_shape)
    i0, e_std = ct["I0"], float(ct["electronic_std"])
    noise = (noise_record("ct_poisson", seed=seed, I0=i0, electronic_std=e_std) if i0 else {"model": "none"})
    meta = _meta(vol, cfg, seed, noise, units="line integral (mu [1/mm] x mm)",
                 operator_units={"image": "mu [1/mm]", "mu_water": float(ct["mu_water"])})
    with measurement_writer(out, y_shape, np.float32, op, meta, slab=vol.chunk_depth if per_slice else None) as w:
        for z0, _z1, hu in _slabs(vol, op):
            mu = torch.from_numpy(np.asarray(hu_to_mu(hu, float(ct["mu_water"])), dtype=np.float32)).to(device)
            with torch.no_grad():
                p = op.forward(mu)
            if i0:
                p = ct_poisson_noise(p, float(i0), e_std, seed=seed, z0=z0).line_integrals
            w.write_slab(z0, p.detach().cpu().numpy())
    return out


def measure_mr(vol: Volume, out: Path, cfg: dict[str, Any], seed: int, device: torch.device) -> Path:
    from medrecon.physics.mri import mri_operator_from_config, simulate_kspace
    from medrecon.physics.mri_phase import smooth_phase
    from medrecon.physics.noise import mri_gaussian_noise, noise_record

    mr = dict(cfg["measure"]["mr"])
    op = mri_operator_from_config(mr, vol.shape, seed=seed, device=device)
    if not _per_slice(op, vol.shape) or mr["coil_maps"] == "espirit":
        # 3D k-space and ESPIRiT calibration need the whole acquisition.
        return _measure_mr_whole(vol, out, cfg, op, seed)
    # Two passes so the noise level, set by the whole acquisition's signal rms (physics.noise: SNR =
    # rms|signal| / sigma over acquired samples), does not depend on how the volume is cut into slabs.
    snr_db = mr["snr_db"]
    noise: dict[str, Any] = {"model": "none"}
    if snr_db is not None:
        power, count = 0.0, 0
        for z0, z1, mag in _slabs(vol, op):
            k = simulate_kspace(mag, op.slab(z0, z1), smooth_phase(vol.shape, seed, z_range=(z0, z1)))
            acquired = k[k != 0]
            power += float((acquired.abs().double() ** 2).sum())
            count += int(acquired.numel())
        snr = 10.0 ** (float(snr_db) / 20.0)
        sigma = (power / max(count, 1)) ** 0.5 / snr
        noise = noise_record("mri_gaussian", seed=seed, snr=snr, snr_db=float(snr_db), sigma=sigma,
                             reference="signal rms", std=sigma)
    meta = _meta(vol, cfg, seed, noise, units="k-space (orthonormal FFT)",
                 operator_units={"image": "complex image"}, image_units=vol.meta.get("units", "arbitrary"))
    with measurement_writer(out, (vol.shape[0], *op.out_shape), np.complex64, op, meta, slab=vol.chunk_depth) as w:
        for z0, z1, mag in _slabs(vol, op):
            k = simulate_kspace(mag, op.slab(z0, z1), smooth_phase(vol.shape, seed, z_range=(z0, z1)))
            if snr_db is not None:
                k, _, _ = mri_gaussian_noise(k, sigma=noise["sigma"], seed=seed, z0=z0, mask=(k != 0))
            w.write_slab(z0, k.detach().cpu().numpy())
    return out


def _measure_mr_whole(vol: Volume, out: Path, cfg: dict[str, Any], op: LinearOperator, seed: int) -> Path:
    from medrecon.physics.mri import calibrated_operator, simulate_kspace
    from medrecon.physics.mri_phase import smooth_phase
    from medrecon.physics.noise import mri_gaussian_noise

    mr = cfg["measure"]["mr"]
    k = simulate_kspace(_finite(vol, 0, vol.read()), op, smooth_phase(vol.shape, seed))
    noise = {"model": "none"}
    if mr["snr_db"] is not None:
        k, sigma, rec = mri_gaussian_noise(k, float(mr["snr_db"]), seed=seed, mask=(k != 0))
        noise = {**rec, "std": sigma}
    rec_op = calibrated_operator(mr, op, k)
    meta = _meta(vol, cfg, seed, noise, units="k-space (orthonormal FFT)",
                 operator_units={"image": "complex image"}, image_units=vol.meta.get("units", "arbitrary"))
    y = k.detach().cpu().numpy()
    with measurement_writer(out, y.shape, np.complex64, rec_op, meta) as w:
        depth = w.y.chunks[0]
        for z0 in range(0, y.shape[0], depth):
            w.write_slab(z0, y[z0:z0 + depth])
    return out


def _meta(vol: Volume, cfg: dict[str, Any], seed: int, noise: dict, **extra: Any) -> dict[str, Any]:
    return {
        "modality": vol.modality, "image_geometry": vol.geometry.to_dict(), "image_shape": list(vol.shape),
        "reference_volume": str(vol.path), "reference_fingerprint": volume_fingerprint(vol),
        "noise": noise, "seeds": {"measure": seed},
        # the reconstruction grid (medrecon.grid) the reference is on; None: measured on an un-resampled volume
        "grid": vol.meta.get("grid"),
        "provenance": provenance({"measure": cfg["measure"]}, seeds={"measure": seed}), **extra,
    }


def measure(volume_path: str | Path, out: str | Path, cfg: dict[str, Any],
            device: torch.device | str = "cpu") -> Path:
    """Simulate the measurement of ``volume_path`` per ``cfg['measure']`` into the store ``out``."""
    vol = Volume.open(volume_path)
    seed = int(cfg["measure"]["seed"])
    device = torch.device(device)
    if vol.modality not in ("CT", "MR"):
        raise ConfigError(f"Volume {volume_path} has modality {vol.modality!r}; medrecon simulates CT or MR.",
                          fix="set the subject's modality to CT or MR in the config.")
    t0 = time.perf_counter()
    log.info("measuring %s %s (%s voxels) with %s on %s", vol.modality, volume_path,
             " x ".join(map(str, vol.shape)), cfg["measure"]["ct" if vol.modality == "CT" else "mr"], device)
    run = measure_ct if vol.modality == "CT" else measure_mr
    path = run(vol, Path(out), cfg, seed, device)
    meas = Measurement.open(path)
    noise = meas.meta.get("noise") or {}
    log.info("wrote measurement %s: data %s %s, noise %s%s, %.1f s", path, " x ".join(map(str, meas.y.shape)),
             meas.y.dtype, noise.get("model", "none"),
             f" (std {noise['std']:.4g})" if isinstance(noise.get("std"), float | int) else "",
             time.perf_counter() - t0)
    return path
