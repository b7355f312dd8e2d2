"""Latent diffusion pieces for ReSample: the autoencoder (training objective, latent scale), the latent
dataset and prior, encode/decode wrappers, and the stochastic-resampling step of Proposition 2.

Two checkpoints make a latent prior (both ordinary medrecon prior checkpoints, hashed and checked on load):

``kind "autoencoder"``
    MONAI ``AutoencoderKL`` (2D, per slice; 1 channel for CT, 2 = real/imag for complex MR), trained by
    :func:`train_autoencoder` on reconstruction (L1 or L2) + ``kl_weight`` x KL(q(z|x) || N(0, I)) - the
    objective of Rombach et al.'s KL-f autoencoders without their perceptual and adversarial terms (the
    perceptual loss needs pretrained weights, which medrecon never downloads; the GAN term is off).
    After training, the *latent scale factor* ``1 / std`` of the encoder means over the training images is
    computed and stored in the checkpoint's ``train_config["latent_scale"]``, so the diffusion model sees
    latents of unit variance (Rombach et al., ``scale_factor``). The loop is the diffusion priors' own
    (:func:`medrecon.diffusion.train.run_training`: step-keyed batches, warm-up + cosine LR, EMA, gradient
    clipping, resume file, CSV loss log); only the network, the loss and the scale factor are the autoencoder's.
``kind "latent"``
    An epsilon-prediction ``DiffusionModelUNet`` on the scaled latents, trained by the engine's
    :func:`~medrecon.diffusion.train.train` on a :class:`LatentDataset`. Its data provenance starts with
    ``{"role": "autoencoder", "path", "sha256": <autoencoder checkpoint hash>}``: :func:`load_latent_prior`
    refuses an autoencoder whose hash differs (the latents would mean something else).

Encoding uses the encoder *mean* (deterministic), both for the scale factor and at sampling time;
ReSample's first stage is a VQ model whose encoding is deterministic too.

Stochastic resampling (Song et al., ICLR 2024, Proposition 2): given the data-consistent estimate
``z0_hat`` and the sampler's current ``z'_t``, draw ``z_t ~ N(m, v I)`` with
``m = (s2 sqrt(ab) z0_hat + (1 - ab) z'_t) / (s2 + 1 - ab)``, ``v = s2 (1 - ab) / (s2 + 1 - ab)`` and, as
in the reference code, ``s2 = gamma (1 - ab_t') / (1 - ab_t) (1 - ab_t / ab_t')`` (gamma = 1 is DDPM's
posterior variance between the grid points t > t'; ``ab = ab_t'``). ``gamma -> inf`` gives Proposition 1's
stochastic encoding ``N(sqrt(ab) z0_hat, (1 - ab) I)`` (data end); ``gamma -> 0`` keeps ``z'_t`` (prior end).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medrecon.config.options import fill_defaults
from medrecon.device import pick_device
from medrecon.diffusion.checkpoint import load_checkpoint
from medrecon.diffusion.datasets import TrainingDataset, build_slice_dataset
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.kinds import register_kind
from medrecon.diffusion.networks import build_autoencoder, resolve_autoencoder_spec
from medrecon.diffusion.normalisation import prior_affine, validate_normalisation
from medrecon.diffusion.schedules import VPSchedule
from medrecon.diffusion.train import (
    TrainingTask,
    TrainResult,
    _seed,
    resolve_train_config,
    run_training,
    train,
)
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import to_jsonable
from medrecon.volume import Volume

_F64 = torch.float64

# ---------------------------------------------------------------------------------------------- resampling


def randn_like_gen(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``: float64 draws on the generator's device, then cast."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(like.shape, generator=generator, dtype=_F64, device=dev).to(like)


def resampling_moments(z0: torch.Tensor, z_prime: torch.Tensor, ab_t: float | torch.Tensor,
                       ab_next: float | torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (scalar) variance of Proposition 2's Gaussian for the step t -> t' (``ab_next`` = ab_t')."""
    ab_t, ab_next = float(ab_t), float(ab_next)
    if not 0 < ab_t < ab_next <= 1:
        raise ValueError(f"resampling needs 0 < ab_t < ab_next <= 1, got {ab_t}, {ab_next}")
    if gamma < 0:
        raise ConfigError(f"resample: gamma must be >= 0, got {gamma}", fix="the reference uses gamma: 40")
    s2 = gamma * (1 - ab_next) / (1 - ab_t) * (1 - ab_t / ab_next)
    denom = s2 + 1 - ab_next
    if denom <= 0:   # ab_next = 1: the last step, where there is nothing left to resample
        return z0.clone(), torch.zeros((), dtype=_F64)
    mean = (s2 * math.sqrt(ab_next) * z0 + (1 - ab_next) * z_prime) / denom
    return mean, torch.tensor(s2 * (1 - ab_next) / denom, dtype=_F64)


