"""One signature and one registry for every reconstruction method, classical or diffusion.

A method is a function ``method(problem, params, prior, generator) -> ReconResult``. It works in the
operator's image domain (linear attenuation in 1/mm for CT, complex image for MR); unit conversion,
slab splitting and storage happen outside (:mod:`medrecon.reconstruct`), so every method is written once.

Everything the rest of medrecon knows about a method is what its module passes to :func:`register_method`
(a :class:`MethodSpec` in :data:`REGISTRY`): name, modalities, starting image, the prior kind it needs and
the loader that turns checkpoints into that prior, its parameters with their defaults, and the paper it
follows. :func:`load_all` imports every module of the method packages (:data:`METHOD_PACKAGES`), so
adding a method is one module in ``medrecon/methods/`` (diffusion) or ``medrecon/recon/`` (classical) plus
its test; ``tests/recon/test_registry.py`` checks every registered method the same way. A module registers
its method so::

    @register_method("mymethod", modalities=("CT",), defaults={"steps": 50, "samples": 1, "dtype": "float32"},
                     prior="slice", loader="medrecon.diffusion.checkpoint:prior_from_checkpoint",
                     paper="Author et al.: Title, Venue Year", memory_copies=64)
    def mymethod(problem, params, prior, generator=None) -> ReconResult:
        ...   # params is complete: the defaults above, overridden by reconstruct.params.mymethod

and from then on it is in ``medrecon methods``, accepted in ``reconstruct.methods`` / ``--method``, its
parameters are checked, its prior is loaded by ``loader`` and its memory is budgeted.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medrecon.config.options import fill_defaults
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
        progress: per-step callback of iterative methods (:mod:`medrecon.recon.progress`: every diffusion
            sampler calls it once per step with ``{"i", "n", "elapsed_s", "x0", ...}``); None = silent.
    """

    y: torch.Tensor
    operator: LinearOperator
    modality: str
    image_shape: tuple[int, ...]
    noise_std: float | None = None
    init: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[dict[str, Any]], None] | None = None

    @property
    def adjoint_abs_max(self) -> float | None:
        """max |A^H y| of the whole volume when the reconstruct step recorded it (``meta["volume_stats"]``): the
        scale of relative regularisation weights, shared by every slab of a slab-wise run."""
        return self.meta.get("volume_stats", {}).get("adjoint_abs_max")


@dataclass
class ReconResult:
    """Samples ``(S, *image_shape)`` in the image domain (S = 1 for deterministic methods)."""

    samples: torch.Tensor
    nfe: int = 0
    info: dict[str, Any] = field(default_factory=dict)


Method = Callable[[ReconProblem, dict, Any, torch.Generator | None], ReconResult]
Loader = Callable[..., Any]

