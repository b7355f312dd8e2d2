"""Image-quality metrics, data consistency and posterior calibration of reconstructions.

Every image metric compares a reconstruction with a reference on the same (z, y, x) grid *after* both are
mapped to a unit intensity window (:func:`to_unit_window`: CT through a configured HU window, MR through
a robust percentile range, :func:`robust_range`), so the data range is exactly 1 and numbers are
comparable across subjects and modalities.

Definitions (all follow scikit-image so that they can be cross-checked against it):

* **PSNR** ``10 log10(1 / MSE)`` (data range 1) - in 3D, and per plane: the mean over axial (z),
  coronal (y) and sagittal (x) slices of each slice's 2D PSNR. ``psnr_per_slice`` keeps the axial
  values for the per-slice plot. A plane with zero error has infinite PSNR, as in scikit-image.
* **SSIM** of Wang et al. (2004) with a Gaussian window, sigma 1.5 truncated at 3.5 sigma (an 11-tap
  window), population covariances and K1 = 0.01, K2 = 0.03: scikit-image's
  ``structural_similarity(data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
  (MONAI's ``SSIMMetric`` uses the same kernel but a 'valid' convolution; we follow scikit-image.) The
  SSIM map is averaged over voxels at least 5 voxels (the filter radius) from every border along the
  axes it was filtered in, exactly as scikit-image crops it, so 3D SSIM needs at least 11 voxels along
  every axis and a 2D plane at least 11 along both of its axes. Where a volume is thinner the affected
  SSIM values are ``None`` and ``notes`` says why.
* **NRMSE** ``||rec - ref|| / ||ref||`` (scikit-image's 'euclidean' normalisation); **MAE** mean |rec - ref|.
* **Slice consistency** ``mean |e[z+1] - e[z]|`` over adjacent axial slices of the error volume
  ``e = rec - ref``: zero when the error is constant along z, large when each slice errs on its own (the
  streaks 2D-slice priors leave in coronal/sagittal views). ``slice_consistency_ratio`` divides it by the
  same measure of the reference, ``mean |ref[z+1] - ref[z]|``, so it reads as "slice-to-slice jumps added
  by the reconstruction, relative to the anatomy's own".

With a mask (e.g. :func:`body_mask`), PSNR, NRMSE and MAE use the masked voxels, a plane's PSNR the
masked voxels in that plane (planes without any are left out of the mean), the SSIM maps are averaged
over the mask (inside the crop), and slice consistency over pairs of voxels that are both inside.

Streaming: :func:`evaluate_volumes` reads slabs of axial slices with a halo of 5 slices (the Gaussian
filter radius), so every SSIM value in a slab's core is the one an in-memory filter would give. It adds
per-plane sums (squared error, SSIM map, voxel counts) indexed by the coronal row y and sagittal column x
into accumulators across slabs, so the per-plane means are exact too; :func:`evaluate_arrays` feeds the
whole volume to the same accumulator in one step, and both give the same numbers. Peak memory is about
30 float64 copies of one slab with its halo, ``~30 * (slab + 10) * Y * X * 8`` bytes on top of the
imports (measured at 256 x 256: 16 MB per slab slice; peak RSS 480 / 625 / 860 MB for 8 / 16 / 32-slice
slabs, 4.9 / 4.1 / 3.8 s for 128 slices), and it does not depend on the number of slices. The default slab
(:func:`evaluation_slab`) holds about 2^20 voxels (16 slices of 256 x 256), at least 8 slices: larger slabs
save little time (the halo's extra z-filtering is small beyond that), and the memory no longer depends on
the store's chunk depth.

Posterior calibration: :func:`posterior_stats` (mean and unbiased std over samples), streaming variants
(:class:`RunningMoments`, Welford/Chan over samples arriving one at a time, and
:func:`iter_posterior_stats` over slabs), :func:`coverage` and :func:`expected_coverage` (see there for
the values a calibrated Gaussian posterior should give). Coverage is computed in the volume's own
units, not the window, because clipping to the window would distort the error-to-std ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from medrecon.errors import ConfigError, InputError
from medrecon.physics.operator import LinearOperator
from medrecon.volume import Volume, slab_ranges

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage computes it: an 11-tap window
SSIM_MIN_SIZE = 2 * SSIM_RADIUS + 1
_C1 = 0.01**2  # (K1 * data_range)^2 with data_range = 1
_C2 = 0.03**2

# Scalar quality metrics that evaluate_* return (the study tables take every scalar number).
SCALAR_KEYS = ("psnr", "ssim", "nrmse", "mae", "psnr_axial", "psnr_coronal", "psnr_sagittal",
               "ssim_axial", "ssim_coronal", "ssim_sagittal", "slice_consistency", "slice_consistency_ratio")

MaskSpec = str | np.ndarray | Volume | None


# --------------------------------------------------------------------------------------------- windows

def to_unit_window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((x - lo) / (hi - lo), 0, 1)`` in float64 (SSIM's variance terms cancel badly in float32)."""
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f"Intensity window [{lo}, {hi}] is empty or not finite.",
                          fix="set evaluate.ct_window to [low, high] with low < high (e.g. [-1000, 1000]).")
    return np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def robust_range(ref: np.ndarray | Volume, p_lo: float = 0.5, p_hi: float = 99.5,
                 slab: int | None = None) -> tuple[float, float]:
    """Percentiles ``(p_lo, p_hi)`` of the reference: the MR intensity window.

    MR magnitudes have no absolute scale, and a few bright voxels (fat, flow artefacts) would compress the
    anatomy if the maximum were used; the 0.5/99.5 percentiles ignore them. Percentiles are numpy's
    default (linear interpolation between order statistics). For a :class:`Volume` they are computed
    exactly with bounded memory, by a two-pass radix selection on the float32 bit patterns.
    """
    if not (0 <= p_lo < p_hi <= 100):
        raise ConfigError(f"Percentiles ({p_lo}, {p_hi}) must satisfy 0 <= low < high <= 100.",
                          fix="set evaluate.mr_percentiles to e.g. [0.5, 99.5].")
    if isinstance(ref, Volume):
        vals = _volume_percentiles(ref, (p_lo, p_hi), slab or ref.chunk_depth)
    else:
        arr = np.asarray(ref, dtype=np.float64)
        _check_finite(arr, "The reference", "reference array")
        vals = np.percentile(arr, (p_lo, p_hi))
    lo, hi = float(vals[0]), float(vals[1])
    if not hi > lo:
        raise InputError(f"The reference is constant between its {p_lo} and {p_hi} percentiles ({lo}); "
                         "an MR window cannot be derived from it.",
                         path=getattr(ref, "path", None), fix="check the reference volume.")
    return lo, hi


