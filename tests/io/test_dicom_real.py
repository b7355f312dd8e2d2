"""DICOM ingest and decoding on real scanner files (../shared/data/real, see its README for each series)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medrecon.errors import InputError
from medrecon.io.dicom import DicomOptions, ingest_dicom, read_slice, scan
from medrecon.volume import Volume

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"

pytestmark = pytest.mark.realdata


def real(*parts: str) -> Path:
    """A path inside the real-data folder, or a skip that says where it was looked for."""
    if not REAL.is_dir():
        pytest.skip(f"real DICOM data not found at {REAL} (it ships beside the repo in ../shared/data/real)")
    return REAL.joinpath(*parts)


# ------------------------------------------------------------------------------------------- CT series
def test_philips_phantom(tmp_path: Path) -> None:
    src = real("ct_series", "philips_phantom_5mm")
    header = pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True)
    pixel_spacing = [float(v) for v in header.PixelSpacing]
    print(f"PixelSpacing read from the header: {pixel_spacing}")
    assert pixel_spacing == [0.451171875, 0.451171875]
    t0 = time.perf_counter()
    v = Volume.open(ingest_dicom(src, tmp_path / "ph.zarr")[0])
    print(f"ingest of the 28 x 512 x 512 Philips series: {time.perf_counter() - t0:.2f} s")
    assert v.shape == (28, 512, 512)
    np.testing.assert_allclose(v.geometry.spacing, (5.0, 0.451171875, 0.451171875), rtol=1e-6)
    np.testing.assert_allclose(v.geometry.origin, (-115.5, -1.85, 696.21), atol=1e-6)
    data = v.read()
    assert data.min() == -1024.0 and data.max() == 782.0
    assert v.meta["units"] == "HU" and v.meta["series"]["description"] == "STD BRAIN 5MM"


def test_ct_folder_holds_exactly_two_series() -> None:
    found = scan(real("ct_series"))
    assert len(found.series) == 2 and found.skipped == []
    assert sorted(len(s.files) for s in found.series) == [28, 28]
    assert {s.folder.name for s in found.series} == {"philips_phantom_5mm", "ge_head_tilt_varspacing"}


def test_philips_phantom_anonymised_with_empty_uids(tmp_path: Path) -> None:
    """The real series with Series/StudyInstanceUID blanked, as anonymisers leave them: still one volume."""
    src = real("ct_series", "philips_phantom_5mm")
    anon = tmp_path / "anon"
    anon.mkdir()
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ds.StudyInstanceUID = ""
        ds.save_as(anon / f.name)
    found = scan(anon)
    assert len(found.series) == 1 and found.series[0].uid == "" and found.skipped == []
    v = Volume.open(ingest_dicom(anon, tmp_path / "ph.zarr")[0])
    assert v.shape == (28, 512, 512)
    np.testing.assert_allclose(v.geometry.spacing, (5.0, 0.451171875, 0.451171875), rtol=1e-6)
    np.testing.assert_allclose(v.geometry.origin, (-115.5, -1.85, 696.21), atol=1e-6)
    assert v.meta["series"]["grouped_by"] == "fallback_key"
    assert v.meta["series"]["description"] == "STD BRAIN 5MM"


@pytest.mark.parametrize("name", ["TOSHIBA_J2K_OpenJPEGv2Regression.dcm", "MAROTECH_CT_JP2Lossy.dcm"])
def test_one_real_jpeg2000_image_is_named_as_a_single_image(tmp_path: Path, name: str) -> None:
    src = real("compressed", "single", name)
    with pytest.raises(InputError) as err:
        ingest_dicom(src, tmp_path / "one.zarr")
    assert str(src) in str(err.value) and "single image" in str(err.value)
    assert not (tmp_path / "one.zarr").exists()


def test_ge_head_tilt_and_irregular_spacing(tmp_path: Path) -> None:
    src = real("ct_series", "ge_head_tilt_varspacing")
    with pytest.raises(InputError) as err:
        ingest_dicom(src, tmp_path / "ge.zarr")
    msg = str(err.value)
    assert "18.5 deg" in msg and "ingest.on_tilt: resample" in msg
    assert "4.00 mm x 13, then one gap of 1.08 mm, then 7.00 mm x 13" in msg
    assert not (tmp_path / "ge.zarr").exists()

    opts = DicomOptions(on_tilt="resample", on_irregular_spacing="resample")
    v = Volume.open(ingest_dicom(src, tmp_path / "ge.zarr", opts)[0])
    # 144.09 mm along the normal at the median gap of 4.002 mm: 37 regular slices.
    assert v.shape == (37, 512, 512)
    np.testing.assert_allclose(v.geometry.spacing, (4.0019, 0.4882812, 0.4882812), atol=1e-4)
    normal = v.geometry.direction_matrix[:, 0]
    np.testing.assert_allclose(normal, (0.0, 0.3173, 0.9483), atol=1e-4)  # slice axis = row x column cosine
    facts = v.meta["dicom_geometry"]
    assert facts["tilt_deg"] == pytest.approx(18.5, abs=0.01) and facts["deshear"] is True
    lo, hi = v.meta["value_range"]
    assert lo >= -1500.001 and hi <= 2121.001  # linear interpolation never leaves the input range


# -------------------------------------------------------------------------------------------- MR series
def test_mr_t1_series(tmp_path: Path) -> None:
    v = Volume.open(ingest_dicom(real("mr_series", "vsseg001_t1_24slices"), tmp_path / "mr.zarr")[0])
    assert v.shape == (24, 512, 512)
    np.testing.assert_allclose(v.geometry.spacing, (1.5, 0.41015625, 0.41015625), rtol=1e-6)
    assert v.meta["modality"] == "MR" and v.meta["units"] == "arbitrary"
    assert tuple(v.meta["value_range"]) == (0.0, 1826.0)


def test_fmri_4d_refused_then_split(tmp_path: Path) -> None:
    src = real("mr_series", "ge_epi_fmri_4d_one_series")
    with pytest.raises(InputError, match=r"15 positions x 10 time points.*ingest\.on_4d: split"):
        ingest_dicom(src, tmp_path / "f.zarr")
    out = ingest_dicom(src, tmp_path / "fmri", DicomOptions(on_4d="split"))
    assert len(out) == 10
    vols = [Volume.open(p) for p in out]
    assert all(v.shape == (15, 64, 64) for v in vols)
    np.testing.assert_allclose(vols[0].geometry.spacing, (5.0, 3.75, 3.75), atol=1e-4)
    first = [Path(f["path"]).name for f in vols[0].meta["source"]["files"]]
    assert first == [f"axial_epi_fmri_interleaved_i_to_s-{i:05d}.dcm" for i in range(1, 16)]
    assert vols[0].meta["dicom_geometry"]["time_key"] == "InstanceNumber"
    assert not np.array_equal(vols[0].read(), vols[9].read())


# ------------------------------------------------------------------------------------------- decoding
def test_six_transfer_syntaxes_decode_identically() -> None:
    folder = real("compressed", "siemens_mosaic_same_image_9ts")
    syntaxes = {}
    arrays = {}
    for f in sorted(folder.glob("*.dcm")):
        syntaxes[f.name] = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        arrays[f.name] = read_slice(f)
    assert len(set(syntaxes.values())) == 6, syntaxes
    ref = arrays["1.dcm"]
    assert ref.shape == (384, 384) and ref.min() == 0 and ref.max() == 2362
    for name, a in arrays.items():
        np.testing.assert_array_equal(a, ref, err_msg=f"{name} ({syntaxes[name]})")


def test_single_compressed_ct_files() -> None:
    folder = real("compressed", "single")
    jls = read_slice(folder / "CT1_JLSN.dcm")
    assert jls.shape == (512, 512) and jls.dtype == np.float32 and np.isfinite(jls).all()
    assert jls.min() < -1000 < 0 < jls.max()  # air and tissue in HU
    j2k = read_slice(folder / "TOSHIBA_J2K_OpenJPEGv2Regression.dcm")
    assert j2k.shape == (512, 512) and j2k.min() == -2048 and j2k.max() == 1969
    lossy = read_slice(folder / "MAROTECH_CT_JP2Lossy.dcm")
    assert lossy.shape == (716, 512) and lossy.min() >= -1024 and lossy.max() > 0


def test_twelve_bit_masking_and_sign_extension() -> None:
    folder = real("edge_cases", "twelve_bit_same_position")

    def raw(name: str) -> np.ndarray:
        ds = pydicom.dcmread(folder / name)
        return np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns).astype(np.int64)

    clean, garbage, signed = (read_slice(folder / n) for n in
                              ("12bitUnsigned.dcm", "12bitUnsigned_0x0F0F.dcm", "12bitSigned_0x0F0F.dcm"))
    low12 = raw("12bitUnsigned_0x0F0F.dcm") & 0x0FFF
    assert (raw("12bitUnsigned_0x0F0F.dcm") > 0x0FFF).sum() > 100  # high bits really are set in the file
    np.testing.assert_array_equal(garbage, low12)  # bits above BitsStored = 12 are ignored
    assert garbage.max() <= 4095
    np.testing.assert_array_equal(clean, raw("12bitUnsigned.dcm") & 0x0FFF)
    np.testing.assert_array_equal(signed, np.where(low12 >= 2048, low12 - 4096, low12))  # sign-extended
    assert signed.min() < 0 and signed.min() >= -2048 and signed.max() <= 2047
    same = raw("12bitUnsigned.dcm") == raw("12bitUnsigned_0x0F0F.dcm")
    np.testing.assert_array_equal(clean[same], garbage[same])


# ------------------------------------------------------------------------------- dicom2nifti failure cases
@pytest.mark.parametrize(("case", "expected"), [
    ("slicecount", r"only 2 slice position\(s\); at least 3"),
    ("sliceincrement", r"irregular slice spacing along the normal: 5\.00 mm x 2, then one gap of 10\.00 mm"),
    ("sliceorientation", r"different orientations \(ImageOrientationPatient\)"),
])
def test_dicom2nifti_failure_cases(tmp_path: Path, case: str, expected: str) -> None:
    src = real("edge_cases", "dicom2nifti_randompixels", case)
    with pytest.raises(InputError, match=expected) as err:
        ingest_dicom(src, tmp_path / "out")
    assert "Fix:" in str(err.value) and str(src) in str(err.value)
    assert not (tmp_path / "out").exists()
