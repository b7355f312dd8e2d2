"""Where MRI k-space is sampled: Cartesian undersampling masks, non-Cartesian trajectories, density weights.

Conventions (those of SigPy, so its apps accept our arrays unchanged):

* k-space is *centred*: index ``N // 2`` along an axis is k = 0 (``fftshift`` order of an orthonormal FFT).
* Cartesian masks are boolean. A 2D acquisition undersamples only the phase-encode direction ky (axis -2 of
  an image ``(y, x)``); the readout kx is always fully sampled, so a 2D-slice mask is whole ky lines.
  A 3D acquisition undersamples both phase encodes (kz, ky) and the mask is ``(Z, Y)``, broadcast along kx.
* Trajectory coordinates are in units of 1/FOV, ``coord[..., -1]`` = kx and ``coord[..., -2]`` = ky, within
  ``[-N/2, N/2]`` per axis: exactly what ``sigpy.nufft`` expects.
* Acceleration R = (grid points) / (sampled points). For non-Cartesian trajectories R is relative to the
  Nyquist number of spokes / interleaves (see :func:`radial_trajectory`).

Every random choice takes an explicit seed, so the same config gives the same mask on any machine.
"""

from __future__ import annotations

import math

import numpy as np
import sigpy.mri

from medrecon.errors import ConfigError


def acceleration(mask: np.ndarray) -> float:
    """Achieved acceleration of a Cartesian mask: grid points / sampled points (all slices together)."""
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    if n == 0:
        raise ValueError("mask samples nothing")
    return m.size / n


def _acs_range(n: int, acs: int) -> slice:
    """Index range of a centred block of ``acs`` lines: the same block SigPy's ESPIRiT crops (sp.resize)."""
    start = n // 2 - acs // 2
    return slice(start, start + acs)


