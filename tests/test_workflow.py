"""The Snakemake workflow as a user runs it: dry run of the shipped demo, and a real run of a tiny study."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from medrecon.volume import Volume

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"   # found by itself from the repository root (Snakemake's search order)


def _snakemake(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_dry_run():
    proc = _snakemake(["-n", "--forceall", "--cores", "2", "--directory", str(REPO),
                       "--snakefile", str(SNAKEFILE)], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for rule in ("ingest", "measure", "reconstruct", "evaluate", "report"):
        assert rule in out


def test_demo_dry_run_from_the_repository_root_finds_the_workflow_and_config():
    """`snakemake` from the root as the README says: workflow/Snakefile, config/config.yaml and the default
    workflow profile are found by Snakemake itself."""
    proc = _snakemake(["-n", "--forceall"], REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "workflow/profiles/default" in out and "report" in out


def test_snakemake_lint_is_clean():
    """Conda env per rule, helper functions only in common.smk, no path composition with '+': `--lint` finds
    nothing (it exits 1 when it does)."""
    proc = _snakemake(["--lint"], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Congratulations" in proc.stdout + proc.stderr


def test_bad_config_key_stops_the_workflow(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["measure"]["ct"]["veiws"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["-n", "--cores", "1", "--snakefile", str(SNAKEFILE), "--directory", str(REPO),
                       "--configfile", str(tmp_path / "c.yaml")], REPO)
    assert proc.returncode != 0
    assert "veiws" in proc.stdout + proc.stderr


def test_subject_with_a_missing_input_stops_the_workflow_at_load_time(tmp_path):
    """Checked when the config is loaded, not when (or if) Snakemake decides to run that subject's ingest."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["subjects"].append({"id": "ct99", "input": "data/demo/ct_chset_s1", "modality": "CT"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["-n", "--cores", "1", "--snakefile", str(SNAKEFILE), "--directory", str(REPO),
                       "--configfile", str(tmp_path / "c.yaml")], REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    named = [line for line in out.splitlines() if "'ct99'" in line and "data/demo/ct_chset_s1" in line]
    assert len(named) == 1 and "does not exist" in named[0] and "Fix:" in named[0], out
    assert "Traceback" not in out and "Building DAG" not in out, out


