"""Training data for diffusion priors: 2D items drawn from medrecon Volumes, normalised and augmented.

Design (so slab and patch datasets can be added on the same machinery):

* :class:`VolumeSlices` owns the training volumes and reads slices from them with bounded memory: when all
  volumes fit ``cache_bytes`` they are read once (preloaded); otherwise whole chunk-aligned slabs are read
  lazily and kept in a least-recently-used cache of at most ``cache_bytes``.
* :class:`TrainingDataset` is the small base class: items are addressed by a *key* ``(index, seed)`` and
  all augmentation randomness comes from ``numpy.random.default_rng(seed)``. An item is therefore a pure
  function of its key, which is what makes training bit-for-bit resumable (the trainer derives keys from
  the step number, see :mod:`medrecon.diffusion.train`) and DataLoader workers deterministic.
* An item is a dict: ``"x"`` the (C, H, W) float32 image in the network domain, plus optional
  conditioning passed to the network as keyword arguments (``"class_labels"`` a long scalar, ``"coords"``
  (K, H, W) coordinate maps) - the same names ``Prior.cond`` uses at sampling time.

:class:`SliceDataset` (kind ``"slice"``) gives single axial slices, normalised
(:mod:`medrecon.diffusion.normalisation`; CT clipped to the window). Volumes on the study's reconstruction
grid (``medrecon resample``, :mod:`medrecon.grid`; what the workflow trains on) are only padded with the
background value / centre-cropped to ``image_size`` (the grid's size), never resized, so the prior learns
anatomy at the pixel scale it is used at, and the checkpoint records the grid. Other volumes (library use,
tests) are padded to a square and resized to ``image_size`` in pixels (area averaging when shrinking,
bilinear when enlarging; ``fit="crop"`` centre-crops instead), and their checkpoint has no grid.
Flips: left-right (``"x"``) by default; up-down
(``"y"``) is optional because anterior-posterior flips are not anatomically plausible.

Planes (``plane``, :data:`PLANES`): the slices are axial (the volume's (y, x) planes, one per z) by default; a
``coronal`` prior sees the (z, x) planes, one per y, and a ``sagittal`` one the (z, y) planes, one per x (the
perpendicular prior of TPDM, :mod:`medrecon.methods.tpdm`). Such planes are fitted like axial slices: on a
grid padded with the background / centre-cropped to ``image_size`` without resampling, so a coronal prior
learns the anatomy at the volume's own (possibly anisotropic) z and x pixel scales, which is exactly how the
sampler shows it the volume; rows beyond ``image_size`` (a volume deeper than the grid's in-plane size) are
centre-cropped in training, and the network, being convolutional, still takes the deeper planes when used.
Off a grid they are padded to a square and resized in pixels like axial slices (their z scale then changes).
A ``"y"`` flip of a coronal or sagittal plane flips z (head-foot).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medrecon.diffusion.normalisation import (
    background,
    default_normalisation,
    percentile_value,
    to_network,
    validate_normalisation,
)
from medrecon.errors import ConfigError, InputError
from medrecon.provenance import file_sha256
from medrecon.volume import Volume


def store_sha256(path: str | Path) -> str:
    """sha256 over a zarr store's files (relative names and bytes, sorted): the data-provenance fingerprint."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


# The planes a slice prior can be trained on, and the volume axis (z, y, x) each is indexed along: an axial slice
# is volume[z], a coronal plane volume[:, y] (z, x), a sagittal plane volume[:, :, x] (z, y).
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}


def check_plane(plane: str) -> str:
    """``plane`` if it is one of :data:`PLANES`, else a ConfigError naming them."""
    if plane not in PLANES:
        raise ConfigError(f"unknown slice plane {plane!r}", fix=f"use one of {list(PLANES)} (train.<name>.plane)")
    return plane


