"""The CLI as a user runs it: exit codes, one-line errors, provenance in outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from medrecon.cli import main
from medrecon.volume import Geometry, Volume


def test_ingest_zarr_copy_and_info(tmp_path, capsys):
    src = tmp_path / "src.zarr"
    data = np.random.default_rng(1).normal(size=(5, 8, 9)).astype(np.float32)
    Volume.from_array(src, data, Geometry((3.0, 1.0, 1.0)), {"modality": "CT", "units": "HU"})
    out = tmp_path / "out.zarr"
    assert main(["ingest", str(src), str(out)]) == 0
    vol = Volume.open(out)
    np.testing.assert_array_equal(vol.read(), data)
    prov = vol.meta["provenance"]
    assert prov["config_hash"] and "numpy" in prov["versions"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [5, 8, 9] and info["geometry"]["spacing"] == [3.0, 1.0, 1.0]


def test_missing_input_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medrecon.cli", "ingest", str(tmp_path / "nope"),
                           str(tmp_path / "o.zarr")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "does not exist" in proc.stderr and "nope" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_bad_config_key_is_named(tmp_path, capsys):
    src = tmp_path / "src.zarr"
    Volume.from_array(src, np.zeros((3, 4, 4), np.float32), Geometry())
    rc = main(["ingest", str(src), str(tmp_path / "o.zarr"), "--config", '{"ingest": {"on_tlit": "error"}}'])
    assert rc == 2
    assert "on_tlit" in capsys.readouterr().err


def test_phantom_input_spec(tmp_path):
    out = tmp_path / "p.zarr"
    assert main(["ingest", "phantom:ct_chest?seed=4&shape=6,24,24&spacing=3,5,5", str(out)]) == 0
    vol = Volume.open(out)
    assert vol.shape == (6, 24, 24) and vol.geometry.spacing == (3.0, 5.0, 5.0) and vol.modality == "CT"
    assert main(["ingest", "phantom:ct_chest?sead=4", str(tmp_path / "q.zarr")]) == 2
