"""Step progress of iterative reconstructions: the samplers' per-step callback and the logger that throttles it.

Every diffusion sampler, and the iterative classical CT solvers (cgls, sirt, tv), report each step to
``problem.progress`` (a field of :class:`~medrecon.recon.registry.ReconProblem`; None = no reporting, nothing
computed), as crowsonkb/k-diffusion's samplers call their ``callback``: once per step, with a dict

    ``i`` (0-based step index, counted over every sample pass), ``n`` (total steps = steps per pass x passes),
    ``elapsed_s`` (seconds since the sampler started), ``x0`` (the current estimate in the operator's image
    domain, ``(samples in this pass, *image_shape)``, detached), ``pass``/``passes``, and where the sampler
    has them ``t`` (VP timestep) or ``sigma`` (noise level), and ``residual`` (relative ``||A x0 - y|| / ||y||``,
    given only where the solver has it for free: cgls, sirt).

A sampler uses :class:`StepReporter` (cheap when there is no callback). The reconstruct step fills
``problem.progress`` with :func:`logging_progress`, which logs one line every ``max(1, n // 10)`` steps, at
least every ``min_interval_s`` seconds, and always the first and last step; the residual costs one forward
operator per *logged* step only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from medrecon.physics.operator import LinearOperator

Progress = Callable[[dict[str, Any]], None]


class StepReporter:
    """What a sampler calls once per step: numbers the steps and calls the callback (if any) with the dict.

    ``steps``: steps per sample pass; ``passes``: number of passes (``sample_chunks``). ``bool(reporter)``
    says whether anyone listens, so a sampler can skip building costly fields.
    """

    def __init__(self, callback: Progress | None, steps: int, passes: int = 1) -> None:
        self.callback = callback
        self.steps, self.passes = int(steps), int(passes)
        self.i = 0
        self.t0 = time.perf_counter()

    def __bool__(self) -> bool:
        return self.callback is not None

    def __call__(self, x0: torch.Tensor, **fields: Any) -> None:
        if self.callback is not None:
            info = {"i": self.i, "n": self.steps * self.passes, "elapsed_s": time.perf_counter() - self.t0,
                    "pass": self.i // max(1, self.steps), "passes": self.passes, "x0": x0.detach(), **fields}
            self.callback(info)
        self.i += 1


def relative_residual(operator: LinearOperator, x0: torch.Tensor, y: torch.Tensor) -> float:
    """``||A mean(x0) - y|| / ||y||`` for an estimate ``(samples, *image_shape)`` (one forward operator)."""
    with torch.no_grad():
        x = x0.mean(dim=0).to(operator.in_dtype)
        y = y.to(operator.out_dtype)
        den = float(torch.linalg.vector_norm(y))
        return float(torch.linalg.vector_norm(operator.forward(x) - y)) / max(den, 1e-30)


def logging_progress(logger: logging.Logger, label: str, operator: LinearOperator | None = None,
                     y: torch.Tensor | None = None, *, every: int | None = None, min_interval_s: float = 30.0,
                     clock: Callable[[], float] = time.monotonic, level: int = logging.INFO) -> Progress:
    """A progress callback that logs ``"<label> step k/K, elapsed X s[, residual R]"`` to ``logger``.

    It logs the first and the last step, every ``every`` steps (default ``max(1, K // 10)``), and any step
    at least ``min_interval_s`` seconds (by ``clock``) after the last line. With ``operator`` and ``y`` the
    line has the relative data residual of the step's ``x0`` (unless the sampler gave ``residual``),
    computed on logged steps only.
    """
    last = [clock()]

    def callback(info: dict[str, Any]) -> None:
        i, n = int(info["i"]), int(info["n"])
        step = every if every is not None else max(1, n // 10)
        now = clock()
        if not (i == 0 or i == n - 1 or (i + 1) % step == 0 or now - last[0] >= min_interval_s):
            return
        last[0] = now
        elapsed = float(info.get("elapsed_s", 0.0))
        text = f"{label} step {i + 1}/{n}, elapsed {elapsed:.1f} s"
        if i + 1 < n and i > 0:
            text += f", ETA {elapsed / (i + 1) * (n - i - 1):.0f} s"
        resid = info.get("residual")
        if resid is None and operator is not None and y is not None and info.get("x0") is not None:
            resid = relative_residual(operator, info["x0"], y)
        if resid is not None:
            text += f", residual {float(resid):.4g}"
        logger.log(level, text)

    return callback
