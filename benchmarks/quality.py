"""Quality benchmark: every reconstruction method on held-out phantoms, priors trained for one fixed budget.

What it measures
    1. Seeded phantoms (:mod:`medrecon.io.phantoms`): ``--train-volumes`` CT chest volumes for training and
       ``--eval-volumes`` held-out ones (other seeds = other subjects; ``--split validation`` takes another set of
       held-out seeds, to choose sampler settings on without touching the report set), 24 x 64 x 64 at 5 mm; MR brain
       volumes (24 x 64 x 64, 5 x 3.5 x 3.5 mm) for the MR rows.
    2. Every prior the chosen methods need is trained for the SAME number of optimizer steps
       (``--budget-steps``, batch 8, seed 0, EMA over the last tenth of the budget) through the library's own
       trainers: whole-slice (DDS, DPS),
       3-slice slab (DiffusionBlend/++), 2D patch (PaDIS), 3D patch (PaDIS-3D), autoencoder + latent UNet
       (ReSample / Latent-DPS: each of the two networks gets the budget), MR slice prior (MR DDS).
       ``--small-data`` also trains the slice and the patch prior on ONE volume (rows ``dds[1vol]`` and
       ``padis[1vol]``: the PaDIS claim that patch priors need less data). Checkpoints are cached in the
       work dir, keyed by the budget, so re-runs skip training. ``--padis-ablation`` adds the PaDIS paper's
       ablation rows (its Table 2) as rows ``padis[average]``, ``padis[tile]``, ``padis[langevin]``,
       ``padis[pc]``, ``padis[ddnm]`` (the same patch prior; :data:`PADIS_ABLATION`); each may also be named
       in ``--methods`` / ``--mr-methods``.
    3. Measurements with :func:`medrecon.measure.measure`: parallel-beam sparse-view CT at ``--views``
       (Poisson noise, I0 = 1e5 photons per ray), 8-coil Cartesian SENSE MRI at ``--mr-accel`` (SNR 30 dB).
    4. Each method reconstructs every held-out volume through :func:`medrecon.reconstruct.reconstruct` (the
       code path ``medrecon reconstruct`` and the workflow run) in a SUBPROCESS per (method, setting), one
       torch thread, run one after another; :func:`medrecon.evaluate.evaluate` scores each volume.

How to read the table
    One block per setting; one row per method; medians over the held-out volumes. PSNR (dB) and SSIM are
    the means over axial / coronal / sagittal slices (CT window [-1000, 1000] HU, body mask). ``SCr`` is
    the slice-consistency ratio (slice-to-slice jumps of the error divided by those of the reference: lower
    means fewer inter-slice streaks; 2D-slice priors score high). ``resid`` is the relative data residual
    ``||A x - y|| / ||y||`` (close to the noise level is consistent; far below it means fitting the noise).
    ``t/vol`` is the sampler time per volume (s), ``NFE`` network evaluations per volume, ``RSS`` the peak
    resident memory (MB) of the method's subprocess, i.e. the largest over its volumes (one process per
    method and setting, so peaks do not leak between methods; import and ASTRA/SigPy set-up are included).
    Sampler step counts are modest for CPU and are printed under the table and stored in the JSON: this is
    a small-budget comparison, not a reproduction of the papers' absolute numbers.

Run: ``python benchmarks/quality.py`` (defaults: budget 300 steps, CT 8 and 20 views, MR R = 4 and 8, all
methods) -> prints the table, writes ``benchmarks/out/quality.json`` (rewritten after every method, so a
partial run leaves its numbers). ``--methods fbp dds`` restricts the CT rows, ``--mr-methods`` the MR rows,
``--mr-accel`` with no values skips MR, ``--params '{"dps": {"zeta": 0.5}}'`` overrides sampler parameters.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SHAPE = (24, 64, 64)
CT_SPACING = (5.0, 5.0, 5.0)
MR_SPACING = (5.0, 3.5, 3.5)
# eval: the report set (the tables); validation: other held-out volumes to choose sampler settings on (--split)
SEEDS = {"CT": {"train": 100, "eval": 200, "validation": 250}, "MR": {"train": 300, "eval": 400, "validation": 450}}
CT_METHODS = ["fbp", "sirt", "tv", "dds", "dps", "diffusionblend", "diffusionblend++", "padis", "padis3d",
              "resample", "latent_dps", "ddnm", "mcg", "dcdp", "dcdp_latent",
              "pnp_admm", "pnp_red", "diffusionmbir"]
# mcg, like dps, only on request (--mr-methods mcg): autograd through the network
MR_METHODS = ["zero_filled", "sense", "l1_wavelet", "dds", "padis", "resample", "latent_dps", "ddnm", "dcdp",
              "dcdp_latent", "pnp_admm", "pnp_red", "diffusionmbir"]
# ddrm: CT only (8-coil 64^2 SENSE is 65536 x 8192 real, far over ddrm's dense-SVD limit); tilted: MR only (the CT
# measurements record no noise std, and at I0 = 1e5 sigma* = sigma_y / ||A|| is below the schedule's smallest sigma)
CT_METHODS += ["ddrm"]
MR_METHODS += ["tilted"]
CT_METHODS += ["tpdm"]
MR_METHODS += ["tpdm"]
SMALL_DATA_METHODS = {"dds[1vol]": ("dds", "slice_1vol"), "padis[1vol]": ("padis", "patch_1vol")}
# PaDIS ablation rows (the paper's Table 2; docs/algorithms.md section 5.1): row -> (method, params over
# SAMPLER_PARAMS[method]). The noise-started samplers get the reference's sigma_max 10 and alpha = sigma^2;
# 2 inner steps x 20 levels (pc: 19 levels x predictor + corrector) keep the 40-evaluation budget. Not tuned.
PADIS_ABLATION: dict[str, tuple[str, dict[str, Any]]] = {
    "padis[average]": ("padis", {"mode": "average"}),
    "padis[tile]": ("padis", {"mode": "tile"}),
    "padis[langevin]": ("padis", {"sampler": "langevin", "sigma_max": 10.0, "langevin": 1.0}),
    "padis[pc]": ("padis", {"sampler": "pc", "sigma_max": 10.0, "inner": 1}),
    "padis[ddnm]": ("padis", {"sampler": "ddnm", "sigma_max": 10.0, "langevin": 1.0}),
}

# Which trained prior each method needs, per modality (None: classical, no prior).
PRIOR_OF = {
    "CT": {"dds": "slice", "dps": "slice", "diffusionblend": "slab", "diffusionblend++": "slab",
           "padis": "patch", "padis3d": "patch3d", "resample": "latent", "latent_dps": "latent",
           "dds[1vol]": "slice_1vol", "padis[1vol]": "patch_1vol",
           **{row: "patch" for row in PADIS_ABLATION}},
    "MR": {"dds": "mr_slice", "dps": "mr_slice", "padis": "mr_patch", "resample": "mr_latent",
           "latent_dps": "mr_latent",
           **{row: "mr_patch" for row in PADIS_ABLATION}},
}
# Several checkpoints, in the order the method's loader takes them (TPDM: the axial, then the coronal prior).
PRIOR_OF["CT"]["tpdm"] = ("slice", "slice_coronal")
PRIOR_OF["MR"]["tpdm"] = ("mr_slice", "mr_slice_coronal")
PRIOR_OF["CT"].update({"ddnm": "slice", "mcg": "slice"})
PRIOR_OF["MR"].update({"ddnm": "mr_slice", "mcg": "mr_slice"})
PRIOR_OF["CT"].update({"dcdp": "slice", "dcdp_latent": "latent"})
PRIOR_OF["MR"].update({"dcdp": "mr_slice", "dcdp_latent": "mr_latent"})
PRIOR_OF["CT"].update({"pnp_admm": "slice", "pnp_red": "slice"})
PRIOR_OF["MR"].update({"pnp_admm": "mr_slice", "pnp_red": "mr_slice"})
PRIOR_OF["CT"].update({"diffusionmbir": "slice"})
PRIOR_OF["MR"].update({"diffusionmbir": "mr_slice"})

# fbp_unet (FBPConvNet, supervised): one network per acquisition, so its prior is trained per CT setting, for that
# setting's measure.ct (prior names supervised_v8, supervised_v20, ...: prior_for). Measured (defaults, CPU, 240 s of
# training per setting): axial PSNR 8 views fbp 17.41 -> fbp_unet 21.24 dB, 20 views 22.08 -> 23.55 dB.
CT_METHODS.append("fbp_unet")
PRIOR_OF["CT"]["fbp_unet"] = "supervised"
PER_SETTING_PRIORS = {"supervised"}


def prior_for(modality: str, row: str, setting: float) -> str | tuple[str, ...] | None:
    """The prior a row needs in a setting: PRIOR_OF's, with the view count for per-acquisition priors."""
    name = PRIOR_OF[modality].get(row)
    return f"{name}_v{int(setting)}" if name in PER_SETTING_PRIORS else name

