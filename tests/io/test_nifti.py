"""NIfTI ingest: any orientation/byte order → the same canonical (z, y, x) array and LPS geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt

from medrecon.errors import InputError
from medrecon.io.nifti import ingest_nifti, nifti_affine, open_nifti, read_nifti, write_nifti
from medrecon.io.phantoms import ct_phantom
from medrecon.provenance import file_sha256
from medrecon.volume import Geometry, Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, Geometry]:
    data, g = ct_phantom((7, 24, 30), (5.0, 2.0, 1.75), seed=1)
    return data, Geometry(g.spacing, (12.5, -30.0, 40.0))


def _reorient(src: Path, axcodes: str, dst: Path, endianness: str | None = None) -> Path:
    """Store the same image with its voxel axes flipped/permuted to ``axcodes`` (affine adjusted to match)."""
    img = nib.load(str(src))
    new = img.as_reoriented(ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(axcodes)))
    data = np.asarray(new.dataobj)
    header = nib.Nifti1Header(endianness=endianness) if endianness else None
    out = nib.Nifti1Image(data, new.affine, header=header)
    out.set_sform(new.affine, code=1)
    out.header.set_xyzt_units("mm")
    nib.save(out, str(dst))
    return dst


def _check_world_coordinates(path: Path, arr: np.ndarray, geometry: Geometry) -> None:
    """Every voxel lands where the file's own affine says it is (values are unique: an arange volume)."""
    img = nib.load(str(path))
    raw = np.asarray(img.dataobj, dtype=np.float64)
    ijk = np.argwhere(np.ones(raw.shape, bool))
    world_lps = (RAS_TO_LPS @ nib.affines.apply_affine(img.affine, ijk).T).T
    order = np.argsort(arr.ravel())
    pos = order[np.searchsorted(arr.ravel()[order], raw[tuple(ijk.T)])]
    kji = np.stack(np.unravel_index(pos, arr.shape), axis=1)
    np.testing.assert_allclose(geometry.index_to_lps(kji), world_lps, atol=1e-4)


def test_round_trip_through_write_nifti(phantom, tmp_path):
    data, g = phantom
    path = write_nifti(tmp_path / "ct.nii", data, g)
    assert nib.aff2axcodes(nib.load(str(path)).affine) == ("L", "P", "S")
    [(arr, geo, meta)] = read_nifti(path, modality="CT")
    np.testing.assert_array_equal(arr, data)
    assert geo.isclose(g)
    assert meta["modality"] == "CT" and meta["units"] == "HU"
    assert meta["source"]["files"] == [{"path": str(path), "sha256": file_sha256(path)}]
    assert meta["nifti"]["orientation_in_file"] == "LPS" and meta["timepoint"] is None
    assert "provenance" in meta


@pytest.mark.parametrize(
    "axcodes,endianness",
    [("RAS", None), ("LAS", None), ("RPI", None), ("PSR", None), ("ASL", ">"), ("RAS", ">")],
)
def test_every_storage_orientation_gives_the_same_array_and_geometry(phantom, tmp_path, axcodes, endianness):
    data, g = phantom
    base = write_nifti(tmp_path / "lps.nii", data, g)
    path = _reorient(base, axcodes, tmp_path / f"{axcodes}.nii.gz", endianness)
    img = nib.load(str(path))
    assert "".join(nib.aff2axcodes(img.affine)) == axcodes
    if endianness:
        assert img.header.endianness == ">"
    [(arr, geo, meta)] = read_nifti(path)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(geo.origin, g.origin, atol=1e-4)
    np.testing.assert_allclose(geo.direction, g.direction, atol=1e-6)
    np.testing.assert_allclose(geo.spacing, g.spacing, atol=1e-5)
    assert meta["nifti"]["orientation_in_file"] == axcodes
    assert meta["nifti"]["byte_order"] == ("big" if endianness else "little")


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_oblique_affine_keeps_its_rotation_in_the_direction_cosines(tmp_path):
    shape, sizes = (9, 8, 5), np.array([1.2, 0.9, 3.0])  # file axes i, j, k
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.radians(12), np.radians(-8), np.radians(20)) @ np.diag(sizes)
    affine[:3, 3] = [-40.0, 25.0, 7.5]
    raw = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    path = tmp_path / "oblique.nii"
    nib.save(nib.Nifti1Image(raw, affine), str(path))
    [(arr, geo, _)] = read_nifti(path)
    assert arr.shape == (5, 8, 9)  # axial: k is closest to S, i to R, j to A → (z, y, x) = (k, -j, -i)
    np.testing.assert_allclose(geo.spacing, sizes[::-1], rtol=1e-6)
    d = geo.direction_matrix
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    assert np.abs(d - np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])).max() > 0.1  # rotation kept, not snapped
    assert np.all(np.diag(d[:, ::-1]) > 0.8)  # but the array axes still point (x, y, z) ≈ (L, P, S)
    _check_world_coordinates(path, arr, geo)
    # the same oblique image stored flipped gives the same canonical array and geometry
    flipped = tmp_path / "oblique_flipped.nii"
    flip = np.array([[0, -1], [1, 1], [2, -1]])
    img = nib.load(str(path))
    nib.save(img.as_reoriented(flip), str(flipped))
    [(arr2, geo2, _)] = read_nifti(flipped)
    np.testing.assert_array_equal(arr2, arr)
    assert geo2.isclose(geo)


