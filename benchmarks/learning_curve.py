"""Learning curves: reconstruction quality on held-out phantoms versus the priors' training budget.

What it measures
    The same held-out-phantom benchmark as :mod:`quality` (same volumes, measurements, sampler settings and
    one-thread subprocesses), run once per training budget (``--budgets``, optimizer steps per network, batch 8).
    Each budget trains its own priors (cached in the shared ``--workdir``, keyed by the budget) and reconstructs
    every held-out volume with every method given after ``--``. Classical rows (TV, L1-wavelet) do not depend
    on the budget and are the reference each diffusion row is compared with, in the same run: the table gives
    the coronal and sagittal PSNR of every row at every budget and its margin over the reference
    (``--reference``), which is the question "how much training buys a win over TV" asks. The training time of
    each prior (wall seconds, read from its loss log) shows what the budget cost on this machine.

Run: ``python benchmarks/learning_curve.py --budgets 300 3000 -- --views 8 20 --mr-accel 4 8 --methods tv pnp_admm
--mr-methods l1_wavelet pnp_admm --params '{"pnp_admm": {"ztv": true, "ztv_lambda": 3e-4}}'``
-> prints the table, writes ``benchmarks/out/learning_curve.json`` (and ``learning_curve_n<budget>.json``, the
:mod:`quality` result of each budget). Re-runs reuse every cached prior and reconstruction.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality  # noqa: E402  (the benchmark this one repeats per budget)

REFERENCES = {"CT": "tv", "MR": "l1_wavelet"}


def training_seconds(prior_path: str | list[str]) -> float | None:
    """Wall seconds a prior took to train, from the last row of its loss log (cached priors included)."""
    total = 0.0
    for p in [prior_path] if isinstance(prior_path, str) else prior_path:
        log = Path(f"{p}.loss.csv")
        if not log.exists():
            return None
        rows = list(csv.reader(log.read_text().splitlines()))
        total += float(rows[-1][-1])
    return total


def collate(results: dict[int, dict[str, Any]], references: dict[str, str]) -> dict[str, Any]:
    """{setting: {row: {budget: {cor, sag, scr, margin_cor, margin_sag}}}} from quality.py results per budget."""
    curves: dict[str, Any] = {}
    for budget, res in sorted(results.items()):
        for setting, rows in res["summary"].items():
            ref = rows.get(references["CT" if setting.startswith("CT") else "MR"], {})
            for row, vals in rows.items():
                if "error" in vals:
                    cell: dict[str, Any] = {"error": vals["error"]}
                else:
                    cell = {"axial": vals.get("psnr_axial"), "coronal": vals.get("psnr_coronal"),
                            "sagittal": vals.get("psnr_sagittal"), "scr": vals.get("slice_consistency_ratio")}
                    for plane in ("coronal", "sagittal"):
                        if ref.get(f"psnr_{plane}") is not None and cell[plane] is not None:
                            cell[f"margin_{plane}"] = cell[plane] - ref[f"psnr_{plane}"]
                curves.setdefault(setting, {}).setdefault(row, {})[budget] = cell
    return curves


def table(curves: dict[str, Any], budgets: list[int], train_s: dict[int, dict[str, float | None]]) -> str:
    """One block per setting: rows x budgets, cells 'cor / sag (margin cor / sag)'."""
    lines = []
    width = max([len(r) for rows in curves.values() for r in rows] + [8]) + 1
    for setting, rows in curves.items():
        lines += ["", f"== {setting}: PSNR coronal / sagittal (dB), in brackets the margin over the reference",
                  f"{'method':<{width}}" + "".join(f"{f'{b} steps':>32}" for b in budgets)]
        for row, per_budget in rows.items():
            cells = []
            for b in budgets:
                c = per_budget.get(b)
                if c is None:
                    cells.append("-")
                elif "error" in c:
                    cells.append(f"failed ({c['error']})")
                elif "margin_coronal" in c:
                    cells.append(f"{c['coronal']:.2f} / {c['sagittal']:.2f} "
                                 f"({c['margin_coronal']:+.2f} / {c['margin_sagittal']:+.2f})")
                else:
                    cells.append(f"{c['coronal']:.2f} / {c['sagittal']:.2f}")
            lines.append(f"{row:<{width}}" + "".join(f"{c:>32}" for c in cells))
    lines += ["", "training wall seconds per prior: " + "; ".join(
        f"{b} steps: " + ", ".join(f"{n} {s:.0f}" if s is not None else f"{n} ?" for n, s in sorted(t.items()))
        for b, t in sorted(train_s.items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=int, nargs="+", default=[300, 1000, 3000],
                   help="optimizer steps per network, one quality.py run each")
    p.add_argument("--reference", nargs="*", default=[f"{k}={v}" for k, v in REFERENCES.items()],
                   help="the classical row each setting is compared with, e.g. CT=tv MR=l1_wavelet")
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "quality_work")
    p.add_argument("--out", type=Path, default=HERE / "out" / "learning_curve.json")
    args = p.parse_args(own)
    if any(b < 1 for b in args.budgets):
        p.error("--budgets must be >= 1")
    if any(flag in rest for flag in ("--budget-steps", "--out", "--workdir")):
        p.error("--budget-steps, --out and --workdir are this script's (--budgets, --out, --workdir)")
    try:
        references = {**REFERENCES, **dict(r.split("=", 1) for r in args.reference)}
    except ValueError:
        p.error("--reference takes MODALITY=row pairs, e.g. CT=tv MR=l1_wavelet")
    results: dict[int, dict[str, Any]] = {}
    train_s: dict[int, dict[str, float | None]] = {}
    for budget in args.budgets:
        out = args.out.with_name(f"{args.out.stem}_n{budget}.json")
        quality.main([*rest, "--budget-steps", str(budget), "--workdir", str(args.workdir), "--out", str(out)])
        results[budget] = json.loads(out.read_text())
        train_s[budget] = {name: training_seconds(info["path"])
                           for name, info in results[budget]["training"]["priors"].items()}
    curves = collate(results, references)
    print(table(curves, args.budgets, train_s))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budgets": args.budgets, "references": references, "quality_args": rest,
                                    "training_seconds": train_s, "curves": curves}, indent=1))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
