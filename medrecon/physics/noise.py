"""Measurement noise: Poisson (+ electronic) noise for CT line integrals, complex Gaussian noise for MRI.

Both take numpy arrays or torch tensors and give back the same type (a tensor comes back on its device);
the random numbers are always drawn with a numpy :class:`numpy.random.Generator` on the host, so the same
seed gives the same noise on a CPU and on a GPU machine.

Seeding. Pass ``seed`` (an int) for noise that depends only on the seed and on each slice's index, never on
how a volume is cut into slabs: slice ``z0 + i`` of the array gets its own stream
``numpy.random.default_rng([seed, z0 + i])``. Pass ``generator`` instead to draw the whole array from
one stream you own.

CT model (:func:`ct_poisson_noise`). For a noiseless line integral ``p`` the detector counts are
``N = Poisson(I0 * exp(-p)) + Normal(0, electronic_std^2)``, clipped below at ``floor`` counts (default
1: a reading of zero or less has no logarithm; real scanners clip the same way). The noisy line integral
is ``-log(N / I0)``, so the largest representable ``p`` is ``log(I0 / floor)``.

MRI model (:func:`mri_gaussian_noise`). Circular complex Gaussian noise, independent per sample, of
standard deviation ``sigma`` per complex sample (``E|n|^2 = sigma^2``, so ``sigma / sqrt(2)`` in each
of the real and imaginary parts). ``SNR = rms(|signal|) / sigma`` over the acquired samples (or
``max|signal| / sigma`` with ``reference="signal max"``); ``snr_db = 20 log10(SNR)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError
from medrecon.provenance import to_jsonable

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class CTNoise:
    """Result of :func:`ct_poisson_noise`: noisy line integrals, the counts they came from, the record."""

    line_integrals: ArrayLike
    counts: np.ndarray
    record: dict[str, Any]


def _to_numpy(a: ArrayLike) -> tuple[np.ndarray, torch.Tensor | None]:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy(), a
    return np.asarray(a), None


def _like(out: np.ndarray, ref: torch.Tensor | None) -> ArrayLike:
    if ref is None:
        return out
    return torch.from_numpy(np.ascontiguousarray(out)).to(ref.device)


def _streams(shape: tuple[int, ...], seed: int | None, generator: np.random.Generator | None, z0: int):
    """Yield ``(index, rng)`` covering an array of ``shape``: one stream per slice (axis 0) or one overall."""
    if (seed is None) == (generator is None):
        raise ConfigError(
            "Give exactly one of seed (an int, per-slice streams) or generator.",
            fix="pass seed=measure.seed for reproducible, slab-independent noise.",
        )
    if generator is not None:
        yield (...,), generator
        return
    if len(shape) == 0:
        yield (...,), np.random.default_rng([int(seed), int(z0)])
        return
    for i in range(shape[0]):
        yield (i,), np.random.default_rng([int(seed), int(z0) + i])


def ct_counts(
    line_integrals: ArrayLike,
    I0: float,
    electronic_std: float = 0.0,
    *,
    seed: int | None = None,
    generator: np.random.Generator | None = None,
    z0: int = 0,
    floor: float = 1.0,
) -> np.ndarray:
    """Simulated detector counts (float64): ``max(Poisson(I0 exp(-p)) + N(0, electronic_std^2), floor)``."""
    _check_positive(I0, "measure.ct.I0", "e.g. 1e5 photons per ray, or null for noiseless data")
    if not (math.isfinite(electronic_std) and electronic_std >= 0):
        raise ConfigError(
            f"measure.ct.electronic_std must be >= 0 (counts), got {electronic_std!r}.",
            fix="set it to 0 (none) or a few counts, e.g. 5.",
        )
    _check_positive(floor, "noise floor", "use e.g. 1 count")
    p, _ = _to_numpy(line_integrals)
    p = p.astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        raise ConfigError(
            "NaN/Inf line integrals cannot be given noise.",
            fix="check the attenuation volume (HU -> mu) for NaN/Inf.",
        )
    mean = I0 * np.exp(-p)
    counts = np.empty_like(mean)
    for idx, rng in _streams(p.shape, seed, generator, z0):
        c = rng.poisson(mean[idx]).astype(np.float64)
        if electronic_std > 0:
            c += rng.normal(0.0, electronic_std, size=c.shape)
        counts[idx] = c
    np.maximum(counts, floor, out=counts)
    return counts


def ct_poisson_noise(
    line_integrals: ArrayLike,
    I0: float,
    electronic_std: float = 0.0,
    *,
    seed: int | None = None,
    generator: np.random.Generator | None = None,
    z0: int = 0,
    floor: float = 1.0,
) -> CTNoise:
    """Noisy line integrals ``-log(counts / I0)`` (same type, dtype and device as the input).

    ``line_integrals`` are dimensionless (``integral of mu dl``); ``I0`` is the incident photon count per
    ray; ``electronic_std`` is in counts. See the module docstring for the model, the floor and seeding.
    """
    counts = ct_counts(line_integrals, I0, electronic_std, seed=seed, generator=generator, z0=z0, floor=floor)
    p_np, ref = _to_numpy(line_integrals)
    noisy = (-np.log(counts / I0)).astype(
        p_np.dtype if np.issubdtype(p_np.dtype, np.floating) else np.float32
    )
    out = _like(noisy, ref)
    if ref is not None:
        out = out.to(ref.dtype)
    record = noise_record("ct_poisson", seed=seed, I0=I0, electronic_std=electronic_std, floor=floor)
    return CTNoise(out, counts, record)


def mri_noise_sigma(
    kspace: ArrayLike, snr: float, reference: str = "signal rms", mask: ArrayLike | None = None
) -> float:
    """Noise std per complex sample for the requested linear ``snr`` (see the module docstring)."""
    _check_positive(
        snr, "measure.mr.snr_db (as a linear SNR)", "use a finite SNR, or null for noiseless data"
    )
    k, _ = _to_numpy(kspace)
    mag = np.abs(k.astype(np.complex128, copy=False))  # float64 accumulation
    if mask is not None:
        m, _ = _to_numpy(mask)
        mag = mag[np.broadcast_to(m != 0, mag.shape)]
    if mag.size == 0:
        raise ConfigError(
            "The MRI sampling mask selects no k-space samples.", fix="check measure.mr.acceleration."
        )
    if reference == "signal rms":
        ref = float(np.sqrt(np.mean(mag**2)))
    elif reference == "signal max":
        ref = float(mag.max())
    else:
        raise ConfigError(
            f"Unknown MRI SNR reference {reference!r}.", fix="use 'signal rms' or 'signal max'."
        )
    if ref == 0:
        raise ConfigError(
            "The k-space signal is all zeros, so an SNR cannot set the noise level.",
            fix="check the input volume, or set measure.mr.snr_db: null.",
        )
    return ref / snr


def mri_gaussian_noise(
    kspace: ArrayLike,
    snr_db: float | None = None,
    *,
    snr: float | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    generator: np.random.Generator | None = None,
    z0: int = 0,
    reference: str = "signal rms",
    mask: ArrayLike | None = None,
) -> tuple[ArrayLike, float, dict[str, Any]]:
    """Add circular complex Gaussian noise at the given SNR; returns ``(noisy k-space, sigma, record)``.

    Give ``snr_db`` (``20 log10 SNR``) or the linear ``snr``. With a sampling ``mask`` (broadcastable to
    ``kspace``; nonzero = acquired), the SNR refers to the acquired samples and unacquired samples stay
    zero. The output has the input's type, complex dtype and device.
    """
    if sum(v is not None for v in (snr_db, snr, sigma)) != 1:
        raise ConfigError(
            "Give exactly one of snr_db, snr or sigma for MRI noise.", fix="set measure.mr.snr_db, e.g. 30."
        )
    if sigma is not None:
        # A noise level fixed by the caller (e.g. from the whole volume's signal when noising slab by slab).
        _check_positive(sigma, "MRI noise sigma", "pass a positive sigma")
        snr = math.inf
    elif snr is None:
        if not math.isfinite(snr_db):
            raise ConfigError(
                f"measure.mr.snr_db must be finite, got {snr_db!r}.", fix="use e.g. 30, or null."
            )
        snr = 10.0 ** (snr_db / 20.0)
    if sigma is None:
        sigma = mri_noise_sigma(kspace, snr, reference, mask)
    k, ref = _to_numpy(kspace)
    if not np.iscomplexobj(k):
        raise ConfigError(
            "MRI noise needs complex k-space data.", fix="pass the complex output of the operator."
        )
    noise = np.empty(k.shape, dtype=np.complex128)
    for idx, rng in _streams(k.shape, seed, generator, z0):
        shape = noise[idx].shape
        noise[idx] = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    noise *= sigma / math.sqrt(2.0)
    if mask is not None:
        m, _ = _to_numpy(mask)
        noise *= np.broadcast_to(m != 0, k.shape)
    noisy = (k + noise).astype(k.dtype)
    out = _like(noisy, ref)
    record = noise_record(
        "mri_gaussian", seed=seed, snr=snr if math.isfinite(snr) else None,
        snr_db=20.0 * math.log10(snr) if math.isfinite(snr) else None, sigma=sigma, reference=reference
    )
    return out, sigma, record


def noise_record(model: str, **params: Any) -> dict[str, Any]:
    """The noise parameters as a JSON-able dict for the measurement's metadata (``{"model": ..., ...}``)."""
    return to_jsonable({"model": model, **params})


def _check_positive(v: Any, key: str, fix: str) -> None:
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float | np.floating | np.integer)
        or not (math.isfinite(v) and v > 0)
    ):
        raise ConfigError(f"{key} must be a positive finite number, got {v!r}.", fix=fix)
