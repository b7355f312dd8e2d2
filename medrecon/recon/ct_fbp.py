"""Analytic CT reconstruction: filtered back-projection (parallel and fan beam) and FDK (cone beam).

All three return linear attenuation ``mu`` in 1/mm from line integrals (dimensionless), on the operator's
pixel grid, for every slice of a stack at once.

**Ramp filter** (:func:`ramp_filter`). The band-limited ramp is built as the FFT of the *spatial* Ram-Lak
kernel h[0] = 1/4, h[odd n] = -1/(pi n)^2, h[even n] = 0 (Kak & Slaney 1988, eq. 3.61), not by sampling
|f|: that keeps the right DC value and avoids the cupping and offset of the naive filter. Each detector row is
zero-padded to at least twice its length (next power of two) against wrap-around. Windows: ``ram-lak``
(none), ``shepp-logan`` (sinc), ``cosine``, ``hann``; they trade resolution for noise.

**Parallel beam** (:func:`fbp_parallel`). f = (pi / N) (1 / a) A^T (p * h): the filtered sinogram is
back-projected with the operator's own adjoint (the matched ASTRA back-projector), where a is the pixel area.
Why this scale: for one view, sum_j A[(theta, j), pixel] = a / d (the pixel's area seen by rays d apart),
so A^T is (a / d) times the interpolating back-projection, and the continuous formula's
d x (discrete convolution) / d leaves 1 / a. Angles must cover [0, pi) or [0, 2 pi) uniformly (each
line then counts pi / N either way).

**Fan beam, flat detector** (:func:`fbp_fan`): the weighted FBP for equispaced collinear detectors
(Kak & Slaney 1988, sec. 3.4.2), written here because ASTRA has no CPU fan-beam FBP. With the detector
scaled to a virtual detector through the isocentre (s = u SO / SDD, spacing ds' = ds SO / SDD):
(1) cosine pre-weighting R'(b, s) = R(b, s) SO / sqrt(SO^2 + s^2); (2) ramp filter along s;
(3) pixel-driven back-projection with distance weight 1 / U^2, U = (source-to-pixel distance along the
central ray) / SO, linear interpolation at s'(pixel), out-of-detector rays count 0; summed with
d_beta / 2 for a full 360 degree scan. For a short scan (arc >= pi + fan angle) the 1/2 is replaced by
Parker's weights (Parker 1982), which give each ray pair a total weight of one. The geometry follows
ASTRA's ``fanflat``: source at SO (sin b, -cos b), detector axis u = (cos b, sin b), bins centred on the
central ray, image y pointing to row 0 (see :mod:`medrecon.physics.ct`).

**Cone beam** (:func:`fdk`): ASTRA's ``FDK_CUDA`` on the operator's ``cone_vec`` geometry. It needs a GPU;
on a machine without one :class:`~medrecon.errors.DeviceError` is raised before any ASTRA 3D call (they
kill the interpreter there).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError, InputError
from medrecon.physics.ct import require_cone_gpu
from medrecon.physics.ct_geometry import CTGeometry
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")
# Nonzeros of the fan back-projection's sparse matrix per chunk of views (~100 MB with int64 indices).
_FAN_CHUNK_NNZ = 1 << 23


def ramp_filter(n_det: int, window: str = "ram-lak", device: torch.device | str = "cpu") -> torch.Tensor:
    """Frequency response (real, length ``P // 2 + 1`` for ``torch.fft.rfft``) of the windowed ramp.

    ``P`` = next power of two >= 2 ``n_det``; the response multiplies a row of length ``P``; it is in units
    of 1 / (detector spacing)^2 x spacing, i.e. the caller divides by the spacing once (see module doc).
    """
    if window not in FILTERS:
        raise ConfigError(f"unknown FBP filter {window!r}",
                          fix=f"set params.fbp.filter to one of {list(FILTERS)}.")
    p = max(64, 1 << math.ceil(math.log2(2 * n_det)))
    n = np.concatenate([np.arange(0, p // 2 + 1), np.arange(-(p // 2) + 1, 0)])  # circular lags
    h = np.zeros(p)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    resp = np.real(np.fft.rfft(h))
    f = np.fft.rfftfreq(p)  # cycles per sample, 0 .. 0.5
    if window == "shepp-logan":
        resp *= np.sinc(f)
    elif window == "cosine":
        resp *= np.cos(np.pi * f)
    elif window == "hann":
        resp *= 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    return torch.as_tensor(resp, dtype=torch.float32, device=device)


def filter_rows(sino: torch.Tensor, window: str = "ram-lak") -> torch.Tensor:
    """Convolve every detector row (last dim) with the discrete windowed ramp (no spacing factor)."""
    n = sino.shape[-1]
    resp = ramp_filter(n, window, device=sino.device)
    p = 2 * (resp.shape[0] - 1)
    spec = torch.fft.rfft(sino.to(torch.float32), n=p, dim=-1)
    return torch.fft.irfft(spec * resp, n=p, dim=-1)[..., :n]


def _geometry(op: Any) -> CTGeometry:
    g = getattr(op, "geometry", None)
    if not isinstance(g, CTGeometry):
        raise ConfigError(f"FBP/FDK need a CT operator with a CTGeometry; got {type(op).__name__}",
                          fix="measure CT data with `medrecon measure` (ct-parallel, ct-fan, ct-cone).")
    return g


def _check_sino(y: torch.Tensor, g: CTGeometry) -> None:
    if tuple(y.shape[-2:]) != (g.n_views, g.detector_count):
        raise InputError(f"sinogram ends with shape {tuple(y.shape[-2:])}, but the geometry has "
                         f"{g.n_views} views x {g.detector_count} detectors",
                         fix="reconstruct with the operator stored in the same measurement.")


def _full_arc(angles: np.ndarray, period: float) -> bool:
    """True when the angles are uniformly spaced over a whole multiple of ``period`` (pi or 2 pi)."""
    if angles.size < 2:
        return False
    span = angles.size * float(np.median(np.abs(np.diff(angles))))
    return abs(span / period - round(span / period)) < 1e-3 and round(span / period) >= 1


def fbp_parallel(op: Any, y: torch.Tensor, window: str = "ram-lak") -> torch.Tensor:
    """Parallel-beam FBP of a stack of sinograms ``(..., views, detectors)`` -> ``(..., Y, X)`` mu [1/mm]."""
    g = _geometry(op)
    if g.beam != "parallel":
        raise ConfigError(f"fbp_parallel needs a parallel-beam operator, got {g.beam!r}",
                          fix="use fbp (it dispatches on the beam) or fdk for cone beam.")
    _check_sino(y, g)
    q = filter_rows(y, window)
    with torch.no_grad():
        bp = op.adjoint(q.to(op.out_dtype))
    return bp * (math.pi / g.n_views / g.pixel_size**2)


def _pixel_coords(g: CTGeometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ASTRA 2D coordinates (mm) of pixel centres: x along columns, y towards row 0. Flattened (Y*X,)."""
    ny, nx = g.shape[-2:]
    dy, dx = g.spacing[-2:]
    x = (torch.arange(nx, dtype=torch.float64, device=device) + 0.5 - nx / 2) * dx
    y = (ny / 2 - torch.arange(ny, dtype=torch.float64, device=device) - 0.5) * dy
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


def fan_projection_coordinates(g: CTGeometry, device: torch.device | str = "cpu"
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every view and pixel: the (fractional) detector bin its central ray hits and U = L / SO.

    Returns ``(bin, U)``, each ``(views, Y*X)`` float32 (bins to ~1e-5). L is the distance from the source
    to the pixel measured along the central ray, so the pixel's magnification onto the detector is SDD / L.
    """
    xx, yy = _pixel_coords(g, torch.device(device))
    th = torch.as_tensor(g.angles_array(), dtype=torch.float64, device=device)[:, None]
    xx, yy = xx.float(), yy.float()
    so, sdd = g.source_distance, g.source_distance + g.detector_distance
    s, c = torch.sin(th).float(), torch.cos(th).float()
    lat = xx * c + yy * s  # along the detector axis u = (cos, sin)
    along = so - xx * s + yy * c  # from the source (SO (sin, -cos)) towards the detector
    u_mm = lat * sdd / along
    bins = u_mm / g.detector_spacing + (g.detector_count - 1) / 2
    return bins, along / so


def parker_weights(g: CTGeometry) -> torch.Tensor:
    """Parker's short-scan weights ``(views, detectors)`` for arc = pi + 2 delta, delta >= the half fan angle.

    gamma is the fan angle of each bin (positive along +u); with beta measured from the first view,
    w = sin^2(pi/4 beta / (delta - gamma)) on [0, 2 delta - 2 gamma], 1 up to pi - 2 gamma, and
    sin^2(pi/4 (pi + 2 delta - beta) / (delta + gamma)) after; rays measured twice sum to one.
    """
    beta = g.angles_array() - g.angles_array()[0]
    sdd = g.source_distance + g.detector_distance
    u = (np.arange(g.detector_count) - (g.detector_count - 1) / 2) * g.detector_spacing
    gamma = np.arctan(u / sdd)
    span = float(beta[-1] + np.median(np.diff(beta))) if beta.size > 1 else 0.0
    delta = (span - math.pi) / 2
    gmax = float(np.abs(gamma).max())
    if delta < gmax - 1e-6:
        need, have = math.degrees(math.pi + 2 * gmax), math.degrees(span)
        raise ConfigError(f"short-scan fan FBP needs an arc of at least 180 deg + fan angle "
                          f"({need:.1f} deg); the scan covers {have:.1f} deg",
                          fix="acquire a longer arc (measure.ct.arc_deg) or use sirt / tv.")
    b, gm = beta[:, None], -gamma[None, :]
    w = np.ones((beta.size, gamma.size))
    rise = b < 2 * (delta - gm)
    w = np.where(rise, np.sin(np.pi / 4 * b / np.maximum(delta - gm, 1e-12)) ** 2, w)
    fall = b > math.pi - 2 * gm
    w = np.where(fall, np.sin(np.pi / 4 * np.clip(math.pi + 2 * delta - b, 0, None) / (delta + gm)) ** 2, w)
    return torch.as_tensor(w, dtype=torch.float32)


def fbp_fan(op: Any, y: torch.Tensor, window: str = "ram-lak", short_scan: str = "auto") -> torch.Tensor:
    """Fan-beam FBP (flat detector) of ``(..., views, detectors)`` -> ``(..., Y, X)`` mu [1/mm].

    ``short_scan``: 'auto' uses Parker weights unless the angles cover 360 degrees uniformly; 'never'
    insists on a full scan; 'parker' forces Parker weights. See the module docstring for the algorithm.
    """
    g = _geometry(op)
    if g.beam != "fan":
        raise ConfigError(f"fbp_fan needs a fan-beam operator, got {g.beam!r}", fix="use fbp.")
    _check_sino(y, g)
    dev = y.device
    lead = y.shape[:-2]
    sino = y.reshape(-1, g.n_views, g.detector_count).to(torch.float32)
    so, sdd = g.source_distance, g.source_distance + g.detector_distance
    ds_virtual = g.detector_spacing * so / sdd
    s = torch.arange(g.detector_count, dtype=torch.float32, device=dev) - (g.detector_count - 1) / 2
    s = s * ds_virtual
    full = _full_arc(g.angles_array(), 2 * math.pi)
    if short_scan not in ("auto", "never", "parker"):
        raise ConfigError(f"unknown short_scan {short_scan!r}", fix="use auto, never or parker.")
    if short_scan == "never" and not full:
        raise ConfigError("fan-beam FBP without short-scan weights needs views uniformly covering 360 deg",
                          fix="set params.fbp.short_scan: auto, or measure.ct.arc_deg: 360.")
    if full and short_scan != "parker":
        view_w = torch.full((g.n_views, 1), 0.5 * 2 * math.pi / g.n_views, device=dev)
    else:
        dbeta = float(np.median(np.diff(g.angles_array())))
        view_w = parker_weights(g).to(dev) * dbeta
    weighted = sino * (so / torch.sqrt(so**2 + s**2)) * view_w
    q = filter_rows(weighted, window) / ds_virtual  # (B, V, D)

    bins, u_scale = fan_projection_coordinates(g, dev)
    nd = g.detector_count
    qp = torch.nn.functional.pad(q, (1, 1))  # a zero bin on each side: rays off the detector add 0
    n_b, n_pix = q.shape[0], bins.shape[1]
    out = torch.zeros((n_pix, n_b), dtype=torch.float32, device=dev)
    chunk = max(1, _FAN_CHUNK_NNZ // (2 * n_pix))
    for v0 in range(0, g.n_views, chunk):
        v1 = min(v0 + chunk, g.n_views)
        out += _fan_backprojector(bins[v0:v1], u_scale[v0:v1], nd) @ qp[:, v0:v1].reshape(n_b, -1).T
    return out.T.reshape(*lead, *g.shape[-2:])


def _fan_backprojector(bins: torch.Tensor, u_scale: torch.Tensor, nd: int) -> torch.Tensor:
    """Sparse CSR ``(pixels, views * (nd + 2))``: linear interpolation at each pixel's bin times 1 / U^2.

    Built once per chunk of views and applied to all slices in one sparse product (measured 2-10x faster
    than gathering per slice, and the cost no longer grows with the number of slices).
    """
    n_v, n_pix = bins.shape
    b = (bins + 1.0).clamp(0.0, nd + 1.0)  # padded bins; beyond the edges -> the zero bins
    i0 = torch.floor(b).clamp(max=nd).to(torch.long)
    w = (1.0 / u_scale.square()).to(torch.float32)  # distance weight 1 / U^2
    w1 = (b - i0).to(torch.float32) * w
    col = (torch.arange(n_v, device=bins.device)[:, None] * (nd + 2) + i0).T  # (pixels, views)
    cols = torch.stack((col, col + 1), -1).reshape(-1)
    vals = torch.stack(((w - w1).T, w1.T), -1).reshape(-1)
    crow = torch.arange(n_pix + 1, device=bins.device) * (2 * n_v)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(crow, cols, vals, size=(n_pix, n_v * (nd + 2)))


def fbp(op: Any, y: torch.Tensor, window: str = "ram-lak", short_scan: str = "auto") -> torch.Tensor:
    """FBP for a per-slice CT operator: parallel or fan beam (cone beam: use :func:`fdk`)."""
    g = _geometry(op)
    if g.beam == "parallel":
        return fbp_parallel(op, y, window)
    if g.beam == "fan":
        return fbp_fan(op, y, window, short_scan)
    raise ConfigError("FBP is for parallel and fan beam; this is cone-beam data", fix="use the 'fdk' method.")


def fdk(geometry: CTGeometry, y: torch.Tensor | np.ndarray, short_scan: bool = False) -> torch.Tensor:
    """FDK of cone-beam data ``(rows, views, columns)`` with ASTRA's ``FDK_CUDA`` -> ``(Z, Y, X)`` mu.

    Uses the same ``cone_vec`` geometry as :class:`~medrecon.physics.ct.ConeBeamCT` (volume window in mm,
    y mirrored like the operator), so the output lies on the operator's grid. Raises
    :class:`~medrecon.errors.DeviceError` on a machine whose ASTRA cannot use CUDA, before any 3D call.
    """
    if geometry.beam != "cone":
        raise ConfigError(f"FDK needs a cone-beam geometry, got {geometry.beam!r}",
                          fix="use the 'fbp' method.")
    require_cone_gpu()  # ASTRA 3D CUDA calls SIGFPE-kill the process without a usable GPU
    import astra

    nz, ny, nx = geometry.shape
    dz, dy, dx = geometry.spacing
    data = (y.detach().float().cpu().numpy() if torch.is_tensor(y) else np.asarray(y, np.float32))
    expected = (geometry.detector_rows, geometry.n_views, geometry.detector_count)
    if data.shape != expected:
        raise InputError(f"cone-beam data has shape {data.shape}, the geometry expects {expected}",
                         fix="reconstruct with the geometry stored in the same measurement.")
    vol_geom = astra.create_vol_geom(ny, nx, nz, -nx * dx / 2, nx * dx / 2, -ny * dy / 2, ny * dy / 2,
                                     -nz * dz / 2, nz * dz / 2)
    proj_geom = astra.create_proj_geom("cone_vec", geometry.detector_rows, geometry.detector_count,
                                       geometry.astra_vectors_3d(geometry.detector_rows,
                                                                 geometry.detector_row_spacing))
    sid = astra.data3d.create("-sino", proj_geom, np.ascontiguousarray(data, dtype=np.float32))
    vid = astra.data3d.create("-vol", vol_geom, 0.0)
    cfg = astra.astra_dict("FDK_CUDA")
    cfg["ProjectionDataId"], cfg["ReconstructionDataId"] = sid, vid
    cfg["option"] = {"ShortScan": bool(short_scan)}
    aid = astra.algorithm.create(cfg)
    try:
        astra.algorithm.run(aid)
        vol = astra.data3d.get(vid)
    finally:
        astra.algorithm.delete(aid)
        astra.data3d.delete([sid, vid])
    return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))


@register_method("fbp", modalities=("CT",), defaults={"filter": "ram-lak", "short_scan": "auto"},
                 paper="FBP: Kak & Slaney, Principles of Computerized Tomographic Imaging 1988, ch. 3; "
                       "Parker, Med. Phys. 1982", memory_copies=6)
def fbp_method(problem: ReconProblem, params: dict, prior: Any = None,
               generator: torch.Generator | None = None) -> ReconResult:
    """FBP. params: ``filter`` ('ram-lak' | 'shepp-logan' | 'cosine' | 'hann', 'ram-lak'), ``short_scan``
    ('auto' | 'never' | 'parker', 'auto'; fan beam only)."""
    t0 = time.perf_counter()
    x = fbp(problem.operator, problem.y, str(params["filter"]), str(params["short_scan"]))
    return ReconResult(samples=x.reshape(1, *problem.image_shape), nfe=1,
                       info={"seconds": time.perf_counter() - t0})


@register_method("fdk", modalities=("CT",), defaults={"short_scan": False},
                 paper="FDK: Feldkamp, Davis, Kress, JOSA A 1984 (ASTRA FDK_CUDA)", memory_copies=6)
def fdk_method(problem: ReconProblem, params: dict, prior: Any = None,
               generator: torch.Generator | None = None) -> ReconResult:
    """FDK (cone beam, GPU only). params: ``short_scan`` (bool, False: ASTRA's Parker weighting)."""
    t0 = time.perf_counter()
    x = fdk(_geometry(problem.operator), problem.y.reshape(problem.operator.out_shape),
            bool(params["short_scan"]))
    return ReconResult(samples=x.to(problem.y.device).reshape(1, *problem.image_shape), nfe=1,
                       info={"seconds": time.perf_counter() - t0})
