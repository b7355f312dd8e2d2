"""The evaluate step's JSON: metrics against skimage, the reconstruct record, mismatched grids refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from medrecon import config as cfgmod
from medrecon.errors import InputError
from medrecon.evaluate import cost_metrics, evaluate
from medrecon.volume import Geometry, Volume


def _pair(tmp_path, shift=0.0):
    rng = np.random.default_rng(0)
    ref = rng.uniform(-900, 400, size=(12, 20, 20)).astype(np.float32)
    rec = ref + rng.normal(0, 30, ref.shape).astype(np.float32) + shift
    g = Geometry((2.0, 1.0, 1.0))
    r = Volume.from_array(tmp_path / "ref.zarr", ref, g, {"modality": "CT", "units": "HU"})
    meta = {"modality": "CT", "units": "HU", "record": {"runtime_s": 1.5, "nfe": 0, "data_residual": 0.01}}
    x = Volume.from_array(tmp_path / "rec.zarr", rec, g, meta)
    return r, x, ref, rec


def test_metrics_json(tmp_path):
    r, x, ref, rec = _pair(tmp_path)
    cfg = cfgmod.validate({"evaluate": {"mask": "none", "ct_window": [-1000, 1000]}})
    doc = evaluate(r.path, x.path, tmp_path / "m.json", cfg, "s1", "fbp")
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["metrics"]["psnr"] == pytest.approx(doc["metrics"]["psnr"])
    w = lambda a: np.clip((a + 1000) / 2000, 0, 1)  # noqa: E731
    assert doc["metrics"]["psnr"] == pytest.approx(peak_signal_noise_ratio(w(ref), w(rec), data_range=1), abs=1e-4)
    assert doc["metrics"]["runtime_s"] == 1.5 and doc["metrics"]["data_residual"] == 0.01
    assert len(doc["per_slice"]["psnr"]) == 12


def test_grid_mismatch_is_refused(tmp_path):
    r, _, ref, _ = _pair(tmp_path)
    other = Volume.from_array(tmp_path / "o.zarr", ref[:10], Geometry((2.0, 1.0, 1.0)), {"modality": "CT"})
    with pytest.raises(InputError, match="not on the grid"):
        evaluate(r.path, other.path, tmp_path / "m.json", cfgmod.validate({}), "s1", "fbp")
    assert not (tmp_path / "m.json").exists()


def test_nfe_only_for_methods_with_a_prior_and_iterations_apart():
    """A classical method's record counts operator applications as ``nfe``: not network evaluations."""
    rec = {"runtime_s": 0.2, "nfe": 203, "data_residual": 0.01, "peak_rss_mb": 500.0, "samples": 1}
    sirt = cost_metrics({"record": rec, "prior": None, "info": {"n_iter": 100}})
    assert "nfe" not in sirt and sirt["iterations"] == 100 and sirt["runtime_s"] == 0.2 and sirt["samples"] == 1
    fbp = cost_metrics({"record": {**rec, "nfe": 1}, "prior": None, "info": {"seconds": 0.04}})
    assert "nfe" not in fbp and "iterations" not in fbp
    dds = cost_metrics({"record": {**rec, "nfe": 50}, "prior": ["ct_slice.pt"], "info": {"method": "dds"}})
    assert dds["nfe"] == 50 and "iterations" not in dds
    slabs = cost_metrics({"record": rec, "prior": None, "info": {"slabs": [{"n_iter": 30}, {"n_iter": 28}]}})
    assert slabs["iterations"] == 30
