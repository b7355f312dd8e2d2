"""SCD: Steerable Conditional Diffusion (Barbano, Denker, Chung, Ryu, Ye, Jin, Arridge), a whole-slice prior
adapted to ONE measurement by LoRA, interleaved with a DDIM sampler with CG data consistency.

Follows ``alexdenker/SteerableConditionalDiffusion@8dc57fa`` (``algos/scd.py``, ``adapt/lora.py``,
``adapt/adaptation.py``, ``conditional_sampling.py``; ``docs/algorithms.md`` section 16). LoRA and the loss are in
:mod:`medrecon.diffusion.adapt`. On a uniform DDIM grid (reference 100 steps of 1000), with one Adam optimiser
(``lr``) over the LoRA weights for the whole chain, per step t -> s:

1. LoRA off: eps_base from x0_base = D(x_t / sqrt(ab_t), sigma_t) (kept for the DDIM update);
2. LoRA on; if t is in the adaptation set (every ``skip``-th t of the ascending grid, plus its 4 smallest):
   ``adapt_iters`` (K) times: x0 = D_theta(x_t); u = CG_gamma(x0) (``cg_iter`` steps on (I + gamma A^H A) u =
   x0 + gamma A^H y from x0); loss = mean |A u - y|^2 + tv TV(u); Adam step;
3. x0 = D_theta(x_t); u = CG_gamma(x0); x_s = sqrt(ab_s) u + c1 z + c2 eps_base (DDIM eta, default 0.2);
4. the output is the last step's network estimate x0 (``output: x0``, as the reference returns), or its CG
   correction u (``output: cg``).

The adapted LoRA weights are an output: ``info["artifacts"]["adapted"]`` (the reconstruct step writes them to
``<out>.adapted.pt`` and records path, sha256 and the measurement's digest). Every call starts from the base
prior (the LoRA layers are injected into a copy of the network and the optimiser is new): nothing is read
from, or carried to, another subject. Several samples of one pass share one adaptation; each pass adapts anew.

Departures, on purpose (besides those of :mod:`medrecon.diffusion.adapt`: relative gamma, normalised loss, no
LoRA dropout): NFE counts the two network evaluations of each step (base + adapted), the adaptation's forward
and backward passes are in ``info["adaptation_passes"]``; slices of a volume are one batch sharing one adapter
(algorithms-wave2 5.2: adapt once per slab, not per slice); slices of any size are padded to the network's
multiple with the background (:class:`~medrecon.methods.sampling.SliceLayout`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medrecon.diffusion.adapt import adapt_denoiser, adaptation_loss, cg_prox, train_steps
from medrecon.diffusion.canvas import CanvasDenoiser
from medrecon.diffusion.dc import operator_norm_sq
from medrecon.diffusion.denoiser import Prior
from medrecon.diffusion.schedules import ddim_step
from medrecon.errors import ConfigError
from medrecon.methods.sampling import DTYPES, SLICE_PRIOR_LOADER, SliceLayout, check_params, sample_chunks
from medrecon.recon.progress import StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

SCD_PAPER = ("Barbano, Denker, Chung, Ryu, Ye, Jin, Arridge: Steerable Conditional Diffusion for Out-of-Distribution "
             "Adaptation in Medical Image Reconstruction (2023)")
# conditional_sampling.py defaults (README example: adapt_iters 18, rank 12, lr 3e-4, gamma 0.2, skip 5, tv 1e-3)
SCD_DEFAULTS: dict[str, Any] = {
    "steps": 100, "eta": 0.2, "rank": 8, "adapt_iters": 12, "lr": 1e-4, "gamma": 10.0, "cg_iter": 3, "skip": 20,
    "tv": 1e-6, "output": "x0", "samples": 1, "sample_batch": None, "dtype": "float32",
}


@dataclass
class Chain:
    """How a sampler state maps to the image: the state batch shape, state <-> image maps and the denoiser on
    states built around an (adapted) base denoiser."""

    lay: SliceLayout
    shape: Callable[[int], tuple[int, ...]]
    to_image: Callable[[torch.Tensor, int], torch.Tensor]
    to_state: Callable[[torch.Tensor], torch.Tensor]
    wrap: Callable[[Any], Any]
    # the denoiser the adaptation steps use (default: ``wrap``'s); PaDIS's gets its own grid generator, so the
    # chain's patch grids do not depend on how many adaptation steps ran
    wrap_adapt: Callable[[Any], Any] | None = None
    # the starting state of n samples (default: N(0, I), the reference's randn)
    init: Callable[[int, torch.Tensor, torch.Generator | None], torch.Tensor] | None = None


def check_scd_params(name: str, params: dict) -> dict[str, Any]:
    p = check_params(name, params)
    bad = [(int(p["steps"]) >= 1, "steps >= 1"), (0.0 <= float(p["eta"]) <= 1.0, "0 <= eta <= 1"),
           (int(p["rank"]) >= 1, "rank >= 1"), (int(p["adapt_iters"]) >= 0, "adapt_iters >= 0"),
           (float(p["lr"]) >= 0, "lr >= 0"), (float(p["gamma"]) >= 0, "gamma >= 0"),
           (int(p["cg_iter"]) >= 0, "cg_iter >= 0"), (int(p["skip"]) >= 1, "skip >= 1"),
           (float(p["tv"]) >= 0, "tv >= 0"), (p["output"] in ("x0", "cg"), "output 'x0' or 'cg'")]
    for ok, what in bad:
        if not ok:
            raise ConfigError(f"{name}: needs {what}", fix="SCD uses steps 100, eta 0.2, rank 8, adapt_iters 12, "
                              "lr 1e-4, gamma 10, cg_iter 3, skip 20, tv 1e-6, output x0 (the defaults)")
    return p


def adaptation_steps(ts: list[int], skip: int) -> set[int]:
    """The reference's adapt set: every ``skip``-th t of the ascending grid plus its 4 smallest."""
    asc = sorted(ts)
    return set(asc[::skip]) | set(asc[:4])


