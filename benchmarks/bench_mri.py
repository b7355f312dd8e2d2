"""Speed of the MRI operators: torch SENSE (per slice and batched) against SigPy's Sense, and the NUFFT.

Each row is one forward + adjoint pair (8 coils, 256x256 unless stated), median of ``repeats`` runs after
one warm-up (numba compilation and FFT plans are excluded). Run ``python benchmarks/bench_mri.py`` to print
a table and write ``benchmarks/out/bench_mri.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Nufft2D, Sense2D
from medrecon.physics.mri_sampling import (
    cartesian_mask_1d,
    default_spokes,
    density_compensation,
    radial_trajectory,
)

N, COILS, SLICES = 256, 8, 16


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: numba compilation, FFT plans, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mri_rows(repeats: int = 5) -> list[dict]:
    """Benchmark rows {name, median_s, notes}."""
    g = torch.Generator().manual_seed(0)
    maps = birdcage_coils(COILS, (N, N))
    mask = cartesian_mask_1d((N, N), 4.0, 24, seed=0)
    op = Sense2D(maps, mask)
    x1 = torch.complex(torch.randn(N, N, generator=g), torch.randn(N, N, generator=g))
    xb = torch.complex(torch.randn(SLICES, N, N, generator=g), torch.randn(SLICES, N, N, generator=g))
    threads = torch.get_num_threads()

    rows = []
    t_torch = _median_s(lambda: op.adjoint(op.forward(x1)), repeats)
    rows.append({"name": "sense2d torch fwd+adj, 1 slice", "median_s": t_torch,
                 "notes": f"{COILS} coils {N}x{N}, R=4, torch threads={threads}"})
    t_batch = _median_s(lambda: op.adjoint(op.forward(xb)), repeats)
    rows.append({"name": f"sense2d torch fwd+adj, {SLICES}-slice batch", "median_s": t_batch,
                 "notes": f"{t_batch / SLICES * 1e3:.2f} ms per slice"})
    ref = op.sigpy_linop()
    xn = x1.numpy()
    t_sp = _median_s(lambda: ref.H(ref(xn)), repeats)
    rows.append({"name": "sense2d sigpy Sense fwd+adj, 1 slice", "median_s": t_sp,
                 "notes": f"sigpy/torch per slice = {t_sp / t_torch:.2f}x; "
                          f"sigpy/torch-batched per slice = {t_sp / (t_batch / SLICES):.2f}x"})

    coord = radial_trajectory((N, N), default_spokes((N, N), 4.0))
    nop = Nufft2D(maps, coord, density_compensation(coord, (N, N), "ramp"))
    t_nufft = _median_s(lambda: nop.adjoint(nop.forward(x1)), repeats)
    rows.append({"name": "nufft2d radial fwd+adj, 1 slice", "median_s": t_nufft,
                 "notes": f"{coord.shape[0]} golden-angle rays x {coord.shape[1]} samples, "
                          "sigpy NUFFT (CPU)"})
    return rows


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    result = mri_rows()
    width = max(len(r["name"]) for r in result)
    for r in result:
        print(f"{r['name']:<{width}}  {r['median_s'] * 1e3:9.2f} ms  {r['notes']}")
    meta = {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads()}
    (out / "bench_mri.json").write_text(json.dumps({"meta": meta, "rows": result}, indent=2))
    print(f"wrote {out / 'bench_mri.json'}")