PRIOR_OF["CT"]["ddrm"] = "slice"
PRIOR_OF["MR"]["tilted"] = "mr_slice"

# Modest sampler settings for 2 CPU cores (the papers use 50-1000 steps; see each method's docstring).
SAMPLER_PARAMS: dict[str, dict[str, Any]] = {
    "dds": {"steps": 50},
    "dps": {"steps": 100},
    "diffusionblend": {"steps": 50},
    "diffusionblend++": {"steps": 50},
    # PaDIS: 40 network evaluations instead of the reference's 1000, so the chain starts at sigma 0.3 from the
    # FBP image and takes Landweber data steps (guidance: landweber; see medrecon/methods/padis.py). Measured
    # on 4 slices of a held-out volume, 8 views, 300-step patch prior: reference guidance (norm) 9-10 dB at
    # zeta 1-30 from sigma_max 10; 16.9 dB norm/zeta 3 and 16.6 dB landweber/zeta 1 from sigma_max 0.3.
    "padis": {"steps": 20, "inner": 2, "guidance": "landweber", "zeta": 1.0, "sigma_max": 0.3, "langevin": 0.2},
    "padis3d": {"steps": 20, "inner": 2, "guidance": "landweber", "zeta": 1.0, "sigma_max": 0.3,
                "langevin": 0.2},
    "resample": {"steps": 50, "dc_every": 5, "inter_steps": 2, "pixel_iters": 100, "latent_iters": 50,
                 "stall_window": 25},
    # Latent DPS: dps_scale is not scale-free (docs/algorithms.md section 6); scan on 8-view CT (4 slices, 20 steps):
    # 0-5 -> 7 dB (prior samples), 50 -> 9.1 dB, 500 -> 13.8 dB (residual MSE 0.24).
    "latent_dps": {"steps": 50, "dps_scale": 500.0},
    # DDNM: the reference's 100 steps and eta 0.85, no time travel (its configs); not tuned here.
    "ddnm": {"steps": 100},
    # MCG: 100 ancestral steps instead of 1000; zeta is in the operator's units (as DPS's) and not tuned here.
    "mcg": {"steps": 100, "zeta": 1.0},
    # DCDP: the reference's K = 10, T0 = 400 with 10-step DDIM purification (91 NFE) and 10 CG steps per round
    # (not tuned here). Spot check, 2 slices of a ct_chest phantom, 16 views, demo priors (PSNR, [-1000, 1000] HU):
    # fbp 22.8, dds-20 26.0; dcdp defaults 25.7, tweedie 26.5, t_start 200 26.4, dc_iter 5/20 25.4/25.8;
    # dcdp_latent 23.5 (the demo autoencoder's ceiling: nothing above ~270 HU).
    "dcdp": {"steps": 10, "t_start": 400, "ddim_steps": 10, "dc_iter": 10},
    "dcdp_latent": {"steps": 10, "t_start": 400, "ddim_steps": 10, "dc_iter": 10},
    # PnP: optimisers, 30 / 50 network evaluations (the registered defaults); see medrecon/methods/pnp.py
    "pnp_admm": {"iterations": 30},
    "pnp_red": {"iterations": 50},
}
# DiffusionMBIR: 100 predictor-corrector steps (200 NFE; the reference: 2000 steps, 4000 NFE, 1 CG step each).
# Measured on an 8 x 64 x 64 chest phantom, 20 views, demo prior data/priors/ct_slice.pt (PSNR): 1 CG step
# 21.3 dB at 100 steps, 23.8 at 300; 5 CG steps 27.7 at 100 steps (FBP 21.8, DDS z-TV 50 steps 24.8).
SAMPLER_PARAMS["diffusionmbir"] = {"steps": 100, "cg_iter": 5}
# DDRM: the reference's 20 steps; sigma_y is the post-log Poisson std 1 / sqrt(I0 exp(-p)) at I0 = 1e5 for line
# integrals p ~ 1-3 (0.005-0.014; the CT measurement records no std). Not yet run on this benchmark.
SAMPLER_PARAMS["ddrm"] = {"steps": 20, "sigma_y": 0.005}
# Tilted transport: sigma* is small at 30 dB, so ULA needs many tiny steps; a reference run, not a tuned one.
SAMPLER_PARAMS["tilted"] = {"ula_steps": 200}
# TPDM: K = 2, every other step the coronal prior, data consistency on axial steps only (the reference's rule).
# Measured (8-view CT, 200-step priors, 2 training volumes, 1 held-out volume; PSNR axial/coronal dB, slice
# consistency ratio SCr, residual): dds 18.59/18.18, SCr 2.00, 0.0021; tpdm 18.31/18.00, SCr 1.81, 0.0074 (the
# last of 50 steps is a coronal one without a data step); aux_dc: true 18.69/18.39, SCr 1.80, 0.0022; K 3
# 18.63/18.28, SCr 1.83, 0.0024. MR R=4 (same budget, 8 coils): dds 16.22/16.39, SCr 0.87, 0.028; tpdm 15.36/15.43,
# SCr 0.95, 0.036; aux_dc: true 15.86/16.06, SCr 0.90, 0.028. One held-out volume, one seed: differences of a few
# tenths of a dB are within what another volume or seed moves.
SAMPLER_PARAMS["tpdm"] = {"steps": 50}
# SCD / padis_ood: self-supervised LoRA adaptation to each measurement (medrecon/methods/scd.py, padis_ood.py); about
# 5-8x DDS's cost at the reference settings, so a shorter grid here (adaptation at every 5th step + the last 4,
# 6 Adam steps each). Not tuned; the OOD comparison (prior of another anatomy) is the issue 17 table.
CT_METHODS += ["scd", "padis_ood"]
MR_METHODS += ["scd", "padis_ood"]
PRIOR_OF["CT"].update({"scd": "slice", "padis_ood": "patch"})
PRIOR_OF["MR"].update({"scd": "mr_slice", "padis_ood": "mr_patch"})
SAMPLER_PARAMS["scd"] = {"steps": 50, "adapt_iters": 6, "skip": 5}
SAMPLER_PARAMS["padis_ood"] = {"steps": 50, "adapt_iters": 6, "skip": 5}

