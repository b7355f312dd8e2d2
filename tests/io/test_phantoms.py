"""Synthetic phantoms: seeded, anatomy-like intensities, slab generation identical to the whole volume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medrecon.errors import ConfigError
from medrecon.io.phantoms import (
    CT_LABELS,
    MR_LABELS,
    PHANTOMS,
    ct_phantom,
    make_phantom,
    mr_brain_phantom,
    phantom_labels,
    phantom_slab,
    write_phantom_volume,
)
from medrecon.volume import Volume

CT_SHAPE, CT_SPACING = (32, 128, 128), (4.0, 3.0, 3.0)
MR_SHAPE, MR_SPACING = (24, 96, 96), (6.0, 2.5, 2.5)


@pytest.fixture(scope="module")
def ct() -> tuple[np.ndarray, np.ndarray]:
    data, _ = ct_phantom(CT_SHAPE, CT_SPACING, seed=7)
    return data, phantom_labels("ct_chest", CT_SHAPE, CT_SPACING, seed=7)


def test_same_seed_same_array_different_seed_different_anatomy():
    a, ga = ct_phantom((12, 64, 64), (8.0, 6.0, 6.0), seed=3)
    b, gb = ct_phantom((12, 64, 64), (8.0, 6.0, 6.0), seed=3)
    c, _ = ct_phantom((12, 64, 64), (8.0, 6.0, 6.0), seed=4)
    assert a.dtype == np.float32 and a.shape == (12, 64, 64)
    np.testing.assert_array_equal(a, b)
    assert ga == gb
    # another subject: organ positions and sizes differ, not only the texture
    la = phantom_labels("ct_chest", (12, 64, 64), (8.0, 6.0, 6.0), seed=3)
    lc = phantom_labels("ct_chest", (12, 64, 64), (8.0, 6.0, 6.0), seed=4)
    assert np.mean(la != lc) > 0.02
    assert np.mean(np.abs(a - c)) > 10.0


def test_geometry_is_centred_lps_with_the_requested_spacing():
    _, g = ct_phantom((10, 40, 50), (2.5, 1.25, 1.0), seed=0)
    assert g.spacing == (2.5, 1.25, 1.0)
    centre = g.index_to_lps(np.array([4.5, 19.5, 24.5]))
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    np.testing.assert_allclose(g.direction_matrix, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def test_ct_tissue_classes_have_their_hounsfield_values(ct):
    data, labels = ct
    median = {
        name: float(np.median(data[labels == lab]))
        for name, lab in CT_LABELS.items()
        if np.any(labels == lab)
    }
    for name in (
        "air",
        "fat",
        "muscle",
        "lung",
        "vessel",
        "liver",
        "spleen",
        "kidney_cortex",
        "myocardium",
        "trabecular",
        "cortical",
        "disc",
    ):
        assert name in median, f"{name} missing from the CT phantom"
    assert median["air"] == -1000.0
    assert -880 < median["lung"] < -820
    assert -120 < median["fat"] < -80
    for soft in ("muscle", "liver", "spleen", "kidney_cortex", "myocardium", "vessel"):
        assert 25 < median[soft] < 80, (soft, median[soft])
    assert median["liver"] > median["kidney_cortex"]  # small organ contrast, as in unenhanced CT
    assert 300 < median["trabecular"] < median["cortical"] < 1100
    # the anatomy is all there in realistic proportions of the volume
    frac = {name: np.mean(labels == lab) for name, lab in CT_LABELS.items()}
    assert 0.05 < frac["lung"] < 0.35 and frac["air"] > 0.1 and frac["fat"] > 0.03
    assert 0.002 < frac["cortical"] + frac["trabecular"] < 0.05
    assert data.min() >= -1100 and data.max() < 1200


def test_ct_texture_is_smooth_and_spatially_correlated(ct):
    data, labels = ct
    k = int(np.argmax((labels == CT_LABELS["liver"]).sum(axis=(1, 2))))
    liver = labels[k] == CT_LABELS["liver"]
    # pairs of horizontally neighbouring liver voxels, and pairs 12 voxels (36 mm) apart
    near = liver[:, 1:] & liver[:, :-1]
    far = liver[:, 12:] & liver[:, :-12]
    sl = data[k]
    assert sl[liver].std() > 1.5  # not piecewise constant
    c_near = np.corrcoef(sl[:, 1:][near], sl[:, :-1][near])[0, 1]
    c_far = np.corrcoef(sl[:, 12:][far], sl[:, :-12][far])[0, 1]
    assert c_near > 0.6 and abs(c_far) < 0.4 and c_near > c_far + 0.3


@pytest.mark.parametrize("kind", sorted(PHANTOMS))
def test_slab_generation_equals_slicing_the_whole_volume(kind):
    shape, spacing = (20, 48, 56), (5.0, 4.0, 3.5)
    whole, _, _ = make_phantom(kind, shape, spacing, seed=11)
    for z0, z1 in ((0, 1), (3, 11), (11, 20), (19, 20)):
        np.testing.assert_array_equal(phantom_slab(kind, shape, spacing, 11, z0, z1), whole[z0:z1])


def test_different_shapes_show_the_same_anatomy():
    """Same field of view at two resolutions: labels agree wherever the coarse voxel is not on an edge."""
    coarse = phantom_labels("ct_chest", (16, 64, 64), (8.0, 6.0, 6.0), seed=2)
    fine = phantom_labels("ct_chest", (32, 128, 128), (4.0, 3.0, 3.0), seed=2)
    other = phantom_labels("ct_chest", (16, 64, 64), (8.0, 6.0, 6.0), seed=9)
    same = np.mean(fine[::2, ::2, ::2] == coarse)
    assert same > 0.85
    assert same > np.mean(other == coarse) + 0.04


def test_write_phantom_volume_streams_a_complete_volume(tmp_path):
    shape, spacing = (13, 40, 40), (5.0, 4.0, 4.0)
    out = write_phantom_volume("ct_chest", tmp_path / "ct.zarr", shape, spacing, seed=5, chunk_depth=4)
    vol = Volume.open(out)
    whole, geometry, meta = make_phantom("ct_chest", shape, spacing, seed=5)
    np.testing.assert_array_equal(vol.read(), whole)
    assert vol.chunk_depth == 4 and vol.geometry.isclose(geometry)
    assert vol.meta["modality"] == "CT" and vol.meta["units"] == "HU"
    assert vol.meta["phantom"] == {
        "kind": "ct_chest",
        "seed": 5,
        "shape": [13, 40, 40],
        "spacing": [5.0, 4.0, 4.0],
    }
    assert vol.meta["provenance"]["seeds"] == {"phantom": 5}
    assert meta["modality"] == "CT" and meta["seed"] == 5


def test_mr_brain_is_non_negative_with_tissue_contrast():
    data, _ = mr_brain_phantom(MR_SHAPE, MR_SPACING, seed=1)
    labels = phantom_labels("mr_brain", MR_SHAPE, MR_SPACING, seed=1)
    assert data.dtype == np.float32 and data.min() >= 0.0 and 0.7 < data.max() < 1.6
    mean = {
        name: float(data[labels == lab].mean()) for name, lab in MR_LABELS.items() if np.any(labels == lab)
    }
    assert mean["background"] == 0.0
    assert mean["white_matter"] > mean["grey_matter"] + 0.1 > mean["csf"] + 0.2  # T1-weighted ordering
    assert mean["skull"] < 0.1
    assert any(name.startswith("lesion") for name in mean)
    assert np.mean(labels == MR_LABELS["csf"]) > 0.005  # ventricles, sulci, subarachnoid space
    # the cortex is folded: the outline of the white matter (holes filled) lies inside the brain, yet is
    # longer than the brain's smooth outline (a smooth inner contour would be shorter)
    k = MR_SHAPE[0] // 2
    wm = ndimage.binary_fill_holes(labels[k] == MR_LABELS["white_matter"])
    inside_skull = (labels[k] != MR_LABELS["background"]) & ~np.isin(
        labels[k], [MR_LABELS["scalp"], MR_LABELS["skull"], MR_LABELS["diploe"]]
    )
    assert _edges(wm) > 1.25 * _edges(inside_skull)
    # smooth bias field: the same tissue differs across the head by a few percent at least
    wm_vals = data[k][labels[k] == MR_LABELS["white_matter"]]
    assert np.percentile(wm_vals, 95) / np.percentile(wm_vals, 5) > 1.05


def _edges(mask: np.ndarray) -> int:
    return int(np.sum(mask[1:, :] != mask[:-1, :]) + np.sum(mask[:, 1:] != mask[:, :-1]))


def test_bad_requests_raise_config_errors():
    with pytest.raises(ConfigError, match="Unknown phantom kind 'ct_head'"):
        make_phantom("ct_head", (4, 8, 8), (1, 1, 1), 0)
    with pytest.raises(ConfigError, match="shape"):
        ct_phantom((0, 8, 8), (1, 1, 1), 0)
    with pytest.raises(ConfigError, match="spacing"):
        ct_phantom((4, 8, 8), (1, -1, 1), 0)
    with pytest.raises(ConfigError, match="outside"):
        phantom_slab("mr_brain", (4, 8, 8), (1, 1, 1), 0, 3, 6)
