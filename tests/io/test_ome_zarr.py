"""The workflow's volume stores are valid OME-Zarr 0.5 images (checked with the ome-zarr-models validator):
an ingested volume, its reference on the study grid, and a reconstruction with its posterior std; each is
named after subject and method, carries an omero display window, and has a pyramid above 128 px in-plane."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import medrecon.config as cfgmod
from medrecon.grid import resample
from medrecon.io.ingest import ingest
from medrecon.reconstruct import _write
from medrecon.volume import Geometry, Volume, pyramid_shapes

ome_image = pytest.importorskip("ome_zarr_models.v05.image", reason="pip install 'ome-zarr-models>=1.7,<1.8'")


def _validate(path) -> dict:
    """Validate with ome-zarr-models; return the ``ome`` block."""
    group = zarr.open_group(str(path), mode="r")
    image = ome_image.Image.from_zarr(group)
    assert image.ome_zarr_version == "0.5"
    return dict(group.attrs["ome"])


def _window(ome: dict) -> dict:
    (channel,) = ome["omero"]["channels"]
    return channel["window"]


def test_ingested_reference_and_reconstruction_validate(tmp_path):
    subject = tmp_path / "ct01"
    cfg = cfgmod.validate({})
    (vol_path,) = ingest("phantom:ct_chest?seed=1&shape=6,160,160&spacing=5,2,2", subject / "volume.zarr", cfg)
    ome = _validate(vol_path)
    ms = ome["multiscales"][0]
    assert ms["name"] == "ct01 ingested"
    # 160 px in-plane > 128: one halved level (80 px); the level's voxel is twice as wide, centred between
    assert [d["path"] for d in ms["datasets"]] == ["0", "1"]
    assert pyramid_shapes((6, 160, 160)) == [(6, 80, 80)]
    s0, t0 = (t[k] for t, k in zip(ms["datasets"][0]["coordinateTransformations"], ("scale", "translation"),
                                   strict=True))
    s1, t1 = (t[k] for t, k in zip(ms["datasets"][1]["coordinateTransformations"], ("scale", "translation"),
                                   strict=True))
    assert s1 == [s0[0], 2 * s0[1], 2 * s0[2]]
    np.testing.assert_allclose(t1, [t0[0], t0[1] + s0[1] / 2, t0[2] + s0[2] / 2])
    group = zarr.open_group(str(vol_path), mode="r")
    level0 = np.asarray(group["0"][...])
    np.testing.assert_allclose(group["1"][...], level0.reshape(6, 80, 2, 80, 2).mean(axis=(2, 4)), rtol=1e-5,
                               atol=1e-3)
    vol = Volume.open(vol_path)
    assert vol.shape == (6, 160, 160)                     # medrecon reads level 0
    w = _window(ome)
    assert (w["start"], w["end"]) == (-1000.0, 1000.0)    # CT in HU: the report's CT window
    assert w["min"] <= w["start"] and w["max"] >= vol.meta["value_range"][1]

    ref = resample(vol_path, subject / "reference.zarr", {"size": [64, 64]})
    ome = _validate(ref.path)
    assert ome["multiscales"][0]["name"] == "ct01 reference"
    assert len(ome["multiscales"][0]["datasets"]) == 1     # 64 px: no pyramid

    rng = np.random.default_rng(0)
    samples = ref.read()[None] + rng.normal(scale=20.0, size=(3, *ref.shape)).astype(np.float32)
    out = subject / "recon" / "dps.zarr"
    meta = {"modality": "CT", "units": "HU", "kind": "reconstruction", "method": "dps"}
    _write(out, samples, ref.geometry, meta)
    ome = _validate(out)
    assert ome["multiscales"][0]["name"] == "ct01 dps"
    rec = Volume.open(out)
    assert rec.meta["images"] == [{"path": "std", "kind": "posterior_std", "name": "ct01 dps posterior std"}]
    std_ome = _validate(out / "std")
    assert std_ome["multiscales"][0]["name"] == "ct01 dps posterior std"
    std = rec.posterior_std()                             # how evaluate and the report find it
    assert std is not None and std.path == out / "std"    # still where it always was
    np.testing.assert_allclose(std.read(), samples.std(axis=0, ddof=1), rtol=1e-5, atol=1e-4)
    sw = _window(std_ome)
    assert sw["start"] == 0.0 and 0 < sw["end"] <= float(std.read().max())
    # A copy of the mean alone (ingest of a .zarr) does not claim the std it did not copy.
    (copy,) = ingest(out, tmp_path / "copy" / "volume.zarr", cfg)
    assert "images" not in Volume.open(copy).meta and Volume.open(copy).posterior_std() is None


def test_mr_window_is_percentiles_of_magnitude(tmp_path):
    rng = np.random.default_rng(1)
    data = np.abs(rng.normal(size=(4, 32, 32))).astype(np.float32)
    data[0, 0, 0] = 1e3                                   # one hot voxel must not set the window
    vol = Volume.from_array(tmp_path / "mr01" / "volume.zarr", data, Geometry((2.0, 1.0, 1.0)),
                            {"modality": "MR", "units": "arbitrary"})
    w = _window(_validate(vol.path))
    lo, hi = np.percentile(data, (0.5, 99.5))
    assert w["start"] == pytest.approx(lo, rel=1e-5) and w["end"] == pytest.approx(hi, rel=1e-5)
    assert w["max"] == pytest.approx(1e3)
