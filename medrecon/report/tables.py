"""Study tables: per method, mean ± std over subjects of every metric, and paired differences to a baseline.

A clinical study needs to know whether a method is *better*, not only its mean: for each metric the
subject-wise differences to the baseline method get a paired t-test and a Wilcoxon signed-rank test
(the latter only from 6 pairs on, below which it cannot reach p < 0.05).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

# Cost columns are summarised but not tested pairwise: a p-value on runtime says nothing about quality.
COST_METRICS = ("runtime_s", "peak_rss_mb", "cuda_max_allocated_mb", "nfe")


def load_metrics(paths: list[str | Path]) -> pd.DataFrame:
    """One row per (subject, method) from the evaluate step's JSON files; scalar numbers only."""
    rows = []
    for p in paths:
        with open(p) as f:
            rec = json.load(f)
        row: dict[str, Any] = {"subject": rec["subject"], "method": rec["method"]}
        for key, val in rec.get("metrics", {}).items():
            if isinstance(val, int | float) and not isinstance(val, bool):
                row[key] = float(val)
        rows.append(row)
    if not rows:
        raise ValueError("no metrics files given")
    return pd.DataFrame(rows)


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
    """Write ``summary.csv``, ``summary.md`` and (with a baseline present) ``paired.csv``/``paired.md``."""
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
    return written