def stochastic_resample(z0: torch.Tensor, z_prime: torch.Tensor, ab_t: float | torch.Tensor,
                        ab_next: float | torch.Tensor, gamma: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from Proposition 2 (noise drawn in float64 on ``generator``'s device, then cast)."""
    mean, var = resampling_moments(z0, z_prime, ab_t, ab_next, gamma)
    noise = randn_like_gen(mean, generator)
    return mean + float(var.sqrt()) * noise


# ---------------------------------------------------------------------------------------------- codec


@dataclass
class LatentCodec:
    """Encode/decode between prior-domain pixels (B, C, H, W) and *scaled* latents (B, Cz, H/f, W/f).

    ``encode(x) = scale_factor * encode_fn(x)`` and ``decode(z) = decode_fn(z / scale_factor)``: the
    diffusion model only ever sees scaled latents. Any pair of callables works (tests use exact linear
    codecs); :meth:`from_autoencoder` wraps a MONAI AutoencoderKL (encoder mean).
    """

    encode_fn: Callable[[torch.Tensor], torch.Tensor]
    decode_fn: Callable[[torch.Tensor], torch.Tensor]
    latent_channels: int
    factor: int = 1
    scale_factor: float = 1.0

    @classmethod
    def from_autoencoder(cls, ae: torch.nn.Module, spec: dict[str, Any], scale_factor: float) -> LatentCodec:
        """The codec of a trained AutoencoderKL; its parameters are frozen (samplers differentiate w.r.t. z)."""
        s = resolve_autoencoder_spec(spec)
        ae.eval().requires_grad_(False)
        return cls(lambda x: ae.encode(x)[0], ae.decode, int(s["latent_channels"]),
                   2 ** (len(s["channels"]) - 1), float(scale_factor))

    @classmethod
    def identity(cls, channels: int = 1) -> LatentCodec:
        """Latent = pixels (for exact tests against analytic priors)."""
        return cls(lambda x: x, lambda z: z, channels)

    @classmethod
    def space_to_depth(cls, channels: int = 1, factor: int = 2) -> LatentCodec:
        """An exact orthogonal codec (a pixel permutation): f x f blocks become channels."""
        return cls(lambda x: F.pixel_unshuffle(x, factor), lambda z: F.pixel_shuffle(z, factor),
                   channels * factor * factor, factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.latent_shape(*x.shape[-2:])   # a clear error instead of the autoencoder's own
        return self.encode_fn(x) * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_fn(z / self.scale_factor)

    def latent_shape(self, height: int, width: int, path: Path | str | None = None) -> tuple[int, int, int]:
        """(Cz, h, w) for an image of ``height x width``; sizes the autoencoder cannot halve are an InputError."""
        f = self.factor
        if height % f or width % f:
            raise InputError(f"slices of {height}x{width} pixels cannot be encoded by an autoencoder that "
                             f"downsamples by {f}", path=path,
                             fix=f"pad the slices to multiples of {f} with the background first (the samplers "
                                 "do: medrecon.methods.sampling.SliceLayout with multiple=factor)")
        return self.latent_channels, height // f, width // f


# ---------------------------------------------------------------------------------------------- autoencoder training

AE_TRAIN_DEFAULTS: dict[str, Any] = {
    "kind": "autoencoder",
    "modality": None,           # CT | MR; None = from the training volumes
    "image_size": None,         # training resolution (square); None = the grid's size (64 off a grid)
    "network": {},              # overrides of networks.autoencoder_spec_defaults()
    "recon_loss": "l1",         # l1 | l2
    "kl_weight": 1e-6,          # weight of KL(q(z|x) || N(0, I)) (LDM KL-f autoencoders: 1e-6)
    "batch_size": 8,
    "steps": 2000,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "ema_decay": 0.999,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "checkpoint_every": 250,
    "seed": 0,
    "normalisation": None,
    "device": "auto",
    "fit": "pad",
    "flips": ["x"],
    "random_phase": False,
    "cache_mb": 1024,
    "num_workers": 0,
    "scale_items": 512,         # training images used to estimate the latent std (evenly spaced)
    "save_raw": True,           # False: only the EMA weights in the checkpoint (shipped priors)
}


def resolve_autoencoder_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and values checked; unknown keys are a ConfigError."""
    c = fill_defaults(cfg, AE_TRAIN_DEFAULTS, what="autoencoder training option",
                      where="the study's train.<name> section (kind: autoencoder)")
    checks = [
        (c["kind"] == "autoencoder", "kind must be 'autoencoder'"),
        (c["recon_loss"] in ("l1", "l2"), "recon_loss must be 'l1' or 'l2'"),
        (float(c["kl_weight"]) >= 0, "kl_weight must be >= 0"),
        (int(c["batch_size"]) >= 1 and int(c["steps"]) >= 1, "batch_size and steps must be >= 1"),
        (float(c["lr"]) > 0 and float(c["weight_decay"]) >= 0, "lr must be > 0, weight_decay >= 0"),
        (0 <= float(c["ema_decay"]) < 1, "ema_decay must be in [0, 1)"),
        (int(c["checkpoint_every"]) >= 1 and int(c["scale_items"]) >= 1, "checkpoint_every, scale_items >= 1"),
        (c["modality"] in (None, "CT", "MR"), "modality must be CT, MR or null"),
        (isinstance(c["network"], dict), "network must be a mapping"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"autoencoder training config: {msg}", fix="correct it in the config's train section")
    for k in ("batch_size", "steps", "warmup_steps", "checkpoint_every", "seed", "num_workers", "cache_mb",
              "scale_items"):
        c[k] = int(c[k])
    c["image_size"] = None if c["image_size"] is None else int(c["image_size"])
    for k in ("kl_weight", "lr", "weight_decay", "ema_decay"):
        c[k] = float(c[k])
    c["grad_clip"] = float(c["grad_clip"] or 0.0)
    return to_jsonable(c)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.reshape(kl.shape[0], -1).sum(1).mean()


def autoencoder_loss(ae: torch.nn.Module, x: torch.Tensor, cfg: dict[str, Any],
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, KL) for one batch; the reparameterisation noise comes from ``generator``."""
    z_mu, z_sigma = ae.encode(x)
    eps = torch.randn(z_mu.shape, generator=generator).to(z_mu)
    recon = ae.decode(z_mu + z_sigma * eps)
    rec = (recon.float() - x).abs().mean() if cfg["recon_loss"] == "l1" else ((recon.float() - x) ** 2).mean()
    kl = kl_divergence(z_mu.float(), z_sigma.float())
    return rec + cfg["kl_weight"] * kl, rec, kl


@torch.no_grad()
def latent_scale_factor(ae: torch.nn.Module, dataset: TrainingDataset, max_items: int = 512,
                        device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """``1 / std`` of the encoder means over up to ``max_items`` evenly spaced training items.

    Items are drawn with the fixed key ``(index, index)``, so the estimate is reproducible; the
    augmentation they carry (flips, phase) does not change a standard deviation beyond its sampling error.
    """
    idx = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(len(dataset), max_items))})
    sq, total, count = 0.0, 0.0, 0
    for j in range(0, len(idx), batch_size):
        x = torch.stack([dataset[(i, i)]["x"] for i in idx[j:j + batch_size]]).to(device)
        z = ae.encode(x)[0].double()
        sq, total, count = sq + float((z**2).sum()), total + float(z.sum()), count + z.numel()
    var = sq / count - (total / count) ** 2
    if not math.isfinite(var) or var <= 0:
        raise ConfigError(f"the autoencoder's latents have variance {var}; cannot scale them",
                          fix="train the autoencoder longer or with a smaller kl_weight")
    return 1.0 / math.sqrt(var)


@torch.no_grad()
def roundtrip_psnr(ae: torch.nn.Module, dataset: TrainingDataset, max_items: int = 512,
                   device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """PSNR (dB, peak = the items' value range) of decode(encode mean) over evenly spaced training items.

    A latent sampler's output is a decoded latent, so this is the best it can do on images like these: the
    ceiling ReSample and latent DPS report next to their own PSNR (issue 14: ReSample sat at 19.0 dB against
    an 18.7 dB round trip).
    """
    idx = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(len(dataset), max_items))})
    se, count, lo, hi = 0.0, 0, math.inf, -math.inf
    for j in range(0, len(idx), batch_size):
        x = torch.stack([dataset[(i, i)]["x"] for i in idx[j:j + batch_size]]).to(device)
        rec = ae.decode(ae.encode(x)[0]).double()
        se, count = se + float(((rec - x.double()) ** 2).sum()), count + x.numel()
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return 10.0 * math.log10((hi - lo) ** 2 / max(se / count, 1e-20))


