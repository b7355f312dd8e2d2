"""DICOM series → medrecon volume(s): scan headers, plan the geometry, decode and write slab by slab.

Three steps, each usable on its own:

1. :func:`scan` walks a folder (or takes one file), reads headers only (``stop_before_pixels``), skips what is
   not a DICOM image (with a reason per file), and groups images by SeriesInstanceUID. Two series are never
   merged (MONAI's ``PydicomReader`` does merge them, with a wrong spacing). Images whose SeriesInstanceUID
   is missing or empty (anonymisers often blank it, and StudyInstanceUID with it) are not dropped: they are
   grouped by the fallback key :data:`FALLBACK_KEY` (StudyInstanceUID, SeriesNumber, Modality,
   FrameOfReferenceUID, ImageOrientationPatient within ``IOP_TOLERANCE``, Rows x Columns; dcm2niix likewise
   keeps images of another series number, image size or orientation apart), with one warning per group
   naming the key values. Such a group is selected by its SeriesNumber or its ``nouid-...`` key.
2. :func:`plan_series` turns one series into one :class:`VolumePlan` per time point. Geometry follows DICOM
   C.7.6.2.1.1: the IOP row cosine ``r`` is the direction of increasing column index (x), the column cosine
   ``c`` that of increasing row index (y), the slice normal is ``n = r x c``. Slices are ordered by their
   ImagePositionPatient projected on ``n``; the slice spacing comes from those projections, never from
   SliceThickness. PixelSpacing is ``(dy, dx)``. The volume's direction columns are ``(n, c, r)`` for the
   array axes ``(z, y, x)`` and its origin is the IPP of the first slice. Every inconsistency is an
   :class:`~medrecon.errors.InputError` that names the series, the file and the fix.
3. :func:`write_plan` decodes the slices in z order and writes chunk-aligned slabs into a
   :class:`~medrecon.volume.Volume`; peak memory is one output slab plus the (at most two) input slices that
   the current output slice is interpolated from.

Resampling (only when asked; the default is to refuse):

* ``on_tilt: resample`` (gantry tilt: the IPPs step along a line that is not the normal): the output grid's
  slice axis is the normal ``n``. Each input slice ``k`` lies ``s_k`` along ``n`` and is displaced in-plane by
  ``d_k``; it is shifted in-plane by ``-(d_k - d_ref)`` (``scipy.ndimage.shift``, order 1 = bilinear), where
  ``d_ref`` is the middle of the displacement range, so the shear is removed symmetrically and the least
  anatomy leaves the field of view. The origin becomes ``IPP_0 + d_ref``. Pixels shifted in from outside the
  field of view get the slice's minimum (the scanner's padding / air value).
* ``on_irregular_spacing: resample``: output slices lie at ``s_0 + k * h`` for ``s_0 .. s_last`` with
  ``h = resample_spacing`` or the median gap; each is linearly interpolated between the two input slices
  that bracket it along ``n`` (exact for intensities linear in z). Both resamplings combine.

Pixel decoding (:func:`read_slice`) is pydicom's ``pixel_array`` (BitsStored masking, sign extension, byte
order, RLE, and JPEG / JPEG-LS / JPEG 2000 through the pylibjpeg plugins, all verified on real files in
``tests/io/test_dicom_real.py``) followed by ``apply_modality_lut`` per file (RescaleSlope/Intercept may
differ between slices). CT comes out in HU; other modalities as stored (MR magnitude, units "arbitrary").
Enhanced (multi-frame) images are refused with a clear error: convert them to NIfTI (dcm2niix) or export
classic single-frame images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import scipy.ndimage
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder

from medrecon.budget import check_ingest_budget
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import file_sha256, provenance
from medrecon.volume import Geometry, Volume

log = logging.getLogger("medrecon.io.dicom")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IOP_TOLERANCE = 1e-4  # max abs difference between two orientations considered equal
TILT_TOLERANCE_DEG = 0.1  # a smaller angle between the slice stack and the normal is not a tilt
POSITION_TOLERANCE_MM = 0.01  # projected positions closer than this are the same position
_PIXEL_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
               "PhotometricInterpretation")
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_TIME_KEYS = ("AcquisitionNumber", "TemporalPositionIdentifier", "AcquisitionTime", "InstanceNumber")
_MAX_SKIPPED_IN_META = 200
# Images without a SeriesInstanceUID are grouped by these (the orientation within IOP_TOLERANCE).
FALLBACK_KEY = ("StudyInstanceUID", "SeriesNumber", "Modality", "FrameOfReferenceUID", "ImageOrientationPatient",
                "Rows x Columns")
# Reasons for skipping a file: each reason starts with one of these, so that messages can count them.
SKIP_NOT_DICOM = "not a DICOM file"
SKIP_UNREADABLE = "unreadable DICOM header"
SKIP_DICOMDIR = "DICOMDIR"
SKIP_NOT_IMAGE = "not an image"
SKIP_TRUNCATED = "truncated image"
_SKIP_FIX = {
    SKIP_NOT_DICOM: "point at a DICOM file or folder, or at a .nii/.nii.gz file or a medrecon .zarr volume.",
    SKIP_UNREADABLE: "the file is corrupt or truncated: copy or export it again.",
    SKIP_DICOMDIR: "point at the folder holding the image files (the DICOMDIR only indexes them).",
    SKIP_NOT_IMAGE: "point at the image series (CT/MR), not at a report, structured report or other object.",
    SKIP_TRUNCATED: "the file was cut short (an interrupted copy or download): copy or export it again.",
}


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DicomOptions:
    """How to treat series that are not a plain regular stack (config block ``ingest``)."""

    on_tilt: str = "error"  # "error" | "resample"
    on_irregular_spacing: str = "error"  # "error" | "resample"
    on_4d: str = "error"  # "error" | "split"
    spacing_tolerance: float = 0.01  # max relative deviation of a gap from the median gap
    min_slices: int = 3
    resample_spacing: float | None = None  # output slice spacing (mm) when resampling; None: median gap

    def __post_init__(self) -> None:
        choices = {"on_tilt": ("error", "resample"), "on_irregular_spacing": ("error", "resample"),
                   "on_4d": ("error", "split")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ingest.{name} is {getattr(self, name)!r}.",
                                  fix=f"set ingest.{name} to one of {', '.join(allowed)}.")
        if not self.spacing_tolerance > 0:
            raise ConfigError(f"ingest.spacing_tolerance must be > 0, got {self.spacing_tolerance}.",
                              fix="use e.g. 0.01 (1 %).")
        if int(self.min_slices) < 1:
            raise ConfigError(f"ingest.min_slices must be >= 1, got {self.min_slices}.", fix="use e.g. 3.")
        if self.resample_spacing is not None and not self.resample_spacing > 0:
            raise ConfigError(f"ingest.resample_spacing must be > 0 mm or null, got {self.resample_spacing}.",
                              fix="use null (the median gap) or a spacing in mm.")


# ------------------------------------------------------------------------------------------------- scan
@dataclass(frozen=True)
class SliceHeader:
    """The header facts of one image file that geometry planning needs (pixels are not read)."""

    path: Path
    ipp: tuple[float, float, float] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    frames: int
    missing_pixel_tags: tuple[str, ...]
    samples_per_pixel: int | None
    photometric: str | None
    time_keys: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeriesInfo:
    """One series: all images sharing a SeriesInstanceUID, or (``uid`` empty) a :data:`FALLBACK_KEY`."""

    uid: str
    number: str
    description: str
    modality: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str
    headers: list[SliceHeader] = field(default_factory=list)
    fallback_key: dict[str, str] | None = None  # the FALLBACK_KEY values, for images without SeriesInstanceUID

    @property
    def key(self) -> str:
        """The SeriesInstanceUID, or for a fallback group a stable digest of its key (selectable as `series`)."""
        if self.uid:
            return self.uid
        text = json.dumps(self.fallback_key or {}, sort_keys=True)
        return "nouid-" + hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def identity(self) -> str:
        """How the series was told apart from others: its UID, or what was found instead of one."""
        if self.uid:
            return f"SeriesInstanceUID {self.uid}"
        n = len(self.headers)
        return (f"{n} {self.modality or 'unknown-modality'} image{'s' if n != 1 else ''} without "
                f"SeriesInstanceUID, grouped by the fallback key as {self.key}")

    @property
    def fallback_text(self) -> str:
        """The fallback key's values, e.g. 'StudyInstanceUID (empty), SeriesNumber 3, ...' ('' with a UID)."""
        return ", ".join(f"{k} {v or '(empty)'}" for k, v in (self.fallback_key or {}).items())

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]

    @property
    def folder(self) -> Path:
        """The deepest folder holding all files of the series."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files])) if self.headers else Path()

    @property
    def label(self) -> str:
        """How error messages name the series: number, description, UID and folder."""
        desc = f" '{self.description}'" if self.description else ""
        return f"series {self.number or '?'}{desc} ({self.identity}) in {self.folder}"

    def summary(self) -> str:
        ident = (f"SeriesInstanceUID {self.uid}" if self.uid
                 else f"no SeriesInstanceUID, {self.key}: {self.fallback_text}")
        return (f"SeriesNumber {self.number or '?'}, '{self.description}', {self.modality}, "
                f"{len(self.headers)} files, {ident}")


@dataclass
class ScanResult:
    """Series found under a path, and the files skipped with the reason for each."""

    root: Path
    series: list[SeriesInfo]
    skipped: list[tuple[Path, str]]


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    frames_raw = ds.get("NumberOfFrames")
    try:
        frames = int(frames_raw) if frames_raw not in (None, "") else 1
    except (TypeError, ValueError):
        frames = 1
    missing = tuple(t for t in _PIXEL_TAGS if ds.get(t) in (None, ""))
    time_keys = {k: _text(ds, k) for k in _TIME_KEYS if _text(ds, k)}
    ps = _floats(ds.get("PixelSpacing"), 2)
    return SliceHeader(
        path=path,
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=ps if ps and min(ps) > 0 else None,
        rows=int(ds.Rows) if ds.get("Rows") not in (None, "") else None,
        columns=int(ds.Columns) if ds.get("Columns") not in (None, "") else None,
        frames=frames,
        missing_pixel_tags=missing,
        samples_per_pixel=int(ds.SamplesPerPixel) if ds.get("SamplesPerPixel") not in (None, "") else None,
        photometric=_text(ds, "PhotometricInterpretation") or None,
        time_keys=time_keys,
    )


def _walk(src: Path) -> Iterable[Path]:
    if src.is_file():
        yield src
        return
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _new_series(ds: pydicom.Dataset, uid: str) -> SeriesInfo:
    return SeriesInfo(uid=uid, number=_text(ds, "SeriesNumber"), description=_text(ds, "SeriesDescription"),
                      modality=_text(ds, "Modality").upper(), study_uid=_text(ds, "StudyInstanceUID"),
                      patient_id=_text(ds, "PatientID"), frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"))


def _group_without_uid(images: list[tuple[pydicom.Dataset, SliceHeader]]) -> list[SeriesInfo]:
    """Group images that have no SeriesInstanceUID by :data:`FALLBACK_KEY`, the orientation within tolerance."""
    groups: list[tuple[tuple[str, ...], tuple[float, ...] | None, SeriesInfo]] = []
    for ds, h in images:
        exact = (_text(ds, "StudyInstanceUID"), _text(ds, "SeriesNumber"), _text(ds, "Modality").upper(),
                 _text(ds, "FrameOfReferenceUID"), f"{h.rows}x{h.columns}")
        for key, iop, info in groups:
            same_iop = (iop is None and h.iop is None) or (
                iop is not None and h.iop is not None
                and np.allclose(iop, h.iop, atol=IOP_TOLERANCE, rtol=0))
            if key == exact and same_iop:
                info.headers.append(h)
                break
        else:
            info = _new_series(ds, "")
            orientation = ",".join(f"{v:.4f}".rstrip("0").rstrip(".") for v in h.iop) if h.iop else ""
            info.fallback_key = dict(zip(FALLBACK_KEY, (*exact[:4], orientation, exact[4]), strict=True))
            info.headers.append(h)
            groups.append((exact, h.iop, info))
    return [info for _, _, info in groups]


def _skip_reason(path: Path, ds: pydicom.Dataset, sop: str) -> str | None:
    """Why a readable DICOM file is not an image of a series (None: it is one)."""
    if sop == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
        return f"{SKIP_DICOMDIR} (a media directory index, not an image)"
    if ds.get("Rows") in (None, "") or ds.get("Columns") in (None, ""):
        name = pydicom.uid.UID(sop).name if sop else "unknown SOP class"
        if "Image Storage" in name:  # an image IOD that stops before the pixel description: cut short
            return (f"{SKIP_TRUNCATED} (a {name} file that ends after {path.stat().st_size} bytes, before "
                    "its Rows/Columns and pixel data)")
        return f"{SKIP_NOT_IMAGE} (no Rows/Columns: {name})"
    return None


def scan(src: str | Path) -> ScanResult:
    """Read the headers of every file under ``src`` and group the images into series.

    Images are grouped by SeriesInstanceUID; those without one (missing or empty) by :data:`FALLBACK_KEY`,
    with a warning, because anonymised exports often blank the UIDs and dropping the files would refuse a
    perfectly usable series.
    """
    root = Path(src)
    if not root.exists():
        raise InputError(f"DICOM input {root} does not exist.", fix="check the path.")
    n_files = 0
    series: dict[str, SeriesInfo] = {}
    without_uid: list[tuple[pydicom.Dataset, SliceHeader]] = []
    skipped: list[tuple[Path, str]] = []
    for path in _walk(root):
        n_files += 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            skipped.append((path, f"{SKIP_NOT_DICOM} (no 'DICM' marker after the 128-byte preamble)"))
            continue
        except Exception as err:  # pydicom raises many types on broken headers
            skipped.append((path, f"{SKIP_UNREADABLE} ({type(err).__name__}: {err})"))
            continue
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        reason = _skip_reason(path, ds, sop)
        if reason:
            skipped.append((path, reason))
            continue
        uid = _text(ds, "SeriesInstanceUID")
        if not uid:
            without_uid.append((ds, _header(path, ds)))
            continue
        if uid not in series:
            series[uid] = _new_series(ds, uid)
        series[uid].headers.append(_header(path, ds))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    fallback = _group_without_uid(without_uid)
    for info in fallback:
        log.warning("DICOM under %s: %s (SeriesInstanceUID missing or empty, as anonymisers often leave it): "
                    "%s; treated as one series.", root, info.identity, info.fallback_text)
    ordered = sorted([*series.values(), *fallback], key=lambda s: (_series_number_key(s.number), s.key))
    counts: dict[str, int] = {}
    for _path, reason in skipped:
        counts[_category(reason)] = counts.get(_category(reason), 0) + 1
    log.info("DICOM under %s: %d files read, %d series, %d skipped%s", root, n_files, len(ordered), len(skipped),
             f" ({', '.join(f'{n} {c}' for c, n in counts.items())})" if counts else "")
    for info in ordered:
        log.info("  series: %s", info.summary())
    return ScanResult(root, ordered, skipped)


def _series_number_key(number: str) -> tuple[int, str]:
    try:
        return (int(float(number)), number)
    except ValueError:
        return (1 << 30, number)


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class VolumePlan:
    """How to build one volume: which files in which order, and where each output slice is sampled."""

    series: SeriesInfo
    files: list[Path]  # input slices, ordered along the normal
    positions: np.ndarray  # (n_in,) input slice positions along the normal, relative to the first (mm)
    shifts: np.ndarray  # (n_in, 2) in-plane de-shear shift (rows, columns) in pixels; zeros without tilt
    out_positions: np.ndarray  # (n_out,) output slice positions along the normal, relative to the first (mm)
    geometry: Geometry
    shape: tuple[int, int, int]
    timepoint: int | None = None  # 0-based time point of a split 4D series
    n_timepoints: int = 1
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def resampled(self) -> bool:
        return bool(self.facts.get("deshear") or self.facts.get("resampled_along_normal"))


def _fail(series: SeriesInfo, problem: str, fix: str) -> InputError:
    return InputError(f"DICOM {series.label}: {problem}", fix=fix)


def _check_tags(series: SeriesInfo) -> None:
    for h in series.headers:
        if h.frames > 1:
            raise _fail(series, f"{h.path} is a multi-frame (enhanced) image with {h.frames} frames; "
                        "medrecon reads classic single-frame series only.",
                        "convert the series to NIfTI (e.g. `dcm2niix`) and ingest the .nii.gz, or export "
                        "classic single-frame images from the scanner/PACS.")
        if h.missing_pixel_tags:
            raise _fail(series, f"{h.path} lacks the pixel description tag(s) "
                        f"{', '.join(h.missing_pixel_tags)}.",
                        "re-export the series; these tags are mandatory for an image.")
        values = {"ImagePositionPatient": h.ipp, "ImageOrientationPatient": h.iop,
                  "PixelSpacing": h.pixel_spacing}
        missing = [t for t in _GEOMETRY_TAGS if values[t] is None]
        if missing:
            raise _fail(series, f"{h.path} has no valid {', '.join(missing)} (geometry tags).",
                        "re-export the series with patient geometry, or remove this file if it is not a "
                        "slice of the volume (e.g. a screen capture or localizer).")
        if h.samples_per_pixel != 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise _fail(series, f"{h.path} is a colour image ({h.photometric}, {h.samples_per_pixel} "
                        "samples per pixel); medrecon reads greyscale CT/MR only.",
                        "select a greyscale series.")


def _first_differing(series: SeriesInfo, key: Any, close: Any) -> tuple[SliceHeader, SliceHeader] | None:
    ref = series.headers[0]
    for h in series.headers[1:]:
        if not close(key(ref), key(h)):
            return ref, h
    return None


def _orientation(series: SeriesInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine r, column cosine c and normal n = r x c, after checking they agree across the series."""
    pair = _first_differing(series, lambda h: np.asarray(h.iop),
                            lambda a, b: np.allclose(a, b, atol=IOP_TOLERANCE, rtol=0))
    if pair:
        a, b = pair
        raise _fail(series, "slices have different orientations (ImageOrientationPatient): "
                    f"{list(a.iop)} in {a.path} but {list(b.iop)} in {b.path}. One series must be one stack.",
                    "select the files of one orientation (they are different stacks or localizers); if they "
                    "were merged by a converter, re-export the series from the scanner/PACS.")
    iop = np.asarray(series.headers[0].iop, dtype=float)
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise _fail(series, f"ImageOrientationPatient {iop.tolist()} in {series.headers[0].path} is not two "
                    "orthogonal unit vectors.", "re-export the series; the header is corrupt.")
    r = r / np.linalg.norm(r)
    c = c - (c @ r) * r
    c = c / np.linalg.norm(c)
    return r, c, np.cross(r, c)