def test_sagittal_storage_maps_world_coordinates_exactly(tmp_path):
    shape = (6, 7, 8)
    raw = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    affine = np.array(
        [[0, 0, -1.1, 30.0], [1.3, 0, 0, -20.0], [0, -0.8, 0, 15.0], [0, 0, 0, 1]]
    )  # i→A, j→I, k→L
    path = tmp_path / "sag.nii"
    nib.save(nib.Nifti1Image(raw, affine), str(path))
    [(arr, geo, meta)] = read_nifti(path)
    assert meta["nifti"]["orientation_in_file"] == "AIL"
    assert arr.shape == (7, 6, 8)
    np.testing.assert_allclose(geo.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]], atol=1e-12)
    _check_world_coordinates(path, arr, geo)


def test_scaling_units_and_integer_storage(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    affine = np.diag([0.0015, 0.0015, 0.004, 1.0])  # metres
    affine[:3, 3] = [0.01, -0.02, 0.03]
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(2.0, -1024.0)
    img.header.set_xyzt_units("meter")
    path = tmp_path / "scaled.nii"
    nib.save(img, str(path))
    [(arr, geo, meta)] = read_nifti(path)
    np.testing.assert_array_equal(
        arr, (raw.astype(np.float32) * 2.0 - 1024.0).transpose(2, 1, 0)[:, ::-1, ::-1]
    )
    np.testing.assert_allclose(geo.spacing, (4.0, 1.5, 1.5), rtol=1e-6)
    # R→L and A→P flips move the origin to the file's last i and j voxels:
    # LPS = (-(10 + 2 * 1.5), -(-20 + 3 * 1.5), 30)
    np.testing.assert_allclose(geo.origin, [-13.0, 15.5, 30.0], atol=1e-5)
    assert meta["nifti"]["spatial_unit_in_file"] == "meter" and meta["nifti"]["scl_slope"] == 2.0


def _write_4d(path: Path, n_t: int = 3) -> np.ndarray:
    base = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    raw = np.stack([base + 1000 * t for t in range(n_t)], axis=-1)
    img = nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 2.0, 1.0]))  # already L, P, S
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return raw


