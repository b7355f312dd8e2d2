"""How good is a slice prior as a denoiser? D(x + sigma n, sigma) vs TV and BM3D, per noise level.

What it measures
    A diffusion sampler is only as good as its denoiser D(x, sigma) = E[x0 | x0 + sigma n]; at the small sigmas
    of the last sampling steps it decides the detail of the reconstruction. On the reference slices of the
    real-anatomy *validation* subjects of ``config/real.yaml`` (their ``reference.zarr`` must exist: run the
    study's resample jobs), in the prior's network domain (CT window [-1000, 1000] HU -> [-1, 1]), each slice
    gets Gaussian noise of std sigma (seeded) and is denoised by
      * every given slice-prior checkpoint: one network evaluation, the prior told the true sigma;
      * TV (``skimage.restoration.denoise_tv_chambolle``) with the weight chosen per sigma from a grid ON THESE
        SLICES (an oracle: TV's best case);
      * BM3D (the ``bm3d`` package, ``pip install bm3d``), told the true sigma, no tuning.
    PSNR (peak-to-peak 2, the network range) over the whole slice, mean over slices. A prior that does not beat
    the oracle TV denoiser at the small sigmas cannot beat TV reconstruction by much, whatever the sampler.

Run: ``python benchmarks/denoise_curve.py --priors data/priors/real_ct_slice.pt [more.pt ...]`` -> table,
``benchmarks/out/denoise_curve.json``. ``--volumes a.zarr ...`` denoises those CT volumes instead (run it once on
a prior's training volumes and once on held-out ones: equal PSNR means the prior generalises, a gap that grows
with training means it memorises). ``--slab-priors`` adds DiffusionBlend's 3-slice priors (each slice from the
triplet centred on it), so a slab prior is compared with a slice prior on the same noisy slices.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
TV_WEIGHTS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def psnr(x: np.ndarray, ref: np.ndarray, peak: float = 2.0) -> float:
    return float(10 * np.log10(peak**2 / np.mean((x - ref) ** 2)))


def slab_denoise(prior: Any, noisy: np.ndarray, sigma: float) -> np.ndarray:
    """One volume (Z, H, W) through a slab prior: adjacent triplets (label 0), one estimate per slice."""
    import torch

    from medrecon.diffusion.slab_data import LABEL_ADJACENT

    z = noisy.shape[0]
    if z < 3:
        raise SystemExit(f"{prior.meta['checkpoint']}: a slab prior needs volumes of >= 3 slices")
    slabs = torch.from_numpy(np.stack([noisy[i:i + 3] for i in range(z - 2)]))
    labels = torch.full((z - 2,), LABEL_ADJACENT, dtype=torch.long)
    with torch.no_grad():
        est = prior.denoiser(slabs, torch.tensor(sigma), {"class_labels": labels}).numpy()
    return np.concatenate([est[:1, 0], est[:, 1], est[-1:, 2]])


def main() -> None:
    import torch
    from skimage.restoration import denoise_tv_chambolle

    from medrecon.diffusion.checkpoint import prior_from_checkpoint
    from medrecon.diffusion.normalisation import default_normalisation, to_network
    from medrecon.diffusion.slab_data import slab_prior_from_checkpoint
    from medrecon.volume import Volume

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "config" / "real.yaml"))
    p.add_argument("--priors", nargs="+", default=[str(REPO / "data" / "priors" / "real_ct_slice.pt")])
    p.add_argument("--volumes", nargs="+", type=Path,
                   help="CT volume stores (zarr) to denoise instead of the config's validation subjects, e.g. a "
                        "prior's training volumes next to held-out ones: the memorisation check")
    p.add_argument("--slab-priors", nargs="*", default=[],
                   help="3-slice slab priors (DiffusionBlend) to denoise the same noisy volumes with: every adjacent "
                        "triplet, each slice taking the middle channel of the triplet centred on it (the end slices "
                        "the end triplets' outer channels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--out", default=str(HERE / "out" / "denoise_curve.json"))
    a = p.parse_args()
    torch.set_num_threads(1)

    if a.volumes:
        subjects, paths = [str(v) for v in a.volumes], list(a.volumes)
    else:
        cfg = yaml.safe_load(Path(a.config).read_text())
        res = Path(cfg.get("results", "results")) / cfg["study"]
        subjects = [s["id"] for s in cfg["subjects"] if s.get("role", "eval") == "eval" and s["modality"] == "CT"]
        paths = [res / sid / "reference.zarr" for sid in subjects]
    norm = default_normalisation("CT")
    volumes = [np.asarray(to_network(Volume.open(path).read(), norm, clip=True), np.float32) for path in paths]
    clean = np.concatenate(volumes)          # (N, 64, 64)
    starts = np.cumsum([0] + [v.shape[0] for v in volumes])
    rng = np.random.default_rng(a.seed)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    bm3d = None
    if not a.no_bm3d:
        import bm3d

    # loaded once: every noise level and volume reuses them
    slice_priors = {path: prior_from_checkpoint(path, "cpu", image_units="native", expect_modality="CT")
                    for path in a.priors}
    slab_priors = {path: slab_prior_from_checkpoint(path, "cpu", image_units="native", expect_modality="CT")
                   for path in a.slab_priors}
    rows: dict[str, dict[str, float]] = {}
    for sigma in SIGMAS:
        noisy = clean + sigma * noise
        row = {"noisy": float(np.mean([psnr(n, c) for n, c in zip(noisy, clean, strict=True)]))}
        for path, prior in slice_priors.items():
            with torch.no_grad():
                out = prior.denoiser(torch.from_numpy(noisy)[:, None], torch.tensor(sigma), None)[:, 0].numpy()
            row[Path(path).stem] = float(np.mean([psnr(o, c) for o, c in zip(out, clean, strict=True)]))
        for path, prior in slab_priors.items():
            out = np.concatenate([slab_denoise(prior, noisy[b:e], sigma) for b, e in itertools.pairwise(starts)])
            row[Path(path).stem] = float(np.mean([psnr(o, c) for o, c in zip(out, clean, strict=True)]))
        tv = {w: float(np.mean([psnr(denoise_tv_chambolle(n, weight=w), c) for n, c in zip(noisy, clean,
                                                                                          strict=True)]))
              for w in TV_WEIGHTS}
        best = max(tv, key=tv.get)
        row["tv_oracle"], row["tv_weight"] = tv[best], best
        if bm3d is not None:
            t0 = time.perf_counter()
            row["bm3d"] = float(np.mean([psnr(bm3d.bm3d(n, sigma_psd=sigma), c) for n, c in zip(noisy, clean,
                                                                                                strict=True)]))
            row["bm3d_s"] = time.perf_counter() - t0
        rows[str(sigma)] = row
        print(f"sigma {sigma:5.2f}: " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"subjects": subjects, "slices": int(clean.shape[0]), "rows": rows,
                                       "priors": a.priors}, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