def _line_density(n: int, density: str, power: float) -> np.ndarray:
    """Unnormalised probability of sampling each ky line, highest at k = 0."""
    k = np.abs(np.arange(n) - n // 2) / (n / 2)  # 0 at centre, 1 at the edge
    if density == "polynomial":
        p = (1.0 - np.clip(k, 0, 1)) ** power + 1e-3
    elif density == "gaussian":
        p = np.exp(-0.5 * (k / 0.4) ** 2) + 1e-3  # sigma = 0.4 kmax
    elif density == "uniform":
        p = np.ones(n)
    else:
        raise ConfigError(f"unknown mask density {density!r}",
                          fix="use 'polynomial', 'gaussian' or 'uniform'.")
    return p


def cartesian_mask_1d(shape: tuple[int, int], accel: float, acs_lines: int = 24, seed: int = 0,
                      n_slices: int | None = None, density: str = "polynomial",
                      power: float = 2.0) -> np.ndarray:
    """Variable-density random ky-line mask with a fully sampled ACS block at the centre.

    ``round(Y / accel)`` lines are sampled: the ``acs_lines`` central ones (for autocalibration: ESPIRiT,
    GRAPPA) plus the rest drawn without replacement with probability ~ (1 - |ky|/kmax)^power
    (polynomial, the default), exp(-(|ky|/kmax)^2 / (2 * 0.4^2)) (gaussian), or uniform. The achieved
    acceleration is therefore ``Y / round(Y / accel)``, within rounding of the request; :func:`acceleration`
    reports it.

    Returns a boolean ``(Y, X)`` mask (whole lines), or ``(n_slices, Y, X)`` with an independent draw per
    slice when ``n_slices`` is given (incoherent aliasing across slices helps slice-coupled priors).
    """
    ny, nx = (int(s) for s in shape)
    if accel < 1:
        raise ConfigError(f"acceleration must be >= 1, got {accel}", fix="set mr.acceleration to 1 or more.")
    if not 0 <= acs_lines <= ny:
        raise ConfigError(f"acs_lines={acs_lines} must be between 0 and the {ny} phase-encode lines",
                          fix=f"set mr.acs_lines to at most {ny}.")
    n_target = max(1, round(ny / accel))
    if acs_lines > n_target:
        raise ConfigError(
            f"acs_lines={acs_lines} alone exceeds the {n_target} lines that acceleration {accel} allows "
            f"for {ny} phase encodes", fix=f"lower mr.acs_lines to <= {n_target} or lower mr.acceleration.")
    rng = np.random.default_rng(seed)
    acs = _acs_range(ny, acs_lines)
    prob = _line_density(ny, density, power)
    prob[acs] = 0.0

    def draw() -> np.ndarray:
        lines = np.zeros(ny, dtype=bool)
        lines[acs] = True
        rest = n_target - acs_lines
        if rest > 0:
            picked = rng.choice(ny, size=rest, replace=False, p=prob / prob.sum())
            lines[picked] = True
        return np.repeat(lines[:, None], nx, axis=1)

    if n_slices is None:
        return draw()
    return np.stack([draw() for _ in range(int(n_slices))])


def poisson_mask_2d(shape: tuple[int, int], accel: float, acs: int = 24, seed: int = 0,
                    tol: float = 0.1) -> np.ndarray:
    """Variable-density Poisson-disc mask over two phase encodes (kz, ky) via ``sigpy.mri.poisson``.

    SigPy searches the density slope until the achieved acceleration is within ``tol`` of ``accel``; its
    own RNG (numba) is seeded by ``seed`` and the global numpy state is left untouched. The centred
    ``acs x acs`` calibration block is fully sampled. Returns a boolean ``shape`` mask.
    """
    a, b = (int(s) for s in shape)
    acs = min(int(acs), a, b)
    if accel <= 1:
        return np.ones((a, b), dtype=bool)
    try:
        m = sigpy.mri.poisson((a, b), accel, calib=(acs, acs), dtype=np.float32, seed=int(seed), tol=tol)
    except ValueError as err:
        raise ConfigError(f"cannot draw a Poisson-disc mask of shape {(a, b)} with acceleration {accel} "
                          f"and a {acs}x{acs} ACS block ({err})",
                          fix="lower mr.acceleration or mr.acs_lines, or use a larger volume.") from err
    return m.astype(bool)


def default_spokes(shape: tuple[int, int], accel: float) -> int:
    """Spokes for SigPy's centre-out radial rays: Nyquist needs pi * N rays (one sample per unit arc at the
    k-space edge, radius N/2); ``accel`` divides that."""
    return max(1, math.ceil(math.pi * max(shape) / accel))


def radial_trajectory(shape: tuple[int, int], n_spokes: int, n_readout: int | None = None,
                      golden: bool = True) -> np.ndarray:
    """Centre-out radial rays (``sigpy.mri.radial``): ``(n_spokes, n_readout, 2)`` float32 coordinates.

    Golden-angle ordering (137.5 deg, the 2D golden angle for rays over 2 pi) keeps any prefix of spokes
    near-uniform; ``golden=False`` spaces them 2 pi / n_spokes apart. The default ``n_readout = N`` samples
    the ray radius (0..N/2) at half-unit spacing: 2x readout oversampling, as scanners acquire radial data
    (at Nyquist spacing the gridding reconstruction of a smooth image is 5% off instead of 2%).
    """
    ny, nx = (int(s) for s in shape)
    nro = int(n_readout or max(ny, nx))
    if n_spokes < 1 or nro < 1:
        raise ConfigError(f"radial trajectory needs >= 1 spoke and readout sample, got {n_spokes}, {nro}",
                          fix="set mr.spokes to a positive integer.")
    return sigpy.mri.radial((int(n_spokes), nro, 2), (ny, nx), golden=golden).astype(np.float32)


def spiral_trajectory(shape: tuple[int, int], n_interleaves: int = 16, accel: float = 1.0,
                      alpha: float = 1.0, max_grad: float = 0.04, max_slew: float = 150.0) -> np.ndarray:
    """Variable-density spiral (``sigpy.mri.spiral``, Kim et al. 2003): ``(n_samples, 2)`` float32.

    SigPy designs the spiral in physical units for a nominal 240 mm FOV within gradient (``max_grad`` T/m)
    and slew (``max_slew`` T/m/s) limits; the FOV cancels once k is multiplied by it (units of 1/FOV), so
    only the matrix size matters. ``accel`` is SigPy's undersampling factor R; ``alpha > 1`` samples the
    centre more densely. For a non-square matrix each axis is scaled to its own extent [-N_i/2, N_i/2].
    """
    ny, nx = (int(s) for s in shape)
    n = max(ny, nx)
    fov = 0.24
    k = sigpy.mri.spiral(fov, n, 1.0, float(accel), int(n_interleaves), float(alpha), max_grad, max_slew)
    coord = np.empty((k.shape[0], 2), dtype=np.float64)
    coord[:, -1] = k[:, 0] * fov * nx / n
    coord[:, -2] = k[:, 1] * fov * ny / n
    half = np.array([ny / 2, nx / 2])
    return np.clip(coord, -half, half).astype(np.float32)


def density_compensation(coord: np.ndarray, shape: tuple[int, int], method: str = "pipe_menon",
                         max_iter: int = 30) -> np.ndarray:
    """Density compensation weights w (shape ``coord.shape[:-1]``, float32) such that A^H (w * A x) ~ x.

    Each weight is the k-space area one sample stands for, in grid cells (1/FOV^2), which is what makes the
    adjoint of an orthonormal NUFFT an approximate inverse.

    ``ramp`` (centre-out radial rays, :func:`radial_trajectory`): exact geometry, w = 2 pi r dr / n_rays,
    and pi (dr/2)^2 / n_rays for the centre samples, with n_rays = number of samples at k = 0 and dr the
    first radial step. ``pipe_menon``: SigPy's fixed-point iteration w <- w / |G^H G w| (Pipe & Menon 1999)
    for any trajectory (spirals), then scaled so that sum(w) is the area of the disc of radius max |k|
    (the gridding kernel's own scale is arbitrary); accurate to a few percent in overall scale.
    """
    coord = np.asarray(coord, dtype=np.float32)
    r = np.sqrt((coord.astype(np.float64) ** 2).sum(-1))
    if method == "ramp":
        n_rays = int((r == 0).sum())
        if n_rays == 0:
            raise ConfigError("ramp density compensation needs centre-out radial rays (samples at k = 0)",
                              fix="use method 'pipe_menon' for this trajectory.")
        dr = float(r[r > 0].min())
        w = np.where(r > 0, 2 * math.pi * r * dr, math.pi * dr**2 / 4) / n_rays
        return w.astype(np.float32)
    if method == "pipe_menon":
        w = np.asarray(sigpy.mri.pipe_menon_dcf(coord, img_shape=tuple(int(s) for s in shape),
                                                max_iter=max_iter, show_pbar=False), dtype=np.float64)
        return (w * (math.pi * r.max() ** 2 / w.sum())).astype(np.float32)
    raise ConfigError(f"unknown density compensation {method!r}", fix="use 'ramp' or 'pipe_menon'.")