def test_4d_split_error_and_timepoint_selection(tmp_path):
    path = tmp_path / "dyn.nii"
    raw = _write_4d(path)
    with pytest.raises(InputError, match=r"4D with 3 time points.*on_4d: split") as err:
        read_nifti(path)
    assert str(path) in str(err.value)
    vols = read_nifti(path, on_4d="split")
    assert len(vols) == 3
    for t, (arr, geo, meta) in enumerate(vols):
        np.testing.assert_array_equal(arr, raw[..., t].transpose(2, 1, 0))
        assert meta["timepoint"] == t and meta["n_timepoints"] == 3
        np.testing.assert_allclose(geo.spacing, (2.0, 1.0, 1.0))
    written = ingest_nifti(path, tmp_path / "out", on_4d="split")
    assert [p.name for p in written] == ["dyn_t0.zarr", "dyn_t1.zarr", "dyn_t2.zarr"]
    np.testing.assert_array_equal(Volume.open(written[2]).read(), raw[..., 2].transpose(2, 1, 0))
    with pytest.raises(InputError, match="pass `timepoint`"):
        ingest_nifti(path, tmp_path / "one.zarr", on_4d="split")
    [one] = ingest_nifti(path, tmp_path / "one.zarr", on_4d="split", timepoint=1)
    assert Volume.open(one).meta["timepoint"] == 1
    np.testing.assert_array_equal(Volume.open(one).read(), raw[..., 1].transpose(2, 1, 0))
    with pytest.raises(InputError, match=r"time points 0\.\.2"):
        ingest_nifti(path, tmp_path / "bad.zarr", on_4d="split", timepoint=3)


def test_5d_nan_corrupt_and_sheared_files_are_errors_naming_the_file(tmp_path):
    five = tmp_path / "five.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4)), str(five))
    with pytest.raises(InputError, match="5D") as err:
        read_nifti(five, on_4d="split")
    assert str(five) in str(err.value)

    nan = tmp_path / "nan.nii.gz"
    raw = np.ones((4, 4, 4), np.float32)
    raw[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(nan))
    with pytest.raises(InputError, match=r"nan\.nii\.gz has 1 NaN/Inf voxels"):
        read_nifti(nan)
    with pytest.raises(InputError, match="NaN/Inf"):
        ingest_nifti(nan, tmp_path / "nan.zarr")
    assert not (tmp_path / "nan.zarr").exists()

    good = write_nifti(tmp_path / "good.nii", np.zeros((20, 20, 20), np.float32), Geometry())
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(good.read_bytes()[:1000])
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not a nifti file" * 20)
    for bad in (truncated, junk):
        with pytest.raises(InputError) as err:
            read_nifti(bad)
        assert str(bad) in str(err.value) and "Fix:" in str(err.value)

    sheared = tmp_path / "sheared.nii"
    affine = np.eye(4)
    affine[0, 1] = 0.5
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), affine), str(sheared))
    with pytest.raises(InputError, match="sheared"):
        read_nifti(sheared)


def test_missing_orientation_warns_and_is_recorded(tmp_path):
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), None)
    img.header.set_zooms((1.0, 2.0, 3.0))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    path = tmp_path / "bare.nii"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match="no sform/qform"):
        [(arr, geo, meta)] = read_nifti(path)
    assert meta["nifti"]["affine_source"] == "none" and arr.shape == (5, 4, 3)
    np.testing.assert_allclose(geo.spacing, (3.0, 2.0, 1.0))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_ingest_writes_a_complete_volume_slab_by_slab(phantom, tmp_path, suffix):
    data, g = phantom
    base = write_nifti(tmp_path / "lps.nii", data, g)
    # sagittal storage: the file axis that becomes z is not the last one, so slabs are strided reads
    path = _reorient(base, "SPL", tmp_path / f"sag{suffix}")
    assert open_nifti(path).streamable == (suffix == ".nii")
    [out] = ingest_nifti(path, tmp_path / "vol.zarr", meta_extra={"modality": "CT"}, chunk_depth=2)
    vol = Volume.open(out)
    assert vol.chunk_depth == 2
    np.testing.assert_array_equal(vol.read(), data)
    assert vol.geometry.isclose(g)
    assert vol.meta["modality"] == "CT" and vol.meta["units"] == "HU"
    assert vol.meta["source"]["files"][0]["sha256"] == file_sha256(path)
    assert vol.meta["nifti"]["orientation_in_file"] == "SPL"
    # the geometry round-trips back to the file's affine
    assert np.allclose(nifti_affine(vol.geometry), nifti_affine(g))
    [again] = ingest_nifti(path, tmp_path / "dir")
    assert again == tmp_path / "dir" / "sag.zarr" and Volume.open(again).meta["modality"] == "unknown"