def train_autoencoder(cfg: dict[str, Any], dataset: TrainingDataset, out: str | Path, *, modality: str,
                      normalisation: dict[str, Any], resume: bool = True, stop_at: int | None = None,
                      data: list[dict[str, Any]] | None = None) -> TrainResult:
    """Train an AutoencoderKL on ``dataset`` (items in the network domain) and write checkpoint ``out``.

    The loop is :func:`medrecon.diffusion.train.run_training` (``<out>.resume.pt`` every ``checkpoint_every``
    steps, ``<out>.loss.csv``, bit-for-bit resume, ``stop_at`` behaves like a kill). The checkpoint stores
    the EMA weights and ``train_config["latent_scale"]`` computed with them.
    """
    cfg = resolve_autoencoder_config(cfg)
    spec = resolve_autoencoder_spec({**cfg["network"], "image_size": dataset.image_size,
                                     "in_channels": dataset.channels, "out_channels": dataset.channels})

    def finish(ema: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        ema.eval()
        psnr = roundtrip_psnr(ema, dataset, cfg["scale_items"], device)
        print(f"autoencoder round trip on {min(len(dataset), cfg['scale_items'])} training images: {psnr:.2f} dB "
              "(the ceiling of latent samplers on such images)", flush=True)
        return {"latent_scale": latent_scale_factor(ema, dataset, cfg["scale_items"], device),
                "roundtrip_psnr_db": psnr}

    task = TrainingTask(
        name="autoencoder", build=lambda: build_autoencoder(spec),
        loss=lambda ae, batch, gen: autoencoder_loss(ae, batch["x"], cfg, gen)[0],
        checkpoint={"kind": "autoencoder", "objective": "autoencoder",
                    "network": {"builder": "autoencoder", "spec": spec}, "schedule": None, "sigma_data": None},
        finish=finish)
    return run_training(task, cfg, dataset, out, modality=modality, normalisation=normalisation, resume=resume,
                        stop_at=stop_at, data=data)


def _slice_dataset(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], channels: int):
    """The engine's slice dataset (normalised, fitted, flipped) for an autoencoder/latent config."""
    slice_cfg = resolve_train_config({k: cfg[k] for k in ("modality", "image_size", "normalisation", "fit",
                                                          "flips", "random_phase", "cache_mb")}
                                     | {"kind": "slice", "network": {"in_channels": channels}})
    return build_slice_dataset(slice_cfg, volumes)


