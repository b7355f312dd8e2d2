"""DDS settings and training budget on the real-anatomy *validation* subjects (never the report set).

What it measures
    For each validation subject of ``config/real.yaml`` of one modality (``--modality``; their measurements
    must exist: run ``snakemake --configfile config/real.yaml --cores 2`` first), DDS with every (prior,
    setting) pair: priors = the config's DDS prior and any other checkpoints given with ``--priors``;
    settings = the named ``--setting NAME=JSON`` (updates of the config's DDS params), or by default 2D DDS
    (one sample), DDS with the z-TV ADMM step (3D data consistency: DDS's 3D CT variant), and the posterior
    mean of ``--samples`` z-TV samples. The classical reference (3D TV for CT, L1-wavelet for MR) runs once
    per subject.
    Metrics come from :func:`medrecon.evaluate.evaluate` (PSNR/SSIM axial/coronal/sagittal, slice
    consistency) exactly as the workflow computes them.

Run: ``python benchmarks/real_sweep.py --priors results/real/priors/real_ct_slice_3k.pt`` -> table on stdout,
``benchmarks/out/real_sweep.json``. Everything goes through :func:`medrecon.reconstruct.reconstruct`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEYS = ("psnr", "psnr_coronal", "psnr_sagittal", "ssim", "slice_consistency_ratio", "data_residual", "runtime_s")


def _label(prior: str | list[str] | None) -> str:
    """A prior's short name: the checkpoint's stem, stems joined by '+' for methods that take several (ReSample's
    autoencoder and latent prior), '-' for none."""
    if not prior:
        return "-"
    return "+".join(Path(p).stem for p in ([prior] if isinstance(prior, str) else prior))


def main() -> None:
    from medrecon.config import validate
    from medrecon.evaluate import evaluate
    from medrecon.reconstruct import reconstruct

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config" / "real.yaml"))
    p.add_argument("--priors", nargs="*", default=[], help="more slice-prior checkpoints to compare")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--rho", type=float, default=0.004,
                   help="z-TV ADMM penalty, a fraction of ||A||^2 (issue 14's phantom value 100 on STS_009's operator)")
    p.add_argument("--ztv-lambda", type=float, default=7e-4,
                   help="z-TV weight, a fraction of ||A^H y||_inf (the default chosen by this sweep)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                   help="a named DDS setting replacing the default three, e.g. "
                        "'ccdf={\"init\": \"tv\", \"start\": 0.5}' (keys update the config's dds params); "
                        "repeatable")
    p.add_argument("--subjects", nargs="*", help="validation subject ids (default: every CT eval subject)")
    p.add_argument("--method", default="dds", help="the diffusion method (its study params are the base)")
    p.add_argument("--modality", choices=("CT", "MR"), default="CT",
                   help="which validation subjects; the classical reference is 3D TV (CT) or L1-wavelet (MR)")
    p.add_argument("--no-tv", action="store_true", help="skip the classical reference rows")
    p.add_argument("--reference-only", action="store_true", help="only the classical reference rows")
    p.add_argument("--reference-setting", action="append", default=[], metavar="NAME=JSON",
                   help="a named setting of the classical reference (e.g. 'lam3e-4={\"lam\": 3e-4}'), so its "
                        "weight is chosen on the same subjects as the sampler's; default: its config params")
    p.add_argument("--out", default=str(HERE / "out" / "real_sweep.json"))
    a = p.parse_args()

    raw = yaml.safe_load(Path(a.config).read_text())
    cfg0 = validate(raw, a.config)
    res = Path(cfg0["results"]) / cfg0["study"]
    subjects = a.subjects or [s["id"] for s in cfg0["subjects"]
                              if s.get("role", "eval") == "eval" and s["modality"] == a.modality]
    priors = [cfg0["reconstruct"]["priors"][a.modality][a.method], *a.priors]
    reference = "tv" if a.modality == "CT" else "l1_wavelet"
    from medrecon.reconstruct import modality_params

    base = modality_params(dict(cfg0["reconstruct"]["params"].get(a.method, {})), a.modality)
    ztv = {**base, "ztv": True, "rho": a.rho, "ztv_lambda": a.ztv_lambda}
    settings = {"2d": base, "ztv": ztv, f"ztv_mean{a.samples}": {**ztv, "samples": a.samples}}
    if a.setting:
        settings = {}
        for item in a.setting:
            name, _, js = item.partition("=")
            settings[name] = {**base, **json.loads(js)}
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="real_sweep-"))
    try:
        for sid in subjects:
            meas, ref = res / sid / "measurement.zarr", res / sid / "reference.zarr"
            ref_settings = dict(item.partition("=")[::2] for item in a.reference_setting) or {reference: "{}"}
            runs = [] if a.no_tv else [(reference, None, name, {**raw["reconstruct"].get("params", {}).get(
                reference, {}), **json.loads(js)}) for name, js in ref_settings.items()]
            if not a.reference_only:
                runs += [(a.method, pr, name, st) for pr in priors for name, st in settings.items()]
            for method, prior, name, params in runs:
                # the study's params of every other method stay (a warm start's init method uses its own)
                all_params = {**raw["reconstruct"].get("params", {}), method: params}
                cfg = validate({**raw, "reconstruct": {**raw["reconstruct"], "params": all_params}}, a.config)
                out = work / f"{sid}-{method}-{name}-{_label(prior)}.zarr"
                t0 = time.perf_counter()
                reconstruct(meas, out, method, cfg, prior_path=prior)
                doc = evaluate(ref, out, out.with_suffix(".json"), cfg, sid, method)
                row = {"subject": sid, "method": method, "setting": name, "prior": prior,
                       "wall_s": time.perf_counter() - t0, **{k: doc["metrics"].get(k) for k in KEYS}}
                rows.append(row)
                print(f"{sid:24s} {method:10s} {name:10s} {_label(prior):18s} "
                      + " ".join(f"{k}={row[k]:.3f}" for k in KEYS if row[k] is not None), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Mean over subjects per (method, setting, prior): the table the defaults are chosen from.
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"], _label(r["prior"])), []).append(r)
    print("\nmean over", len(subjects), "validation subjects")
    print(f"{'method':5s} {'setting':11s} {'prior':22s} " + " ".join(f"{k:>12s}" for k in KEYS))
    summary = []
    for (method, setting, prior), rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in KEYS if all(r[k] is not None for r in rs)}
        summary.append({"method": method, "setting": setting, "prior": prior, **mean})
        print(f"{method:10s} {setting:11s} {_label(prior):22s} "
              + " ".join(f"{mean.get(k, float('nan')):12.3f}" for k in KEYS))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"subjects": subjects, "rows": rows, "summary": summary,
                                       "settings": settings}, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
