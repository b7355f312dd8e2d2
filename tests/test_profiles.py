"""Execution profiles: the SLURM profile plans (dry run) and submits (real plugin, stand-in sbatch) the GPU rules
with GPUs; locally, GPU jobs are limited to one per GPU and each gets its own GPU (medrecon.gpu_slots)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import REPO, child_env, run_snakemake, snakemake_cmd, study_dir, tiny_config, wait_for

from medrecon.gpu_slots import claim, visible_gpus

SLURM = REPO / "workflow" / "profiles" / "slurm"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}   # the plan must not depend on the machine the tests run on


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job in a `snakemake -n` listing."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and r:
            jobs.append((m.group(1), dict(kv.split("=", 1) for kv in r.group(1).split(", "))))
    return jobs


def test_slurm_profile_dry_run_plans_every_job_with_gpus_on_the_gpu_rules(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    study = study_dir(tmp_path, tiny_config(train=True))
    proc = run_snakemake(study, "-n", "--profile", str(SLURM), **NO_GPU)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs = planned_jobs(out)
    counts: dict[str, int] = {}
    for rule, _ in jobs:
        counts[rule] = counts.get(rule, 0) + 1
    assert counts == {"ingest": 2, "resample": 2, "measure": 1, "train": 1, "reconstruct": 2, "evaluate": 2,
                      "report": 1, "all": 1}
    for rule, res in jobs:
        if rule in ("train", "reconstruct"):
            assert res["gpu"] == "1" and res["slurm_partition"] == "gpu", (rule, res)
        else:
            assert res.get("gpu", "0") == "0" and res["slurm_partition"] == "cpu", (rule, res)
        assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0 and int(res["cpus_per_task"]) >= 1
    train = dict(jobs)["train"]
    assert (train["mem_mb"], train["runtime"], train["cpus_per_task"]) == ("32000", "480", "4")


def test_slurm_profile_puts_slab_jobs_on_gpus_and_the_gather_on_cpus(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = tiny_config()
    cfg["reconstruct"]["slab"] = {"jobs": 2}
    proc = run_snakemake(study_dir(tmp_path, cfg), "-n", "--profile", str(SLURM), **NO_GPU)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    jobs = planned_jobs(proc.stdout + proc.stderr)
    parts = [res for rule, res in jobs if rule == "reconstruct_part"]
    assert len(parts) == 2 and all(r["gpu"] == "1" and r["slurm_partition"] == "gpu" for r in parts)
    gather = [res for rule, res in jobs if rule == "gather"]
    assert len(gather) == 1 and gather[0]["slurm_partition"] == "cpu" and gather[0].get("gpu", "0") == "0"


def test_slurm_profile_submits_the_train_job_to_the_gpu_partition_with_a_gpu(tmp_path):
    """The real plugin builds the sbatch call; a stand-in `sbatch` (and silent sacct/squeue/...) records it."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    study = study_dir(tmp_path / "study", tiny_config(train=True))
    ingest = run_snakemake(study, "results/tiny/tr1/reference.zarr", "--cores", "1", **NO_GPU)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "sbatch.args"
    (fake / "sbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\necho 4242\n')
    for tool in ("sinfo", "sacct", "squeue", "sacctmgr", "sshare", "scontrol"):
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = child_env(**NO_GPU)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    run = subprocess.Popen(snakemake_cmd(study, "results/tiny/priors/p.pt", "--profile", str(SLURM)), cwd=study,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=env)
    try:
        wait_for(log, run, timeout=120)
        time.sleep(0.2)   # the line is written before sbatch exits
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    call = log.read_text()
    assert "rule_train_wildcards_p" in call
    for flag in ("-p gpu", "--gpus=1", "--mem 32000", "-t 480", "--cpus-per-task=4"):
        assert flag in call, (flag, call)


def test_default_profile_loads_for_local_runs(tmp_path):
    study = study_dir(tmp_path, tiny_config())
    proc = run_snakemake(study, "-n", "--workflow-profile", str(REPO / "workflow/profiles/default"), **NO_GPU)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "workflow specific profile" in out and "Shell command: medrecon ingest" in out   # printshellcmds


def test_gpu_rules_ask_for_a_gpu_only_where_one_is_used(tmp_path):
    cfg = tiny_config(train=True)
    cfg["train"]["p"]["device"] = "auto"
    study = study_dir(tmp_path, cfg)

    def train_gpu(cuda_visible: str) -> str:
        proc = run_snakemake(study, "-n", "-p", "results/tiny/priors/p.pt", "--cores", "1",
                             CUDA_VISIBLE_DEVICES=cuda_visible)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = dict(planned_jobs(proc.stdout + proc.stderr))["train"]
        assert "python -m medrecon.gpu_slots " + res["gpu"] + " -- medrecon train" in proc.stdout
        return res["gpu"]

    assert train_gpu("") == "0"     # auto on a machine without GPUs: a CPU job, not held back by GPU limits
    assert train_gpu("0,1") == "1"  # auto where GPUs are visible


def gpu_limit(proc: subprocess.CompletedProcess) -> str | None:
    """The `gpu` value of Snakemake's "Provided resources" line (printed as gpu=2 or gpu=Resource("gpu", 2))."""
    m = re.search(r"Provided resources:.*?\bgpu=\D*(\d+)", proc.stdout + proc.stderr)
    return m.group(1) if m else None


def test_a_local_run_on_a_gpu_machine_runs_one_gpu_job_per_gpu(tmp_path):
    """The `gpu` limit is the number of visible GPUs unless --resources gpu=N is given."""
    study = study_dir(tmp_path, tiny_config())
    target = "results/tiny/c1/volume.zarr"
    proc = run_snakemake(study, target, "--cores", "1", CUDA_VISIBLE_DEVICES="0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert gpu_limit(proc) == "2"
    proc = run_snakemake(study, target, "--cores", "1", "--forcerun", "ingest", "--resources", "gpu=1",
                         CUDA_VISIBLE_DEVICES="0,1")
    assert gpu_limit(proc) == "1"


def test_visible_gpus_follows_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]   # CUDA stops at the first invalid id
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8a1b,GPU-77c2"}) == ["GPU-8a1b", "GPU-77c2"]


def _slot_of(lock_dir: Path, gpus: int = 1, visible: str = "3,5", **popen) -> subprocess.Popen:
    code = "import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); time.sleep(60)"
    return subprocess.Popen([sys.executable, "-m", "medrecon.gpu_slots", str(gpus), "--lock-dir", str(lock_dir),
                             "--", sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": visible}, **popen)


def test_concurrent_gpu_jobs_get_different_gpus_and_a_killed_job_frees_its_gpu(tmp_path):
    first, second = _slot_of(tmp_path), _slot_of(tmp_path)
    try:
        got = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert got == {"3", "5"}
        assert "CUDA_VISIBLE_DEVICES=" in first.stderr.readline()
        # Both GPUs are taken: a third job waits; SIGKILL the first and the third gets its GPU.
        third = _slot_of(tmp_path)
        try:
            assert "waiting" in third.stderr.readline()
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert third.stdout.readline().strip() in got
        finally:
            third.kill()
            third.wait()
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


def test_a_job_without_gpus_or_with_every_visible_gpu_runs_unchanged(tmp_path):
    for gpus, visible in ((0, "3,5"), (1, "4"), (2, "3,5")):
        p = _slot_of(tmp_path, gpus, visible)
        try:
            assert p.stdout.readline().strip() == visible
        finally:
            p.kill()
            p.wait()
    assert not list(tmp_path.iterdir())   # no lock was taken


def test_claim_takes_n_free_gpus(tmp_path):
    ids, fds = claim(2, ["0", "1", "2"], tmp_path)
    try:
        assert ids == ["0", "1"] and len(fds) == 2
        ids2, fds2 = claim(1, ["0", "1", "2"], tmp_path)
        assert ids2 == ["2"]
        for fd in fds2:
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