# PaDIS patch geometry for 64 x 64 slices: 8 pixels of padding, 16 and 32 pixel patches.
PATCH_2D = {"pad_width": 8, "patch_sizes": [16, 32], "patch_probs": [0.5, 0.5]}
PATCH_3D = {**PATCH_2D, "depth": 3}


# ---------------------------------------------------------------------------------------------- helpers
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _names(prior: str | tuple[str, ...]) -> tuple[str, ...]:
    """The prior names of a PRIOR_OF entry (one, or a tuple for methods taking several checkpoints)."""
    return prior if isinstance(prior, tuple) else (prior,)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def study_config(modality: str, setting: float, device: str) -> dict[str, Any]:
    """The validated medrecon config of one measurement setting (CT views or MR acceleration)."""
    from medrecon.config import validate

    if modality == "CT":
        measure = {"seed": 1, "ct": {"beam": "parallel", "views": int(setting), "arc_deg": 180, "I0": 1e5}}
    else:
        measure = {"seed": 1, "mr": {"operator": "sense2d", "coils": 8, "acceleration": float(setting),
                                     "acs_lines": 6, "snr_db": 30.0}}
    return validate({"measure": measure, "reconstruct": {"seed": 2, "device": device},
                     "evaluate": {"ct_window": [-1000, 1000], "mask": "body"}}, "benchmarks/quality.py")


