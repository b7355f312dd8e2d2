"""Sampler fidelity against exact posteriors: prints a table and writes benchmarks/out/fidelity.json.

Two problems whose posterior is known in closed form (see ``medrecon.diffusion.analytic``):

1. The 1D Gaussian-mixture seed example (weights 0.3/0.5/0.2, means -2.5/0/1.5, stds 0.3/0.4/0.3;
   y = x + n = 0.5, sigma_y = 0.8): exact posterior mean / std / mass of the -2.5 mode (x < -1.25), the
   exact-score samplers (ancestral DDPM and DDIM/probability flow driven by the posterior's own exact
   denoiser), DPS at several zeta (both guidance forms), DDS, DDNM / DDNM+ and MCG.
2. A d = 64 linear-Gaussian problem (8x8 image, squared-exponential prior covariance, 32 random
   measurements, sigma_y = 0.1): relative error of the sample mean and of the per-pixel std against the
   exact posterior, for DPS, DDS, DDNM / DDNM+ and MCG.

Usage: ``python benchmarks/fidelity.py [--samples-1d N] [--samples-64 N] [--threads T] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import medrecon.methods  # noqa: F401  (registers dps, dds)
from medrecon.diffusion.analytic import (
    DenseOperator,
    GaussianMixturePrior,
    GaussianPrior,
    linear_gaussian_problem,
)
from medrecon.diffusion.schedules import VPSchedule, sample_vp
from medrecon.recon.registry import METHODS, ReconProblem

F64 = torch.float64
OUT = Path(__file__).resolve().parent / "out" / "fidelity.json"


def _norm_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def seed_problem() -> tuple[GaussianMixturePrior, GaussianMixturePrior, ReconProblem]:
    """The 1D seed example: prior, exact posterior, and the ReconProblem (image 1x1x1, identity A)."""
    prior = GaussianMixturePrior([0.3, 0.5, 0.2], [[-2.5], [0.0], [1.5]], [[0.09], [0.16], [0.09]])
    post = prior.posterior(torch.ones(1, 1), torch.tensor([0.5]), 0.8)
    op = DenseOperator(torch.ones(1, 1, dtype=F64), (1, 1))
    prob = ReconProblem(y=torch.tensor([0.5]), operator=op, modality="CT", image_shape=(1, 1, 1),
                        noise_std=0.8)
    return prior, post, prob


def mode_mass_below(post: GaussianMixturePrior, cut: float = -1.25) -> float:
    """Exact posterior probability of x < cut (the -2.5 mode's basin)."""
    sd = post.covs[:, 0, 0].sqrt()
    return float((post.weights * _norm_cdf((cut - post.means[:, 0]) / sd)).sum())


def summary_1d(x: torch.Tensor) -> dict[str, float]:
    x = x.reshape(-1).double()
    return {"mean": float(x.mean()), "std": float(x.std()),
            "mass_below_-1.25": float((x < -1.25).double().mean())}


def summary_lg(x: torch.Tensor, post: GaussianPrior) -> dict[str, float]:
    x = x.reshape(x.shape[0], -1).double()
    return {"mean_rel_err": float((x.mean(0) - post.mean).norm() / post.mean.norm()),
            "std_rel_err": float((x.std(0) - post.std).norm() / post.std.norm()),
            "mc_mean_rel_err": float(post.std.norm() / post.mean.norm() / math.sqrt(len(x)))}


def run(samples_1d: int, samples_64: int, quick: bool) -> dict:
    rows: list[dict] = []

    def add(problem: str, name: str, stats: dict, n: int, nfe: int, t: float) -> None:
        rows.append({"problem": problem, "sampler": name, "samples": n, "nfe": nfe, "time_s": round(t, 3),
                     **stats})

    prior, post, prob = seed_problem()
    add("seed1d", "exact posterior", {"mean": float(post.mean[0]), "std": float(post.cov[0, 0].sqrt()),
                                      "mass_below_-1.25": mode_mass_below(post)}, 0, 0, 0.0)
    sched = VPSchedule()
    for name, eta, steps in [("exact-score DDPM", 1.0, 1000), ("exact-score DDIM (PF-ODE)", 0.0, 200)]:
        t0 = time.perf_counter()
        x = sample_vp(post, (samples_1d, 1), sched, steps, torch.Generator().manual_seed(1), eta=eta,
                      dtype=F64)
        add("seed1d", name, summary_1d(x), samples_1d, steps, time.perf_counter() - t0)
    dps_cfgs = [("norm", 0.3), ("norm", 1.0), ("gaussian", 1.0)] if quick else \
        [("norm", 0.1), ("norm", 0.3), ("norm", 1.0), ("norm", 3.0), ("gaussian", 0.5), ("gaussian", 1.0)]
    for guidance, zeta in dps_cfgs:
        params = {"zeta": zeta, "guidance": guidance, "samples": samples_1d, "dtype": "float64"}
        r = METHODS["dps"](prob, params, prior.as_prior(), torch.Generator().manual_seed(2))
        add("seed1d", f"DPS {guidance} zeta={zeta}", summary_1d(r.samples), samples_1d, r.nfe,
            r.info["time_s"])
    for lam in (0.0, 0.64):
        r = METHODS["dds"](prob, {"lam": lam, "samples": samples_1d, "dtype": "float64"}, prior.as_prior(),
                           torch.Generator().manual_seed(3))
        add("seed1d", f"DDS lam={lam}", summary_1d(r.samples), samples_1d, r.nfe, r.info["time_s"])
    # DDNM / DDNM+ (sigma_y = noise_std / ||A|| = 0.8 here) and MCG (projects onto y: every sample is y)
    for method, params in [("ddnm", {}), ("ddnm", {"variant": "ddnm+"}), ("mcg", {"zeta": 0.3, "steps": 200})]:
        r = METHODS[method](prob, {**params, "samples": samples_1d, "dtype": "float64"}, prior.as_prior(),
                            torch.Generator().manual_seed(3))
        label = f"{method.upper()} " + (" ".join(f"{k}={v}" for k, v in params.items()) or "defaults")
        add("seed1d", label, summary_1d(r.samples), samples_1d, r.nfe, r.info["time_s"])
    # DiffusionMBIR: hard data consistency returns y; the noise-aware step (sigma_y = 0.8) is closer
    for dc in ("hard", "noise_aware"):
        r = METHODS["diffusionmbir"](prob, {"dc": dc, "snr_norm": "batch", "samples": samples_1d, "dtype": "float64"},
                                     prior.as_prior(), torch.Generator().manual_seed(3))
        add("seed1d", f"DiffusionMBIR dc={dc}", summary_1d(r.samples), samples_1d, r.nfe, r.info["time_s"])

    prior, post, prob = linear_gaussian_problem()
    cfgs = [("dps", {"zeta": 0.3}), ("dps", {"zeta": 1.0}), ("dds", {}), ("dds", {"cg_iter": 2}),
            ("dds", {"eta_convention": "ddim", "eta": 1.0}), ("dds", {"steps": 100})]
    for method, params in cfgs[: 3 if quick else None]:
        r = METHODS[method](prob, {**params, "samples": samples_64, "dtype": "float64"}, prior.as_prior(),
                            torch.Generator().manual_seed(4))
        label = f"{method.upper()} " + (" ".join(f"{k}={v}" for k, v in params.items()) or "defaults")
        add("lingauss64", label, summary_lg(r.samples, post), samples_64, r.nfe, r.info["time_s"])
    more = [("ddnm", {}), ("ddnm", {"variant": "ddnm+"}), ("mcg", {"zeta": 0.3, "steps": 100})]
    more += [("diffusionmbir", {}), ("diffusionmbir", {"dc": "noise_aware"})]
    more += [] if quick else [("ddnm", {"eta": 0.0}), ("ddnm", {"travel_repeat": 3, "travel_length": 5}),
                              ("mcg", {"zeta": 0.0, "steps": 100}), ("mcg", {"zeta": 0.3, "steps": 1000})]
    for method, params in more:
        r = METHODS[method](prob, {**params, "samples": samples_64, "dtype": "float64"}, prior.as_prior(),
                            torch.Generator().manual_seed(4))
        label = f"{method.upper()} " + (" ".join(f"{k}={v}" for k, v in params.items()) or "defaults")
        add("lingauss64", label, summary_lg(r.samples, post), samples_64, r.nfe, r.info["time_s"])
    return {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}


def print_table(res: dict) -> None:
    keys = ["problem", "sampler", "samples", "nfe", "time_s", "mean", "std", "mass_below_-1.25",
            "mean_rel_err", "std_rel_err", "mc_mean_rel_err"]
    print(" | ".join(keys))
    for r in res["rows"]:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples-1d", type=int, default=20000)
    ap.add_argument("--samples-64", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.samples_1d, args.samples_64, args.quick)
    print_table(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
