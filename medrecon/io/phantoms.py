"""Seeded synthetic volumes: a chest/abdomen CT in HU and a T1-weighted-like MR brain.

Why not Shepp-Logan: learned priors need anatomy-like statistics (organs with soft boundaries, branching
vessels, bone with a cortical shell, smooth texture), and training/evaluation sets need many *different*
subjects. Each seed draws one subject (sizes, positions, vessel trees, texture); the same seed always gives
the same array.

Continuous anatomy. A phantom is a function of *normalised* patient coordinates evaluated at voxel centres:

* in-plane ``u = X / R``, ``v = Y / R`` with ``X, Y`` the LPS millimetres from the volume centre and
  ``R`` half the smaller in-plane field of view (so the body fills the field of view and stays isotropic
  in millimetres whatever ``dx, dy``);
* along the volume ``t = (k + 0.5) / nz`` in ``(0, 1)``, inferior to superior; the ``t`` range has a fixed
  length of :data:`_LT` in ``u`` units, which fixes the aspect of 3D structures (tubes, ellipsoids).

So any shape shows the same anatomy (a finer grid is a finer sampling of it), and every slice is computed
from its own ``t`` alone: :func:`phantom_slab` gives bit-identical values to slicing the whole volume, and
:func:`write_phantom_volume` needs one slab of memory. Texture is Gaussian-filtered white noise on a coarse
lattice in the same normalised coordinates (separable Gaussian weights: two small matrix products per slice).

Array convention (``docs/design.md``, :class:`medrecon.volume.Geometry`): ``(z, y, x)`` float32, spacing
``(dz, dy, dx)`` mm, identity LPS direction (x to patient left, y posterior, z superior), origin such that
the volume centre is at LPS 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from medrecon.errors import ConfigError
from medrecon.provenance import provenance
from medrecon.volume import Geometry, Volume

_LT = 1.5  # length of the t range (0..1) in in-plane normalised units: fixes the aspect of 3D structures
_TWO_PI = 2.0 * np.pi


# ---------------------------------------------------------------------------------------------- frame
@dataclass(frozen=True)
class _Frame:
    """Voxel-centre coordinates of one (shape, spacing) in normalised units, shared by every slice."""

    nz: int
    u: np.ndarray  # (1, nx) float32, increasing (patient left)
    v: np.ndarray  # (ny, 1) float32, increasing (posterior)
    theta: np.ndarray  # (ny, nx) polar angle atan2(v, u)
    psi: np.ndarray  # (ny, nx) angle from the posterior midline, 0..pi on both sides
    post: np.ndarray  # (ny, nx) posterior-ness in 0..1
    ant: np.ndarray  # (ny, nx) anterior-ness in 0..1

    @classmethod
    def build(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Frame:
        nz, ny, nx = shape
        _dz, dy, dx = spacing
        r = 0.5 * min(nx * dx, ny * dy)
        u = ((np.arange(nx) - (nx - 1) / 2.0) * dx / r).astype(np.float32)[None, :]
        v = ((np.arange(ny) - (ny - 1) / 2.0) * dy / r).astype(np.float32)[:, None]
        theta = np.arctan2(v, u).astype(np.float32)
        rad = np.sqrt(u * u + v * v) + np.float32(1e-6)
        return cls(
            nz=nz,
            u=u,
            v=v,
            theta=theta,
            psi=np.arctan2(np.abs(u), v).astype(np.float32),
            post=np.clip(v / rad, 0, 1) ** 2,
            ant=np.clip(-v / rad, 0, 1) ** 2,
        )

    def t(self, k: int) -> float:
        return (k + 0.5) / self.nz

    def window(self, cu: float, cv: float, ru: float, rv: float) -> tuple[slice, slice]:
        """Index window (rows, cols) covering ``|u - cu| <= ru`` and ``|v - cv| <= rv``."""
        u, v = self.u[0], self.v[:, 0]
        x0, x1 = np.searchsorted(u, [cu - ru, cu + ru])
        y0, y1 = np.searchsorted(v, [cv - rv, cv + rv])
        return slice(int(y0), int(y1) + 1), slice(int(x0), int(x1) + 1)


# ---------------------------------------------------------------------------------------------- texture
def _gauss_weights(x: np.ndarray, nodes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian weights cut at 4 sigma, rows normalised to unit sum of squares (unit-variance noise)."""
    d = (x[:, None] - nodes[None, :]) / sigma
    w = np.where(np.abs(d) < 4.0, np.exp(-0.5 * d * d), 0.0)
    return (w / np.sqrt(np.maximum((w * w).sum(axis=1, keepdims=True), 1e-30))).astype(np.float32)