def _check_grid(series: SeriesInfo) -> tuple[int, int, float, float]:
    pair = _first_differing(series, lambda h: (h.rows, h.columns), lambda a, b: a == b)
    if pair:
        a, b = pair
        raise _fail(series, f"slices have different sizes: {a.rows}x{a.columns} in {a.path} but "
                    f"{b.rows}x{b.columns} in {b.path}.",
                    "select the files of one image size; a series must be one regular stack.")
    pair = _first_differing(series, lambda h: np.asarray(h.pixel_spacing),
                            lambda a, b: np.allclose(a, b, rtol=1e-4, atol=0))
    if pair:
        a, b = pair
        raise _fail(series, f"slices have different PixelSpacing: {list(a.pixel_spacing)} in {a.path} but "
                    f"{list(b.pixel_spacing)} in {b.path}.", "select the files of one pixel spacing.")
    h = series.headers[0]
    dy, dx = h.pixel_spacing  # DICOM PixelSpacing = (row spacing, column spacing) = (dy, dx)
    return h.rows, h.columns, dy, dx


def _time_order(series: SeriesInfo, groups: list[list[int]]) -> tuple[str, list[list[int]]]:
    """Order each position's files in time by the first key present in all files and distinct per position."""
    heads = series.headers
    for key in _TIME_KEYS:
        if not all(key in heads[i].time_keys for g in groups for i in g):
            continue
        texts = {i: heads[i].time_keys[key] for g in groups for i in g}
        try:
            values: dict[int, float | str] = {i: float(t) for i, t in texts.items()}
        except ValueError:
            values = dict(texts)  # compare as text (all values of one key have one format)
        if all(len({values[i] for i in g}) == len(g) for g in groups):
            return key, [sorted(g, key=values.__getitem__) for g in groups]
    raise _fail(series, "the series has several images per position but none of "
                f"{', '.join(_TIME_KEYS)} tells the time points apart.",
                "split the files into one folder per time point and ingest each folder.")


