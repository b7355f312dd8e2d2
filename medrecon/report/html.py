"""One self-contained HTML file per study: tables, figures (embedded as data URIs), config, provenance.

Self-contained means the file can be mailed or archived alone: images are base64-embedded and there is no
external CSS or script. Everything shown is read from the files the workflow produced.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medrecon.provenance import package_versions

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2.2rem;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:right}th{background:#f1f1f1}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.4rem 0}pre{background:#f7f7f7;padding:.8rem;overflow:auto;
font-size:.78rem}.wide{overflow-x:auto}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
.note{color:#555;font-size:.9rem}
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    return df.to_html(index=False, border=0, na_rep="–", float_format=lambda v: float_format.format(v))


def _summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """mean ± std strings, one column per metric."""
    out = pd.DataFrame({"method": summary["method"], "n": summary["n"]})
    for col in summary.columns:
        if col.endswith("_mean"):
            m = col[:-5]
            out[m] = [("–" if pd.isna(a) else (f"{a:.4g}" if pd.isna(s) else f"{a:.4g} ± {s:.2g}"))
                      for a, s in zip(summary[col], summary[f"{m}_std"], strict=True)]
    return out


def _paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """One row per method, one column per metric: ``mean difference (p)`` (t-test p where computable)."""
    cells = {}
    for _, r in paired.iterrows():
        p = r["t_p"] if not pd.isna(r["t_p"]) else None
        cells.setdefault(r["method"], {})[r["metric"]] = (
            f"{r['mean_diff']:+.4g}" + ("" if p is None else f" (p={p:.2g})"))
    out = pd.DataFrame.from_dict(cells, orient="index")
    out.insert(0, "vs", paired.groupby("method", sort=False)["baseline"].first().reindex(out.index))
    return out.reset_index(names="method")


def build_report(out: str | Path, *, study: str, config: dict[str, Any],
                 sections: list[tuple[str, Path, Path | None]], figures: list[tuple[Path, str]],
                 inputs: list[dict[str, Any]]) -> Path:
    """Write the report.

    ``sections`` are (title, summary_csv, paired_csv or None), e.g. one per modality; ``figures`` are
    (png, caption); ``inputs`` describe each subject's source and provenance.
    """
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>medrecon — {html.escape(study)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>medrecon study report: {html.escape(study)}</h1>",
             f"<p class=note>Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} from the "
             "workflow's own outputs. Metrics are computed in the configured intensity window (CT: HU window mapped "
             "to [0, 1]; MR: robust percentile range), inside the body mask when configured. runtime_s and "
             "peak_rss_mb are the reconstruct job's own; data_residual is ||Ax − y|| / ||y||.</p>"]
    for title, summary_csv, paired_csv in sections:
        parts += [f"<h2>{html.escape(title)}: results per method (mean ± std over subjects)</h2>",
                  "<div class=wide>" + _table(_summary_display(pd.read_csv(summary_csv))) + "</div>"]
        if paired_csv is not None and Path(paired_csv).exists():
            paired = pd.read_csv(paired_csv)
            if not paired.empty:
                parts += [f"<h3>{html.escape(title)}: paired differences against the baseline</h3>",
                          "<p class=note>Mean of subject-wise differences (method − baseline), with the paired "
                          "t-test p-value where there are enough subjects; Wilcoxon signed-rank p-values (from 6 "
                          "subjects on) are in the paired.csv table.</p>",
                          "<div class=wide>" + _table(_paired_display(paired)) + "</div>"]
    parts.append("<h2>Figures</h2>")
    parts += [_img(Path(p), cap) for p, cap in figures]
    parts += ["<h2>Inputs and provenance</h2>", "<pre>" + html.escape(json.dumps(inputs, indent=2, default=str))
              + "</pre>", "<h2>Configuration</h2>",
              "<pre>" + html.escape(yaml.safe_dump(config, sort_keys=False)) + "</pre>",
              "<h2>Software</h2>", "<pre>" + html.escape(json.dumps(package_versions(), indent=2)) + "</pre>",
              "</body></html>"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(out)
    return out
