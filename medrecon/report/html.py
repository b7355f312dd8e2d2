"""One self-contained HTML file per study: tables, figures (embedded as data URIs), config, provenance.

Self-contained means the file can be mailed or archived alone: images are base64-embedded and there is no
external CSS or script. Everything shown is read from the files the workflow produced.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medrecon.provenance import package_versions
from medrecon.report.tables import Column, ordered_columns

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1280px;color:#222;
padding:0 1rem}
h1{border-bottom:2px solid #444}h2{margin-top:2.2rem;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.25rem .45rem;
text-align:right;white-space:nowrap}th{background:#f1f1f1;text-align:center}td:first-child{text-align:left}
th.sub{font-weight:normal}.sd{color:#777;font-size:.78rem}.na{color:#999}
img{max-width:100%;border:1px solid #ddd;margin:.4rem 0}pre{background:#f7f7f7;padding:.8rem;overflow:auto;
font-size:.78rem}.wide{overflow-x:auto}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
.note{color:#555;font-size:.9rem}details{margin:.4rem 0 1rem}summary{cursor:pointer;color:#245}
dl.cols{font-size:.82rem;color:#444;display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem}
dl.cols dt{font-weight:600}dl.cols dd{margin:0}
"""

NA = "—"   # a metric that does not apply (e.g. NFE of a method without a network)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def fmt_value(v: float, col: Column | None = None) -> str:
    """A number with the column's decimals, or three significant digits (no exponent below 10^6)."""
    if v is None or pd.isna(v):
        return NA
    v = float(v)
    dec = col.decimals if col is not None and col.decimals is not None else _significant_decimals(v)
    return f"{v:.{dec}f}".replace("-", "−")


def _significant_decimals(v: float, digits: int = 3) -> int:
    """Decimals that show ``digits`` significant digits of ``v`` (none for |v| >= 10^(digits-1))."""
    a = abs(v)
    if a == 0 or not math.isfinite(a):
        return 0
    return max(0, digits - 1 - math.floor(math.log10(a)))


def _mean_std_cell(mean: float, std: float, col: Column) -> str:
    if mean is None or pd.isna(mean):
        return f"<td class=na>{NA}</td>"
    m = fmt_value(mean, col)
    if std is None or pd.isna(std) or (std == 0 and col.decimals == 0):
        return f"<td>{m}</td>"
    ref = col if col.decimals is not None else Column(col.key, "", "", "", "", decimals=_decimals(m))
    return f"<td>{m}<span class=sd> ± {fmt_value(std, ref)}</span></td>"


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _header(first: list[str], cols: list[Column], prefix: str = "") -> str:
    """Two header rows: a group (e.g. "PSNR (dB)") spanning its sub-columns (axial, coronal, sagittal)."""
    two = any(c.group for c in cols)
    top = [f"<th rowspan={2 if two else 1}>{html.escape(h)}</th>" for h in first]
    sub = []
    i = 0
    while i < len(cols):
        c = cols[i]
        if c.group:
            j = i
            while j < len(cols) and cols[j].group == c.group and cols[j].unit == c.unit:
                j += 1
            label = prefix + c.group + (f" ({c.unit})" if c.unit else "")
            top.append(f"<th colspan={j - i}>{html.escape(label)}</th>")
            sub += [f'<th class=sub title="{html.escape(x.meaning)}">{html.escape(x.name)}</th>' for x in cols[i:j]]
            i = j
        else:
            label = prefix + c.name + (f" ({c.unit})" if c.unit else "")
            top.append(f'<th rowspan={2 if two else 1} title="{html.escape(c.meaning)}">{html.escape(label)}</th>')
            i += 1
    rows = "<tr>" + "".join(top) + "</tr>" + ("<tr>" + "".join(sub) + "</tr>" if two else "")
    return "<thead>" + rows + "</thead>"


