"""Prior checkpoints: one self-describing, hashed file per trained prior, and the resume file of a training run.

A checkpoint is ``torch.save`` of a dict holding only tensors and plain Python types, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load). Keys:

``format``         ``"medrecon-prior/1"``
``kind``           ``"slice" | "slab" | "patch" | "autoencoder" | "latent" | "supervised"``
``modality``       ``"CT" | "MR"``
``objective``      ``"epsilon"`` (DDPM noise prediction on the VP schedule) or ``"edm"`` (Karras
                   preconditioning; ``sigma_data`` then set) or ``"autoencoder"`` or ``"supervised"``
                   (FBP -> reference regression, :mod:`medrecon.diffusion.supervised`)
``network``        ``{"builder": "unet" | "autoencoder" | "fbpconvnet", "spec": <resolved constructor spec>}``
``schedule``       the schedule's ``to_dict()`` (None for an autoencoder and a supervised network)
``sigma_data``     EDM's sigma_data, or None
``normalisation``  the intensity normalisation dict (:mod:`medrecon.diffusion.normalisation`)
``train_config``   the resolved training configuration
``data``           training data provenance: ``[{"path", "shape", "sha256"}, ...]``
``step``           optimizer steps done
``weights``, ``ema_weights``   state dicts of the raw and the EMA network
``provenance``     versions, git commit, device, seeds (:func:`medrecon.provenance.provenance`)
``hash``           sha256 over the canonical serialisation of everything above (:func:`content_hash`)

Optimizer, LR-scheduler, EMA-averager and RNG state live in a *separate* resume file
(``<checkpoint>.resume.pt``, format ``"medrecon-resume/1"``, hashed the same way), so the checkpoint a
study publishes stays small and holds nothing but the model; the resume file is what a killed training
run restarts from. Both are written atomically (temporary sibling, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medrecon.diffusion.networks import build_autoencoder, build_fbpconvnet, build_unet
from medrecon.diffusion.normalisation import prior_affine, validate_normalisation
from medrecon.diffusion.schedules import EDMSchedule, VPSchedule, schedule_from_dict
from medrecon.errors import ConfigError, InputError

FORMAT = "medrecon-prior/1"
RESUME_FORMAT = "medrecon-resume/1"
# The kinds a checkpoint file may declare: exactly the registered training kinds (medrecon.diffusion.kinds;
# tests/recon/test_registry.py checks they agree). Kept here as data so reading a checkpoint imports no trainer.
KINDS = ("slice", "slab", "patch", "autoencoder", "latent", "supervised")
OBJECTIVES = ("epsilon", "edm", "autoencoder", "supervised")
REQUIRED = ("format", "kind", "modality", "objective", "network", "schedule", "sigma_data", "normalisation",
            "train_config", "data", "step", "weights", "ema_weights", "hash")


# ---------------------------------------------------------------------------------------------- hashing


def _feed(h: Any, obj: Any) -> None:
    """Canonical, type-tagged serialisation of tensors and plain Python values into a hash.

    Dict entries are sorted by key; tuples and lists hash alike (pickling may turn one into the other);
    tensors contribute dtype, shape and raw bytes; floats their exact IEEE-754 bits.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(b"L" + struct.pack("<q", len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(b"B" + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(b"S" + struct.pack("<q", len(b)) + b)
    elif isinstance(obj, torch.dtype | torch.Size):
        h.update(b"O" + str(obj).encode())
    else:
        raise TypeError(f"cannot hash {type(obj).__name__} in a checkpoint (tensors and plain types only)")


def content_hash(content: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical serialisation of ``content`` without its ``hash`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in content.items() if k != "hash"})
    return h.hexdigest()


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_hashed(path: Path, fmt: str, what: str, fix: str) -> dict[str, Any]:
    """torch.load(weights_only) + format and hash checks; every failure is an InputError naming ``path``."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist.", path=path, fix=fix)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle/CRC errors of a truncated or corrupted file
        raise InputError(f"{what} {path} is unreadable (corrupted or truncated: {err}).", path=path,
                         fix="delete it and re-run the training that writes it") from err
    if not isinstance(content, dict) or content.get("format") != fmt:
        got = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path} is not a {what} (format {got!r}, expected {fmt!r}).", path=path,
                         fix="point at a file written by `medrecon train`")
    stored = content.get("hash")
    actual = content_hash(content)
    if stored != actual:
        raise InputError(f"{what} {path} is corrupted: its content hash is {actual[:16]}..., the stored hash "
                         f"is {str(stored)[:16]}....", path=path,
                         fix="delete it and re-run the training (or restore an intact copy)")
    return content


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, *, kind: str, modality: str, objective: str, network: dict[str, Any],
                    schedule: dict[str, Any] | None, normalisation: dict[str, Any], train_config: dict[str, Any],
                    data: list[dict[str, Any]], step: int, weights: dict[str, torch.Tensor],
                    ema_weights: dict[str, torch.Tensor], sigma_data: float | None = None,
                    provenance: dict[str, Any] | None = None) -> str:
    """Write a prior checkpoint atomically; returns its content hash."""
    if kind not in KINDS or objective not in OBJECTIVES:
        raise ValueError(f"kind {kind!r} / objective {objective!r} not in {KINDS} / {OBJECTIVES}")
    content = {
        "format": FORMAT, "kind": kind, "modality": modality, "objective": objective, "network": network,
        "schedule": schedule, "sigma_data": None if sigma_data is None else float(sigma_data),
        "normalisation": validate_normalisation(normalisation, modality), "train_config": train_config,
        "data": data, "step": int(step), "weights": _cpu(weights), "ema_weights": _cpu(ema_weights),
        "provenance": provenance or {},
    }
    content["hash"] = content_hash(content)
    _atomic_save(content, Path(path))
    return content["hash"]


def export_checkpoint(src: str | Path, dst: str | Path, weights_dtype: str = "float16") -> str:
    """Copy a checkpoint with its floating-point weights stored as ``weights_dtype`` (half the bytes for
    float16: what shipped priors use to fit the repository's size budget); returns the new content hash.

    Loading converts them back to the network's float32 (``load_state_dict`` copies with conversion), so
    inference runs as before with weights rounded to ~3 significant digits (relative error <= 2^-11). The
    export is recorded in the provenance with the source's hash. A latent prior names its autoencoder by hash,
    so export an autoencoder only together with a re-trained latent prior.
    """
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[weights_dtype]
    c = _load_hashed(Path(src), FORMAT, "prior checkpoint", fix="point at a checkpoint written by `medrecon train`")

    def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    out = {k: v for k, v in c.items() if k != "hash"}
    out["weights"], out["ema_weights"] = cast(c["weights"]), cast(c["ema_weights"])
    out["provenance"] = {**c.get("provenance", {}),
                         "exported": {"from_hash": c["hash"], "weights_dtype": weights_dtype}}
    out["hash"] = content_hash(out)
    _atomic_save(out, Path(dst))
    return out["hash"]


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@dataclass
class LoadedPrior:
    """A checkpoint's network (eval mode, on ``device``) with everything needed to use it correctly."""

    path: Path
    network: torch.nn.Module
    kind: str
    modality: str
    objective: str
    spec: dict[str, Any]
    schedule: VPSchedule | EDMSchedule | None
    normalisation: dict[str, Any]
    sigma_data: float | None
    step: int
    hash: str
    ema: bool
    train_config: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _mismatch(path: Path, what: str, expected: Any, found: Any, fix: str) -> InputError:
    return InputError(f"prior checkpoint {path} has {what} {found!r}, but {expected!r} was expected.",
                      path=path, fix=fix)


def _norm_matches(expected: dict[str, Any], found: dict[str, Any]) -> bool:
    for k, v in expected.items():
        f = found.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and isinstance(f, int | float):
            if abs(float(v) - float(f)) > 1e-6 * max(1.0, abs(float(v))):
                return False
        elif isinstance(v, list | tuple) and isinstance(f, list | tuple):
            if len(v) != len(f) or not _norm_matches(dict(enumerate(v)), dict(enumerate(f))):
                return False
        elif v != f:
            return False
    return True


def _check_stored_normalisation(path: Path, c: dict[str, Any]) -> None:
    """The stored normalisation must suit the stored modality and be usable as is (an MR percentile fitted
    over the training set); otherwise the prior would see intensities on a scale it was never trained on."""
    norm, modality = c["normalisation"], c["modality"]
    try:
        norm = validate_normalisation(norm, modality)
    except ConfigError as err:
        raise InputError(f"prior checkpoint {path} ({modality}) stores a normalisation that does not fit it: "
                         f"{err.message}", path=path, fix="re-train the prior (`medrecon train`)") from err
    if norm["kind"] == "mr_percentile" and norm["scope"] == "dataset" and norm["value"] is None:
        raise InputError(f"prior checkpoint {path} stores an MR percentile normalisation without its fitted "
                         "value, so images cannot be put on the scale it was trained on.", path=path,
                         fix="re-train the prior (`medrecon train` fits the value on the training volumes)")


def load_checkpoint(path: str | Path, expect_modality: str | None = None, expect_kind: str | None = None,
                    expect_normalisation: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                    ema: bool = True) -> LoadedPrior:
    """Load and check a prior checkpoint; the network carries the EMA weights unless ``ema=False``.

    ``expect_normalisation`` is compared key by key on the keys it gives (numbers to 1e-6 relative), so a
    config that says only ``{"kind": "ct_window", "hu_min": -1000, "hu_max": 1000}`` is enough.
    Any problem (missing file, corruption, wrong format, missing keys, mismatching modality / kind /
    normalisation, weights that do not fit the stored spec) is an :class:`InputError` naming the file.
    """
    p = Path(path)
    c = _load_hashed(p, FORMAT, "prior checkpoint",
                     fix="train the prior first (`medrecon train`) or fix the checkpoint path in the config")
    missing = [k for k in REQUIRED if k not in c]
    if missing:
        raise InputError(f"prior checkpoint {p} lacks {missing}.", path=p,
                         fix="re-train it with this medrecon version")
    if expect_modality is not None and c["modality"] != expect_modality:
        raise _mismatch(p, "modality", expect_modality, c["modality"],
                        f"use a prior trained on {expect_modality} volumes (or train one)")
    _check_stored_normalisation(p, c)
    if expect_kind is not None and c["kind"] != expect_kind:
        raise _mismatch(p, "prior kind", expect_kind, c["kind"],
                        f"this method needs a '{expect_kind}' prior; point the config at one")
    if expect_normalisation is not None and not _norm_matches(expect_normalisation, c["normalisation"]):
        raise _mismatch(p, "intensity normalisation", expect_normalisation, c["normalisation"],
                        "use the normalisation the prior was trained with in the config, or re-train the prior")
    builder, spec = c["network"].get("builder"), c["network"].get("spec")
    if builder == "unet":
        net = build_unet(spec)
    elif builder == "autoencoder":
        net = build_autoencoder(spec)
    elif builder == "fbpconvnet":
        net = build_fbpconvnet(spec)
    else:
        raise InputError(f"prior checkpoint {p} names an unknown network builder {builder!r}.", path=p,
                         fix="re-train it with this medrecon version")
    if not ema and not c["weights"]:
        raise InputError(f"{p} holds only the EMA weights (trained with save_raw: false).", path=p,
                         fix="load it with ema=True, or re-train with save_raw: true for the raw weights")
    try:
        net.load_state_dict(c["ema_weights" if ema else "weights"])
    except RuntimeError as err:
        raise InputError(f"the weights in {p} do not fit the network spec stored with them ({err}).", path=p,
                         fix="re-train the prior") from err
    net.to(device).eval()
    sched = None if c["schedule"] is None else schedule_from_dict(c["schedule"])
    return LoadedPrior(path=p, network=net, kind=c["kind"], modality=c["modality"], objective=c["objective"],
                       spec=spec, schedule=sched, normalisation=c["normalisation"], sigma_data=c["sigma_data"],
                       step=int(c["step"]), hash=c["hash"], ema=ema, train_config=c["train_config"],
                       data=c["data"], provenance=c.get("provenance", {}))


def checkpoint_plane(train_config: dict[str, Any]) -> str:
    """The plane a slice prior was trained on (``train.plane``; checkpoints from before planes: axial)."""
    return str((train_config or {}).get("plane") or "axial")


def prior_from_checkpoint(path: str | Path, device: torch.device | str = "cpu", *, image_units: str = "native",
                          mu_water: float | None = None, expect_modality: str | None = None,
                          expect_normalisation: dict[str, Any] | None = None, ema: bool = True,
                          clip: float | tuple[float, float] | None = None,
                          expect_plane: str | tuple[str, ...] | None = "axial") -> Any:
    """A :class:`medrecon.diffusion.denoiser.Prior` for a slice prior checkpoint.

    The denoiser is an ``EpsilonDenoiser`` (VP schedule) or an ``EDMDenoiser`` as trained; ``scale`` and
    ``offset`` come from the stored normalisation (:func:`medrecon.diffusion.normalisation.prior_affine`),
    for images in ``image_units`` (``"native"``, or ``"attenuation"`` for CT with ``mu_water``).
    ``expect_plane``: the plane(s) the prior must have been trained on (axial by default: every slice
    sampler denoises axial slices; TPDM's perpendicular prior asks for coronal or sagittal); None = any.
    """
    from medrecon.diffusion.denoiser import EDMDenoiser, EpsilonDenoiser, Prior

    lp = load_checkpoint(path, expect_modality=expect_modality, expect_kind="slice",
                         expect_normalisation=expect_normalisation, device=device, ema=ema)
    plane = checkpoint_plane(lp.train_config)
    wanted = (expect_plane,) if isinstance(expect_plane, str) else expect_plane
    if wanted is not None and plane not in wanted:
        raise InputError(f"slice prior {lp.path} was trained on {plane} planes, but {' or '.join(wanted)} planes "
                         "were expected here.", path=lp.path,
                         fix="axial samplers (dds, dps, ...) need a prior trained with plane: axial; TPDM takes "
                             "[axial prior, coronal or sagittal prior], in that order")
    if lp.objective == "epsilon":
        if not isinstance(lp.schedule, VPSchedule):
            raise InputError(f"{lp.path}: an epsilon prior needs a VP schedule, found {lp.schedule}.",
                             path=lp.path, fix="re-train the prior")
        denoiser = EpsilonDenoiser(lp.network, lp.schedule, clip=clip)
        schedule = lp.schedule
    else:
        denoiser = EDMDenoiser(lp.network, sigma_data=lp.sigma_data or 0.5)
        schedule = None
    scale, offset = prior_affine(lp.normalisation, image_units, mu_water)
    meta = {"checkpoint": str(lp.path), "hash": lp.hash, "kind": lp.kind, "modality": lp.modality,
            "objective": lp.objective, "normalisation": lp.normalisation, "step": lp.step,
            "image_size": lp.spec.get("image_size"), "ema": lp.ema, "image_units": image_units, "plane": plane}
    return Prior(denoiser=denoiser, scale=scale, offset=offset, channels=int(lp.spec["in_channels"]),
                 cond=None, schedule=schedule, meta=meta)


# ---------------------------------------------------------------------------------------------- resume file


def resume_path(checkpoint: str | Path) -> Path:
    """Where a training run writing ``checkpoint`` keeps its resume state."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".resume.pt")


def save_resume(path: str | Path, state: dict[str, Any]) -> str:
    """Write the training resume state atomically (hashed like a checkpoint); returns the hash."""
    content = {"format": RESUME_FORMAT, **{k: v for k, v in state.items() if k not in ("format", "hash")}}
    content["hash"] = content_hash(content)
    _atomic_save(content, Path(path))
    return content["hash"]


def load_resume(path: str | Path) -> dict[str, Any]:
    """Read and verify a resume file (InputError naming it when corrupted)."""
    return _load_hashed(Path(path), RESUME_FORMAT, "training resume file",
                        fix="delete it to start training from scratch")


# ---------------------------------------------------------------------------------------------- grid


def training_grid(content: dict[str, Any]) -> dict[str, Any] | None:
    """The reconstruction grid (:mod:`medrecon.grid`) a prior was trained on, from its data record.

    Volumes made by ``medrecon resample`` record their grid, and the checkpoint keeps it per training volume.
    Checkpoints from before grids existed are read by what their training did: slices already of the
    network's square ``image_size`` were used as they were (no resizing), so such a prior was trained on the
    grid ``size = image_size``; if any training volume had another in-plane size it was resized in pixels
    and its grid is unknown (None).
    """
    vols = [d for d in content.get("data", []) if "shape" in d]
    if not vols:
        return None
    grids = [d.get("grid") for d in vols]
    if all(g is not None for g in grids):
        return grids[0]
    spec = (content.get("network") or {}).get("spec") or {}
    size = spec.get("image_size") or content.get("train_config", {}).get("image_size")
    if content.get("kind") == "patch":   # patches are cut from the slices as they are: no resizing ever
        shapes = {tuple(d["shape"][1:]) for d in vols}
        size = next(iter(shapes))[0] if len(shapes) == 1 and len(next(iter(shapes))) == 2 else None
    if size and all(list(d["shape"][1:]) == [size, size] for d in vols):
        return {"size": [int(size), int(size)], "spacing": None, "slice_spacing": None}
    return None


def read_grid(path: str | Path) -> tuple[dict[str, Any] | None, bool, bool]:
    """``(grid, uses_slices, own_data)`` of the checkpoint at ``path``: its training grid, whether the prior
    couples slices (slab and 3D-patch priors, whose z scale matters), and whether it was trained on volumes
    at all (a latent prior is trained on its autoencoder and inherits that one's grid)."""
    p = Path(path)
    c = _load_hashed(p, FORMAT, "prior checkpoint",
                     fix="train the prior first (`medrecon train`) or fix the checkpoint path in the config")
    spec = (c.get("network") or {}).get("spec") or {}
    # slab priors, 3D patches and coronal/sagittal slice priors see the z pixel scale: the slice spacing counts
    uses_slices = c.get("kind") == "slab" or (c.get("kind") == "patch" and int(spec.get("coord_channels", 2)) == 3) \
        or checkpoint_plane(c.get("train_config", {})) != "axial"
    own = c.get("kind") != "latent" and any("shape" in d for d in c.get("data", []))
    return training_grid(c), uses_slices, own
