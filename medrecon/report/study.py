"""Assemble a study's report from the evaluate step's JSON files: tables, figures, one HTML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medrecon.report.figures import CONVENTION, fmt_number, montage, psnr_along_z
from medrecon.report.html import build_report
from medrecon.report.tables import write_study_tables
from medrecon.volume import Volume


def build_study_report(metric_files: list[str | Path], out_html: str | Path, config: dict[str, Any]) -> Path:
    """Tables (CSV/Markdown) and figures (PNG) beside ``out_html``, then the self-contained HTML."""
    out_html = Path(out_html)
    base = out_html.parent
    docs = [json.loads(Path(p).read_text()) for p in metric_files]
    sections = []
    for modality in sorted({d["modality"] for d in docs}):
        files = [p for p, d in zip(metric_files, docs, strict=True) if d["modality"] == modality]
        mdocs = [d for d in docs if d["modality"] == modality]
        baseline = config["evaluate"].get("baseline") or _default_baseline(mdocs)
        tables = write_study_tables(files, base / "tables" / modality, baseline)
        sections.append((modality, tables["summary_csv"], tables.get("paired_csv")))
    figures: list[tuple[Path, str]] = []
    inputs: list[dict[str, Any]] = []
    for subject in sorted({d["subject"] for d in docs}):
        sub = [d for d in docs if d["subject"] == subject]
        ref = Volume.open(sub[0]["reference"])
        recons = {d["method"]: Volume.open(d["recon"]) for d in sub}
        stds = {m: std for m, v in recons.items() if (std := v.posterior_std()) is not None}
        window = tuple(sub[0]["window"])
        text = window_text(window, ref.meta.get("units"), ref.modality)
        png, _ = montage(ref, recons, window, base / "figures" / f"{subject}_montage.png",
                         title=f"{subject} ({ref.modality}), window {text}", stds=stds)
        err = fmt_number(0.25 * (window[1] - window[0]))
        figures.append((png, f"{subject}: reference, each method, |error| and posterior std (where sampled) in the "
                             f"central axial, coronal and sagittal planes. Grey levels: window {text}; |error| and "
                             f"std: 0 to {err}. {CONVENTION}"))
        line = psnr_along_z({d["method"]: [v if isinstance(v, int | float) else float("nan")
                                           for v in d["per_slice"]["psnr"]] for d in sub},
                            base / "figures" / f"{subject}_psnr_z.png", title=f"{subject}: PSNR per axial slice")
        figures.append((line, f"{subject}: PSNR of each axial slice (slice-to-slice consistency)"))
        inputs.append({"subject": subject, "modality": ref.modality, "shape": list(ref.shape),
                       "spacing_mm": list(ref.geometry.spacing), "source": ref.meta.get("sources")
                       or ref.meta.get("source_volume") or ref.meta.get("source"),
                       "provenance": ref.meta.get("provenance")})
    return build_report(out_html, study=config.get("study", "study"), config=config, sections=sections,
                        figures=figures, inputs=inputs)


def window_text(window: tuple[float, float], units: str | None, modality: str | None) -> str:
    """``-1000 to 1000 HU``, ``0 to 0.813 (a.u.)``: the display window as a reader wants it."""
    lo, hi = (fmt_number(v).replace("-", "−") for v in window)
    unit = " HU" if units == "HU" else " (a.u.)" if modality == "MR" else f" {units}" if units else ""
    return f"{lo} to {hi}{unit}"


def _default_baseline(docs: list[dict]) -> str | None:
    methods = {d["method"] for d in docs}
    for cand in ("tv", "fbp", "sense", "zero_filled"):
        if cand in methods:
            return cand
    return None
