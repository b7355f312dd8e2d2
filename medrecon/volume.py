"""Volume: a 3D image in a zarr v3 store with its geometry and provenance.

Layout of a volume store (a zarr v3 group, an OME-Zarr 0.5 image)::

    volume.zarr/
      zarr.json          attributes: {"ome": {multiscales, omero}, "medrecon": {...}}
      0/                 float32 array (z, y, x), chunks of whole slabs (cz, y, x), zstd: the full resolution
      1/, 2/, ...        pyramid levels, only when y or x exceeds 128: each halves y and x (2 x 2 mean), z kept,
                         until both are <= 128; medrecon itself only ever reads level ``0``
      std/               (reconstructions with several posterior samples) the posterior std, itself an
                         OME-Zarr image and a medrecon volume, listed in the parent's ``medrecon.images``

The ``ome`` block names the image after its subject and what it is (``ct01 reference``, ``ct01 dds``,
``ct01 dds posterior std``; see :func:`image_name`) and carries an ``omero`` channel window, so a viewer
(napari with napari-ome-zarr, OMERO, ...) opens it with a sensible contrast: CT volumes in Hounsfield units
get the report's CT window (``evaluate.ct_window``'s default), everything else (MR magnitudes, posterior
std) the 0.5..99.5 percentiles of a regular subsample of at most 65536 of its voxels (0..99.5 for a std).

Geometry convention (the one medrecon uses everywhere):

* ``spacing`` = ``(dz, dy, dx)`` in millimetres;
* ``origin`` = LPS patient coordinates ``(x, y, z)`` of the *centre* of voxel ``(0, 0, 0)``;
* ``direction`` = 3x3 matrix whose *columns* are the LPS unit vectors of the array axes ``z, y, x``:
  the LPS position of voxel ``(k, j, i)`` is ``origin + direction @ (spacing * (k, j, i))``.

OME-Zarr 0.5 only allows ``scale`` and ``translation``; we write ``scale = spacing`` and
``translation = direction.T @ origin`` (the origin's coordinate along each array axis), which is exact for
axis-aligned volumes; the full direction cosines live in the ``medrecon`` block.

Writes are atomic: data goes to a hidden temporary sibling and is renamed into place only after the last
slab and the attributes are written, with ``complete: true`` as the last attribute. A killed job leaves
only a temporary directory, never a store that :meth:`Volume.open` accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from medrecon.errors import InputError
from medrecon.provenance import config_hash, to_jsonable

FORMAT = "medrecon-volume/1"
ARRAY = "0"
_CHUNK_BYTES = 8 << 20  # target bytes per slab chunk: big enough for zstd, small enough to stream
_SAMPLE_MAX = 1 << 16   # voxels kept (at most) for the viewer's display window percentiles


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in patient space: spacing (dz, dy, dx) mm, LPS origin, direction cosines (columns z, y, x)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, ...], ...] = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        sp = tuple(float(s) for s in self.spacing)
        if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
            raise InputError(f"Voxel spacing must be three positive finite numbers (dz, dy, dx), got {sp}.")
        d = np.asarray(self.direction, dtype=float)
        if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise InputError(f"Direction cosines must be an orthonormal 3x3 matrix, got {d.tolist()}.")
        object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in d))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float)

    def affine(self) -> np.ndarray:
        """4x4 map from voxel index (k, j, i, 1) to LPS millimetres."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def index_to_lps(self, kji: np.ndarray) -> np.ndarray:
        """LPS coordinates of voxel indices ``(..., 3)`` in (k, j, i) order."""
        kji = np.asarray(kji, dtype=float)
        return kji @ self.affine()[:3, :3].T + np.asarray(self.origin)

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": [list(r) for r in self.direction]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(tuple(r) for r in d["direction"]))

    def isclose(self, other: Geometry, rtol: float = 1e-4, atol: float = 1e-3) -> bool:
        return (np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol)
                and np.allclose(self.origin, other.origin, rtol=rtol, atol=atol)
                and np.allclose(self.direction, other.direction, atol=1e-4))


