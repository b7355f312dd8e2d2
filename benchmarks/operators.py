"""Speed of the forward operators: CT sparse-matrix path vs ASTRA's per-slice loop, MRI rows, GPU paths.

CT rows: one forward + adjoint pair on a ``--slices x --size x --size`` volume (default 64 x 256 x 256) at
``--views`` views (default 60), CPU, ``--threads`` torch threads (default 2; the ASTRA loop gets the same
number of worker threads). Median of ``--repeats`` runs after a warm-up; the two paths alternate within
each repeat so that background load hits both alike. Also: the cached matrix's memory and build time.
MRI rows come from ``benchmarks/bench_mri.py`` (``mri_rows``) when that module exists: SENSE forward +
adjoint per slice, batched vs single-slice vs SigPy at 256^2 and 320^2 with 8 coils, paired, with ratios vs
SigPy from the same run (``--mri-only`` skips the CT rows). ``--gpu`` adds the
CUDA paths (ASTRA parallel3d / 2D fan / cone beam 256^3, and the CSR on the GPU). ``--sweep-slab`` times
the sparse products for several slab sizes (how ``_FP_SLAB`` / ``_BP_SLAB`` in ``medrecon.physics.ct``
were chosen).

Run: ``python benchmarks/operators.py`` -> prints a table, writes ``benchmarks/out/operators.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medrecon.physics import ct
from medrecon.physics import ct_geometry as ctg

HERE = Path(__file__).resolve().parent


def _median(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paired(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, alternating them within each repeat (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ct_cpu_rows(beam: str, slices: int, size: int, views: int, threads: int, repeats: int) -> list[dict]:
    arc = 360.0 if beam == "fan" else 180.0
    geom = ctg.CTGeometry.create(beam, (size, size), (1.0, 1.0), ctg.sparse_view_angles(views, arc))
    ct.clear_matrix_cache()
    t0 = time.perf_counter()
    sm = ct.system_matrix(geom)
    build = time.perf_counter() - t0
    op_m = ct.ct_operator(geom, backend="matrix")
    op_a = ct.ct_operator(geom, backend="astra", threads=threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(slices, size, size, generator=gen)
    y = op_m(x)
    err = float((op_a(x) - y).norm() / y.norm())
    t = _paired(
        {
            "matrix": lambda: op_m.adjoint(op_m(x)),
            "astra": lambda: op_a.adjoint(op_a(x)),
            "matrix_fp": lambda: op_m(x),
            "matrix_bp": lambda: op_m.adjoint(y),
            "astra_fp": lambda: op_a(x),
            "astra_bp": lambda: op_a.adjoint(y),
        },
        repeats,
    )
    shape = f"{slices}x{size}x{size}, {views} views, {geom.detector_count} bins"
    ratio = t["astra"] / t["matrix"]
    return [
        {
            "name": f"ct-{beam} matrix build",
            "median_s": build,
            "notes": f"{geom.kernel}; nnz {sm.nnz:,}; {sm.nbytes / 1e6:.0f} MB (A + A^T, est. "
            f"{ct.estimate_matrix_mb(geom):.0f} MB); once per geometry, then cached",
        },
        {
            "name": f"ct-{beam} FP+BP sparse matrix",
            "median_s": t["matrix"],
            "notes": f"{shape}; FP {t['matrix_fp']:.3f} s, BP {t['matrix_bp']:.3f} s",
        },
        {
            "name": f"ct-{beam} FP+BP ASTRA slice loop",
            "median_s": t["astra"],
            "notes": f"{shape}; FP {t['astra_fp']:.3f} s, BP {t['astra_bp']:.3f} s; {threads} workers; "
            f"rel. diff to matrix {err:.1e}",
        },
        {
            "name": f"ct-{beam} speed-up matrix vs loop",
            "median_s": None,
            "ratio": ratio,
            "notes": f"{ratio:.1f}x (goal >= 8x)",
        },
    ]


def slab_sweep(slices: int, size: int, views: int, repeats: int) -> list[dict]:
    geom = ctg.CTGeometry.create("parallel", (size, size), (1.0, 1.0), ctg.sparse_view_angles(views))
    A, AT = ct.system_matrix(geom).on(torch.device("cpu"))
    x = torch.rand(slices, size * size)
    y = torch.rand(slices, views * geom.detector_count)
    rows = []
    for slab in (4, 8, 16, 32, 64):
        t = _paired(
            {
                "fp": lambda s=slab: ct._sparse_apply(A, x, A.shape[0], s),
                "bp": lambda s=slab: ct._sparse_apply(AT, y, AT.shape[0], s),
            },
            repeats,
        )
        rows.append(
            {
                "name": f"sparse product, slab {slab}",
                "median_s": t["fp"] + t["bp"],
                "notes": f"FP {t['fp']:.3f} s, BP {t['bp']:.3f} s",
            }
        )
    return rows


def ct_gpu_rows(repeats: int) -> list[dict]:  # pragma: no cover - GPU only
    rows = []
    dev = torch.device("cuda")
    for beam in ("parallel", "fan"):
        arc = 360.0 if beam == "fan" else 180.0
        geom = ctg.CTGeometry.create(beam, (256, 256), (1.0, 1.0), ctg.sparse_view_angles(60, arc))
        x = torch.rand(64, 256, 256, device=dev)
        for backend in ("astra", "matrix"):
            op = ct.ct_operator(geom, backend=backend)
            t = _median(lambda op=op, x=x: op.adjoint(op(x)), repeats, sync=True)
            rows.append(
                {"name": f"ct-{beam} FP+BP CUDA {backend}", "median_s": t, "notes": "64x256x256, 60 views"}
            )
    geom = ctg.CTGeometry.create("cone", (256, 256, 256), (1.0, 1.0, 1.0), ctg.sparse_view_angles(256, 360.0))
    op = ct.ConeBeamCT(geom)
    x = torch.rand(256, 256, 256, device=dev)
    t = _median(lambda: op.adjoint(op(x)), repeats, sync=True)
    rows.append(
        {
            "name": "ct-cone FP+BP CUDA",
            "median_s": t,
            "notes": f"256^3, 256 views, detector {geom.detector_rows}x{geom.detector_count}",
        }
    )
    return rows


def mri_rows(repeats: int) -> list[dict]:
    path = HERE / "bench_mri.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_mri", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.mri_rows(repeats))


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"{'benchmark':<{width}}  {'median s':>9}  notes")
    for r in rows:
        t = "" if r.get("median_s") is None else f"{r['median_s']:.4g}"
        print(f"{r['name']:<{width}}  {t:>9}  {r.get('notes', '')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "out" / "operators.json")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and ASTRA loop workers)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--gpu", action="store_true", help="also time the CUDA paths (needs a GPU)")
    p.add_argument("--sweep-slab", action="store_true", help="time the sparse products per slab size")
    p.add_argument("--no-mri", action="store_true", help="skip the MRI rows")
    p.add_argument("--mri-only", action="store_true", help="only the MRI rows (no CT)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    for beam in () if args.mri_only else ("parallel", "fan"):
        rows += ct_cpu_rows(beam, args.slices, args.size, args.views, args.threads, args.repeats)
    if args.sweep_slab:
        rows += slab_sweep(args.slices, args.size, args.views, args.repeats)
    if not args.no_mri:
        rows += mri_rows(args.repeats)
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu given but torch sees no CUDA device", file=sys.stderr)
            return 2
        rows += ct_gpu_rows(args.repeats)
    print_table(rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {
        "rows": rows,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_1min": load,
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
