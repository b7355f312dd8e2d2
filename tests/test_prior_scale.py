"""MR priors trained with per-volume normalisation take this volume's scale from its own data."""

from __future__ import annotations

import numpy as np
import pytest

from medrecon import config as cfgmod
from medrecon.diffusion.kinds import train_prior
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.diffusion.normalisation import percentile_value
from medrecon.io.phantoms import write_phantom_volume
from medrecon.measure import measure
from medrecon.reconstruct import reconstruct
from medrecon.volume import Geometry, Volume

_TINY = {k: v for k, v in tiny_network_spec("slice", 16).items()
         if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution",
                  "num_head_channels", "norm_num_groups")}


@pytest.mark.parametrize("units", [1e-3, 1e3])
def test_per_volume_mr_prior_is_rescaled_to_the_measured_volume(tmp_path, units):
    brain = Volume.open(write_phantom_volume("mr_brain", tmp_path / "b.zarr", (3, 16, 16), (4.0, 12.0, 12.0), 1))
    train_vol = Volume.from_array(tmp_path / "t.zarr", brain.read() * 1000.0, brain.geometry, {"modality": "MR"})
    prior = train_prior({"modality": "MR", "kind": "slice", "network": {**_TINY, "in_channels": 2},
                         "normalisation": {"kind": "mr_percentile", "percentile": 99.5, "scope": "volume"},
                         "image_size": 16, "batch_size": 2, "steps": 2, "warmup_steps": 0, "device": "cpu"},
                        [train_vol.path], tmp_path / "p.pt")
    # The subject is in other scanner units (x units): the stored training median would be off by 1000 x units.
    ref = Volume.from_array(tmp_path / "r.zarr", brain.read() * units, Geometry((4.0, 12.0, 12.0)),
                            {"modality": "MR"})
    cfg = cfgmod.validate({"measure": {"mr": {"acs_lines": 4, "acceleration": 2, "snr_db": None}},
                           "reconstruct": {"params": {"dds": {"steps": 2, "cg_iter": 2}}}})
    meas = measure(ref.path, tmp_path / "m.zarr", cfg)
    rec = reconstruct(meas, tmp_path / "x.zarr", "dds", cfg, prior_path=prior)
    scale = rec.meta["prior_scale"]
    truth = percentile_value([np.abs(ref.read()).ravel()], 99.5)
    assert scale["value"] == pytest.approx(truth, rel=0.15)
    assert scale["training_median"] == pytest.approx(percentile_value([np.abs(train_vol.read()).ravel()], 99.5))
    assert np.isfinite(rec.read()).all()
