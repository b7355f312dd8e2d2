"""Sampler fidelity against exact posteriors: prints tables and writes benchmarks/out/fidelity.json.

The exactness suite (issue 17) runs EVERY registered sampler that takes a prior on both problems below and writes
``{"gmm_1d": {"exact": {"mean", "std"}, "<method>": {"mean", "std", "nfe", ...}, ...}, "linear_gaussian":
{"<method>": {"rel_err_mean", "rel_err_std", "nfe", ...}, ...}, "rows": [...]}``. A new method needs one entry in
:data:`SUITE` (its parameters on the two problems; without one it runs at its defaults); a method whose prior
is not a per-slice denoiser (slab, patch, latent) cannot use the analytic denoisers and is listed as
``"n/a: <reason>"``, as is one that fails, never dropped. Extra keys (``tilted_ula``, the exact-score references,
the Monte-Carlo floor) say how far "exact in the limit" gets at the sample count used. The ``rows`` are the
older sweep of DPS / DDS settings, kept as they were.

Two problems whose posterior is known in closed form (see ``medrecon.diffusion.analytic``):

1. The 1D Gaussian-mixture seed example (weights 0.3/0.5/0.2, means -2.5/0/1.5, stds 0.3/0.4/0.3;
   y = x + n = 0.5, sigma_y = 0.8): exact posterior mean / std / mass of the -2.5 mode (x < -1.25), the
   exact-score samplers (ancestral DDPM and DDIM/probability flow driven by the posterior's own exact
   denoiser), DPS at several zeta (both guidance forms), DDS, DDNM / DDNM+ and MCG.
2. A d = 64 linear-Gaussian problem (8x8 image, squared-exponential prior covariance, 32 random
   measurements, sigma_y = 0.1): relative error of the sample mean and of the per-pixel std against the
   exact posterior, for DPS, DDS, DDNM / DDNM+ and MCG.

Usage: ``python benchmarks/fidelity.py [--samples-1d N] [--samples-64 N] [--threads T] [--quick]
[--methods a,b]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import medrecon.methods  # noqa: F401  (registers every sampler)
from medrecon.diffusion.analytic import (
    DenseOperator,
    GaussianMixturePrior,
    GaussianPrior,
    linear_gaussian_problem,
)
from medrecon.diffusion.schedules import VPSchedule, sample_vp
from medrecon.recon.registry import METHODS, ReconProblem, load_all

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


# One entry per sampler: its parameters on the 1D mixture and on the d = 64 linear-Gaussian problem (samples and
# dtype are added). The main key is the method as the study would run it (its defaults) unless the entry says
# otherwise; EXTRA adds labelled variants. Methods missing here run at their defaults.
SUITE: dict[str, dict[str, dict]] = {
    "dds": {"gmm_1d": {}, "linear_gaussian": {}},
    "dps": {"gmm_1d": {}, "linear_gaussian": {"zeta": 0.3}},
    "ddrm": {"gmm_1d": {}, "linear_gaussian": {}},
    # tilted transport with an exact first stage (the analytic mixture's tilted law is itself a mixture)
    "tilted": {"gmm_1d": {"stage1": "exact"}, "linear_gaussian": {"stage1": "exact"}},
    "ddnm": {"gmm_1d": {}, "linear_gaussian": {}},
    # MCG as in the sweep rows below (its 1000-step default through autograd is slow on 20000 samples)
    "mcg": {"gmm_1d": {"zeta": 0.3, "steps": 200}, "linear_gaussian": {"zeta": 0.3, "steps": 100}},
    "dcdp": {"gmm_1d": {}, "linear_gaussian": {}},
    # DiffusionMBIR as in the sweep rows (1D: the corrector's SNR normalised over the batch, not the 1-pixel sample)
    "diffusionmbir": {"gmm_1d": {"snr_norm": "batch"}, "linear_gaussian": {}},
    # deterministic optimisers: one point estimate (std 0, rel_err_std 1), compared with the posterior mean
    "pnp_admm": {"gmm_1d": {"samples": 1}, "linear_gaussian": {"samples": 1}},
    "pnp_red": {"gmm_1d": {"samples": 1}, "linear_gaussian": {"samples": 1}},
}
EXTRA: dict[str, tuple[str, dict[str, dict]]] = {
    "dps_gaussian": ("dps", {"gmm_1d": {"guidance": "gaussian"}, "linear_gaussian": {"guidance": "gaussian"}}),
    "ddrm_eta1": ("ddrm", {"gmm_1d": {"eta": 1.0}, "linear_gaussian": {"eta": 1.0}}),
    "ddnm+": ("ddnm", {"gmm_1d": {"variant": "ddnm+"}, "linear_gaussian": {"variant": "ddnm+"}}),
    "diffusionmbir_noise_aware": ("diffusionmbir", {"gmm_1d": {"dc": "noise_aware", "snr_norm": "batch"},
                                                    "linear_gaussian": {"dc": "noise_aware"}}),
    # ULA first stage: log-concave tilt on the mixture at 0.75 sigma*; on the 64-d problem it cannot mix
    "tilted_ula": ("tilted", {"gmm_1d": {"sigma_frac": 0.75, "ula_steps": 2000},
                              "linear_gaussian": {"ula_steps": 500}}),
}


# Slice-prior samplers that need a 3D volume, which the analytic problems (one slice) are not.
VOLUME_ONLY = {"tpdm": "n/a: needs two perpendicular 'slice' priors of a 3D volume (the analytic problems are one "
                       "slice); with an exact separable prior it equals DDS, tests/methods/test_tpdm.py"}

# slice-prior samplers that adapt a trained network's weights (LoRA), which the exact analytic denoisers do not have
NETWORK_ONLY = {"scd": "n/a: adapts the weights of a trained 'slice' network (LoRA) to the measurement; the analytic "
                       "problems' exact denoisers have none. Its exact checks (LoRA off = the base chain, an exact "
                       "Gaussian network with a learnt mean shift) are in tests/methods/test_scd.py"}


def not_applicable(name: str) -> str | None:
    """Why a registered method cannot run on the analytic problems, or None if it can."""
    spec = load_all()[name]
    if spec.prior is None:
        return None
    if spec.prior != "slice":
        return (f"n/a: needs a {spec.prior!r} prior (the analytic problems provide an exact per-slice denoiser, "
                "not a slab/patch/latent model)")
    return VOLUME_ONLY.get(name) or NETWORK_ONLY.get(name)


def _run_method(method: str, params: dict, prob: ReconProblem, prior: object, n: int, seed: int):
    p = {"samples": n, **params, "dtype": "float64"}
    return METHODS[method](prob, p, prior.as_prior(), torch.Generator().manual_seed(seed))


def suite(samples_1d: int, samples_64: int, methods: list[str] | None = None) -> dict[str, dict]:
    """The exactness suite: ``{"gmm_1d": {...}, "linear_gaussian": {...}}`` (see the module docstring)."""
    registry = load_all()
    samplers = sorted(n for n, spec in registry.items() if spec.prior is not None)
    if methods:
        samplers = [m for m in samplers if m in methods]
    runs = [(m, m, SUITE.get(m, {})) for m in samplers]
    runs += [(label, m, cfg) for label, (m, cfg) in EXTRA.items() if m in samplers]
    gmm: dict[str, dict | str] = {}
    lin: dict[str, dict | str] = {}

    prior, post, prob = seed_problem()
    gmm["exact"] = {"mean": float(post.mean[0]), "std": float(post.cov[0, 0].sqrt()),
                    "mass_below_-1.25": mode_mass_below(post)}
    sched = VPSchedule()
    for key, eta, steps in [("exact_score_ddpm", 1.0, 1000), ("exact_score_ddim", 0.0, 200)]:
        x = sample_vp(post, (samples_1d, 1), sched, steps, torch.Generator().manual_seed(1), eta=eta, dtype=F64)
        gmm[key] = {**summary_1d(x), "nfe": steps}
    lprior, lpost, lprob = linear_gaussian_problem()
    x = sample_vp(lpost, (samples_64, 64), sched, 1000, torch.Generator().manual_seed(1), dtype=F64)
    lin["exact_score_ddpm"] = {**_lg(x, lpost), "nfe": 1000}
    lin["mc_floor"] = {"rel_err_mean": float(lpost.std.norm() / lpost.mean.norm() / math.sqrt(samples_64)),
                       "rel_err_std": 1 / math.sqrt(2 * samples_64), "nfe": 0}
    for seed, (label, method, cfg) in enumerate(runs, start=10):
        why = not_applicable(method)
        if why:
            gmm[label] = lin[label] = why
            continue
        for key, problem, out in (("gmm_1d", (prior, prob), gmm), ("linear_gaussian", (lprior, lprob), lin)):
            params = cfg.get(key, {})
            t0 = time.perf_counter()
            try:
                n = int(params.get("samples", samples_1d if key == "gmm_1d" else samples_64))
                r = _run_method(method, params, problem[1], problem[0], n, seed)
            except Exception as e:      # a sampler that cannot run here is reported, not dropped
                out[label] = f"n/a: {type(e).__name__}: {e}"
                continue
            if not bool(torch.isfinite(r.samples).all()):
                out[label] = f"n/a: diverged (non-finite samples) with {params or 'its defaults'}"
                continue
            stats = summary_1d(r.samples) if key == "gmm_1d" else _lg(r.samples, lpost)
            if r.samples.shape[0] == 1:         # a point estimate: no spread
                stats.update({"std": 0.0} if key == "gmm_1d" else {"rel_err_std": 1.0})
                stats["point_estimate"] = True
            out[label] = {**stats, "nfe": int(r.nfe), "samples": n, "time_s": round(time.perf_counter() - t0, 3),
                          "params": params}
    return {"gmm_1d": gmm, "linear_gaussian": lin}


def _lg(x: torch.Tensor, post: GaussianPrior) -> dict[str, float]:
    s = summary_lg(x, post)
    return {"rel_err_mean": s["mean_rel_err"], "rel_err_std": s["std_rel_err"]}


def print_suite(res: dict) -> None:
    ex = res["gmm_1d"]["exact"]
    print(f"gmm_1d (exact posterior mean {ex['mean']:.4f}, std {ex['std']:.4f})")
    print(f"{'method':24s} {'mean':>8s} {'std':>8s} {'nfe':>6s}")
    for k, v in res["gmm_1d"].items():
        print(f"{k:24s} {v}" if isinstance(v, str) else
              f"{k:24s} {v['mean']:8.4f} {v['std']:8.4f} {v.get('nfe', 0):6d}")
    print("linear_gaussian (d = 64; relative errors of the sample mean and per-pixel std)")
    print(f"{'method':24s} {'rel_err_mean':>12s} {'rel_err_std':>12s} {'nfe':>6s}")
    for k, v in res["linear_gaussian"].items():
        print(f"{k:24s} {v}" if isinstance(v, str) else
              f"{k:24s} {v['rel_err_mean']:12.4f} {v['rel_err_std']:12.4f} {v.get('nfe', 0):6d}")


def print_table(res: dict) -> None:
    keys = ["problem", "sampler", "samples", "nfe", "time_s", "mean", "std", "mass_below_-1.25",
            "mean_rel_err", "std_rel_err", "mc_mean_rel_err"]
    print(" | ".join(keys))
    for r in res["rows"]:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples-1d", type=int, default=20000)
    ap.add_argument("--samples-64", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations in the older DPS/DDS sweep")
    ap.add_argument("--methods", default="", help="comma-separated samplers for the suite (default: all)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the older DPS/DDS sweep (rows)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = suite(args.samples_1d, args.samples_64, [m for m in args.methods.split(",") if m] or None)
    res.update(run(args.samples_1d, args.samples_64, args.quick) if not args.no_sweep else {"rows": []})
    print_suite(res)
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
