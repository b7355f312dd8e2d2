"""Measurement store: the data ``y`` plus everything needed to rebuild its forward operator.

Layout (zarr v3 group, written atomically like a Volume)::

    measurement.zarr/
      zarr.json        attributes {"medrecon": {format, modality, operator: {kind, params}, noise, seeds,
                                                image_geometry, image_shape, units, provenance, complete}}
      y/               the data in the operator's output layout: per-slice operators put slices first —
                       float32 sinogram (z, views, detectors), complex64 k-space (z, coils, ky, kx) or
                       trajectory samples (z, coils, n); 3D operators their own shape (cone beam
                       (rows, views, columns) as ASTRA, 3D k-space (coils, kz, ky, kx)); chunked along axis 0
      operator/<name>  arrays of the operator's state (masks, coil maps, trajectories, density weights)

A reconstruction needs nothing else: :meth:`Measurement.operator` rebuilds the operator through the
registry in :mod:`medrecon.physics.operator`. Measured (not simulated) data in these layouts are accepted
the same way: write them with :func:`write_measurement`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from medrecon.errors import InputError, MedreconError
from medrecon.physics.operator import LinearOperator, operator_from_state
from medrecon.provenance import to_jsonable
from medrecon.volume import Geometry, atomic_group, create_slab_array, default_chunk_depth, open_finished_group

FORMAT = "medrecon-measurement/1"


@dataclass
class MeasurementWriter:
    """Streams ``y`` slab by slab into an atomic group (see :func:`write_measurement` for one-shot use)."""

    group: zarr.Group
    y: zarr.Array

    def write_slab(self, z0: int, data: np.ndarray) -> None:
        data = np.asarray(data, dtype=self.y.dtype)
        if not np.isfinite(data).all():
            raise InputError(f"NaN/Inf in simulated measurement slices {z0}..{z0 + len(data) - 1}.",
                             fix="check the input volume for NaN/Inf and the noise settings.")
        self.y[z0:z0 + data.shape[0]] = data


def _save_state(group: zarr.Group, kind: str, params: dict, arrays: dict[str, np.ndarray]) -> None:
    ops = group.create_group("operator")
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 0:
            raise ValueError(f"operator array {name!r} must have at least one dimension")
        create_slab_array(ops, name, arr.shape, arr.dtype)[...] = arr


def aligned_chunk_depth(y_shape: tuple[int, ...], itemsize: int, slab: int) -> int:
    """Chunk depth of ``y`` for a writer that writes ``slab`` slices at a time.

    At most the default (~8 MiB chunks) and a divisor of ``slab`` (or ``slab`` itself), so that every
    write covers whole chunks: a chunk straddling two slabs would be decoded, merged and re-encoded
    (slower, and for CT sinograms, whose default chunks hold ~100 slices, ~3 chunks of extra memory).
    """
    depth = default_chunk_depth(y_shape, itemsize)
    if depth >= slab:
        return max(1, slab)
    return max(d for d in range(1, depth + 1) if slab % d == 0)


@contextlib.contextmanager
def measurement_writer(path: str | Path, y_shape: tuple[int, ...], y_dtype: Any, operator: LinearOperator,
                       meta: dict[str, Any], slab: int | None = None) -> Iterator[MeasurementWriter]:
    """Write a measurement slab by slab: ``with measurement_writer(...) as w: w.write_slab(z0, data)``.

    ``slab``: how many slices each ``write_slab`` gets (chunks are aligned to it, see
    :func:`aligned_chunk_depth`); None for the default chunking. The store appears at ``path`` only when
    the block finishes without an exception.
    """
    y_shape = tuple(int(s) for s in y_shape)
    y_dtype = np.dtype(y_dtype)
    depth = (default_chunk_depth(y_shape, y_dtype.itemsize) if slab is None
             else aligned_chunk_depth(y_shape, y_dtype.itemsize, slab))
    with atomic_group(path) as group:
        params, arrays = operator.state()
        _save_state(group, operator.kind, params, arrays)
        y = create_slab_array(group, "y", y_shape, y_dtype, depth)
        block = dict(meta)
        block.update({"format": FORMAT, "operator": {"kind": operator.kind, "params": params},
                      "y_shape": list(y_shape), "y_dtype": str(y_dtype)})
        group.attrs["medrecon"] = to_jsonable(block)
        yield MeasurementWriter(group, y)
        group.attrs["medrecon"] = {**group.attrs["medrecon"], "complete": True}


def write_measurement(path: str | Path, y: np.ndarray, operator: LinearOperator, meta: dict[str, Any]) -> None:
    """Write a whole in-memory measurement (measured data, or small simulations)."""
    with measurement_writer(path, y.shape, y.dtype, operator, meta) as w:
        depth = w.y.chunks[0]
        for z0 in range(0, y.shape[0], depth):
            w.write_slab(z0, y[z0:z0 + depth])


class Measurement:
    """A finished measurement store."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path, self.group = path, group
        self.meta: dict[str, Any] = dict(group.attrs["medrecon"])
        self.y: zarr.Array = group["y"]

    @classmethod
    def open(cls, path: str | Path) -> Measurement:
        p = Path(path)
        if not p.exists():
            raise InputError(f"Measurement store {p} does not exist.", fix="run `medrecon measure` first.")
        group = open_finished_group(p, FORMAT, "measurement", "`medrecon measure`")
        return cls(p, group)

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def image_geometry(self) -> Geometry:
        return Geometry.from_dict(self.meta["image_geometry"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    def operator_arrays(self) -> dict[str, np.ndarray]:
        ops = self.group["operator"]
        return {name: np.asarray(arr[...]) for name, arr in ops.arrays()}

    def operator(self, device: torch.device | str = "cpu") -> LinearOperator:
        """Rebuild the forward operator saved with the data, checked against the data and image shapes."""
        op = self.meta["operator"]
        _register_all()
        try:
            rebuilt = operator_from_state(op["kind"], op["params"], self.operator_arrays(), device=device)
        except MedreconError as err:  # e.g. a cone-beam (GPU-only) measurement opened on a CPU machine
            raise type(err)(f"Cannot rebuild the {op['kind']} operator of measurement {self.path}: {err.message}",
                            path=self.path, fix=err.fix) from err
        self._check_geometry(rebuilt)
        return rebuilt

    def _check_geometry(self, op: LinearOperator) -> None:
        """The stored data, image shape and voxel spacing must be the ones the operator maps between.

        Per-slice operators map one ``(Y, X)`` slice and the data carries slices first; 3D operators map the
        whole volume. Measured data written by hand can disagree, and would otherwise fail deep inside a
        method (or, for a wrong pixel size, silently give wrong intensities).
        """
        image, y_shape = self.image_shape, tuple(self.y.shape)
        per_slice = len(op.in_shape) == 2
        want_image = tuple(image[1:]) if per_slice else tuple(image)
        want_y = (image[0], *op.out_shape) if per_slice else tuple(op.out_shape)
        problems = []
        if tuple(op.in_shape) != want_image:
            problems.append(f"its operator maps images of shape {tuple(op.in_shape)}, but the image is {image}")
        if y_shape != want_y:
            problems.append(f"the data have shape {y_shape}, but the operator gives {want_y}")
        spacing = getattr(getattr(op, "geometry", None), "spacing", None)
        if spacing is not None:
            image_spacing = self.image_geometry.spacing[-len(spacing):]
            if not np.allclose(spacing, image_spacing, rtol=1e-4):
                problems.append(f"its operator has pixel spacing {tuple(spacing)} mm, but the image has "
                                f"{tuple(image_spacing)} mm")
        if problems:
            raise InputError(f"Measurement {self.path} is inconsistent: " + "; ".join(problems) + ".",
                             path=self.path, fix="re-run `medrecon measure` on the volume (or write measured data "
                                                 "with the geometry of the image it belongs to).")

    def read(self) -> np.ndarray:
        return np.asarray(self.y[...])

    def read_slab(self, z0: int, z1: int) -> np.ndarray:
        return np.asarray(self.y[z0:z1])

    def iter_slabs(self, slab: int) -> Iterator[tuple[int, int, np.ndarray]]:
        for z0 in range(0, self.y.shape[0], slab):
            z1 = min(z0 + slab, self.y.shape[0])
            yield z0, z1, self.read_slab(z0, z1)


def _register_all() -> None:
    """Import the operator modules so their classes are in the registry."""
    import medrecon.physics.ct
    import medrecon.physics.mri  # noqa: F401
