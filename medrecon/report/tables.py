"""Study tables: per method, mean ± std over subjects of every metric, and paired differences to a baseline.

A clinical study needs to know whether a method is *better*, not only its mean: for each metric the
subject-wise differences to the baseline method get a paired t-test and a Wilcoxon signed-rank test
(the latter only from 6 pairs on, below which it cannot reach p < 0.05).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

# Cost columns are summarised but not tested pairwise: a p-value on runtime says nothing about quality.
COST_METRICS = ("runtime_s", "peak_rss_mb", "cuda_max_allocated_mb", "nfe", "iterations", "samples")


@dataclass(frozen=True)
class Column:
    """A metric as the report shows it: header (``group`` over ``name``), unit, meaning, decimals."""

    key: str
    group: str
    name: str
    unit: str
    meaning: str
    main: bool = False        # in the report's first table (the decisive columns); else behind "all metrics"
    decimals: int | None = None   # fixed decimals; None: three significant digits

    @property
    def header(self) -> str:
        return " ".join(p for p in (self.group, self.name) if p) + (f" ({self.unit})" if self.unit else "")


_W = "in the unit window (CT: the HU window, MR: the percentile range, mapped to [0, 1])"
# Report order: the decisive columns first (image quality per plane, slice consistency, cost), then the rest.
COLUMNS: tuple[Column, ...] = (
    Column("psnr_axial", "PSNR", "axial", "dB", "mean over axial slices of the 2D PSNR " + _W + "; higher is better",
           True, 2),
    Column("psnr_coronal", "PSNR", "coronal", "dB", "the same over coronal slices", True, 2),
    Column("psnr_sagittal", "PSNR", "sagittal", "dB", "the same over sagittal slices", True, 2),
    Column("ssim_axial", "SSIM", "axial", "", "mean over axial slices of the 2D SSIM (0..1, higher is better)",
           True, 3),
    Column("ssim_coronal", "SSIM", "coronal", "", "the same over coronal slices", True, 3),
    Column("ssim_sagittal", "SSIM", "sagittal", "", "the same over sagittal slices", True, 3),
    Column("slice_consistency_ratio", "", "Slice jumps", "× ref",
           "mean |e[z+1] - e[z]| of the error e over adjacent axial slices, divided by the same of the reference: "
           "slice-to-slice jumps the reconstruction adds, relative to the anatomy's own (lower is better)", True),
    Column("runtime_s", "", "Time", "s", "wall-clock time of the reconstruct job's solver", True),
    Column("nfe", "", "NFE", "", "number of function evaluations of the learned prior network (methods with a "
           "prior only; — for classical methods)", True, 0),
    Column("iterations", "", "Iterations", "", "solver iterations of an iterative classical method", False, 0),
    Column("samples", "", "Samples", "", "posterior samples averaged into the output (1: a single sample or a point "
           "estimate)", False, 0),
    Column("data_residual", "", "Data residual", "", "||A x - y|| / ||y||: relative misfit of the measured data",
           False),
    Column("psnr", "", "PSNR 3D", "dB", "PSNR of the whole volume " + _W, False, 2),
    Column("ssim", "", "SSIM 3D", "", "3D SSIM (Gaussian window, sigma 1.5)", False, 3),
    Column("nrmse", "", "NRMSE", "", "||x - ref|| / ||ref||", False),
    Column("mae", "", "MAE", "", "mean |x - ref| " + _W, False),
    Column("slice_consistency", "", "Slice jumps, absolute", "", "mean |e[z+1] - e[z]| " + _W, False),
    Column("peak_rss_mb", "", "Peak memory", "MB", "peak resident memory (RSS) of the reconstruct job", False),
    Column("cuda_max_allocated_mb", "", "GPU memory", "MB", "largest CUDA allocation of the reconstruct job", False),
    Column("cov1", "", "Coverage 1σ", "", "fraction of voxels with |mean - ref| <= 1 posterior std", False, 3),
    Column("cov1_expected", "", "Coverage 1σ expected", "", "what a calibrated posterior gives with this many "
           "samples", False, 3),
    Column("cov2", "", "Coverage 2σ", "", "fraction of voxels with |mean - ref| <= 2 posterior std", False, 3),
    Column("cov2_expected", "", "Coverage 2σ expected", "", "the same for 2 std", False, 3),
)
COLUMN_BY_KEY = {c.key: c for c in COLUMNS}


def column(key: str) -> Column:
    """The :class:`Column` of a metric key (an unknown key is shown under its raw name, in the details)."""
    return COLUMN_BY_KEY.get(key) or Column(key, "", key, "", "")


def ordered_columns(keys: list[str]) -> list[Column]:
    """The columns of ``keys`` in report order (known metrics first, in :data:`COLUMNS` order)."""
    known = [c for c in COLUMNS if c.key in keys]
    return known + [column(k) for k in keys if k not in COLUMN_BY_KEY]


def columns_markdown() -> str:
    """What each column of the CSV tables means, with its unit (written beside the tables)."""
    lines = ["# Columns of the study tables", "",
             "`summary.csv` has `<key>_mean` and `<key>_std` (over subjects, ddof = 1) per metric key; "
             "`metrics_long.csv` one row per subject and method; `paired.csv` the subject-wise differences "
             "(method - baseline) with paired t-test and Wilcoxon p-values. A missing value means the metric "
             "does not apply (e.g. NFE of a method without a network).", "",
             "| key | shown as | unit | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{c.key}` | {c.header} | {c.unit or '-'} | {c.meaning} |" for c in COLUMNS]
    return "\n".join(lines) + "\n"


def load_metrics(paths: list[str | Path]) -> pd.DataFrame:
    """One row per (subject, method) from the evaluate step's JSON files; scalar numbers only."""
    rows = []
    for p in paths:
        with open(p) as f:
            rec = json.load(f)
        row: dict[str, Any] = {"subject": rec["subject"], "method": rec["method"]}
        for key, val in _legacy_costs(rec).items():
            if isinstance(val, int | float) and not isinstance(val, bool):
                row[key] = float(val)
        rows.append(row)
    if not rows:
        raise ValueError("no metrics files given")
    return pd.DataFrame(rows)


