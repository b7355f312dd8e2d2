"""CT acquisition geometry in millimetres, angle sets, and HU <-> linear attenuation.

:class:`CTGeometry` is the JSON-able description of a parallel-, fan- or cone-beam scan that the operators in
:mod:`medrecon.physics.ct` are built from and that every measurement stores. It lives apart from the
operators so that code which only needs the geometry (FBP/FDK weights, config validation) does not pull in
the projector machinery.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from medrecon.errors import ConfigError

MU_WATER = 0.0192
"""Linear attenuation of water in 1/mm at about 70 keV (the effective energy of a 120 kVp spectrum)."""

BEAMS = ("parallel", "fan", "cone")
KERNELS = {
    "parallel": ("linear", "line", "strip"),
    "fan": ("line_fanflat", "strip_fanflat"),
    "cone": ("cuda3d",),
}
DEFAULT_KERNEL = {"parallel": "linear", "fan": "line_fanflat", "cone": "cuda3d"}
# Clinical scanner (source-isocentre 595 mm, isocentre-detector 490 mm, 500 mm field of view), scaled so
# that the field of view is the image's circumscribed circle.
SOURCE_DISTANCE_PER_FOV_RADIUS = 595.0 / 250.0
DETECTOR_DISTANCE_PER_FOV_RADIUS = 490.0 / 250.0

# --------------------------------------------------------------------------------------------------------
# HU <-> linear attenuation


def hu_to_mu(hu: Any, mu_water: float = MU_WATER) -> Any:
    """Linear attenuation (1/mm) from Hounsfield units: ``mu = mu_water * (1 + HU/1000)``, clipped at 0.

    ``mu_water`` is 0.0192/mm by default (water at ~70 keV); air (-1000 HU) maps to 0, and values below
    -1000 HU (noise, padding) are clipped to 0 because negative attenuation is unphysical. Works on numpy
    arrays and torch tensors, keeping the type (floats stay floats; integers become float32).
    """
    _check_mu_water(mu_water)
    if isinstance(hu, torch.Tensor):
        hu = hu if hu.is_floating_point() else hu.to(torch.float32)
        return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)
    arr = np.asarray(hu)
    arr = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
    return np.maximum(mu_water * (1.0 + arr / 1000.0), 0.0).astype(arr.dtype, copy=False)


def mu_to_hu(mu: Any, mu_water: float = MU_WATER) -> Any:
    """Hounsfield units from linear attenuation (1/mm): ``HU = 1000 * (mu / mu_water - 1)`` (no clipping)."""
    _check_mu_water(mu_water)
    if isinstance(mu, torch.Tensor):
        return 1000.0 * (mu / mu_water - 1.0)
    arr = np.asarray(mu)
    arr = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
    return (1000.0 * (arr / mu_water - 1.0)).astype(arr.dtype, copy=False)


def _check_mu_water(mu_water: float) -> None:
    if not (np.isfinite(mu_water) and mu_water > 0):
        raise ConfigError(
            f"mu_water must be a positive number in 1/mm, got {mu_water!r}.",
            fix="set measure.ct.mu_water to e.g. 0.0192 (water at ~70 keV).",
        )


# --------------------------------------------------------------------------------------------------------
# Angle sets


def sparse_view_angles(n: int, arc_deg: float = 180.0) -> np.ndarray:
    """``n`` equally spaced angles (radians) over a full arc, the endpoint excluded (it repeats the start).

    Use ``arc_deg=180`` for parallel beam (opposite views are mirror images) and 360 for fan/cone beam.
    """
    n = _positive_int(n, "measure.ct.views")
    arc = _arc(arc_deg)
    return np.arange(n, dtype=np.float64) * (math.radians(arc) / n)


def limited_angle(arc_deg: float, n: int) -> np.ndarray:
    """``n`` equally spaced angles (radians) over the closed arc ``[0, arc_deg]``: a limited-angle scan.

    Both ends are included because for a partial arc the last view is not a repeat of the first.
    """
    n = _positive_int(n, "measure.ct.views")
    arc = _arc(arc_deg)
    if n == 1:
        return np.zeros(1)
    return np.linspace(0.0, math.radians(arc), n)


def angles_from_config(cfg: dict[str, Any]) -> np.ndarray:
    """Projection angles (radians) from the ``measure.ct`` block.

    ``angles_deg`` (a list, in degrees) wins if given. Otherwise ``views`` angles over ``arc_deg``: a full
    arc (180 or 360 degrees) is sampled with :func:`sparse_view_angles`, a partial one with
    :func:`limited_angle`.
    """
    explicit = cfg.get("angles_deg")
    if explicit is not None:
        ang = np.asarray(explicit, dtype=np.float64).ravel()
        if ang.size == 0 or not np.isfinite(ang).all():
            raise ConfigError(
                f"measure.ct.angles_deg must be a non-empty list of finite numbers, got {explicit!r}.",
                fix="give angles in degrees, e.g. [0, 3, 6], or remove the key to use views/arc_deg.",
            )
        return np.deg2rad(ang)
    views = cfg.get("views", 60)
    arc = float(cfg.get("arc_deg", 180.0))
    if math.isclose(arc, 180.0) or math.isclose(arc, 360.0):
        return sparse_view_angles(views, arc)
    return limited_angle(arc, views)


def _positive_int(n: Any, key: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"{key} must be a positive integer, got {n!r}.", fix=f"set {key} to e.g. 60.")
    return int(n)


def _arc(arc_deg: Any) -> float:
    arc = float(arc_deg)
    if not (0.0 < arc <= 360.0):
        raise ConfigError(
            f"measure.ct.arc_deg must be in (0, 360], got {arc_deg!r}.",
            fix="use 180 (parallel), 360 (fan/cone), or less for a limited-angle scan.",
        )
    return arc


# --------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class CTGeometry:
    """A CT acquisition in millimetres; JSON-able with :meth:`to_dict` / :meth:`from_dict`.

    Build it with :meth:`create` (fills defaults), :meth:`from_config` or :meth:`from_volume`.

    Attributes:
        beam: "parallel" | "fan" | "cone".
        shape: image shape ``(Y, X)``; ``(Z, Y, X)`` for cone beam.
        spacing: pixel size ``(dy, dx)`` mm; ``(dz, dy, dx)`` for cone beam. ``dy == dx`` is required.
        angles: projection angles in radians.
        detector_count: detector bins (columns).
        detector_spacing: bin width on the detector, mm.
        source_distance / detector_distance: source-isocentre and isocentre-detector distances, mm
            (fan and cone beam only).
        detector_rows / detector_row_spacing: cone beam only.
        kernel: ASTRA projector kernel ("linear" for parallel, "line_fanflat" for fan; "cuda3d" for cone).
    """

    beam: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    angles: tuple[float, ...]
    detector_count: int
    detector_spacing: float
    source_distance: float | None = None
    detector_distance: float | None = None
    detector_rows: int | None = None
    detector_row_spacing: float | None = None
    kernel: str = ""

    def __post_init__(self) -> None:
        if self.beam not in BEAMS:
            raise ConfigError(
                f"Unknown CT beam {self.beam!r}.", fix=f"set measure.ct.beam to one of {list(BEAMS)}."
            )
        nd = 3 if self.beam == "cone" else 2
        shape = tuple(int(s) for s in self.shape)
        spacing = tuple(float(s) for s in self.spacing)
        if len(shape) != nd or min(shape) < 1:
            raise ConfigError(
                f"{self.beam}-beam CT needs an image shape of {nd} positive sizes, got {self.shape}."
            )
        if len(spacing) != nd or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ConfigError(
                f"{self.beam}-beam CT needs {nd} positive pixel spacings (mm), got {self.spacing}."
            )
        dy, dx = spacing[-2:]
        if not math.isclose(dy, dx, rel_tol=1e-4):
            raise ConfigError(
                f"CT projection needs square pixels, but the in-plane spacing is dy={dy} mm, dx={dx} mm "
                "(ASTRA's linear and line kernels assume square pixels).",
                fix="resample to square pixels (ingest.resample_spacing) before `medrecon measure`.",
            )
        angles = tuple(float(a) for a in np.asarray(self.angles, dtype=np.float64).ravel())
        if not angles or not all(math.isfinite(a) for a in angles):
            raise ConfigError(
                f"CT angles must be a non-empty list of finite numbers, got {len(angles)} angles."
            )
        if int(self.detector_count) < 1 or not (float(self.detector_spacing) > 0):
            raise ConfigError(
                f"CT detector needs >= 1 bin of positive width, got {self.detector_count} bins of "
                f"{self.detector_spacing} mm.",
                fix="check measure.ct.detector_count/detector_spacing.",
            )
        if self.beam in ("fan", "cone"):
            for name in ("source_distance", "detector_distance"):
                v = getattr(self, name)
                if v is None or not (float(v) > 0):
                    raise ConfigError(
                        f"{self.beam}-beam CT needs a positive {name} (mm), got {v!r}.",
                        fix=f"set measure.ct.{name} or leave it null for the default.",
                    )
            r = self.fov_radius
            if float(self.source_distance) <= r:
                raise ConfigError(
                    f"The source ({self.source_distance} mm from the isocentre) lies inside the image's "
                    f"field of view (radius {r:.1f} mm).",
                    fix="increase measure.ct.source_distance or leave it null.",
                )
        if self.beam == "cone":
            if (
                self.detector_rows is None
                or int(self.detector_rows) < 1
                or not (self.detector_row_spacing is not None and float(self.detector_row_spacing) > 0)
            ):
                raise ConfigError(
                    "cone-beam CT needs detector_rows >= 1 and a positive detector_row_spacing."
                )
        kernel = self.kernel or DEFAULT_KERNEL[self.beam]
        if kernel not in KERNELS[self.beam]:
            raise ConfigError(
                f"ASTRA kernel {kernel!r} does not exist for {self.beam} beam.",
                fix=f"use one of {list(KERNELS[self.beam])}.",
            )
        set_ = object.__setattr__
        set_(self, "shape", shape)
        set_(self, "spacing", spacing)
        set_(self, "angles", angles)
        set_(self, "detector_count", int(self.detector_count))
        set_(self, "detector_spacing", float(self.detector_spacing))
        set_(self, "kernel", kernel)
        for name in ("source_distance", "detector_distance", "detector_row_spacing"):
            v = getattr(self, name)
            set_(self, name, None if v is None else float(v))
        set_(self, "detector_rows", None if self.detector_rows is None else int(self.detector_rows))

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        beam: str,
        shape: tuple[int, ...],
        spacing: tuple[float, ...],
        angles: Any,
        *,
        detector_count: int | None = None,
        detector_spacing: float | None = None,
        source_distance: float | None = None,
        detector_distance: float | None = None,
        detector_rows: int | None = None,
        detector_row_spacing: float | None = None,
        kernel: str = "",
    ) -> CTGeometry:
        """A geometry with defaults for whatever is ``None``.

        Defaults: the field of view is the image's circumscribed circle (radius ``R``); fan/cone distances
        are a clinical scanner's (595 mm + 490 mm for a 250 mm radius) scaled to ``R``; a detector bin
        covers one pixel at the isocentre (``dx * magnification``); enough bins (and, for cone beam, rows)
        to see the whole field of view from every angle.
        """
        if beam not in BEAMS:
            raise ConfigError(
                f"Unknown CT beam {beam!r}.", fix=f"set measure.ct.beam to one of {list(BEAMS)}."
            )
        shape = tuple(int(s) for s in shape)
        spacing = tuple(float(s) for s in spacing)
        if len(shape) < 2 or len(spacing) != len(shape):
            raise ConfigError(
                f"CT image shape {shape} and spacing {spacing} must have the same length (2 or 3)."
            )
        ny, nx = shape[-2:]
        dx = spacing[-1]
        r = 0.5 * math.hypot(ny * spacing[-2], nx * dx)
        if beam == "parallel":
            ds = float(detector_spacing or dx)
            n = detector_count or 2 * math.ceil(r / ds) + 1
            return cls(beam, shape, spacing, angles, n, ds, kernel=kernel)
        so = float(source_distance or SOURCE_DISTANCE_PER_FOV_RADIUS * r)
        od = float(detector_distance or DETECTOR_DISTANCE_PER_FOV_RADIUS * r)
        mag = (so + od) / so
        ds = float(detector_spacing or dx * mag)
        if r >= so:
            raise ConfigError(
                f"The source ({so} mm from the isocentre) lies inside the field of view (radius {r:.1f} mm).",
                fix="increase measure.ct.source_distance or leave it null.",
            )
        half_width = (so + od) * math.tan(math.asin(r / so))  # the fan that just covers the field of view
        n = detector_count or 2 * math.ceil(half_width / ds) + 1
        if beam == "fan":
            return cls(beam, shape, spacing, angles, n, ds, so, od, kernel=kernel)
        nz, dz = shape[0], spacing[0]
        rs = float(detector_row_spacing or dz * mag)
        # the nearest point of the field of view to the source magnifies most
        height = nz * dz * (so + od) / (so - r)
        rows = detector_rows or math.ceil(height / rs)
        return cls(beam, shape, spacing, angles, n, ds, so, od, rows, rs, kernel=kernel)

    @classmethod
    def from_config(
        cls, cfg: dict[str, Any], shape: tuple[int, ...], spacing: tuple[float, ...]
    ) -> CTGeometry:
        """From the ``measure.ct`` config block, a volume's ``(Z, Y, X)`` shape and ``(dz, dy, dx)`` spacing.

        Per-slice beams use the in-plane part; cone beam uses all three axes. Keys: beam, views, arc_deg,
        angles_deg, detector_count, detector_spacing, source_distance, detector_distance, and (cone)
        detector_rows, detector_row_spacing; plus the optional ASTRA ``kernel``.
        """
        beam = cfg.get("beam", "parallel")
        if len(shape) != 3 or len(spacing) != 3:
            raise ConfigError(
                f"CTGeometry.from_config wants a volume shape (Z, Y, X) and spacing (dz, dy, dx), got "
                f"{shape} and {spacing}."
            )
        nd = 3 if beam == "cone" else 2
        return cls.create(
            beam,
            tuple(shape)[-nd:],
            tuple(spacing)[-nd:],
            angles_from_config(cfg),
            detector_count=cfg.get("detector_count"),
            detector_spacing=cfg.get("detector_spacing"),
            source_distance=cfg.get("source_distance"),
            detector_distance=cfg.get("detector_distance"),
            detector_rows=cfg.get("detector_rows"),
            detector_row_spacing=cfg.get("detector_row_spacing"),
            kernel=cfg.get("kernel") or "",
        )

    @classmethod
    def from_volume(
        cls, geometry: Any, shape: tuple[int, int, int], beam: str, angles: Any, **kwargs: Any
    ) -> CTGeometry:
        """From a :class:`medrecon.volume.Geometry` (its spacing) and the volume shape ``(Z, Y, X)``."""
        nd = 3 if beam == "cone" else 2
        return cls.create(beam, tuple(shape)[-nd:], tuple(geometry.spacing)[-nd:], angles, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["spacing"], d["angles"] = list(self.shape), list(self.spacing), list(self.angles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CTGeometry:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def __repr__(self) -> str:
        th = np.degrees(self.angles_array())
        extra = (
            ""
            if self.beam == "parallel"
            else f", SO={self.source_distance:.1f} OD={self.detector_distance:.1f} mm"
        )
        return (
            f"CTGeometry({self.beam}, image={self.shape} x {self.spacing} mm, {self.n_views} views "
            f"{th.min():.1f}..{th.max():.1f} deg, {self.detector_count} bins x {self.detector_spacing:.4g} mm"
            f"{extra}, kernel={self.kernel})"
        )

    def key(self) -> str:
        """Canonical JSON (the cache key of the system matrix)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- derived quantities ------------------------------------------------------------------------------

    @property
    def n_views(self) -> int:
        return len(self.angles)

    @property
    def pixel_size(self) -> float:
        return self.spacing[-1]

    @property
    def fov_radius(self) -> float:
        """Radius (mm) of the circle circumscribing the image, centred on the rotation axis."""
        return 0.5 * math.hypot(self.shape[-2] * self.spacing[-2], self.shape[-1] * self.spacing[-1])

    @property
    def magnification(self) -> float:
        if self.beam == "parallel":
            return 1.0
        return (self.source_distance + self.detector_distance) / self.source_distance

    def angles_array(self) -> np.ndarray:
        return np.asarray(self.angles, dtype=np.float64)

    # -- ASTRA geometries ----------------------------------------------------------------------------------

    def astra_vol_geom_2d(self) -> dict:
        ny, nx = self.shape[-2:]
        dy, dx = self.spacing[-2:]
        import astra

        return astra.create_vol_geom(ny, nx, -nx * dx / 2, nx * dx / 2, -ny * dy / 2, ny * dy / 2)

    def astra_proj_geom_2d(self) -> dict:
        import astra

        if self.beam == "parallel":
            return astra.create_proj_geom(
                "parallel", self.detector_spacing, self.detector_count, self.angles_array()
            )
        if self.beam == "fan":
            return astra.create_proj_geom(
                "fanflat",
                self.detector_spacing,
                self.detector_count,
                self.angles_array(),
                self.source_distance,
                self.detector_distance,
            )
        raise ValueError("cone beam has no 2D geometry")

    def astra_vectors_3d(self, n_rows: int, row_spacing: float) -> np.ndarray:
        """ASTRA 3D vectors (``parallel3d_vec`` / ``cone_vec``), mirrored in y to match the 2D convention.

        Row ``k`` of the detector is centred at ``z = (k + 0.5 - n_rows/2) * row_spacing``.
        """
        th = self.angles_array()
        s, c = np.sin(th), np.cos(th)
        v = np.zeros((th.size, 12))
        # ASTRA 2D: source direction (sin, -cos), detector u = (cos, sin). Mirror y -> -y for the 3D volume.
        if self.beam == "parallel":
            v[:, 0], v[:, 1] = s, c  # ray direction
        else:
            v[:, 0], v[:, 1] = s * self.source_distance, c * self.source_distance  # source
            v[:, 3], v[:, 4] = -s * self.detector_distance, -c * self.detector_distance  # detector centre
        v[:, 6], v[:, 7] = c * self.detector_spacing, -s * self.detector_spacing  # u: next column
        v[:, 11] = row_spacing  # v: next row
        return v
