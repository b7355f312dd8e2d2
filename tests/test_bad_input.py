"""Bad input, one clear error each (issue #9): every fault a user can make, through the entry points a user hits.

Each test asserts the error class, that the message names the offending file or config key, that a fix is
given, and (where an output had been started) that nothing half-written is left at the output path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr

from medrecon import config as cfgmod
from medrecon.budget import check_ingest_budget, check_memory_budget, estimate_reconstruct_mb
from medrecon.cli import main
from medrecon.diffusion.checkpoint import content_hash, load_checkpoint, save_checkpoint
from medrecon.diffusion.networks import build_unet, tiny_network_spec
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError, DeviceError, InputError, MedreconError, ResourceError
from medrecon.evaluate import evaluate
from medrecon.io.dicom_writer import write_dicom_series
from medrecon.io.ingest import ingest
from medrecon.io.nifti import write_nifti
from medrecon.io.phantoms import write_phantom_volume
from medrecon.measure import measure
from medrecon.measurement import Measurement, write_measurement
from medrecon.physics.ct_geometry import CTGeometry, sparse_view_angles
from medrecon.recon.registry import get_method, load_all
from medrecon.reconstruct import reconstruct
from medrecon.volume import Geometry, Volume

SHAPE = (4, 32, 32)
SPACING = (3.0, 4.0, 4.0)
CT_CFG = {"measure": {"ct": {"views": 8, "I0": None}}}


def assert_clear(err: BaseException, *names: object) -> None:
    """A medrecon error whose message names every one of ``names`` and that carries a fix."""
    assert isinstance(err, MedreconError), type(err)
    text = str(err)
    for name in names:
        assert str(name) in text, f"{name!r} not named in: {text}"
    assert err.fix and f"Fix: {err.fix}" in text, text


def cli_error(capsys, argv: list[str], *names: object) -> str:
    """Run the CLI; it must exit 2 with one line naming ``names`` and a fix."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medrecon: error:") and "\n" not in err and "Fix:" in err, err
    for name in names:
        assert str(name) in err, f"{name!r} not named in: {err}"
    return err


@pytest.fixture
def ct_volume(tmp_path):
    return write_phantom_volume("ct_chest", tmp_path / "ct.zarr", SHAPE, SPACING, 3)


@pytest.fixture
def ct_measurement(ct_volume, tmp_path):
    return measure(ct_volume, tmp_path / "m.zarr", cfgmod.validate(CT_CFG))


def _cone_on_this_machine() -> bool:
    from medrecon.physics.ct import require_cone_gpu

    try:
        require_cone_gpu()
    except DeviceError:
        return False
    return True


needs_no_gpu = pytest.mark.skipif(_cone_on_this_machine(), reason="ASTRA CUDA works here: cone beam is allowed")


# ------------------------------------------------------------------------------ config: unknown keys, types


@pytest.mark.parametrize("config, key", [
    ({"measure": {"ct": {"veiws": 10}}}, "veiws"),              # unknown key, nested
    ({"reconstrct": {}}, "reconstrct"),                         # unknown top-level section
    ({"measure": {"ct": {"views": "sixty"}}}, "measure.ct.views"),  # wrong type
    ({"memory_mb": "lots"}, "memory_mb"),
    ({"memory_mb": 0}, "memory_mb"),                            # out of range
])
def test_config_schema_errors_name_the_key(config, key, capsys, ct_volume, tmp_path):
    with pytest.raises(ConfigError) as err:
        cfgmod.validate(config, "study.yaml")
    assert_clear(err.value, key, "study.yaml")
    import json

    cli_error(capsys, ["measure", str(ct_volume), str(tmp_path / "m.zarr"), "--config", json.dumps(config)], key)
    assert not (tmp_path / "m.zarr").exists()


