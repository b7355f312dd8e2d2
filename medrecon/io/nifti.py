"""NIfTI-1/2 ingest (nibabel) into medrecon's (z, y, x) LPS convention, and NIfTI export.

Canonical orientation. A NIfTI affine maps voxel ``(i, j, k)`` to RAS millimetres; medrecon keeps LPS and
arrays ``(z, y, x)``. Every file is reoriented, by flipping and permuting voxel axes only (no
interpolation), to the voxel order closest to nibabel axcodes ``("L", "P", "S")``: the array's x axis
points to the patient's Left, y to Posterior, z to Superior, like an axial DICOM series in LPS. Then the
array is the reoriented NIfTI array transposed to ``(k, j, i)``. Two files of the same image stored in
different orientations (RAS, LAS, sagittal, flipped...) therefore give the *same* array and geometry; an
oblique acquisition keeps its residual rotation (under 45 degrees per axis) in ``Geometry.direction``.

* spacing, direction and origin come from the affine nibabel selects (sform if coded, else qform);
  with neither, the file has no orientation: it is still read (as nibabel does) with a warning, and the
  choice is recorded in ``meta['nifti']['affine_source'] == 'none'``;
* ``xyzt_units`` metres and microns are converted to millimetres; ``unknown`` is taken as millimetres
  (the NIfTI default) and recorded;
* ``scl_slope``/``scl_inter`` are applied (nibabel's scaled ``dataobj``); byte order is nibabel's business;
* 4D files are one volume per time point (``on_4d="split"``) or an error; trailing singleton dimensions
  are dropped; more than one non-singleton dimension beyond the fourth is an error;
* NaN/Inf voxels, unreadable files and sheared affines are :class:`InputError` naming the file.

Memory: ingest holds one slab. Uncompressed ``.nii`` files are read slab by slab through nibabel's
``dataobj`` slicing (only the slices a slab needs are read, whichever file axis is superior). A gzipped file
cannot be seeked without decompressing from the start, so ingest first decompresses it, streamed, into a
hidden temporary ``.nii`` beside the output and reads that slab by slab (disk: the uncompressed size while
the ingest runs; measured for 256 x 256 x 256 float32: peak RSS 197 MB reading the .nii.gz whole, 102 MB
for the .nii). :func:`read_nifti` is the in-memory reader (whole time points) for small files and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from medrecon.budget import check_ingest_budget
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import file_sha256, provenance
from medrecon.volume import Geometry, Volume, slab_ranges

log = logging.getLogger("medrecon.io.nifti")

CANONICAL_AXCODES = ("L", "P", "S")  # voxel axes (i, j, k) = medrecon array axes (x, y, z)
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}
_AFFINE_SOURCES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


@dataclass
class NiftiSource:
    """An opened NIfTI file: its canonical (z, y, x) geometry and a reader of (time point, slab) blocks."""

    path: Path
    image: Any
    transform: np.ndarray  # nibabel orientation transform from file axes to canonical (i, j, k)
    shape: tuple[int, int, int]  # canonical (z, y, x)
    n_timepoints: int
    geometry: Geometry
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def streamable(self) -> bool:
        """Slab reads only touch the slab's bytes (uncompressed file); gzip must be decompressed in full."""
        return not self.path.name.lower().endswith(".gz")

    def _file_block(self, timepoint: int, z0: int, z1: int) -> np.ndarray:
        """Scaled float32 file-order block holding canonical slices ``z0 .. z1-1`` (3D, file axes i, j, k)."""
        hdr_shape = self.image.shape
        file_axis = int(np.flatnonzero(self.transform[:, 0] == 2)[0])
        n = self.shape[0]
        lo, hi = (z0, z1) if self.transform[file_axis, 1] > 0 else (n - z1, n - z0)
        slicer: list[Any] = [slice(None)] * len(hdr_shape)
        if len(hdr_shape) >= 3:
            slicer[file_axis] = slice(lo, hi)
        if len(hdr_shape) >= 4:
            slicer[3] = timepoint
            slicer[4:] = [0] * (len(hdr_shape) - 4)
        try:
            block = np.asarray(self.image.dataobj[tuple(slicer)], dtype=np.float32)
        except Exception as err:  # truncated data, bad offsets, zlib errors: all mean a broken file
            raise InputError(
                f"Could not read the voxel data of {self.path} ({type(err).__name__}: {err}).",
                fix="the file is truncated or corrupt; re-export or re-download it.",
            ) from err
        if block.ndim == 2:  # a 2D image is one slice
            block = block[:, :, None][:, :, lo:hi]
        return block

    def read_slab(self, timepoint: int, z0: int, z1: int) -> np.ndarray:
        """Canonical slices ``z0 .. z1-1`` of one time point, (z, y, x) float32; NaN/Inf is an error."""
        block = ornt.apply_orientation(self._file_block(timepoint, z0, z1), self.transform)
        slab = np.ascontiguousarray(block.transpose(2, 1, 0), dtype=np.float32)
        finite = np.isfinite(slab)
        if not finite.all():
            where = f" at time point {timepoint}" if self.n_timepoints > 1 else ""
            raise InputError(
                f"{self.path} has {int((~finite).sum())} NaN/Inf voxels{where} (slices {z0}..{z1 - 1}).",
                fix="fix or mask the image before ingest (NaN has no meaning for a reconstruction).",
            )
        return slab

    def read(self, timepoint: int = 0) -> np.ndarray:
        """One whole time point, (z, y, x) float32."""
        return self.read_slab(timepoint, 0, self.shape[0])


