"""The reconstruction grid (medrecon.grid): resampling onto it, and that it travels from the reference volume
through measurement, checkpoint and reconstruction, with a prior of another grid refused."""

from __future__ import annotations

import numpy as np
import pytest

from medrecon import config as cfgmod
from medrecon.diffusion.checkpoint import read_grid
from medrecon.diffusion.kinds import train_prior
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.errors import ConfigError, InputError
from medrecon.grid import describe, plan_grid, resample, resample_slab, resolve_grid, same_grid
from medrecon.measure import measure
from medrecon.measurement import Measurement
from medrecon.reconstruct import reconstruct
from medrecon.volume import Geometry, Volume

FOV = 210.0   # mm, both volumes below


def _disc_volume(path, n: int, spacing: float, nz: int = 6, modality: str = "CT") -> Volume:
    """A 60 HU disc (radius 80 mm) in air on an n x n grid covering the same FOV whatever the spacing."""
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * spacing - FOV / 2
    img = np.where(yy**2 + xx**2 < 80.0**2, 60.0, -1000.0).astype(np.float32)
    origin = (-FOV / 2 + spacing / 2, -FOV / 2 + spacing / 2, 0.0)   # LPS (x, y, z) of voxel (0, 0, 0)
    return Volume.from_array(path, np.repeat(img[None], nz, 0), Geometry((5.0, spacing, spacing), origin),
                             {"modality": modality, "units": "HU"})


def test_fine_and_coarse_scans_of_one_fov_land_on_one_grid(tmp_path):
    fine = _disc_volume(tmp_path / "fine.zarr", 300, 0.7)
    coarse = _disc_volume(tmp_path / "coarse.zarr", 70, 3.0)
    grid = {"size": 64}
    a, b = resample(fine.path, tmp_path / "a.zarr", grid), resample(coarse.path, tmp_path / "b.zarr", grid)
    assert a.shape == b.shape == (6, 64, 64)
    assert a.geometry.isclose(b.geometry) and np.allclose(a.geometry.spacing, (5.0, FOV / 64, FOV / 64))
    # Same anatomy: the disc area agrees to a few percent; the values stay in the input's HU range (linear
    # interpolation cannot overshoot) and the outside is air.
    da, db = a.read(), b.read()
    assert da.min() >= -1000.0 - 1e-3 and da.max() <= 60.0 + 1e-3
    area = [float((d[0] > -470).sum()) * (FOV / 64) ** 2 for d in (da, db)]
    assert area == pytest.approx([np.pi * 80.0**2] * 2, rel=0.04)
    assert np.mean(np.abs(da - db)) < 20.0
    # Recorded: the definition, how, and from what; the source stores are untouched.
    rec = a.meta["grid"]
    assert rec["size"] == [64, 64] and rec["spacing"] is None and rec["source_shape"] == [6, 300, 300]
    assert "linear" in rec["interpolation"] and Volume.open(fine.path).shape == (6, 300, 300)


def test_centre_and_orientation_are_kept_and_a_short_side_is_padded_with_air(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(-100, 100, (4, 30, 50)).astype(np.float32)
    direction = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))   # a rotated axis order
    src = Volume.from_array(tmp_path / "s.zarr", data, Geometry((2.0, 1.0, 1.0), (3.0, -7.0, 11.0), direction),
                            {"modality": "CT"})
    out = resample(src.path, tmp_path / "o.zarr", {"size": 25})
    assert out.shape == (4, 25, 25) and out.geometry.spacing == (2.0, 2.0, 2.0)
    assert out.geometry.direction == src.geometry.direction
    centre_in = src.geometry.index_to_lps(np.array([1.5, 14.5, 24.5]))
    centre_out = out.geometry.index_to_lps(np.array([1.5, 12.0, 12.0]))
    assert np.allclose(centre_in, centre_out)
    d = out.read()
    # 30 px of 1 mm along y fill 15 of 25 output rows; the rest is air (-1000 HU), not stretched anatomy.
    assert np.all(d[:, :4] == -1000.0) and np.all(d[:, -4:] == -1000.0) and np.all(d[:, 6:19] > -101)