def test_config_file_missing_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError) as err:
        cfgmod.load(tmp_path / "nope.yaml")
    assert_clear(err.value, "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("measure: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.load(bad)
    assert_clear(err.value, "bad.yaml")


# ---------------------------------------------------------------------------------- paths that do not exist


def test_missing_paths_are_named_by_every_verb(capsys, ct_volume, ct_measurement, tmp_path):
    nope = tmp_path / "nope"
    out = tmp_path / "out.zarr"
    cli_error(capsys, ["ingest", str(nope), str(out)], nope)
    cli_error(capsys, ["measure", str(nope) + ".zarr", str(out)], "nope.zarr")
    cli_error(capsys, ["reconstruct", str(nope) + ".zarr", str(out), "--method", "fbp"], "nope.zarr")
    cli_error(capsys, ["reconstruct", str(ct_measurement), str(out), "--method", "dds", "--prior",
                       str(tmp_path / "prior.pt")], "prior.pt")
    cli_error(capsys, ["evaluate", str(ct_volume), str(nope) + ".zarr", str(tmp_path / "m.json"),
                       "--subject", "s", "--method", "fbp"], "nope.zarr")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_subject_whose_input_does_not_exist_is_named_at_load_time(tmp_path):
    """What the workflow checks when it loads the config (workflow/rules/common.smk), before planning jobs."""
    (tmp_path / "data" / "ct_chest_s1").mkdir(parents=True)
    (tmp_path / "mr.zarr").mkdir()
    subjects = [
        {"id": "ct01", "input": "data/ct_chest_s1", "modality": "CT"},  # relative to the workflow directory
        {"id": "mr01", "input": str(tmp_path / "mr.zarr"), "modality": "MR"},
        {"id": "gen", "input": "phantom:ct_chest?seed=1", "modality": "CT"},  # generated, not a path
    ]
    cfgmod.check_subject_inputs(subjects, tmp_path)
    typo = {"id": "ct02", "input": "data/ct_chset_s1", "modality": "CT"}
    with pytest.raises(ConfigError) as err:
        cfgmod.check_subject_inputs([*subjects, typo], tmp_path)
    assert_clear(err.value, "'ct02'", "data/ct_chset_s1", "does not exist", tmp_path)
    assert "data/ct_chest_s1" in err.value.fix and "\n" not in str(err.value)
    gone = {"id": "mr02", "input": str(tmp_path / "gone.nii.gz"), "modality": "MR"}
    with pytest.raises(ConfigError) as err:
        cfgmod.check_subject_inputs([*subjects, typo, gone], tmp_path)
    assert_clear(err.value, "2 subjects", "'ct02'", "data/ct_chset_s1", "'mr02'", "gone.nii.gz")


# ----------------------------------------------------------------------------------- DICOM folder, no images


def test_dicom_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as err:
        ingest(empty, tmp_path / "e.zarr", cfgmod.validate({}))
    assert_clear(err.value, empty, "holds no files")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    with pytest.raises(InputError) as err:
        ingest(junk, tmp_path / "j.zarr", cfgmod.validate({}))
    assert_clear(err.value, junk, "notes.txt", "not a DICOM file")
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "j.zarr").exists()


def test_single_dicom_image_is_named_as_a_single_image(tmp_path):
    """A subject whose input is one file of a series: say so, not "too few slice positions"."""
    files = write_dicom_series(np.zeros(SHAPE, np.float32), Geometry(SPACING), tmp_path / "dcm", modality="CT")
    with pytest.raises(InputError) as err:
        ingest(files[1], tmp_path / "one.zarr", cfgmod.validate({}))
    assert_clear(err.value, files[1], "single image", "ingest.min_slices")
    assert "folder" in err.value.fix
    assert not (tmp_path / "one.zarr").exists()


@pytest.mark.parametrize("keep", ["header_and_part_of_the_pixels", "first_400_bytes"])
def test_truncated_dicom_image_is_named_as_truncated(tmp_path, keep):
    files = write_dicom_series(np.zeros(SHAPE, np.float32), Geometry(SPACING), tmp_path / "dcm", modality="CT")
    cut = files[0]
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(size - 100 if keep == "header_and_part_of_the_pixels" else 400)
    with pytest.raises(InputError) as err:
        ingest(cut, tmp_path / "cut.zarr", cfgmod.validate({}))
    assert_clear(err.value, cut, "truncated")
    assert "single image" not in str(err.value) and "slice position" not in str(err.value)
    assert not (tmp_path / "cut.zarr").exists()


