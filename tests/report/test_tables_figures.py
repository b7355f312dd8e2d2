"""Study tables (paired tests against scipy), figures (panel counts), and the self-contained HTML report."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medrecon.report.figures import montage, psnr_along_z
from medrecon.report.html import build_report
from medrecon.report.tables import load_metrics, paired, summary, write_study_tables
from medrecon.volume import Geometry, Volume


def _write_metrics(tmp_path, n_subjects=7):
    rng = np.random.default_rng(3)
    files = []
    for s in range(n_subjects):
        base = 30 + rng.normal()
        for method, gain in [("fbp", 0.0), ("tv", 2.0), ("dds", 3.0)]:
            rec = {"subject": f"s{s}", "method": method,
                   "metrics": {"psnr": base + gain + 0.3 * rng.normal(), "ssim": 0.8 + 0.01 * gain,
                               "label": "ignored-non-numeric"}}
            p = tmp_path / f"{s}_{method}.json"
            p.write_text(json.dumps(rec))
            files.append(p)
    return files


def test_summary_and_paired_match_scipy(tmp_path):
    files = _write_metrics(tmp_path)
    df = load_metrics(files)
    assert set(df.columns) == {"subject", "method", "psnr", "ssim"}
    summ = summary(df).set_index("method")
    tv = df[df.method == "tv"].psnr
    assert summ.loc["tv", "psnr_mean"] == pytest.approx(tv.mean())
    assert summ.loc["tv", "psnr_std"] == pytest.approx(tv.std(ddof=1))
    pr = paired(df, "fbp")
    row = pr[(pr.method == "tv") & (pr.metric == "psnr")].iloc[0]
    a = df[df.method == "tv"].set_index("subject").psnr
    b = df[df.method == "fbp"].set_index("subject").psnr.loc[a.index]
    assert row.mean_diff == pytest.approx((a - b).mean())
    assert row.t_p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert row.wilcoxon_p == pytest.approx(stats.wilcoxon(a - b).pvalue)
    assert row.t_p < 1e-3  # a 2 dB gain with 0.3 dB noise over 7 subjects is significant


def test_write_tables_files(tmp_path):
    written = write_study_tables(_write_metrics(tmp_path, 3), tmp_path / "tables", baseline="fbp")
    md = written["summary_md"].read_text()
    assert "| tv | 3 |" in md and "±" in md
    assert pd.read_csv(written["paired_csv"]).shape[0] == 2 * 2  # 2 methods x 2 metrics


def _vol(path, data):
    return Volume.from_array(path, data.astype(np.float32), Geometry((2.0, 1.0, 1.0)), {"modality": "CT"})


def test_montage_panels_and_report(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    ref = _vol(tmp_path / "ref.zarr", rng.normal(size=(8, 16, 12)))
    recs = {m: _vol(tmp_path / f"{m}.zarr", ref.read() + 0.1 * rng.normal(size=ref.shape)) for m in ("fbp", "tv")}
    std = {"tv": _vol(tmp_path / "tv_std.zarr", np.abs(rng.normal(size=ref.shape)))}
    png, panels = montage(ref, recs, (-2, 2), tmp_path / "m.png", "subject s0", stds=std)
    assert panels == 3 * (1 + 2 * len(recs) + len(std))
    assert mpimg.imread(png).ndim == 3
    line = psnr_along_z({"fbp": [30.0] * 8, "tv": [32.0] * 8}, tmp_path / "z.png")
    tables = write_study_tables(_write_metrics(tmp_path, 3), tmp_path / "tables", baseline="fbp")
    out = build_report(tmp_path / "report.html", study="demo", config={"study": "demo"},
                       sections=[("CT", tables["summary_csv"], tables["paired_csv"])],
                       figures=[(png, "montage"), (line, "psnr along z")], inputs=[{"subject": "s0"}])
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2
    # self-contained: no references to external files
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "paired differences against the baseline" in text and "tv" in text


def test_single_method_has_no_paired_table(tmp_path):
    files = [f for f in _write_metrics(tmp_path, 2) if f.name.endswith("_fbp.json")]
    written = write_study_tables(files, tmp_path / "t", baseline="fbp")
    assert "paired_csv" not in written and "| fbp | 2 |" in written["summary_md"].read_text()


def test_numbers_and_windows_read_well():
    from medrecon.report.html import fmt_value
    from medrecon.report.study import window_text
    from medrecon.report.tables import column

    assert window_text((0.0, 0.818946), "arbitrary", "MR") == "0 to 0.819 (a.u.)"
    assert window_text((-1000.0, 1000.0), "HU", "CT") == "−1000 to 1000 HU"
    assert fmt_value(26.299266, column("psnr_axial")) == "26.30"
    assert fmt_value(0.049986) == "0.0500" and fmt_value(496.3) == "496" and fmt_value(12.46) == "12.5"
    assert fmt_value(float("nan")) == "—"


def test_columns_are_documented_with_units(tmp_path):
    written = write_study_tables(_write_metrics(tmp_path, 3), tmp_path / "tables", baseline="fbp")
    doc = written["columns_md"].read_text()
    assert "| `psnr_axial` | PSNR axial (dB) | dB |" in doc and "| `runtime_s` | Time (s) | s |" in doc
    assert "| `peak_rss_mb` | Peak memory (MB) | MB |" in doc


def test_old_metrics_files_get_nfe_from_the_reconstruction(tmp_path):
    """Metrics JSONs written before evaluate recorded the prior: a classical method's operator count is not
    shown as NFE; its iterations come from the reconstruction's record."""
    rec = Volume.from_array(tmp_path / "sirt.zarr", np.zeros((2, 3, 3), np.float32), Geometry(),
                            {"modality": "CT", "prior": None, "info": {"n_iter": 100},
                             "record": {"nfe": 203, "runtime_s": 0.2}})
    p = tmp_path / "sirt.json"
    p.write_text(json.dumps({"subject": "s0", "method": "sirt", "recon": str(rec.path),
                             "metrics": {"psnr": 30.0, "nfe": 203}}))
    row = load_metrics([p]).iloc[0]
    assert "nfe" not in row.index and row["iterations"] == 100
