"""FBP-UNet (FBPConvNet; Jin, McCann, Froustey, Unser, IEEE TIP 2017): the supervised, one-geometry baseline.

Reference code ``panakino/FBPConvNet`` (MatConvNet; ``main.m``, ``cnn_fbpconvnet.m`` @8fcff8a); our summary is in
docs/algorithms.md and /work/shared/algorithms-wave2.md section 7. Per slice:

1. the FBP of the measurement, ``u = FBP(y)`` (the reconstruct step computes it, registry ``init="fbp"``; it is
   recomputed here when the network was trained with another filter than ``ram-lak`` or no start was given);
2. ``x = u + UNet(u)``: the network predicts the residual, in the network domain of its checkpoint (CT window,
   background-padded canvas with sides that are multiples of 16, so any slice size works), in passes of at
   most ``batch`` slices.

One network forward pass per slice, no data consistency: the result is only as good as the match between the
measurement and the acquisition the network was trained on. The network therefore refuses any other geometry
(beam, views, angles, detector, image grid, I0, mu_water) with one ConfigError naming both
(:func:`medrecon.diffusion.supervised.check_geometry`): that is the contrast with the diffusion methods, which
use one prior for every geometry. Training (kind ``supervised``): :mod:`medrecon.diffusion.supervised`, where
the departures from the reference are listed. Deterministic: the generator is not used.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from medrecon.diffusion.supervised import SupervisedPrior, check_geometry
from medrecon.errors import ConfigError
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

FBP_UNET_DEFAULTS: dict[str, Any] = {"batch": 16}

_PAPER = ("Jin, McCann, Froustey, Unser: Deep Convolutional Neural Network for Inverse Problems in Imaging "
          "(FBPConvNet), IEEE TIP 2017")


@register_method("fbp_unet", modalities=("CT",), defaults=FBP_UNET_DEFAULTS, prior="supervised",
                 loader="medrecon.diffusion.supervised:supervised_from_checkpoint", init="fbp", paper=_PAPER,
                 memory_copies=8)
def fbp_unet(problem: ReconProblem, params: dict, prior: SupervisedPrior,
             generator: torch.Generator | None = None) -> ReconResult:
    """FBP + UNet(FBP) with a network trained for this acquisition. params: ``batch`` (slices per network pass,
    16; null = all at once)."""
    p = params
    if p["batch"] is not None and int(p["batch"]) < 1:
        raise ConfigError(f"fbp_unet: batch must be >= 1 or null, got {p['batch']}", fix="use e.g. batch: 16")
    if not isinstance(prior, SupervisedPrior):
        raise ConfigError("fbp_unet needs a supervised (FBP-UNet) prior, got "
                          f"{type(prior).__name__}", fix="train one with train.<name>.kind: supervised and point "
                                                         "reconstruct.priors.CT.fbp_unet at it")
    check_geometry(prior.geometry, problem, prior.meta.get("checkpoint", "the supervised prior"))
    t0 = time.perf_counter()
    if problem.init is not None and prior.filter == "ram-lak":
        u = problem.init
    else:
        from medrecon.recon.ct_fbp import fbp

        with torch.no_grad():
            u = fbp(problem.operator, problem.y, prior.filter)
    x = prior(u.reshape(problem.image_shape).to(problem.operator.in_dtype), p["batch"])
    info = {"method": "fbp_unet", "params": p, "time_s": time.perf_counter() - t0, "filter": prior.filter,
            "checkpoint": prior.meta.get("checkpoint")}
    return ReconResult(samples=x.reshape(1, *problem.image_shape), nfe=1, info=info)
