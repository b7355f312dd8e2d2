"""Prior kinds: what ``medrecon train`` can train, each registered by the module that implements it.

A kind ("slice", "slab", "patch", "autoencoder", "latent", "supervised") is the ``kind`` of a training config
(``train.<name>.kind``) and of the checkpoint it writes; reconstruction methods name the kind they need
(:mod:`medrecon.recon.registry`). The module of a kind registers a function
``train(cfg, volumes, out, resume) -> checkpoint path`` with :func:`register_kind`; it builds the kind's
dataset and network and runs the one training loop (:func:`medrecon.diffusion.train.run_training`), so the
loop never imports a kind. :func:`train_prior` (what ``medrecon train`` calls) dispatches on ``cfg["kind"]``
after :func:`training_kinds` has imported every module of :mod:`medrecon.diffusion`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medrecon.errors import ConfigError

TrainFn = Callable[[dict[str, Any], Sequence[Any], Path, bool], Any]


@dataclass(frozen=True)
class TrainingKind:
    """A registered prior kind: its name, one line on what it is, and the function that trains it."""

    name: str
    description: str
    train: TrainFn
    module: str


_KINDS: dict[str, TrainingKind] = {}
_PACKAGE = "medrecon.diffusion"


def register_kind(name: str, description: str) -> Callable[[TrainFn], TrainFn]:
    """Function decorator: ``fn(cfg, volumes, out, resume=True)`` trains a prior of kind ``name``."""

    def deco(fn: TrainFn) -> TrainFn:
        if name in _KINDS and _KINDS[name].module != fn.__module__:
            raise ValueError(f"prior kind {name!r} registered twice ({_KINDS[name].module}, {fn.__module__})")
        _KINDS[name] = TrainingKind(name, description, fn, fn.__module__)
        return fn

    return deco


def training_kinds() -> dict[str, TrainingKind]:
    """Every registered prior kind (imports the modules of :mod:`medrecon.diffusion`, which register them)."""
    package = importlib.import_module(_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_PACKAGE}.{info.name}")
    return dict(_KINDS)


def train_prior(cfg: dict[str, Any], volumes: Sequence[Any], out: str | Path, resume: bool = True) -> Path:
    """Train the prior ``cfg`` (a ``train.<name>`` section) describes on the training ``volumes``; returns the
    checkpoint path ``out``."""
    kinds = training_kinds()
    kind = (cfg or {}).get("kind", "slice")
    if kind not in kinds:
        raise ConfigError(f"unknown prior kind {kind!r} in the training config",
                          fix=f"set train.<name>.kind to one of: {', '.join(sorted(kinds))}")
    return Path(kinds[kind].train(cfg, volumes, Path(out), resume))