def _summary_table(summary: pd.DataFrame, cols: list[Column], with_n: bool = True) -> str:
    body = []
    for _, r in summary.iterrows():
        cells = [f"<td>{html.escape(str(r['method']))}</td>"] + ([f"<td>{int(r['n'])}</td>"] if with_n else [])
        cells += [_mean_std_cell(r.get(f"{c.key}_mean"), r.get(f"{c.key}_std"), c) for c in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    first = ["method", "n"] if with_n else ["method"]
    return ("<div class=wide><table>" + _header(first, cols) + "<tbody>" + "".join(body)
            + "</tbody></table></div>")


def _legend(cols: list[Column]) -> str:
    items = "".join(f"<dt>{html.escape(c.header)}</dt><dd>{html.escape(c.meaning)}</dd>" for c in cols if c.meaning)
    return f"<dl class=cols>{items}</dl>"


def summary_html(summary: pd.DataFrame) -> str:
    """The decisive columns (PSNR and SSIM per plane, slice consistency, time, NFE) in one table that fits
    the page, every other metric behind a ``<details>`` toggle; headers are human names with units."""
    keys = [c[:-5] for c in summary.columns if c.endswith("_mean")]
    cols = ordered_columns(keys)
    main = [c for c in cols if c.main]
    rest = [c for c in cols if not c.main]
    out = _summary_table(summary, main)
    if rest:
        out += (f"<details><summary>All metrics ({len(rest)} more columns) and what each column means</summary>"
                + _summary_table(summary, rest, with_n=False) + _legend(cols) + "</details>")
    return out


def _paired_cell(r: pd.Series | None, col: Column) -> str:
    if r is None or pd.isna(r["mean_diff"]):
        return f"<td class=na>{NA}</td>"
    d = fmt_value(r["mean_diff"], col)
    d = d if d.startswith("−") else "+" + d
    p = "" if pd.isna(r["t_p"]) else f"<span class=sd> (p={r['t_p']:.2g})</span>"
    return f"<td>{d}{p}</td>"


def _paired_table(paired: pd.DataFrame, cols: list[Column]) -> str:
    body = []
    for method, g in paired.groupby("method", sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        cells = [f"<td>{html.escape(str(method))}</td>", f"<td>{html.escape(str(g['baseline'].iloc[0]))}</td>"]
        cells += [_paired_cell(by.get(c.key), c) for c in cols]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ("<div class=wide><table>" + _header(["method", "vs"], cols, prefix="Δ ") + "<tbody>" + "".join(body)
            + "</tbody></table></div>")


def paired_html(paired: pd.DataFrame) -> str:
    """Mean subject-wise difference (method − baseline) and t-test p, decisive metrics first."""
    cols = ordered_columns(list(dict.fromkeys(paired["metric"])))
    main = [c for c in cols if c.main]
    rest = [c for c in cols if not c.main]
    out = _paired_table(paired, main)
    if rest:
        out += (f"<details><summary>Differences in the other metrics ({len(rest)})</summary>"
                + _paired_table(paired, rest) + "</details>")
    return out


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
             "workflow's own outputs. Image metrics are computed in the configured intensity window (CT: the HU "
             "window, MR: a robust percentile range, both mapped to [0, 1]), inside the body mask when configured; "
             "PSNR and SSIM per plane are means over the axial, coronal and sagittal slices. Slice jumps: the "
             "error's slice-to-slice changes relative to the reference's own (lower is better). Time and memory "
             "are the reconstruct job's own. NFE (number of function evaluations) counts calls of a learned "
             "prior network and applies only to methods that have one (— otherwise). Hover a header for its "
             "definition; the CSV tables keep the raw keys (their units: tables/&lt;modality&gt;/columns.md).</p>"]
    for title, summary_csv, paired_csv in sections:
        parts += [f"<h2>{html.escape(title)}: results per method (mean ± std over subjects)</h2>",
                  summary_html(pd.read_csv(summary_csv))]
        if paired_csv is not None and Path(paired_csv).exists():
            paired = pd.read_csv(paired_csv)
            if not paired.empty:
                parts += [f"<h3>{html.escape(title)}: paired differences against the baseline</h3>",
                          "<p class=note>Mean of subject-wise differences (method − baseline), with the paired "
                          "t-test p-value where there are enough subjects; Wilcoxon signed-rank p-values (from 6 "
                          "subjects on) are in the paired.csv table.</p>",
                          paired_html(paired)]
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