@register_kind("autoencoder", "KL autoencoder of slices (the latent space of ReSample and latent DPS)")
def train_autoencoder_prior(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], out: str | Path,
                            resume: bool = True) -> Path:
    """``medrecon train`` for ``kind: autoencoder``: slices of ``volumes`` -> autoencoder checkpoint ``out``."""
    c = resolve_autoencoder_config(cfg)
    channels = int(c["network"].get("in_channels", 1))
    dataset, modality, norm = _slice_dataset(c, volumes, channels)
    return train_autoencoder(c, dataset, out, modality=modality, normalisation=norm, resume=resume).checkpoint


# ---------------------------------------------------------------------------------------------- latent prior


def load_codec(path: str | Path, device: torch.device | str = "cpu", expect_modality: str | None = None):
    """(LoadedPrior, LatentCodec) of an autoencoder checkpoint (EMA weights, stored latent scale)."""
    lp = load_checkpoint(path, expect_modality=expect_modality, expect_kind="autoencoder", device=device)
    scale = lp.train_config.get("latent_scale")
    if not isinstance(scale, float) or not scale > 0:
        raise InputError(f"autoencoder checkpoint {lp.path} has no latent scale factor.", path=lp.path,
                         fix="re-train it with medrecon.diffusion.latent.train_autoencoder")
    return lp, LatentCodec.from_autoencoder(lp.network, lp.spec, scale)


