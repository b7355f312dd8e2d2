"""Config schema: defaults are filled, unknown keys and wrong types name the key."""

from __future__ import annotations

import json

import pytest
import yaml

from medrecon import config
from medrecon.errors import ConfigError


def test_defaults_filled():
    cfg = config.load(None)
    assert cfg["ingest"]["on_tilt"] == "error"
    assert cfg["measure"]["ct"]["views"] == 60
    assert cfg["reconstruct"]["methods"]["CT"] == ["fbp", "sirt", "tv"]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"measure\.ct.*'veiws' was unexpected"):
        config.validate({"measure": {"ct": {"veiws": 30}}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"measure\.ct\.views"):
        config.validate({"measure": {"ct": {"views": "many"}}})


def test_inline_json_and_file(tmp_path):
    cfg = {"measure": {"ct": {"views": 12}}}
    assert config.load(json.dumps(cfg))["measure"]["ct"]["views"] == 12
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert config.load(p)["measure"]["ct"]["views"] == 12
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_shipped_config_is_valid():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
    cfg = config.load(shipped)
    assert cfg["subjects"], "the demo config lists subjects"
