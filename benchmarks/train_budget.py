"""Train several priors of a study at once on one accelerator inside a fixed wall-clock budget (a GPU lease).

Why this exists beside the workflow's ``train`` rule: Snakemake gives each training job a whole GPU, so on a
one-GPU machine the priors train one after another, each using a sliver of the card (the demo-sized networks
are launch-bound). A lease is minutes long, and the cosine learning-rate schedule needs its step count up
front, so the runs cannot simply be stopped when time is up. This script therefore

1. **calibrates**: every prior trains ``--calibrate`` steps, all at once (the load the real runs will see);
   its steady seconds per step is read from its loss log (the first quarter, warm-up and autotuning, left out);
2. **sizes**: each prior's ``steps`` becomes what fits the budget left (rounded down to ``--round``), and the
   exact ``train:`` entries used are written to ``<out>/train_sections.json`` -- put them in the study config
   and ``snakemake .../priors/<name>.pt`` reproduces the run;
3. **trains** them all at once with ``medrecon train`` (the workflow's own command), each writing its
   checkpoint, resume file and loss log. A run still going at ``--hard-limit-s`` is stopped; its resume file
   stays, so the workflow resumes it.

Prints a table (steps, seconds per step at calibration and in the run, wall time, mean loss of the last 5 %
of steps) and writes ``<out>/train_budget.json``.

Measured on one H200 with seven demo-sized priors at once (batch 128): every run took 0.12-0.14 s per step
whatever its width (1.1 M or 4.4 M parameters; 0.085 s at batch 32), so the card is shared, not filled. The real
runs were slower than calibrated (start-up ~60 s with seven processes loading data at once, the 4.4 M net
0.197 s per step against 0.124), and with the whole remaining budget planned (no safety factor) five of seven were
stopped short; hence the default 0.75. Latent priors (ReSample), which need their autoencoder
first, are refused: train the autoencoder here and the latent prior in a later run.

Run (from the repository root, training volumes already made by the workflow's ingest/resample rules)::

    python benchmarks/train_budget.py --config config/real.yaml --priors real_ct_slice_gpu real_mr_slice_gpu \\
        --budget-s 480 --out /tmp/budget
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medrecon import config as cfgmod
from medrecon.diffusion.train import loss_log_path
from medrecon.errors import ConfigError

TRAIN_CMD = [sys.executable, "-m", "medrecon.cli", "train"]


def training_volumes(cfg: dict[str, Any], modality: str, results: Path) -> list[Path]:
    """The study's reference volumes of role 'train' and this modality (what the workflow's train rule takes)."""
    vols = [results / str(s["id"]) / "reference.zarr" for s in cfg["subjects"]
            if s.get("role") == "train" and s.get("modality") == modality]
    missing = [str(v) for v in vols if not v.is_dir()]
    if not vols or missing:
        raise ConfigError(f"training volumes missing for {modality}: {missing or 'no train subjects'}",
                          fix="make them first: snakemake --configfile <config> <results>/<id>/reference.zarr")
    return vols


def loss_log(out: Path) -> list[tuple[int, float, float]]:
    """(step, loss, cumulative seconds) rows of a run's ``<out>.loss.csv``."""
    path = loss_log_path(out)
    if not path.is_file():
        return []
    with path.open() as f:
        return [(int(r["step"]), float(r["loss"]), float(r["seconds"])) for r in csv.DictReader(f)]


