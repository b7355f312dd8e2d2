"""The smooth phase model of MR images, in NumPy alone.

Real MR images carry a slowly varying B0/B1 phase; the measure step puts this model's phase on magnitude
volumes, and the MR slice prior is trained with phases of the same family (``random_phase: smooth``). It lives
apart from :mod:`medrecon.physics.mri` so that training a prior does not import SigPy (a training machine, a
lent GPU for instance, need not carry the MRI operator's dependencies).
"""

from __future__ import annotations

import math

import numpy as np


def smooth_phase(shape: tuple[int, ...], seed: int, max_phase: float = math.pi / 2,
                 z_range: tuple[int, int] | None = None) -> np.ndarray:
    """A smooth random phase map (radians, float32): real MR images carry B0/B1 phase that priors see.

    phi = sum_k a_k m_k(z, y, x) over the monomials of degree <= 2 in coordinates scaled to [-1, 1],
    a_k ~ N(0, 1) from ``numpy.random.default_rng(seed)``, rescaled by max_phase / sum |a_k| so that
    |phi| <= max_phase everywhere. ``shape`` is the whole (Z, Y, X) volume (or (Y, X)); ``z_range`` returns
    only slices z0..z1-1, so slabs of one volume get pieces of one phase map.
    """
    shape = tuple(int(s) for s in shape)
    planar = len(shape) == 2
    nz, ny, nx = (1, *shape) if planar else shape
    z0, z1 = z_range or (0, nz)

    def axis(n: int, a: int, b: int) -> np.ndarray:
        return (np.arange(a, b) - (n - 1) / 2) / max((n - 1) / 2, 1)

    z, y, x = np.meshgrid(axis(nz, z0, z1), axis(ny, 0, ny), axis(nx, 0, nx), indexing="ij")
    terms = [np.ones_like(x), z, y, x, z * z, y * y, x * x, z * y, z * x, y * x]
    a = np.random.default_rng(seed).standard_normal(len(terms))
    phi = sum(ak * t for ak, t in zip(a, terms, strict=True)) * (max_phase / np.abs(a).sum())
    return (phi[0] if planar else phi).astype(np.float32)
