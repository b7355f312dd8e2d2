"""The HTML report opens in a real headless browser (Debian's chromium) and renders a non-blank page."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from medrecon.report.figures import montage
from medrecon.report.html import build_report
from medrecon.report.tables import write_study_tables
from medrecon.volume import Geometry, Volume

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium to run this test)")
def test_report_renders_in_headless_chromium(tmp_path):
    import json

    rng = np.random.default_rng(0)
    ref = Volume.from_array(tmp_path / "ref.zarr", rng.normal(size=(12, 24, 24)).astype(np.float32),
                            Geometry((2.0, 1.0, 1.0)), {"modality": "CT"})
    rec = Volume.from_array(tmp_path / "rec.zarr", (ref.read() + 0.1).astype(np.float32), ref.geometry,
                            {"modality": "CT"})
    png, _ = montage(ref, {"fbp": rec}, (-2, 2), tmp_path / "m.png")
    files = []
    for s in range(3):
        for m, v in (("fbp", 30.0), ("tv", 32.0), ("dds", 34.0)):
            p = tmp_path / f"{s}{m}.json"
            p.write_text(json.dumps({"subject": f"s{s}", "method": m, "prior": ["p.pt"] if m == "dds" else None,
                                     "metrics": _demo_metrics(v + s, m)}))
            files.append(p)
    t = write_study_tables(files, tmp_path / "tables", "fbp")
    html = build_report(tmp_path / "report.html", study="demo", config={"study": "demo"},
                        sections=[("CT", t["summary_csv"], t.get("paired_csv"))], figures=[(png, "montage")],
                        inputs=[])
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--window-size=1100,1600", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] > 500 and img.std() > 0.01  # something was drawn, not a blank page
    _check_decisive_columns(html.read_text())


# Every metric key the evaluate step writes for a reconstruction (the demo's 18 columns and more).
_KEYS = ("psnr", "ssim", "nrmse", "mae", "psnr_axial", "psnr_coronal", "psnr_sagittal", "ssim_axial", "ssim_coronal",
         "ssim_sagittal", "slice_consistency", "slice_consistency_ratio", "runtime_s", "peak_rss_mb", "data_residual")


def _demo_metrics(psnr: float, method: str) -> dict:
    m = {k: (psnr if k.startswith("psnr") else 0.8 if k.startswith("ssim") else 0.05) for k in _KEYS}
    m["runtime_s"] = 0.0123 if method == "fbp" else 12.5
    if method == "dds":
        m["nfe"] = 50
    if method == "tv":
        m["iterations"] = 300
    return m


def _check_decisive_columns(text: str) -> None:
    """The first table has the decisive columns, human names with units; the rest is behind <details>."""
    first = text[text.index("<table>"):text.index("</table>")]
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", first)
    assert heads[:4] == ["method", "n", "PSNR (dB)", "SSIM"]
    assert heads[4:7] == ["Slice jumps (× ref)", "Time (s)", "NFE"]
    assert heads[7:] == ["axial", "coronal", "sagittal"] * 2
    assert not any("_" in h for h in heads)                        # no raw keys
    rows = re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", first)
    cells = {m: re.findall(r"<td[^>]*>(.*?)</td>", r) for m, r in rows}
    assert cells["fbp"][-1] == "—" and cells["tv"][-1] == "—" and cells["dds"][-1] == "50"   # NFE: network only
    assert cells["fbp"][-2].startswith("0.0123")                 # time with three significant digits
    details = text[text.index("<details>"):]
    for head in ("Iterations", "Data residual", "Peak memory (MB)", "PSNR 3D (dB)"):
        assert head in details
    assert text.index("Time (s)") < text.index("<details>")
