"""DICOM ingest on synthetic series written by medrecon's own writer: geometry, values, and every refusal."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medrecon.errors import ConfigError, InputError
from medrecon.io.dicom import DicomOptions, ingest_dicom, plan_series, read_slice, scan
from medrecon.io.dicom_writer import quantise, write_dicom_series
from medrecon.volume import Geometry, Volume

SPACING = (2.5, 0.8, 0.7)
ORIGIN = (-10.0, 20.0, -30.0)


def _ct(shape: tuple[int, ...], seed: int = 0, slope: float = 0.5) -> np.ndarray:
    """Random CT-like values on the stored grid of (slope, intercept -1024): exact through DICOM."""
    rng = np.random.default_rng(seed)
    return (-1024.0 + slope * rng.integers(0, 6000, size=shape)).astype(np.float32)


def _direction(r: np.ndarray, c: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """medrecon direction (columns z, y, x) for a DICOM row cosine r and column cosine c."""
    n = np.cross(r, c)
    return tuple(tuple(row) for row in np.stack([n, c, r], axis=1))


def _stores(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ round trips
def test_round_trip_shuffled_names_and_rescale(tmp_path: Path) -> None:
    vol = _ct((6, 9, 11))
    geo = Geometry(SPACING, ORIGIN)
    files = write_dicom_series(vol, geo, tmp_path / "dcm", rescale_slope=0.5, rescale_intercept=-1024,
                               shuffle_names=True, seed=3)
    names = [f.name for f in files]
    assert names != sorted(names)  # directory order says nothing about slice order
    out = ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    v = Volume.open(out[0])
    np.testing.assert_array_equal(v.read(), vol)
    assert v.geometry.isclose(geo, rtol=1e-6, atol=1e-6)
    assert v.meta["modality"] == "CT" and v.meta["units"] == "HU"
    assert v.meta["complete"] is True
    srcs = v.meta["source"]["files"]
    assert len(srcs) == 6 and all(len(f["sha256"]) == 64 for f in srcs)
    assert v.meta["dicom_geometry"]["tilt_deg"] == 0.0
    assert v.meta["ingest_options"]["on_tilt"] == "error"


@pytest.mark.parametrize("orientation", ["sagittal", "oblique"])
def test_round_trip_non_axial(tmp_path: Path, orientation: str) -> None:
    if orientation == "sagittal":
        r, c = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    else:
        from scipy.spatial.transform import Rotation

        m = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
        r, c = m[:, 0], m[:, 1]
    geo = Geometry((3.0, 0.9, 1.1), (5.0, -7.0, 11.0), _direction(r, c))
    vol = _ct((5, 8, 10), seed=1)
    write_dicom_series(vol, geo, tmp_path / "dcm", rescale_slope=0.5, rescale_intercept=-1024,
                       shuffle_names=True)
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0])
    np.testing.assert_array_equal(v.read(), vol)
    np.testing.assert_allclose(v.geometry.spacing, geo.spacing, rtol=1e-6)
    np.testing.assert_allclose(v.geometry.origin, geo.origin, atol=1e-6)
    np.testing.assert_allclose(v.geometry.direction, geo.direction, atol=1e-7)


def test_slices_stored_against_the_normal_are_reordered(tmp_path: Path) -> None:
    """Slice axis written as -(row x col): the reader orders by the normal, so z is flipped, origin moves."""
    r, c = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    d = np.stack([-np.cross(r, c), c, r], axis=1)
    geo = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 50.0), tuple(tuple(row) for row in d))
    vol = _ct((4, 5, 6), seed=2)
    write_dicom_series(vol, geo, tmp_path / "dcm", rescale_slope=0.5, rescale_intercept=-1024)
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0])
    np.testing.assert_array_equal(v.read(), vol[::-1])
    np.testing.assert_allclose(v.geometry.origin, (0.0, 0.0, 44.0))
    np.testing.assert_allclose(v.geometry.direction_matrix[:, 0], (0, 0, 1), atol=1e-12)


def test_mr_float_values_quantised_within_half_a_slope(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vol = rng.uniform(0.0, 1.7, size=(4, 6, 7)).astype(np.float32)
    write_dicom_series(vol, Geometry(SPACING), tmp_path / "dcm", modality="MR")
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0])
    slope = float(pydicom.dcmread(next((tmp_path / "dcm").iterdir())).RescaleSlope)
    assert v.meta["modality"] == "MR" and v.meta["units"] == "arbitrary"
    assert np.abs(v.read() - vol).max() <= slope / 2 + 1e-6
    assert slope == pytest.approx(vol.max() / 65535, rel=1e-6)


def test_per_file_rescale_is_applied(tmp_path: Path) -> None:
    """Slices may carry different RescaleSlope/Intercept; each file is rescaled with its own."""
    vol = np.full((3, 4, 4), 100.0, dtype=np.float32)
    files = write_dicom_series(vol, Geometry(SPACING), tmp_path / "dcm", rescale_slope=1, rescale_intercept=0)
    ds = pydicom.dcmread(files[1])
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-50"  # same stored 100 now means 150
    ds.save_as(files[1])
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0]).read()
    assert v[0].max() == 100 and v[1].min() == 150 and v[2].max() == 100


def test_writer_is_deterministic_and_signed_when_needed(tmp_path: Path) -> None:
    vol = _ct((3, 4, 5), slope=1.0) - 500  # below -1024: needs signed storage with intercept -1024
    a = write_dicom_series(vol, Geometry(SPACING), tmp_path / "a", seed=9)
    b = write_dicom_series(vol, Geometry(SPACING), tmp_path / "b", seed=9)
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    ds = pydicom.dcmread(a[0])
    assert ds.PixelRepresentation == 1 and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(read_slice(a[0]), vol[0])
    unsigned = write_dicom_series(_ct((3, 4, 5)), Geometry(SPACING), tmp_path / "u", rescale_slope=0.5)
    assert pydicom.dcmread(unsigned[0]).PixelRepresentation == 0


def test_writer_refuses_values_outside_the_stored_range() -> None:
    with pytest.raises(InputError, match="do not fit unsigned 16-bit"):
        quantise(np.array([0.0, 70000.0]), 1.0, 0.0, signed=False)
    stored, signed = quantise(np.array([-3.0, 4.5]), 0.5, 0.0)
    assert signed and stored.dtype == np.int16 and stored.tolist() == [-6, 9]


# ---------------------------------------------------------------------------------------- several series
def test_two_series_in_one_folder_are_never_merged(tmp_path: Path) -> None:
    geo = Geometry(SPACING, ORIGIN)
    a, b = _ct((4, 6, 6), seed=1), _ct((4, 6, 6), seed=2)  # same positions: a naive stacker merges them
    write_dicom_series(a, geo, tmp_path / "dcm", series_number=1, series_description="first", seed=7,
                       rescale_slope=0.5)
    write_dicom_series(b, geo, tmp_path / "dcm", series_number=2, series_description="second", seed=7,
                       rescale_slope=0.5)
    assert len(scan(tmp_path / "dcm").series) == 2
    out = ingest_dicom(tmp_path / "dcm", tmp_path / "vols")
    assert [p.name for p in out] == ["1_first.zarr", "2_second.zarr"]
    np.testing.assert_array_equal(Volume.open(out[0]).read(), a)
    np.testing.assert_array_equal(Volume.open(out[1]).read(), b)

    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr")
    msg = str(err.value)
    assert "2 series" in msg and "'first'" in msg and "'second'" in msg and "series" in msg
    for s in scan(tmp_path / "dcm").series:
        assert s.uid in msg
    assert not (tmp_path / "one.zarr").exists()
    picked = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr", series="2")[0])
    np.testing.assert_array_equal(picked.read(), b)
    with pytest.raises(InputError, match="No series '5'"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "x.zarr", series="5")


# ----------------------------------------------------------------------- anonymised series (no SeriesInstanceUID)
def _blank_uids(files: list[Path], how: str = "empty", compress: bool = False) -> None:
    """What anonymisers do: SeriesInstanceUID and StudyInstanceUID left empty (or removed); optionally JPEG 2000."""
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID"):
            if how == "empty":
                setattr(ds, keyword, "")
            else:
                delattr(ds, keyword)
        if compress:
            ds.compress(pydicom.uid.JPEG2000Lossless)
        ds.save_as(f)


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_anonymised_series_without_uids_ingests_as_one_volume(tmp_path: Path, how: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The reported case in small: 20 JPEG 2000 CT slices whose Series/StudyInstanceUID are empty."""
    vol = _ct((20, 32, 32), seed=4)  # JPEG 2000 needs >= 32 pixels for its default 6 resolutions
    geo = Geometry(SPACING, ORIGIN)
    files = write_dicom_series(vol, geo, tmp_path / "dcm", rescale_slope=0.5, series_number=7,
                               shuffle_names=True)
    _blank_uids(files, how, compress=how == "empty")
    if how == "empty":
        assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    with caplog.at_level(logging.WARNING, logger="medrecon.io.dicom"):
        found = scan(tmp_path / "dcm")
        v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0])
    assert len(found.series) == 1 and found.skipped == []
    np.testing.assert_array_equal(v.read(), vol)
    assert v.geometry.isclose(geo, rtol=1e-6, atol=1e-6)
    series = v.meta["series"]
    assert series["uid"] == "" and series["grouped_by"] == "fallback_key"
    assert series["key"].startswith("nouid-") and series["fallback_key"]["SeriesNumber"] == "7"
    assert series["fallback_key"]["StudyInstanceUID"] == ""
    warned = [r.getMessage() for r in caplog.records if r.name == "medrecon.io.dicom"]
    assert any("20 CT images without SeriesInstanceUID" in m and "SeriesNumber 7" in m for m in warned), warned