def ome_attributes(geometry: Geometry, name: str = "", levels: int = 1,
                   omero: dict[str, Any] | None = None) -> dict[str, Any]:
    """OME-Zarr 0.5 ``ome`` attribute block for a (z, y, x) volume in millimetres.

    Level ``k`` (array path ``str(k)``) halves y and x ``k`` times: its voxel is ``2**k`` level-0 voxels wide
    in-plane, and its centre lies ``(2**k - 1) / 2`` level-0 voxels in from the level-0 origin.
    """
    translation = geometry.direction_matrix.T @ np.asarray(geometry.origin)
    spacing = np.asarray(geometry.spacing)
    datasets = []
    for k in range(levels):
        f = np.array([1.0, 2.0**k, 2.0**k])
        datasets.append({
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": (spacing * f).tolist()},
                {"type": "translation", "translation": (translation + (f - 1) / 2 * spacing).tolist()},
            ],
        })
    block: dict[str, Any] = {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [{"name": ax, "type": "space", "unit": "millimeter"} for ax in "zyx"],
            "datasets": datasets,
        }],
    }
    if omero is not None:
        block["omero"] = omero
    return block


PYRAMID_MAX = 128   # in-plane size at or below which no further pyramid level is written


def pyramid_shapes(shape: tuple[int, int, int], max_size: int = PYRAMID_MAX) -> list[tuple[int, int, int]]:
    """Shapes of the pyramid levels after level 0: y and x halved (floor) until both are <= ``max_size``."""
    out = []
    z, y, x = shape
    while max(y, x) > max_size and min(y, x) >= 2:
        y, x = y // 2, x // 2
        out.append((z, y, x))
    return out


