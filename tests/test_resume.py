"""Kill and resume: a job killed mid-write leaves nothing that looks finished, and re-running gives the numbers of
an uninterrupted run; training killed after a checkpoint resumes from it and ends with the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from medrecon.diffusion.checkpoint import load_resume, resume_path
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.diffusion.train import loss_log_path
from medrecon.errors import InputError
from medrecon.io.phantoms import write_phantom_volume
from medrecon.volume import Volume

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
# Measured per run, so they differ between any two runs; every other number must be identical.
VOLATILE = {"runtime_s", "peak_rss_mb", "cuda_max_allocated_mb"}
TINY_NET = {k: v for k, v in tiny_network_spec("slice", 32).items()
            if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution",
                     "num_head_channels", "norm_num_groups")}

# Fault injection for the child processes (found through PYTHONPATH): a writer of the store named
# $STALL_COMMIT stops after its data is written and before the rename that publishes it, i.e. mid-write.
STALL_HOOK = '''
import os
if os.environ.get("STALL_COMMIT"):
    import time
    from pathlib import Path
    from medrecon import volume
    _commit = volume.VolumeWriter.commit
    def commit(self):
        if self.path.name == os.environ["STALL_COMMIT"]:
            Path(os.environ["STALL_MARKER"]).write_text(str(self._tmp))
            time.sleep(600)
        return _commit(self)
    volume.VolumeWriter.commit = commit
'''


def tiny_config(results: str = "results", *, train: bool = False) -> dict:
    """A one-subject CT study (8 x 32 x 32 phantom, 20 views, FBP); with ``train``, a tiny prior and DDS on it."""
    cfg: dict = {
        "study": "tiny", "results": results,
        "subjects": [{"id": "c1", "input": "phantom:ct_chest?seed=3&shape=8,32,32&spacing=5,6,6", "modality": "CT"}],
        "measure": {"ct": {"views": 20}},
        "reconstruct": {"methods": {"CT": ["fbp"], "MR": []}},
    }
    if train:
        cfg["subjects"].append({"id": "tr1", "input": "phantom:ct_chest?seed=11&shape=8,32,32&spacing=5,6,6",
                                "modality": "CT", "role": "train"})
        cfg["reconstruct"]["methods"]["CT"] = ["fbp", "dds"]
        cfg["reconstruct"]["params"] = {"dds": {"steps": 8, "cg_iter": 2}}
        cfg["reconstruct"]["priors"] = {"CT": {"dds": f"{results}/tiny/priors/p.pt"}}
        cfg["train"] = {"p": {"modality": "CT", "kind": "slice", "image_size": 32, "network": TINY_NET,
                              "steps": 40, "checkpoint_every": 10, "batch_size": 4, "warmup_steps": 5,
                              "device": "cpu"}}
    return cfg


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child snakemake/medrecon: this interpreter's bin first on PATH, one thread (as
    Snakemake gives a `threads: 1` job; two busy children on a small machine otherwise oversubscribe it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **extra}


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args, "--snakefile", str(SNAKEFILE),
            "--directory", str(workdir), "--configfile", str(workdir / "config.yaml")]


def run_snakemake(workdir: Path, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(workdir, *args), cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=child_env(**env))
    return proc


def study_dir(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until ``path`` exists; fail with the child's output if it ends first."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended (rc {proc.returncode}) before {path} appeared:\n{out[-4000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def background():
    """Child processes started with ``background(Popen)``; any still running at the end are killed."""
    procs: list[subprocess.Popen] = []
    yield lambda p: procs.append(p) or p
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def metrics(path: Path) -> dict:
    doc = json.loads(path.read_text())
    return {"metrics": {k: v for k, v in doc["metrics"].items() if k not in VOLATILE}, "per_slice": doc["per_slice"]}


def test_killing_snakemake_mid_write_then_rerunning_gives_the_uninterrupted_numbers(tmp_path, background):
    """SIGKILL the whole run (snakemake and its job) while reconstruct is writing its store, then resume."""
    target = "results/tiny/c1/metrics/fbp.json"
    ref = study_dir(tmp_path / "ref", tiny_config())
    killed = study_dir(tmp_path / "killed", tiny_config())
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    marker = tmp_path / "stalled"
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    # The uninterrupted reference runs alongside (same config, another directory).
    ref_proc = background(subprocess.Popen(snakemake_cmd(ref, target, "--cores", "1"), cwd=ref,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           env=child_env()))
    run = subprocess.Popen(snakemake_cmd(killed, target, "--cores", "1"), cwd=killed, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=child_env(PYTHONPATH=pythonpath, STALL_COMMIT="fbp.zarr", STALL_MARKER=str(marker)))
    try:
        wait_for(marker, run)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    recon = killed / "results/tiny/c1/recon"
    tmp = killed / marker.read_text()
    assert tmp.parent == recon and tmp.name.startswith(".fbp.zarr.tmp-") and (tmp / "zarr.json").is_file()
    # Nothing that looks finished: no store under the output's name, no metrics, and the data that was written
    # (hidden temporary sibling) is refused as unfinished.
    assert sorted(p.name for p in recon.iterdir()) == [tmp.name]
    assert not (killed / target).exists()
    with pytest.raises(InputError, match=r"not a medrecon volume|incomplete"):
        Volume.open(tmp)

    # Snakemake's lock outlives a SIGKILL of snakemake itself: --unlock (as Snakemake says), then run again.
    locked = run_snakemake(killed, target, "--cores", "1")
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert run_snakemake(killed, target, "--unlock").returncode == 0
    again = run_snakemake(killed, target, "--cores", "1", "--rerun-incomplete")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "rule ingest" not in out and "rule measure" not in out   # finished jobs are not redone
    ref_out, _ = ref_proc.communicate(timeout=600)
    assert ref_proc.returncode == 0, ref_out[-4000:]
    assert metrics(killed / target) == metrics(ref / target)
    assert Volume.open(recon / "fbp.zarr").meta["complete"]
    assert not tmp.exists()        # the killed writer's temporary store was cleared by the re-run


def _train(out: Path, volume: Path, cfg: dict, **popen) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "medrecon"), "train", str(out), str(volume), "--name", "p",
           "--config", json.dumps({"train": {"p": cfg}})]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            **popen)


def test_killed_training_resumes_from_its_last_checkpoint_and_ends_with_the_same_weights(tmp_path, background):
    """SIGKILL `medrecon train` after its first resume checkpoint; the re-run continues from that step (the loss
    log rows before it are kept as they were, not recomputed) and ends bit for bit where an uninterrupted run does."""
    vol = tmp_path / "train.zarr"
    write_phantom_volume("ct_chest", vol, (8, 32, 32), (5.0, 6.0, 6.0), 11)
    cfg = tiny_config(train=True)["train"]["p"]
    full = background(_train(tmp_path / "full" / "p.pt", vol, cfg))
    killed_out = tmp_path / "killed" / "p.pt"
    proc = _train(killed_out, vol, cfg, start_new_session=True)
    try:
        wait_for(resume_path(killed_out), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not killed_out.exists()
    step = load_resume(resume_path(killed_out))["step"]
    assert step % cfg["checkpoint_every"] == 0 and 0 < step < cfg["steps"]
    rows_before = loss_log_path(killed_out).read_text().splitlines()

    resumed = _train(killed_out, vol, cfg)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    full_out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, full_out[-3000:]
    rows_after = loss_log_path(killed_out).read_text().splitlines()
    assert len(rows_after) == cfg["steps"] + 1                              # header + one row per step
    assert rows_after[:step + 1] == rows_before[:step + 1]                  # wall-clock column included
    a = torch.load(killed_out, weights_only=True)
    b = torch.load(tmp_path / "full" / "p.pt", weights_only=True)
    for key in ("weights", "ema_weights"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


@pytest.mark.slow
def test_killing_the_training_job_inside_the_workflow_resumes_it(tmp_path, background):
    """A whole study with a trained prior: SIGKILL only the `medrecon train` job (as the OOM killer or a lost node
    would) after its first checkpoint; Snakemake fails the run, a plain re-run resumes training and every metric and
    the prior's weights equal an uninterrupted run's."""
    ref = study_dir(tmp_path / "ref", tiny_config(train=True))
    killed = study_dir(tmp_path / "killed", tiny_config(train=True))
    ref_proc = background(subprocess.Popen(snakemake_cmd(ref, "--cores", "1"), cwd=ref, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, env=child_env()))
    run = subprocess.Popen(snakemake_cmd(killed, "--cores", "1"), cwd=killed, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True, env=child_env())
    prior = killed / "results/tiny/priors/p.pt"
    try:
        wait_for(resume_path(prior), run)
        jobs = [p for p in psutil.Process(run.pid).children(recursive=True)
                if "train" in p.cmdline() and any(a.endswith("medrecon") for a in p.cmdline()[:2])]
        assert jobs, "the train job's process was not found"
        for p in jobs:
            p.kill()
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0 and not prior.exists(), out[-3000:]
    step = load_resume(resume_path(prior))["step"]
    again = run_snakemake(killed, "--cores", "1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ref_out, _ = ref_proc.communicate(timeout=900)
    assert ref_proc.returncode == 0, ref_out[-4000:]
    assert 0 < step < 40
    res, ref_res = killed / "results/tiny", ref / "results/tiny"
    for m in ("fbp", "dds"):
        assert metrics(res / f"c1/metrics/{m}.json") == metrics(ref_res / f"c1/metrics/{m}.json")
    a, b = (torch.load(r / "priors/p.pt", weights_only=True) for r in (res, ref_res))
    assert all(torch.equal(a["ema_weights"][k], b["ema_weights"][k]) for k in a["ema_weights"])
    assert (res / "report.html").exists()