def seconds_per_step(rows: list[tuple[int, float, float]]) -> float:
    """Steady seconds per step: the slope over the last three quarters of the logged steps."""
    if len(rows) < 8:
        raise RuntimeError(f"too few logged steps ({len(rows)}) to time a run")
    a, b = rows[len(rows) // 4], rows[-1]
    return (b[2] - a[2]) / (b[0] - a[0])


def launch(name: str, section: dict[str, Any], vols: list[Path], out: Path) -> subprocess.Popen:
    """``medrecon train`` for one prior, its output to ``<out>.log`` (the workflow's command line)."""
    cfg = json.dumps({"train": {name: section}}, sort_keys=True)
    with out.with_name(out.name + ".log").open("w") as log:     # the child keeps its own copy of the handle
        return subprocess.Popen([*TRAIN_CMD, str(out), *map(str, vols), "--name", name, "--config", cfg],
                                stdout=log, stderr=subprocess.STDOUT)


def run_all(jobs: dict[str, tuple[dict[str, Any], list[Path], Path]], deadline: float) -> dict[str, Any]:
    """Start every job at once; stop those still running at ``deadline`` (time.monotonic); return codes, walls."""
    t0 = time.monotonic()
    procs = {n: launch(n, sec, vols, out) for n, (sec, vols, out) in jobs.items()}
    walls: dict[str, float] = {}
    while len(walls) < len(procs):
        for n, p in procs.items():
            if n not in walls and p.poll() is not None:
                walls[n] = time.monotonic() - t0
        if time.monotonic() > deadline:
            for n, p in procs.items():
                if n not in walls:
                    p.terminate()
                    p.wait(30)
                    walls[n] = time.monotonic() - t0
            break
        time.sleep(0.5)
    return {n: {"rc": procs[n].returncode, "wall_s": round(walls[n], 1)} for n in procs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the study config whose train: entries are trained")
    ap.add_argument("--priors", nargs="+", required=True, help="names under train: in the config")
    ap.add_argument("--results", default=None, help="the study's results folder (default <results>/<study>)")
    ap.add_argument("--budget-s", type=float, required=True, help="wall-clock seconds for everything")
    ap.add_argument("--hard-limit-s", type=float, default=None, help="stop runs still going (default budget + 60)")
    ap.add_argument("--calibrate", type=int, default=200, help="steps of the timing runs")
    ap.add_argument("--round", type=int, default=500, help="round each step count down to a multiple of this")
    ap.add_argument("--margin-s", type=float, default=20.0, help="seconds kept for saving")
    ap.add_argument("--safety", type=float, default=0.75,
                    help="fraction of the budget left that the step counts plan for (see the module notes)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    start = time.monotonic()
    hard = start + (a.hard_limit_s if a.hard_limit_s is not None else a.budget_s + 60)
    cfg = cfgmod.load(a.config)
    results = Path(a.results) if a.results else Path(cfg["results"]) / cfg["study"]
    out = Path(a.out)
    (out / "calibrate").mkdir(parents=True, exist_ok=True)
    entries, vols = {}, {}
    for name in a.priors:
        if name not in cfg["train"]:
            raise ConfigError(f"no train.{name} in {a.config}", fix=f"known: {sorted(cfg['train'])}")
        entries[name] = dict(cfg["train"][name])
        if entries[name].get("kind") == "latent":
            raise ConfigError(f"train.{name} is a latent prior: it needs its autoencoder trained first",
                              fix="train the autoencoder in this run and the latent prior in a later one")
        vols[name] = training_volumes(cfg, entries[name]["modality"], results)

    calib = {n: ({**cfgmod.training_section(e, cfg), "steps": a.calibrate, "checkpoint_every": a.calibrate},
                 vols[n], out / "calibrate" / f"{n}.pt") for n, e in entries.items()}
    cal_runs = run_all(calib, hard)
    rate, startup = {}, {}
    for n, (_, _, o) in calib.items():
        if cal_runs[n]["rc"] != 0:
            why = "was stopped at the hard limit (raise --budget-s or lower --calibrate)" if cal_runs[n]["rc"] < 0 \
                else f"failed (rc {cal_runs[n]['rc']})"
            sys.exit(f"calibration run of {n} {why}; its log: {o}.log")
        rows = loss_log(o)
        rate[n] = seconds_per_step(rows)
        startup[n] = cal_runs[n]["wall_s"] - rows[-1][2]
    left = a.budget_s - (time.monotonic() - start) - max(startup.values()) - a.margin_s
    steps = {n: int(a.safety * left / rate[n]) // a.round * a.round for n in entries}
    short = [n for n, s in steps.items() if s < a.round]
    if short:
        sys.exit(f"budget too small: {short} would train fewer than {a.round} steps ({left:.0f} s left)")
    used = {n: {**e, "steps": steps[n]} for n, e in entries.items()}
    (out / "train_sections.json").write_text(json.dumps(used, indent=2, sort_keys=True))
    jobs = {n: (cfgmod.training_section(used[n], cfg), vols[n], out / f"{n}.pt") for n in entries}
    runs = run_all(jobs, hard)

    table = []
    for n, (_, _, o) in jobs.items():
        rows = loss_log(o)
        tail = rows[-max(1, len(rows) // 20):] if rows else []
        table.append({"prior": n, "steps": steps[n], "reached": rows[-1][0] if rows else 0,
                      "s_per_step_calibrated": round(rate[n], 5),
                      "s_per_step_run": round(seconds_per_step(rows), 5) if len(rows) >= 8 else None,
                      "wall_s": runs[n]["wall_s"], "rc": runs[n]["rc"], "done": o.is_file(),
                      "final_loss": round(sum(r[1] for r in tail) / len(tail), 5) if tail else None})
    print(f"{'prior':28s} {'steps':>7s} {'reached':>7s} {'s/step cal':>10s} {'s/step run':>10s} "
          f"{'wall s':>7s} {'loss(last 5%)':>13s} done")
    for r in table:
        print(f"{r['prior']:28s} {r['steps']:7d} {r['reached']:7d} {r['s_per_step_calibrated']:10.4f} "
              f"{r['s_per_step_run'] or float('nan'):10.4f} {r['wall_s']:7.1f} {r['final_loss'] or float('nan'):13.5f} "
              f"{r['done']}")
    device = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    (out / "train_budget.json").write_text(json.dumps(
        {"config": a.config, "budget_s": a.budget_s, "concurrent": len(jobs), "device": device,
         "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "total_wall_s": round(time.monotonic() - start, 1), "runs": table, "train_sections": used},
        indent=2))


if __name__ == "__main__":
    main()