def test_tiny_study_runs_end_to_end(tmp_path):
    """ingest (DICOM + zarr) → measure → reconstruct → evaluate → report, for real, on a tiny study."""
    from medrecon.io.dicom_writer import write_dicom_series
    from medrecon.io.phantoms import make_phantom, write_phantom_volume

    data, geom, _ = make_phantom("ct_chest", (12, 48, 48), (4.0, 6.0, 6.0), 5)
    write_dicom_series(data, geom, tmp_path / "ct", modality="CT", seed=5, shuffle_names=True)
    write_phantom_volume("mr_brain", tmp_path / "mr.zarr", (12, 48, 48), (3.0, 4.0, 4.0), 6)
    cfg = {
        "study": "tiny", "results": str(tmp_path / "results"),
        "subjects": [{"id": "c1", "input": str(tmp_path / "ct"), "modality": "CT"},
                     {"id": "m1", "input": str(tmp_path / "mr.zarr"), "modality": "MR"}],
        "measure": {"ct": {"views": 30}, "mr": {"acs_lines": 8, "acceleration": 3}},
        "reconstruct": {"methods": {"CT": ["fbp"], "MR": ["zero_filled", "sense"]}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["--cores", "2", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
                       "--configfile", str(tmp_path / "config.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = tmp_path / "results" / "tiny"
    assert (res / "report.html").exists()
    ct_metrics = json.loads((res / "c1" / "metrics" / "fbp.json").read_text())["metrics"]
    assert ct_metrics["psnr"] > 15 and 0 < ct_metrics["data_residual"] < 0.1
    m = {meth: json.loads((res / "m1" / "metrics" / f"{meth}.json").read_text())["metrics"]
         for meth in ("zero_filled", "sense")}
    assert m["sense"]["psnr"] > m["zero_filled"]["psnr"]
    rec = Volume.open(res / "c1" / "recon" / "fbp.zarr")
    assert rec.meta["units"] == "HU" and rec.meta["provenance"]["config_hash"]
    # Reconstructed on the study's grid (default size 64: the 48-px, 6 mm phantom at 4.5 mm), scored against the
    # ingested volume resampled onto it; the ingested volume itself is untouched.
    ref = Volume.open(res / "c1" / "reference.zarr")
    assert ref.geometry.isclose(rec.geometry) and ref.shape == (12, 64, 64) == rec.shape
    assert rec.meta["grid"]["size"] == [64, 64] and Volume.open(res / "c1" / "volume.zarr").shape == (12, 48, 48)
    assert json.loads((res / "c1" / "metrics" / "fbp.json").read_text())["reference_grid"]["size"] == [64, 64]
    # Snakemake's own records: a log and a benchmark for every job.
    assert (res / "logs" / "c1" / "reconstruct_fbp.log").exists()
    assert (res / "benchmarks" / "c1" / "measure.tsv").exists()
    # A second run has nothing to do.
    again = _snakemake(["-n", "--cores", "1", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
                        "--configfile", str(tmp_path / "config.yaml")], tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    # A new subject with a mistyped input is an error, not "Nothing to be done" beside the old report.
    cfg["subjects"].append({"id": "c2", "input": str(tmp_path / "cct"), "modality": "CT"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    typo = _snakemake(["-n", "--cores", "1", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
                       "--configfile", str(tmp_path / "config.yaml")], tmp_path)
    said = typo.stdout + typo.stderr
    assert typo.returncode != 0 and "Nothing to be done" not in said, said
    assert any("'c2'" in line and str(tmp_path / "cct") in line for line in said.splitlines()), said
    shutil.rmtree(res)


def test_scattered_slab_jobs_equal_one_job(tmp_path):
    """reconstruct.slab.jobs = 3 (scatter over Snakemake jobs, then gather) gives the same volume and metrics as
    one job over the same slab plan; the part folders are temporary."""
    base = {"study": "s", "subjects": [{"id": "c1", "modality": "CT",
                                        "input": "phantom:ct_chest?seed=4&shape=12,32,32&spacing=4,8,8"}],
            "measure": {"ct": {"views": 24}},
            "reconstruct": {"methods": {"CT": ["fbp", "tv"]}, "params": {"tv": {"n_iter": 20}}}}
    metrics = {}
    for jobs in (1, 3):
        cfg = {**base, "results": str(tmp_path / f"r{jobs}"),
               "reconstruct": {**base["reconstruct"], "slab": {"size": 4, "halo": 1, "jobs": jobs}}}
        (tmp_path / f"c{jobs}.yaml").write_text(yaml.safe_dump(cfg))
        targets = [str(tmp_path / f"r{jobs}" / "s" / "c1" / "metrics" / f"{m}.json") for m in ("fbp", "tv")]
        proc = _snakemake([*targets, "--cores", "2", "--snakefile", str(SNAKEFILE), "--directory",
                           str(tmp_path), "--configfile", str(tmp_path / f"c{jobs}.yaml")], tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        recon = tmp_path / f"r{jobs}" / "s" / "c1" / "recon"
        metrics[jobs] = {m: json.loads((recon.parent / "metrics" / f"{m}.json").read_text())["metrics"]
                         for m in ("fbp", "tv")}
        assert Volume.open(recon / "tv.zarr").meta["record"]["slabs"] == 3
        assert not list(recon.glob("*.parts/*")) and not list(recon.glob("*.slabs"))
    for m in ("fbp", "tv"):
        for key in ("psnr", "ssim", "data_residual"):
            assert metrics[3][m][key] == metrics[1][m][key], (m, key)


def test_every_whole_slice_sampler_runs_through_the_workflow(tmp_path):
    """The samplers of the papers' comparison tables run as workflow jobs (measure -> reconstruct -> evaluate ->
    report) with the shipped phantom priors, a few steps each: a method is usable once it is in methods and its
    prior is named, nothing else to wire."""
    from medrecon.io.phantoms import write_phantom_volume

    write_phantom_volume("ct_chest", tmp_path / "ct.zarr", (4, 48, 48), (5.0, 6.0, 6.0), 7)
    write_phantom_volume("mr_brain", tmp_path / "mr.zarr", (4, 48, 48), (5.0, 4.0, 4.0), 8)
    slice_prior, mr_prior = str(REPO / "data/priors/ct_slice.pt"), str(REPO / "data/priors/real_mr_slice.pt")
    latent = [str(REPO / "data/priors/ct_autoencoder.pt"), str(REPO / "data/priors/ct_latent.pt")]
    ct = {"ddnm": {"steps": 3}, "mcg": {"steps": 3}, "dcdp": {"steps": 2, "ddim_steps": 2},
          "dcdp_latent": {"steps": 2, "ddim_steps": 2}, "pnp_admm": {"iterations": 3},
          "pnp_red": {"iterations": 3}, "diffusionmbir": {"steps": 3}, "ddrm": {"steps": 3, "sigma_y": 0.005}}
    mr = {"ddnm": {"steps": 3}, "pnp_admm": {"iterations": 3}, "tilted": {"ula_steps": 3}}
    params = {m: {**ct.get(m, {}), **({"MR": mr[m]} if m in mr else {})} for m in {*ct, *mr}}
    cfg = {
        "study": "samplers", "results": str(tmp_path / "results"),
        "subjects": [{"id": "c1", "input": str(tmp_path / "ct.zarr"), "modality": "CT"},
                     {"id": "m1", "input": str(tmp_path / "mr.zarr"), "modality": "MR"}],
        # MR at 20 dB: tilted transport needs sigma_y / ||A|| above the prior's smallest trained level (at 30 dB
        # it refuses with one clear error, tests/methods/test_tilted.py)
        "measure": {"ct": {"views": 10}, "mr": {"acs_lines": 8, "acceleration": 3, "snr_db": 20.0}},
        "reconstruct": {"methods": {"CT": sorted(ct), "MR": sorted(mr)}, "params": params,
                        "priors": {"CT": {m: latent if m == "dcdp_latent" else slice_prior for m in ct},
                                   "MR": {m: mr_prior for m in mr}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = _snakemake(["--cores", "2", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path),
                       "--configfile", str(tmp_path / "config.yaml")], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = tmp_path / "results" / "samplers"
    assert (res / "report.html").exists()
    for subject, methods in (("c1", ct), ("m1", mr)):
        for m in methods:
            metrics = json.loads((res / subject / "metrics" / f"{m}.json").read_text())["metrics"]
            assert metrics["psnr"] == metrics["psnr"] and metrics["runtime_s"] > 0, (subject, m, metrics)