def _gap_summary(gaps: np.ndarray) -> str:
    """Run-length description of gaps, e.g. '4.00 mm x 13, then one gap of 1.08 mm, then 7.00 mm x 13'."""
    runs: list[list[float]] = []
    for g in gaps:
        if runs and abs(g - runs[-1][0]) <= 0.01 * max(abs(runs[-1][0]), 1e-6):
            runs[-1][1] += 1
        else:
            runs.append([float(g), 1])
    if len(runs) > 8:
        return (f"{len(gaps)} gaps from {gaps.min():.2f} to {gaps.max():.2f} mm "
                f"(median {np.median(gaps):.2f} mm): " + ", ".join(f"{g:.2f}" for g in gaps))
    parts = [f"one gap of {g:.2f} mm" if n == 1 else f"{g:.2f} mm x {int(n)}" for g, n in runs]
    return ", then ".join(parts)


def _names(files: list[Path], at_most: int = 5) -> str:
    more = f" and {len(files) - at_most} more" if len(files) > at_most else ""
    return ", ".join(f.name for f in files[:at_most]) + more


def _refuse_too_few_slices(series: SeriesInfo, n_pos: int, min_slices: int) -> None:
    """Raise the real problem of a series too thin for a volume.

    A truncated or undecodable file is reported as such (decoding the few files is cheap), because "too few
    slices" would send the user looking for missing files; a lone image is named, since the usual cause is an
    ``input`` that points at one file instead of the series' folder.
    """
    for h in series.headers:  # _check_tags has made sure Rows and Columns are there
        read_slice(h.path, (h.rows, h.columns))
    if len(series.headers) == 1:
        path = series.headers[0].path
        raise _fail(series, f"{path} is a single image (one slice); a volume needs at least {min_slices} slice "
                    "positions (ingest.min_slices).",
                    "point at the folder that holds every slice of the series rather than at one file, or set "
                    "ingest.min_slices: 1 if a one-slice volume is really intended.")
    raise _fail(series, f"only {n_pos} slice position(s); at least {min_slices} are needed for a volume "
                f"(ingest.min_slices), in {_names(series.files)}.",
                "point at the complete series (all its files), or lower ingest.min_slices if a thin "
                "volume is intended.")