def test_anonymised_series_with_different_numbers_stay_apart(tmp_path: Path) -> None:
    """Without UIDs, SeriesNumber (and orientation, size, ...) still keep series apart, even at equal positions."""
    geo = Geometry(SPACING, ORIGIN)
    a, b = _ct((4, 6, 6), seed=1), _ct((4, 6, 6), seed=2)
    files = write_dicom_series(a, geo, tmp_path / "dcm", series_number=1, series_description="first",
                               rescale_slope=0.5)
    files += write_dicom_series(b, geo, tmp_path / "dcm", series_number=2, series_description="second",
                                rescale_slope=0.5)
    small = write_dicom_series(_ct((3, 5, 5)), geo, tmp_path / "dcm" / "small", series_number=2,
                               series_description="second", rescale_slope=0.5)  # same number, other size
    _blank_uids(files + small)
    found = scan(tmp_path / "dcm")
    assert sorted((s.number, len(s.files)) for s in found.series) == [("1", 4), ("2", 3), ("2", 4)]
    assert all(s.uid == "" for s in found.series) and len({s.key for s in found.series}) == 3

    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr")
    msg = str(err.value)
    assert "3 series" in msg and "no SeriesInstanceUID" in msg and "Rows x Columns 5x5" in msg
    picked = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr", series="1")[0])
    np.testing.assert_array_equal(picked.read(), a)
    with pytest.raises(InputError, match="SeriesNumber '2' matches 2 series"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "two.zarr", series="2")
    key = next(s.key for s in found.series if s.number == "2" and len(s.files) == 4)
    np.testing.assert_array_equal(Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "two.zarr",
                                                           series=key)[0]).read(), b)
    out = ingest_dicom(tmp_path / "dcm", tmp_path / "vols")
    assert len(out) == 3 and len({p.name for p in out}) == 3


