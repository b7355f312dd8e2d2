"""Training kind ``supervised``: FBPConvNet's FBP -> reference regression for ONE CT geometry (``fbp_unet``).

Jin, McCann, Froustey, Unser, "Deep Convolutional Neural Network for Inverse Problems in Imaging", IEEE TIP
2017; reference code ``panakino/FBPConvNet`` (MatConvNet: ``main.m``, ``cnn_fbpconvnet.m`` @8fcff8a,
``cnn_unet_init.m`` @0a151fd). Our own summary: /work/shared/algorithms-wave2.md section 7, docs/algorithms.md.

What is trained. Pairs (FBP of a *simulated* measurement of a training slice, the slice itself) for the one
acquisition ``train.<name>.measure`` describes (the keys of the study's ``measure.ct``; the workflow passes the
study's own). Per training item (a pure function of its key ``(index, seed)``, so training stays resumable bit
for bit, :mod:`medrecon.diffusion.train`):

1. the reference slice (HU) is flipped at random (``flips``; before the simulation, so the pair stays a
   physical one), converted to linear attenuation with :func:`medrecon.physics.ct_geometry.hu_to_mu`;
2. projected by the very operator the measure step builds (:func:`medrecon.physics.ct.ct_operator` on
   :meth:`CTGeometry.from_config` of the same keys) and given the measure step's Poisson (+ electronic) noise
   (:func:`medrecon.physics.noise.ct_poisson_noise`, drawn from the item's generator);
3. reconstructed by medrecon's FBP (:func:`medrecon.recon.ct_fbp.fbp`, filter ``filter``: what ``fbp_unet``
   feeds the network at reconstruction time);
4. input and target go to the network domain by the checkpoint's CT-window affine (attenuation units,
   :func:`medrecon.diffusion.normalisation.prior_affine`), and are padded with the background (air) to sides
   that are multiples of 16 (:class:`medrecon.diffusion.canvas.Canvas`), so any slice size trains and runs.

The network (:class:`medrecon.diffusion.networks.FBPConvNet`, MONAI BasicUNet) learns the **residual**: the
loss is ``|x + net(x) - target|^2`` (FBPConvNet's ``getSimpleNNBatch`` subtracts the input from the label).
The loop is the one every prior uses (:func:`medrecon.diffusion.train.run_training`: step-keyed batches, EMA,
warm-up + cosine LR, gradient clipping, resume file, loss log).

The checkpoint (kind ``supervised``, objective ``supervised``, builder ``fbpconvnet``) records the geometry in
``train_config["geometry"]``: the full :class:`~medrecon.physics.ct_geometry.CTGeometry` (beam, angles,
detector, distances, image shape and spacing) plus ``I0``, ``electronic_std`` and ``mu_water``.
:func:`check_geometry` compares it with a problem's operator and measurement record: a network trained for one
geometry is refused on another with one :class:`~medrecon.errors.ConfigError` naming both. That is the whole
contrast with the diffusion priors, which are geometry-free.

Several pixel sizes, one acquisition. A study grid of fixed size over each patient's field of view (the real
study's ``grid: {size: 64}``) gives every patient its own pixel size, and with it its own detector spacing (the
default: one pixel) and noise per pixel. The dataset then simulates each training volume at its own geometry
(same views, beam, I0, mu_water), and the record adds ``spacing_range`` (and the ``measure`` it was built from).
A problem passes when its pixel size lies in that range and its geometry equals the recorded acquisition rebuilt
at that pixel size (so a detector that differs for another reason is still refused): the network has seen that
range of pixel sizes and noise levels, and is not trusted to extrapolate beyond it. (The line integral of a
ray scales with the pixel size, its Poisson noise does not: the noise per unit of image, and so the FBP's
streaks, differ per pixel size, and the network learns the training pixel sizes' mix of them.) The rule, in
:func:`_at_given_spacing`: the in-plane spacing inside ``spacing_range`` (1e-6 relative at the ends), then every
geometry key compared exactly with ``CTGeometry.from_config(measure, shape, that spacing)``: spacing-derived keys
(detector spacing, fan distances) are thus compared with what the problem's own pixel size implies, and the
acquisition keys with the trained ones. A record without ``spacing_range`` (one pixel size, the earlier form) is
compared exactly as it stands.

Departures from the reference, on purpose:

* AdamW (lr 1e-4, warm-up + cosine, EMA of the weights) instead of SGD with momentum 0.99 and a log-spaced lr
  from 1e-2 to 1e-3; gradient-norm clipping 1.0 instead of clipping each gradient at 1e-2; weight decay 0
  (reference 1e-4 per layer): the shared loop's optimiser, and a modern default (notes section 7.2).
* Steps, not 151 epochs of batch 1; the batch is ``batch_size`` slices.
* MONAI BasicUNet: 2 convolutions on the first level (reference: 3), 2x2 stride-2 transposed convolutions
  without BN/ReLU (reference: 3x3 with BN and ReLU); otherwise the same 5 levels, widths 64..1024, 3x3
  conv + BN + ReLU, max-pool, concatenated skips, 1x1 output convolution.
* Measurements are simulated on the fly from the training volumes (the reference trains on a fixed, released
  set of ellipse-phantom FBPs), so the noise is new at every visit of a slice.
* Neither input nor target is clipped to the CT window (the diffusion priors clip their training images):
  the reconstruction is scored on the full HU range, and the map stays affine (the linear-Gaussian test).
* Flips: both axes by default (the reference flips left-right and up-down).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrecon.config.options import fill_defaults
from medrecon.diffusion.canvas import Canvas
from medrecon.diffusion.checkpoint import load_checkpoint
from medrecon.diffusion.datasets import TrainingDataset, VolumeSlices, _flip
from medrecon.diffusion.kinds import register_kind
from medrecon.diffusion.networks import FBPConvNet, build_fbpconvnet, resolve_fbpconvnet_spec
from medrecon.diffusion.normalisation import background, default_normalisation, prior_affine, validate_normalisation
from medrecon.diffusion.train import TrainingTask, TrainResult, run_training
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import to_jsonable
from medrecon.volume import Volume

SUPERVISED_DEFAULTS: dict[str, Any] = {
    "kind": "supervised",
    "modality": "CT",           # CT only (FBP inputs)
    "measure": {},              # the CT acquisition to simulate: keys of the study's measure.ct (schema defaults)
    "filter": "ram-lak",        # FBP filter of the network input (the fbp method's filters)
    "network": {},              # overrides of networks.fbpconvnet_spec_defaults() (features: 6 widths)
    "loss": "l2",               # l2 (FBPConvNet) | l1
    "batch_size": 8,
    "steps": 2000,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "ema_decay": 0.999,
    "warmup_steps": 100,
    "grad_clip": 1.0,           # max gradient norm; 0 or null = no clipping
    "checkpoint_every": 250,
    "seed": 0,
    "normalisation": None,      # None = the CT window of normalisation.default_normalisation
    "device": "auto",
    "amp": False,               # bf16 autocast on CUDA; off: the output is a residual added to the FBP
    "flips": ["x", "y"],
    "cache_mb": 1024,
    "num_workers": 0,
    "save_raw": True,
}


def resolve_supervised_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and values checked (unknown keys are a ConfigError); ``measure`` completed from the
    schema's ``measure.ct`` defaults and checked against its types."""
    from medrecon.recon.ct_fbp import FILTERS

    c = fill_defaults(cfg, SUPERVISED_DEFAULTS, what="supervised training option",
                      where="the study's train.<name> section (kind: supervised)")
    checks = [
        (c["kind"] == "supervised", "kind must be 'supervised'"),
        (c["modality"] == "CT", "modality must be CT (fbp_unet learns from FBPs of CT measurements)"),
        (c["loss"] in ("l2", "l1"), "loss must be 'l2' or 'l1'"),
        (c["filter"] in FILTERS, f"filter must be one of {list(FILTERS)}"),
        (int(c["batch_size"]) >= 1 and int(c["steps"]) >= 1, "batch_size and steps must be >= 1"),
        (float(c["lr"]) > 0 and float(c["weight_decay"]) >= 0, "lr must be > 0 and weight_decay >= 0"),
        (0 <= float(c["ema_decay"]) < 1, "ema_decay must be in [0, 1)"),
        (int(c["warmup_steps"]) >= 0 and int(c["checkpoint_every"]) >= 1,
         "warmup_steps must be >= 0 and checkpoint_every >= 1"),
        (c["device"] in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        (isinstance(c["network"], dict) and isinstance(c["measure"], dict), "network/measure must be mappings"),
        (set(c["flips"]) <= {"x", "y"}, "flips must be a subset of [x, y]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"supervised training config: {msg}", fix="correct it in the config's train section")
    for k in ("batch_size", "steps", "warmup_steps", "checkpoint_every", "seed", "num_workers", "cache_mb"):
        c[k] = int(c[k])
    for k in ("lr", "weight_decay", "ema_decay"):
        c[k] = float(c[k])
    c["grad_clip"] = float(c["grad_clip"] or 0.0)
    c["flips"] = list(c["flips"])
    c["measure"] = resolve_measure(c["measure"])
    c["network"] = resolve_fbpconvnet_spec(c["network"])
    return to_jsonable(c)


def resolve_measure(measure: dict[str, Any] | None) -> dict[str, Any]:
    """``train.<name>.measure`` completed and checked exactly as the study's ``measure.ct`` (the schema's
    types and defaults); cone beam is refused (FBPConvNet is per slice)."""
    from medrecon import config as cfgmod

    try:
        ct = cfgmod.validate({"measure": {"ct": dict(measure or {})}}, "train.<name>.measure")["measure"]["ct"]
    except ConfigError as err:
        raise ConfigError(f"train.<name>.measure (the CT acquisition a supervised prior simulates): {err.message}",
                          fix="give the keys of measure.ct (beam, views, arc_deg, I0, ...)") from err
    if ct["beam"] == "cone":
        raise ConfigError("a supervised (FBP-UNet) prior is trained per slice: parallel or fan beam, not cone",
                          fix="set train.<name>.measure.beam to parallel or fan")
    return ct


# ---------------------------------------------------------------------------------------------- geometry


def geometry_record(geometry: Any, measure: dict[str, Any]) -> dict[str, Any]:
    """What a supervised checkpoint records of its acquisition: the CT geometry, the noise and mu_water."""
    return to_jsonable({"ct": geometry.to_dict(), "I0": None if measure.get("I0") is None else float(measure["I0"]),
                        "electronic_std": float(measure.get("electronic_std") or 0.0),
                        "mu_water": float(measure["mu_water"])})


def problem_geometry(problem: Any) -> dict[str, Any]:
    """The acquisition of a reconstruction problem, as :func:`geometry_record` writes it: the operator's CT
    geometry, and the noise and mu_water its measurement recorded (``problem.meta``; measure step). A problem
    without a noise record (built by hand, not from a measurement store) has ``noise_known: False``."""
    geom = getattr(problem.operator, "geometry", None)
    if geom is None or not hasattr(geom, "to_dict") or getattr(geom, "beam", None) not in ("parallel", "fan"):
        raise InputError(f"fbp_unet needs a per-slice (parallel or fan beam) CT operator, got "
                         f"{type(problem.operator).__name__}", fix="use fbp_unet on parallel/fan-beam CT data")
    meta = problem.meta or {}
    noise = meta.get("noise") or {}
    units = meta.get("operator_units") or {}
    return to_jsonable({"ct": geom.to_dict(),
                        "I0": noise.get("I0") if noise.get("model") == "ct_poisson" else None,
                        "electronic_std": float(noise.get("electronic_std") or 0.0),
                        "mu_water": units.get("mu_water"), "noise_known": "noise" in meta})


def describe_geometry(rec: dict[str, Any]) -> str:
    """One line naming an acquisition (error messages)."""
    g = rec["ct"]
    ang = np.degrees(np.asarray(g["angles"], dtype=np.float64))
    dist = "" if g["beam"] == "parallel" else \
        f", source {g['source_distance']:.4g} mm, detector {g['detector_distance']:.4g} mm"
    i0 = "noise not recorded" if rec.get("noise_known") is False else \
        "noiseless" if rec.get("I0") is None else f"I0 {rec['I0']:.4g}"
    return (f"{g['beam']} beam, {len(ang)} views {ang.min():.4g}..{ang.max():.4g} deg, {g['detector_count']} bins "
            f"x {g['detector_spacing']:.4g} mm{dist}, image {'x'.join(map(str, g['shape']))} px x "
            f"{g['spacing'][-1]:.4g} mm, {i0}, mu_water {rec.get('mu_water')}")


def geometry_differences(trained: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """What differs between two records, ``"key (trained vs given)"`` (floats to 1e-6 relative; views for angle
    lists of another length; the noise only where the problem records it, mu_water only where known)."""

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is None and b is None
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
        return a == b

    def label(key: str, a: Any, b: Any) -> str:
        if key == "angles":
            return f"views ({len(a or [])} vs {len(b or [])})" if len(a or []) != len(b or []) else "angles"
        return f"{key} ({a} vs {b})"

    t, g = trained["ct"], given["ct"]
    out = [label(k, t.get(k), g.get(k)) for k in sorted(set(t) | set(g)) if not same(t.get(k), g.get(k))]
    if given.get("noise_known", True):
        out += [label(k, trained.get(k), given.get(k)) for k in ("I0", "electronic_std")
                if not same(trained.get(k), given.get(k))]
    if given.get("mu_water") is not None and not same(trained.get("mu_water"), given["mu_water"]):
        out.append(label("mu_water", trained.get("mu_water"), given["mu_water"]))
    return out


def check_geometry(trained: dict[str, Any], problem: Any, checkpoint: str = "the supervised prior") -> None:
    """Refuse a problem whose acquisition is not the one the network was trained for (one ConfigError naming
    both and the fix)."""
    given = problem_geometry(problem)
    trained = _at_given_spacing(trained, given, checkpoint)
    diff = geometry_differences(trained, given)
    if diff:
        views = len(given["ct"]["angles"])
        raise ConfigError(
            f"fbp_unet: {checkpoint} was trained for [{describe_geometry(trained)}] but this measurement is "
            f"[{describe_geometry(given)}] (they differ in {', '.join(diff)}); an FBP-UNet only works for the "
            "acquisition it was trained on",
            fix=f"retrain it with train.<name>.measure set to this study's measure.ct (e.g. views: {views}, beam: "
                f"{given['ct']['beam']}, I0: {given['I0']}), or point reconstruct.priors at one trained for it")


def _in_plane(spacing: Sequence[float]) -> tuple[float, float]:
    """The in-plane (dy, dx) of a spacing, rounded to 1e-6 mm (what makes two pixel sizes the same)."""
    return tuple(round(float(s), 6) for s in tuple(spacing)[-2:])


def _at_given_spacing(trained: dict[str, Any], given: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """A record trained over several pixel sizes (``spacing_range``), as the acquisition would be at the
    problem's pixel size: that size must lie in the trained range, and every key derived from it (detector
    spacing, fan distances) is then rebuilt from the recorded acquisition, so the comparison stays exact."""
    if "spacing_range" not in trained:
        return trained
    from medrecon.physics.ct_geometry import CTGeometry

    lo, hi = trained["spacing_range"]
    sp = [float(s) for s in given["ct"]["spacing"][-2:]]
    inside = all(a * (1 - 1e-6) <= s <= b * (1 + 1e-6) for a, s, b in zip(lo, sp, hi, strict=True))
    if not inside:
        raise ConfigError(
            f"fbp_unet: {checkpoint} was trained for pixel sizes {lo[-1]:.4g}..{hi[-1]:.4g} mm but this "
            f"measurement's pixels are {sp[-1]:.4g} mm; an FBP-UNet is not trusted outside the pixel sizes (and so "
            "the noise levels per pixel) it was trained on",
            fix="retrain it including volumes of this pixel size (their subjects with role 'train'), or put this "
                "study on a grid whose pixel size lies in the trained range")
    shape = tuple(int(n) for n in trained["ct"]["shape"])
    geom = CTGeometry.from_config(trained["measure"], (1, *shape), (1.0, *sp))
    return {**trained, "ct": to_jsonable(geom.to_dict())}


# ---------------------------------------------------------------------------------------------- dataset


class SupervisedSliceDataset(TrainingDataset):
    """Pairs (FBP of a simulated noisy measurement, reference) of the slices of training volumes, in the network
    domain on a background-padded canvas: items ``{"x": (1, H', W') FBP, "target": (1, H', W') reference}``."""

    kind = "supervised"

    def __init__(self, source: VolumeSlices, measure: dict[str, Any], normalisation: dict[str, Any],
                 filter: str = "ram-lak", flips: Sequence[str] = ("x", "y"), multiple: int = 16) -> None:
        from medrecon.physics.ct_geometry import CTGeometry

        vols = source.volumes
        shapes = {tuple(v.shape[1:]) for v in vols}
        if len(shapes) != 1:
            raise InputError(f"supervised training volumes must share one in-plane shape, got {sorted(shapes)}",
                             path=vols[0].path, fix="train on volumes of one grid (`medrecon resample`)")
        self.source, self.measure = source, dict(measure)
        # One acquisition, simulated for each volume at its own pixel size (a study grid of fixed size over each
        # patient's field of view gives every patient its own); the record keeps the range (check_geometry).
        self._geoms = [CTGeometry.from_config(self.measure, tuple(v.shape), tuple(v.geometry.spacing)) for v in vols]
        self.spacings = sorted({_in_plane(g.spacing) for g in self._geoms})
        self.geometry = self._geoms[0]
        self.norm = validate_normalisation(normalisation, "CT")
        self.scale, self.offset = prior_affine(self.norm, "attenuation", float(self.measure["mu_water"]))
        self.filter, self.flips = filter, tuple(flips)
        h, w = self.geometry.shape
        self.canvas = Canvas(h, w, multiple=multiple, value=background(self.norm))
        self.image_size = max(self.canvas.shape)
        self._op: dict[tuple[float, float], Any] = {}    # per pixel size, built on first use (per worker)

    def operator(self, volume: int = 0) -> Any:
        """The measure step's operator for volume ``volume``'s geometry (one per pixel size, built on first use,
        so workers build their own)."""
        from medrecon.physics.ct import ct_operator

        key = _in_plane(self._geoms[volume].spacing)
        if key not in self._op:
            self._op[key] = ct_operator(self._geoms[volume])
        return self._op[key]

    def record(self) -> dict[str, Any]:
        rec = geometry_record(self.geometry, self.measure)
        if len(self.spacings) > 1:
            rec["spacing_range"] = [list(self.spacings[0]), list(self.spacings[-1])]
            rec["spacings"] = [list(sp) for sp in self.spacings]
            rec["measure"] = to_jsonable(dict(self.measure))
        return rec

    def __len__(self) -> int:
        return len(self.source)

    def pair(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(FBP, reference) of slice ``index`` in attenuation (1/mm), (H, W) float32; randomness from ``rng``."""
        from medrecon.physics.ct_geometry import hu_to_mu
        from medrecon.physics.noise import ct_poisson_noise
        from medrecon.recon.ct_fbp import fbp

        vi, z = self.source.index[index]
        hu = _flip(np.asarray(self.source.read(vi, z), dtype=np.float32), self.flips, rng)
        mu = torch.from_numpy(np.ascontiguousarray(hu_to_mu(hu, float(self.measure["mu_water"]))))
        op = self.operator(vi)
        with torch.no_grad():
            p = op.forward(mu[None])
            if self.measure["I0"]:
                p = ct_poisson_noise(p, float(self.measure["I0"]), float(self.measure["electronic_std"]),
                                     generator=rng).line_integrals
            x = fbp(op, p, self.filter)[0]
        return x.float(), mu.float()

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        x, mu = self.pair(index, rng)
        return {"x": self.canvas.pad(self.scale * x + self.offset)[None].contiguous(),
                "target": self.canvas.pad(self.scale * mu + self.offset)[None].contiguous()}

    def provenance(self) -> list[dict[str, Any]]:
        return self.source.provenance()


# ---------------------------------------------------------------------------------------------- training


def supervised_loss(net: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor],
                    loss: str = "l2") -> torch.Tensor:
    """Residual regression: mean of ``|x + net(x) - target|^2`` (or ``|.|`` for l1) over the batch."""
    x = batch["x"]
    d = (x + net(x)).float() - batch["target"].float()
    return (d * d).mean() if loss == "l2" else d.abs().mean()


def supervised_task(cfg: dict[str, Any], build: Callable[[], torch.nn.Module],
                    network: dict[str, Any]) -> TrainingTask:
    """The :class:`TrainingTask` of a supervised network (``build``; ``network`` is its checkpoint record)."""
    return TrainingTask(name="supervised FBP-UNet", build=build,
                        loss=lambda net, batch, gen: supervised_loss(net, batch, cfg["loss"]),
                        checkpoint={"kind": "supervised", "objective": "supervised", "network": network,
                                    "schedule": None, "sigma_data": None})


def train_supervised(cfg: dict[str, Any], dataset: SupervisedSliceDataset, out: str | Path, *,
                     normalisation: dict[str, Any], resume: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train an FBPConvNet on ``dataset`` and write the checkpoint ``out`` (the loop of
    :func:`medrecon.diffusion.train.run_training`); the geometry goes into ``train_config["geometry"]``, so a
    resumed run with another geometry is refused."""
    c = {**resolve_supervised_config({k: v for k, v in cfg.items() if k != "geometry"}),
         "geometry": dataset.record()}
    spec = c["network"]
    task = supervised_task(c, lambda: build_fbpconvnet(spec), {"builder": "fbpconvnet", "spec": spec})
    return run_training(task, c, dataset, out, modality="CT", normalisation=normalisation, resume=resume,
                        stop_at=stop_at)


def build_supervised_dataset(c: dict[str, Any], volumes: Sequence[str | Path | Volume]
                             ) -> tuple[SupervisedSliceDataset, dict[str, Any]]:
    """The dataset of a resolved supervised config on volume stores, with its normalisation."""
    vols = [v if isinstance(v, Volume) else Volume.open(v) for v in volumes]
    if not vols:
        raise ConfigError("no training volumes given", fix="give at least one CT subject with role 'train'")
    source = VolumeSlices(vols, "CT", cache_bytes=c["cache_mb"] << 20)
    norm = validate_normalisation(c["normalisation"] or default_normalisation("CT"), "CT")
    multiple = FBPConvNet.size_multiple
    return SupervisedSliceDataset(source, c["measure"], norm, c["filter"], c["flips"], multiple), norm


@register_kind("supervised", "FBP -> reference pairs simulated for one CT geometry (train.<name>.measure): "
                             "the FBPConvNet of fbp_unet")
def train_supervised_prior(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume], out: str | Path,
                           resume: bool = True) -> Path:
    """``medrecon train`` for ``kind: supervised``: an FBPConvNet for the acquisition ``cfg["measure"]`` on the
    slices of ``volumes``; returns the checkpoint path."""
    c = resolve_supervised_config(cfg)
    dataset, norm = build_supervised_dataset(c, volumes)
    return Path(train_supervised(c, dataset, out, normalisation=norm, resume=resume).checkpoint)


# ---------------------------------------------------------------------------------------------- inference


@dataclass
class SupervisedPrior:
    """A trained FBP-UNet ready for ``fbp_unet``: the network (eval mode), the affine between the operator's
    image and the network domain (``x_net = scale * x + offset``), the background, the FBP filter and the
    acquisition it was trained for."""

    network: torch.nn.Module
    scale: float
    offset: float
    background: float
    geometry: dict[str, Any]
    filter: str = "ram-lak"
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, fbp_image: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """``fbp_image`` (..., H, W) in image units -> FBP + UNet(FBP), same shape and units."""
        lead, (h, w) = fbp_image.shape[:-2], fbp_image.shape[-2:]
        mult = int(getattr(self.network, "size_multiple", 1))
        canvas = Canvas(h, w, multiple=mult, value=self.background)
        dev = next(self.network.parameters()).device
        x = canvas.pad((self.scale * fbp_image.reshape(-1, 1, h, w) + self.offset).to(dev, torch.float32))
        per = x.shape[0] if not batch else max(1, int(batch))
        out = torch.cat([x[i:i + per] + self.network(x[i:i + per]) for i in range(0, x.shape[0], per)])
        img = (canvas.crop(out) - self.offset) / self.scale
        return img.reshape(*lead, h, w).to(fbp_image.device, fbp_image.dtype)


def supervised_from_checkpoint(path: str | Path, device: torch.device | str = "cpu", *,
                               image_units: str = "native", mu_water: float | None = None,
                               expect_modality: str | None = None, expect_normalisation: dict[str, Any] | None = None,
                               ema: bool = True) -> SupervisedPrior:
    """The :class:`SupervisedPrior` of a ``supervised`` checkpoint (EMA weights by default), for images in
    ``image_units`` (``"attenuation"`` with the measurement's ``mu_water``, as the reconstruct step loads it)."""
    lp = load_checkpoint(path, expect_modality=expect_modality, expect_kind="supervised",
                         expect_normalisation=expect_normalisation, device=device, ema=ema)
    geometry = lp.train_config.get("geometry")
    if not isinstance(geometry, dict) or "ct" not in geometry:
        raise InputError(f"supervised checkpoint {lp.path} records no acquisition geometry.", path=lp.path,
                         fix="re-train it with medrecon.diffusion.supervised (kind: supervised)")
    scale, offset = prior_affine(lp.normalisation, image_units, mu_water)
    meta = {"checkpoint": str(lp.path), "hash": lp.hash, "kind": lp.kind, "modality": lp.modality,
            "normalisation": lp.normalisation, "step": lp.step, "ema": ema, "image_units": image_units}
    return SupervisedPrior(network=lp.network, scale=scale, offset=offset, background=background(lp.normalisation),
                           geometry=geometry, filter=str(lp.train_config.get("filter", "ram-lak")), meta=meta)
