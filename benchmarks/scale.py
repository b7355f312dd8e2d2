"""Scale benchmark: time and peak memory of ingest -> measure -> reconstruct -> evaluate against the slice count.

What it measures
    For each slice count Z (``--slices``, default 32 64 128 256; in-plane ``--size`` x ``--size``, default
    128) a CT chest phantom goes through the workflow's stages, each in a FRESH subprocess (one torch
    thread) calling the library function the ``medrecon`` verb calls:

    ``ingest``        ``phantom:ct_chest?seed=1&shape=Z,S,S`` -> volume.zarr (:func:`medrecon.io.ingest.ingest`)
    ``measure``       parallel-beam CT, ``--views`` views (default 60), Poisson noise I0 = 1e5
    ``fbp``           :func:`medrecon.reconstruct.reconstruct` with ``fbp``
    ``dds``           the same with ``dds`` (shipped prior ``data/priors/ct_slice.pt``, ``--dds-steps`` steps)
    ``evaluate fbp``  :func:`medrecon.evaluate.evaluate` of each reconstruction against the volume
    ``evaluate dds``

    Both reconstructions run slab by slab: the config carries ``reconstruct.slab: {size: --slab, halo:
    --halo, jobs: 1}`` (defaults 16 and 2), so a reconstruction holds one slab of ``size + 2 halo`` slices.
    Evaluate streams slabs of :func:`medrecon.metrics.evaluation_slab` slices (about 2^20 voxels: 64 slices
    at 128 x 128), so its memory rises until Z exceeds that and is flat beyond; ``--eval-slab 16`` makes it
    flat from the smallest Z.

How to read the table
    ``time`` is the stage's own wall time inside its process (imports and interpreter start excluded; they
    are in the JSON as ``process_s``); ``RSS`` is the process's peak resident memory in MiB (``VmHWM``,
    :func:`medrecon.provenance.peak_rss_mb`; it includes the ~250-300 MiB of importing torch, ASTRA and
    MONAI, given in the JSON as ``import_rss_mb``). The ratio tables divide by the smallest Z: time should
    grow like Z / Z_min (linear), RSS should stay near 1 (flat: the working set is a slab, not the volume).
    Stages whose cost has a Z-independent part (building the CT system matrix, loading the prior) grow
    less than linearly at small Z. The PSNR lines under the table are a sanity check, not a quality result
    (the shipped prior was trained on 64 x 64 slices).

Run: ``python benchmarks/scale.py`` -> prints the tables, writes ``benchmarks/out/scale.json`` (rewritten after
every Z, so a partial run leaves its numbers). ``--quick``: Z = 32 and 64 at 64 x 64 with 3 DDS steps (a
check that everything runs, ~1 min on a 2-core CPU). ``--slices 32 64 128 256 512`` adds the 512-slice
volume of issue #9. ``--device cuda`` reconstructs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PRIOR = REPO / "data" / "priors" / "ct_slice.pt"
SPACING = "2,1.5,1.5"
STAGES = ("ingest", "measure", "fbp", "dds", "evaluate fbp", "evaluate dds")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}


def study_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config every stage gets (validated in the worker, as the CLI would)."""
    return {
        "measure": {"seed": 1, "ct": {"beam": "parallel", "views": args.views, "I0": 1e5}},
        "reconstruct": {"device": args.device, "seed": 2,
                        "slab": {"size": args.slab, "halo": args.halo, "jobs": 1},
                        "params": {"dds": {"steps": args.dds_steps}}},
        "evaluate": {"mask": "body"},
    }


# ----------------------------------------------------------------------------------------------- worker
def run_stage(stage: str, z: int, size: int, work: Path, config: dict[str, Any],
              eval_slab: int | None = None) -> dict[str, Any]:
    """Run one stage in this process; returns its own wall time (imports excluded)."""
    from medrecon import config as cfgmod

    cfg = cfgmod.validate(config, "benchmarks/scale.py")
    vol, meas = work / "volume.zarr", work / "measurement.zarr"
    t0 = time.perf_counter()
    if stage == "ingest":
        from medrecon.io.ingest import ingest

        ingest(f"phantom:ct_chest?seed=1&shape={z},{size},{size}&spacing={SPACING}", vol, cfg, modality="CT")
    elif stage == "measure":
        from medrecon.measure import measure

        measure(vol, meas, cfg, device="cpu")
    elif stage in ("fbp", "dds"):
        from medrecon.reconstruct import reconstruct

        reconstruct(meas, work / f"{stage}.zarr", stage, cfg, prior_path=PRIOR if stage == "dds" else None)
    elif stage.startswith("evaluate "):
        from medrecon.evaluate import evaluate

        method = stage.split()[1]
        doc = evaluate(vol, work / f"{method}.zarr", work / f"{method}.json", cfg, f"z{z}", method,
                       slab=eval_slab)
        return {"stage_s": time.perf_counter() - t0, "psnr": doc["metrics"]["psnr"]}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {"stage_s": time.perf_counter() - t0}


def worker(job_path: Path) -> None:
    """``--worker JOB``: import, note the memory after imports, run the stage, print one JSON line."""
    import torch

    torch.set_num_threads(1)
    import medrecon.evaluate
    import medrecon.measure
    import medrecon.reconstruct  # noqa: F401  (imports before the baseline RSS)
    from medrecon.provenance import peak_rss_mb

    job = json.loads(job_path.read_text())
    import_rss = peak_rss_mb()
    out = run_stage(job["stage"], job["z"], job["size"], Path(job["work"]), job["config"], job["eval_slab"])
    out.update(peak_rss_mb=peak_rss_mb(), import_rss_mb=import_rss)
    print(json.dumps(out))