def plan_series(series: SeriesInfo, options: DicomOptions | None = None) -> list[VolumePlan]:
    """Check one series' geometry and plan its volume(s): one per time point when a 4D series is split."""
    options = options or DicomOptions()
    if not series.headers:
        raise _fail(series, "no image files.", "point at a folder with the series' files.")
    _check_tags(series)
    r, c, n = _orientation(series)
    rows, cols, dy, dx = _check_grid(series)
    heads = series.headers
    ipp = np.asarray([h.ipp for h in heads], dtype=float)
    s_all = ipp @ n

    # Group files by position along the normal (a 4D series has several files per position).
    order = np.argsort(s_all, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(s_all[i] - s_all[groups[-1][0]]) <= POSITION_TOLERANCE_MM:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    n_pos = len(groups)
    counts = {len(g) for g in groups}
    n_t = 1
    time_key = None
    if counts != {1}:
        if len(counts) > 1:
            dup = [g for g in groups if len(g) > 1][:3]
            detail = "; ".join(f"{len(g)} files at {s_all[g[0]]:.2f} mm (e.g. {heads[g[0]].path.name}, "
                               f"{heads[g[1]].path.name})" for g in dup)
            raise _fail(series, f"duplicate slice positions with irregular counts ({sorted(counts)} files "
                        f"per position over {n_pos} positions): {detail}.",
                        "remove duplicate files (e.g. copies or a repeated acquisition) so that each "
                        "position occurs once, or the same number of times for a 4D series.")
        n_t = counts.pop()
        if options.on_4d != "split":
            raise _fail(series, f"this is a 4D series: {n_pos} positions x {n_t} time points "
                        f"({len(heads)} files); it is not one 3D volume.",
                        "set ingest.on_4d: split (one volume per time point; select one with `timepoint`).")
        time_key, groups = _time_order(series, groups)

    if n_pos < options.min_slices:
        _refuse_too_few_slices(series, n_pos, options.min_slices)

    # Geometry of the stack (same for every time point).
    first = [g[0] for g in groups]
    p = ipp[first]
    s = s_all[first] - s_all[first[0]]
    problems: list[str] = []
    fixes: list[str] = []
    facts: dict[str, Any] = {"slice_normal": n.tolist(), "input_positions_mm": s.round(4).tolist(),
                             "deshear": False, "resampled_along_normal": False}
    if time_key:
        facts["time_key"] = time_key
    tilt_deg = 0.0
    if n_pos > 1:
        v = p[-1] - p[0]
        cos = min(1.0, abs(float(v @ n)) / max(float(np.linalg.norm(v)), 1e-12))
        tilt_deg = math.degrees(math.acos(cos))
    facts["tilt_deg"] = round(tilt_deg, 3)
    d = (p - p[0]) - s[:, None] * n[None, :]  # in-plane displacement of each slice (mm)
    dyx = np.stack([d @ c, d @ r], axis=1)  # along the column cosine (rows, y) and row cosine (columns, x)
    shifts = np.zeros((n_pos, 2))
    origin = p[0].copy()
    if tilt_deg > TILT_TOLERANCE_DEG:
        if options.on_tilt == "error":
            problems.append(f"gantry tilt of {tilt_deg:.1f} deg (the slice positions step along a line "
                            f"{tilt_deg:.1f} deg off the slice normal), so the stack is sheared")
            fixes.append("ingest.on_tilt: resample")
        else:
            ref = (dyx.min(axis=0) + dyx.max(axis=0)) / 2
            shifts = (dyx - ref) / np.array([dy, dx])
            origin = p[0] + ref[0] * c + ref[1] * r
            facts.update(deshear=True, deshear_reference_mm=ref.tolist(),
                         max_shift_pixels=float(np.abs(shifts).max()))

    gaps = np.diff(s)
    out_positions = s.copy()
    dz = float(s[-1] / (n_pos - 1)) if n_pos > 1 else 1.0
    if n_pos > 2:
        median = float(np.median(gaps))
        deviation = float(np.max(np.abs(gaps - median)) / median)
        facts.update(median_gap_mm=median, gap_deviation=deviation)
        if deviation > options.spacing_tolerance:
            if options.on_irregular_spacing == "error":
                problems.append(f"irregular slice spacing along the normal: {_gap_summary(gaps)} (deviation "
                                f"{100 * deviation:.0f} % from the median {median:.2f} mm > tolerance "
                                f"{100 * options.spacing_tolerance:g} %)")
                fixes.append("ingest.on_irregular_spacing: resample")
            else:
                dz = float(options.resample_spacing or median)
                n_out = math.floor(s[-1] / dz + 1e-6) + 1
                out_positions = np.arange(n_out) * dz
                facts.update(resampled_along_normal=True, input_gaps_mm=gaps.round(4).tolist())
    if problems:
        raise _fail(series, "; and ".join(problems) + ". A plain stack would put anatomy in the wrong place.",
                    "resample to a regular grid with " + " and ".join(fixes) + " (linear interpolation), or "
                    "select a series without these problems.")
    facts["output_spacing_mm"] = dz
    if n_pos == 1:
        dz = float(heads[0].pixel_spacing[0])  # a single slice: any positive spacing; use the pixel size
    direction = np.stack([n, c, r], axis=1) + 0.0  # + 0.0 turns -0.0 into 0.0 for tidy metadata
    geometry = Geometry((dz, dy, dx), tuple(origin), tuple(tuple(row) for row in direction))
    shape = (len(out_positions), rows, cols)
    plans = []
    for t in range(n_t):
        files = [heads[g[t]].path for g in groups]
        plans.append(VolumePlan(series, files, s, shifts, out_positions, geometry, shape,
                                timepoint=t if n_t > 1 else None, n_timepoints=n_t, facts=dict(facts)))
    return plans


# ---------------------------------------------------------------------------------------------- decoding
def read_slice(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one single-frame image to float32 (rows, columns), with its own rescale (CT: HU).

    Truncated or corrupt pixel data, a missing decoder or a multi-frame file is an :class:`InputError`.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=False)
    except Exception as err:
        raise InputError(f"Cannot read DICOM file {path} ({type(err).__name__}: {err}).",
                         fix="the file is truncated or corrupt: re-export the series.") from err
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and ts.is_encapsulated:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise InputError(f"No decoder installed for the transfer syntax of {path}: {ts.name}.",
                             fix="install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg (or gdcm).")
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise InputError(f"{path} is a multi-frame (enhanced) image with {int(frames)} frames.",
                         fix="convert it to NIfTI (dcm2niix) or export classic single-frame images.")
    try:
        stored = ds.pixel_array
    except Exception as err:
        raise InputError(f"Cannot decode the pixel data of {path}: the file is truncated or corrupt "
                         f"({type(err).__name__}: {err}).", fix="copy or re-export the series.") from err
    if stored.ndim != 2 or (expected_shape is not None and stored.shape != tuple(expected_shape)):
        raise InputError(f"Pixel data of {path} decodes to shape {stored.shape}, expected "
                         f"{tuple(expected_shape) if expected_shape else '(rows, columns)'}.",
                         fix="the file is corrupt or not a greyscale slice: re-export the series.")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


class _SliceSource:
    """Input slices on demand, de-sheared, keeping only the ones still needed (z order, monotone)."""

    def __init__(self, plan: VolumePlan) -> None:
        self.plan = plan
        self.cache: dict[int, np.ndarray] = {}

    def get(self, k: int) -> np.ndarray:
        if k not in self.cache:
            for old in [i for i in self.cache if i < k - 1]:
                del self.cache[old]
            img = read_slice(self.plan.files[k], self.plan.shape[1:])
            shift = self.plan.shifts[k]
            if np.any(np.abs(shift) > 1e-6):
                img = scipy.ndimage.shift(img, shift, order=1, mode="constant", cval=float(img.min()))
            self.cache[k] = img
        return self.cache[k]

    def sample(self, position: float) -> np.ndarray:
        """The output slice at ``position`` along the normal: linear between the bracketing input slices."""
        s = self.plan.positions
        k = int(np.clip(np.searchsorted(s, position, side="right") - 1, 0, len(s) - 1))
        if k == len(s) - 1 or abs(position - s[k]) <= 1e-6:
            return self.get(k)
        w = float((position - s[k]) / (s[k + 1] - s[k]))
        if w >= 1 - 1e-9:
            return self.get(k + 1)
        return (1 - w) * self.get(k) + w * self.get(k + 1)


def write_plan(plan: VolumePlan, out: str | Path, meta: dict[str, Any]) -> Path:
    """Decode and write one planned volume in chunk-aligned slabs; the store appears only when complete."""
    source = _SliceSource(plan)
    with Volume.create(out, plan.shape, plan.geometry, meta) as writer:
        depth = writer.chunk_depth
        for z0 in range(0, plan.shape[0], depth):
            z1 = min(z0 + depth, plan.shape[0])
            slab = np.empty((z1 - z0, *plan.shape[1:]), dtype=np.float32)
            for z in range(z0, z1):
                slab[z - z0] = source.sample(float(plan.out_positions[z]))
            writer.write_slab(z0, slab)
    return Path(out)


# ------------------------------------------------------------------------------------------------ ingest
def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60]