class LatentDataset(TrainingDataset):
    """Scaled latents of a pixel dataset's items: ``views`` augmented draws per item, encoded once.

    Encoding every image once (the usual latent-diffusion practice) keeps the autoencoder out of the
    training loop; augmentation happens in pixel space, so each item keeps ``views`` encoded views
    (flips / random phase as the pixel dataset draws them) and a training key picks one.
    """

    kind = "latent"
    network_kind = "slice"     # the UNet defaults to use (train.network_spec)

    def __init__(self, pixels: TrainingDataset, codec: LatentCodec, autoencoder: dict[str, Any], views: int = 2,
                 seed: int = 0, batch_size: int = 32, device: torch.device | str = "cpu") -> None:
        if views < 1:
            raise ConfigError(f"latent views must be >= 1, got {views}", fix="use 1 or 2")
        n = len(pixels)
        keys = [(i, _seed(seed, 7, i * views + v)) for i in range(n) for v in range(views)]
        with torch.no_grad():
            chunks = []
            for j in range(0, len(keys), batch_size):
                x = torch.stack([pixels[k]["x"] for k in keys[j:j + batch_size]]).to(device)
                chunks.append(codec.encode(x).float().cpu())
        z = torch.cat(chunks)
        self.latents = z.reshape(n, views, *z.shape[1:])
        self.views, self.channels, self.image_size = views, int(z.shape[1]), int(z.shape[-1])
        self.pixels, self.autoencoder = pixels, dict(autoencoder)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {"x": self.latents[index, int(rng.integers(self.views))].clone()}

    def provenance(self) -> list[dict[str, Any]]:
        return [{"role": "autoencoder", **self.autoencoder}, *self.pixels.provenance()]


def train_latent_prior(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume] | TrainingDataset,
                       autoencoder: str | Path, out: str | Path, resume: bool = True, views: int = 2,
                       modality: str | None = None, normalisation: dict[str, Any] | None = None) -> TrainResult:
    """``medrecon train`` for ``kind: latent``: a VP epsilon UNet on the autoencoder's scaled latents.

    ``volumes`` are training volume stores (sliced like the autoencoder's data, same normalisation), or a
    ready pixel dataset (then ``modality`` and ``normalisation`` are needed). ``cfg`` is an ordinary
    training config (:data:`medrecon.diffusion.train.TRAIN_DEFAULTS`) with ``kind: latent``; its
    ``image_size`` is ignored (the latent side is the autoencoder's).
    """
    c = resolve_train_config({**cfg, "kind": "latent"})
    if c["loss"] != "epsilon":
        raise ConfigError(f"a latent prior is trained with loss 'epsilon' (ReSample samples by DDIM), got "
                          f"{c['loss']!r}", fix="set train.loss: epsilon for kind latent")
    device = pick_device(c["device"], "train.device")
    lp, codec = load_codec(autoencoder, device)
    if isinstance(volumes, TrainingDataset):
        if modality is None or normalisation is None:
            raise ConfigError("train_latent_prior on a dataset needs modality and normalisation",
                              fix="pass the values the autoencoder was trained with")
        pixels = volumes
    else:
        ae_cfg = {**lp.train_config, "modality": c["modality"] or lp.modality,
                  "normalisation": lp.normalisation, "cache_mb": c["cache_mb"]}
        pixels, modality, normalisation = _slice_dataset(ae_cfg, volumes, int(lp.spec["in_channels"]))
    if modality != lp.modality:
        raise InputError(f"the autoencoder {lp.path} was trained on {lp.modality}, the latent prior's data is "
                         f"{modality}", path=lp.path, fix="train one autoencoder per modality")
    if validate_normalisation(normalisation, modality) != lp.normalisation:
        raise InputError(f"the latent prior's normalisation {normalisation} differs from the autoencoder's "
                         f"{lp.normalisation} ({lp.path})", path=lp.path,
                         fix="train both with the same normalisation")
    data = LatentDataset(pixels, codec, {"path": str(lp.path), "sha256": lp.hash}, views=views, seed=c["seed"],
                         device=device)
    c["image_size"] = data.image_size
    return train(c, data, out, modality=modality, normalisation=lp.normalisation, resume=resume)


