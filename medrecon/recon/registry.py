"""One signature and one registry for every reconstruction method, classical or diffusion.

A method is a function ``method(problem, params, prior, generator) -> ReconResult``. It works in the
operator's image domain (linear attenuation in 1/mm for CT, complex image for MR); unit conversion,
slab splitting and storage happen outside, in the CLI, so every method is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medrecon.physics.operator import LinearOperator


@dataclass
class ReconProblem:
    """A measured inverse problem: ``y = A x + noise`` for a stack of slices (or one 3D volume).

    Attributes:
        y: measurement, leading dim = slices for per-slice operators.
        operator: the forward model A (per slice, or 3D).
        modality: "CT" or "MR".
        image_shape: shape of x as the operator expects it, including the slice dim, e.g. (Z, Y, X).
        noise_std: standard deviation of the measurement noise where known (per measurement sample).
        init: optional starting image (e.g. FBP) in the image domain.
        meta: anything else the method may use (geometry, normalisation).
    """

    y: torch.Tensor
    operator: LinearOperator
    modality: str
    image_shape: tuple[int, ...]
    noise_std: float | None = None
    init: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReconResult:
    """Samples ``(S, *image_shape)`` in the image domain (S = 1 for deterministic methods)."""

    samples: torch.Tensor
    nfe: int = 0
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[[ReconProblem, dict, Any, torch.Generator | None], ReconResult]
METHODS: dict[str, Method] = {}
METHOD_MODALITIES: dict[str, tuple[str, ...]] = {}


def register_method(name: str, modalities: tuple[str, ...] = ("CT", "MR")) -> Callable[[Method], Method]:
    """Function decorator: register a reconstruction method under ``name`` for the given modalities."""

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = fn
        METHOD_MODALITIES[name] = modalities
        return fn

    return deco