class _NoiseLattice:
    """White noise on a lattice (step ``sigma``) (normalised units), Gaussian-filtered.

    The lattice depends only on the seed stream and ``sigma``, never on the output shape, so every shape
    sees the same texture. One slice is a weighted sum of about nine lattice planes followed by two sparse
    (banded) matrix products. Sparse products run single-threaded in a fixed order, so a slice's values do
    not depend on which slab it is computed in (dense BLAS calls were also 4x slower here: thread start-up on
    small matrices).
    """

    EXTENT = 1.4  # in-plane lattice half-width; coordinates beyond are clamped (they lie outside the body)

    def __init__(self, rng: np.random.Generator, sigma: float) -> None:
        self.sigma = sigma
        self.nodes = np.arange(-self.EXTENT - 2 * sigma, self.EXTENT + 2 * sigma + 1e-9, sigma)
        self.znodes = np.arange(-0.1 * _LT - 2 * sigma, 1.1 * _LT + 2 * sigma + 1e-9, sigma)
        self.grid = rng.standard_normal(
            (len(self.znodes), len(self.nodes), len(self.nodes)), dtype=np.float32
        )

    def weights(self, frame: _Frame) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix]:
        u = np.clip(frame.u[0].astype(float), -self.EXTENT, self.EXTENT)
        v = np.clip(frame.v[:, 0].astype(float), -self.EXTENT, self.EXTENT)
        return (
            scipy.sparse.csr_matrix(_gauss_weights(v, self.nodes, self.sigma)),
            scipy.sparse.csr_matrix(_gauss_weights(u, self.nodes, self.sigma)),
        )

    def plane(self, t: float, wy: scipy.sparse.csr_matrix, wx: scipy.sparse.csr_matrix) -> np.ndarray:
        wz = _gauss_weights(np.array([t * _LT]), self.znodes, self.sigma)[0]
        p = np.zeros(self.grid.shape[1:], np.float32)
        for i in np.flatnonzero(wz):
            p += wz[i] * self.grid[i]
        q = wy @ p  # (ny, G)
        return np.ascontiguousarray((wx @ q.T).T)  # (ny, nx)