class VolumeSlices:
    """Slices of several volumes with a memory bound: preload if all fit ``cache_bytes``, else an LRU of slabs.

    ``plane`` picks which planes are the slices (:data:`PLANES`); off-axial planes read whole volumes into
    the LRU (a coronal plane needs every z), still bounded by ``cache_bytes`` beyond the one volume in use.
    """

    def __init__(self, volumes: Sequence[Volume | str | Path], modality: str, cache_bytes: int = 1 << 30,
                 plane: str = "axial") -> None:
        self.plane = check_plane(plane)
        self.axis = PLANES[plane]
        self.volumes = [v if isinstance(v, Volume) else Volume.open(v) for v in volumes]
        if not self.volumes:
            raise ConfigError("no training volumes given", fix="list at least one volume with role 'train'")
        for v in self.volumes:
            if v.modality != modality:
                raise InputError(f"training volume {v.path} has modality {v.modality!r}, expected {modality!r}",
                                 path=v.path, fix="train one prior per modality; check the subject's 'modality'")
        self.modality = modality
        self.grid = _common_grid(self.volumes)
        self.cache_bytes = int(cache_bytes)
        total = sum(int(np.prod(v.shape)) * 4 for v in self.volumes)
        self.preloaded = total <= self.cache_bytes
        self._full = [v.read() for v in self.volumes] if self.preloaded else None
        self._lru: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lru_bytes = 0
        self.index = [(vi, k) for vi, v in enumerate(self.volumes) for k in range(v.shape[self.axis])]

    def __len__(self) -> int:
        return len(self.index)

    def read(self, vi: int, z: int) -> np.ndarray:
        """Slice ``z`` of volume ``vi`` along the plane's axis (native units, float32): (y, x) for axial,
        (z, x) for coronal, (z, y) for sagittal planes."""
        if self.axis != 0:
            return np.take(self._volume(vi), z, axis=self.axis)
        if self._full is not None:
            return self._full[vi][z]
        vol = self.volumes[vi]
        depth = vol.chunk_depth
        key = (vi, z // depth)
        slab = self._lru.get(key)
        if slab is None:
            z0 = key[1] * depth
            slab = vol.read_slab(z0, min(z0 + depth, vol.shape[0]))
            self._lru[key] = slab
            self._lru_bytes += slab.nbytes
            while self._lru_bytes > self.cache_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes
        else:
            self._lru.move_to_end(key)
        return slab[z - key[1] * depth]

    def plane_shape(self, vi: int) -> tuple[int, int]:
        """(rows, columns) of the slices of volume ``vi``: (y, x) axial, (z, x) coronal, (z, y) sagittal."""
        shape = tuple(int(s) for s in self.volumes[vi].shape)
        rows, cols = [s for a, s in enumerate(shape) if a != self.axis]
        return rows, cols

    def _volume(self, vi: int) -> np.ndarray:
        """The whole volume ``vi`` (preloaded, or read into the LRU under the key (vi, -1))."""
        if self._full is not None:
            return self._full[vi]
        key = (vi, -1)
        vol = self._lru.get(key)
        if vol is None:
            vol = self.volumes[vi].read()
            self._lru[key] = vol
            self._lru_bytes += vol.nbytes
            while self._lru_bytes > self.cache_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes
        else:
            self._lru.move_to_end(key)
        return vol

    def strided_samples(self, vi: int) -> list[np.ndarray]:
        """|x| of volume ``vi`` subsampled with a fixed stride (<= ~4 M voxels), read slab by slab."""
        v = self.volumes[vi]
        stride = max(1, math.ceil(int(np.prod(v.shape)) / 4_000_000))
        return [np.abs(data).reshape(-1)[::stride] for _, data in v.iter_slabs()]

    def percentile_values(self, percentile: float) -> list[float]:
        """Per-volume robust magnitude scale (MR normalisation with scope 'volume')."""
        return [percentile_value(self.strided_samples(vi), percentile) for vi in range(len(self.volumes))]

    def provenance(self) -> list[dict[str, Any]]:
        """Paths, shapes and content hashes of the training volumes (stored in checkpoints)."""
        out = [{"path": str(v.path), "shape": list(v.shape), "sha256": store_sha256(v.path)} for v in self.volumes]
        if self.grid is not None:   # the reconstruction grid the prior learns at (checked by reconstruct)
            for entry in out:
                entry["grid"] = self.grid
        return out


def _common_grid(volumes: Sequence[Volume]) -> dict[str, Any] | None:
    """The one reconstruction grid all training volumes are on (None: none of them was put on a grid)."""
    from medrecon.grid import describe, same_grid, volume_grid

    grids = [volume_grid(v) for v in volumes]
    for v, g in zip(volumes[1:], grids[1:], strict=True):
        if (g is None) != (grids[0] is None) or (g is not None and not same_grid(g, grids[0])):
            raise InputError(f"training volumes are on different grids: {volumes[0].path} ({describe(grids[0])}) "
                             f"and {v.path} ({describe(g)})", path=v.path,
                             fix="train on the reference volumes of one study (`medrecon resample` with one grid)")
    return grids[0]


def training_image_size(requested: int | None, source: VolumeSlices) -> int:
    """The square size slices are trained at: the grid's size when the volumes are on a grid with one (a
    different ``image_size`` would train the prior at another pixel scale than it is used at), else the
    requested one (64 if none), else for spacing-only grids the largest in-plane extent."""
    grid = source.grid
    if grid is not None and grid["size"] is not None:
        side = max(grid["size"])
        if requested is not None and int(requested) != side:
            raise ConfigError(f"train image_size {requested} differs from the reconstruction grid's size "
                              f"{grid['size']}: the prior would learn another pixel scale than it is used at",
                              fix="drop image_size from the train section (it follows grid.size)")
        return int(side)
    if requested is not None:
        return int(requested)
    if grid is not None:
        return int(max(max(source.plane_shape(vi)) for vi in range(len(source.volumes))))
    return 64


def fit_normalisation(norm: dict[str, Any], source: VolumeSlices) -> tuple[dict[str, Any], list[float] | None]:
    """Fill the data-dependent part of a normalisation (the MR percentile value) from the training volumes.

    Returns the completed dict and, for ``scope="volume"``, the per-volume divisors.
    """
    n = validate_normalisation(norm, source.modality)
    if n["kind"] != "mr_percentile":
        return n, None
    if n["scope"] == "volume":
        values = source.percentile_values(n["percentile"])
        n["value"] = float(np.median(values))
        return n, values
    if n["value"] is None:
        samples = [part for vi in range(len(source.volumes)) for part in source.strided_samples(vi)]
        n["value"] = percentile_value(samples, n["percentile"])
    return n, None


def pad_or_crop(img: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """(H, W) -> (size, size) by centred padding with ``pad_value`` and/or centre-cropping: no resampling."""
    out = np.full((size, size), pad_value, dtype=np.float32)
    h, w = img.shape
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[dy:dy + ch, dx:dx + cw] = img[sy:sy + ch, sx:sx + cw]
    return out


def fit_square(img: np.ndarray, size: int, mode: str, pad_value: float) -> np.ndarray:
    """(H, W) -> (size, size): pad (or centre-crop) to a square, then area-shrink or bilinear-enlarge."""
    h, w = img.shape
    if mode == "pad":
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        sq = np.full((side, side), pad_value, dtype=np.float32)
        sq[top:top + h, left:left + w] = img
    elif mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        sq = np.ascontiguousarray(img[top:top + side, left:left + side], dtype=np.float32)
    else:
        raise ConfigError(f"unknown fit mode {mode!r}", fix="use 'pad' or 'crop'")
    if side == size:
        return sq
    t = torch.from_numpy(sq)[None, None]
    if side > size:
        t = F.interpolate(t, size=(size, size), mode="area")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


class TrainingDataset(torch.utils.data.Dataset):
    """Base class: items are pure functions of a key ``(index, seed)``; subclasses implement :meth:`sample`."""

    kind: str = "base"
    channels: int = 1
    image_size: int = 0
    num_class_embeds: int | None = None
    coord_channels: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        return self.sample(int(index), np.random.default_rng(int(seed)))

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Item ``index`` with augmentation drawn from ``rng``."""
        raise NotImplementedError

    def provenance(self) -> list[dict[str, Any]]:
        """What data the items come from (stored with the checkpoint)."""
        return []


def _flip(img: np.ndarray, flips: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    # One draw per configured axis, always made, so the RNG stream does not depend on the outcome.
    for ax in flips:
        if rng.random() < 0.5:
            img = img[..., :, ::-1] if ax == "x" else img[..., ::-1, :]
    return np.ascontiguousarray(img)


def phase_mode(value: Any) -> str:
    """The ``random_phase`` setting of an MR training config as one of "none", "constant", "smooth"."""
    mode = "none" if value is None or value is False else "constant" if value is True else str(value)
    if mode not in ("none", "constant", "smooth"):
        raise ConfigError(f"random_phase must be false, true (constant) or smooth, got {value!r}",
                          fix="use random_phase: smooth (the measure step's phase model) for complex MR priors")
    return mode


def training_phase(shape: tuple[int, int], rng: np.random.Generator, mode: str) -> np.ndarray | float:
    """The phase put on a magnitude training image to make it complex (radians).

    "constant": one uniform phase per image. "smooth": a map of the very family the measure step puts on MR
    volumes (:func:`medrecon.physics.mri_phase.smooth_phase`: degree-2 polynomial, |phi| <= pi/2) with a seed drawn
    from ``rng``, so the prior has seen the phase it will meet in measurements. "none": 0.
    """
    if mode == "smooth":
        from medrecon.physics.mri_phase import smooth_phase

        return smooth_phase(tuple(shape), int(rng.integers(0, 2**31 - 1)))
    return rng.uniform(0, 2 * np.pi) if mode == "constant" else 0.0


class SliceDataset(TrainingDataset):
    """Single slices of training volumes (axial, or the source's ``plane``), normalised, fitted to
    ``image_size`` and flipped at random."""

    kind = "slice"

    def __init__(self, source: VolumeSlices, normalisation: dict[str, Any], image_size: int | None, channels: int = 1,
                 fit: str = "pad", flips: Sequence[str] = ("x",), random_phase: bool | str = False,
                 volume_values: Sequence[float] | None = None) -> None:
        self.source = source
        self.norm = validate_normalisation(normalisation, source.modality)
        if self.norm["kind"] == "mr_percentile" and self.norm["value"] is None:
            raise ConfigError("MR normalisation value missing", fix="call fit_normalisation first")
        if channels not in (1, 2) or (channels == 2 and source.modality != "MR"):
            raise ConfigError(f"slice priors have 1 channel (or 2 = complex for MR), got {channels} for "
                              f"{source.modality}", fix="set network.in_channels to 1 (CT) or 1/2 (MR)")
        if fit not in ("pad", "crop"):
            raise ConfigError(f"unknown fit {fit!r}", fix="use 'pad' or 'crop'")
        if not set(flips) <= {"x", "y"}:
            raise ConfigError(f"flips must be a subset of ['x', 'y'], got {list(flips)}", fix="e.g. ['x']")
        self.image_size = training_image_size(image_size, source)
        self.channels, self.fit, self.flips = channels, fit, tuple(flips)
        self.random_phase = phase_mode(random_phase)
        self.volume_values = None if volume_values is None else [float(v) for v in volume_values]
        self._pad = background(self.norm)

    def __len__(self) -> int:
        return len(self.source)

    def image(self, index: int) -> np.ndarray:
        """Slice ``index`` normalised (clipped for CT) and fitted to (image_size, image_size), no augmentation."""
        vi, z = self.source.index[index]
        value = None if self.volume_values is None else self.volume_values[vi]
        img = np.asarray(to_network(self.source.read(vi, z), self.norm, clip=True, value=value), dtype=np.float32)
        if self.source.grid is not None:    # on the reconstruction grid: the pixel scale is the one used later
            return pad_or_crop(img, self.image_size, self._pad)
        return fit_square(img, self.image_size, self.fit, self._pad)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        img = _flip(self.image(index), self.flips, rng)
        if self.channels == 2:
            # MR magnitude volumes as complex images (:func:`training_phase`)
            phase = training_phase(img.shape, rng, self.random_phase)
            img = np.stack([img * np.cos(phase), img * np.sin(phase)])
        else:
            img = img[None]
        return {"x": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))}

    def provenance(self) -> list[dict[str, Any]]:
        return self.source.provenance()


class ArrayDataset(TrainingDataset):
    """Images already in the network domain, (N, C, H, W) float32, with flips: for tests and benchmarks."""

    kind = "slice"

    def __init__(self, images: np.ndarray, flips: Sequence[str] = ("x",),
                 class_labels: np.ndarray | None = None) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        if self.images.ndim != 4 or self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be (N, C, S, S), got {self.images.shape}")
        self.channels, self.image_size = int(self.images.shape[1]), int(self.images.shape[2])
        self.flips = tuple(flips)
        self.labels = None if class_labels is None else np.asarray(class_labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        item = {"x": torch.from_numpy(_flip(self.images[index], self.flips, rng))}
        if self.labels is not None:
            item["class_labels"] = torch.tensor(self.labels[index])
        return item


def toy_discs(n: int, size: int, seed: int = 0, max_discs: int = 3) -> np.ndarray:
    """A toy image family in [-1, 1]: 1..max_discs discs of random centre, radius and brightness on -1.

    Small enough to learn in a few hundred steps; used by tests and the training benchmark.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.full((n, 1, size, size), -1.0, dtype=np.float32)
    for i in range(n):
        for _ in range(int(rng.integers(1, max_discs + 1))):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            r = rng.uniform(0.1, 0.3) * size
            out[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(0.0, 1.0)
    return out


def build_slice_dataset(cfg: dict[str, Any], volumes: Sequence[str | Path | Volume]
                        ) -> tuple[SliceDataset, str, dict[str, Any]]:
    """The slice dataset of a resolved training config (:func:`medrecon.diffusion.train.resolve_train_config`)
    from volume stores, with its modality and fitted normalisation: what the slice, slab and latent kinds read."""
    vols = [v if isinstance(v, Volume) else Volume.open(v) for v in volumes]
    if not vols:
        raise ConfigError("no training volumes given", fix="give at least one subject with role 'train'")
    modality = cfg["modality"] or vols[0].modality
    if modality not in ("CT", "MR"):
        raise InputError(f"training volume {vols[0].path} has no CT/MR modality ({modality!r})",
                         path=vols[0].path, fix="set the subject's modality and re-ingest, or train.modality")
    source = VolumeSlices(vols, modality, cache_bytes=cfg["cache_mb"] << 20, plane=cfg.get("plane", "axial"))
    norm, per_volume = fit_normalisation(cfg["normalisation"] or default_normalisation(modality), source)
    channels = int(cfg["network"].get("in_channels", 1))
    ds = SliceDataset(source, norm, cfg["image_size"], channels=channels, fit=cfg["fit"], flips=cfg["flips"],
                      random_phase=cfg["random_phase"], volume_values=per_volume)
    return ds, modality, norm