def test_errors_on_an_anonymised_series_say_what_was_found(tmp_path: Path) -> None:
    files = write_dicom_series(_ct((2, 4, 4)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    _blank_uids(files)
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    msg = str(err.value)
    assert "2 CT images without SeriesInstanceUID" in msg and "only 2 slice position(s)" in msg
    assert "No DICOM images" not in msg


# --------------------------------------------------------------------------------------- spacing and tilt
def _ramp(positions_mm: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Slices whose value is 10 * position (mm) + column index: linear along the normal."""
    cols = np.arange(shape[1], dtype=np.float32)[None, :]
    return np.stack([np.broadcast_to(10.0 * s + cols, shape) for s in positions_mm]).astype(np.float32)


def test_irregular_spacing_is_refused_with_the_gaps(tmp_path: Path) -> None:
    s = np.array([0.0, 2.0, 4.0, 6.0, 7.0, 9.0, 11.0])
    ipp = np.stack([np.zeros_like(s), np.zeros_like(s), s], axis=1)
    write_dicom_series(_ramp(s, (5, 6)), Geometry((2.0, 1.0, 1.0)), tmp_path / "dcm", positions=ipp,
                       rescale_intercept=0)
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    msg = str(err.value)
    assert "2.00 mm x 3, then one gap of 1.00 mm, then 2.00 mm x 2" in msg
    assert "ingest.on_irregular_spacing: resample" in msg
    assert not (tmp_path / "v.zarr").exists()

    opts = DicomOptions(on_irregular_spacing="resample")
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr", opts)[0])
    expected_s = np.arange(0.0, 11.0 + 1e-9, 2.0)  # median gap 2 mm, spanning first..last position
    assert v.shape == (6, 5, 6) and v.geometry.spacing[0] == pytest.approx(2.0)
    np.testing.assert_allclose(v.read(), _ramp(expected_s, (5, 6)), atol=1e-4)  # linear is exact on a ramp
    assert v.meta["dicom_geometry"]["resampled_along_normal"] is True

    fine = DicomOptions(on_irregular_spacing="resample", resample_spacing=1.5)
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "f.zarr", fine)[0])
    assert v.shape[0] == 8 and v.geometry.spacing[0] == pytest.approx(1.5)
    np.testing.assert_allclose(v.read(), _ramp(np.arange(8) * 1.5, (5, 6)), atol=1e-4)


def _tilted_series(tmp_path: Path, tilt_deg: float) -> tuple[Geometry, float, int]:
    """Axial slices 2 mm apart whose positions also step along +y (gantry tilt); a bright band at y = y0."""
    nz, ny, nx, dz = 9, 40, 12, 2.0
    step = dz * math.tan(math.radians(tilt_deg))  # in-plane (column cosine) step per slice, mm
    y0 = 20.0  # the band's patient y coordinate (mm, relative to the first IPP); pixels are 1 mm
    ipp = np.array([[0.0, k * step, k * dz] for k in range(nz)])
    rows = np.arange(ny, dtype=float)[:, None]
    vol = np.stack([np.broadcast_to(1000.0 * np.exp(-0.5 * ((rows + k * step - y0) / 2.0) ** 2), (ny, nx))
                    for k in range(nz)]).astype(np.float32)
    geo = Geometry((dz, 1.0, 1.0))
    write_dicom_series(np.round(vol), geo, tmp_path / "dcm", positions=ipp, rescale_intercept=0)
    return geo, y0, nz


def test_gantry_tilt_is_refused_with_the_angle(tmp_path: Path) -> None:
    _tilted_series(tmp_path, 20.0)
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert "20.0 deg" in str(err.value) and "ingest.on_tilt: resample" in str(err.value)


def test_gantry_tilt_resample_deshears(tmp_path: Path) -> None:
    _, y0, nz = _tilted_series(tmp_path, 20.0)
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr", DicomOptions(on_tilt="resample"))[0])
    g = v.geometry
    np.testing.assert_allclose(g.direction_matrix[:, 0], (0, 0, 1), atol=1e-12)  # slice axis = the normal
    assert g.spacing[0] == pytest.approx(2.0)  # positions projected on the normal are 2 mm apart
    data = v.read()
    rows = np.arange(data.shape[1], dtype=float)
    profile = data[:, :, 5]
    centroid = (profile * rows).sum(axis=1) / profile.sum(axis=1)
    expected = y0 - g.origin[1]  # band row in the output grid, from the stored origin
    np.testing.assert_allclose(centroid, expected, atol=0.05)  # every slice: the band is where it belongs
    assert v.meta["dicom_geometry"]["tilt_deg"] == pytest.approx(20.0, abs=1e-3)
    assert v.meta["dicom_geometry"]["deshear"] is True
    # The input band drifted by (nz - 1) * 2 tan(20 deg) = 5.8 pixels; de-shearing removed all of it.
    assert (nz - 1) * 2 * math.tan(math.radians(20)) > 5


# -------------------------------------------------------------------------------------------------- 4D
def test_4d_series_refused_or_split(tmp_path: Path) -> None:
    vol = np.stack([_ct((4, 5, 6), seed=t) for t in range(3)])
    write_dicom_series(vol, Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5, shuffle_names=True)
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert "4 positions x 3 time points" in str(err.value) and "ingest.on_4d: split" in str(err.value)
    split = DicomOptions(on_4d="split")
    out = ingest_dicom(tmp_path / "dcm", tmp_path / "vols", split)
    assert [p.name.rsplit("_", 1)[-1] for p in out] == ["t0.zarr", "t1.zarr", "t2.zarr"]
    for t, p in enumerate(out):
        v = Volume.open(p)
        np.testing.assert_array_equal(v.read(), vol[t])
        assert v.meta["timepoint"] == t and v.meta["n_timepoints"] == 3
        assert v.meta["dicom_geometry"]["time_key"] == "AcquisitionNumber"
    with pytest.raises(InputError, match="3 time points"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr", split)
    one = ingest_dicom(tmp_path / "dcm", tmp_path / "one.zarr", split, timepoint=1)
    np.testing.assert_array_equal(Volume.open(one[0]).read(), vol[1])


def test_irregular_duplicates_are_refused(tmp_path: Path) -> None:
    files = write_dicom_series(_ct((4, 5, 6)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["dup"])
    ds.save_as(tmp_path / "dcm" / "copy.dcm")
    with pytest.raises(InputError, match="duplicate slice positions") as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert "copy.dcm" in str(err.value)


def test_timepoint_of_a_3d_series_is_an_error(tmp_path: Path) -> None:
    write_dicom_series(_ct((3, 4, 4)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    with pytest.raises(InputError, match="timepoint 1 requested"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr", DicomOptions(on_4d="split"), timepoint=1)


# ------------------------------------------------------------------------------------- broken headers
def test_varying_orientation_names_the_file(tmp_path: Path) -> None:
    files = write_dicom_series(_ct((4, 5, 6)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[2])
    with pytest.raises(InputError, match="different orientations") as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert str(files[2]) in str(err.value) and "0.8" in str(err.value)


def test_missing_position_names_the_file_and_tag(tmp_path: Path) -> None:
    files = write_dicom_series(_ct((4, 5, 6)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(InputError, match="ImagePositionPatient") as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert str(files[1]) in str(err.value)


@pytest.mark.parametrize(("edit", "expected"), [
    ({"BitsStored": None}, "lacks the pixel description tag(s) BitsStored"),
    ({"NumberOfFrames": 2}, "multi-frame (enhanced) image with 2 frames"),
    ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "is a colour image (RGB"),
])
def test_unsupported_pixel_headers_name_the_file(tmp_path: Path, edit: dict, expected: str) -> None:
    files = write_dicom_series(_ct((4, 5, 6)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    ds = pydicom.dcmread(files[3])
    for key, value in edit.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(files[3])
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    assert expected in str(err.value) and str(files[3]) in str(err.value)


def test_different_image_sizes_in_one_series(tmp_path: Path) -> None:
    write_dicom_series(_ct((3, 5, 6)), Geometry(SPACING), tmp_path / "dcm" / "a", rescale_slope=0.5, seed=4)
    write_dicom_series(_ct((3, 7, 6)), Geometry(SPACING, (0, 0, 100)), tmp_path / "dcm" / "b",
                       rescale_slope=0.5, seed=4)  # same seed and number: same SeriesInstanceUID
    with pytest.raises(InputError, match="different sizes: 5x6"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")


def test_too_few_slices_and_min_slices(tmp_path: Path) -> None:
    write_dicom_series(_ct((2, 4, 4)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    with pytest.raises(InputError, match=r"only 2 slice position\(s\); at least 3"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")
    v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr", DicomOptions(min_slices=2))[0])
    assert v.shape == (2, 4, 4)


def test_modality_must_match_the_config(tmp_path: Path) -> None:
    write_dicom_series(_ct((3, 4, 4)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    with pytest.raises(InputError, match=r"modality MR but .* has Modality CT"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr", meta_extra={"modality": "MR"})


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.on_tilt"):
        DicomOptions(on_tilt="ignore")
    with pytest.raises(ConfigError, match="resample_spacing"):
        DicomOptions(resample_spacing=0)


# ------------------------------------------------------------------------- pixel data, files, atomicity
def test_truncated_pixel_data_names_the_file_and_leaves_no_store(tmp_path: Path) -> None:
    files = write_dicom_series(_ct((4, 16, 16)), Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    size = files[2].stat().st_size
    with open(files[2], "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(InputError) as err:
        ingest_dicom(tmp_path / "dcm", tmp_path / "out" / "v.zarr")
    assert str(files[2]) in str(err.value) and "truncated" in str(err.value)
    assert _stores(tmp_path / "out") == []  # neither the store nor its temporary sibling


def test_failed_directory_ingest_leaves_no_store(tmp_path: Path) -> None:
    write_dicom_series(_ct((3, 8, 8)), Geometry(SPACING), tmp_path / "dcm", series_number=1,
                       rescale_slope=0.5)
    bad = write_dicom_series(_ct((3, 8, 8)), Geometry(SPACING), tmp_path / "dcm", series_number=2,
                             rescale_slope=0.5)
    with open(bad[1], "r+b") as f:
        f.truncate(bad[1].stat().st_size - 10)
    with pytest.raises(InputError, match="truncated"):
        ingest_dicom(tmp_path / "dcm", tmp_path / "out" / "vols")
    assert _stores(tmp_path / "out") == []  # series 1 was written to staging, then removed


def _non_image_dicom(path: Path, sop_class: str = pydicom.uid.BasicTextSRStorage) -> None:
    """A valid DICOM file without pixels (e.g. a Basic Text SR), as found beside images in real exports."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["sr"])
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["sr-series"])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_non_dicom_and_non_image_files_are_skipped_and_reported(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    vol = _ct((3, 4, 4))
    write_dicom_series(vol, Geometry(SPACING), tmp_path / "dcm", rescale_slope=0.5)
    (tmp_path / "dcm" / "README.txt").write_text("exported by PACS\n")
    _non_image_dicom(tmp_path / "dcm" / "report.dcm")
    _non_image_dicom(tmp_path / "dcm" / "DICOMDIR", pydicom.uid.MediaStorageDirectoryStorage)
    with caplog.at_level(logging.WARNING, logger="medrecon.io.dicom"):
        v = Volume.open(ingest_dicom(tmp_path / "dcm", tmp_path / "v.zarr")[0])
    np.testing.assert_array_equal(v.read(), vol)
    lines = [r.getMessage() for r in caplog.records if r.name == "medrecon.io.dicom"]
    assert any("README.txt" in m and "not a DICOM file" in m for m in lines)
    assert any("report.dcm" in m and "Basic Text SR Storage" in m for m in lines)
    assert any("DICOMDIR" in m and "not an image" in m for m in lines)
    assert v.meta["n_skipped_files"] == 3
    assert {Path(p).name for p, _ in v.meta["skipped_files"]} == {"README.txt", "report.dcm", "DICOMDIR"}


def test_folder_without_dicom_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(InputError, match=r"No usable DICOM images under .*2 files skipped") as err:
        ingest_dicom(tmp_path, tmp_path / "v.zarr")
    assert "notes.txt" in str(err.value)


def test_plan_reports_geometry_without_reading_pixels(tmp_path: Path) -> None:
    """Planning uses headers only: a series whose pixels are all truncated still plans."""
    files = write_dicom_series(_ct((4, 6, 6)), Geometry(SPACING, ORIGIN), tmp_path / "dcm", rescale_slope=0.5)
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 20)
    (plan,) = plan_series(scan(tmp_path / "dcm").series[0])
    assert plan.shape == (4, 6, 6) and plan.geometry.isclose(Geometry(SPACING, ORIGIN))


def test_ingest_logs_series_skipped_files_shape_spacing_orientation_and_output(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ingest job's log says what was found and what was written (the CLI logs medrecon at INFO)."""
    from medrecon import config as cfgmod
    from medrecon.io.ingest import ingest

    files = write_dicom_series(_ct((5, 6, 7)), Geometry(SPACING, ORIGIN), tmp_path / "dcm", rescale_slope=0.5,
                               series_description="thorax 2.5 mm", series_number=4)
    (tmp_path / "dcm" / "notes.txt").write_text("not an image\n")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with caplog.at_level(logging.INFO, logger="medrecon"):
        out = ingest(tmp_path / "dcm", tmp_path / "v.zarr", cfgmod.validate({}))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("medrecon.io"))
    assert f"DICOM under {tmp_path / 'dcm'}: 6 files read, 1 series, 1 skipped (1 not a DICOM file)" in text
    assert f"SeriesNumber 4, 'thorax 2.5 mm', CT, 5 files, SeriesInstanceUID {uid}" in text
    assert "notes.txt" in text
    assert "5 files -> 5 x 6 x 7 voxels (z, y, x), spacing 2.5 x 0.8 x 0.7 mm" in text
    assert (f"wrote CT volume {out[0]}: 5 x 6 x 7 voxels (z, y, x), spacing 2.5 x 0.8 x 0.7 mm, "
            "orientation LPS (x, y, z toward L, P, S)") in text


def test_axis_codes_follow_the_direction_cosines() -> None:
    from medrecon.io.ingest import axis_codes

    assert axis_codes(Geometry()) == "LPS"
    # sagittal: x along -P (anterior), y along -S (inferior), z along L
    sag = _direction(np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    assert axis_codes(Geometry(direction=sag)) == "AIL"