def _sort_keys(v: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys whose unsigned order is the float order."""
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _key_to_float(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _volume_percentiles(vol: Volume, ps: Sequence[float], slab: int) -> list[float]:
    """Exact numpy-'linear' percentiles of a volume, one slab in memory at a time."""
    n = int(np.prod(vol.shape))
    high = np.zeros(1 << 16, dtype=np.int64)
    for _, data in vol.iter_slabs(slab):
        if not np.isfinite(data).all():
            raise InputError(f"{vol.path} contains NaN/Inf values.", fix="re-create the volume.")
        high += np.bincount((_sort_keys(data) >> 16).ravel(), minlength=1 << 16)
    floors = [math.floor(p / 100 * (n - 1)) for p in ps]
    ranks = sorted({r for f in floors for r in (f, min(f + 1, n - 1))})
    cum = np.cumsum(high)
    bins = {r: int(np.searchsorted(cum, r, side="right")) for r in ranks}
    low = {b: np.zeros(1 << 16, dtype=np.int64) for b in set(bins.values())}
    for _, data in vol.iter_slabs(slab):
        keys = _sort_keys(data).ravel()
        for b, counts in low.items():
            sel = keys[(keys >> 16) == b]
            counts += np.bincount(sel & 0xFFFF, minlength=1 << 16)
    value = {}
    for r, b in bins.items():
        before = int(cum[b - 1]) if b > 0 else 0
        lo16 = int(np.searchsorted(np.cumsum(low[b]), r - before, side="right"))
        value[r] = _key_to_float((b << 16) | lo16)
    out = []
    for p in ps:
        pos = p / 100 * (n - 1)
        r0 = math.floor(pos)
        r1 = min(r0 + 1, n - 1)
        out.append(value[r0] + (pos - r0) * (value[r1] - value[r0]))
    return out


def body_mask(ref: np.ndarray, threshold: float = -500.0, per_slice: bool = True) -> np.ndarray:
    """The patient's body: ``ref > threshold``, largest connected component, holes filled.

    ``per_slice=True`` (the default) labels and fills each axial slice on its own: lungs and airways are
    holes of the slice's body outline and get filled, although in 3D they connect to the outside through
    the trachea; it is also what lets :func:`evaluate_volumes` build the mask slab by slab.
    ``per_slice=False`` keeps the largest 3D component and fills 3D cavities only. The default threshold
    -500 HU separates air from tissue in CT; for MR pass a threshold in the image's units
    (:func:`default_body_threshold`).
    """
    ref = np.asarray(ref)
    if ref.ndim != 3:
        raise ValueError(f"body_mask expects a (z, y, x) volume, got shape {ref.shape}")
    fg = ref > threshold
    if per_slice:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)  # no connections across slices
    else:
        structure = ndimage.generate_binary_structure(3, 1)
    labels, n = ndimage.label(fg, structure=structure)
    if n == 0:
        return fg
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = np.zeros(n + 1, dtype=bool)
    if per_slice:
        label_z = np.zeros(n + 1, dtype=np.int64)
        label_z[labels] = np.arange(ref.shape[0])[:, None, None]
        ids = np.arange(1, n + 1)
        order = np.lexsort((counts[ids], label_z[ids]))  # by slice, then size: last of each slice is largest
        sorted_ids, sorted_z = ids[order], label_z[ids][order]
        last = np.r_[sorted_z[1:] != sorted_z[:-1], True]
        keep[sorted_ids[last]] = True
    else:
        keep[int(np.argmax(counts))] = True
    return ndimage.binary_fill_holes(keep[labels], structure=structure)


def default_body_threshold(modality: str, window: tuple[float, float]) -> float:
    """Body threshold in image units: -500 HU for CT; 10 % of the window above its low end for MR."""
    if modality.upper() == "CT":
        return -500.0
    lo, hi = window
    return float(lo + 0.1 * (hi - lo))


# ------------------------------------------------------------------------------------------ accumulator

def _gauss(a: np.ndarray, axis: int) -> np.ndarray:
    return ndimage.gaussian_filter1d(a, SSIM_SIGMA, axis=axis, truncate=SSIM_TRUNCATE, mode="reflect")


def _ssim_map(mx: np.ndarray, my: np.ndarray, mxx: np.ndarray, myy: np.ndarray,
              mxy: np.ndarray) -> np.ndarray:
    """SSIM map from Gaussian-weighted local moments (population covariances, data range 1)."""
    mx2, my2, mxmy = mx * mx, my * my, mx * my
    num = 2 * mxmy + _C1
    num *= 2 * (mxy - mxmy) + _C2
    den = mx2 + my2 + _C1
    den *= (mxx - mx2) + (myy - my2) + _C2
    num /= den
    return num


def _products(x: np.ndarray, y: np.ndarray) -> Iterator[np.ndarray]:
    yield x
    yield y
    yield x * x
    yield y * y
    yield x * y


def _wsum(a: np.ndarray, w: np.ndarray | None, axis: tuple[int, ...] | None = None) -> np.ndarray | float:
    return a.sum(axis=axis) if w is None else (a * w).sum(axis=axis)


def _wcount(shape: tuple[int, ...], w: np.ndarray | None, axis: tuple[int, ...]) -> np.ndarray:
    if w is not None:
        return w.sum(axis=axis)
    kept = [s for i, s in enumerate(shape) if i not in axis]
    return np.full(kept, float(np.prod([shape[i] for i in axis])))


class _Accumulator:
    """Sums from which every metric follows; fed slab by slab (core + halo) or once with the whole volume."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        z, y, x = shape
        self.tot = np.zeros(4)  # sum e^2, sum |e|, sum ref^2, count
        self.ax, self.cor, self.sag = np.zeros((4, z)), np.zeros((4, y)), np.zeros((4, x))  # sse, n, ssim, n
        self.ssim3 = np.zeros(2)
        self.dz = np.zeros(3)  # sum |de|, sum |dref|, pairs
        self.do_axial = y >= SSIM_MIN_SIZE and x >= SSIM_MIN_SIZE
        self.do_z = z >= SSIM_MIN_SIZE  # coronal, sagittal and 3D SSIM filter along z
        self.do_cor = self.do_z and x >= SSIM_MIN_SIZE
        self.do_sag = self.do_z and y >= SSIM_MIN_SIZE
        self.do_3d = self.do_cor and self.do_sag

    def add(self, lo: int, start: int, stop: int, ref: np.ndarray, rec: np.ndarray,
            mask: np.ndarray | None) -> None:
        """Add core slices ``start..stop-1`` of a windowed slab ``ref/rec[lo:lo+len]`` (float64)."""
        Z = self.shape[0]
        core = slice(start - lo, stop - lo)
        e = rec - ref
        ec, refc = e[core], ref[core]
        wc = None if mask is None else mask[core].astype(np.float64)
        e2 = ec * ec
        self.tot += [_wsum(e2, wc), _wsum(np.abs(ec), wc), _wsum(refc * refc, wc),
                     ec.size if wc is None else wc.sum()]
        for acc, axes, sl in ((self.ax, (1, 2), slice(start, stop)), (self.cor, (0, 2), slice(None)),
                              (self.sag, (0, 1), slice(None))):
            acc[0, sl] += _wsum(e2, wc, axes)
            acc[1, sl] += _wcount(e2.shape, wc, axes)
        # adjacent-slice pairs (k, k+1) belong to slab of k; the halo provides slice stop
        p1 = min(stop, Z - 1)
        if p1 > start:
            a, b = slice(start - lo, p1 - lo), slice(start - lo + 1, p1 - lo + 1)
            wp = None if mask is None else (mask[a] & mask[b]).astype(np.float64)
            self.dz += [_wsum(np.abs(e[b] - e[a]), wp), _wsum(np.abs(ref[b] - ref[a]), wp),
                        e[a].size if wp is None else wp.sum()]
        del e, ec, e2, refc, wc
        self._add_ssim(start, stop, ref, rec, mask, core)

    def _add_ssim(self, start: int, stop: int, ref: np.ndarray, rec: np.ndarray,
                  mask: np.ndarray | None, core: slice) -> None:
        Z, Y, X = self.shape
        R = SSIM_RADIUS
        iy, ix = slice(R, Y - R), slice(R, X - R)
        # core slices at least R from the volume's z ends (the crop of z-filtered maps), in core coordinates
        iz = slice(max(start, R) - start, max(min(stop, Z - R) - start, 0))
        need_z = self.do_z and iz.stop > iz.start
        if not (self.do_axial or need_z):
            return
        mc = None if mask is None else mask[core].astype(np.float64)
        # One z pass per product on the slab with its halo; every other pass runs on core slices only.
        # z-filtered maps are needed only at slices >= R from the volume's ends (scikit-image's crop).
        zsel = slice(core.start + iz.start, core.start + iz.stop)
        if self.do_axial:
            s = _ssim_map(*[_gauss(_gauss(p, 2), 1) for p in _products(ref[core], rec[core])])[:, iy, ix]
            w = None if mc is None else mc[:, iy, ix]
            self.ax[2, start:stop] += _wsum(s, w, (1, 2))
            self.ax[3, start:stop] += _wcount(s.shape, w, (1, 2))
            del s
        if not need_z:
            return
        fz = [_gauss(p, 0)[zsel].copy() for p in _products(ref, rec)]  # copy: drop the halo slices
        mz = None if mc is None else mc[iz]
        if self.do_cor:
            fzx = [_gauss(f, 2) for f in fz]
            s = _ssim_map(*fzx)[:, :, ix]
            w = None if mz is None else mz[:, :, ix]
            self.cor[2] += _wsum(s, w, (0, 2))
            self.cor[3] += _wcount(s.shape, w, (0, 2))
            if self.do_3d:
                s = _ssim_map(*[_gauss(f, 1) for f in fzx])[:, iy, ix]
                w = None if mz is None else mz[:, iy, ix]
                self.ssim3 += [_wsum(s, w), s.size if w is None else w.sum()]
            del fzx
        if self.do_sag:
            s = _ssim_map(*[_gauss(f, 1) for f in fz])[:, iy, :]
            w = None if mz is None else mz[:, iy, :]
            self.sag[2] += _wsum(s, w, (0, 1))
            self.sag[3] += _wcount(s.shape, w, (0, 1))

    def result(self) -> dict[str, Any]:
        sse, sae, sref2, n = (float(v) for v in self.tot)
        notes: list[str] = []
        if n == 0:
            raise InputError("The evaluation mask is empty: no voxel to compare.",
                             fix="check the mask (evaluate.mask) or its body threshold.")
        with np.errstate(divide="ignore", invalid="ignore"):
            per = {name: 10 * np.log10(acc[1] / acc[0]) for name, acc in
                   (("axial", self.ax), ("coronal", self.cor), ("sagittal", self.sag))}
            ssim_per = {name: acc[2] / acc[3] for name, acc in
                        (("axial", self.ax), ("coronal", self.cor), ("sagittal", self.sag))}
        for name, acc in (("axial", self.ax), ("coronal", self.cor), ("sagittal", self.sag)):
            per[name][acc[1] == 0] = np.nan
            ssim_per[name][acc[3] == 0] = np.nan
        out: dict[str, Any] = {
            "psnr": _psnr(sse / n), "nrmse": math.sqrt(sse / sref2) if sref2 > 0 else None, "mae": sae / n,
            "ssim": float(self.ssim3[0] / self.ssim3[1]) if self.ssim3[1] > 0 else None,
        }
        for name in ("axial", "coronal", "sagittal"):
            out[f"psnr_{name}"] = _nanmean(per[name])
            out[f"ssim_{name}"] = _nanmean(ssim_per[name])
        out["psnr_per_slice"] = per["axial"]
        out["ssim_per_slice"] = ssim_per["axial"]
        sde, sdr, npairs = (float(v) for v in self.dz)
        out["slice_consistency"] = sde / npairs if npairs > 0 else None
        out["slice_consistency_ratio"] = (sde / sdr) if npairs > 0 and sdr > 0 else None
        info = {"n_voxels": int(n), "slice_consistency_ref": sdr / npairs if npairs > 0 else None}
        if npairs == 0:
            notes.append("slice consistency undefined: fewer than two axial slices (inside the mask).")
        for key, ok, need in (("ssim", self.do_3d, "z, y and x"), ("ssim_axial", self.do_axial, "y and x"),
                              ("ssim_coronal", self.do_cor, "z and x"),
                              ("ssim_sagittal", self.do_sag, "z and y")):
            if not ok:
                notes.append(f"{key} undefined: the Gaussian SSIM window needs at least {SSIM_MIN_SIZE} "
                             f"voxels along {need}; the volume has shape {self.shape}.")
            elif out[key] is None:
                notes.append(f"{key} undefined: no mask voxel lies {SSIM_RADIUS} voxels inside the borders.")
        out["info"] = info
        out["notes"] = notes
        return out


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else float(10 * math.log10(1.0 / mse))


def _nanmean(a: np.ndarray) -> float | None:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else None


# ----------------------------------------------------------------------------------------- evaluation

def _check_finite(a: np.ndarray, what: str, where: object, z0: int = 0) -> None:
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise InputError(f"{what} has {bad} NaN/Inf voxels (slices from {z0}).", path=where,
                         fix="re-run the step that produced it; metrics are undefined on NaN/Inf.")


def _mask_kind(mask: MaskSpec) -> str:
    if mask is None or (isinstance(mask, str) and mask == "none"):
        return "none"
    if isinstance(mask, str):
        if mask != "body":
            raise ConfigError(f"Unknown evaluation mask {mask!r}.",
                              fix="use 'none' or 'body' (evaluate.mask).")
        return "body"
    return "given"


def _mask_slab(mask: MaskSpec, ref_raw: np.ndarray, lo: int, hi: int, threshold: float) -> np.ndarray | None:
    kind = _mask_kind(mask)
    if kind == "none":
        return None
    if kind == "body":
        return body_mask(ref_raw, threshold, per_slice=True)
    if isinstance(mask, Volume):
        return mask.read_slab(lo, hi) > 0.5
    return np.asarray(mask[lo:hi], dtype=bool)


def evaluate_arrays(ref: np.ndarray, rec: np.ndarray, window: tuple[float, float], mask: MaskSpec = None,
                    body_threshold: float = -500.0) -> dict[str, Any]:
    """All image metrics of ``rec`` against ``ref`` (both (z, y, x), in memory); see the module docstring.

    ``window`` = (lo, hi) in the volumes' units; ``mask`` = None/'none', 'body' (per-slice
    :func:`body_mask` of ``ref`` at ``body_threshold``) or a boolean (z, y, x) array.
    Returns the :data:`SCALAR_KEYS`, ``psnr_per_slice`` and ``ssim_per_slice`` (arrays over z, NaN where a
    slice has no mask voxel), ``info`` (voxel count, reference slice consistency) and ``notes``.
    """
    ref, rec = np.asarray(ref), np.asarray(rec)
    if ref.shape != rec.shape or ref.ndim != 3:
        raise InputError(f"Reference shape {ref.shape} and reconstruction shape {rec.shape} differ "
                         "(or are not (z, y, x)).", fix="evaluate a reconstruction on the reference's grid.")
    if _mask_kind(mask) == "given" and tuple(getattr(mask, "shape", ())) != ref.shape:
        raise InputError(f"Mask shape {tuple(getattr(mask, 'shape', ()))} differs from the volume shape "
                         f"{ref.shape}.", path=getattr(mask, "path", None),
                         fix="pass a mask on the reference's grid.")
    _check_finite(ref, "the reference", "reference array")
    _check_finite(rec, "the reconstruction", "reconstruction array")
    acc = _Accumulator(ref.shape)
    acc.add(0, 0, ref.shape[0], to_unit_window(ref, *window), to_unit_window(rec, *window),
            _mask_slab(mask, ref, 0, ref.shape[0], body_threshold))
    return _finish(acc, window, mask)


EVAL_SLAB_VOXELS = 1 << 20  # voxels per evaluation slab (core, without the halo): see the module docstring


def evaluation_slab(shape: tuple[int, int, int]) -> int:
    """Default slab depth of :func:`evaluate_volumes`: about :data:`EVAL_SLAB_VOXELS` voxels, >= 8 slices."""
    return int(min(shape[0], max(8, EVAL_SLAB_VOXELS // max(1, shape[1] * shape[2]))))


def evaluate_volumes(ref: Volume, rec: Volume, window: tuple[float, float], mask: MaskSpec = None,
                     body_threshold: float = -500.0, slab: int | None = None) -> dict[str, Any]:
    """:func:`evaluate_arrays` for stores, streaming slabs of ``slab`` slices (default :func:`evaluation_slab`).

    ``mask`` may also be a mask :class:`Volume` (inside where > 0.5). Results equal the in-memory ones up
    to float64 summation order.
    """
    if ref.shape != rec.shape:
        raise InputError(f"Reference {ref.path} has shape {ref.shape} but reconstruction {rec.path} has "
                         f"{rec.shape}.", fix="reconstruct on the reference's grid.")
    if not ref.geometry.isclose(rec.geometry):
        raise InputError(f"Reference {ref.path} and reconstruction {rec.path} have different geometries "
                         f"({ref.geometry.to_dict()} vs {rec.geometry.to_dict()}).",
                         fix="reconstruct on the reference's grid (same spacing, origin, direction).")
    if _mask_kind(mask) == "given" and tuple(mask.shape) != ref.shape:
        raise InputError(f"Mask shape {tuple(mask.shape)} differs from {ref.path}'s shape {ref.shape}.",
                         path=getattr(mask, "path", None), fix="pass a mask on the reference's grid.")
    acc = _Accumulator(ref.shape)
    slab = int(slab or evaluation_slab(ref.shape))
    for start, stop, lo, hi in slab_ranges(ref.shape[0], slab, halo=SSIM_RADIUS):
        r, x = ref.read_slab(lo, hi), rec.read_slab(lo, hi)
        _check_finite(r, "The reference", ref.path, lo)
        _check_finite(x, "The reconstruction", rec.path, lo)
        acc.add(lo, start, stop, to_unit_window(r, *window), to_unit_window(x, *window),
                _mask_slab(mask, r, lo, hi, body_threshold))
    return _finish(acc, window, mask)


def _finish(acc: _Accumulator, window: tuple[float, float], mask: MaskSpec) -> dict[str, Any]:
    out = acc.result()
    out["info"].update({"window": [float(window[0]), float(window[1])], "mask": _mask_kind(mask)})
    return out


# ----------------------------------------------------------------------------------- data consistency

def _as_tensor(a: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.is_complex() and not dtype.is_complex:
        raise InputError(f"A complex array was given where the operator expects real {dtype} data.",
                         fix="pass the real image (or the operator that matches the data).")
    return t.to(device=device, dtype=dtype)


def data_residual(operator: LinearOperator, x: Any, y: Any, slab: int = 16,
                  device: torch.device | str | None = None) -> float:
    """Relative data misfit ``||A x - y|| / ||y||`` of an image ``x`` against the measurement ``y``.

    ``x`` must be in the operator's image domain (the units the measurement was simulated in, e.g. 1/mm
    attenuation for CT, not HU). ``x`` and ``y`` may be torch tensors, numpy arrays or zarr arrays; for
    per-slice operators (leading batch dims beyond ``in_shape``) they are processed ``slab`` slices at a
    time, so a measurement store never has to be in memory. Sums are accumulated in float64.
    """
    n_in = len(operator.in_shape)
    xs, ys = tuple(x.shape), tuple(y.shape)
    batch = xs[:len(xs) - n_in]
    if xs[len(xs) - n_in:] != tuple(operator.in_shape) or ys != (*batch, *operator.out_shape):
        raise InputError(f"Image shape {xs} / measurement shape {ys} do not fit the operator "
                         f"{operator!r} (expected (..., {tuple(operator.in_shape)}) and "
                         f"(..., {tuple(operator.out_shape)}) with the same leading dims).",
                         fix="evaluate against the measurement the reconstruction was made from.")
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else "cpu"
    steps = [slice(None)] if not batch else [slice(z, z + slab) for z in range(0, batch[0], slab)]
    num = den = 0.0
    with torch.no_grad():
        for sl in steps:
            yb = _as_tensor(y[sl], operator.out_dtype, device)
            r = operator.forward(_as_tensor(x[sl], operator.in_dtype, device)) - yb
            num += float(_sqnorm(r))
            den += float(_sqnorm(yb))
    if den == 0:
        raise InputError("The measurement is all zeros; a relative residual is undefined.",
                         fix="check the measurement store.")
    return math.sqrt(num / den)


def _sqnorm(t: torch.Tensor) -> torch.Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.to(torch.float64).square().sum()


# --------------------------------------------------------------------------------------- uncertainty

def posterior_stats(samples: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise posterior mean and standard deviation over the first axis of ``samples`` (S, z, y, x).

    The variance is the unbiased one (ddof = 1). Its square root is still biased low by the factor
    c4(S) ~ 1 - 1/(4S) (2.5 % at 10 samples); :func:`expected_coverage` accounts for the finite S exactly.
    Two-pass in float64; returns float32 (z, y, x) arrays.
    """
    s = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    if s.ndim < 2 or s.shape[0] < 2:
        raise InputError(f"Posterior statistics need at least 2 samples, got shape {s.shape}.",
                         fix="draw several samples (reconstruct params: n_samples >= 2) for uncertainty.")
    s = s.astype(np.float64)
    return s.mean(axis=0).astype(np.float32), s.std(axis=0, ddof=1).astype(np.float32)


class RunningMoments:
    """Running mean and unbiased variance of samples that arrive one (or a batch) at a time.

    Welford's update generalised to batches (Chan, Golub & LeVeque 1979), in float64, so a sampler can
    fold each posterior sample in without keeping all S volumes.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        """Fold in one sample."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        self.add_batch(x[None])

    def add_batch(self, xs: np.ndarray | torch.Tensor) -> None:
        """Fold in a batch of samples along axis 0."""
        xs = xs.detach().cpu().numpy() if isinstance(xs, torch.Tensor) else np.asarray(xs)
        xs = xs.astype(np.float64)
        nb = xs.shape[0]
        mb = xs.mean(axis=0)
        m2b = ((xs - mb) ** 2).sum(axis=0)
        if self._mean is None:
            self.count, self._mean, self._m2 = nb, mb, m2b
            return
        if mb.shape != self._mean.shape:
            raise ValueError(f"sample shape {mb.shape} differs from earlier samples {self._mean.shape}")
        n = self.count + nb
        delta = mb - self._mean
        self._mean += delta * (nb / n)
        self._m2 += m2b + delta * delta * (self.count * nb / n)
        self.count = n

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("no samples added")
        return self._mean

    @property
    def std(self) -> np.ndarray:
        """Square root of the unbiased variance (needs >= 2 samples)."""
        if self.count < 2:
            raise InputError(f"Posterior std needs at least 2 samples, got {self.count}.",
                             fix="draw several samples for uncertainty.")
        return np.sqrt(self._m2 / (self.count - 1))


def iter_posterior_stats(samples: Sequence[Volume] | Any, slab: int = 8
                         ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(z0, z1, mean, std)`` slab by slab: memory is S x slab slices, not S volumes.

    ``samples`` is a sequence of sample :class:`Volume` s or an array-like (S, z, y, x) that supports
    slicing (numpy, zarr). Write the slabs with a :class:`~medrecon.volume.VolumeWriter`.
    """
    if isinstance(samples, Sequence) and samples and isinstance(samples[0], Volume):
        shapes = {v.shape for v in samples}
        if len(shapes) != 1:
            raise InputError(f"Posterior sample volumes have different shapes: {sorted(shapes)}.",
                             path=samples[0].path, fix="use samples of one reconstruction.")
        depth = samples[0].shape[0]

        def read(z0: int, z1: int) -> np.ndarray:
            return np.stack([v.read_slab(z0, z1) for v in samples])
    else:
        depth = samples.shape[1]

        def read(z0: int, z1: int) -> np.ndarray:
            return np.asarray(samples[:, z0:z1])
    for z0, z1, _, _ in slab_ranges(depth, slab):
        mean, std = posterior_stats(read(z0, z1))
        yield z0, z1, mean, std


def _coverage_hits(mean: np.ndarray, std: np.ndarray, ref: np.ndarray, ks: Sequence[float],
                   mask: np.ndarray | None) -> tuple[np.ndarray, int]:
    err = np.abs(np.asarray(mean, np.float64) - np.asarray(ref, np.float64))
    std = np.asarray(std, np.float64)
    if mask is not None:
        err, std = err[mask], std[mask]
    return np.array([np.count_nonzero(err <= k * std) for k in ks], dtype=np.int64), err.size


def _cov_dict(hits: np.ndarray, n: int, ks: Sequence[float]) -> dict[str, float]:
    if n == 0:
        raise InputError("The coverage mask is empty.", fix="check the mask (evaluate.mask).")
    return {f"cov{k:g}": float(h / n) for k, h in zip(ks, hits, strict=True)}


def coverage(mean: np.ndarray, std: np.ndarray, ref: np.ndarray, ks: Sequence[float] = (1, 2),
             mask: np.ndarray | None = None) -> dict[str, float]:
    """Fraction of voxels (inside ``mask``) with ``|mean - ref| <= k * std``, as ``{"cov1": .., "cov2": ..}``.

    For a calibrated Gaussian posterior whose mean and std are known exactly the expected values are
    0.683 and 0.954; with mean and std estimated from S samples they are lower, see
    :func:`expected_coverage`. Lower values mean over-confident uncertainty, higher ones under-confident.
    """
    if not (np.shape(mean) == np.shape(std) == np.shape(ref)):
        raise InputError(f"Posterior mean {np.shape(mean)}, std {np.shape(std)} and reference "
                         f"{np.shape(ref)} differ in shape.", fix="use the reference of the reconstruction.")
    hits, n = _coverage_hits(mean, std, ref, ks, None if mask is None else np.asarray(mask, bool))
    return _cov_dict(hits, n, ks)


def coverage_volumes(mean: Volume, std: Volume, ref: Volume, ks: Sequence[float] = (1, 2),
                     mask: MaskSpec = None, body_threshold: float = -500.0, slab: int | None = None
                     ) -> dict[str, float]:
    """:func:`coverage` streamed over slabs of stores (``mask`` as in :func:`evaluate_volumes`)."""
    for v in (mean, std):
        if v.shape != ref.shape:
            raise InputError(f"{v.path} has shape {v.shape} but the reference {ref.path} has {ref.shape}.",
                             fix="use the reference of the reconstruction.")
    hits, n = np.zeros(len(ks), dtype=np.int64), 0
    for _, _, lo, hi in slab_ranges(ref.shape[0], int(slab or ref.chunk_depth)):
        r = ref.read_slab(lo, hi)
        h, c = _coverage_hits(mean.read_slab(lo, hi), std.read_slab(lo, hi), r, ks,
                              _mask_slab(mask, r, lo, hi, body_threshold))
        hits += h
        n += c
    return _cov_dict(hits, n, ks)


def expected_coverage(k: float, n_samples: int | None = None) -> float:
    """Coverage ``P(|mean - ref| <= k std)`` a calibrated Gaussian posterior gives.

    With the true mean and std (``n_samples=None``) it is ``erf(k / sqrt 2)``: 0.6827 for k = 1, 0.9545
    for k = 2. With the sample mean and unbiased sample std of S samples, ``(mean - ref) / (std sqrt(1 +
    1/S))`` is Student-t with S - 1 degrees of freedom (a prediction interval), so the expected coverage is
    ``P(|T_{S-1}| <= k / sqrt(1 + 1/S))``: 0.623 / 0.899 at S = 8, 0.678 / 0.951 at S = 100.
    """
    if n_samples is None:
        return math.erf(k / math.sqrt(2))
    if n_samples < 2:
        raise ValueError("expected coverage needs at least 2 samples")
    q = k / math.sqrt(1 + 1 / n_samples)
    return float(2 * stats.t.cdf(q, df=n_samples - 1) - 1)