def setting_name(modality: str, setting: float) -> str:
    return f"CT {int(setting)} views" if modality == "CT" else f"MR R={setting:g}"


# ---------------------------------------------------------------------------------------------- data
def make_volumes(work: Path, modality: str, n_train: int, n_eval: int, split: str = "eval"
                 ) -> dict[str, list[Path]]:
    """Training and held-out phantom volumes (cached: a volume that exists is not rewritten); ``split`` picks the
    held-out seeds: ``eval`` (the report set) or ``validation`` (for choosing settings, never reported)."""
    from medrecon.io.phantoms import write_phantom_volume

    kind, spacing = ("ct_chest", CT_SPACING) if modality == "CT" else ("mr_brain", MR_SPACING)
    out: dict[str, list[Path]] = {"train": [], "eval": []}
    for role, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            seed = SEEDS[modality][split if role == "eval" else role] + i
            path = work / "volumes" / f"{kind}_s{seed}.zarr"
            if not path.exists():
                write_phantom_volume(kind, path, SHAPE, spacing, seed)
            out[role].append(path)
    return out


def train_configs(steps: int, device: str) -> dict[str, dict[str, Any]]:
    """Training config of every prior the benchmark can need; all share the step budget and batch size."""
    # EMA horizon of a tenth of the budget: TRAIN_DEFAULTS' 0.999 averages over ~1000 steps, so after a few
    # hundred steps the served EMA weights are still mostly the random initialisation (measured: at 150 steps
    # the EMA slice prior did not denoise at all while the raw weights cut the error 3x at sigma 0.5).
    ema = min(0.999, 1.0 - 10.0 / steps)
    base = {"steps": steps, "batch_size": 8, "lr": 2e-4, "warmup_steps": min(100, max(1, steps // 5)),
            "checkpoint_every": max(1, min(250, steps // 2)), "seed": 0, "device": device, "image_size": 64,
            "ema_decay": max(0.0, ema)}
    return {
        "slice": {**base, "kind": "slice", "modality": "CT"},
        "slab": {**base, "kind": "slab", "modality": "CT"},
        "patch": {**base, "kind": "patch", "loss": "edm", "modality": "CT", "patch": PATCH_2D},
        "patch3d": {**base, "kind": "patch", "loss": "edm", "modality": "CT", "patch": PATCH_3D},
        "autoencoder": {**{k: v for k, v in base.items()}, "kind": "autoencoder", "modality": "CT", "lr": 1e-4},
        "latent": {**base, "kind": "latent", "modality": "CT"},
        "mr_slice": {**base, "kind": "slice", "modality": "MR", "network": {"in_channels": 2},
                     "random_phase": True},
        "mr_patch": {**base, "kind": "patch", "loss": "edm", "modality": "MR", "network": {"in_channels": 2},
                     "patch": {**PATCH_2D, "random_phase": True}},
        "mr_autoencoder": {**base, "kind": "autoencoder", "modality": "MR", "lr": 1e-4,
                           "network": {"in_channels": 2}, "random_phase": True},
        "mr_latent": {**base, "kind": "latent", "modality": "MR"},
        # FBPConvNet, narrower than the paper's 64..1024 for CPU; measure: per setting (training_config)
        "supervised": {**{k: v for k, v in base.items() if k != "image_size"}, "kind": "supervised",
                       "modality": "CT", "lr": 1e-3, "network": {"features": [16, 32, 64, 128, 256, 16]}},
        # TPDM's perpendicular priors: the slice priors' configs on the coronal planes of the same volumes
        "slice_coronal": {**base, "kind": "slice", "modality": "CT", "plane": "coronal"},
        "mr_slice_coronal": {**base, "kind": "slice", "modality": "MR", "network": {"in_channels": 2},
                             "random_phase": True, "plane": "coronal"},
    }


def training_config(cfgs: dict[str, dict[str, Any]], name: str, device: str) -> dict[str, Any]:
    """The training config of prior ``name``: train_configs' entry; a per-setting prior (``supervised_v8``) gets
    its setting's CT acquisition (the measure.ct the benchmark measures with)."""
    base, _, tag = name.rpartition("_v")
    if base in PER_SETTING_PRIORS and tag.isdigit():
        return {**cfgs[base], "measure": study_config("CT", int(tag), device)["measure"]["ct"]}
    return cfgs[name]


def train_priors(needed: set[str], work: Path, steps: int, device: str, vols: dict[str, dict[str, list[Path]]]
                 ) -> dict[str, dict[str, Any]]:
    """Train (or reuse) each needed prior; returns {name: {path, seconds, volumes, config}}."""
    from medrecon.diffusion.kinds import train_prior

    cfgs = train_configs(steps, device)
    done: dict[str, dict[str, Any]] = {}
    # Keyed per prior by its own training config: a changed config retrains that prior only, and adding a prior
    # kind to train_configs leaves the cached ones valid. The folder names the budget and the number of training
    # volumes (the data are not in the config): n3000_t4 is 3000 steps on 4 volumes.
    pdir = work / "priors" / f"n{steps}_t{len(vols['CT']['train'])}"
    pdir.mkdir(parents=True, exist_ok=True)
    for name in sorted(needed):
        base = name.removesuffix("_1vol")
        modality = "MR" if base.startswith("mr_") else "CT"
        train_vols = vols[modality]["train"][:1] if name.endswith("_1vol") else vols[modality]["train"]
        t0 = time.perf_counter()
        if base in ("latent", "mr_latent"):
            from medrecon.diffusion.latent import train_autoencoder_prior, train_latent_prior

            pre = base.removesuffix("latent")
            out = pdir / f"{base}_{_digest([cfgs[pre + 'autoencoder'], cfgs[pre + 'latent']])}"
            out.mkdir(exist_ok=True)
            ae, lat = out / "autoencoder.pt", out / "latent.pt"
            cached = ae.exists() and lat.exists()
            if not ae.exists():
                _log(f"training autoencoder ({steps} steps) on {len(train_vols)} volumes")
                train_autoencoder_prior(cfgs[pre + "autoencoder"], train_vols, ae)
            if not lat.exists():
                _log(f"training latent prior ({steps} steps)")
                train_latent_prior(cfgs[pre + "latent"], train_vols, ae, lat)
            cfg = {"autoencoder": cfgs[pre + "autoencoder"], "latent": cfgs[pre + "latent"]}
            out = [ae, lat]  # reconstruct takes the two checkpoints in this order
        else:
            cfg = training_config(cfgs, base, device)
            out = pdir / f"{name}_{_digest(cfg)}.pt"
            cached = out.exists()
            if not cached:
                _log(f"training prior {name} ({steps} steps) on {len(train_vols)} volume(s)")
                train_prior(copy.deepcopy(cfg), train_vols, out)
        seconds = time.perf_counter() - t0
        path = [str(p) for p in out] if isinstance(out, list) else str(out)
        done[name] = {"path": path, "seconds": None if cached else seconds, "cached": cached,
                      "volumes": [str(v) for v in train_vols], "config": cfg}
        _log(f"prior {name}: {'cached' if cached else f'{seconds:.0f} s'}")
    return done


def measure_all(work: Path, modality: str, setting: float, evals: list[Path], device: str) -> list[Path]:
    """One measurement store per held-out volume (cached)."""
    from medrecon.measure import measure

    cfg = study_config(modality, setting, device)
    outs = []
    for vol in evals:
        out = work / "measurements" / f"{vol.stem}_{_tag(modality, setting)}.zarr"
        if not out.exists():
            measure(vol, out, cfg, device="cpu")
        outs.append(out)
    return outs


def _tag(modality: str, setting: float) -> str:
    return f"v{int(setting)}" if modality == "CT" else f"R{setting:g}"


# ---------------------------------------------------------------------------------------------- reconstruct
def worker(job_path: Path) -> None:
    """Subprocess entry: reconstruct each item of a job file with medrecon.reconstruct.reconstruct."""
    import shutil

    import torch

    from medrecon import reconstruct as rec

    torch.set_num_threads(1)
    job = json.loads(job_path.read_text())
    for item in job["items"]:
        out = Path(item["out"])
        if out.exists():
            shutil.rmtree(out)
        rec.reconstruct(item["measurement"], out, item["method"], job["config"], item["prior"])


def run_method(work: Path, row: str, method: str, modality: str, setting: float, meas: list[Path],
               prior: str | list[str] | None, params: dict[str, Any], device: str,
               timeout: float) -> list[dict[str, Any]]:
    """Reconstruct and evaluate every held-out volume with one method; cached by (params, prior)."""
    from medrecon.evaluate import evaluate

    cfg = study_config(modality, setting, device)
    cfg["reconstruct"]["params"] = {method: params}
    key = _digest({"params": params, "prior": prior, "method": method})
    # One folder per (row, params, prior): concurrent runs with different params never share a job file.
    rdir = work / "recon" / _tag(modality, setting) / row.replace("[", "_").replace("]", "") / key
    docs_path = rdir / "metrics.json"
    # Cached per held-out volume: a run with more --eval-volumes reconstructs only the volumes it adds.
    cached = {d["subject"]: d for d in json.loads(docs_path.read_text())} if docs_path.exists() else {}
    todo = [m for m in meas if m.stem not in cached]
    if not todo:
        return [cached[m.stem] for m in meas]
    rdir.mkdir(parents=True, exist_ok=True)
    items = [{"measurement": str(m), "out": str(rdir / f"{m.stem}.zarr"), "method": method, "prior": prior}
             for m in todo]
    job = rdir / "job.json"
    job.write_text(json.dumps({"config": cfg, "items": items}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = "timeout", f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    wall = time.perf_counter() - t0
    (rdir / "worker.log").write_text(str(err))
    if rc != 0:
        tail = str(err).strip().splitlines()[-6:]
        cmd = f"{sys.executable} benchmarks/quality.py --worker {job}"
        return [{"error": f"exit {rc}", "stderr_tail": tail, "command": cmd, "wall_s": wall}]
    for m, it in zip(todo, items, strict=True):
        d = evaluate(reference_of(m), it["out"], rdir / f"{m.stem}.json", cfg, m.stem, row)
        cached[m.stem] = {"subject": m.stem, "metrics": d["metrics"], "notes": d["notes"]}
    docs_path.write_text(json.dumps(list(cached.values())))
    return [cached[m.stem] for m in meas]


def reference_of(measurement: Path) -> str:
    """The reference volume a measurement was simulated from (recorded by measure)."""
    from medrecon.measurement import Measurement

    return str(Measurement.open(measurement).meta["reference_volume"])


# ---------------------------------------------------------------------------------------------- summary
COLUMNS = [  # (metric key, header, format)
    ("psnr_axial", "PSNR ax", "{:.2f}"), ("psnr_coronal", "cor", "{:.2f}"), ("psnr_sagittal", "sag", "{:.2f}"),
    ("ssim_axial", "SSIM ax", "{:.3f}"), ("ssim_coronal", "cor", "{:.3f}"), ("ssim_sagittal", "sag", "{:.3f}"),
    ("slice_consistency_ratio", "SCr", "{:.3f}"), ("data_residual", "resid", "{:.4f}"),
    ("runtime_s", "t/vol s", "{:.1f}"), ("nfe", "NFE", "{:.0f}"), ("peak_rss_mb", "RSS MB", "{:.0f}"),
]
SUMMARY_KEYS = [c[0] for c in COLUMNS] + ["psnr", "ssim", "slice_consistency", "nrmse"]


def summarise(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over volumes (peak RSS: the maximum, it is one process); errors passed through."""
    if docs and "error" in docs[0]:
        return {"error": docs[0]["error"], "stderr_tail": docs[0]["stderr_tail"], "command": docs[0]["command"]}
    out: dict[str, Any] = {"volumes": len(docs)}
    for k in SUMMARY_KEYS:
        vals = [d["metrics"][k] for d in docs if d["metrics"].get(k) is not None]
        if vals:
            out[k] = max(vals) if k == "peak_rss_mb" else statistics.median(vals)
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The printed table: one block per setting, one row per method."""
    lines = []
    width = max([len(r) for s in summary.values() for r in s] + [8])
    head = f"{'method':<{width}} " + " ".join(f"{h:>8}" for _, h, _ in COLUMNS)
    for setting, rows in summary.items():
        lines += ["", f"== {setting} (medians over held-out volumes)", head]
        for row, vals in rows.items():
            if "error" in vals:
                lines.append(f"{row:<{width}} FAILED: {vals['error']}: {(vals['stderr_tail'] or [''])[-1][:150]}")
                continue
            cells = [fmt.format(vals[k]) if vals.get(k) is not None else "-" for k, _, fmt in COLUMNS]
            lines.append(f"{row:<{width}} " + " ".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-steps", type=int, default=300, help="optimizer steps per network (default 300)")
    p.add_argument("--views", type=int, nargs="*", default=[8, 20], help="CT view counts (e.g. 8 16 20)")
    p.add_argument("--mr-accel", type=float, nargs="*", default=[4.0, 8.0], help="MR accelerations; none = no MR")
    p.add_argument("--methods", nargs="*", default=CT_METHODS, help="CT methods")
    p.add_argument("--mr-methods", nargs="*", default=MR_METHODS, help="MR methods")
    p.add_argument("--train-volumes", type=int, default=4)
    p.add_argument("--eval-volumes", type=int, default=2)
    p.add_argument("--split", choices=["report", "validation"], default="report",
                   help="held-out volumes: the report set (seeds 200/400 on) or the validation set (250/450 on), "
                        "on which sampler settings are chosen")
    p.add_argument("--small-data", action="store_true", help="also rows dds[1vol], padis[1vol]: priors on 1 volume")
    p.add_argument("--padis-ablation", action="store_true",
                   help="also the PaDIS ablation rows " + ", ".join(PADIS_ABLATION) + " (CT)")
    p.add_argument("--params", default="{}", help="JSON {method: {param: value}} over the sampler defaults")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, setting) subprocess")
    p.add_argument("--out", type=Path, default=HERE / "out" / "quality.json")
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "quality_work")
    p.add_argument("--gpu", action="store_true", help="train and reconstruct on CUDA")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_steps < 1 or args.train_volumes < 1 or args.eval_volumes < 1:
        p.error("--budget-steps, --train-volumes and --eval-volumes must be >= 1")
    try:
        args.params = json.loads(args.params)
    except json.JSONDecodeError as err:
        p.error(f"--params is not valid JSON ({err}); pass e.g. '{{\"dps\": {{\"zeta\": 0.5}}}}'")
    return args


def row_method(row: str) -> str:
    """The registered method behind a table row (ablation rows are parameter settings of one method)."""
    return PADIS_ABLATION[row][0] if row in PADIS_ABLATION else row


def row_params(row: str, method: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A row's sampler params: SAMPLER_PARAMS[method], then the row's ablation settings, then ``--params`` for
    the method, then for the row itself (e.g. ``{"padis[pc]": {"snr": 0.1}}``)."""
    extra = PADIS_ABLATION[row][1] if row in PADIS_ABLATION else {}
    return {**SAMPLER_PARAMS.get(method, {}), **extra, **overrides.get(method, {}),
            **(overrides.get(row, {}) if row != method else {})}


def check_methods(args: argparse.Namespace) -> None:
    """Unknown method names stop the run before any training (one clear message)."""
    from medrecon.errors import ConfigError
    from medrecon.recon.registry import load_all

    known = load_all()
    for name in [*args.methods, *args.mr_methods]:
        if name not in known and name not in PADIS_ABLATION:
            raise ConfigError(f"benchmarks/quality.py: unknown method {name!r}.",
                              fix=f"use some of: {', '.join([*sorted(known), *PADIS_ABLATION])}.")
    for name in args.mr_methods:
        if name in known and name not in PRIOR_OF["MR"] and name not in ("zero_filled", "sense", "l1_wavelet",
                                                                        "tv"):
            raise ConfigError(f"benchmarks/quality.py: no MR prior is trained for {name!r} here.",
                              fix=f"MR diffusion rows: {sorted(PRIOR_OF['MR'])}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    torch.set_num_threads(1)
    check_methods(args)
    device = "cuda" if args.gpu else "cpu"
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ct_rows = {m: row_method(m) for m in args.methods}
    if args.small_data:
        ct_rows.update({r: m for r, (m, _) in SMALL_DATA_METHODS.items()})
    if args.padis_ablation:
        ct_rows.update({r: m for r, (m, _) in PADIS_ABLATION.items()})
    mr_rows = {m: row_method(m) for m in args.mr_methods} if args.mr_accel else {}
    modalities = ["CT"] + (["MR"] if mr_rows else [])
    split = "eval" if args.split == "report" else "validation"
    vols = {mod: make_volumes(work, mod, args.train_volumes, args.eval_volumes, split) for mod in modalities}
    needed = {n for r in ct_rows for v in args.views if r in PRIOR_OF["CT"] for n in _names(prior_for("CT", r, v))}
    needed |= {n for r in mr_rows for a in args.mr_accel or [] if r in PRIOR_OF["MR"]
               for n in _names(prior_for("MR", r, a))}
    params = {r: row_params(r, m, args.params) for r, m in {**ct_rows, **mr_rows}.items()}
    result: dict[str, Any] = {
        "settings": {
            "budget_steps": args.budget_steps, "batch_size": 8, "views": args.views, "mr_accel": args.mr_accel,
            "train_volumes": args.train_volumes, "eval_volumes": args.eval_volumes, "split": args.split,
            "small_data": args.small_data,
            "shape": SHAPE, "ct_spacing_mm": CT_SPACING, "mr_spacing_mm": MR_SPACING, "seeds": SEEDS,
            "sampler_params": params, "device": device, "threads": 1, "machine": platform.machine(),
            "torch": torch.__version__, "ct_noise": "Poisson, I0 = 1e5", "mr": "sense2d, 8 coils, 30 dB, 6 ACS",
        },
        "training": {}, "summary": {}, "runs": {},
    }

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out)

    t_train = time.perf_counter()
    priors = train_priors(needed, work, args.budget_steps, device, vols)
    result["training"] = {"wall_s": time.perf_counter() - t_train, "priors": priors}
    save()
    plan = [("CT", v, ct_rows) for v in args.views] + [("MR", r, mr_rows) for r in (args.mr_accel or [])]
    for modality, setting, rows in plan:
        name = setting_name(modality, setting)
        meas = measure_all(work, modality, setting, vols[modality]["eval"], device)
        result["summary"][name], result["runs"][name] = {}, {}
        for row, method in rows.items():
            prior_name = prior_for(modality, row, setting)
            prior = [priors[n]["path"] for n in prior_name] if isinstance(prior_name, tuple) \
                else priors[prior_name]["path"] if prior_name else None
            _log(f"{name}: {row}")
            docs = run_method(work, row, method, modality, setting, meas, prior, params[row], device,
                              args.timeout)
            result["runs"][name][row] = docs
            result["summary"][name][row] = summarise(docs)
            if "error" in docs[0]:
                _log(f"  FAILED ({docs[0]['error']}): {docs[0]['stderr_tail'][-1:]}  command: {docs[0]['command']}")
            save()
    print(table(result["summary"]))
    print(f"\ntraining budget: {args.budget_steps} steps x batch 8 per network (ReSample: autoencoder and latent "
          f"UNet each); training wall {result['training']['wall_s']:.0f} s")
    print("sampler params: " + "; ".join(f"{m} {p}" for m, p in sorted(params.items()) if p))
    save()
    print(f"total wall {result['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
