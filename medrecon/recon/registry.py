"""One signature and one registry for every reconstruction method, classical or diffusion.

A method is a function ``method(problem, params, prior, generator) -> ReconResult``. It works in the
operator's image domain (linear attenuation in 1/mm for CT, complex image for MR); unit conversion,
slab splitting and storage happen outside, in the CLI, so every method is written once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medrecon.errors import ConfigError
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
# Methods that start from a classical reconstruction: the reconstruct step puts it in ``ReconProblem.init``
# ("fbp": filtered back-projection of per-slice CT; other modalities/geometries get no init).
METHOD_INIT: dict[str, str | None] = {}


def register_method(name: str, modalities: tuple[str, ...] = ("CT", "MR"),
                    params: tuple[str, ...] | None = None, init: str | None = None) -> Callable[[Method], Method]:
    """Function decorator: register a reconstruction method under ``name`` for the given modalities.

    ``params``: the keys the method reads; any other key in its params is a :class:`ConfigError` before it runs
    (a typo such as ``iters`` for ``n_iter`` must not pass silently). Methods that check their own parameters
    (the diffusion samplers, with defaults) leave it None. ``init``: the starting image the method documents
    (``"fbp"``), or ``"param"`` when the method's own ``init`` parameter names a classical method whose result
    is the start; computed by the reconstruct step for every slab.
    """

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        run = fn
        if params is not None:
            allowed = frozenset(params)

            @functools.wraps(fn)
            def run(problem: ReconProblem, p: dict, prior: Any = None,
                    generator: torch.Generator | None = None) -> ReconResult:
                unknown = sorted(set(p or {}) - allowed)
                if unknown:
                    raise ConfigError(f"unknown parameter(s) {unknown} for method {name!r}",
                                      fix=f"use only {sorted(allowed) or 'no parameters'} under "
                                          f"reconstruct.params.{name} (see the method's docstring)")
                return fn(problem, p, prior, generator)

        METHODS[name] = run
        METHOD_MODALITIES[name] = modalities
        METHOD_INIT[name] = init
        return run

    return deco