def _halve(slab: np.ndarray) -> np.ndarray:
    """2 x 2 in-plane mean (a trailing odd row/column is dropped)."""
    _, y, x = slab.shape
    s = slab[:, : y // 2 * 2, : x // 2 * 2].astype(np.float32)
    return 0.25 * (s[:, 0::2, 0::2] + s[:, 1::2, 0::2] + s[:, 0::2, 1::2] + s[:, 1::2, 1::2])


def image_name(path: str | Path, meta: dict[str, Any]) -> str:
    """The OME-Zarr image name: subject and what the image is, from the workflow's layout and the metadata.

    ``<subject>/volume.zarr`` -> ``"<subject> ingested"``, ``<subject>/reference.zarr`` ->
    ``"<subject> reference"``, ``<subject>/recon/<method>.zarr`` -> ``"<subject> <method>"``, a posterior std
    -> ``"<subject> <method> posterior std"``; ``meta["name"]`` wins when given.
    """
    if meta.get("name"):
        return str(meta["name"])
    p = Path(path)
    kind = meta.get("kind")
    if kind == "posterior_std":
        p = p.parent                                 # <recon>.zarr/std: name it after the reconstruction
    stem = p.name.removesuffix(".zarr")
    method = meta.get("method")
    if method:
        subject = p.parent.parent.name if p.parent.name == "recon" else p.parent.name
        name = f"{subject} {method}".strip()
    elif stem == "volume":
        name = f"{p.parent.name} ingested".strip()
    else:
        name = f"{p.parent.name} {stem}".strip()
    return name + (" posterior std" if kind == "posterior_std" else "")


def _ct_display_window() -> tuple[float, float]:
    """The report's CT window (HU): the schema default of ``evaluate.ct_window``."""
    from medrecon.config import schema

    lo, hi = schema()["properties"]["evaluate"]["properties"]["ct_window"]["default"]
    return float(lo), float(hi)


def display_window(meta: dict[str, Any], sample: np.ndarray, value_range: tuple[float, float]
                   ) -> tuple[float, float]:
    """Viewer window: the CT window for HU images, else percentiles of ``sample`` (0..99.5 for a std)."""
    if meta.get("units") == "HU" and meta.get("kind") != "posterior_std":
        return _ct_display_window()
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return value_range
    lo = 0.0 if meta.get("kind") == "posterior_std" else float(np.percentile(finite, 0.5))
    hi = float(np.percentile(finite, 99.5))
    if not hi > lo:
        lo, hi = value_range
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def omero_attributes(name: str, window: tuple[float, float], value_range: tuple[float, float],
                     depth: int) -> dict[str, Any]:
    """The ``omero`` block: one grey channel with its display window (start..end) inside the data range."""
    vmin, vmax = (float(v) for v in value_range)
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        vmin, vmax = window
    start, end = (float(v) for v in window)
    return {
        "channels": [{
            "label": name, "color": "FFFFFF", "active": True, "coefficient": 1.0, "family": "linear",
            "inverted": False,
            "window": {"min": min(vmin, start), "max": max(vmax, end), "start": start, "end": end},
        }],
        "rdefs": {"model": "greyscale", "defaultZ": depth // 2, "defaultT": 0},
    }


def default_chunk_depth(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Slices per chunk: whole slabs of about 8 MiB (at least one slice, at most the depth)."""
    per_slice = int(np.prod(shape[1:])) * itemsize
    return int(max(1, min(shape[0], _CHUNK_BYTES // max(per_slice, 1))))


def _tmp_sibling(path: Path) -> Path:
    """This process's temporary sibling of ``path``; stale ones left by killed writers are removed first."""
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, replacing an existing ``final`` (never leaving neither)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_group(path: str | Path) -> Iterator[zarr.Group]:
    """A zarr v3 group written at a temporary sibling of ``path`` and renamed into place on success.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    try:
        yield group
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def create_slab_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any = "float32",
                      chunk_depth: int | None = None, dimension_names: tuple[str, ...] | None = None,
                      ) -> zarr.Array:
    """A zstd-compressed array chunked in whole slabs along axis 0 (the only chunking medrecon uses)."""
    shape = tuple(int(s) for s in shape)
    depth = chunk_depth or default_chunk_depth(shape, np.dtype(dtype).itemsize)
    return group.create_array(
        name=name, shape=shape, chunks=(min(depth, shape[0]), *shape[1:]), dtype=dtype,
        compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0, dimension_names=dimension_names,
    )


def slab_ranges(depth: int, slab: int, halo: int = 0) -> list[tuple[int, int, int, int]]:
    """Split ``range(depth)`` into slabs: ``(start, stop, lo, hi)`` = core range and range with halo."""
    if slab <= 0:
        raise ValueError("slab size must be positive")
    out = []
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        out.append((start, stop, max(0, start - halo), min(depth, stop + halo)))
    return out


@dataclass
class VolumeWriter:
    """Writes a volume slab by slab into a temporary store; :meth:`commit` renames it into place."""

    path: Path
    shape: tuple[int, int, int]
    geometry: Geometry
    meta: dict[str, Any]
    chunk_depth: int
    allow_nonfinite: bool = False
    name: str | None = None             # the OME-Zarr image name (default: :func:`image_name` of the path)
    _group: zarr.Group | None = None
    _array: zarr.Array | None = None
    _tmp: Path | None = None
    _written: np.ndarray | None = None
    _vmin: float = field(default=np.inf)
    _vmax: float = field(default=-np.inf)
    _sample: list[np.ndarray] = field(default_factory=list)
    _sample_step: int = 1
    _children: list[dict[str, Any]] = field(default_factory=list)

    def _keep_sample(self, data: np.ndarray) -> None:
        """Keep every ``step``-th voxel for the display window; past ``_SAMPLE_MAX`` values the kept sample is
        thinned by 2 and the step doubled, so its memory stays bounded whatever the volume's size."""
        self._sample.append(data.ravel()[:: self._sample_step].copy())
        if sum(a.size for a in self._sample) > _SAMPLE_MAX:
            self._sample = [np.concatenate(self._sample)[::2]]
            self._sample_step *= 2

    def open(self) -> VolumeWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_sibling(self.path)
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._group = zarr.open_group(store=str(self._tmp), mode="w", zarr_format=3)
        self._array = create_slab_array(self._group, ARRAY, self.shape, "float32", self.chunk_depth,
                                        dimension_names=("z", "y", "x"))
        self._written = np.zeros(self.shape[0], dtype=bool)
        return self

    def write_slab(self, z0: int, data: np.ndarray) -> None:
        """Write slices ``z0 .. z0+len(data)``; aligned with chunks this touches each chunk once."""
        if self._array is None:
            raise RuntimeError("VolumeWriter used outside its context")
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.shape[1:] != self.shape[1:] or z0 < 0 or z0 + data.shape[0] > self.shape[0]:
            raise ValueError(f"slab of shape {data.shape} at z={z0} does not fit volume {self.shape}")
        finite = np.isfinite(data)
        if not finite.all() and not self.allow_nonfinite:
            bad = int((~finite).sum())
            raise InputError(f"{bad} NaN/Inf voxels in slices {z0}..{z0 + data.shape[0] - 1} of {self.path}.",
                             fix="check the input data or the reconstruction settings that produced it.")
        if finite.any():
            self._vmin = min(self._vmin, float(data[finite].min()))
            self._vmax = max(self._vmax, float(data[finite].max()))
        self._array[z0:z0 + data.shape[0]] = data
        self._written[z0:z0 + data.shape[0]] = True
        self._keep_sample(data)

    def write(self, data: np.ndarray) -> None:
        """Write a whole in-memory volume chunk by chunk."""
        for start in range(0, self.shape[0], self.chunk_depth):
            self.write_slab(start, data[start:start + self.chunk_depth])

    def child(self, name: str, meta: dict[str, Any] | None = None) -> VolumeWriter:
        """A volume nested inside this one (e.g. the posterior std next to the mean), committed with it.

        Commit the child before the parent; it lives at ``<parent>/<name>`` once the parent is renamed.
        """
        if self._tmp is None:
            raise RuntimeError("VolumeWriter used outside its context")
        meta = dict(meta or {})
        label = image_name(self.path / name, meta)      # named after the final path, not the temporary one
        self._children.append({"path": name, "kind": meta.get("kind"), "name": label})
        return VolumeWriter(self._tmp / name, self.shape, self.geometry, meta, self.chunk_depth,
                            self.allow_nonfinite, name=label).open()

    def _write_pyramid(self) -> int:
        """Levels 1.. of the multiscale pyramid from level 0, one chunk of slices at a time; the level count."""
        shapes = pyramid_shapes(self.shape)
        arrays = [create_slab_array(self._group, str(k + 1), shp, "float32", self.chunk_depth,
                                    dimension_names=("z", "y", "x")) for k, shp in enumerate(shapes)]
        for z0, z1, _lo, _hi in slab_ranges(self.shape[0], self.chunk_depth):
            level = np.asarray(self._array[z0:z1], dtype=np.float32)
            for arr in arrays:
                level = _halve(level)
                arr[z0:z1] = level
        return 1 + len(shapes)

    def commit(self) -> Volume:
        if not self._written.all():
            missing = np.flatnonzero(~self._written)
            raise RuntimeError(f"volume {self.path}: slices {missing[:10].tolist()}... were never written")
        levels = self._write_pyramid()
        block = dict(self.meta)
        block.update({"format": FORMAT, "geometry": self.geometry.to_dict(),
                      "value_range": [self._vmin, self._vmax]})
        block.pop("images", None)             # describes this store's own nested images, never a source's
        if self._children:
            block["images"] = list(self._children)
        name = self.name or image_name(self.path, self.meta)
        sample = np.concatenate(self._sample) if self._sample else np.zeros(0, np.float32)
        window = display_window(self.meta, sample, (self._vmin, self._vmax))
        omero = omero_attributes(name, window, (self._vmin, self._vmax), self.shape[0])
        self._group.attrs.update({"ome": ome_attributes(self.geometry, name, levels, omero),
                                  "medrecon": to_jsonable(block)})
        # The completion flag goes last: a store without it is unfinished by definition.
        self._group.attrs["medrecon"] = {**self._group.attrs["medrecon"], "complete": True}
        self._sample = []
        replace_dir(self._tmp, self.path)
        return Volume.open(self.path)

    def abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> VolumeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def open_finished_group(path: Path, fmt: str, what: str, producer: str) -> zarr.Group:
    """Open a finished medrecon zarr group of format ``fmt`` read-only, or raise an InputError saying why not.

    Shared by volumes and measurements: unreadable, foreign and unfinished (interrupted) stores are refused.
    """
    try:
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
        block = group.attrs.get("medrecon")
    except Exception as err:  # zarr raises several types for a broken store
        raise InputError(f"{path} is not a readable zarr v3 store ({err}).",
                         fix=f"delete it and re-run {producer}.") from err
    if not block or block.get("format") != fmt:
        raise InputError(f"{path} is not a medrecon {what} (no '{fmt}' attributes).",
                         fix=f"point at a store written by {producer}.")
    if not block.get("complete"):
        raise InputError(f"{path} is incomplete (a job was interrupted while writing it).",
                         fix=f"delete it and re-run {producer}.")
    return group


class Volume:
    """A finished volume store: lazy zarr array (z, y, x) + geometry + the ``medrecon`` attribute block."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.array: zarr.Array = group[ARRAY]
        self.meta: dict[str, Any] = dict(group.attrs["medrecon"])
        self.geometry = Geometry.from_dict(self.meta["geometry"])

    @classmethod
    def open(cls, path: str | Path) -> Volume:
        """Open a complete volume; a missing, unfinished or foreign store is an :class:`InputError`."""
        p = Path(path)
        if not p.exists():
            raise InputError(f"Volume store {p} does not exist.", fix="run the step that creates it first "
                             "(e.g. `medrecon ingest`).")
        group = open_finished_group(p, FORMAT, "volume", "the step that writes it")
        if ARRAY not in group:
            raise InputError(f"{p} is not a medrecon volume (no array '{ARRAY}').",
                             fix="point at a store written by medrecon.")
        return cls(p, group)

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, int, int], geometry: Geometry,
               meta: dict[str, Any] | None = None, chunk_depth: int | None = None,
               allow_nonfinite: bool = False) -> VolumeWriter:
        """Start writing a volume; use as a context manager (commit on success, clean up on error)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume shape must be (z, y, x) with positive sizes, got {shape}")
        depth = chunk_depth or default_chunk_depth(shape)
        return VolumeWriter(Path(path), shape, geometry, dict(meta or {}), depth, allow_nonfinite).open()

    @classmethod
    def from_array(cls, path: str | Path, data: np.ndarray, geometry: Geometry,
                   meta: dict[str, Any] | None = None, chunk_depth: int | None = None) -> Volume:
        """Write an in-memory array as a volume (for small volumes and tests)."""
        with cls.create(path, data.shape, geometry, meta, chunk_depth) as w:
            w.write(data)
        return cls.open(path)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def chunk_depth(self) -> int:
        return int(self.array.chunks[0])

    @property
    def modality(self) -> str | None:
        return self.meta.get("modality")

    def read(self) -> np.ndarray:
        """The whole volume in memory (float32)."""
        return np.asarray(self.array[...], dtype=np.float32)

    def read_slab(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 .. z1-1`` (float32)."""
        return np.asarray(self.array[z0:z1], dtype=np.float32)

    def iter_slabs(self, slab: int | None = None, halo: int = 0
                   ) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
        """Yield ``((start, stop, lo, hi), data[lo:hi])`` slab by slab; memory is one slab, not the volume."""
        for rng in slab_ranges(self.shape[0], slab or self.chunk_depth, halo):
            yield rng, self.read_slab(rng[2], rng[3])

    def posterior_std(self) -> Volume | None:
        """The posterior std stored with this reconstruction (the image listed with kind ``posterior_std`` in
        ``medrecon.images``; stores written before that list existed: a nested ``std``), or None."""
        listed = [im["path"] for im in self.meta.get("images", []) if im.get("kind") == "posterior_std"]
        for name in listed or ["std"]:
            if (self.path / name).exists():
                return Volume.open(self.path / name)
        return None

    def info(self) -> dict[str, Any]:
        """Metadata summary for ``medrecon info``."""
        return {"path": str(self.path), "shape": list(self.shape), "dtype": str(self.array.dtype),
                "chunks": list(self.array.chunks), **self.meta}


def volume_fingerprint(vol: Volume) -> str:
    """Identity of a volume's content: the hash of its attributes without provenance (source file hashes,
    geometry, value range, phantom parameters), so a copied store matches and a re-made one with the same
    content too, while a measurement checked against another volume of the same grid does not."""
    return config_hash({k: v for k, v in vol.meta.items() if k != "provenance"})
