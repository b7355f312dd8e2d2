"""Speed of the MRI operators per slice: torch SENSE batched vs single-slice vs SigPy's Sense, and the NUFFT.

SENSE rows, for 256^2 and 320^2 images with 8 coils (``--coils`` adds more), 4x Cartesian undersampling:
one forward + adjoint pair per slice, timed three ways on the same ``SLICES`` slices -- one batched call,
one call per slice, and SigPy's ``Sense`` linop slice by slice (NumPy FFT, one thread) -- plus the batched
``normal`` (A^H A, what CG data consistency calls). The paths alternate within each repeat so that
background load hits all alike; medians of ``repeats`` after one warm-up each (FFT plans, caches), and
ratios are against SigPy in the same run. Per-slice calls do not keep their k-space (the batched call must
return all of it), so they are the harder baseline. Run ``python benchmarks/bench_mri.py`` to print a
table and write ``benchmarks/out/bench_mri.json``; ``benchmarks/operators.py`` includes these rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from operators import _paired  # benchmarks/operators.py, beside this script: the one timing helper

from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Nufft2D, Sense2D
from medrecon.physics.mri_sampling import (
    cartesian_mask_1d,
    default_spokes,
    density_compensation,
    radial_trajectory,
)

SIZES, COILS, SLICES = (256, 320), (8,), 8


def sense_rows(n: int, coils: int, repeats: int) -> list[dict]:
    """Per-slice forward + adjoint: batched, single-slice, SigPy (and batched normal), one paired run."""
    g = torch.Generator().manual_seed(0)
    op = Sense2D(birdcage_coils(coils, (n, n)), cartesian_mask_1d((n, n), 4.0, 24, seed=0))
    x = torch.complex(torch.randn(SLICES, n, n, generator=g), torch.randn(SLICES, n, n, generator=g))
    ref, xn = op.sigpy_linop(), x.numpy()
    with torch.no_grad():
        t = _paired({
            "batched": lambda: op.adjoint(op.forward(x)),
            "single": lambda: [op.adjoint(op.forward(s)) for s in x],
            "sigpy": lambda: [ref.H(ref(s)) for s in xn],
            "normal": lambda: op.normal(x),
        }, repeats)
    per = {k: v / SLICES for k, v in t.items()}
    case = f"{n}x{n}, {coils} coils"
    desc = {"batched": f"one call on {SLICES} slices", "single": "one call per slice",
            "sigpy": "sigpy.mri.linop.Sense per slice", "normal": f"normal() on {SLICES} slices"}
    rows = []
    for key, label in (("batched", "torch batched"), ("single", "torch single"), ("sigpy", "SigPy"),
                       ("normal", "torch batched A^H A")):
        ratio = per[key] / per["sigpy"]
        rows.append({"name": f"sense2d {case} {label}", "median_s": per[key], "per_slice_ms": per[key] * 1e3,
                     "ratio_vs_sigpy": ratio,
                     "notes": f"{per[key] * 1e3:.2f} ms/slice fwd+adj, {desc[key]}; {ratio:.2f}x SigPy"})
    return rows


def nufft_row(repeats: int) -> dict:
    n = 256
    coord = radial_trajectory((n, n), default_spokes((n, n), 4.0))
    op = Nufft2D(birdcage_coils(8, (n, n)), coord, density_compensation(coord, (n, n), "ramp"))
    x = torch.randn(n, n, dtype=torch.complex64)
    t = _paired({"nufft": lambda: op.adjoint(op.forward(x))}, repeats)["nufft"]
    return {"name": "nufft2d radial fwd+adj, 1 slice", "median_s": t,
            "notes": f"8 coils {n}x{n}, {coord.shape[0]} golden-angle rays x {coord.shape[1]} samples, "
                     "sigpy NUFFT (CPU)"}


def mri_rows(repeats: int = 7, sizes: tuple[int, ...] = SIZES, coils: tuple[int, ...] = COILS,
             nufft: bool = True) -> list[dict]:
    """Benchmark rows {name, median_s (per slice for SENSE), notes, ...}."""
    rows = [r for n in sizes for c in coils for r in sense_rows(n, c, repeats)]
    return [*rows, nufft_row(repeats)] if nufft else rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--coils", type=int, nargs="+", default=list(COILS))
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "bench_mri.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = mri_rows(args.repeats, tuple(args.sizes), tuple(args.coils))
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['median_s'] * 1e3:9.2f} ms  {r['notes']}")
    meta = {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "slices": SLICES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
