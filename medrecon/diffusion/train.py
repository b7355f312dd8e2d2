"""Training a diffusion prior: DDPM epsilon prediction (VP schedule) or EDM denoising, resumable bit for bit.

:func:`train` trains a diffusion prior on any :class:`~medrecon.diffusion.datasets.TrainingDataset` (tests
use in-memory toy images). Both it and ReSample's autoencoder (:func:`medrecon.diffusion.latent.train_autoencoder`)
run the one loop :func:`run_training`; a :class:`TrainingTask` brings what differs (network, loss, checkpoint
fields). This module knows no prior kind but the plain slice prior it registers: each kind's module
(``slab_data``, ``patches``, ``latent``) registers its own training with :mod:`medrecon.diffusion.kinds`,
whose :func:`~medrecon.diffusion.kinds.train_prior` is what ``medrecon train`` calls.

Losses
    ``"epsilon"``: ``t ~ U{0..N-1}``, ``x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) n``, loss ``|net(x_t, t) - n|^2``
    (Ho et al. 2020; what DDS/DPS/DiffusionBlend priors are). ``"edm"``: ``ln sigma ~ N(p_mean, p_std^2)``,
    loss ``w(sigma) |D(x0 + sigma n, sigma) - x0|^2`` with ``w = (sigma^2 + sd^2) / (sigma sd)^2`` and ``D``
    the very :class:`~medrecon.diffusion.denoiser.EDMDenoiser` samplers use (Karras et al. 2022; PaDIS).
Optimisation
    AdamW, linear warm-up then cosine decay to 0 (``LambdaLR``), gradient-norm clipping, an EMA of the
    weights (``torch.optim.swa_utils.AveragedModel``; checkpoints serve the EMA by default), bf16 autocast
    on CUDA only when ``amp`` is set (CPU autocast is slower than float32 for these nets).
Determinism and resume
    Network initialisation uses ``seed``. Nothing else draws from a stateful stream: the batch of step
    ``s`` (an epoch-wise permutation of the items), its augmentation seeds and its noise / timesteps all
    come from generators seeded by ``(seed, s)`` (``numpy.random.SeedSequence``). Resuming therefore needs
    only the optimizer, LR-scheduler and EMA state (kept in the resume file, every ``checkpoint_every``
    steps), and a resumed run ends with the same weights, bit for bit on the same machine and thread count,
    as an uninterrupted one. The CSV loss log is truncated to the resumed step, so it never has gaps or
    duplicate steps. The global torch RNG state is saved and restored too, for modules that use it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from medrecon.config.options import fill_defaults
from medrecon.device import pick_device
from medrecon.diffusion.checkpoint import KINDS as CHECKPOINT_KINDS
from medrecon.diffusion.checkpoint import load_resume, resume_path, save_checkpoint, save_resume
from medrecon.diffusion.datasets import PLANES, TrainingDataset, build_slice_dataset
from medrecon.diffusion.denoiser import EDMDenoiser
from medrecon.diffusion.kinds import register_kind
from medrecon.diffusion.networks import build_unet, count_parameters, network_spec_defaults, resolve_unet_spec
from medrecon.diffusion.normalisation import validate_normalisation
from medrecon.diffusion.schedules import EDMSchedule, VPSchedule
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import provenance, to_jsonable
from medrecon.volume import Volume

TRAIN_DEFAULTS: dict[str, Any] = {
    "kind": "slice",            # prior kind: one registered in medrecon.diffusion.kinds (slice, slab, patch, ...)
    "modality": None,           # CT | MR; None = taken from the training volumes
    "image_size": None,         # training resolution (square); None = the grid's size (64 off a grid)
    "network": {},              # overrides of networks.network_spec_defaults(kind)
    "loss": "epsilon",          # epsilon (DDPM, VP schedule) | edm (Karras preconditioning)
    "schedule": {},             # VPSchedule or EDMSchedule keyword arguments
    "sigma_data": 0.5,          # EDM only
    "batch_size": 8,
    "steps": 2000,
    "lr": 2e-4,
    "weight_decay": 0.0,
    "ema_decay": 0.999,
    "warmup_steps": 100,
    "grad_clip": 1.0,           # max gradient norm; 0 or null = no clipping
    "checkpoint_every": 250,    # steps between resume-file writes
    "seed": 0,
    "normalisation": None,      # None = normalisation.default_normalisation(modality)
    "device": "auto",           # auto | cpu | cuda
    "amp": True,                # bf16 autocast, CUDA only
    "fit": "pad",               # pad | crop: how non-square slices become image_size x image_size
    "plane": "axial",           # slice kind: axial | coronal | sagittal planes (datasets.PLANES; TPDM's 2nd prior)
    "flips": ["x"],             # random flips: subset of [x, y]
    "random_phase": False,      # MR, 2 channels: false, true (constant) or smooth (datasets.training_phase)
    "cache_mb": 1024,           # memory for training slices (preload if all fit, else LRU of slabs)
    "num_workers": 0,           # DataLoader workers (0 on CPU)
    "save_raw": True,           # False: the checkpoint holds only the EMA weights (half the size; shipped priors)
}
# Keys that may change between a run and its resumption without breaking it (every task's config).
_RESUME_MAY_CHANGE = ("steps", "checkpoint_every", "device", "num_workers", "cache_mb", "amp", "save_raw")
LOG_COLUMNS = ("step", "loss", "lr", "seconds")
# Status lines when the progress bar is off (stderr not a terminal: Snakemake job logs): every this fraction of
# the run's steps and at least every STATUS_INTERVAL_S seconds (NVlabs/edm's training loop logs alike).
STATUS_FRACTION = 20
STATUS_INTERVAL_S = 60.0

logger = logging.getLogger(__name__)


def resolve_train_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and values checked; unknown keys are a ConfigError (typos must not pass silently)."""
    c = fill_defaults(cfg, TRAIN_DEFAULTS, what="training option", where="the study's train.<name> section")
    checks = [
        (c["loss"] in ("epsilon", "edm"), "loss must be 'epsilon' or 'edm'"),
        (c["kind"] in CHECKPOINT_KINDS, f"kind must be one of {list(CHECKPOINT_KINDS)}"),
        (int(c["batch_size"]) >= 1, "batch_size must be >= 1"),
        (int(c["steps"]) >= 1, "steps must be >= 1"),
        (float(c["lr"]) > 0, "lr must be > 0"),
        (float(c["weight_decay"]) >= 0, "weight_decay must be >= 0"),
        (0 <= float(c["ema_decay"]) < 1, "ema_decay must be in [0, 1)"),
        (int(c["warmup_steps"]) >= 0, "warmup_steps must be >= 0"),
        (int(c["checkpoint_every"]) >= 1, "checkpoint_every must be >= 1"),
        (c["device"] in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        (c["modality"] in (None, "CT", "MR"), "modality must be CT, MR or null"),
        (c["image_size"] is None or int(c["image_size"]) >= 4, "image_size must be >= 4 (or null)"),
        (float(c["sigma_data"]) > 0, "sigma_data must be > 0"),
        (isinstance(c["network"], dict) and isinstance(c["schedule"], dict), "network/schedule must be mappings"),
        (c["plane"] in PLANES, f"plane must be one of {list(PLANES)}"),
        (c["plane"] == "axial" or c["kind"] == "slice",
         "plane coronal/sagittal is for kind 'slice' only (the perpendicular prior of TPDM)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"training config: {msg}", fix="correct it in the config's train section")
    for k in ("batch_size", "steps", "warmup_steps", "checkpoint_every", "seed", "num_workers", "cache_mb"):
        c[k] = int(c[k])
    c["image_size"] = None if c["image_size"] is None else int(c["image_size"])
    for k in ("lr", "weight_decay", "ema_decay", "sigma_data"):
        c[k] = float(c[k])
    c["grad_clip"] = float(c["grad_clip"] or 0.0)
    c["flips"] = list(c["flips"])
    return to_jsonable(c)


def ema_model(net: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA of ``net``'s weights with warm-up: update ``n`` uses ``min(decay, (1 + n) / (10 + n))``.

    Without the warm-up an EMA of decay 0.999 still holds ``0.999**800 = 45 %`` of the random initial weights
    after 800 steps (measured: the demo prior's EMA denoised worse than its raw weights by 8x at sigma 5);
    with it, short CPU trainings give a usable average and long ones the usual one.
    """

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor | int) -> None:
        # called per (device, dtype) group; integer buffers (BatchNorm's num_batches_tracked, the supervised
        # FBPConvNet) are counters, not weights: copied, not averaged
        if ema_params and not ema_params[0].is_floating_point():
            torch._foreach_copy_(ema_params, params)
            return
        k = float(n)
        d = min(decay, (1.0 + k) / (10.0 + k))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def _seed(seed: int, stream: int, n: int) -> int:
    """Independent 63-bit seeds for (run seed, purpose, counter)."""
    return int(np.random.SeedSequence([int(seed), stream, int(n)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepBatchSampler(torch.utils.data.Sampler):
    """Keys ``(index, aug_seed)`` of the batches of steps ``start .. stop-1`` (a DataLoader batch_sampler).

    Items are visited epoch by epoch, each epoch a permutation seeded by ``(seed, epoch)``; position ``p``
    of that endless stream belongs to step ``p // batch_size``. Any step's batch is a pure function of
    (seed, step), so a resumed run sees exactly the batches the interrupted one would have.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.n, self.b, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(_seed(self.seed, 1, epoch)).permutation(self.n))
        return int(self._perm[1][p % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            ps = range(step * self.b, (step + 1) * self.b)
            yield [(self._index(p), _seed(self.seed, 2, p)) for p in ps]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def warmup_cosine(warmup: int, total: int):
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return factor


def diffusion_loss(net: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: dict[str, Any],
                   schedule: VPSchedule | EDMSchedule, generator: torch.Generator,
                   alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Mean training loss of one batch; all randomness from ``generator`` (CPU, so CPU and GPU draw alike)."""
    x0 = batch["x"]
    cond = {k: v for k, v in batch.items() if k != "x"}
    b, dev = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(dev)
    if cfg["loss"] == "epsilon":
        ab_all = schedule.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        t = torch.randint(0, len(ab_all), (b,), generator=generator)
        ab = ab_all[t].to(device=dev, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = net(x_t, t.to(dev), **cond)
        return torch.mean((pred.float() - noise) ** 2)
    sd = cfg["sigma_data"]
    sigma = schedule.training_sigmas(b, generator=generator).to(dev)
    d = EDMDenoiser(net, sigma_data=sd).denoise(x0 + sigma.to(x0.dtype).reshape(-1, 1, 1, 1) * noise, sigma, cond)
    w = ((sigma**2 + sd**2) / (sigma * sd) ** 2).to(torch.float32).reshape(-1, 1, 1, 1)
    return torch.mean(w * (d.float() - x0) ** 2)


class LossLog:
    """CSV loss log (step, loss, lr, seconds); on resume it is cut back to the resumed step."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        rows: list[list[str]] = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as f:
                r = csv.reader(f)
                next(r, None)
                rows = [row for row in r if row and int(row[0]) <= start_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LOG_COLUMNS)
            w.writerows(rows)
        os.replace(tmp, path)
        self.previous = [float(row[1]) for row in rows]
        self._f = open(path, "a", newline="")  # kept open for the whole run
        self._w = csv.writer(self._f)

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self._w.writerow([step, repr(loss), repr(lr), f"{seconds:.3f}"])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class StatusLog:
    """``"<name>: step s/S loss L (EMA E) lr X, Y s/step, ETA Z"`` lines to the module's logger, for runs whose
    progress bar is off: the first step, every ``max(1, S // STATUS_FRACTION)`` steps, at least every
    ``STATUS_INTERVAL_S`` seconds, and the last step. Only reads numbers the loop has anyway (no effect on
    the training's numbers)."""

    def __init__(self, name: str, start: int, stop: int, total: int, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.name, self.start, self.stop, self.total = name, start, stop, total
        self.every = max(1, total // STATUS_FRACTION)
        self.clock = clock
        self.t0 = self.last = clock()
        self.ema: float | None = None

    def update(self, step: int, loss: float, lr: float) -> None:
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        now = self.clock()
        if not (step == self.start + 1 or step == self.stop or step % self.every == 0
                or now - self.last >= STATUS_INTERVAL_S):
            return
        self.last = now
        per_step = (now - self.t0) / max(1, step - self.start)
        logger.info("%s: step %d/%d loss %.4g (EMA %.4g) lr %.3g, %.3g s/step, ETA %s", self.name, step, self.total,
                    loss, self.ema, lr, per_step, _duration(per_step * (self.total - step)))


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def loss_log_path(checkpoint: str | Path) -> Path:
    """The CSV loss log written next to a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".loss.csv")


def read_loss_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a loss log as dicts (step as int)."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    checkpoint: Path | None     # None when stopped early (stop_at), as after a kill
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)   # every step's loss, from step 1 (log included)
    seconds: float = 0.0
    parameters: int = 0


def _schedule(cfg: dict[str, Any]) -> VPSchedule | EDMSchedule:
    try:
        return VPSchedule(**cfg["schedule"]) if cfg["loss"] == "epsilon" else EDMSchedule(**cfg["schedule"])
    except TypeError as err:
        raise ConfigError(f"bad schedule options {cfg['schedule']} for loss {cfg['loss']!r} ({err})",
                          fix="VP: beta_start, beta_end, num_train_steps; EDM: sigma_min, sigma_max, rho, "
                              "p_mean, p_std") from err


def network_spec(cfg: dict[str, Any], dataset: TrainingDataset) -> dict[str, Any]:
    """The resolved UNet spec: kind defaults, then the dataset's shape, then the config's overrides.

    A dataset may name the UNet defaults it wants in ``network_kind`` (the latent prior of ReSample is a
    "slice" UNet on latents but is stored as kind "latent"); otherwise the prior kind picks them.
    """
    spec = network_spec_defaults(getattr(dataset, "network_kind", None) or cfg["kind"])
    spec.update(image_size=dataset.image_size, in_channels=dataset.channels, out_channels=dataset.channels,
                coord_channels=dataset.coord_channels, num_class_embeds=dataset.num_class_embeds)
    spec.update(cfg["network"])
    return resolve_unet_spec(spec)


def _check_resume(state: dict[str, Any], cfg: dict[str, Any], data: list[dict[str, Any]], path: Path,
                  name: str) -> None:
    # an option added to TRAIN_DEFAULTS after the interrupted run started has its default there
    added = {k: TRAIN_DEFAULTS[k] for k in cfg if k in TRAIN_DEFAULTS and k not in state["train_config"]}
    old = {k: v for k, v in {**added, **state["train_config"]}.items() if k not in _RESUME_MAY_CHANGE}
    new = {k: v for k, v in cfg.items() if k not in _RESUME_MAY_CHANGE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"the {name} training config differs from the interrupted run's in {diff} ({path})",
                          path=path, fix=f"restore those options, or delete {path} to start over")
    if [d.get("sha256") for d in state["data"]] != [d.get("sha256") for d in data]:
        raise InputError(f"the training data changed since the interrupted run ({path})", path=path,
                         fix=f"train on the same volumes, or delete {path} to start over")


@dataclass
class TrainingTask:
    """What differs between the networks :func:`run_training` trains (diffusion UNets, the autoencoder).

    Everything else - device, seeded initialisation, AdamW with warm-up + cosine, gradient clipping, EMA,
    step-keyed batches, resume file, loss log, progress bar, final checkpoint - is one loop, so a fix to
    resume or determinism reaches every kind of network at once.
    """

    name: str                                   # "slice prior", "autoencoder": progress bar and messages
    build: Callable[[], torch.nn.Module]        # the network; called under torch.manual_seed(cfg["seed"])
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Generator], torch.Tensor]  # batch mean
    checkpoint: dict[str, Any]                  # kind, objective, network, schedule, sigma_data of the checkpoint
    # train_config entries computed from the final EMA network (the autoencoder's latent_scale); not resumed
    finish: Callable[[torch.nn.Module, torch.device], dict[str, Any]] | None = None


def run_training(task: TrainingTask, cfg: dict[str, Any], dataset: TrainingDataset, out: str | Path, *,
                 modality: str, normalisation: dict[str, Any], resume: bool = True, stop_at: int | None = None,
                 data: list[dict[str, Any]] | None = None) -> TrainResult:
    """The training loop: ``task``'s network on ``dataset`` with the resolved config ``cfg``; writes ``out``.

    Also writes ``<out>.resume.pt`` every ``checkpoint_every`` steps and ``<out>.loss.csv``. ``resume``:
    continue from the resume file when there is one. ``stop_at``: stop after that step without writing the
    final checkpoint, exactly as if the job had been killed there (tests, time-sliced jobs). ``cfg`` needs
    the optimisation keys of :data:`TRAIN_DEFAULTS`; ``amp`` is optional (off when absent).
    """
    out = Path(out)
    rpath, lpath = resume_path(out), loss_log_path(out)
    device = pick_device(cfg["device"], "train.device")
    normalisation = validate_normalisation(normalisation, modality)
    data = dataset.provenance() if data is None else data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        net = task.build()
    net.to(device).train()
    ema = ema_model(net, cfg["ema_decay"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg["warmup_steps"], cfg["steps"]))
    start, elapsed = 0, 0.0
    if resume and rpath.is_file():
        state = load_resume(rpath)
        _check_resume(state, cfg, data, rpath, task.name)
        net.load_state_dict(state["weights"])
        ema.load_state_dict(state["ema_state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        if "rng_torch" in state:   # resume files of autoencoders written before the loop was shared lack it
            torch.set_rng_state(state["rng_torch"])
        start, elapsed = int(state["step"]), float(state["seconds"])
    elif rpath.exists():
        rpath.unlink()
    stop = cfg["steps"] if stop_at is None else min(int(stop_at), cfg["steps"])
    log = LossLog(lpath, start)
    losses = list(log.previous)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.get("amp") and device.type == "cuda" \
        else contextlib.nullcontext()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(len(dataset), cfg["batch_size"], cfg["seed"], start, stop),
        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    common = {**task.checkpoint, "modality": modality, "normalisation": normalisation, "data": data}

    def save_state(step: int) -> None:
        save_resume(rpath, {**common, "train_config": cfg, "step": step, "seconds": elapsed,
                            "weights": net.state_dict(), "ema_state": ema.state_dict(),
                            "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                            "rng_torch": torch.get_rng_state()})

    quiet_bar = not sys.stderr.isatty()
    bar = tqdm(total=stop, initial=start, desc=f"train {task.name}", disable=quiet_bar)
    status = StatusLog(task.name, start, stop, cfg["steps"]) if quiet_bar else None
    logger.info("training %s on %s: %d items, %d parameters, steps %d..%d of %d%s", task.name, device,
                len(dataset), count_parameters(net), start + 1, stop, cfg["steps"],
                f" (resumed from {rpath})" if start else "")
    step = start
    try:
        for keys_batch in loader:
            t0 = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in keys_batch.items()}
            gen = torch.Generator().manual_seed(_seed(cfg["seed"], 3, step))
            with amp:
                loss = task.loss(net, batch, gen)
            if not torch.isfinite(loss):
                raise ConfigError(f"{task.name} training loss became {loss.item()} at step {step + 1}",
                                  fix="lower train.lr or set train.grad_clip (e.g. 1.0)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            ema.update_parameters(net)
            step += 1
            elapsed += time.perf_counter() - t0
            value = float(loss.detach())
            losses.append(value)
            log.write(step, value, lr, elapsed)
            bar.update(1)
            if status is not None:
                status.update(step, value, lr)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg["checkpoint_every"] == 0 and step < cfg["steps"]:
                save_state(step)
    finally:
        bar.close()
        log.close()
    result = TrainResult(None, step, start, losses, elapsed, count_parameters(net))
    if step < cfg["steps"]:
        logger.info("training %s stopped at step %d of %d (resume file %s)", task.name, step, cfg["steps"], rpath)
        return result
    if start < step or not rpath.is_file():
        save_state(step)
    extra = task.finish(ema.module, device) if task.finish is not None else {}
    save_checkpoint(out, **common, train_config={**cfg, **extra}, step=step,
                    weights=net.state_dict() if cfg["save_raw"] else {}, ema_weights=ema.module.state_dict(),
                    provenance=provenance(cfg, seeds={"train": cfg["seed"]}, training_seconds=elapsed,
                                          parameters=result.parameters))
    result.checkpoint = out
    logger.info("training %s finished: %d steps, %.1f s, checkpoint %s", task.name, step, elapsed, out)
    return result


def train(cfg: dict[str, Any], dataset: TrainingDataset, out: str | Path, *, modality: str,
          normalisation: dict[str, Any], resume: bool = True, stop_at: int | None = None,
          data: list[dict[str, Any]] | None = None) -> TrainResult:
    """Train a diffusion prior on ``dataset`` and write the checkpoint ``out`` (:func:`run_training` does the
    loop: ``<out>.resume.pt``, ``<out>.loss.csv``, ``resume`` and ``stop_at`` as described there)."""
    cfg = resolve_train_config(cfg)
    schedule = _schedule(cfg)
    spec = network_spec(cfg, dataset)
    ab = schedule.alphas_cumprod if isinstance(schedule, VPSchedule) else None
    task = TrainingTask(
        name=f"{cfg['kind']} prior", build=lambda: build_unet(spec),
        loss=lambda net, batch, gen: diffusion_loss(net, batch, cfg, schedule, gen, ab),
        checkpoint={"kind": cfg["kind"], "objective": cfg["loss"], "network": {"builder": "unet", "spec": spec},
                    "schedule": schedule.to_dict(), "sigma_data": cfg["sigma_data"] if cfg["loss"] == "edm" else None})
    return run_training(task, cfg, dataset, out, modality=modality, normalisation=normalisation, resume=resume,
                        stop_at=stop_at, data=data)


@register_kind("slice", "whole slices (1 channel CT, 2 real/imag MR): the prior of DDS and DPS")
def train_slice_prior(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], out: str | Path,
                      resume: bool = True) -> Path:
    """``medrecon train`` for ``kind: slice``: a UNet on the slices of ``volumes``; returns the checkpoint."""
    c = resolve_train_config(cfg)
    dataset, modality, norm = build_slice_dataset(c, volumes)
    return train(c, dataset, out, modality=modality, normalisation=norm, resume=resume).checkpoint