def test_a_volume_already_on_the_grid_is_copied_exactly(tmp_path):
    vol = _disc_volume(tmp_path / "v.zarr", 64, FOV / 64)
    out = resample(vol.path, tmp_path / "o.zarr", {"size": 64})
    assert np.array_equal(out.read(), vol.read()) and out.geometry.isclose(vol.geometry)
    assert out.meta["grid"]["interpolation"].startswith("none")
    native = resample(vol.path, tmp_path / "n.zarr", None)
    assert np.array_equal(native.read(), vol.read())


def test_shrinking_is_anti_aliased_and_slabs_match_the_whole_volume(tmp_path):
    checker = np.indices((16, 64, 64)).sum(axis=0) % 2 * 200.0 - 100.0     # +-100 at the Nyquist frequency
    vol = Volume.from_array(tmp_path / "c.zarr", checker.astype(np.float32), Geometry((1.0, 1.0, 1.0)),
                            {"modality": "MR"}, chunk_depth=3)
    g = {"size": 16, "spacing": 4.0, "slice_spacing": 4.0}
    plan = plan_grid(vol.shape, vol.geometry, g)
    assert plan.shape == (4, 16, 16) and plan.sigma == (1.5, 1.5, 1.5)
    whole = resample_slab(vol, plan, 0, 4, 0.0)
    # Without the filter, point sampling of a checkerboard gives +-100 (pure alias); with it, ~0.
    assert np.abs(whole[1:-1, 2:-2, 2:-2]).max() < 5.0
    parts = np.concatenate([resample_slab(vol, plan, 0, 1, 0.0), resample_slab(vol, plan, 1, 4, 0.0)])
    assert np.allclose(parts, whole, atol=1e-4)


def test_grid_definitions_and_config():
    assert resolve_grid({"size": 64}) == {"size": [64, 64], "spacing": None, "slice_spacing": None}
    assert resolve_grid({"spacing": [0.5, 0.7]})["spacing"] == [0.5, 0.7]
    assert same_grid({"size": 64}, {"size": [64, 64]})
    assert not same_grid({"size": 64}, {"size": 64, "slice_spacing": 3.0})
    assert same_grid({"size": 64}, {"size": 64, "slice_spacing": 3.0}, with_slices=False)
    assert describe({"size": 64}) == "64 x 64 px, spacing from the field of view, native slices"
    assert cfgmod.validate({})["grid"]["size"] == 64     # the default: small enough for the CPU demo
    with pytest.raises(ConfigError, match="grid"):
        cfgmod.validate({"grid": {"size": 0}})
    with pytest.raises(ConfigError, match="unknown grid key"):
        resolve_grid({"szie": 64})


_TINY = {k: v for k, v in tiny_network_spec("slice", 16).items()
         if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution",
                  "num_head_channels", "norm_num_groups")}


def _train(vols, out, **kw):
    cfg = dict(kind="slice", modality="CT", network=dict(_TINY), batch_size=4, steps=2, warmup_steps=0,
               checkpoint_every=10, seed=0, device="cpu", **kw)
    return train_prior(cfg, [v.path for v in vols], out)


