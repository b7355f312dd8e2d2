"""What every diffusion sampler shares: its parameter check, its slice layout, sample passes and NFE counting.

:class:`SliceLayout` is the one place where samplers map a problem's image (``*lead, Y, X``) to the denoiser's
batch of canvases (padded to the network's multiple with the prior's background,
:mod:`medrecon.diffusion.canvas`); DDS, DPS, DiffusionBlend, PaDIS and the latent samplers all use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from medrecon.diffusion.canvas import Canvas, CanvasDenoiser, network_multiple, prior_background
from medrecon.diffusion.denoiser import Prior
from medrecon.errors import ConfigError, InputError
from medrecon.physics.operator import LinearOperator
from medrecon.recon.registry import ReconProblem, validate_params

# The ``dtype`` parameter of every sampler.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# The loader of the whole-slice prior (training kind "slice") that most samplers take.
SLICE_PRIOR_LOADER = "medrecon.diffusion.checkpoint:prior_from_checkpoint"


def check_params(method: str, params: dict | None) -> dict[str, Any]:
    """The sampler's parameters, complete (:func:`~medrecon.recon.registry.validate_params`: unknown keys are a
    ConfigError), with the checks every sampler shares: ``samples`` >= 1 and a known ``dtype``."""
    out = validate_params(method, params)
    if int(out["samples"]) < 1:
        raise ConfigError(f"{method}: samples must be >= 1, got {out['samples']}",
                          fix="set samples: 1 or more")
    if out["dtype"] not in DTYPES:
        raise ConfigError(f"{method}: dtype must be one of {sorted(DTYPES)}, got {out['dtype']!r}",
                          fix="use float32 (networks) or float64 (analytic checks)")
    return out


@dataclass
class SliceLayout:
    """How a problem's image (*lead, Y, X) maps to the denoiser batch (samples * prod(lead), C, Y', X').

    (Y', X') is the :class:`~medrecon.diffusion.canvas.Canvas`: the slice centred in the smallest frame whose
    sides are multiples of ``multiple`` (default: what the prior's network needs), padded with the prior's
    background. This is the one place where samplers pad: the state and the denoiser live on the canvas
    (:attr:`denoiser` returns the background in the padded region), image-domain steps see the crop.
    ``multiple=1`` turns it off (PaDIS tiles any size itself).
    """

    problem: ReconProblem
    prior: Prior
    dtype: torch.dtype
    multiple: int | None = None

    def __post_init__(self) -> None:
        p, op = self.problem, self.problem.operator
        shape = tuple(p.image_shape)
        n_in = len(op.in_shape)
        if len(shape) < 2 or len(shape) < n_in or tuple(shape[len(shape) - n_in:]) != tuple(op.in_shape):
            raise InputError(f"image shape {shape} does not end with the operator's input shape "
                             f"{tuple(op.in_shape)}", fix="the measurement store and the operator disagree; "
                             "re-run the measure step for this volume")
        if op.in_dtype.is_complex != (self.prior.channels == 2):
            kind = "complex" if op.in_dtype.is_complex else "real"
            raise InputError(f"the operator's image is {kind} but the prior has {self.prior.channels} "
                             "channel(s)",
                             fix="use a 2-channel (real/imag) prior for complex MR images, 1 channel for CT")
        self.image_shape = shape
        self.lead = shape[:-2]
        self.n_slices = math.prod(self.lead)
        self.out_dims = tuple(range(-len(op.out_shape), 0))
        self.y = p.y.to(op.out_dtype)
        mult = network_multiple(self.prior.denoiser) if self.multiple is None else int(self.multiple)
        self.canvas = Canvas(*shape[-2:], multiple=mult, value=prior_background(self.prior))
        self._denoiser: Any = None

    @property
    def op(self) -> LinearOperator:
        return self.problem.operator

    @property
    def denoiser(self) -> Any:
        """The prior's denoiser on canvases (itself when no padding is needed)."""
        if self._denoiser is None:
            self._denoiser = self.prior.denoiser if self.canvas.identity \
                else CanvasDenoiser(self.prior.denoiser, self.canvas)
        return self._denoiser

    def image(self, x_batch: torch.Tensor, n: int) -> torch.Tensor:
        """Denoiser batch (canvases) of n samples -> image domain (n, *image_shape), in the operator's dtype."""
        return self.prior.unpack(self.canvas.crop(x_batch), (n, *self.lead), self.op.in_dtype)

    def batch(self, x_image: torch.Tensor) -> torch.Tensor:
        """Image domain (n, *image_shape) -> denoiser batch (canvases, background around) in the prior domain."""
        return self.canvas.pad(self.prior.pack(x_image, self.dtype))

    def _linear_prior(self) -> Prior:
        """The prior's image map without its offset: what a *change* of the image maps to."""
        return dataclasses.replace(self.prior, offset=0.0)

    def image_delta(self, v_batch: torch.Tensor, n: int) -> torch.Tensor:
        """A change of the denoiser batch -> the change of the image (the linear part of :meth:`image`; the
        padded region is dropped). Null-space projections (DDNM, MCG) act on changes, not on states."""
        return self._linear_prior().unpack(self.canvas.crop(v_batch), (n, *self.lead), self.op.in_dtype)

    def batch_delta(self, d_image: torch.Tensor) -> torch.Tensor:
        """A change of the image (n, *image_shape) -> the change of the denoiser batch, zero in the padding."""
        return self.canvas.zero_padding(self.canvas.pad(self._linear_prior().pack(d_image, self.dtype)))

    def batch_shape(self, n: int) -> tuple[int, ...]:
        return (n * self.n_slices, self.prior.channels, *self.canvas.shape)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise of ``shape`` on the problem's device in the sampler's dtype, drawn in float64 from
        the (CPU) generator: one seed gives the same chain in float32 and float64 and on any device."""
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(self.problem.y.device, self.dtype)

    def residual_norms(self, x_image: torch.Tensor) -> torch.Tensor:
        """||y - A x|| per operator application (Hermitian for complex data)."""
        return torch.linalg.vector_norm(self.y - self.op.forward(x_image), dim=self.out_dims)


def sample_chunks(total: int, per_pass: int | None) -> list[int]:
    """Split ``total`` samples into passes of at most ``per_pass`` (all at once when None)."""
    per = total if not per_pass else max(1, int(per_pass))
    return [min(per, total - i) for i in range(0, total, per)]


def reset_nfe(denoiser: Any) -> None:
    if hasattr(denoiser, "reset_nfe"):
        denoiser.reset_nfe()


def init_image(name: str, problem: ReconProblem, p: dict) -> torch.Tensor | None:
    """The image the method's ``init`` parameter names (the reconstruct step computes it into ``problem.init``), in
    the operator's dtype; None when ``init`` is unset. A named init without the image is refused, never ignored."""
    if p.get("init") in (None, "none"):
        return None
    if problem.init is None:
        raise ConfigError(f"{name}: init is {p['init']!r} but the problem has no starting image",
                          fix="run through the reconstruct step (it computes the image init names), set "
                              "problem.init, or set init: none")
    return problem.init.to(problem.operator.in_dtype)


def warm_start_image(name: str, problem: ReconProblem, p: dict) -> torch.Tensor | None:
    """The problem's starting image when the sampler's ``start`` < 1 (a warm start), else None; a warm start
    without one (``init`` unset) is refused rather than silently run from noise."""
    if float(p["start"]) >= 1.0:
        return None
    if problem.init is None:
        raise ConfigError(f"{name}: start {p['start']} < 1 needs a starting image, and init is {p['init']!r}",
                          fix="set init to a classical method of this modality (e.g. init: tv or fbp)")
    return problem.init.to(problem.operator.in_dtype)
