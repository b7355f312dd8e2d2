"""Receive-coil sensitivity maps: simulated (birdcage) or estimated from the data (ESPIRiT), via SigPy.

Normalisation: maps are scaled so that sum_c |S_c|^2 = 1 at every voxel the maps cover. Birdcage maps cover
the whole field of view (SigPy divides by the root-sum-of-squares); ESPIRiT maps are unit-norm where the
eigenvalue exceeds ``crop`` and zero outside (where no signal is). With such maps the fully sampled SENSE
operator is an isometry on the covered region, so images, noise levels and step sizes keep their scale.

Cost (2-core CPU, SigPy 0.1.27): ESPIRiT on one 8-coil 256x256 slice takes about 1.9 s (numba compiles on the
first call of a process, about 1 s more); a 64-slice volume therefore about 2 minutes. 3D data are calibrated
per readout position in hybrid (kz, ky, x) space: one 2D ESPIRiT per x column, memory-light and exact for
Cartesian acquisitions whose readout kx is fully sampled.
"""

from __future__ import annotations

import numpy as np
import sigpy
import sigpy.mri

from medrecon.errors import ConfigError, InputError


def birdcage_coils(n_coils: int, shape: tuple[int, ...], radius: float = 1.5,
                   coils_per_ring: int = 8) -> np.ndarray:
    """Simulated birdcage sensitivities (``sigpy.mri.birdcage_maps``), complex64, normalised RSS = 1.

    ``shape`` is ``(Y, X)`` for maps shared by all slices of a 2D acquisition, giving ``(C, Y, X)``, or
    ``(Z, Y, X)`` for a 3D acquisition, giving ``(C, Z, Y, X)`` with coils on rings of ``coils_per_ring``
    stacked along z. ``radius`` is the coil distance from the centre relative to half the FOV (1.5 = outside
    the object, as in a head coil); smaller radii give more localised, more SENSE-friendly maps.
    """
    if n_coils < 1:
        raise ConfigError(f"need at least one coil, got {n_coils}", fix="set mr.coils >= 1.")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return sigpy.mri.birdcage_maps((int(n_coils), *shape), r=radius, dtype=np.complex64)
    if len(shape) == 3:
        nzz = min(int(n_coils), int(coils_per_ring))
        return sigpy.mri.birdcage_maps((int(n_coils), *shape), r=radius, nzz=nzz, dtype=np.complex64)
    raise ValueError(f"birdcage_coils: shape must be (Y, X) or (Z, Y, X), got {shape}")


def _espirit_2d(kspace: np.ndarray, calib_width: int, thresh: float, crop: float, kernel_width: int,
                max_iter: int) -> np.ndarray:
    """ESPIRiT of one (C, ky, kx) slice; the calibration block is the centred calib_width square."""
    width = min(int(calib_width), *kspace.shape[1:])
    if width <= kernel_width:
        raise ConfigError(
            f"ESPIRiT calibration width {width} must exceed its kernel width {kernel_width}",
            fix="raise mr.acs_lines (24 is typical) so the fully sampled centre is wide enough.")
    ksp = np.ascontiguousarray(kspace, dtype=np.complex64)
    app = sigpy.mri.app.EspiritCalib(ksp, calib_width=width, thresh=thresh, kernel_width=kernel_width,
                                     crop=crop, max_iter=max_iter, show_pbar=False)
    return np.asarray(app.run(), dtype=np.complex64)


def espirit_coils(kspace: np.ndarray, calib_width: int = 24, thresh: float = 0.02, crop: float = 0.95,
                  kernel_width: int = 6, max_iter: int = 100, image_ndim: int = 2) -> np.ndarray:
    """Coil maps estimated from the fully sampled k-space centre (``sigpy.mri.app.EspiritCalib``).

    ``image_ndim=2``: ``kspace`` is ``(C, ky, kx)`` or per slice ``(Z, C, ky, kx)``; each slice is
    calibrated on its own, giving maps of the same shape. ``image_ndim=3``: ``kspace`` is
    ``(C, kz, ky, kx)`` with kx (readout) fully sampled; it is inverse-transformed along kx and each x column
    calibrated in (kz, ky), giving ``(C, Z, Y, X)``. Unsampled entries must be zero; only the centred
    ``calib_width`` block (the ACS region) is used, so it must be fully sampled. The maps' phase is
    relative to coil 0 (ESPIRiT determines maps only up to one phase per voxel; it is absorbed by the image).
    """
    k = np.asarray(kspace)
    if image_ndim == 2 and k.ndim == 3:
        return _espirit_2d(k, calib_width, thresh, crop, kernel_width, max_iter)
    if image_ndim == 2 and k.ndim == 4:
        return np.stack([_espirit_2d(s, calib_width, thresh, crop, kernel_width, max_iter) for s in k])
    if image_ndim == 3 and k.ndim == 4:
        hybrid = sigpy.ifft(k.astype(np.complex64), axes=(-1,))  # (C, kz, ky, x)
        cols = [_espirit_2d(hybrid[..., ix], calib_width, thresh, crop, kernel_width, max_iter)
                for ix in range(hybrid.shape[-1])]
        return np.stack(cols, axis=-1).astype(np.complex64)
    raise InputError(f"espirit_coils: k-space of shape {k.shape} does not fit image_ndim={image_ndim}",
                     fix="pass (C, ky, kx) or (Z, C, ky, kx) for 2D, (C, kz, ky, kx) for 3D.")


def calibration_from_samples(samples: np.ndarray, coord: np.ndarray, dcf: np.ndarray,
                             shape: tuple[int, int], calib_width: int = 24) -> np.ndarray:
    """Cartesian ACS k-space ``(C, Y, X)`` (zero outside the centred block) gridded from non-Cartesian data.

    Radial and spiral trajectories oversample the k-space centre, so a low-resolution ``calib_width``-square
    coil image is reconstructed from the samples with |k| < calib_width / 2 (density-compensated adjoint
    NUFFT on the small grid, same 1/FOV units) and its FFT is placed at the centre of a zero k-space.
    That is exactly the input :func:`espirit_coils` needs; the absolute scale does not matter to ESPIRiT.
    """
    y = np.asarray(samples, dtype=np.complex64)
    c = np.asarray(coord, dtype=np.float32).reshape(-1, 2)
    w = np.asarray(dcf, dtype=np.float32).reshape(-1)
    width = int(calib_width)
    inside = np.sqrt((c**2).sum(-1)) < width / 2
    if inside.sum() < width * width // 4:
        raise InputError(f"only {int(inside.sum())} samples inside the {width}-wide calibration disc",
                         fix="use more spokes/interleaves or a smaller mr.acs_lines.")
    low = sigpy.nufft_adjoint(y[:, inside] * w[inside], c[inside], oshape=(y.shape[0], width, width))
    acs = sigpy.fft(low, axes=(-2, -1))
    return sigpy.resize(acs, (y.shape[0], *(int(s) for s in shape))).astype(np.complex64)