@register_kind("latent", "diffusion prior on an autoencoder's latents (train.<name>.autoencoder): ReSample")
def train_latent_kind(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], out: str | Path,
                      resume: bool = True) -> Path:
    """``medrecon train`` for ``kind: latent``: :func:`train_latent_prior` on the autoencoder checkpoint named
    in ``cfg["autoencoder"]``."""
    if not cfg.get("autoencoder"):
        raise ConfigError("a latent prior needs the autoencoder checkpoint it is trained on",
                          fix="set train.<name>.autoencoder to the name of the autoencoder prior")
    rest = {k: v for k, v in cfg.items() if k != "autoencoder"}
    return Path(train_latent_prior(rest, volumes, cfg["autoencoder"], out, resume=resume).checkpoint)


@dataclass
class LatentPrior:
    """What latent samplers need: a VE-form denoiser on scaled latents, its VP schedule, the codec, and the
    affine map between the operator's image domain and the autoencoder's pixels (as in :class:`Prior`)."""

    denoiser: Callable[..., torch.Tensor]
    schedule: VPSchedule
    codec: LatentCodec
    scale: float = 1.0
    offset: float = 0.0
    channels: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def pixel_prior(self) -> Prior:
        """A :class:`Prior` carrying only the pixel affine and channels (image <-> autoencoder pixels)."""
        return Prior(denoiser=self.codec.decode, scale=self.scale, offset=self.offset, channels=self.channels,
                     schedule=self.schedule, meta=self.meta)


def load_latent_prior(autoencoder: str | Path, latent: str | Path, device: torch.device | str = "cpu", *,
                      image_units: str = "native", mu_water: float | None = None,
                      expect_modality: str | None = None, expect_normalisation: dict[str, Any] | None = None,
                      ema: bool = True) -> LatentPrior:
    """The :class:`LatentPrior` of an autoencoder checkpoint and the latent checkpoint trained on it.

    The latent checkpoint's recorded autoencoder hash must equal ``autoencoder``'s content hash.
    """
    ae_lp, codec = load_codec(autoencoder, device, expect_modality)
    lp = load_checkpoint(latent, expect_modality=expect_modality, expect_kind="latent",
                         expect_normalisation=expect_normalisation, device=device, ema=ema)
    rec = next((d for d in lp.data if d.get("role") == "autoencoder"), None)
    if rec is None or rec.get("sha256") != ae_lp.hash:
        got = None if rec is None else f"{rec.get('path')} (hash {str(rec.get('sha256'))[:16]}...)"
        raise InputError(f"latent prior {lp.path} was trained on autoencoder {got}, not on {ae_lp.path} "
                         f"(hash {ae_lp.hash[:16]}...).", path=lp.path,
                         fix="point the config at the autoencoder the latent prior was trained with, or "
                             "re-train the latent prior on this autoencoder")
    if lp.normalisation != ae_lp.normalisation:
        raise InputError(f"latent prior {lp.path} and autoencoder {ae_lp.path} use different normalisations.",
                         path=lp.path, fix="re-train the latent prior on this autoencoder")
    if lp.objective != "epsilon" or not isinstance(lp.schedule, VPSchedule):
        raise InputError(f"latent prior {lp.path} is not an epsilon/VP prior (objective {lp.objective!r}).",
                         path=lp.path, fix="train it with train.loss: epsilon")
    scale, offset = prior_affine(ae_lp.normalisation, image_units, mu_water)
    meta = {"checkpoint": str(lp.path), "hash": lp.hash, "autoencoder": str(ae_lp.path),
            "autoencoder_hash": ae_lp.hash, "kind": "latent", "modality": lp.modality,
            "normalisation": lp.normalisation, "latent_scale": codec.scale_factor, "image_units": image_units,
            "step": lp.step, "ema": ema,
            # the autoencoder's round-trip PSNR on its training images: the latent samplers' ceiling (None for
            # autoencoders trained before it was recorded)
            "autoencoder_roundtrip_psnr_db": ae_lp.train_config.get("roundtrip_psnr_db")}
    return LatentPrior(denoiser=EpsilonDenoiser(lp.network, lp.schedule), schedule=lp.schedule, codec=codec,
                       scale=scale, offset=offset, channels=int(ae_lp.spec["in_channels"]), meta=meta)