def spawn(stage: str, z: int, args: argparse.Namespace, work: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` in a fresh interpreter; a failure becomes an ``error`` entry with the stderr tail."""
    job = work / f"job_{stage.replace(' ', '_')}.json"
    job.write_text(json.dumps({"stage": stage, "z": z, "size": args.size, "work": str(work), "config": config,
                               "eval_slab": args.eval_slab}))
    timeout = args.timeout
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                  os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = "timeout", "", f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    wall = time.perf_counter() - t0
    (work / f"{job.stem}.log").write_text(str(stderr))
    if rc != 0:
        return {"error": f"exit {rc}", "stderr_tail": str(stderr).strip().splitlines()[-6:], "process_s": wall,
                "command": f"{sys.executable} benchmarks/scale.py --worker {job}"}
    return {**json.loads(stdout.strip().splitlines()[-1]), "process_s": wall}


# ---------------------------------------------------------------------------------------------- tables
def ratios(runs: dict[int, dict[str, dict]], key: str) -> dict[str, dict[int, float | None]]:
    """``key`` at each Z divided by its value at the smallest Z, per stage (None where a stage failed)."""
    zs = sorted(runs)
    out: dict[str, dict[int, float | None]] = {}
    for stage in STAGES:
        base = runs[zs[0]].get(stage, {}).get(key)
        out[stage] = {z: (runs[z][stage][key] / base if base and key in runs[z].get(stage, {}) else None)
                      for z in zs}
    return out


def table(runs: dict[int, dict[str, dict]]) -> str:
    zs = sorted(runs)

    def cell(r: dict | None, key: str, fmt: str) -> str:
        if r is None:
            return "-"
        return "error" if "error" in r else fmt.format(r[key])

    head = "| stage | " + " | ".join(f"time Z={z} (s)" for z in zs) + " | " + \
        " | ".join(f"RSS Z={z} (MiB)" for z in zs) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(zs))]
    for stage in STAGES:
        rs = [runs[z].get(stage) for z in zs]
        lines.append(f"| {stage} | " + " | ".join(cell(r, "stage_s", "{:.2f}") for r in rs) + " | " +
                     " | ".join(cell(r, "peak_rss_mb", "{:.0f}") for r in rs) + " |")
    t_ratio, m_ratio = ratios(runs, "stage_s"), ratios(runs, "peak_rss_mb")
    lines += ["", "| stage | " + " | ".join(f"time Z={z}/{zs[0]}" for z in zs) + " | " +
              " | ".join(f"RSS Z={z}/{zs[0]}" for z in zs) + " |", "|" + " --- |" * (1 + 2 * len(zs))]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(fmt(t_ratio[stage][z]) for z in zs) + " | " +
                     " | ".join(fmt(m_ratio[stage][z]) for z in zs) + " |")
    lines.append("\nslices ratio: " + ", ".join(f"{z / zs[0]:g}" for z in zs))
    for m in ("fbp", "dds"):
        vals = [runs[z].get(f"evaluate {m}", {}).get("psnr") for z in zs]
        lines.append(f"PSNR {m} (sanity): " + ", ".join("-" if v is None else f"{v:.2f}" for v in vals))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, nargs="+", default=[32, 64, 128, 256], help="slice counts Z")
    p.add_argument("--size", type=int, default=128, help="in-plane size (pixels per side)")
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--dds-steps", type=int, default=10)
    p.add_argument("--slab", type=int, default=16, help="reconstruct.slab.size (0 = whole volume)")
    p.add_argument("--halo", type=int, default=2, help="reconstruct.slab.halo")
    p.add_argument("--eval-slab", type=int, default=None,
                   help="evaluate's slab (default: the workflow's, metrics.evaluation_slab)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="reconstruct.device")
    p.add_argument("--quick", action="store_true", help="Z = 32 64 at 64 x 64, 3 DDS steps")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage subprocess")
    p.add_argument("--out", type=Path, default=HERE / "out" / "scale.json")
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "scale_work")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.dds_steps = [32, 64], 64, 3
    if min(args.slices) < 1 or args.size < 16 or args.dds_steps < 1:
        p.error("--slices must be >= 1, --size >= 16, --dds-steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    config = study_config(args)
    result: dict[str, Any] = {
        "settings": {"slices": sorted(args.slices), "size": args.size, "spacing_mm": SPACING,
                     "views": args.views, "dds_steps": args.dds_steps, "prior": str(PRIOR.relative_to(REPO)),
                     "slab": config["reconstruct"]["slab"], "eval_slab": args.eval_slab, "device": args.device,
                     "threads": 1, "machine": platform.machine(), "cpus": os.cpu_count(), "config": config},
        "runs": {},
    }
    t_start = time.perf_counter()

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t_start
        result["time_ratio"] = ratios(result["runs"], "stage_s")
        result["rss_ratio"] = ratios(result["runs"], "peak_rss_mb")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out)

    for z in sorted(args.slices):
        work = (args.workdir / f"z{z}_s{args.size}").resolve()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        result["runs"][z] = {}
        for stage in STAGES:
            r = spawn(stage, z, args, work, config)
            result["runs"][z][stage] = r
            status = r.get("error") or f"{r['stage_s']:.2f} s, {r['peak_rss_mb']:.0f} MiB"
            print(f"Z={z:4d} {stage:13s} {status}", file=sys.stderr, flush=True)
            save()
    print(table(result["runs"]))
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