# The packages whose modules register methods: every module in them is imported by load_all().
METHOD_PACKAGES = ("medrecon.recon", "medrecon.methods")
# Starting images the reconstruct step can compute for a method (registry ``init``).
# "param": the method's own ``init`` parameter names a classical method whose result is the start.
INITS = (None, "fbp", "param")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: the one record of everything about it outside its own code.

    Attributes:
        name: the name in configs (``reconstruct.methods``, ``reconstruct.params.<name>``) and on the CLI.
        run: the method, with its parameters checked against ``defaults`` and filled from them.
        modalities: the modalities it reconstructs ("CT", "MR").
        defaults: every parameter the method reads, with its default (the method's API: the study config
            overrides them under ``reconstruct.params.<name>``; the schema does not repeat them).
        prior: the kind of prior checkpoint it needs (a training kind of
            :mod:`medrecon.diffusion.kinds`: "slice", "slab", "patch", "latent"), None for classical methods.
        loader: "module:function" (or a callable) that turns the checkpoint path(s) into that prior;
            called as ``loader(*paths, device=..., expect_modality=..., [image_units=..., mu_water=...])``.
        init: the starting image the reconstruct step computes for it (``"fbp"``: FBP of per-slice CT;
            ``"param"``: the result of the classical method its ``init`` parameter names, a warm start).
        paper: one line: the paper (or textbook) the method follows.
        memory_copies: image-sized float32 arrays alive at once per slice (the working set
            :mod:`medrecon.budget` checks against ``memory_mb``; rough upper bounds from the algorithm).
        module: the module that registered it.
    """

    name: str
    run: Method
    modalities: tuple[str, ...]
    defaults: dict[str, Any]
    prior: str | None
    loader: str | Loader | None
    init: str | None
    paper: str
    memory_copies: float
    module: str

    def load_prior(self) -> Loader:
        """The prior loader as a callable (imported on first use: classical runs import no torch models)."""
        if self.loader is None:
            raise ConfigError(f"method {self.name!r} takes no prior", fix=f"drop the prior for {self.name!r}")
        if callable(self.loader):
            return self.loader
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, MethodSpec] = {}
# Name -> the callable method: the registry's ``run``s, for code that only calls methods.
METHODS: dict[str, Method] = {}


def validate_params(name: str, params: dict | None) -> dict[str, Any]:
    """The method's parameters: ``params`` over its registered defaults (a copy). The one parameter check of
    every method: a key the method does not have (a typo such as ``iters`` for ``n_iter``) is a
    :class:`ConfigError` naming the method, the key and the allowed keys, before anything runs."""
    return fill_defaults(params, get_method(name).defaults, what="parameter", context=f" for method {name!r}",
                         where=f"reconstruct.params.{name} (`medrecon methods` lists every method's parameters)")


def register_method(name: str, modalities: tuple[str, ...] = ("CT", "MR"), *, defaults: dict[str, Any],
                    paper: str, memory_copies: float, prior: str | None = None, loader: str | Loader | None = None,
                    init: str | None = None) -> Callable[[Method], Method]:
    """Function decorator: register a reconstruction method (see :class:`MethodSpec` for the arguments).

    The decorated function receives its parameters already checked and complete (:func:`validate_params`);
    value checks that need more than the key (ranges, enums) stay in the method. Returns the checked method.
    """
    if init not in INITS:
        raise ValueError(f"method {name!r}: init must be one of {INITS}, got {init!r}")
    if (prior is None) != (loader is None):
        raise ValueError(f"method {name!r}: give both a prior kind and its loader, or neither")
    if not paper:
        raise ValueError(f"method {name!r}: name the paper it follows (paper=...)")

    def deco(fn: Method) -> Method:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice ({REGISTRY[name].module}, {fn.__module__})")

        @functools.wraps(fn)
        def run(problem: ReconProblem, p: dict | None = None, prior: Any = None,
                generator: torch.Generator | None = None) -> ReconResult:
            return fn(problem, validate_params(name, p), prior, generator)

        REGISTRY[name] = MethodSpec(name=name, run=run, modalities=tuple(modalities), defaults=dict(defaults),
                                    prior=prior, loader=loader, init=init, paper=paper,
                                    memory_copies=float(memory_copies), module=fn.__module__)
        METHODS[name] = run
        return run

    return deco


_loaded = False


def load_all() -> dict[str, MethodSpec]:
    """Import every module of :data:`METHOD_PACKAGES` (each registers its methods); the complete registry."""
    global _loaded
    if not _loaded:
        _loaded = True      # set first: medrecon.methods' __init__ calls load_all() while it is imported here
        try:
            for pkg in METHOD_PACKAGES:
                package = importlib.import_module(pkg)
                for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                    importlib.import_module(f"{pkg}.{info.name}")
        except BaseException:
            _loaded = False
            raise
    return REGISTRY


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is a ConfigError listing the registered ones."""
    if name not in REGISTRY:
        load_all()
    if name not in REGISTRY:
        raise ConfigError(f"Unknown reconstruction method {name!r}.",
                          fix=f"use one of: {', '.join(sorted(REGISTRY))} (`medrecon methods` describes them).")
    return REGISTRY[name]
