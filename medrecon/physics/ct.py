"""CT forward models with ASTRA: parallel- and fan-beam per slice, cone-beam in 3D, and HU <-> attenuation.

Units. Images are linear attenuation coefficients ``mu`` in 1/mm (:func:`hu_to_mu`), pixels are in mm,
and ASTRA is given its volume window and detector spacing in mm, so a projection is a dimensionless line
integral ``p = integral of mu dl`` (the analytic disk test checks this with 0.5 mm pixels).

Geometry (:class:`CTGeometry` in :mod:`medrecon.physics.ct_geometry`, JSON-able,
stored with every measurement). The image ``(Y, X)`` is centred
on the rotation axis. Angles are ASTRA's: at angle ``theta`` the source sits in direction
``(sin theta, -cos theta)`` of ASTRA's 2D frame, whose ``y`` axis points to image row 0. Detector bins
are centred on the central ray. Fan and cone beams have a flat detector; ``detector_spacing`` is measured
on the detector (at the isocentre a bin covers ``detector_spacing / magnification``).

Per-slice operators (:class:`ParallelBeamCT` "ct-parallel", :class:`FanBeamCT` "ct-fan") map
``(..., Y, X) -> (..., views, detectors)``; leading dimensions are slices and are projected together.

* CPU, ``backend="matrix"`` (the default when it fits ``matrix_budget_mb``): ASTRA's 2D projection
  matrix (``astra.projector.matrix`` -> ``astra.matrix.get``) as a torch sparse CSR ``A`` plus its
  transpose ``A^T``, both built once per geometry and cached (:func:`system_matrix`), applied to all
  slices at once. ``A^T`` is the exact adjoint.
* CPU, ``backend="astra"`` (the fallback when the matrix would not fit): ASTRA's own CPU projector per
  slice (``astra.projector.direct_FP/BP``, zero-copy through DLPack, GIL released) on a thread pool.
  Same weights as the matrix, so both paths agree to float rounding.
* CUDA tensors (only when ``astra.use_cuda()``): parallel beam as one ``parallel3d_vec`` geometry whose
  detector rows are the slices (``astra.experimental.direct_FP3D/BP3D`` on torch memory linked with
  ``astra.data3d.GPULink``). Fan beam (``backend="auto"``) uses the cached CSR on the GPU when it fits
  the budget, else ASTRA's 2D CUDA projector slice by slice on DLPack-linked tensors (a cone geometry
  cannot keep rays inside their slice). ASTRA's 3D volume indexes ``y`` upwards while its 2D images
  put row 0 at the top, so the 3D vectors are mirrored in ``y`` to give the 2D CPU path's sinogram.
  ASTRA's CUDA projectors interpolate with texture hardware and back-project voxel-driven: expect about
  1e-2 relative difference to the CPU operator, and a BP that is only approximately the transpose.
  ``backend="matrix"`` on CUDA uses the CSR on the GPU (exact adjoint, the CPU's numbers).
  (The CUDA code is written from ASTRA's documentation and source; the GPU tests check it where a GPU
  is present.)

Cone beam (:class:`ConeBeamCT`, "ct-cone") exists only on CUDA: ASTRA has no CPU cone-beam projector and
its 3D CUDA calls kill the process (SIGFPE) on a machine without a GPU, so the class raises
:class:`~medrecon.errors.DeviceError` before any ASTRA 3D function is touched.

Reconstruction code reads the geometry from the operator (``op.geometry``, ``op.angles``,
``op.detector_spacing``, ``op.source_distance``, ...); no FBP lives here.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from medrecon.errors import ConfigError, DeviceError, ResourceError
from medrecon.physics.ct_geometry import (
    CTGeometry,
    sparse_view_angles,
)
from medrecon.physics.operator import LinearOperator, register_operator

# nnz per (view x pixel) of ASTRA's 2D matrices when a detector bin is one pixel wide (measured: linear
# 1.8, line_fanflat 1.3, strip_fanflat 2.3); rounded up so the estimate is an upper bound.
_NNZ_PER_VIEW_PIXEL = {"linear": 2.0, "line": 1.5, "strip": 3.0, "line_fanflat": 1.5, "strip_fanflat": 3.0}
# Slices per sparse product. The forward product gathers image rows all over the (pixels x slices) operand,
# so a slab that keeps it in cache wins; the back projection reads the smaller sinogram and prefers big
# slabs (measured in benchmarks/operators.py on 2 cores).
_FP_SLAB = 16
_BP_SLAB = 64

CONE_NEEDS_GPU = (
    "cone-beam CT needs a CUDA GPU (ASTRA has no CPU cone-beam projector); this machine has none."
)
CONE_FIX = "run on a GPU node or use measure.ct.beam: parallel|fan"



# --------------------------------------------------------------------------------------------------------
# The cached system matrix (CPU sparse path)


@dataclass
class SystemMatrix:
    """ASTRA's projection matrix of a 2D geometry as torch CSR, with its transpose; sizes for reports."""

    A: torch.Tensor
    AT: torch.Tensor
    nnz: int
    nbytes: int
    build_s: float
    _on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, A^T)`` on ``device`` (copied to a GPU once, then kept)."""
        if device.type == "cpu":
            return self.A, self.AT
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.A.to(device), self.AT.to(device))
        return self._on_device[key]


def estimate_matrix_mb(geometry: CTGeometry) -> float:
    """Upper estimate (MB) of :func:`system_matrix`'s memory, computed before building it.

    nnz ~ views x pixels x (kernel's nnz per pixel and view) x (pixels per detector bin at the isocentre);
    each nonzero costs 8 bytes (float32 value + int32 column) in ``A`` and again in ``A^T``.
    """
    ny, nx = geometry.shape[-2:]
    bin_iso = geometry.detector_spacing / geometry.magnification
    per = _NNZ_PER_VIEW_PIXEL.get(geometry.kernel, 3.0) * max(1.0, geometry.pixel_size / bin_iso)
    nnz = geometry.n_views * ny * nx * per
    rows = geometry.n_views * geometry.detector_count + ny * nx
    return (16.0 * nnz + 8.0 * (rows + 2)) / 1e6


def _csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    itype = np.int32 if max(indptr[-1], max(shape)) < np.iinfo(np.int32).max else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(itype)),
            torch.from_numpy(indices.astype(itype)),
            torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
            size=shape,
        )


@functools.lru_cache(maxsize=4)
def _system_matrix(key: str) -> SystemMatrix:
    import astra

    geom = CTGeometry.from_dict(json.loads(key))
    t0 = time.perf_counter()
    pid = astra.create_projector(geom.kernel, geom.astra_proj_geom_2d(), geom.astra_vol_geom_2d())
    try:
        mid = astra.projector.matrix(pid)
        try:
            m = astra.matrix.get(mid)
        finally:
            astra.matrix.delete(mid)
    finally:
        astra.projector.delete(pid)
    m = m.astype(np.float32)
    m.eliminate_zeros()
    mt = m.T.tocsr()
    A = _csr(m.indptr, m.indices, m.data, m.shape)
    AT = _csr(mt.indptr, mt.indices, mt.data, mt.shape)
    nbytes = sum(
        t.element_size() * t.numel() for M in (A, AT) for t in (M.crow_indices(), M.col_indices(), M.values())
    )
    return SystemMatrix(A, AT, int(m.nnz), int(nbytes), time.perf_counter() - t0)


def system_matrix(geometry: CTGeometry) -> SystemMatrix:
    """ASTRA's 2D projection matrix for ``geometry``, built once and cached (LRU of 4 geometries).

    Rows are ``view * detector_count + bin``, columns ``row * X + column`` of the image.
    """
    if geometry.beam == "cone":
        raise ValueError("cone beam has no 2D system matrix")
    return _system_matrix(geometry.key())


def clear_matrix_cache() -> None:
    """Drop all cached system matrices (and their GPU copies)."""
    _system_matrix.cache_clear()


def _sparse_apply(M: torch.Tensor, v: torch.Tensor, n_out: int, slab: int) -> torch.Tensor:
    """``M @ v_b`` for every row ``v_b`` of ``v`` (B, n_in) -> (B, n_out), ``slab`` slices per product."""
    out = torch.empty((v.shape[0], n_out), dtype=torch.float32, device=v.device)
    for b0 in range(0, v.shape[0], slab):
        chunk = v[b0 : b0 + slab]
        out[b0 : b0 + chunk.shape[0]] = (M @ chunk.T.contiguous()).T
    return out


# --------------------------------------------------------------------------------------------------------
# Operators


def _astra_cuda_usable() -> bool:
    """True only where ASTRA's CUDA code may be called (never touch 3D CUDA otherwise: SIGFPE)."""
    if not torch.cuda.is_available():
        return False
    import astra

    return bool(astra.use_cuda())


_GPU_LOCK = threading.Lock()
_GPU_INDEX: list[int | None] = [None]


def _select_astra_gpu(device: torch.device) -> None:
    import astra

    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _GPU_LOCK:
        if _GPU_INDEX[0] != idx:
            astra.set_gpu_index(idx)
            _GPU_INDEX[0] = idx


def _gpu_link(t: torch.Tensor) -> Any:
    """``astra.data3d.GPULink`` over a contiguous float32 CUDA tensor ``(z, y, x)`` (no copy)."""
    import astra

    assert t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() and t.ndim == 3
    z, y, x = t.shape
    return astra.data3d.GPULink(t.data_ptr(), x, y, z, t.stride(1) * t.element_size())


class _GeometryAttributes:
    """The acquisition geometry as attributes, which reconstruction code (FBP/FDK weights) reads."""

    geometry: CTGeometry

    @property
    def angles(self) -> np.ndarray:
        return self.geometry.angles_array()

    @property
    def detector_spacing(self) -> float:
        return self.geometry.detector_spacing

    @property
    def detector_count(self) -> int:
        return self.geometry.detector_count

    @property
    def source_distance(self) -> float | None:
        return self.geometry.source_distance

    @property
    def detector_distance(self) -> float | None:
        return self.geometry.detector_distance


class _PerSliceCT(_GeometryAttributes, LinearOperator):
    """Shared machinery of the per-slice (2D) CT operators; see the module docstring for the paths."""

    beam: ClassVar[str] = ""
    requires_gpu: ClassVar[bool] = False
    per_slice: ClassVar[bool] = True
    gpu_parity_rtol: ClassVar[float] = 2e-2  # ASTRA CUDA (texture interpolation) vs the CPU matrix
    cuda_prefers_matrix: ClassVar[bool] = False  # backend "auto" on CUDA: CSR on the GPU when it fits

    def __init__(
        self,
        geometry: CTGeometry,
        matrix_budget_mb: float = 1024.0,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        if geometry.beam != self.beam:
            raise ConfigError(
                f"{type(self).__name__} needs a {self.beam}-beam geometry, got {geometry.beam!r}."
            )
        if backend not in ("auto", "matrix", "astra"):
            raise ConfigError(f"Unknown CT backend {backend!r}.", fix="use auto, matrix or astra.")
        self.geometry = geometry
        self.matrix_budget_mb = float(matrix_budget_mb)
        self.backend = backend
        self.threads = threads
        self.in_shape = tuple(geometry.shape)
        self.out_shape = (geometry.n_views, geometry.detector_count)
        self.estimated_matrix_mb = estimate_matrix_mb(geometry)
        if backend == "matrix" and self.estimated_matrix_mb > self.matrix_budget_mb:
            raise ResourceError(
                f"The CT system matrix would need about {self.estimated_matrix_mb:.0f} MB, over the "
                f"budget of {self.matrix_budget_mb:.0f} MB.",
                fix="raise matrix_budget_mb or use backend 'auto'/'astra'.",
            )
        self._cpu_pid: int | None = None
        self._cuda_pids: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _delete_projectors, self._cuda_pids, [])

    @property
    def pixel_size(self) -> float:
        return self.geometry.pixel_size

    @property
    def uses_matrix(self) -> bool:
        """Whether CPU tensors go through the cached sparse matrix (else ASTRA's per-slice projector)."""
        return self.backend == "matrix" or (
            self.backend == "auto" and self.estimated_matrix_mb <= self.matrix_budget_mb
        )

    # -- LinearOperator -------------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, forward=True)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, forward=False)

    def _apply(self, t: torch.Tensor, forward: bool) -> torch.Tensor:
        n_in = 2
        lead = t.shape[: t.ndim - n_in]
        shape_out = self.out_shape if forward else self.in_shape
        tb = t.reshape(-1, *t.shape[t.ndim - n_in :]).to(torch.float32).contiguous()
        if t.is_cuda:
            out = self._apply_cuda(tb, forward)
        elif self.uses_matrix:
            out = self._apply_matrix(tb, forward)
        else:
            out = self._apply_astra_cpu(tb, forward)
        return out.reshape(*lead, *shape_out).to(t.dtype)

    def _apply_matrix(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:
        A, AT = system_matrix(self.geometry).on(tb.device)
        n_out = math.prod(self.out_shape if forward else self.in_shape)
        mat, slab = (A, _FP_SLAB) if forward else (AT, _BP_SLAB)
        return _sparse_apply(mat, tb.reshape(tb.shape[0], -1), n_out, slab)

    def _apply_astra_cpu(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:
        import astra

        pid = self._cpu_projector()
        out = torch.empty((tb.shape[0], *(self.out_shape if forward else self.in_shape)), dtype=torch.float32)

        def one(i: int) -> None:
            if forward:
                astra.projector.direct_FP(pid, tb[i], out=out[i])
            else:
                astra.projector.direct_BP(pid, tb[i], out=out[i])

        workers = max(1, min(self.threads or torch.get_num_threads(), tb.shape[0]))
        if workers == 1:
            for i in range(tb.shape[0]):
                one(i)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(tb.shape[0])))
        return out

    def _cpu_projector(self) -> int:
        with self._lock:
            if self._cpu_pid is None:
                import astra

                g = self.geometry
                self._cpu_pid = astra.create_projector(
                    g.kernel, g.astra_proj_geom_2d(), g.astra_vol_geom_2d()
                )
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _delete_projectors, self._cuda_pids, [self._cpu_pid])
            return self._cpu_pid

    def _apply_cuda(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:
        within_budget = self.estimated_matrix_mb <= self.matrix_budget_mb
        if self.backend == "matrix" or (
            self.backend == "auto"
            and (not _astra_cuda_usable() or (self.cuda_prefers_matrix and within_budget))
        ):
            if self.estimated_matrix_mb > self.matrix_budget_mb:
                raise DeviceError(
                    "ASTRA cannot use this machine's GPU and the CT system matrix "
                    f"(~{self.estimated_matrix_mb:.0f} MB) exceeds matrix_budget_mb.",
                    fix="move the data to the CPU, or raise matrix_budget_mb.",
                )
            return self._apply_matrix(tb, forward)
        if not _astra_cuda_usable():
            raise DeviceError(
                "ASTRA's CUDA projectors cannot use this machine's GPU (astra.use_cuda() is False).",
                fix="use backend 'matrix' on the GPU, or run on the CPU.",
            )
        _select_astra_gpu(tb.device)
        return self._astra_cuda(tb, forward)

    def _astra_cuda(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:  # pragma: no cover - GPU only
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        g = self.geometry.to_dict()
        angles = np.asarray(g.pop("angles"), dtype=np.float64)
        return (
            {"geometry": g, "matrix_budget_mb": self.matrix_budget_mb, "backend": self.backend},
            {"angles": angles},
        )

    @classmethod
    def from_state(
        cls, params: dict, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"
    ) -> _PerSliceCT:
        g = dict(params["geometry"])
        g["angles"] = np.asarray(arrays["angles"], dtype=np.float64)
        return cls(
            CTGeometry.from_dict(g),
            matrix_budget_mb=params.get("matrix_budget_mb", 1024.0),
            backend=params.get("backend", "auto"),
        )

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"{type(self).__name__}(image={g.shape}, pixel={g.pixel_size} mm, views={g.n_views}, "
            f"detectors={g.detector_count} x {g.detector_spacing:.4g} mm)"
        )


def _delete_projectors(cuda_pids: dict, cpu_pids: list) -> None:
    """Free ASTRA projector objects when their operator is garbage-collected."""
    try:
        import astra
    except ImportError:  # interpreter shutting down
        return
    for pid in cpu_pids:
        astra.projector.delete(pid)
    for key, pid in list(cuda_pids.items()):
        (astra.projector3d if key[0] == "3d" else astra.projector).delete(pid)


@register_operator("ct-parallel")
class ParallelBeamCT(_PerSliceCT):
    """Parallel-beam CT of each slice: ``(..., Y, X) mu [1/mm] -> (..., views, detectors)`` line integrals."""

    beam = "parallel"
    gpu_parity_rtol = 2e-2

    def _astra_cuda(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:  # pragma: no cover - GPU only
        """All slices in one ASTRA 3D call: ``parallel3d_vec`` geometry, one detector row per slice."""
        import astra
        import astra.experimental

        nz = tb.shape[0]
        pid = self._cuda_projector(nz)
        out = torch.empty(
            (nz, *(self.out_shape if forward else self.in_shape)), dtype=torch.float32, device=tb.device
        )
        torch.cuda.synchronize(tb.device)  # ASTRA runs on its own stream: inputs must be ready
        if forward:
            astra.experimental.direct_FP3D(pid, _gpu_link(tb), _gpu_link(out))
        else:
            astra.experimental.direct_BP3D(pid, _gpu_link(out), _gpu_link(tb))
        torch.cuda.synchronize(tb.device)
        return out

    def _cuda_projector(self, nz: int) -> int:  # pragma: no cover - GPU only
        import astra

        key = ("3d", nz)
        with self._lock:
            if key not in self._cuda_pids:
                g = self.geometry
                ny, nx = g.shape
                d = g.pixel_size
                # cubic voxels of the pixel size; the slices are the detector rows, one voxel apart
                vol = astra.create_vol_geom(
                    ny, nx, nz, -nx * d / 2, nx * d / 2, -ny * d / 2, ny * d / 2, -nz * d / 2, nz * d / 2
                )
                proj = astra.create_proj_geom(
                    "parallel3d_vec", nz, g.detector_count, g.astra_vectors_3d(nz, d)
                )
                self._cuda_pids[key] = astra.create_projector("cuda3d", proj, vol)
            return self._cuda_pids[key]

    @classmethod
    def example(cls) -> ParallelBeamCT:
        geom = CTGeometry.create("parallel", (24, 20), (0.75, 0.75), sparse_view_angles(9, 180.0))
        return cls(geom)


@register_operator("ct-fan")
class FanBeamCT(_PerSliceCT):
    """Fan-beam CT (flat detector) of each slice: ``(..., Y, X) -> (..., views, detectors)``."""

    beam = "fan"
    gpu_parity_rtol = 3e-2  # CPU line kernel (Siddon) vs CUDA ray-driven interpolation
    # On CUDA, "auto" uses the cached CSR on the GPU when it fits the budget (exact adjoint, CPU numbers);
    # ASTRA's 2D CUDA projector, one slice per call, only for geometries too big for the matrix.
    cuda_prefers_matrix = True

    def _astra_cuda(self, tb: torch.Tensor, forward: bool) -> torch.Tensor:  # pragma: no cover - GPU only
        """Slice by slice with ASTRA's 2D CUDA fan-beam projector on DLPack-linked CUDA tensors."""
        import astra

        pid = self._cuda_projector()
        out = torch.empty(
            (tb.shape[0], *(self.out_shape if forward else self.in_shape)),
            dtype=torch.float32,
            device=tb.device,
        )
        torch.cuda.synchronize(tb.device)
        for i in range(tb.shape[0]):
            if forward:
                astra.projector.direct_FP(pid, tb[i], out=out[i])
            else:
                astra.projector.direct_BP(pid, tb[i], out=out[i])
        torch.cuda.synchronize(tb.device)
        return out

    def _cuda_projector(self) -> int:  # pragma: no cover - GPU only
        import astra

        key = ("2d",)
        with self._lock:
            if key not in self._cuda_pids:
                g = self.geometry
                self._cuda_pids[key] = astra.create_projector(
                    "cuda", g.astra_proj_geom_2d(), g.astra_vol_geom_2d()
                )
            return self._cuda_pids[key]

    @classmethod
    def example(cls) -> FanBeamCT:
        geom = CTGeometry.create("fan", (20, 24), (0.8, 0.8), sparse_view_angles(10, 360.0))
        return cls(geom)


def require_cone_gpu() -> None:
    """Raise :class:`DeviceError` unless ASTRA can run CUDA here; touches no ASTRA 3D function."""
    if not _astra_cuda_usable():
        raise DeviceError(CONE_NEEDS_GPU, fix=CONE_FIX)


@register_operator("ct-cone")
class ConeBeamCT(_GeometryAttributes, LinearOperator):
    """Cone-beam CT, circular orbit about z, flat detector: ``(..., Z, Y, X) -> (..., rows, views, cols)``.

    CUDA only (ASTRA ``cuda3d`` with a ``cone_vec`` geometry on GPULink-ed torch memory). The output
    layout is ASTRA's ``(detector rows, views, detector columns)``; row ``k`` is centred at height
    ``(k + 0.5 - rows/2) * detector_row_spacing`` on the detector, slice ``z`` of the volume at
    ``(z + 0.5 - Z/2) * dz`` about the source plane. Constructing it without a usable GPU raises
    :class:`DeviceError`.
    """

    requires_gpu: ClassVar[bool] = True
    per_slice: ClassVar[bool] = False
    gpu_dot_tol: ClassVar[float] = 5e-2  # ASTRA's voxel-driven cone BP is only approximately FP's transpose

    def __init__(self, geometry: CTGeometry) -> None:
        require_cone_gpu()
        if geometry.beam != "cone":
            raise ConfigError(f"ConeBeamCT needs a cone-beam geometry, got {geometry.beam!r}.")
        self.geometry = geometry
        self.in_shape = tuple(geometry.shape)
        self.out_shape = (geometry.detector_rows, geometry.n_views, geometry.detector_count)
        self._lock = threading.Lock()
        self._pids: dict[tuple, int] = {}
        self._finalizer = weakref.finalize(self, _delete_projectors, self._pids, [])

    def _projector(self) -> int:  # pragma: no cover - GPU only
        import astra

        with self._lock:
            if ("3d",) not in self._pids:
                g = self.geometry
                nz, ny, nx = g.shape
                dz, dy, dx = g.spacing
                vol = astra.create_vol_geom(
                    ny,
                    nx,
                    nz,
                    -nx * dx / 2,
                    nx * dx / 2,
                    -ny * dy / 2,
                    ny * dy / 2,
                    -nz * dz / 2,
                    nz * dz / 2,
                )
                proj = astra.create_proj_geom(
                    "cone_vec",
                    g.detector_rows,
                    g.detector_count,
                    g.astra_vectors_3d(g.detector_rows, g.detector_row_spacing),
                )
                self._pids[("3d",)] = astra.create_projector("cuda3d", proj, vol)
            return self._pids[("3d",)]

    def _run(self, t: torch.Tensor, forward: bool) -> torch.Tensor:  # pragma: no cover - GPU only
        import astra.experimental

        require_cone_gpu()
        if not t.is_cuda:
            raise DeviceError(
                "ConeBeamCT works on CUDA tensors only (ASTRA has no CPU cone-beam projector).",
                fix="move the tensor to the GPU: x.cuda().",
            )
        n_in = 3
        lead = t.shape[: t.ndim - n_in]
        tb = t.reshape(-1, *t.shape[t.ndim - n_in :]).to(torch.float32).contiguous()
        _select_astra_gpu(tb.device)
        pid = self._projector()
        shape_out = self.out_shape if forward else self.in_shape
        out = torch.empty((tb.shape[0], *shape_out), dtype=torch.float32, device=tb.device)
        torch.cuda.synchronize(tb.device)
        for i in range(tb.shape[0]):
            if forward:
                astra.experimental.direct_FP3D(pid, _gpu_link(tb[i]), _gpu_link(out[i]))
            else:
                astra.experimental.direct_BP3D(pid, _gpu_link(out[i]), _gpu_link(tb[i]))
        torch.cuda.synchronize(tb.device)
        return out.reshape(*lead, *shape_out).to(t.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, True)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._run(y, False)

    @classmethod
    def example(cls) -> ConeBeamCT:
        """A small cone-beam operator; raises :class:`DeviceError` on a machine without a usable GPU."""
        require_cone_gpu()
        geom = CTGeometry.create("cone", (12, 16, 16), (1.0, 1.0, 1.0), sparse_view_angles(12, 360.0))
        return cls(geom)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        g = self.geometry.to_dict()
        angles = np.asarray(g.pop("angles"), dtype=np.float64)
        return {"geometry": g}, {"angles": angles}

    @classmethod
    def from_state(
        cls, params: dict, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"
    ) -> ConeBeamCT:
        g = dict(params["geometry"])
        g["angles"] = np.asarray(arrays["angles"], dtype=np.float64)
        return cls(CTGeometry.from_dict(g))


def ct_operator(
    geometry: CTGeometry, matrix_budget_mb: float = 1024.0, backend: str = "auto", threads: int | None = None
) -> LinearOperator:
    """The operator for ``geometry.beam`` (the one entry point the CLI needs)."""
    if geometry.beam == "parallel":
        return ParallelBeamCT(geometry, matrix_budget_mb, backend, threads)
    if geometry.beam == "fan":
        return FanBeamCT(geometry, matrix_budget_mb, backend, threads)
    return ConeBeamCT(geometry)