# ---------------------------------------------------------------------------------------------- tubes
@dataclass(frozen=True)
class _Tube:
    """A tube between two points (u, v, t), bowed sideways by ``bend``; radius tapers from r0 to r1."""

    t0: float
    t1: float
    p0: tuple[float, float]
    p1: tuple[float, float]
    bend: tuple[float, float]
    r0: float
    r1: float

    def centre(self, t: float) -> tuple[float, float, float]:
        s = (t - self.t0) / (self.t1 - self.t0)
        b = np.sin(np.pi * s)
        return (
            self.p0[0] + s * (self.p1[0] - self.p0[0]) + b * self.bend[0],
            self.p0[1] + s * (self.p1[1] - self.p0[1]) + b * self.bend[1],
            self.r0 + s * (self.r1 - self.r0),
        )

    def section(self, frame: _Frame, t: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Window and normalised squared distance of the tube's cross-section in slice ``t`` (None if absent).

        A tube crossing the slice obliquely cuts an ellipse, longer along its in-plane direction by
        ``sqrt(1 + slope^2)``; the slope is measured in the fixed normalised aspect, so it is shape-free.
        """
        if not self.t0 <= t <= self.t1:
            return None
        cu, cv, r = self.centre(t)
        du, dv = self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]
        norm = float(np.hypot(du, dv))
        slope = norm / ((self.t1 - self.t0) * _LT)
        long = r * float(np.sqrt(1.0 + slope * slope))
        win = frame.window(cu, cv, long * 1.3, long * 1.3)
        x, y = frame.u[:, win[1]] - cu, frame.v[win[0], :] - cv
        if norm < 1e-9:
            return win, (x * x + y * y) / (r * r)
        ex, ey = du / norm, dv / norm
        along, across = x * ex + y * ey, -x * ey + y * ex
        return win, (along / long) ** 2 + (across / r) ** 2


def _vessel_tree(rng: np.random.Generator, side: int, hilum: tuple[float, float, float]) -> list[_Tube]:
    """Branching lung vessels from a hilum: five trunks, each splitting twice, three times (75 per lung).

    A child leaves its parent at a random point and heads for a point between the parent's end and a random
    point of the lung, so the tree fans out through the whole lung; radii shrink by 0.72 per generation.
    """
    tubes: list[_Tube] = []

    def lung_point() -> np.ndarray:
        return np.array([side * rng.uniform(0.1, 0.6), rng.uniform(-0.35, 0.35), rng.uniform(0.3, 1.0)])

    def grow(start: np.ndarray, end: np.ndarray, r: float, depth: int) -> None:
        if abs(end[2] - start[2]) < 0.05:  # keep tubes from running flat in a slice
            end[2] = start[2] + np.copysign(0.05, end[2] - start[2])
        lo, hi = (start, end) if start[2] <= end[2] else (end, start)
        r0, r1 = (r, 0.6 * r) if start[2] <= end[2] else (0.6 * r, r)
        tube = _Tube(
            float(lo[2]),
            float(hi[2]),
            (float(lo[0]), float(lo[1])),
            (float(hi[0]), float(hi[1])),
            tuple(float(x) for x in rng.normal(0.0, 0.03, 2)),
            r0,
            r1,
        )
        tubes.append(tube)
        if depth == 3:
            return
        for _ in range(2):
            ts = start[2] + rng.uniform(0.3, 0.9) * (end[2] - start[2])
            cu, cv, _ = tube.centre(ts)
            target = 0.5 * end + 0.5 * lung_point()
            grow(np.array([cu, cv, ts]), target, 0.72 * r, depth + 1)

    for eu, ev, et in (
        (0.35, -0.02, 0.97),
        (0.5, 0.1, 0.78),
        (0.45, 0.25, 0.32),
        (0.42, -0.25, 0.4),
        (0.3, 0.2, 0.5),
    ):
        end = np.array([side * eu, ev, et]) + rng.uniform(-0.05, 0.05, 3)
        grow(np.array(hilum, dtype=float), end, 0.03 * rng.uniform(0.9, 1.1), 0)
    return tubes


def _ellipse(
    frame: _Frame, cu: float, cv: float, a: float, b: float, angle: float = 0.0
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Window and normalised squared radius of a rotated ellipse (``< 1`` inside)."""
    reach = max(a, b) * 1.45
    win = frame.window(cu, cv, reach, reach)
    x, y = frame.u[:, win[1]] - cu, frame.v[win[0], :] - cv
    c, s = np.cos(angle), np.sin(angle)
    return win, ((x * c + y * s) / a) ** 2 + ((-x * s + y * c) / b) ** 2


def _ellipsoid(
    frame: _Frame,
    t: float,
    centre: tuple[float, float, float],
    semi: tuple[float, float, float],
    angle: float = 0.0,
    scale: float = 1.0,
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Section of an ellipsoid (centre u, v, t; semi-axes a, b in u units, c in t units) at slice ``t``."""
    q = 1.0 - ((t - centre[2]) / (semi[2] * scale)) ** 2
    if q <= 0:
        return None
    f = float(np.sqrt(q)) * scale
    return _ellipse(frame, centre[0], centre[1], semi[0] * f, semi[1] * f, angle)


def _paint(label: np.ndarray, win: tuple[slice, slice], mask: np.ndarray, value: int) -> None:
    sub = label[win]
    sub[mask] = value


# ---------------------------------------------------------------------------------------------- CT chest
# tissue classes: (name, HU, texture amplitude in HU)
_CT_TISSUES = [
    ("air", -1000.0, 0.0),
    ("fat", -100.0, 8.0),
    ("muscle", 50.0, 5.0),
    ("soft", 35.0, 6.0),
    ("visceral_fat", -90.0, 8.0),
    ("lung", -850.0, 25.0),
    ("vessel", 40.0, 4.0),
    ("myocardium", 52.0, 4.0),
    ("blood", 40.0, 3.0),
    ("liver", 62.0, 5.0),
    ("spleen", 48.0, 4.0),
    ("kidney_cortex", 40.0, 4.0),
    ("kidney_medulla", 31.0, 3.0),
    ("fluid", 12.0, 3.0),
    ("gas", -960.0, 10.0),
    ("trabecular", 350.0, 40.0),
    ("cortical", 950.0, 40.0),
    ("disc", 80.0, 5.0),
    ("cord", 30.0, 3.0),
    ("cartilage", 120.0, 8.0),
]
CT_LABELS = {name: i for i, (name, _, _) in enumerate(_CT_TISSUES)}
_L = CT_LABELS


class _CTChest:
    """One seeded chest/abdomen subject: every random draw happens here, independent of the output grid."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)

        def jit(s: float) -> float:
            return 1.0 + s * rng.uniform(-1.0, 1.0)

        self.base = np.array([hu for _, hu, _ in _CT_TISSUES], np.float32)
        self.base[[_L["liver"], _L["spleen"], _L["myocardium"], _L["muscle"]]] += rng.uniform(-5, 5, 4)
        self.amp = np.array([a for _, _, a in _CT_TISSUES], np.float32)
        # body outline: ellipse whose axes vary smoothly along z, with a few angular harmonics
        self.A, self.B = 0.86 * jit(0.04), 0.60 * jit(0.06)
        self.ab_slope = rng.uniform(-0.08, 0.08, 2)
        self.ab_wave = rng.uniform([0.015, 0.5, 0.0], [0.04, 1.2, _TWO_PI], (2, 3))
        self.harm = [(k, rng.normal(0.0, 0.012), rng.uniform(0.0, _TWO_PI)) for k in (2, 3, 4, 5)]
        self.fat = (0.05 * jit(0.3), 0.05 * jit(0.5), 0.05 * jit(0.5))  # base, towards abdomen, anterior
        self.muscle = (0.06 * jit(0.2), 0.09 * jit(0.2))  # base, posterior (paraspinal)
        # lungs and diaphragm (lung coordinates are relative to the body cavity)
        self.dome = (0.47 + rng.uniform(-0.03, 0.03), 0.44 + rng.uniform(-0.03, 0.03))  # right, left
        self.apex = 1.08 + rng.uniform(-0.04, 0.04)
        self.lungs = [
            (s, s * 0.5 * jit(0.05), 0.05 + rng.uniform(-0.04, 0.04), 0.43 * jit(0.06), 0.80 * jit(0.05))
            for s in (-1, 1)
        ]
        # organs: centres (u, v, t), semi-axes (a, b in cavity units; c in t), in-plane angle
        self.heart = (
            (
                0.17 + rng.uniform(-0.04, 0.04),
                -0.28 + rng.uniform(-0.04, 0.04),
                0.56 + rng.uniform(-0.03, 0.03),
            ),
            (0.36 * jit(0.08), 0.30 * jit(0.08), 0.15 * jit(0.1)),
            0.5 + rng.uniform(-0.2, 0.2),
        )
        self.liver = (
            (-0.33 + rng.uniform(-0.04, 0.04), -0.05 + rng.uniform(-0.04, 0.04)),
            (0.62 * jit(0.06), 0.78 * jit(0.06)),
            rng.uniform(-0.3, 0.1),
            0.12 * jit(0.3),
        )
        self.spleen = (
            (0.62, 0.38 + rng.uniform(-0.05, 0.05), 0.33 + rng.uniform(-0.04, 0.04)),
            (0.16 * jit(0.1), 0.30 * jit(0.1), 0.10 * jit(0.1)),
            -0.6 + rng.uniform(-0.2, 0.2),
        )
        self.stomach = (
            (0.36 + rng.uniform(-0.05, 0.05), -0.25, 0.32 + rng.uniform(-0.04, 0.04)),
            (0.30 * jit(0.1), 0.24 * jit(0.1), 0.10 * jit(0.2)),
            rng.uniform(-0.3, 0.3),
        )
        self.kidneys = [
            (
                (
                    s * 0.27 * jit(0.05),
                    0.25 + rng.uniform(-0.03, 0.03),
                    (0.14 if s < 0 else 0.18) + rng.uniform(-0.03, 0.03),
                ),
                (0.075 * jit(0.1), 0.13 * jit(0.1), 0.11 * jit(0.1)),
                s * 0.5,
            )
            for s in (-1, 1)
        ]
        # spine (u units): vertebral period and phase along t, sagittal curve
        self.spine = (
            0.26 + rng.uniform(-0.02, 0.02),
            rng.uniform(0.01, 0.025),
            rng.uniform(0, _TWO_PI),
            0.085 * jit(0.08),
            rng.uniform(0.0, 1.0),
            0.10 * jit(0.08),
            0.08 * jit(0.08),
        )
        # ribs: per side top height; spacing, anterior drop, half-thickness (t), half-width (radius units)
        self.ribs = dict(
            top=(1.02 + rng.uniform(-0.02, 0.02), 1.02 + rng.uniform(-0.02, 0.02)),
            step=0.085 * jit(0.05),
            n=11,
            drop=0.40 * jit(0.1),
            h=0.02,
            w=0.028,
            jitter=rng.uniform(-0.008, 0.008, (2, 11)),
        )
        # tubes: lung vessel trees, airways, aorta and IVC
        self.lung_vessels = [
            tb
            for s in (-1, 1)
            for tb in _vessel_tree(rng, s, (s * 0.17, 0.06, 0.62 + rng.uniform(-0.03, 0.03)))
        ]
        self.aorta = _Tube(
            -0.05, 1.05, (0.075, 0.12), (0.065, 0.13), tuple(rng.normal(0, 0.015, 2)), 0.055, 0.06
        )
        self.ivc = _Tube(-0.05, 0.5, (-0.10, 0.10), (-0.08, 0.06), tuple(rng.normal(0, 0.01, 2)), 0.045, 0.05)
        carina = 0.74 + rng.uniform(-0.03, 0.03)
        self.trachea = _Tube(carina, 1.1, (0.0, 0.03), (0.01, -0.01), (0.0, 0.0), 0.042, 0.045)
        self.bronchi = [
            _Tube(0.62, carina, (s * 0.2, 0.07), (0.0, 0.03), (0.0, 0.0), 0.022, 0.03) for s in (-1, 1)
        ]
        self.fine = _NoiseLattice(rng, 0.025)
        self.coarse = _NoiseLattice(rng, 0.05)

    # -- one slice -------------------------------------------------------------------------------------
    def render(self, frame: _Frame, k0: int, k1: int, labels: bool = False) -> np.ndarray:
        """HU of slices ``k0 .. k1-1`` (or their tissue labels, see :data:`CT_LABELS`)."""
        ny, nx = frame.theta.shape
        out = np.empty((k1 - k0, ny, nx), np.uint8 if labels else np.float32)
        harm = sum(c * np.cos(k * frame.theta + p) for k, c, p in self.harm).astype(np.float32)
        wf, wc = self.fine.weights(frame), self.coarse.weights(frame)
        for k in range(k0, k1):
            t = frame.t(k)
            label, lung_grad = self._labels(frame, t, harm, self.coarse.plane(t, *wc))
            if labels:
                out[k - k0] = label
                continue
            img = self.base[label] + self.amp[label] * self.fine.plane(t, *wf)
            img += lung_grad
            out[k - k0] = img
        return out

    def _labels(
        self, fr: _Frame, t: float, harm: np.ndarray, tex_c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = fr.theta.shape
        label = np.zeros((ny, nx), np.uint8)
        (sa, sb), ((wa, fa, pa), (wb, fb, pb)) = self.ab_slope, self.ab_wave
        a = self.A * (1 + sa * (t - 0.5) + wa * np.sin(_TWO_PI * fa * t + pa))
        b = self.B * (1 + sb * (t - 0.5) + wb * np.sin(_TWO_PI * fb * t + pb))
        rb = np.sqrt((fr.u / a) ** 2 + (fr.v / b) ** 2) * (1 + harm)
        fth = self.fat[0] + self.fat[1] * (1 - t) + self.fat[2] * fr.ant
        mth = self.muscle[0] + self.muscle[1] * fr.post
        inner = 1 - fth - mth
        label[rb < 1] = _L["fat"]
        label[rb < 1 - fth] = _L["muscle"]
        cav = rb < inner
        label[cav] = _L["soft"]
        label[cav & (tex_c > (0.7 if t > 0.45 else 0.2))] = _L["visceral_fat"]  # mesenteric / mediastinal fat
        # body-cavity coordinates (nominal inner radius) for lungs and upper-abdominal organs
        ca = a * (1 - self.fat[0] - self.fat[1] * (1 - t) - self.muscle[0])
        cb = b * (1 - self.fat[0] - self.fat[1] * (1 - t) - self.muscle[0])
        uc, vc = fr.u / ca, fr.v / cb
        lung = np.zeros((ny, nx), bool)
        d2_side = {}
        for s, cu, cv, la, lb in self.lungs:
            d2 = ((uc - cu) / la) ** 2 + ((vc - cv) / lb) ** 2
            d2_side[s] = d2
            g = float(np.sqrt(np.clip((self.apex - t) / 0.3, 0.0, 1.0)))
            if g <= 0:
                continue
            dome = self.dome[0 if s < 0 else 1]
            dg = ((uc - cu * (0.8 + 0.2 * g)) / (la * g)) ** 2 + ((vc - cv) / (lb * g)) ** 2
            lung |= (dg < 1) & (t > dome - 0.16 * np.minimum(d2, 1.3)) & (rb < inner - 0.015)
        self._abdomen(fr, t, label, cav, uc, d2_side, ca, cb)
        label[lung] = _L["lung"]
        for tube in self.lung_vessels:
            sec = tube.section(fr, t)
            if sec is not None:
                win, d = sec
                _paint(label, win, (d < 1) & lung[win], _L["vessel"])
        # heart: pericardial fat, myocardium, blood pool
        (hu, hv, ht), (ha, hb, hc), hang = self.heart
        for scale, name in ((1.08, "visceral_fat"), (1.0, "myocardium"), (0.72, "blood")):
            sec = _ellipsoid(fr, t, (hu * ca, hv * cb, ht), (ha * ca, hb * cb, hc), hang, scale)
            if sec is not None:
                _paint(label, sec[0], sec[1] < 1, _L[name])
        for tube, name in ((self.aorta, "blood"), (self.ivc, "blood")):
            sec = tube.section(fr, t)
            if sec is not None:
                _paint(label, sec[0], sec[1] < 1, _L[name])
        for tube in (self.trachea, *self.bronchi):
            sec = tube.section(fr, t)
            if sec is not None:
                _paint(label, sec[0], sec[1] < 1.6, _L["soft"])
                _paint(label, sec[0], sec[1] < 1, _L["gas"])
        self._spine(fr, t, label)
        self._ribs(fr, t, label, rb, fth, mth, b)
        lung_grad = np.where(label == _L["lung"], np.float32(45.0) * vc, np.float32(0.0)).astype(np.float32)
        return label, lung_grad

    def _abdomen(
        self,
        fr: _Frame,
        t: float,
        label: np.ndarray,
        cav: np.ndarray,
        uc: np.ndarray,
        d2_side: dict[int, np.ndarray],
        ca: float,
        cb: float,
    ) -> None:
        """Liver and spleen under the diaphragm domes, stomach with an air-fluid level, kidneys."""
        (lu, lv), (la, lb), lang, lbot = self.liver
        win, d = _ellipse(fr, lu * ca, lv * cb, la * ca, lb * cb, lang)
        top = self.dome[0] - 0.16 * np.minimum(d2_side[-1][win], 1.3) - 0.01
        bottom = lbot + 0.25 * np.clip((uc[:, win[1]] + 0.9) / 1.2, 0, 1)
        _paint(label, win, (d < 1) & (t < top) & (t > bottom) & cav[win], _L["liver"])
        sc, ss, sang = self.spleen
        sec = _ellipsoid(fr, t, (sc[0] * ca, sc[1] * cb, sc[2]), (ss[0] * ca, ss[1] * cb, ss[2]), sang)
        if sec is not None:
            top = self.dome[1] - 0.16 * np.minimum(d2_side[1][sec[0]], 1.3) - 0.01
            _paint(label, sec[0], (sec[1] < 1) & (t < top), _L["spleen"])
        gc, gs, gang = self.stomach
        sec = _ellipsoid(fr, t, (gc[0] * ca, gc[1] * cb, gc[2]), (gs[0] * ca, gs[1] * cb, gs[2]), gang)
        if sec is not None:
            win, d = sec
            top = self.dome[1] - 0.16 * np.minimum(d2_side[1][win], 1.3) - 0.01
            inside = (d < 1) & (t < top)
            _paint(label, win, inside, _L["muscle"])  # gastric wall
            lumen = (d < 0.75) & (t < top - 0.01)
            _paint(label, win, lumen, _L["fluid"])
            level = gc[1] * cb - 0.2 * gs[1] * cb  # gas rises anteriorly (smaller v) in a supine patient
            _paint(label, win, lumen & (fr.v[win[0], :] < level), _L["gas"])
        for centre, semi, ang in self.kidneys:
            for scale, name in ((1.3, "visceral_fat"), (1.0, "kidney_cortex"), (0.7, "kidney_medulla")):
                sec = _ellipsoid(fr, t, centre, semi, ang, scale)
                if sec is not None:
                    _paint(label, sec[0], sec[1] < 1, _L[name])
            sec = _ellipsoid(fr, t, centre, semi, ang, 0.6)
            if sec is not None:  # renal sinus fat at the medial hilum
                medial = np.abs(fr.u[:, sec[0][1]]) < abs(centre[0]) - 0.02
                _paint(label, sec[0], (sec[1] < 1) & medial, _L["visceral_fat"])

    def _spine(self, fr: _Frame, t: float, label: np.ndarray) -> None:
        """Vertebra (cortical shell, trabecular body, endplates), disc, canal and cord, posterior arch."""
        v0, curve, cphase, period, poff, ba, bb = self.spine
        sv = v0 + curve * np.sin(_TWO_PI * 0.6 * t + cphase)
        phase = ((t - poff * period) / period) % 1.0
        in_disc = phase < 0.18
        win = fr.window(0.0, sv + 0.12, 0.2, 0.3)
        x, y = fr.u[:, win[1]], fr.v[win[0], :] - sv
        body = (x / ba) ** 2 + (y / bb) ** 2
        if in_disc:
            _paint(label, win, body < 1, _L["disc"])
        else:
            shell = (phase < 0.24) or (phase > 0.95)
            _paint(label, win, body < 1, _L["cortical"] if shell else _L["trabecular"])
            if not shell:
                _paint(label, win, (body < 1) & (body > 0.7), _L["cortical"])
        rc = 0.04
        yc = bb + rc + 0.005
        canal = x * x + (y - yc) ** 2
        if not in_disc:
            _paint(label, win, canal < (rc + 0.025) ** 2, _L["cortical"])  # neural arch
            for px, py, pa, pb, ang in (
                (0.0, yc + rc + 0.075, 0.02, 0.065, 0.0),
                (-0.1, yc - 0.005, 0.065, 0.02, 0.3),
                (0.1, yc - 0.005, 0.065, 0.02, -0.3),
            ):
                c, s = np.cos(ang), np.sin(ang)
                e = (((x - px) * c + (y - py) * s) / pa) ** 2 + ((-(x - px) * s + (y - py) * c) / pb) ** 2
                _paint(label, win, e < 1, _L["cortical"])
                _paint(label, win, e < 0.45, _L["trabecular"])
        _paint(label, win, canal < rc * rc, _L["cord"])

    def _ribs(
        self,
        fr: _Frame,
        t: float,
        label: np.ndarray,
        rb: np.ndarray,
        fth: np.ndarray,
        mth: np.ndarray,
        b: float,
    ) -> None:
        """Ribs descend from the spine around the chest wall; each axial slice cuts short arcs of several."""
        r = self.ribs
        frac = (fr.psi - 0.35) / 2.1  # 0 beside the spine .. 1 at the front end of a true rib
        lowest = min(r["top"]) - (r["n"] - 1) * r["step"] - r["drop"] * 1.25 - r["h"]
        if t >= lowest:
            # floating and false ribs (the lowest ones) are shorter; true ribs end in costal cartilage
            length = np.minimum(1.0, np.linspace(1.5, 0.45, r["n"]))
            dr = (rb - (1 - fth - 0.45 * mth)) / r["w"]
            lift = t + r["drop"] * frac
            for side in (0, 1):
                on_side = (fr.u < 0) if side == 0 else (fr.u >= 0)
                n = np.clip(np.rint((r["top"][side] - lift) / r["step"]), 0, r["n"] - 1).astype(np.intp)
                dt = (lift - (r["top"][side] - n * r["step"] + r["jitter"][side][n])) / r["h"]
                m = dt * dt + dr * dr
                near = on_side & (frac >= 0) & (m < 1)
                cart = near & (frac > length[n]) & (frac <= 1.25) & (n < 7)
                rib = near & (frac <= length[n])
                label[cart] = _L["cartilage"]
                label[rib] = _L["cortical"]
                label[rib & (m < 0.5)] = _L["trabecular"]
        if 0.45 < t < 0.95:  # sternum
            sy = -b * (1 - self.fat[0] - self.fat[1] * (1 - t) - self.fat[2] - 0.5 * self.muscle[0])
            win, d = _ellipse(fr, 0.0, float(sy), 0.065, 0.028)
            _paint(label, win, d < 1, _L["cortical"])
            _paint(label, win, d < 0.5, _L["trabecular"])


# ---------------------------------------------------------------------------------------------- MR brain
_MR_TISSUES = [
    ("background", 0.0, 0.0),
    ("scalp", 0.65, 0.02),
    ("skull", 0.04, 0.005),
    ("diploe", 0.45, 0.02),
    ("csf", 0.12, 0.01),
    ("grey_matter", 0.52, 0.015),
    ("white_matter", 0.78, 0.015),
    ("deep_grey", 0.60, 0.015),
    ("lesion_hypo", 0.35, 0.02),
    ("lesion_hyper", 0.95, 0.02),
]
MR_LABELS = {name: i for i, (name, _, _) in enumerate(_MR_TISSUES)}
_M = MR_LABELS
_LT_MR = 1.6  # head depth range in u units (t 0..1 spans w -0.8..0.8)


class _MRBrain:
    """One seeded T1-weighted-like head: layers, folded cortex, ventricles, deep grey, lesions, bias field."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)

        def jit(s: float) -> float:
            return 1.0 + s * rng.uniform(-1.0, 1.0)

        self.base = np.array([v for _, v, _ in _MR_TISSUES], np.float32)
        self.base[[_M["grey_matter"], _M["white_matter"]]] *= rng.uniform(0.95, 1.05, 2)
        self.amp = np.array([a for _, _, a in _MR_TISSUES], np.float32)
        self.centre = (rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.04), rng.uniform(-0.05, 0.05))
        self.semi = (0.72 * jit(0.04), 0.90 * jit(0.03), 0.80 * jit(0.04))
        self.harm = [(k, rng.normal(0.0, 0.01), rng.uniform(0.0, _TWO_PI)) for k in (2, 3, 4)]
        self.wm_depth = 0.88 * jit(0.01)
        self.ventricles = [
            ((s * 0.09, -0.02, 0.12), (0.06 * jit(0.15), 0.32 * jit(0.08), 0.12 * jit(0.1)), s * 0.15)
            for s in (-1, 1)
        ] + [((0.0, 0.05, -0.02), (0.012, 0.10, 0.08), 0.0)]
        self.deep = [((s * 0.13, 0.12, -0.02), (0.09, 0.12, 0.10), 0.0) for s in (-1, 1)] + [
            ((s * 0.22, -0.02, 0.0), (0.05, 0.12, 0.09), s * 0.2) for s in (-1, 1)
        ]
        self.lesions = []
        while len(self.lesions) < int(rng.integers(3, 7)):
            p = rng.uniform(-1, 1, 3) * np.array(self.semi) * 0.6
            if np.sum((p / np.array(self.semi)) ** 2) < 0.36 and abs(p[0]) > 0.2:
                r = rng.uniform(0.02, 0.05)
                self.lesions.append(
                    (
                        (p[0], p[1], p[2]),
                        (r, r * rng.uniform(1, 1.6), r),
                        rng.uniform(0, np.pi),
                        "lesion_hyper" if rng.uniform() < 0.4 else "lesion_hypo",
                    )
                )
        self.bias = (rng.normal(0, 0.12, 3), rng.normal(0, 0.1))
        self.fold = _NoiseLattice(rng, 0.03)
        self.sulci = _NoiseLattice(rng, 0.05)
        self.tex = _NoiseLattice(rng, 0.02)

    def render(self, frame: _Frame, k0: int, k1: int, labels: bool = False) -> np.ndarray:
        """Magnitude of slices ``k0 .. k1-1`` (or their tissue labels, see :data:`MR_LABELS`)."""
        ny, nx = frame.theta.shape
        out = np.empty((k1 - k0, ny, nx), np.uint8 if labels else np.float32)
        harm = sum(c * np.cos(k * frame.theta + p) for k, c, p in self.harm).astype(np.float32)
        wf, ws, wt = self.fold.weights(frame), self.sulci.weights(frame), self.tex.weights(frame)
        (bx, by, bw), bq = self.bias
        for k in range(k0, k1):
            t = frame.t(k)
            w = (t - 0.5) * _LT_MR - self.centre[2]
            label = self._labels(frame, t, w, harm, self.fold.plane(t, *wf), self.sulci.plane(t, *ws))
            if labels:
                out[k - k0] = label
                continue
            img = self.base[label] * (
                1 + self.amp[label] / np.maximum(self.base[label], 1e-3) * self.tex.plane(t, *wt)
            )
            bias = np.exp(bx * frame.u + by * frame.v + bw * w + bq * (frame.u**2 + frame.v**2 - 0.3))
            out[k - k0] = np.maximum(img * bias, 0.0)
        return out

    def _labels(
        self, fr: _Frame, t: float, w: float, harm: np.ndarray, fold: np.ndarray, sulci: np.ndarray
    ) -> np.ndarray:
        label = np.zeros(fr.theta.shape, np.uint8)
        (cu, cv, _), (a, b, c) = self.centre, self.semi
        q = (w / c) ** 2
        if q >= 1:
            return label
        rho = np.sqrt((((fr.u - cu) / a) ** 2 + ((fr.v - cv) / b) ** 2) * (1 + harm) ** 2 + q)
        for r_out, name in (
            (1.0, "scalp"),
            (0.93, "skull"),
            (0.905, "diploe"),
            (0.885, "skull"),
            (0.86, "csf"),
        ):
            label[rho < r_out] = _M[name]
        rb = rho / 0.83
        brain = rb < 1
        wm_edge = self.wm_depth + 0.06 * np.clip(fold, -1.5, 1.5)
        label[brain] = _M["grey_matter"]
        label[brain & (rb < wm_edge)] = _M["white_matter"]
        label[brain & (rb > wm_edge + 0.04) & (np.abs(sulci) < 0.12)] = _M["csf"]  # sulci
        fissure = brain & (np.abs(fr.u - cu) < 0.012) & ~((np.abs(fr.v - cv) < 0.3) & (abs(w) < 0.15))
        label[fissure] = _M["csf"]
        w_t = w / _LT_MR + 0.5  # structures below are given in (u, v, t) with t = w / _LT_MR + 0.5 offsets
        for (du, dv, dw), (sa, sb, sc), ang in self.deep:
            sec = _ellipsoid(fr, w_t, (cu + du, cv + dv, 0.5 + dw / _LT_MR), (sa, sb, sc / _LT_MR), ang)
            if sec is not None:
                _paint(label, sec[0], sec[1] < 1, _M["deep_grey"])
        for (du, dv, dw), (sa, sb, sc), ang in self.ventricles:
            sec = _ellipsoid(fr, w_t, (cu + du, cv + dv, 0.5 + dw / _LT_MR), (sa, sb, sc / _LT_MR), ang)
            if sec is not None:
                _paint(label, sec[0], sec[1] < 1, _M["csf"])
        for (du, dv, dw), (sa, sb, sc), ang, name in self.lesions:
            sec = _ellipsoid(fr, w_t, (cu + du, cv + dv, 0.5 + dw / _LT_MR), (sa, sb, sc / _LT_MR), ang)
            if sec is not None:
                _paint(label, sec[0], (sec[1] < 1) & (label[sec[0]] == _M["white_matter"]), _M[name])
        return label


# ---------------------------------------------------------------------------------------------- public API
_MODELS: dict[str, tuple[Callable[[int], Any], str, str]] = {
    "ct_chest": (_CTChest, "CT", "HU"),
    "mr_brain": (_MRBrain, "MR", "arbitrary"),
}


def _check(
    kind: str, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if kind not in _MODELS:
        raise ConfigError(f"Unknown phantom kind {kind!r}.", fix=f"use one of {sorted(_MODELS)}.")
    shp = tuple(int(s) for s in shape)
    sp = tuple(float(s) for s in spacing)
    if len(shp) != 3 or min(shp) < 1:
        raise ConfigError(
            f"Phantom shape must be three positive integers (z, y, x), got {tuple(shape)}.",
            fix="pass e.g. shape=(64, 256, 256).",
        )
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ConfigError(
            f"Phantom spacing must be three positive numbers (dz, dy, dx) in mm, got {tuple(spacing)}.",
            fix="pass e.g. spacing=(2.0, 1.5, 1.5).",
        )
    return shp, sp  # type: ignore[return-value]


def phantom_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
    """Identity LPS direction, volume centre at LPS (0, 0, 0): the geometry every phantom is written with."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    return Geometry(spacing=(dz, dy, dx), origin=(-(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy, -(nz - 1) / 2 * dz))


def phantom_slab(
    kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, z0: int, z1: int
) -> np.ndarray:
    """Slices ``z0 .. z1-1`` of a phantom: bit-identical to ``make_phantom(...)[0][z0:z1]``."""
    shape, spacing = _check(kind, shape, spacing)
    if not 0 <= z0 < z1 <= shape[0]:
        raise ConfigError(f"Slab {z0}..{z1} is outside the phantom's {shape[0]} slices.")
    model = _MODELS[kind][0](int(seed))
    return model.render(_Frame.build(shape, spacing), z0, z1)


def phantom_labels(
    kind: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    z0: int = 0,
    z1: int | None = None,
) -> np.ndarray:
    """Tissue labels (uint8; :data:`CT_LABELS`, :data:`MR_LABELS`) of the voxels of :func:`phantom_slab`.

    Ground truth for per-tissue metrics (e.g. error in lung vs soft tissue) and for checking the phantoms.
    """
    shape, spacing = _check(kind, shape, spacing)
    z1 = shape[0] if z1 is None else z1
    if not 0 <= z0 < z1 <= shape[0]:
        raise ConfigError(f"Slab {z0}..{z1} is outside the phantom's {shape[0]} slices.")
    return _MODELS[kind][0](int(seed)).render(_Frame.build(shape, spacing), z0, z1, labels=True)


def ct_phantom(
    shape: tuple[int, int, int] = (64, 256, 256),
    spacing: tuple[float, float, float] = (2.0, 1.5, 1.5),
    seed: int = 0,
) -> tuple[np.ndarray, Geometry]:
    """Chest/upper-abdomen CT in HU (z, y, x) float32: body, fat, muscle, lungs with vessels, heart, liver,
    spleen, stomach, kidneys, spine, ribs, smooth texture; z runs from the kidneys up to the lung apices."""
    shape, spacing = _check("ct_chest", shape, spacing)
    return phantom_slab("ct_chest", shape, spacing, seed, 0, shape[0]), phantom_geometry(shape, spacing)


def mr_brain_phantom(
    shape: tuple[int, int, int] = (64, 256, 256),
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    seed: int = 0,
) -> tuple[np.ndarray, Geometry]:
    """T1-weighted-like MR magnitude (arbitrary units, about 0..1, non-negative), (z, y, x) float32."""
    shape, spacing = _check("mr_brain", shape, spacing)
    return phantom_slab("mr_brain", shape, spacing, seed, 0, shape[0]), phantom_geometry(shape, spacing)


PHANTOMS: dict[str, Callable[..., tuple[np.ndarray, Geometry]]] = {
    "ct_chest": ct_phantom,
    "mr_brain": mr_brain_phantom,
}


def phantom_meta(
    kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int
) -> dict[str, Any]:
    """Attributes stored with a phantom: modality, units, what made it (kind, seed, grid) and provenance."""
    shape, spacing = _check(kind, shape, spacing)
    _, modality, units = _MODELS[kind]
    params = {"kind": kind, "seed": int(seed), "shape": list(shape), "spacing": list(spacing)}
    return {
        "modality": modality,
        "units": units,
        "kind": kind,
        "seed": int(seed),
        "phantom": params,
        "provenance": provenance({"phantom": params}, seeds={"phantom": int(seed)}),
    }


def make_phantom(
    kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    """A whole phantom in memory: ``(array (z, y, x) float32, Geometry, meta)``."""
    shape, spacing = _check(kind, shape, spacing)
    data, geometry = PHANTOMS[kind](shape, spacing, seed)
    return data, geometry, phantom_meta(kind, shape, spacing, seed)


def write_phantom_volume(
    kind: str,
    out_zarr: str | Path,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    chunk_depth: int | None = None,
) -> Path:
    """Write a phantom as a medrecon Volume, one chunk-aligned slab at a time (memory: one slab)."""
    shape, spacing = _check(kind, shape, spacing)
    model = _MODELS[kind][0](int(seed))
    frame = _Frame.build(shape, spacing)
    out = Path(out_zarr)
    with Volume.create(
        out, shape, phantom_geometry(shape, spacing), phantom_meta(kind, shape, spacing, seed), chunk_depth
    ) as w:
        for z0 in range(0, shape[0], w.chunk_depth):
            z1 = min(z0 + w.chunk_depth, shape[0])
            w.write_slab(z0, model.render(frame, z0, z1))
    return out