def volume_name(plan: VolumePlan) -> str:
    """``<SeriesNumber>_<description>[_t<k>].zarr``, the file name of a plan's store in a directory output."""
    number = _sanitise(plan.series.number) or "x"
    desc = _sanitise(plan.series.description)
    name = f"{number}_{desc}" if desc else number
    if plan.timepoint is not None:
        name += f"_t{plan.timepoint}"
    return name + ".zarr"


def _select(scanned: ScanResult, series: str | None) -> list[SeriesInfo]:
    if series is None:
        return scanned.series
    chosen = [s for s in scanned.series if series in (s.uid, s.number, s.key)]
    listing = "; ".join(s.summary() for s in scanned.series)
    if not chosen:
        raise InputError(f"No series {series!r} under {scanned.root}; found: {listing}.",
                         fix="set `series` to one of the SeriesInstanceUIDs, SeriesNumbers or keys listed.")
    if len(chosen) > 1:
        raise InputError(f"SeriesNumber {series!r} matches {len(chosen)} series under {scanned.root}: "
                         + "; ".join(s.summary() for s in chosen) + ".",
                         fix="select by SeriesInstanceUID (or the nouid-... key) instead.")
    return chosen


def _meta(plan: VolumePlan, options: DicomOptions, scanned: ScanResult, meta_extra: dict[str, Any]
          ) -> dict[str, Any]:
    s = plan.series
    modality = s.modality or "OT"
    skipped = [[str(p), why] for p, why in scanned.skipped]
    meta: dict[str, Any] = {
        "modality": modality,
        "units": "HU" if modality == "CT" else "arbitrary",
        "series": {"uid": s.uid, "number": s.number, "description": s.description, "key": s.key,
                   "grouped_by": "SeriesInstanceUID" if s.uid else "fallback_key",
                   **({"fallback_key": s.fallback_key} if s.fallback_key else {})},
        "study_uid": s.study_uid,
        "patient_id": s.patient_id,
        "frame_of_reference_uid": s.frame_of_reference_uid,
        "source": {"format": "dicom", "root": str(scanned.root),
                   "files": [{"path": str(f), "sha256": file_sha256(f)} for f in plan.files]},
        "ingest_options": asdict(options),
        "dicom_geometry": plan.facts,
        "timepoint": plan.timepoint,
        "n_timepoints": plan.n_timepoints,
        "skipped_files": skipped[:_MAX_SKIPPED_IN_META],
        "n_skipped_files": len(skipped),
    }
    extra = dict(meta_extra)
    if "provenance" not in extra:
        meta["provenance"] = provenance({"ingest": asdict(options)}, seeds={})
    wanted = extra.pop("modality", None)
    if wanted and s.modality and str(wanted).upper() != s.modality:
        raise InputError(f"The config says modality {wanted} but DICOM {s.label} has Modality {s.modality}.",
                         fix=f"set the subject's modality to {s.modality}, or point at the {wanted} series.")
    meta.update(extra)
    return meta