def test_the_grid_travels_to_checkpoint_measurement_and_reconstruction_and_a_foreign_prior_is_refused(tmp_path):
    fine = _disc_volume(tmp_path / "fine.zarr", 48, FOV / 48, nz=4)
    ref16 = resample(fine.path, tmp_path / "ref16.zarr", {"size": 16})
    ref24 = resample(fine.path, tmp_path / "ref24.zarr", {"size": 24})
    # Training on grid volumes: slices at the grid's size (no resizing), the grid in the checkpoint.
    p16 = _train([ref16], tmp_path / "p16.pt")
    grid, uses_slices, own = read_grid(p16)
    assert grid["size"] == [16, 16] and own and not uses_slices
    with pytest.raises(ConfigError, match="differs from the reconstruction grid"):
        _train([ref16], tmp_path / "bad.pt", image_size=24)
    with pytest.raises(InputError, match="different grids"):
        _train([ref16, ref24], tmp_path / "mixed.pt")
    cfg = cfgmod.validate({"measure": {"ct": {"views": 12, "I0": None}},
                           "reconstruct": {"params": {"dds": {"steps": 2, "cg_iter": 1}}}})
    meas = Measurement.open(measure(ref16.path, tmp_path / "m16.zarr", cfg))
    assert meas.meta["grid"]["size"] == [16, 16]
    rec = reconstruct(meas.path, tmp_path / "r16.zarr", "dds", cfg, prior_path=p16)
    assert rec.meta["grid"]["size"] == [16, 16] and rec.shape == (4, 16, 16)
    # The same prior on the 24-px grid of the same scan: refused, naming both grids and the fix.
    m24 = measure(ref24.path, tmp_path / "m24.zarr", cfg)
    with pytest.raises(ConfigError) as err:
        reconstruct(m24, tmp_path / "r24.zarr", "dds", cfg, prior_path=p16)
    msg = str(err.value)
    assert "16 x 16 px" in msg and "24 x 24 px" in msg and "Fix:" in msg and "p16.pt" in msg
    assert not (tmp_path / "r24.zarr").exists()


def test_a_slab_of_interest_keeps_its_place_in_the_patient(tmp_path):
    data = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 8, 8), np.float32)
    vol = Volume.from_array(tmp_path / "v.zarr", data, Geometry((2.0, 1.0, 1.0), (0.0, 0.0, -5.0)),
                            {"modality": "MR"})
    sub = resample(vol.path, tmp_path / "s.zarr", None, slices=(3, 7))
    assert sub.shape == (4, 8, 8) and np.array_equal(sub.read(), data[3:7])
    assert np.allclose(sub.geometry.index_to_lps(np.zeros(3)), vol.geometry.index_to_lps(np.array([3, 0, 0])))
    assert sub.meta["grid"]["source_slices"] == [3, 7]
    with pytest.raises(ConfigError, match="slices"):
        resample(vol.path, tmp_path / "bad.zarr", None, slices=(8, 12))


def test_grid_of_legacy_and_latent_checkpoints(tmp_path):
    """Priors from before grids: slices that were already the network's size were not resized, so their grid
    is size = image_size; otherwise it is unknown. A latent prior inherits its autoencoder's grid."""
    from medrecon.diffusion.checkpoint import save_checkpoint, training_grid

    def save(name, kind, shapes, size, extra=()):
        data = [*extra, *({"path": f"v{i}", "shape": s, "sha256": "0"} for i, s in enumerate(shapes))]
        save_checkpoint(tmp_path / name, kind=kind, modality="CT", objective="epsilon",
                        network={"builder": "unet", "spec": {"image_size": size}}, schedule=None,
                        normalisation={"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0},
                        train_config={"image_size": size}, data=data, step=1, weights={}, ema_weights={})
        return tmp_path / name

    assert read_grid(save("a.pt", "slice", [[24, 64, 64]], 64))[0] == {"size": [64, 64], "spacing": None,
                                                                      "slice_spacing": None}
    assert read_grid(save("b.pt", "slice", [[24, 128, 96]], 64))[0] is None          # resized in pixels
    assert read_grid(save("c.pt", "patch", [[24, 48, 48]], 32))[0]["size"] == [48, 48]
    latent = save("d.pt", "latent", [[24, 64, 64]], 16, extra=[{"role": "autoencoder", "path": "ae", "sha256": "0"}])
    assert read_grid(latent)[2] is False                                             # checked via its autoencoder
    assert training_grid({"data": [{"shape": [4, 16, 16], "grid": {"size": [16, 16]}}]}) == {"size": [16, 16]}
