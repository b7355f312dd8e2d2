"""Write a volume as a classic DICOM series (one file per slice): test data and export for viewers.

What is written, per slice: a CT Image Storage or MR Image Storage instance with file meta (explicit VR
little endian), patient/study/series/frame-of-reference identity, ImagePositionPatient (from the geometry,
or from an explicit per-slice list so that tests can write tilted or irregularly spaced series on purpose),
ImageOrientationPatient, PixelSpacing ``[dy, dx]``, SliceThickness, 16-bit pixels with RescaleSlope /
RescaleIntercept, a display window and InstanceNumber. A 4D array ``(t, z, y, x)`` is written as one series
with duplicate positions (AcquisitionNumber and TemporalPositionIdentifier = t + 1), as fMRI scanners do.

Quantisation and round-trip exactness: a value ``v`` is stored as the integer
``round((v - intercept) / slope)`` and read back as ``stored * slope + intercept``. Values that are
``intercept + slope * n`` for an integer ``n`` in the stored range (e.g. integer HU with slope 1, or
multiples of 0.5 with slope 0.5) survive exactly; anything else is rounded to the nearest such value (error at
most ``slope / 2``). A value outside the representable range is an error, never silently clipped.

UIDs are deterministic: ``pydicom.uid.generate_uid(entropy_srcs=[...])`` seeded with ``seed`` and the role of
the UID, so the same call writes byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from medrecon.errors import InputError
from medrecon.volume import Geometry

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
_STUDY_DATE = "20000101"  # fixed, so that files are reproducible byte for byte
_STUDY_TIME = "120000"


def _uid(seed: int, *role: object) -> str:
    return generate_uid(entropy_srcs=["medrecon", str(seed), *(str(r) for r in role)])


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"


def default_rescale(volume: np.ndarray, modality: str) -> tuple[float, float]:
    """(slope, intercept) as scanners do: CT 1 / -1024 (integer HU), else exact integers or a 16-bit range."""
    if modality == "CT":
        return 1.0, -1024.0
    finite = volume[np.isfinite(volume)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.array_equal(finite, np.round(finite)) and vmin >= 0 and vmax <= 65535:
        return 1.0, 0.0
    intercept = min(0.0, vmin)
    span = vmax - intercept
    return (span / 65535.0 if span > 0 else 1.0), intercept


def quantise(volume: np.ndarray, slope: float, intercept: float, signed: bool | None = None
             ) -> tuple[np.ndarray, bool]:
    """Stored integers for ``volume``; int16 if ``signed`` (auto: only when needed), else uint16.

    Raises :class:`InputError` when a value does not fit the stored type (no silent clipping).
    """
    if slope <= 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise InputError(f"Rescale slope must be positive and finite and the intercept finite; got {slope}, "
                         f"{intercept}.", fix="pass rescale_slope > 0.")
    if not np.isfinite(volume).all():
        raise InputError("Cannot write NaN/Inf voxels to DICOM.", fix="replace non-finite values first.")
    stored = np.round((np.asarray(volume, dtype=np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if signed is None:
        signed = lo < 0
    info = np.iinfo(np.int16 if signed else np.uint16)
    if lo < info.min or hi > info.max:
        vmin, vmax = float(np.min(volume)), float(np.max(volume))
        raise InputError(
            f"Values {vmin:g}..{vmax:g} do not fit {'signed' if signed else 'unsigned'} 16-bit storage with "
            f"slope {slope:g} and intercept {intercept:g} (stored {lo:.0f}..{hi:.0f}).",
            fix="choose rescale_slope/rescale_intercept that cover the data range, or signed=True.")
    return stored.astype(np.int16 if signed else np.uint16), bool(signed)


def _base_dataset(modality: str, seed: int, series_number: int, series_uid: str, study_uid: str,
                  series_description: str, patient_name: str, patient_id: str, study_description: str,
                  geometry: Geometry, slope: float, intercept: float, window: tuple[float, float]) -> Dataset:
    """Header elements shared by every slice of the series."""
    ds = Dataset()
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.Modality = modality
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if modality == "CT" else ["DERIVED", "SECONDARY"]
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = _uid(seed, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "medrecon"
    ds.BodyPartExamined = ""
    if modality == "CT":
        ds.KVP = ""
    else:
        ds.ScanningSequence = "RM"  # research mode: a synthetic image
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        ds.ImagedNucleus = "1H"
    d = geometry.direction_matrix
    row_cosine, col_cosine = d[:, 2], d[:, 1]  # DICOM: first row (x, columns) then first column (y, rows)
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_cosine, *col_cosine)]
    dz, dy, dx = geometry.spacing
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(dz)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = _ds(intercept)
    if modality == "CT":
        ds.RescaleType = "HU"
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(max(window[1], 1.0))
    return ds


def write_dicom_series(volume: np.ndarray, geometry: Geometry, out_dir: str | Path, *, modality: str = "CT",
                       series_description: str = "medrecon synthetic series", series_number: int = 1,
                       rescale_slope: float | None = None, rescale_intercept: float | None = None,
                       signed: bool | None = None, seed: int = 0,
                       patient_name: str = "MEDRECON^SYNTHETIC", patient_id: str = "MEDRECON-0",
                       study_description: str = "medrecon synthetic study",
                       positions: Sequence[Sequence[float]] | np.ndarray | None = None,
                       window: tuple[float, float] | None = None, shuffle_names: bool = False) -> list[Path]:
    """Write ``volume`` (z, y, x) or (t, z, y, x) as one DICOM series in ``out_dir``; return the file paths.

    ``positions`` (one LPS point per slice) overrides the ImagePositionPatient implied by ``geometry``; that
    is how tests write gantry-tilted (sheared) or irregularly spaced series. ``rescale_slope``/``_intercept``
    default to :func:`default_rescale`. ``shuffle_names`` names files by seeded random hex strings, so that
    directory order says nothing about slice order. Files are written in explicit VR little endian.
    """
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise InputError(f"Cannot write modality {modality!r} as DICOM.", fix="use modality 'CT' or 'MR'.")
    vol = np.asarray(volume)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4 or min(vol.shape) < 1:
        raise InputError(f"Volume must be (z, y, x) or (t, z, y, x), got shape {np.shape(volume)}.")
    n_t, n_z = vol.shape[:2]
    if positions is None:
        ipp = geometry.index_to_lps(np.stack([np.arange(n_z), np.zeros(n_z), np.zeros(n_z)], axis=1))
    else:
        ipp = np.asarray(positions, dtype=float)
        if ipp.shape != (n_z, 3):
            raise InputError(f"positions must be one (x, y, z) point per slice, shape ({n_z}, 3); "
                             f"got {ipp.shape}.")
    if rescale_slope is None or rescale_intercept is None:
        slope0, intercept0 = default_rescale(vol, modality)
        rescale_slope = slope0 if rescale_slope is None else rescale_slope
        rescale_intercept = intercept0 if rescale_intercept is None else rescale_intercept
    stored, _signed = quantise(vol, float(rescale_slope), float(rescale_intercept), signed)
    if window is None:
        vmin, vmax = float(vol.min()), float(vol.max())
        window = (40.0, 400.0) if modality == "CT" else ((vmin + vmax) / 2, vmax - vmin)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series", series_number)
    base = _base_dataset(modality, seed, series_number, series_uid, study_uid, series_description,
                         patient_name, patient_id, study_description, geometry, float(rescale_slope),
                         float(rescale_intercept), window)
    normal = geometry.direction_matrix[:, 0]
    names_rng = np.random.default_rng([seed, series_number])
    paths: list[Path] = []
    for t in range(n_t):
        for k in range(n_z):
            instance = t * n_z + k + 1
            ds = Dataset()
            ds.update(base)
            sop_uid = _uid(seed, "sop", series_number, instance)
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            ds.AcquisitionNumber = t + 1
            if n_t > 1:
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = n_t
            ds.ImagePositionPatient = [_ds(v) for v in ipp[k]]
            ds.SliceLocation = _ds(float(ipp[k] @ normal))
            ds.set_pixel_data(np.ascontiguousarray(stored[t, k]), photometric_interpretation="MONOCHROME2",
                              bits_stored=16, generate_instance_uid=False)
            ds.SmallestImagePixelValue = int(stored[t, k].min())
            ds.LargestImagePixelValue = int(stored[t, k].max())
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
            ds.file_meta = meta
            if shuffle_names:
                name = f"{names_rng.integers(0, 2**63):016x}.dcm"
            else:
                name = f"{series_number:04d}_{instance:05d}.dcm"
            path = out / name
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