# ----------------------------------------------------------------------------------------- NaN/Inf voxels


def _nan_data() -> np.ndarray:
    data = np.zeros(SHAPE, np.float32)
    data[2, 5, 5] = np.nan
    data[3, 1, 1] = np.inf
    return data


def test_nan_in_a_nifti_is_refused_at_ingest(tmp_path):
    src = write_nifti(tmp_path / "scan.nii", _nan_data(), Geometry(SPACING))
    with pytest.raises(InputError) as err:
        ingest(src, tmp_path / "v.zarr", cfgmod.validate({}), modality="MR")
    assert_clear(err.value, "scan.nii", "NaN/Inf")
    assert not (tmp_path / "v.zarr").exists()


def test_nan_in_a_zarr_volume_is_refused_naming_the_source(tmp_path):
    src = tmp_path / "nan.zarr"
    with Volume.create(src, SHAPE, Geometry(SPACING), {"modality": "CT", "units": "HU"},
                       allow_nonfinite=True) as w:
        w.write(_nan_data())
    with pytest.raises(InputError) as err:
        ingest(src, tmp_path / "copy.zarr", cfgmod.validate({}))
    assert_clear(err.value, src, "NaN/Inf")
    assert not (tmp_path / "copy.zarr").exists()
    # measure is the other entry point such a volume reaches: same error, naming the volume and the slices
    with pytest.raises(InputError) as err:
        measure(src, tmp_path / "m.zarr", cfgmod.validate(CT_CFG))
    assert_clear(err.value, src, "NaN/Inf", "[2, 3]")
    assert not (tmp_path / "m.zarr").exists()


def test_reconstruct_takes_its_seed_and_params_from_the_schema(ct_measurement, tmp_path):
    """Defaults live in the schema (seed) and the method registration (params); the code adds none of its own."""
    schema_seed = cfgmod.schema()["properties"]["reconstruct"]["properties"]["seed"]["default"]
    rec = reconstruct(ct_measurement, tmp_path / "fbp.zarr", "fbp", cfgmod.validate({}))
    assert rec.meta["provenance"]["seeds"]["reconstruct"] == schema_seed == 2


# ------------------------------------------------------------------- measurement geometry vs. the volume


def test_evaluating_against_another_volume_on_the_same_grid_is_refused(ct_measurement, tmp_path):
    other = write_phantom_volume("ct_chest", tmp_path / "other.zarr", SHAPE, SPACING, seed=9)
    rec = reconstruct(ct_measurement, tmp_path / "fbp.zarr", "fbp", cfgmod.validate({}))
    with pytest.raises(InputError) as err:
        evaluate(other, rec.path, tmp_path / "m.json", cfgmod.validate({}), "s", "fbp")
    assert_clear(err.value, "other.zarr", "ct.zarr", "m.zarr", "not the volume that was measured")
    assert not (tmp_path / "m.json").exists()
    # a copy of the measured volume is the same volume
    copy = tmp_path / "copy.zarr"
    import shutil

    shutil.copytree(tmp_path / "ct.zarr", copy)
    assert evaluate(copy, rec.path, tmp_path / "m.json", cfgmod.validate({}), "s", "fbp")["metrics"]["psnr"] > 10


def test_evaluating_against_another_grid_names_the_measurement(ct_measurement, tmp_path):
    small = write_phantom_volume("ct_chest", tmp_path / "small.zarr", (4, 24, 24), SPACING, seed=3)
    rec = reconstruct(ct_measurement, tmp_path / "fbp.zarr", "fbp", cfgmod.validate({}))
    with pytest.raises(InputError) as err:
        evaluate(small, rec.path, tmp_path / "m.json", cfgmod.validate({}), "s", "fbp")
    assert_clear(err.value, "small.zarr", "fbp.zarr", "m.zarr", "not on the grid")
    assert not (tmp_path / "m.json").exists()


