"""Slab-by-slab vs whole-volume reconstruction: how far apart, and is there a seam at the slab boundaries?

What it measures
    For each method, on one measurement (default: the demo's CT subject), three reconstructions through
    :func:`medrecon.reconstruct.reconstruct`: the whole volume (seed s), the whole volume with another seed
    (s + 1), and slab by slab (``--size``, ``--halo``, seed s). It reports
    * ``slab-whole``: RMS difference (HU) between the slab-wise and the whole-volume result;
    * ``seed-seed``: RMS difference between the two whole-volume seeds: the sampler's own spread, the scale
      against which ``slab-whole`` is judged for stochastic methods (0 for deterministic ones);
    * ``seam``: mean |x[z+1] - x[z]| across the slab boundaries divided by the same over all other adjacent slice
      pairs, for the slab-wise result (1 = boundaries look like any other slice pair; a seam shows as > 1),
      and the same ratio for the whole-volume result at the same z (the anatomy's own contribution);
    * PSNR (dB, window [-1000, 1000] HU) of each against the reference volume.

Run: ``python benchmarks/slab_blend.py`` (after the demo has run, so ``results/demo/ct01`` exists) ->
table on stdout, ``benchmarks/out/slab_blend.json``. ``--methods fbp tv dds`` to choose.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _config(method: str, seed: int, size: int, halo: int, params: dict) -> dict:
    from medrecon.config import validate

    return validate({"reconstruct": {"seed": seed, "slab": {"size": size, "halo": halo},
                                     "params": {method: params}}}, "benchmarks/slab_blend.py")


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    a, b = np.clip(x, -1000, 1000), np.clip(ref, -1000, 1000)
    return float(10 * np.log10(2000.0**2 / np.mean((a - b) ** 2)))


def _seam(x: np.ndarray, boundaries: list[int]) -> float:
    jumps = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2))       # jumps[z] = |x[z+1] - x[z]|
    at = [b - 1 for b in boundaries]
    rest = [z for z in range(len(jumps)) if z not in at]
    return float(np.mean(jumps[at]) / np.mean(jumps[rest]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from medrecon.measurement import Measurement
    from medrecon.recon.slabs import plan_slabs
    from medrecon.reconstruct import reconstruct
    from medrecon.volume import Volume

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measurement", type=Path, default=REPO / "results/demo/ct01/measurement.zarr")
    p.add_argument("--methods", nargs="+", default=["fbp", "tv", "dds", "diffusionblend"])
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--halo", type=int, default=2)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "slab_blend.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import yaml

    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["reconstruct"]
    meas = Measurement.open(a.measurement)
    ref = Volume.open(meas.meta["reference_volume"]).read()
    plan = plan_slabs(meas.image_shape[0], a.size, a.halo, True)
    bounds = [s.start for s in plan[1:]]
    work = HERE / "out" / "slab_blend_work"
    rows = []
    for method in a.methods:
        params = demo["params"].get(method, {})
        prior = demo["priors"]["CT"].get(method)
        vols, secs = {}, {}
        for tag, seed, size in (("whole", a.seed, 0), ("whole2", a.seed + 1, 0), ("slab", a.seed, a.size)):
            t0 = time.perf_counter()
            out = work / f"{method}_{tag}.zarr"
            vols[tag] = reconstruct(a.measurement, out, method, _config(method, seed, size, a.halo, params),
                                    prior).read()
            secs[tag] = time.perf_counter() - t0
        rms = lambda u, v: float(np.sqrt(np.mean((u - v) ** 2)))  # noqa: E731
        rows.append({"method": method, "slab_vs_whole_rms_hu": rms(vols["slab"], vols["whole"]),
                     "seed_vs_seed_rms_hu": rms(vols["whole2"], vols["whole"]),
                     "seam_ratio_slab": _seam(vols["slab"], bounds), "seam_ratio_whole": _seam(vols["whole"], bounds),
                     "psnr_whole": _psnr(vols["whole"], ref), "psnr_slab": _psnr(vols["slab"], ref),
                     "seconds": secs})
        print(f"{method}: done", flush=True)
    head = f"{'method':16s} {'slab-whole':>10s} {'seed-seed':>10s} {'seam slab':>10s} {'seam whole':>10s} " \
           f"{'PSNR whole':>10s} {'PSNR slab':>10s}"
    print(f"\n{meas.image_shape[0]} slices, slabs of {a.size} with halo {a.halo} (boundaries at z = {bounds})")
    print(head)
    for r in rows:
        print(f"{r['method']:16s} {r['slab_vs_whole_rms_hu']:10.2f} {r['seed_vs_seed_rms_hu']:10.2f} "
              f"{r['seam_ratio_slab']:10.3f} {r['seam_ratio_whole']:10.3f} {r['psnr_whole']:10.2f} "
              f"{r['psnr_slab']:10.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"measurement": str(a.measurement), "size": a.size, "halo": a.halo,
                                 "boundaries": bounds, "rows": rows}, indent=1))
    print(f"JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