def _category(reason: str) -> str:
    return next((c for c in _SKIP_FIX if reason.startswith(c)), reason)


def _refuse_no_images(scanned: ScanResult) -> None:
    """Raise what was found instead of images: a single file's real problem, or the files counted by reason."""
    src, skipped = scanned.root, scanned.skipped
    if src.is_file() and len(skipped) == 1:
        reason = skipped[0][1]
        raise InputError(f"DICOM file {src} is not a usable image: {reason}.",
                         fix=_SKIP_FIX.get(_category(reason), "point at a DICOM image file or series folder."))
    if not skipped:
        raise InputError(f"No DICOM images found under {src}; it holds no files.",
                         fix="point at a folder (or file) that holds DICOM image files.")
    by_category: dict[str, list[tuple[Path, str]]] = {}
    for path, reason in skipped:
        by_category.setdefault(_category(reason), []).append((path, reason))
    parts = []
    for category, items in by_category.items():
        listing = "; ".join(f"{p.name}: {why}" for p, why in items[:5])
        more = f"; and {len(items) - 5} more" if len(items) > 5 else ""
        parts.append(f"{len(items)} {category} ({listing}{more})")
    fixes = [_SKIP_FIX[c] for c in by_category if c in _SKIP_FIX]
    raise InputError(f"No usable DICOM images under {src}; {len(skipped)} files skipped: {', '.join(parts)}.",
                     fix=" ".join(fixes) or "point at a folder (or file) that holds DICOM image files.")