def _rewrite(meas_path, out, y=None, **meta):
    """A copy of a measurement with other data or attributes (measured data written by hand)."""
    m = Measurement.open(meas_path)
    keep = {k: v for k, v in m.meta.items() if k not in ("format", "operator", "y_shape", "y_dtype", "complete")}
    write_measurement(out, m.read() if y is None else y, m.operator(), {**keep, **meta})
    return out


@pytest.mark.parametrize("change, named", [
    ("y", "the data have shape (4, 8, 44)"),
    ("image_shape", "the image is (4, 24, 24)"),
    ("spacing", "pixel spacing"),
])
def test_measurement_disagreeing_with_its_image_is_refused(change, named, ct_measurement, tmp_path):
    m = Measurement.open(ct_measurement)
    if change == "y":
        bad = _rewrite(ct_measurement, tmp_path / "bad.zarr", y=m.read()[:, :, :44].copy())
    elif change == "image_shape":
        bad = _rewrite(ct_measurement, tmp_path / "bad.zarr", image_shape=[4, 24, 24])
    else:
        bad = _rewrite(ct_measurement, tmp_path / "bad.zarr",
                       image_geometry=Geometry((3.0, 2.0, 2.0)).to_dict())
    with pytest.raises(InputError) as err:
        reconstruct(bad, tmp_path / "r.zarr", "sirt", cfgmod.validate({}))
    assert_clear(err.value, "bad.zarr", "inconsistent", named)
    assert not (tmp_path / "r.zarr").exists()


# ------------------------------------------------------------------ a GPU-only geometry on a CPU machine


@needs_no_gpu
def test_cone_beam_measure_on_a_cpu_machine(capsys, ct_volume, tmp_path):
    cfg = cfgmod.validate({"measure": {"ct": {"beam": "cone", "views": 8}}})
    with pytest.raises(DeviceError) as err:
        measure(ct_volume, tmp_path / "m.zarr", cfg)
    assert_clear(err.value, "measure.ct.beam", "ct.zarr", "GPU")
    assert "parallel" in err.value.fix and "GPU node" in err.value.fix
    cli_error(capsys, ["measure", str(ct_volume), str(tmp_path / "m.zarr"), "--config",
                       '{"measure": {"ct": {"beam": "cone"}}}'], "measure.ct.beam")
    assert not (tmp_path / "m.zarr").exists()


@needs_no_gpu
def test_cone_beam_measurement_reconstructed_on_a_cpu_machine(ct_measurement, tmp_path):
    # A cone-beam measurement made on a GPU node, opened here: rewrite the stored operator as cone beam.
    cone = CTGeometry.create("cone", SHAPE, SPACING, sparse_view_angles(8, 360.0))
    g = zarr.open_group(str(ct_measurement), mode="r+", zarr_format=3)
    geometry = cone.to_dict()
    geometry.pop("angles")
    g.attrs["medrecon"] = {**g.attrs["medrecon"], "operator": {"kind": "ct-cone", "params": {"geometry": geometry}}}
    with pytest.raises(DeviceError) as err:
        reconstruct(ct_measurement, tmp_path / "r.zarr", "sirt", cfgmod.validate({}))
    assert_clear(err.value, "m.zarr", "ct-cone", "measure.ct.beam")
    assert not (tmp_path / "r.zarr").exists()