def run_scd(name: str, problem: ReconProblem, p: dict[str, Any], prior: Prior, generator: torch.Generator | None,
            chain: Chain, sigma_max: float | None = None) -> ReconResult:
    """The SCD chain (module docstring) on any state layout; shared by ``scd`` and ``padis_ood``. ``sigma_max``
    keeps only the grid's steps with sigma_t <= sigma_max (at least the last one)."""
    lay, op = chain.lay, chain.lay.op
    sched = prior.vp_schedule()
    pairs = sched.step_pairs(int(p["steps"]))
    if sigma_max is not None:
        kept = [(t, s) for t, s in pairs if float(((1 - sched.alpha_bar(t)) / sched.alpha_bar(t)).sqrt()) <= sigma_max]
        pairs = kept or pairs[-1:]
    adapt_ts = adaptation_steps([t for t, _ in pairs], int(p["skip"]))
    with torch.no_grad():
        aty = op.adjoint(lay.y)
    gamma = float(p["gamma"]) / max(operator_norm_sq(op, aty.device), 1e-30) if float(p["gamma"]) else 0.0
    n_batch = 1 + len(lay.image_shape) - len(op.in_shape)     # one CG system per sample and slice
    y_power = float(lay.y.abs().pow(2).mean())
    t_start = time.perf_counter()
    outs, states, losses = [], [], []
    chunks = sample_chunks(int(p["samples"]), p["sample_batch"])
    report = StepReporter(problem.progress, len(pairs), len(chunks))
    iters, cg_iter, eta, tv = int(p["adapt_iters"]), int(p["cg_iter"]), float(p["eta"]), float(p["tv"])
    passes = 0
    for n in chunks:
        base, adapter = adapt_denoiser(prior.denoiser, int(p["rank"]), generator)     # fresh: the base prior
        den = chain.wrap(base)
        den_fit = den if chain.wrap_adapt is None else chain.wrap_adapt(base)
        opt = torch.optim.Adam(adapter.parameters(), lr=float(p["lr"]), weight_decay=0.0)
        cond = prior.batch_cond(n)
        x = lay.noise(chain.shape(n), generator) if chain.init is None \
            else chain.init(n, sched.alpha_bar(pairs[0][0]), generator)
        pass_losses: list[float] = []

        def corrected(x_t: torch.Tensor, ab: torch.Tensor, sigma: torch.Tensor, den: Any = den, n: int = n,
                      cond: Any = cond) -> tuple[torch.Tensor, torch.Tensor]:
            x0 = den(x_t / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
            return x0, cg_prox(op, chain.to_image(x0, n), aty, gamma, cg_iter, n_batch)

        for t, t_next in pairs:
            ab, ab_next = sched.alpha_bar(t), sched.alpha_bar(t_next)
            sigma = ((1 - ab) / ab).sqrt()
            adapter.set_scale(0.0)
            with torch.no_grad():
                x0_base = den(x / ab.sqrt().to(lay.dtype), sigma.to(lay.dtype), cond)
                eps = ((x - ab.sqrt() * x0_base) / (1 - ab).sqrt()).to(lay.dtype)
            adapter.set_scale(1.0)
            if t in adapt_ts and iters:
                def loss_fn(x: torch.Tensor = x, ab: torch.Tensor = ab, sigma: torch.Tensor = sigma,
                            fit: Any = den_fit) -> torch.Tensor:
                    _, u = corrected(x, ab, sigma, fit)
                    return adaptation_loss(op, lay.y, u, tv, y_power, prior.scale)
                pass_losses.extend(train_steps(adapter, opt, loss_fn, iters))
                passes += iters
            with torch.no_grad():
                x0, u = corrected(x, ab, sigma)
            if report:
                report(u, t=int(t), sigma=float(sigma))
            if t_next >= 0:
                x = ddim_step(chain.to_state(u), eps, ab, ab_next, eta, lay.noise(x.shape, generator), "ddim")
        outs.append(chain.to_image(x0, n) if p["output"] == "x0" else u)
        states.append(adapter.state_dict())
        losses.append(pass_losses)
    samples = torch.cat(outs).detach()
    with torch.no_grad():
        res = lay.residual_norms(samples).mean()
    info = {"method": name, "params": p, "time_s": time.perf_counter() - t_start,
            "final_residual_norm_mean": float(res), "adaptation_losses": losses, "adaptation_passes": passes,
            "adapted_steps": sorted(adapt_ts, reverse=True), "gamma_absolute": gamma,
            "lora_parameters": adapter.n_parameters(),
            "artifacts": {"adapted": {"method": name, "rank": int(p["rank"]), "passes": states,
                                      "base_prior": prior.meta.get("checkpoint")}}}
    return ReconResult(samples=samples, nfe=2 * len(pairs), info=info)


@register_method("scd", defaults=SCD_DEFAULTS, prior="slice", loader=SLICE_PRIOR_LOADER, paper=SCD_PAPER,
                 memory_copies=64)
def scd(problem: ReconProblem, params: dict, prior: Prior, generator: torch.Generator | None = None
        ) -> ReconResult:
    """Samples (S, *image_shape) by SCD; the adapted LoRA weights in ``info["artifacts"]``."""
    p = check_scd_params("scd", params)
    lay = SliceLayout(problem, prior, DTYPES[p["dtype"]])

    def wrap(den: Any) -> Any:
        return den if lay.canvas.identity else CanvasDenoiser(den, lay.canvas)

    chain = Chain(lay=lay, shape=lay.batch_shape, to_image=lay.image, to_state=lay.batch, wrap=wrap)
    return run_scd("scd", problem, p, prior, generator, chain)
