"""MRI forward operators (multi-coil SENSE, Cartesian and non-Cartesian) and their construction from config.

Registered kinds (see :mod:`medrecon.physics.operator`), all complex64 -> complex64:

* ``mri-sense-2d``: image ``(Y, X)`` -> masked k-space ``(C, Y, X)``, batched over leading slice dims.
  y = M F (S x) with F the centred orthonormal 2D FFT (SigPy's ``fft``), S coil maps ``(C, Y, X)`` shared by
  all slices or ``(Z, C, Y, X)`` per slice, M a 0/1 mask ``(Y, X)`` or ``(Z, Y, X)``; unsampled entries are
  zero. Implemented with ``torch.fft``: on CUDA all slices and coils in one call; on CPU slice by slice
  (all coils per call) into one preallocated output, with a fused ``normal`` (A^H A without the batch's
  k-space); a test proves it equals ``sigpy.mri.linop.Sense(maps, weights=mask)`` to 1e-5.
* ``mri-sense-3d``: volume ``(Z, Y, X)`` -> ``(C, Z, Y, X)``; 3D FFT, mask over the two phase encodes
  ``(Z, Y)`` (kz, ky; broadcast along the readout kx) or a full ``(Z, Y, X)`` mask.
* ``mri-nufft-2d``: image ``(Y, X)`` -> samples ``(C, n)`` along a radial or spiral trajectory via
  ``sigpy.nufft`` / ``sigpy.nufft_adjoint`` (Kaiser-Bessel, oversampling 1.25, width 4), all slices and
  coils in one call. CUDA tensors go through CuPy (DLPack, no host copy) when CuPy is installed; without
  CuPy they take a host round trip (correct, slower; a warning says so once).

With maps normalised to sum_c |S_c|^2 = 1 (see :mod:`medrecon.physics.coils`) a fully sampled SENSE operator
is an isometry: A^H A = I where the maps are non-zero. The measure step builds the operator with
:func:`mri_operator_from_config`, simulates y = A x with :func:`simulate_kspace` (optionally with a smooth
synthetic phase, :func:`smooth_phase`), adds noise, and stores :func:`calibrated_operator` (ESPIRiT maps
from the data when configured, else the true maps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import sigpy
import sigpy.mri
import torch

from medrecon.errors import ConfigError, InputError
from medrecon.physics.coils import birdcage_coils, calibration_from_samples, espirit_coils
from medrecon.physics.mri_sampling import (
    cartesian_mask_1d,
    default_spokes,
    density_compensation,
    poisson_mask_2d,
    radial_trajectory,
    spiral_trajectory,
)
from medrecon.physics.operator import LinearOperator, register_operator


def fftc(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Centred orthonormal FFT, SigPy's convention: fftshift(fftn(ifftshift(x)))."""
    k = torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho")
    return torch.fft.fftshift(k, dim=dims)


