"""The montage shows planes in the radiological convention, from each volume's stored geometry.

A bright voxel is put near the patient's superior, right, anterior corner, at a different distance from
each face (1 voxel below the top, 2 in from the right, 3 in from the front) so a flip or a transpose moves
it. Whatever the array order of the store (LPS, RAS-like, or a permuted acquisition), the figure's image
arrays must show it where the convention says: axial (anterior up, right on the viewer's left), coronal
(superior up, right on the left), sagittal (superior up, anterior on the left).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from medrecon.report.figures import CONVENTION, PLANES, montage_figure
from medrecon.volume import Geometry, Volume

INSET = {"superior": 1, "right": 2, "anterior": 3}

# Direction matrices: columns are the LPS unit vectors of the array axes (z, y, x).
GEOMETRIES = {
    # medrecon's ingest of DICOM/phantoms: z -> superior, y -> posterior, x -> patient's left
    "lps": ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    # every axis reversed: slices head to feet, rows from the back, columns toward the right
    "reversed": ((0, 0, -1), (0, -1, 0), (-1, 0, 0)),
    # a permuted store: axis 0 -> anterior, axis 1 -> inferior, axis 2 -> left
    "permuted": ((0, 0, 1), (-1, 0, 0), (0, -1, 0)),
}


def _marker_volume(path, direction) -> tuple[Volume, tuple[int, int, int]]:
    d = np.asarray(direction, float)
    shape = (11, 13, 15)
    spacing = (2.0, 1.0, 1.5)
    idx = [0, 0, 0]
    # (LPS axis, want its high end?, inset): superior = high S, right = low L, anterior = low P
    for lps, high, inset in ((2, True, INSET["superior"]), (0, False, INSET["right"]),
                             (1, False, INSET["anterior"])):
        a = int(np.argmax(np.abs(d[lps])))
        toward_high_index = (d[lps, a] > 0) == high
        idx[a] = shape[a] - 1 - inset if toward_high_index else inset
    data = np.zeros(shape, np.float32)
    data[tuple(idx)] = 10.0
    vol = Volume.from_array(path, data, Geometry(spacing, (0.0, 0.0, 0.0), direction), {"modality": "CT"})
    return vol, tuple(idx)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_marker_lands_where_the_convention_says(tmp_path, name):
    vol, idx = _marker_volume(tmp_path / "v.zarr", GEOMETRIES[name])
    fig, axes = montage_figure(vol, {"rec": vol}, (0.0, 10.0), index=idx)
    try:
        s, r, a = INSET["superior"], INSET["right"], INSET["anterior"]
        expect = {"axial": (a, r), "coronal": (s, r), "sagittal": (s, a)}   # (row from top, column from left)
        for row in (0, 1):                                                  # reference and the method
            for c, plane in enumerate(PLANES):
                im = axes[row, c].images[0]
                assert im.origin == "upper"
                img = np.asarray(im.get_array())
                got = np.unravel_index(int(np.argmax(img)), img.shape)
                assert got == expect[plane], (name, plane, got, img.shape)
        assert axes[0, 0].get_title() == "axial"
    finally:
        plt.close(fig)


def test_aspect_follows_spacing(tmp_path):
    vol, idx = _marker_volume(tmp_path / "v.zarr", GEOMETRIES["lps"])
    fig, axes = montage_figure(vol, {}, (0.0, 10.0), index=idx)
    try:
        # spacing (dz, dy, dx) = (2, 1, 1.5): axial rows are y, columns x; coronal/sagittal rows are z
        aspects = [axes[0, c].get_aspect() for c in range(3)]
        assert aspects == pytest.approx([1.0 / 1.5, 2.0 / 1.5, 2.0 / 1.0])
    finally:
        plt.close(fig)


def test_convention_is_stated():
    assert "superior up" in CONVENTION and "right is on the viewer's left" in CONVENTION
