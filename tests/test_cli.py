"""The CLI as a user runs it: exit codes, one-line errors, provenance in outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

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


# ------------------------------------------------------------------------------------- methods, help, flags


def test_methods_lists_every_registered_method(capsys):
    from medrecon.recon.registry import load_all

    registry = load_all()
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["METHOD", "MODALITY", "PRIOR", "INIT"]
    listed = {line.split()[0] for line in lines[1:] if not line.startswith(" ")}
    assert listed == set(registry)
    text = "\n".join(lines)
    assert "n_iter=30" in text and "Chung, Kim, McCann" in text          # cgls default, DPS paper
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(registry)
    for r in rows:
        spec = registry[r["name"]]
        assert r["parameters"] == spec.defaults and r["prior"] == spec.prior and r["paper"] == spec.paper
        assert r["modalities"] == list(spec.modalities)


def _parsed(argv: list[str]):
    from medrecon.cli import build_parser

    args = build_parser().parse_args(argv)
    args._after_parse(args)
    return args


def test_prior_may_come_before_or_after_the_positionals():
    base = ["reconstruct", "--method", "resample"]
    expected = ("m.zarr", "o.zarr", ["ae.pt", "lat.pt"])
    for argv in (["m.zarr", "o.zarr", "--prior", "ae.pt", "lat.pt"],           # as the workflow writes it
                 ["--prior", "ae.pt", "lat.pt", "m.zarr", "o.zarr"],           # used to swallow the positionals
                 ["m.zarr", "--prior", "ae.pt", "lat.pt", "o.zarr"],
                 ["--prior", "ae.pt", "--prior", "lat.pt", "m.zarr", "o.zarr"]):
        a = _parsed(base + argv)
        assert (a.measurement, a.out, a.prior) == expected, argv
    a = _parsed([*base, "m.zarr", "o.zarr"])
    assert (a.measurement, a.out, a.prior) == ("m.zarr", "o.zarr", None)


def test_missing_positionals_are_a_usage_error(capsys):
    for argv in (["reconstruct", "--method", "fbp"], ["reconstruct", "--method", "dds", "--prior", "p.pt", "m"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert "required: " in capsys.readouterr().err


def test_prior_first_reaches_the_measurement(tmp_path, capsys):
    """The swallowed-positionals case end to end: the error is about the (missing) measurement, not usage."""
    rc = main(["reconstruct", "--prior", str(tmp_path / "p.pt"), str(tmp_path / "m.zarr"), str(tmp_path / "o"),
               "--method", "dds"])
    err = capsys.readouterr().err
    assert rc == 2 and "m.zarr" in err and err.startswith("medrecon: error:")


def test_unknown_method_lists_the_methods(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "m.zarr"), str(tmp_path / "o.zarr"), "--method", "dsp"]) == 2
    err = capsys.readouterr().err
    assert "'dsp'" in err and "fbp" in err and "dps" in err and "medrecon methods" in err


def test_help_is_plain_text(capsys):
    from medrecon.cli import _VERBS

    for argv in [["--help"]] + [[verb, "--help"] for verb in _VERBS]:
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and "`" not in out, (argv, out)


def test_verbosity_levels():
    import logging

    from medrecon.cli import setup_logging

    names = ("", "medrecon", "matplotlib.font_manager")
    saved = {n: logging.getLogger(n).level for n in (*names, "matplotlib")}
    try:
        def levels():
            return tuple(logging.getLogger(n).getEffectiveLevel() for n in names)

        setup_logging(0)
        assert levels() == (logging.WARNING, logging.INFO, logging.WARNING)
        setup_logging(1)
        assert levels() == (logging.WARNING, logging.DEBUG, logging.WARNING)
        setup_logging(2)
        assert levels() == (logging.DEBUG, logging.DEBUG, logging.WARNING)
        setup_logging(2, quiet=True)
        assert levels() == (logging.WARNING, logging.WARNING, logging.WARNING)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