def ifftc(k: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`fftc` (and its adjoint)."""
    x = torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def _fft_modulation(shape: tuple[int, ...]) -> tuple[np.ndarray, float] | None:
    """For even sizes, fftc(x) = s * D * fft(D * x) with D = (-1)^(n_1 + ... + n_d), s = (-1)^(sum N_i/2).

    Folding D into the coil maps and s * D into the mask turns the centred FFT into a plain one: no
    fftshift copies in the hot path (about 2.5x faster on CPU). Returns (D, s), or None for odd sizes.
    """
    if any(n % 2 for n in shape):
        return None
    d = (1 - 2 * (np.indices(shape).sum(0) % 2)).astype(np.float32)
    return d, float((-1) ** (sum(n // 2 for n in shape) % 2))


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., Y, X)`` -> real ``(..., 2, Y, X)`` (real, imaginary): what a real-valued prior sees."""
    return torch.stack((x.real, x.imag), dim=-3)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real ``(..., 2, Y, X)`` -> complex ``(..., Y, X)``; inverse of :func:`complex_to_channels`."""
    if x.shape[-3] != 2:
        raise ValueError(f"channels_to_complex: expected 2 channels at dim -3, got shape {tuple(x.shape)}")
    return torch.complex(x[..., 0, :, :].contiguous(), x[..., 1, :, :].contiguous())


def _empty_cpu_complex(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised complex64 CPU tensor whose memory NumPy allocated.

    NumPy advises the kernel to back large arrays with huge pages; torch's allocator does not, and first
    touching a fresh batch-sized output then costs one page fault per 4 KiB: measured 42 ms vs 8 ms for a
    52 MB k-space (8 slices, 8 coils, 320^2), more than the FFTs. The storage is not resizable.
    """
    return torch.from_numpy(np.empty(shape, dtype=np.complex64))


def _complex(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.complex64 else x.to(torch.complex64)


class _CoilOperator(LinearOperator):
    """Shared plumbing: complex64 in/out, numpy copies for state, torch copies per device."""

    in_dtype = torch.complex64
    out_dtype = torch.complex64

    def __init__(self, maps: np.ndarray, device: torch.device | str) -> None:
        self.maps_np = np.ascontiguousarray(maps, dtype=np.complex64)
        self._cache: dict[tuple[str, torch.device], Any] = {}
        self.device = torch.device(device)

    def _t(self, name: str, arr: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(arr).to(device=device, dtype=dtype)
        return self._cache[key]

    def _prepared(self, device: torch.device, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Cartesian maps and mask on ``device``, with the FFT-centring modulation folded in where the image
        sizes are even (see :func:`_fft_modulation`); the flag says a plain FFT then suffices."""
        key = ("cartesian", device)
        if key not in self._cache:
            maps, m = self.maps_np, mask.astype(np.float32)
            mod = _fft_modulation(tuple(self.in_shape))
            if mod is not None:
                maps, m = maps * mod[0], m * (mod[0] * mod[1])
            maps_t = torch.as_tensor(np.ascontiguousarray(maps, np.complex64)).to(device)
            self._cache[key] = (maps_t, torch.as_tensor(np.ascontiguousarray(m)).to(device), mod is not None)
            self._cache[("cartesian-conj", device)] = maps_t.conj().resolve_conj()
        return self._cache[key]

    @staticmethod
    def _fft(x: torch.Tensor, dims: tuple[int, ...], plain: bool) -> torch.Tensor:
        return torch.fft.fftn(x, dim=dims, norm="ortho") if plain else fftc(x, dims)

    @staticmethod
    def _ifft(k: torch.Tensor, dims: tuple[int, ...], plain: bool) -> torch.Tensor:
        return torch.fft.ifftn(k, dim=dims, norm="ortho") if plain else ifftc(k, dims)

    def _check_slices(self, t: torch.Tensor, lead: int, per_slice: int | None) -> None:
        if per_slice is not None and (t.ndim < lead + 1 or t.shape[-lead - 1] != per_slice):
            raise ValueError(f"{type(self).__name__} has per-slice maps/mask for {per_slice} slices; input "
                             f"{tuple(t.shape)} must have exactly that many slices (use .slab(z0, z1) first)")


@register_operator("mri-sense-2d")
class Sense2D(_CoilOperator):
    """Per-slice multi-coil Cartesian SENSE (see module docstring). ``mask=None`` means fully sampled."""

    def __init__(self, maps: np.ndarray, mask: np.ndarray | None = None, device: torch.device | str = "cpu"):
        super().__init__(maps, device)
        if self.maps_np.ndim not in (3, 4):
            raise InputError(f"Sense2D: coil maps must be (C, Y, X) or (Z, C, Y, X), "
                             f"got {self.maps_np.shape}")
        ny, nx = self.maps_np.shape[-2:]
        self.mask_np = np.ones((ny, nx), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.mask_np.shape[-2:] != (ny, nx) or self.mask_np.ndim not in (2, 3):
            raise InputError(f"Sense2D: mask {self.mask_np.shape} does not match maps {self.maps_np.shape}",
                             fix="give a (Y, X) or (Z, Y, X) mask of the maps' image size.")
        zs = {a.shape[0] for a in (self.maps_np, self.mask_np) if a.ndim == (4 if a is self.maps_np else 3)}
        if len(zs) > 1:
            raise InputError(f"Sense2D: per-slice maps and mask disagree on the slice count: {sorted(zs)}")
        self.n_slices: int | None = zs.pop() if zs else None
        self.in_shape = (ny, nx)
        self.out_shape = (self.maps_np.shape[-3], ny, nx)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_slices(x, 2, self.n_slices)
        x = _complex(x)
        if x.device.type != "cpu":
            return self._fwd(x, None)
        return self._slicewise(self._fwd, x, 2, self.in_shape, self.out_shape)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_slices(y, 3, self.n_slices)
        y = _complex(y)
        if y.device.type != "cpu":
            return self._adj(y, None)
        return self._slicewise(self._adj, y, 3, self.out_shape, self.in_shape)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x slice by slice without materialising the batch's k-space (CG data consistency calls
        this every iteration); through forward/adjoint when x needs a gradient or lives off the CPU."""
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return super().normal(x)
        self._check(x, self.in_shape, "input")
        self._check_slices(x, 2, self.n_slices)
        x = _complex(x.detach())
        return self._slicewise(self._nrm, x, 2, self.in_shape, self.in_shape)

    def _slicewise(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, nd: int, in_shape: tuple[int, ...],
                   out_shape: tuple[int, ...]) -> torch.Tensor:
        """``fn`` over ``x``'s slices (its last ``nd`` dims are one slice), chunk by chunk, writing into one output
        allocated up front (CPU: fresh batch-sized torch outputs cost a page fault per 4 KiB, see
        :func:`_empty_cpu_complex`)."""
        out = _empty_cpu_complex((*x.shape[:-nd], *out_shape))
        xs, outs = x.reshape(-1, *in_shape), out.view(-1, *out_shape)
        for i, z in self._chunks(x, nd):
            fn(xs[i], z, out=outs[i])
        return out

    # Slices per CPU call. One is fastest on one thread (fwd+adj per slice, 8 slices, same run: 256^2 x 8
    # coils 5.0 / 6.6 / 8.3 ms for 1 / 2 / 4 slices per call; 320^2 x 12 coils 14.8 / 17.4 / 25.0 ms).
    CPU_CHUNK_SLICES = 1

    def _chunks(self, t: torch.Tensor, trailing: int) -> list[tuple[slice, slice | None]]:
        """(flat batch range, slice range or None for shared maps/mask) of each CPU call on ``t``.

        On CPU a batch is applied a chunk of slices at a time into one preallocated output: a chunk's
        (k, C, Y, X) intermediates stay in cache and come from the allocator's free list, whereas
        batch-sized ones are fresh mappings the kernel must zero (and the old chunk-and-cat path copied the
        k-space once more). Per-slice maps/masks follow the slice axis, the last batch dim (slice = flat
        index mod Z), so with them a chunk never wraps past the last slice.
        """
        n = math.prod(t.shape[:-trailing])
        step = max(1, self.CPU_CHUNK_SLICES)
        if self.n_slices is None:
            return [(slice(i, min(i + step, n)), None) for i in range(0, n, step)]
        zn = self.n_slices
        return [(slice(b + z, b + min(z + step, zn)), slice(z, min(z + step, zn)))
                for b in range(0, n, zn) for z in range(0, zn, step)]

    def _slice_arrays(self, device: torch.device, z: slice | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, bool]:
        """(maps, conjugate maps, mask, plain-FFT flag) for slices ``z``, or for all slices when None; a
        per-slice mask gains a coil axis so that it broadcasts against (Z, C, Y, X)."""
        maps, mask, plain = self._prepared(device, self.mask_np)
        maps_conj = self._cache[("cartesian-conj", device)]
        if z is not None:
            maps = maps[z] if maps.ndim == 4 else maps
            maps_conj = maps_conj[z] if maps_conj.ndim == 4 else maps_conj
            mask = mask[z] if mask.ndim == 3 else mask
        return maps, maps_conj, mask.unsqueeze(-3) if mask.ndim == 3 else mask, plain

    def _fwd(self, x: torch.Tensor, z: slice | None, out: torch.Tensor | None = None) -> torch.Tensor:
        maps, _, mask, plain = self._slice_arrays(x.device, z)
        return torch.mul(self._fft(x.unsqueeze(-3) * maps, (-2, -1), plain), mask, out=out)

    def _nrm(self, x: torch.Tensor, z: slice | None, out: torch.Tensor) -> torch.Tensor:
        """One slice of A^H A: the mask applied once, squared (0/1 even with the centring signs)."""
        maps, maps_conj, mask, plain = self._slice_arrays(x.device, z)
        k = self._fft(x.unsqueeze(-3) * maps, (-2, -1), plain).mul_(mask.square())
        return torch.sum(self._ifft(k, (-2, -1), plain).mul_(maps_conj), dim=-3, out=out)

    def _adj(self, y: torch.Tensor, z: slice | None, out: torch.Tensor | None = None) -> torch.Tensor:
        _, maps_conj, mask, plain = self._slice_arrays(y.device, z)
        return torch.sum(self._ifft(y * mask, (-2, -1), plain).mul_(maps_conj), dim=-3, out=out)

    def slab(self, z0: int, z1: int) -> Sense2D:
        """The operator of slices z0..z1-1 (for slab-wise processing); itself when nothing is per slice."""
        if self.n_slices is None:
            return self
        return Sense2D(self.maps_np[z0:z1] if self.maps_np.ndim == 4 else self.maps_np,
                       self.mask_np[z0:z1] if self.mask_np.ndim == 3 else self.mask_np, self.device)

    def sigpy_linop(self, z: int = 0) -> sigpy.linop.Linop:
        """The same model for slice ``z`` as a SigPy linop (for SigPy's recon apps and the parity test)."""
        maps = self.maps_np[z] if self.maps_np.ndim == 4 else self.maps_np
        mask = self.mask_np[z] if self.mask_np.ndim == 3 else self.mask_np
        return sigpy.mri.linop.Sense(maps, weights=mask.astype(np.float32))

    @classmethod
    def example(cls) -> Sense2D:
        return cls(birdcage_coils(4, (16, 12)), cartesian_mask_1d((16, 12), 2.0, acs_lines=4, seed=0))

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"image_shape": list(self.in_shape), "coils": self.out_shape[0], "n_slices": self.n_slices},
                {"maps": self.maps_np, "mask": self.mask_np})

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"):
        return cls(arrays["maps"], arrays["mask"], device=device)


@register_operator("mri-sense-3d")
class Sense3D(_CoilOperator):
    """3D Cartesian SENSE with a (kz, ky) mask (see module docstring). ``mask=None`` means fully sampled."""

    def __init__(self, maps: np.ndarray, mask: np.ndarray | None = None, device: torch.device | str = "cpu"):
        super().__init__(maps, device)
        if self.maps_np.ndim != 4:
            raise InputError(f"Sense3D: coil maps must be (C, Z, Y, X), got {self.maps_np.shape}")
        nz, ny, nx = self.maps_np.shape[1:]
        self.mask_np = np.ones((nz, ny), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if self.mask_np.shape not in ((nz, ny), (nz, ny, nx)):
            raise InputError(f"Sense3D: mask {self.mask_np.shape} must be (Z, Y) or (Z, Y, X) of the maps "
                             f"{self.maps_np.shape}", fix="build it with poisson_mask_2d((Z, Y), ...).")
        self.in_shape = (nz, ny, nx)
        self.out_shape = (self.maps_np.shape[0], nz, ny, nx)

    def _mask3(self) -> np.ndarray:
        return self.mask_np[..., None] if self.mask_np.ndim == 2 else self.mask_np

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        maps, mask, plain = self._prepared(x.device, self._mask3())
        return self._fft(_complex(x).unsqueeze(-4) * maps, (-3, -2, -1), plain) * mask

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _, mask, plain = self._prepared(y.device, self._mask3())
        maps_conj = self._cache[("cartesian-conj", y.device)]
        return (self._ifft(_complex(y) * mask, (-3, -2, -1), plain) * maps_conj).sum(-4)

    @classmethod
    def example(cls) -> Sense3D:
        rng = np.random.default_rng(0)
        mask = rng.random((6, 8)) < 0.5
        mask[2:4, 3:5] = True
        return cls(birdcage_coils(4, (6, 8, 10), coils_per_ring=2), mask)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"image_shape": list(self.in_shape), "coils": self.out_shape[0]},
                {"maps": self.maps_np, "mask": self.mask_np})

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"):
        return cls(arrays["maps"], arrays["mask"], device=device)


_WARNED_NO_CUPY = False


@register_operator("mri-nufft-2d")
class Nufft2D(_CoilOperator):
    """Per-slice multi-coil non-Cartesian SENSE through SigPy's NUFFT (see module docstring).

    ``coord`` (..., 2) in SigPy units (1/FOV, within [-N/2, N/2]) is flattened to ``(n, 2)``; ``dcf`` are
    density compensation weights for adjoint-based (gridding) reconstruction, :meth:`gridding`.
    """

    def __init__(self, maps: np.ndarray, coord: np.ndarray, dcf: np.ndarray | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__(maps, device)
        if self.maps_np.ndim not in (3, 4):
            raise InputError(f"Nufft2D: coil maps must be (C, Y, X) or (Z, C, Y, X), "
                             f"got {self.maps_np.shape}")
        ny, nx = self.maps_np.shape[-2:]
        self.coord_np = np.ascontiguousarray(np.asarray(coord, dtype=np.float32).reshape(-1, 2))
        lim = np.array([ny / 2, nx / 2], dtype=np.float32)
        if (np.abs(self.coord_np) > lim + 1e-3).any():
            raise InputError(f"Nufft2D: trajectory leaves [-N/2, N/2] for image {(ny, nx)}",
                             fix="scale coordinates to units of 1/FOV (sigpy convention).")
        n = self.coord_np.shape[0]
        self.dcf_np = np.ones(n, np.float32) if dcf is None else np.asarray(dcf, np.float32).reshape(n)
        self.n_slices: int | None = self.maps_np.shape[0] if self.maps_np.ndim == 4 else None
        self.in_shape = (ny, nx)
        self.out_shape = (self.maps_np.shape[-3], n)

    def _io(self, t: torch.Tensor) -> tuple[Any, Any, Any, Any]:
        """(array, coord, maps, back-to-torch) for SigPy on the tensor's device: numpy, or CuPy on CUDA."""
        if t.is_cuda:
            try:
                import cupy  # optional: SigPy's GPU backend
            except ImportError:
                global _WARNED_NO_CUPY
                if not _WARNED_NO_CUPY:
                    warnings.warn("Nufft2D: CuPy is not installed; the NUFFT of CUDA tensors runs on the CPU "
                                  "(install the cupy build matching your CUDA for a GPU NUFFT)", stacklevel=4)
                    _WARNED_NO_CUPY = True
            else:
                coord = cupy.from_dlpack(self._t("coord", self.coord_np, t.device, torch.float32))
                maps = cupy.from_dlpack(self._t("maps", self.maps_np, t.device, torch.complex64))
                return cupy.from_dlpack(_complex(t).contiguous()), coord, maps, torch.from_dlpack
        def back(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(t.device)

        return _complex(t).cpu().numpy(), self.coord_np, self.maps_np, back

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_slices(x, 2, self.n_slices)
        arr, coord, maps, back = self._io(x)
        return back(sigpy.nufft(arr[..., None, :, :] * maps, coord))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_slices(y, 3, self.n_slices)
        arr, coord, maps, back = self._io(y)
        img = sigpy.nufft_adjoint(arr, coord, oshape=(*arr.shape[:-1], *self.in_shape))
        return back((img * maps.conj()).sum(-3))

    def gridding(self, y: torch.Tensor) -> torch.Tensor:
        """Density-compensated adjoint A^H (w * y): the classical non-iterative (gridding) reconstruction."""
        w = self._t("dcf", self.dcf_np, y.device, torch.float32)
        return self.adjoint(_complex(y) * w)

    def slab(self, z0: int, z1: int) -> Nufft2D:
        """The operator of slices z0..z1-1; itself when the maps are shared."""
        if self.n_slices is None:
            return self
        return Nufft2D(self.maps_np[z0:z1], self.coord_np, self.dcf_np, self.device)

    @classmethod
    def example(cls) -> Nufft2D:
        coord = radial_trajectory((12, 12), 10, 6)
        return cls(birdcage_coils(3, (12, 12)), coord, density_compensation(coord, (12, 12), "ramp"))

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"image_shape": list(self.in_shape), "coils": self.out_shape[0], "n_slices": self.n_slices,
                 "nufft": {"oversamp": 1.25, "width": 4}},
                {"maps": self.maps_np, "coord": self.coord_np, "dcf": self.dcf_np})

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"):
        return cls(arrays["maps"], arrays["coord"], arrays["dcf"], device=device)


# ---------------------------------------------------------------------------------------------- config

MRI_DEFAULTS: dict[str, Any] = {
    "operator": "sense2d", "coils": 8, "coil_maps": "birdcage", "acceleration": 4.0, "acs_lines": 24,
    "mask": "cartesian_1d", "trajectory": "radial", "spokes": None, "mask_per_slice": False, "seed": 0,
}
_CHOICES = {"operator": ("sense2d", "sense3d", "nufft2d"), "coil_maps": ("birdcage", "espirit"),
            "mask": ("cartesian_1d", "poisson_2d"), "trajectory": ("radial", "spiral")}


def _mri_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and each key this module reads checked; other keys (noise, ...) are not ours."""
    c = {**MRI_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "spokes"}}
    for key, allowed in _CHOICES.items():
        if c[key] not in allowed:
            raise ConfigError(f"mr.{key} = {c[key]!r} is not one of {list(allowed)}",
                              fix=f"set mr.{key} to one of {list(allowed)} in the config file.")
    for key, lo in (("coils", 1), ("acs_lines", 0)):
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < lo:
            raise ConfigError(f"mr.{key} = {c[key]!r} must be an integer >= {lo}", fix=f"fix mr.{key}.")
    if isinstance(c["acceleration"], bool) or not isinstance(c["acceleration"], int | float) \
            or c["acceleration"] < 1:
        raise ConfigError(f"mr.acceleration = {c['acceleration']!r} must be a number >= 1",
                          fix="set mr.acceleration to e.g. 4.")
    if c["spokes"] is not None and (not isinstance(c["spokes"], int) or c["spokes"] < 1):
        raise ConfigError(f"mr.spokes = {c['spokes']!r} must be a positive integer or null",
                          fix="set mr.spokes to e.g. 100, or null for the default.")
    return c


def mri_operator_from_config(cfg: dict[str, Any], shape: tuple[int, int, int], seed: int | None = None,
                             device: torch.device | str = "cpu") -> LinearOperator:
    """The *true* forward operator the measure step simulates with, for a volume of ``shape`` (Z, Y, X).

    Keys (``mr`` section; defaults in :data:`MRI_DEFAULTS`): operator sense2d|sense3d|nufft2d, coils,
    coil_maps (the simulation always uses birdcage maps, the physical truth; ``espirit`` makes
    :func:`calibrated_operator` re-estimate them from the data for reconstruction), acceleration,
    acs_lines, mask cartesian_1d|poisson_2d, mask_per_slice, trajectory radial|spiral, spokes (radial: rays,
    default pi*N/acceleration; spiral: interleaves, default 16), seed (overridden by the ``seed`` argument).
    """
    c = _mri_config(cfg)
    seed = int(c["seed"] if seed is None else seed)
    if len(shape) != 3:
        raise InputError(f"MRI simulation needs a (Z, Y, X) volume, got shape {tuple(shape)}")
    nz, ny, nx = (int(s) for s in shape)
    accel, acs = float(c["acceleration"]), int(c["acs_lines"])
    if c["operator"] == "sense3d":
        maps = birdcage_coils(c["coils"], (nz, ny, nx))
        if c["mask"] == "poisson_2d":
            mask = poisson_mask_2d((nz, ny), accel, acs=acs, seed=seed)
        else:  # ky lines, every kz: only ky is undersampled
            mask = cartesian_mask_1d((ny, nz), accel, min(acs, ny), seed=seed)[:, 0][None, :].repeat(nz, 0)
        return Sense3D(maps, mask, device=device)
    if c["mask"] == "poisson_2d":
        raise ConfigError("mr.mask = poisson_2d undersamples two phase-encode directions, but a 2D "
                          f"acquisition ({c['operator']}) has only one (ky)",
                          fix="use mr.operator: sense3d for Poisson-disc masks, or mr.mask: cartesian_1d.")
    maps = birdcage_coils(c["coils"], (ny, nx))
    if c["operator"] == "sense2d":
        per_slice = nz if c["mask_per_slice"] else None
        mask = cartesian_mask_1d((ny, nx), accel, acs, seed=seed, n_slices=per_slice)
        return Sense2D(maps, mask, device=device)
    if c["mask_per_slice"]:
        raise ConfigError("mr.mask_per_slice applies to Cartesian masks; nufft2d uses one trajectory for "
                          "all slices", fix="set mr.mask_per_slice: false for mr.operator: nufft2d.")
    if c["trajectory"] == "radial":
        coord = radial_trajectory((ny, nx), c["spokes"] or default_spokes((ny, nx), accel))
        dcf = density_compensation(coord, (ny, nx), "ramp")
    else:
        coord = spiral_trajectory((ny, nx), c["spokes"] or 16, accel)
        dcf = density_compensation(coord, (ny, nx), "pipe_menon")
    return Nufft2D(maps, coord, dcf, device=device)


def simulate_kspace(volume: np.ndarray | torch.Tensor, operator: LinearOperator,
                    phase: np.ndarray | None = None) -> torch.Tensor:
    """Noiseless measurement y = A (volume * exp(i phase)) of a magnitude volume (or slab) (Z, Y, X).

    For per-slice operators pass ``operator.slab(z0, z1)`` and the matching ``phase`` slab.
    """
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32) if not torch.is_tensor(volume) else volume)
    x = x.to(torch.complex64)
    if phase is not None:
        x = x * torch.polar(torch.ones((), dtype=torch.float32), torch.as_tensor(phase, dtype=torch.float32))
    with torch.no_grad():
        return operator.forward(x.to(getattr(operator, "device", "cpu")))


def calibrated_operator(cfg: dict[str, Any], operator: LinearOperator,
                        kspace: np.ndarray | torch.Tensor) -> LinearOperator:
    """The operator to store for reconstruction: ``operator`` itself for ``coil_maps: birdcage`` (maps
    known exactly), or the same sampling with ESPIRiT maps estimated from the measured ``kspace``'s ACS
    region (``acs_lines`` wide) for ``coil_maps: espirit``, as on a scanner."""
    c = _mri_config(cfg)
    if c["coil_maps"] == "birdcage":
        return operator
    k = kspace.detach().cpu().numpy() if torch.is_tensor(kspace) else np.asarray(kspace)
    width = int(c["acs_lines"])
    if isinstance(operator, Sense2D):
        return Sense2D(espirit_coils(k, calib_width=width), operator.mask_np, operator.device)
    if isinstance(operator, Sense3D):
        if k.ndim == 5:
            k = k[0]
        return Sense3D(espirit_coils(k, calib_width=width, image_ndim=3), operator.mask_np, operator.device)
    if isinstance(operator, Nufft2D):
        ny, nx = operator.in_shape
        slices = k.reshape(-1, *k.shape[-2:])
        acs = np.stack([calibration_from_samples(s, operator.coord_np, operator.dcf_np, (ny, nx), width)
                        for s in slices])
        maps = espirit_coils(acs, calib_width=width)
        maps = maps if len(maps) > 1 else maps[0]
        return Nufft2D(maps, operator.coord_np, operator.dcf_np, operator.device)
    raise ConfigError(f"coil_maps: espirit is not available for operator {operator.kind!r}",
                      fix="use coil_maps: birdcage.")