def ingest_dicom(src: str | Path, out: str | Path, options: DicomOptions | None = None,
                 series: str | None = None, timepoint: int | None = None,
                 meta_extra: dict[str, Any] | None = None, memory_mb: float | None = None) -> list[Path]:
    """Ingest DICOM under ``src`` into ``out``: one ``.zarr`` store, or a directory with one store per volume.

    With ``out`` ending in ``.zarr`` exactly one volume must result (choose with ``series`` =
    SeriesInstanceUID or SeriesNumber, and ``timepoint`` (0-based) for a split 4D series). Otherwise ``out``
    is a directory and every series (and time point) becomes ``out/<SeriesNumber>_<description>[_t<k>].zarr``.
    All geometry is checked before any pixel is read; nothing is left at ``out`` when the ingest fails.
    A ``modality`` in ``meta_extra`` must agree with the DICOM Modality tag. ``memory_mb`` (config
    ``memory_mb``) refuses a series whose working set would not fit (:func:`medrecon.budget.check_ingest_budget`).
    """
    options = options or DicomOptions()
    src, out = Path(src), Path(out)
    scanned = scan(src)
    if not scanned.series:
        _refuse_no_images(scanned)
    chosen = _select(scanned, series)
    single = out.name.endswith(".zarr")
    if single and len(chosen) > 1:
        raise InputError(f"{src} holds {len(chosen)} series but {out} is one volume: "
                         + "; ".join(s.summary() for s in chosen) + ".",
                         fix="pass `series` (a SeriesInstanceUID or SeriesNumber from this list), or give a "
                         "directory as output to ingest every series.")
    plans = [p for s in chosen for p in plan_series(s, options)]
    if timepoint is not None:
        n_t = max(p.n_timepoints for p in plans)
        if not 0 <= timepoint < n_t or n_t == 1:
            raise InputError(f"timepoint {timepoint} requested but {src} has "
                             f"{'no 4D series' if n_t == 1 else f'time points 0..{n_t - 1}'}.",
                             fix="remove `timepoint`, or pick one of the time points listed.")
        plans = [p for p in plans if p.timepoint == timepoint]
    if single and len(plans) > 1:
        raise InputError(f"{chosen[0].label} has {len(plans)} time points but {out} is one volume.",
                         fix=f"pass `timepoint` (0..{len(plans) - 1}) or give a directory as output.")
    for p in plans:
        check_ingest_budget(f"DICOM {p.series.label}", p.shape, memory_mb)
        g = p.geometry
        notes = [k for k in ("deshear", "resampled_along_normal") if p.facts.get(k)]
        log.info("DICOM %s%s: %d files -> %d x %d x %d voxels (z, y, x), spacing %.4g x %.4g x %.4g mm%s",
                 p.series.label, "" if p.timepoint is None else f" time point {p.timepoint}", len(p.files),
                 *p.shape, *g.spacing, f" ({', '.join(notes)})" if notes else "")
    metas = [_meta(p, options, scanned, meta_extra or {}) for p in plans]
    if single:
        return [write_plan(plans[0], out, metas[0])]
    return _write_directory(plans, metas, out)


def _write_directory(plans: list[VolumePlan], metas: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write every plan into a staging folder beside ``out``; move the stores in only when all succeeded."""
    names: list[str] = []
    for plan in plans:
        name = volume_name(plan)
        if name in names:  # two series with the same number and description: disambiguate by UID
            name = name[:-5] + f"_{_sanitise(plan.series.key)[-8:]}.zarr"
        names.append(name)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for plan, meta, name in zip(plans, metas, names, strict=True):
            write_plan(plan, staging / name, meta)
        out.mkdir(parents=True, exist_ok=True)
        finals = []
        for name in names:
            final = out / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            finals.append(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return finals