def test_cuda_device_on_a_machine_without_one(capsys, ct_measurement, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    cli_error(capsys, ["reconstruct", str(ct_measurement), str(tmp_path / "r.zarr"), "--method", "fbp",
                       "--config", '{"reconstruct": {"device": "cuda"}}'], "reconstruct.device")
    assert not (tmp_path / "r.zarr").exists()


# --------------------------------------------------------- a checkpoint for another modality or normalisation


def _checkpoint(path, modality: str, normalisation: dict) -> str:
    spec = tiny_network_spec("slice", 16)
    net = build_unet(spec)
    return save_checkpoint(path, kind="slice", modality=modality, objective="epsilon",
                           network={"builder": "unet", "spec": spec}, schedule=VPSchedule().to_dict(),
                           normalisation=normalisation, train_config={}, data=[], step=1,
                           weights=net.state_dict(), ema_weights=net.state_dict())


MR_NORM = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
CT_NORM = {"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "range": [-1.0, 1.0]}


def test_mr_checkpoint_for_ct_data(capsys, ct_measurement, tmp_path):
    ckpt = tmp_path / "mr_prior.pt"
    _checkpoint(ckpt, "MR", MR_NORM)
    with pytest.raises(InputError) as err:
        reconstruct(ct_measurement, tmp_path / "r.zarr", "dds", cfgmod.validate({}), prior_path=ckpt)
    assert_clear(err.value, "mr_prior.pt", "modality 'MR'", "'CT' was expected")
    cli_error(capsys, ["reconstruct", str(ct_measurement), str(tmp_path / "r.zarr"), "--method", "dds",
                       "--prior", str(ckpt)], "mr_prior.pt")
    assert not (tmp_path / "r.zarr").exists()


def test_checkpoint_whose_normalisation_does_not_fit_its_modality(ct_measurement, tmp_path):
    # A CT checkpoint carrying an MR normalisation (written by another tool or an old version, hash intact).
    good = tmp_path / "ct_prior.pt"
    _checkpoint(good, "CT", CT_NORM)
    content = torch.load(good, weights_only=True)
    content["normalisation"] = MR_NORM
    content["hash"] = content_hash(content)
    bad = tmp_path / "odd_prior.pt"
    torch.save(content, bad)
    with pytest.raises(InputError) as err:
        reconstruct(ct_measurement, tmp_path / "r.zarr", "dds", cfgmod.validate({}), prior_path=bad)
    assert_clear(err.value, "odd_prior.pt", "mr_percentile", "re-train")
    assert not (tmp_path / "r.zarr").exists()
    # an MR prior whose percentile was never fitted cannot put images on its training scale
    unfitted = tmp_path / "unfitted.pt"
    _checkpoint(unfitted, "MR", {**MR_NORM, "value": None})
    with pytest.raises(InputError) as err:
        load_checkpoint(unfitted, expect_modality="MR")
    assert_clear(err.value, "unfitted.pt", "fitted value")


def test_checkpoint_with_another_ct_window_than_expected(tmp_path):
    ckpt = tmp_path / "ct_prior.pt"
    _checkpoint(ckpt, "CT", CT_NORM)
    with pytest.raises(InputError) as err:
        load_checkpoint(ckpt, expect_modality="CT",
                        expect_normalisation={"kind": "ct_window", "hu_min": -1024, "hu_max": 3071})
    assert_clear(err.value, "ct_prior.pt", "intensity normalisation", "3071")


# ----------------------------------------------------------------------------------- memory budget


def test_reconstruct_estimate_scales_with_slab_and_halo():
    per_slice = 256 * 256 * 4 / 2**20 * get_method("sirt").memory_copies
    assert estimate_reconstruct_mb((100, 256, 256), 0, "sirt") == pytest.approx(100 * per_slice)
    assert estimate_reconstruct_mb((100, 256, 256), None, "sirt") == pytest.approx(100 * per_slice)
    assert estimate_reconstruct_mb((100, 256, 256), 10, "sirt") == pytest.approx(10 * per_slice)
    assert estimate_reconstruct_mb((100, 256, 256), 10, "sirt", halo=2) == pytest.approx(14 * per_slice)
    assert estimate_reconstruct_mb((5, 256, 256), 10, "sirt", halo=2) == pytest.approx(5 * per_slice)
    assert estimate_reconstruct_mb((10, 64, 64), 0, "dps") > estimate_reconstruct_mb((10, 64, 64), 0, "fbp")


def test_every_registered_method_has_a_memory_estimate():
    assert all(spec.memory_copies > 0 for spec in load_all().values())
    with pytest.raises(ConfigError) as err:
        estimate_reconstruct_mb((4, 8, 8), 0, "magic")
    assert_clear(err.value, "magic", "sirt")


@pytest.mark.parametrize("halo", [0, 3])
def test_memory_budget_fix_names_a_slab_size_that_fits(halo):
    shape, method, budget = (200, 512, 512), "dds", 4000.0
    with pytest.raises(ResourceError) as err:
        check_memory_budget("results/s/ct01/measurement.zarr", shape, 0, method, budget, halo=halo)
    assert_clear(err.value, "results/s/ct01/measurement.zarr", "memory_mb", "4000", "reconstruct.slab.size")
    n = int(err.value.fix.split("reconstruct.slab.size to ")[1].split()[0])
    assert estimate_reconstruct_mb(shape, n, method, halo) <= budget
    assert estimate_reconstruct_mb(shape, n + 1, method, halo) > budget
    # the suggested slab passes the same check; no budget means no check
    assert check_memory_budget("m.zarr", shape, n, method, budget, halo=halo) <= budget
    assert check_memory_budget("m.zarr", shape, 0, method, None) == estimate_reconstruct_mb(shape, 0, method)


def test_memory_budget_below_one_slice_asks_for_more_memory():
    with pytest.raises(ResourceError) as err:
        check_memory_budget("m.zarr", (10, 1024, 1024), 4, "dps", 100.0)
    one = estimate_reconstruct_mb((10, 1024, 1024), 1, "dps")
    assert_clear(err.value, "m.zarr", "memory_mb")
    assert f"at least {math.ceil(one)}" in err.value.fix and "slab.size" not in err.value.fix


def test_ingest_refuses_a_volume_whose_slices_do_not_fit(capsys, tmp_path):
    spec = "phantom:ct_chest?seed=1&shape=4,512,512&spacing=2,1,1"
    with pytest.raises(ResourceError) as err:
        ingest(spec, tmp_path / "p.zarr", cfgmod.validate({"memory_mb": 4}))
    assert_clear(err.value, spec, "memory_mb = 4 MB", "(4, 512, 512)")
    cli_error(capsys, ["ingest", spec, str(tmp_path / "p.zarr"), "--config", '{"memory_mb": 4}'], "memory_mb")
    assert not (tmp_path / "p.zarr").exists()
    # the same input within budget goes through
    ingest("phantom:ct_chest?seed=1&shape=2,32,32&spacing=2,1,1", tmp_path / "ok.zarr",
           cfgmod.validate({"memory_mb": 4}))
    assert Volume.open(tmp_path / "ok.zarr").shape == (2, 32, 32)


def test_ingest_budget_for_dicom_and_compressed_nifti(tmp_path):
    data = np.full(SHAPE, -1000.0, np.float32)
    folder = tmp_path / "series"
    write_dicom_series(data, Geometry(SPACING), folder, modality="CT")
    with pytest.raises(ResourceError) as err:
        ingest(folder, tmp_path / "d.zarr", cfgmod.validate({"memory_mb": 0.01}))
    assert_clear(err.value, "series", "memory_mb")
    assert not (tmp_path / "d.zarr").exists()
    # gzip-compressed NIfTI is decompressed whole: the fix says so
    gz = write_nifti(tmp_path / "big.nii.gz", np.zeros((64, 64, 64), np.float32), Geometry(SPACING))
    with pytest.raises(ResourceError) as err:
        ingest(gz, tmp_path / "n.zarr", cfgmod.validate({"memory_mb": 2.5}), modality="MR")
    assert_clear(err.value, "big.nii.gz", "memory_mb")
    assert "gunzip" in err.value.fix
    assert check_ingest_budget("x", (64, 64, 64), 2.5) <= 2.5  # the same file uncompressed fits
    assert not (tmp_path / "n.zarr").exists()


@pytest.mark.parametrize("method,typo", [("sirt", "iters"), ("tv", "lambda"), ("fbp", "filtr")])
def test_unknown_classical_parameter_is_refused_before_running(ct_measurement, tmp_path, method, typo):
    cfg = cfgmod.validate({"reconstruct": {"params": {method: {typo: 1}}}})
    with pytest.raises(ConfigError, match=rf"unknown parameter\(s\) \['{typo}'\] for method '{method}'") as err:
        reconstruct(ct_measurement, tmp_path / "r.zarr", method, cfg)
    assert "n_iter" in str(err.value) or "filter" in str(err.value)
    assert not (tmp_path / "r.zarr").exists()