def _legacy_costs(rec: dict[str, Any]) -> dict[str, Any]:
    """The metrics of an evaluate JSON; one written before evaluate told network evaluations from solver
    iterations (no ``prior`` key) gets NFE and iterations re-read from its reconstruction's record."""
    out = dict(rec.get("metrics", {}))
    if "prior" in rec or not rec.get("recon") or not Path(rec["recon"]).exists():
        return out
    from medrecon.evaluate import cost_metrics
    from medrecon.volume import Volume

    costs = cost_metrics(Volume.open(rec["recon"]).meta)
    out.pop("nfe", None)
    out.update({k: costs[k] for k in ("nfe", "iterations") if k in costs})
    return out


def metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("subject", "method")]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over subjects per method (std with ddof=1; NaN for a single subject)."""
    cols = metric_columns(df)
    g = df.groupby("method", sort=False)[cols]
    mean, std, n = g.mean(), g.std(ddof=1), g.size()
    out = pd.DataFrame(index=mean.index)
    out["n"] = n
    for c in cols:
        out[f"{c}_mean"] = mean[c]
        out[f"{c}_std"] = std[c]
    return out.reset_index()


def paired(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per method ≠ baseline and metric: mean paired difference, its std, t-test and Wilcoxon p-values."""
    cols = [c for c in metric_columns(df) if c not in COST_METRICS and not c.endswith("_expected")]
    base = df[df.method == baseline].set_index("subject")
    rows = []
    for method in df.method.unique():
        if method == baseline:
            continue
        cur = df[df.method == method].set_index("subject")
        common = cur.index.intersection(base.index)
        for c in cols:
            d = (cur.loc[common, c] - base.loc[common, c]).dropna().to_numpy()
            row = {"method": method, "baseline": baseline, "metric": c, "n": len(d),
                   "mean_diff": float(d.mean()) if len(d) else math.nan,
                   "std_diff": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                   "t_p": math.nan, "wilcoxon_p": math.nan}
            if len(d) > 1 and np.ptp(d) > 0:
                row["t_p"] = float(stats.ttest_rel(cur.loc[common, c], base.loc[common, c],
                                                   nan_policy="omit").pvalue)
            if len(d) >= 6 and np.any(d != 0):
                row["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_summary(summ: pd.DataFrame, metrics: list[str] | None = None) -> str:
    """A Markdown table: one row per method, one ``mean ± std`` column per metric."""
    metrics = metrics or [c[:-5] for c in summ.columns if c.endswith("_mean")]
    head = "| method | n | " + " | ".join(metrics) + " |"
    sep = "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"
    lines = [head, sep]
    for _, r in summ.iterrows():
        cells = [_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics]
        lines.append(f"| {r['method']} | {int(r['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_paired(p: pd.DataFrame) -> str:
    if p.empty:
        return ""
    lines = ["| method | vs | metric | n | mean diff | t-test p | Wilcoxon p |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for _, r in p.iterrows():
        fp = [("–" if math.isnan(v) else f"{v:.3g}") for v in (r.t_p, r.wilcoxon_p)]
        lines.append(f"| {r.method} | {r.baseline} | {r.metric} | {r.n} | {r.mean_diff:+.4g} | {fp[0]} | {fp[1]} |")
    return "\n".join(lines) + "\n"


def write_study_tables(metric_files: list[str | Path], out_dir: str | Path, baseline: str | None) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md``, (with a baseline present) ``paired.csv``/``paired.md``, and
    ``columns.md`` (what each raw column key means, with its unit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_metrics(metric_files)
    df.to_csv(out / "metrics_long.csv", index=False)
    summ = summary(df)
    summ.to_csv(out / "summary.csv", index=False)
    text = markdown_summary(summ)
    written = {"long": out / "metrics_long.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md"}
    pr = paired(df, baseline) if baseline and baseline in set(df.method) else pd.DataFrame()
    if not pr.empty:
        pr.to_csv(out / "paired.csv", index=False)
        (out / "paired.md").write_text(markdown_paired(pr))
        written.update(paired_csv=out / "paired.csv", paired_md=out / "paired.md")
        text += "\n" + markdown_paired(pr)
    (out / "summary.md").write_text(text)
    (out / "columns.md").write_text(columns_markdown())
    written["columns_md"] = out / "columns.md"
    return written