def _fail(path: Path, problem: str, fix: str) -> InputError:
    return InputError(f"{path}: {problem}", path=path, fix=fix)


def open_nifti(path: str | Path) -> NiftiSource:
    """Open a NIfTI file and work out its canonical geometry; reads the header only."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"NIfTI file {path} does not exist.", fix="check the subject's 'input' path.")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, EOFError, zlib errors...
        raise InputError(
            f"{path} is not a readable NIfTI file ({type(err).__name__}: {err}).",
            fix="check that the file is a complete .nii/.nii.gz (re-export or re-download it).",
        ) from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise _fail(
            path,
            f"nibabel reads it as {type(image).__name__}, not NIfTI.",
            "convert it to NIfTI (.nii/.nii.gz) first.",
        )
    header = image.header
    dims = tuple(int(d) for d in image.shape)
    if len(dims) < 2:
        raise _fail(path, f"image has shape {dims}; medrecon needs 3D (or 4D) images.", "give a 3D image.")
    extra = dims[4:]
    if any(d != 1 for d in extra):
        raise _fail(
            path,
            f"image has shape {dims}: {len(dims)}D data (vector/tensor/multi-echo) is not supported.",
            "extract one 3D or 4D component first (e.g. with nibabel or fslroi).",
        )
    n_t = dims[3] if len(dims) >= 4 else 1
    shape_ijk = (*dims, 1) if len(dims) == 2 else dims[:3]
    if min(shape_ijk) < 1 or n_t < 1:
        raise _fail(path, f"image has an empty dimension (shape {dims}).", "give a non-empty image.")

    space_unit, _time_unit = header.get_xyzt_units()
    factor = _UNIT_TO_MM.get(space_unit, 1.0)
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    source = "sform" if sform_code > 0 else "qform" if qform_code > 0 else "none"
    if source == "none":
        warnings.warn(
            f"{path} has no sform/qform: its orientation is unknown; using voxel sizes only "
            "(RAS-aligned, as nibabel does).",
            stacklevel=2,
        )
    affine = np.array(image.affine, dtype=float)
    affine[:3, :] *= factor
    if not np.all(np.isfinite(affine)):
        raise _fail(path, "the affine has NaN/Inf entries.", "repair the header's sform/qform.")
    try:
        file_ornt = ornt.io_orientation(affine)
    except Exception as err:
        raise _fail(
            path,
            f"the affine {affine.tolist()} does not map voxels to space ({err}).",
            "repair the header's sform/qform.",
        ) from err
    if np.isnan(file_ornt).any():
        raise _fail(
            path,
            f"the affine {affine[:3, :3].tolist()} has a zero or degenerate column.",
            "repair the header's sform/qform (voxel sizes must be positive).",
        )
    transform = ornt.ornt_transform(file_ornt, ornt.axcodes2ornt(CANONICAL_AXCODES))
    canon_affine = affine @ ornt.inv_ornt_aff(transform, shape_ijk)
    canon_ijk = [0, 0, 0]
    for n, (axis, _flip) in enumerate(transform):
        canon_ijk[int(axis)] = shape_ijk[n]
    cols = canon_affine[:3, :3]
    sizes = np.linalg.norm(cols, axis=0)
    dirs = _LPS_FROM_RAS @ (cols / sizes)
    try:
        geometry = Geometry(
            spacing=(sizes[2], sizes[1], sizes[0]),
            origin=tuple(_LPS_FROM_RAS @ canon_affine[:3, 3]),
            direction=tuple(map(tuple, dirs[:, [2, 1, 0]])),
        )
    except InputError as err:
        raise _fail(
            path,
            f"its affine is not a rotation times voxel sizes ({err}); sheared grids are not supported.",
            "resample it to an orthogonal grid first (e.g. nibabel.processing.resample_to_output).",
        ) from err
    facts = {
        "orientation_in_file": "".join(ornt.aff2axcodes(affine)),
        "shape_in_file": list(dims),
        "affine_source": source,
        "sform_code": _AFFINE_SOURCES.get(sform_code, str(sform_code)),
        "qform_code": _AFFINE_SOURCES.get(qform_code, str(qform_code)),
        "spatial_unit_in_file": space_unit,
        "dtype_in_file": str(header.get_data_dtype()),
        "byte_order": "big" if header.endianness == ">" else "little",
        # nibabel moves scl_slope/scl_inter from the header into the data proxy on load
        "scl_slope": _float_or_none(getattr(image.dataobj, "slope", 1.0)),
        "scl_inter": _float_or_none(getattr(image.dataobj, "inter", 0.0)),
        "description": header["descrip"].tobytes().split(b"\0")[0].decode("latin-1").strip(),
    }
    return NiftiSource(
        path=path,
        image=image,
        transform=transform,
        shape=(canon_ijk[2], canon_ijk[1], canon_ijk[0]),
        n_timepoints=n_t,
        geometry=geometry,
        facts=facts,
    )


def _float_or_none(value: Any) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


def _timepoints(src: NiftiSource, on_4d: str, timepoint: int | None) -> list[int]:
    if on_4d not in ("error", "split"):
        raise ConfigError(f"ingest.on_4d must be 'error' or 'split', got {on_4d!r}.", fix="fix the config.")
    if src.n_timepoints == 1:
        if timepoint not in (None, 0):
            raise _fail(
                src.path, f"timepoint {timepoint} requested but the image is 3D.", "remove `timepoint`."
            )
        return [0]
    if on_4d == "error":
        raise _fail(
            src.path,
            f"image is 4D with {src.n_timepoints} time points (shape {src.facts['shape_in_file']}).",
            "set `ingest.on_4d: split` to get one volume per time point (with the subject's `timepoint`, "
            "or a directory output for all of them), or give a 3D file.",
        )
    if timepoint is None:
        return list(range(src.n_timepoints))
    if not 0 <= timepoint < src.n_timepoints:
        raise _fail(
            src.path,
            f"timepoint {timepoint} requested but the image has time points 0..{src.n_timepoints - 1}.",
            "pick one of those time points.",
        )
    return [timepoint]


def _meta(src: NiftiSource, timepoint: int, modality: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    modality = modality.upper() if modality else "unknown"
    meta: dict[str, Any] = {
        "modality": modality,
        "units": {"CT": "HU", "MR": "arbitrary"}.get(modality, "unknown"),
        "source": {"format": "nifti", "files": [{"path": str(src.path), "sha256": file_sha256(src.path)}]},
        "nifti": dict(src.facts),
        "timepoint": timepoint if src.n_timepoints > 1 else None,
        "n_timepoints": src.n_timepoints,
    }
    extra = {k: v for k, v in extra.items() if k != "modality"}
    if "provenance" not in extra:
        meta["provenance"] = provenance({"ingest": {"format": "nifti"}}, seeds={})
    meta.update(extra)
    return meta


def read_nifti(
    path: str | Path, on_4d: str = "error", modality: str | None = None
) -> list[tuple[np.ndarray, Geometry, dict[str, Any]]]:
    """Read a NIfTI file into memory: one ``(array (z, y, x) float32, Geometry, meta)`` per volume.

    A 3D file gives one entry; a 4D file one per time point with ``on_4d="split"``, else an InputError.
    """
    src = open_nifti(path)
    return [(src.read(t), src.geometry, _meta(src, t, modality, {})) for t in _timepoints(src, on_4d, None)]


@contextlib.contextmanager
def _seekable(src: NiftiSource, workdir: Path) -> Iterator[NiftiSource]:
    """``src`` itself when uncompressed; for ``.nii.gz`` the same source read from a temporary ``.nii``.

    The copy lives in ``workdir`` (hidden, per process) and is removed on exit, also after an error.
    Messages and provenance keep naming the original file (``path`` is unchanged).
    """
    if src.streamable:
        yield src
        return
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".{nifti_stem(src.path)}.{os.getpid()}.nii"
    try:
        try:
            with gzip.open(src.path, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(
                f"Could not decompress {src.path} ({type(err).__name__}: {err}).",
                fix="the file is truncated or corrupt; re-export or re-download it.",
            ) from err
        yield dataclasses.replace(src, image=nib.load(str(tmp)))
    finally:
        tmp.unlink(missing_ok=True)


def _write(
    src: NiftiSource, timepoint: int, out: Path, meta: dict[str, Any], chunk_depth: int | None
) -> Path:
    """Write one time point slab by slab (``src`` must be seekable, see :func:`_seekable`)."""
    with Volume.create(out, src.shape, src.geometry, meta, chunk_depth) as w:
        for z0, z1, _lo, _hi in slab_ranges(src.shape[0], w.chunk_depth):
            w.write_slab(z0, src.read_slab(timepoint, z0, z1))
    return out


def ingest_nifti(
    src: str | Path,
    out: str | Path,
    on_4d: str = "error",
    timepoint: int | None = None,
    meta_extra: dict[str, Any] | None = None,
    chunk_depth: int | None = None,
    memory_mb: float | None = None,
) -> list[Path]:
    """Ingest a NIfTI file into medrecon Volume(s); returns the stores written.

    ``out`` ending in ``.zarr`` is exactly one volume (a 4D file then needs ``timepoint``); otherwise ``out``
    is a directory receiving ``<stem>.zarr`` (3D) or ``<stem>_t<k>.zarr`` per time point. ``meta_extra`` may
    carry ``modality`` ("CT"/"MR", sets ``units``) and a ``provenance`` block. Nothing is left at ``out``
    when the ingest fails. ``memory_mb`` (config ``memory_mb``) refuses, before any voxel is read, a file
    whose working set would not fit (:func:`medrecon.budget.check_ingest_budget`).
    """
    source = open_nifti(src)
    f = source.facts
    log.info("NIfTI %s: shape in file %s, orientation in file %s (affine from %s), %d time point(s)%s",
             source.path, f["shape_in_file"], f["orientation_in_file"], f["affine_source"], source.n_timepoints,
             f", description '{f['description']}'" if f.get("description") else "")
    check_ingest_budget(source.path, source.shape, memory_mb, whole_volume=not source.streamable)
    out = Path(out)
    extra = dict(meta_extra or {})
    modality = extra.get("modality")
    points = _timepoints(source, on_4d, timepoint)
    if out.name.endswith(".zarr"):
        if len(points) > 1:
            raise _fail(
                source.path,
                f"image has {len(points)} time points but {out} is one volume.",
                f"pass `timepoint` (0..{len(points) - 1}) or give a directory as output.",
            )
        with _seekable(source, out.parent) as seekable:
            return [_write(seekable, points[0], out, _meta(source, points[0], modality, extra), chunk_depth)]
    stem = nifti_stem(source.path)
    names = [f"{stem}_t{t}.zarr" if source.n_timepoints > 1 else f"{stem}.zarr" for t in points]
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _seekable(source, staging) as seekable:
            for t, name in zip(points, names, strict=True):
                _write(seekable, t, staging / name, _meta(source, t, modality, extra), chunk_depth)
        out.mkdir(parents=True, exist_ok=True)
        finals = []
        for name in names:
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
            finals.append(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return finals


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """The NIfTI (RAS) affine of a medrecon geometry, for voxel axes (i, j, k) = array axes (x, y, z)."""
    a = np.eye(4)
    lin = geometry.direction_matrix * np.asarray(geometry.spacing)[None, :]  # columns z, y, x (LPS)
    a[:3, :3] = _LPS_FROM_RAS @ lin[:, [2, 1, 0]]
    a[:3, 3] = _LPS_FROM_RAS @ np.asarray(geometry.origin)
    return a


def write_nifti(
    path: str | Path,
    data: np.ndarray,
    geometry: Geometry,
    dtype: Any = np.float32,
    description: str = "medrecon",
) -> Path:
    """Write a (z, y, x) array as NIfTI-1 (sform and qform = scanner, millimetres): exports and tests."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"write_nifti expects a (z, y, x) array, got shape {data.shape}")
    image = nib.Nifti1Image(np.asarray(data.transpose(2, 1, 0), dtype=dtype), nifti_affine(geometry))
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description[:79].encode()
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
