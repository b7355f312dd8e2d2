"""The measure step: stored operator reproduces the data, noise is seeded and independent of slabbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrecon import config as cfgmod
from medrecon.io.phantoms import write_phantom_volume
from medrecon.measure import measure
from medrecon.measurement import Measurement
from medrecon.physics.ct_geometry import hu_to_mu
from medrecon.volume import Volume


@pytest.fixture
def ct_volume(tmp_path):
    return write_phantom_volume("ct_chest", tmp_path / "ct.zarr", (6, 32, 32), (3.0, 4.0, 4.0), 3, chunk_depth=2)


def _cfg(**measure):
    return cfgmod.validate({"measure": measure})


def test_ct_noiseless_measurement_is_the_stored_operator_applied(ct_volume, tmp_path):
    cfg = _cfg(ct={"views": 20, "I0": None})
    m = Measurement.open(measure(ct_volume, tmp_path / "m.zarr", cfg))
    op = m.operator()
    assert m.modality == "CT" and m.y.shape == (6, 20, op.out_shape[-1])
    mu = torch.from_numpy(np.asarray(hu_to_mu(Volume.open(ct_volume).read(), 0.0192), np.float32))
    np.testing.assert_allclose(m.read(), op.forward(mu).numpy(), rtol=1e-5, atol=1e-5)
    assert m.meta["noise"] == {"model": "none"}
    assert m.image_geometry.isclose(Volume.open(ct_volume).geometry)


def test_ct_noise_is_seeded_and_slab_independent(ct_volume, tmp_path):
    cfg = _cfg(ct={"views": 12, "I0": 1e4}, seed=7)
    a = Measurement.open(measure(ct_volume, tmp_path / "a.zarr", cfg)).read()
    b = Measurement.open(measure(ct_volume, tmp_path / "b.zarr", cfg)).read()
    np.testing.assert_array_equal(a, b)
    # The same volume chunked differently (slabs of 6 instead of 2) gives the same noisy data.
    whole = Volume.open(ct_volume)
    Volume.from_array(tmp_path / "ct6.zarr", whole.read(), whole.geometry, whole.meta, chunk_depth=6)
    c = Measurement.open(measure(tmp_path / "ct6.zarr", tmp_path / "c.zarr", cfg)).read()
    np.testing.assert_array_equal(a, c)
    d = Measurement.open(measure(ct_volume, tmp_path / "d.zarr", _cfg(ct={"views": 12, "I0": 1e4}, seed=8))).read()
    assert not np.array_equal(a, d)


def test_mr_noise_level_matches_snr_and_ignores_slabbing(tmp_path):
    vol = write_phantom_volume("mr_brain", tmp_path / "mr.zarr", (6, 32, 32), (3.0, 4.0, 4.0), 4, chunk_depth=2)
    cfg = _cfg(mr={"acs_lines": 8, "snr_db": 20.0, "coils": 4})
    noisy = Measurement.open(measure(vol, tmp_path / "n.zarr", cfg))
    clean = Measurement.open(measure(vol, tmp_path / "c.zarr", _cfg(mr={"acs_lines": 8, "snr_db": None, "coils": 4})))
    k, k0 = noisy.read(), clean.read()
    acquired = k0 != 0
    sigma = noisy.meta["noise"]["sigma"]
    rms = np.sqrt(np.mean(np.abs(k0[acquired]) ** 2))
    assert sigma == pytest.approx(rms / 10.0, rel=1e-6)
    measured = np.std(k[acquired] - k0[acquired]) * 1.0
    assert measured == pytest.approx(sigma, rel=0.05)
    assert (k[~acquired] == 0).all()
    whole = Volume.open(vol)
    Volume.from_array(tmp_path / "mr6.zarr", whole.read(), whole.geometry, whole.meta, chunk_depth=6)
    k6 = Measurement.open(measure(tmp_path / "mr6.zarr", tmp_path / "n6.zarr", cfg)).read()
    np.testing.assert_allclose(k6, k, rtol=1e-5, atol=1e-6)


def test_measure_logs_what_it_simulated_and_wrote(tmp_path, caplog):
    import logging

    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure

    vol = write_phantom_volume("ct_chest", tmp_path / "ct.zarr", (2, 16, 16), (4.0, 3.0, 3.0), 0)
    with caplog.at_level(logging.INFO, logger="medrecon.measure"):
        out = measure(vol, tmp_path / "m.zarr", cfgmod.validate({"measure": {"ct": {"views": 8}}}))
    lines = [r.getMessage() for r in caplog.records if r.name == "medrecon.measure"]
    assert any(line.startswith(f"measuring CT {vol} (2 x 16 x 16 voxels)") and "'views': 8" in line
               for line in lines)
    assert any(line.startswith(f"wrote measurement {out}: data 2 x 8 x ") and "noise ct_poisson" in line
               for line in lines)
