"""Generic iterative solvers on any :class:`~medrecon.physics.operator.LinearOperator`: CGLS, SIRT, TV-PDHG.

All three work on a whole stack of slices at once. For a per-slice operator (``in_shape = (Y, X)``) the image
is ``(Z, Y, X)`` and every leading dimension is a batch: CGLS keeps one step size per slice (so the batch is
exactly Z independent CGLS runs), SIRT is separable anyway, and TV couples the slices only through the
z-difference of its 3D gradient. For a 3D operator the batch is empty and each solver runs on the volume.

Iterates stay in the operator's dtype (float32 / complex64: what ASTRA and SigPy compute in); inner products
and norms that decide step sizes are accumulated in float64 so that long runs do not stall on round-off.

* :func:`cgls` - conjugate gradients on the normal equations, the textbook CGLS (Björck 1996, alg. 7.4.1),
  stopped when the normal-equation residual ||A^H r|| / ||A^H y|| falls below ``tol`` in every slice.
* :func:`sirt` - ``x += relax * C A^T R (y - A x)`` with R = 1 / row sums and C = 1 / column sums (Gregor &
  Benson 2008), obtained by applying A and A^T to ones; it minimises ||A x - y||_R^2, so the R-weighted
  residual decreases monotonically for 0 < relax < 2. Meant for non-negative system matrices (CT).
* :func:`tv_pdhg` - ``min_x 1/2 ||A x - y||^2 + lam TV(x)`` (+ optional x >= 0) by the primal-dual hybrid
  gradient method of Chambolle & Pock (2011, alg. 1 with theta = 1). TV is isotropic, forward differences
  with Neumann boundary along (z, y, x), or (y, x) per slice. See :func:`tv_pdhg` for step sizes and scaling.

The registered methods ("cgls", "sirt", "tv") read their settings from the method's ``params`` dict, complete
with the defaults registered with each (:func:`medrecon.recon.registry.register_method`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from medrecon.errors import ConfigError
from medrecon.physics.operator import LinearOperator
from medrecon.recon.progress import Progress, StepReporter
from medrecon.recon.registry import ReconProblem, ReconResult, register_method

# Power iteration under-estimates ||A||; a 5% margin keeps tau * sigma * ||K||^2 < 1 for PDHG.
_NORM_MARGIN = 1.05


@dataclass
class SolverInfo:
    """What an iterative solver did: iterations run, per-iteration history, whether it stopped early."""

    n_iter: int = 0
    stopped_early: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"n_iter": self.n_iter, "stopped_early": self.stopped_early, "history": self.history,
                **self.extra}


# ----------------------------------------------------------------------------------------------- helpers

def _batched_sq(t: torch.Tensor, n_trailing: int) -> torch.Tensor:
    """Squared norm over the trailing ``n_trailing`` dims in float64: one value per batch element."""
    t64 = t.to(torch.complex128 if t.is_complex() else torch.float64)
    sq = t64.real.square() + t64.imag.square() if t64.is_complex() else t64.square()
    return sq.sum(dim=tuple(range(t.ndim - n_trailing, t.ndim))) if n_trailing else sq


def _expand(v: torch.Tensor, n_trailing: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-batch scalars reshaped to broadcast against tensors with ``n_trailing`` more dims."""
    real = torch.float32 if dtype in (torch.float32, torch.complex64) else torch.float64
    return v.to(real).reshape(*v.shape, *([1] * n_trailing))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (a converged or empty slice takes no further step)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _start(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """Starting image: ``x0`` (copied, cast to the operator's dtype) or zeros of the right batched shape."""
    batch = tuple(y.shape[: y.ndim - len(op.out_shape)])
    shape = (*batch, *op.in_shape)
    if x0 is None:
        return torch.zeros(shape, dtype=op.in_dtype, device=y.device)
    if tuple(x0.shape) != shape:
        raise ValueError(f"initial image has shape {tuple(x0.shape)}, expected {shape}")
    return x0.detach().to(device=y.device, dtype=op.in_dtype).clone()


def operator_norm(op: LinearOperator, device: torch.device | str | None = None, n_iter: int = 30,
                  seed: int = 0) -> float:
    """||A||_2 by seeded power iteration (deterministic), with a 5% safety margin for step sizes."""
    gen = torch.Generator().manual_seed(seed)
    return _NORM_MARGIN * op.norm(n_iter=n_iter, generator=gen, device=device)


# ------------------------------------------------------------------------------------------------- CGLS

def cgls(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None, n_iter: int = 50,
         tol: float = 1e-6, progress: Progress | None = None) -> tuple[torch.Tensor, SolverInfo]:
    """Least squares ``min ||A x - y||`` by CGLS, one independent CG per batch element (slice).

    Stops before ``n_iter`` when every slice has ||A^H r|| <= tol * ||A^H y|| (the normal-equation residual:
    unlike ||r|| it goes to zero for inconsistent data too). History: relative residual ||r|| / ||y|| (all
    slices together) before each iteration and at the end, and the worst slice's relative normal residual.
    ``progress``: called after every iteration (:mod:`medrecon.recon.progress`).
    """
    nin, nout = len(op.in_shape), len(op.out_shape)
    with torch.no_grad():
        x = _start(op, y, x0)
        r = y - op.forward(x)
        s = op.adjoint(r)
        p = s.clone()
        gamma = _batched_sq(s, nin)
        ref = _batched_sq(op.adjoint(y), nin).sqrt()
        y_norm = max(float(_batched_sq(y, nout).sum().sqrt()), 1e-30)
        info = SolverInfo(history={"rel_residual": [], "rel_normal_residual": []})
        report = StepReporter(progress, int(n_iter))

        def record() -> float:
            info.history["rel_residual"].append(float(_batched_sq(r, nout).sum().sqrt()) / y_norm)
            worst = float(_safe_div(gamma.sqrt(), ref).max()) if gamma.numel() else 0.0
            info.history["rel_normal_residual"].append(worst)
            return worst

        for _ in range(int(n_iter)):
            if record() <= tol:
                info.stopped_early = True
                break
            q = op.forward(p)
            alpha = _safe_div(gamma, _batched_sq(q, nout))
            x += _expand(alpha, nin, x.dtype) * p
            r -= _expand(alpha, nout, r.dtype) * q
            s = op.adjoint(r)
            gamma_new = _batched_sq(s, nin)
            beta = _safe_div(gamma_new, gamma)
            p = s + _expand(beta, nin, s.dtype) * p
            gamma = gamma_new
            info.n_iter += 1
            if report:
                report(x.unsqueeze(0).clone(), residual=float(_batched_sq(r, nout).sum().sqrt()) / y_norm)
        else:
            record()
    return x, info


# ------------------------------------------------------------------------------------------------- SIRT

def sirt(op: LinearOperator, y: torch.Tensor, x0: torch.Tensor | None = None, n_iter: int = 100,
         nonneg: bool = True, relax: float = 1.0, progress: Progress | None = None) -> tuple[torch.Tensor, SolverInfo]:
    """SIRT: ``x <- x + relax * C A^T R (y - A x)``, R = 1/(A 1), C = 1/(A^T 1), optional clamp at 0.

    Rows / columns whose sum is zero (rays missing the image, pixels no ray sees) get weight 0. The
    iteration is a gradient descent on ||A x - y||_R^2 in the C^{-1} metric, so for 0 < relax < 2 (and
    without the clamp) the R-weighted residual, recorded in ``history['weighted_residual']`` together with
    the plain ``rel_residual``, decreases monotonically. Requires a real operator with non-negative entries.
    ``progress``: called after every iteration (:mod:`medrecon.recon.progress`).
    """
    if op.in_dtype.is_complex or op.out_dtype.is_complex:
        raise ConfigError("SIRT needs a real operator with non-negative entries (CT); got a complex one",
                          fix="use 'cgls' or the MR methods (sense, l1_wavelet) for complex data.")
    if not 0 < relax < 2:
        raise ConfigError(f"SIRT relaxation must lie in (0, 2), got {relax}", fix="set params.sirt.relax=1.")
    nout = len(op.out_shape)
    with torch.no_grad():
        x = _start(op, y, x0)
        dev = y.device
        row = op.forward(torch.ones(op.in_shape, dtype=op.in_dtype, device=dev))
        col = op.adjoint(torch.ones(op.out_shape, dtype=op.out_dtype, device=dev))
        eps_r, eps_c = 1e-6 * float(row.abs().max()), 1e-6 * float(col.abs().max())
        R = torch.where(row > eps_r, 1.0 / row.clamp_min(eps_r), torch.zeros_like(row))
        C = torch.where(col > eps_c, 1.0 / col.clamp_min(eps_c), torch.zeros_like(col))
        y_norm = max(float(_batched_sq(y, nout).sum().sqrt()), 1e-30)
        info = SolverInfo(history={"rel_residual": [], "weighted_residual": []})
        report = StepReporter(progress, int(n_iter))
        for _ in range(int(n_iter)):
            r = y - op.forward(x)
            info.history["rel_residual"].append(float(_batched_sq(r, nout).sum().sqrt()) / y_norm)
            info.history["weighted_residual"].append(float((r.double().square() * R.double()).sum()))
            x += relax * C * op.adjoint(R * r)
            if nonneg:
                x.clamp_(min=0)
            info.n_iter += 1
            if report:    # the residual is the one before this update (no extra forward)
                report(x.unsqueeze(0).clone(), residual=info.history["rel_residual"][-1])
        r = y - op.forward(x)
        info.history["rel_residual"].append(float(_batched_sq(r, nout).sum().sqrt()) / y_norm)
        info.history["weighted_residual"].append(float((r.double().square() * R.double()).sum()))
    return x, info


# --------------------------------------------------------------------------------------------------- TV

def tv_weights(spacing: tuple[float, ...] | None, ndim: int) -> tuple[float, ...]:
    """Per-axis weights of the finite differences: ``min(h) / h_d`` for spacing h, or all ones.

    The finest axis keeps weight 1, so ``lam`` means the same for isotropic voxels with or without
    spacing; a coarser axis (thick slices) has its difference divided by its larger spacing, i.e. the
    gradient is measured per millimetre rather than per voxel.
    """
    if spacing is None:
        return (1.0,) * ndim
    h = tuple(float(s) for s in spacing)[-ndim:]
    if len(h) != ndim or min(h) <= 0:
        raise ConfigError(f"TV spacing must have {ndim} positive entries, got {spacing}")
    return tuple(min(h) / v for v in h)


def gradient(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Weighted forward differences along the last ``len(weights)`` dims, stacked in a new leading axis.

    Neumann boundary: the difference past the last sample is 0. Output ``(len(weights), *x.shape)``.
    """
    nd = len(weights)
    g = x.new_zeros((nd, *x.shape))
    for i, w in enumerate(weights):
        d = x.ndim - nd + i
        n = x.shape[d]
        if n > 1:
            g[i].narrow(d, 0, n - 1).copy_((x.narrow(d, 1, n - 1) - x.narrow(d, 0, n - 1)) * w)
    return g


def gradient_adjoint(g: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """The exact adjoint of :func:`gradient` (minus the discrete divergence)."""
    nd = len(weights)
    out = torch.zeros_like(g[0])
    for i, w in enumerate(weights):
        d = out.ndim - nd + i
        n = out.shape[d]
        if n > 1:
            gi = g[i].narrow(d, 0, n - 1) * w
            out.narrow(d, 0, n - 1).sub_(gi)
            out.narrow(d, 1, n - 1).add_(gi)
    return out


def gradient_norm_bound(weights: tuple[float, ...]) -> float:
    """Upper bound on ||D||_2 for weighted forward differences: sqrt(4 * sum w_d^2)."""
    return math.sqrt(4.0 * sum(w * w for w in weights))


def total_variation(x: torch.Tensor, weights: tuple[float, ...]) -> float:
    """Isotropic TV: sum over voxels of the Euclidean norm of the (weighted) gradient, in float64."""
    g = gradient(x.to(torch.complex128 if x.is_complex() else torch.float64), weights)
    return float(g.abs().square().sum(0).sqrt().sum())


def _project_ball(q: torch.Tensor, radius: float) -> torch.Tensor:
    """Pointwise projection of the gradient field (axis 0 = direction) onto the l2 ball of ``radius``."""
    mag = q.abs().square().sum(0, keepdim=True).sqrt()
    return q / torch.clamp(mag / max(radius, 1e-30), min=1.0)


def tv_pdhg(op: LinearOperator, y: torch.Tensor, lam: float, x0: torch.Tensor | None = None,
            n_iter: int = 200, nonneg: bool = False, tv_ndim: int = 3,
            spacing: tuple[float, ...] | None = None, tol: float = 0.0,
            norm: float | None = None, record_every: int = 10, progress: Progress | None = None
            ) -> tuple[torch.Tensor, SolverInfo]:
    """``min_x 1/2 ||A x - y||^2 + lam * TV(x)`` (x >= 0 if ``nonneg``) by Chambolle-Pock PDHG.

    ``lam`` is absolute here (image units x measurement units); :func:`tv_method` converts the config's
    relative value. ``tv_ndim`` = 3 differences along (z, y, x) - the last three dims of ``x``, coupling the
    slices of a per-slice stack - or 2 for (y, x) only; a stack of one slice is always 2D. ``spacing``
    (mm, (dz, dy, dx) or (dy, dx)) weights the differences, see :func:`tv_weights`.

    Steps: K = [A; s D] with s = ||A|| / ||D|| so both blocks have the same norm (an unbalanced K makes
    PDHG crawl on one of them); the TV weight becomes lam / s on s D, the same objective. With
    L = ||K|| <= sqrt(2) ||A|| (power iteration + 5% margin), tau = sigma = 0.99 / L. Each iteration costs
    one A and one A^T: A x_bar is formed from A x_k and A x_{k+1} by linearity.

    History: the primal objective at the start, every ``record_every`` iterations and at the end
    (``history['objective_iter']`` says which). With ``tol`` > 0 the run stops when the relative change of
    x between iterations falls below ``tol`` (checked every iteration). ``progress``: called after every
    iteration (:mod:`medrecon.recon.progress`).
    """
    if nonneg and op.in_dtype.is_complex:
        raise ConfigError("non-negativity does not apply to complex images", fix="set nonneg: false.")
    if lam < 0:
        raise ConfigError(f"TV weight must be >= 0, got {lam}", fix="set a non-negative lam.")
    with torch.no_grad():
        x = _start(op, y, x0)
        nd = 2 if (tv_ndim == 2 or x.ndim < 3 or x.shape[-3] == 1) else 3
        if nd == 3 and x.ndim < 3:
            raise ConfigError("3D TV needs an image with at least three dims (z, y, x)")
        w = tv_weights(spacing, nd)
        a_norm = norm if norm is not None else operator_norm(op, device=y.device)
        if a_norm <= 0:
            raise ValueError("operator norm is zero: the operator maps everything to zero")
        d_norm = gradient_norm_bound(w)
        s = a_norm / d_norm
        step = 0.99 / (math.sqrt(2.0) * a_norm)
        tau = sigma = step
        radius = lam / s

        ax = op.forward(x)
        x_bar, ax_bar = x.clone(), ax.clone()
        p = torch.zeros_like(y)
        q = x.new_zeros((nd, *x.shape))
        info = SolverInfo(history={"objective": [], "objective_iter": []},
                          extra={"tau": tau, "sigma": sigma, "op_norm": a_norm, "lam": lam, "tv_ndim": nd,
                                 "tv_weights": list(w)})

        def objective(x_: torch.Tensor, ax_: torch.Tensor) -> float:
            return 0.5 * float(_batched_sq(ax_ - y, 0).sum()) + lam * total_variation(x_, w)

        def record() -> None:
            info.history["objective"].append(objective(x, ax))
            info.history["objective_iter"].append(info.n_iter)

        record()
        report = StepReporter(progress, int(n_iter))
        every = max(1, int(record_every))
        for _ in range(int(n_iter)):
            p = (p + sigma * (ax_bar - y)) / (1.0 + sigma)
            q = _project_ball(q + (sigma * s) * gradient(x_bar, w), radius)
            x_new = x - tau * (op.adjoint(p) + s * gradient_adjoint(q, w))
            if nonneg:
                x_new.clamp_(min=0)
            ax_new = op.forward(x_new)
            x_bar = 2 * x_new - x
            ax_bar = 2 * ax_new - ax
            change = 1.0
            if tol > 0:
                dx = float(_batched_sq(x_new - x, 0).sum().sqrt())
                change = dx / max(float(_batched_sq(x_new, 0).sum().sqrt()), 1e-30)
            x, ax = x_new, ax_new
            info.n_iter += 1
            if report:
                report(x.unsqueeze(0))
            if info.n_iter % every == 0:
                record()
            if tol > 0 and change < tol:
                info.stopped_early = True
                break
        if info.history["objective_iter"][-1] != info.n_iter:
            record()
        info.extra["dual_tv"] = q * s  # the dual variable of lam*||D x||_{2,1}: |q s| <= lam pointwise
    return x, info


def kkt_residual(op: LinearOperator, y: torch.Tensor, x: torch.Tensor, q: torch.Tensor,
                 weights: tuple[float, ...]) -> float:
    """Relative stationarity residual ||A^H (A x - y) + D^T q|| / ||A^H y|| for the unconstrained TV problem.

    Together with |q| <= lam pointwise and <q, D x> = lam TV(x), a small value certifies that x minimises
    1/2 ||Ax - y||^2 + lam TV(x) (the optimality conditions of the convex problem).
    """
    with torch.no_grad():
        g = op.adjoint(op.forward(x) - y) + gradient_adjoint(q.to(x.dtype), weights)
        ref = op.adjoint(y)
    return float(_batched_sq(g, 0).sum().sqrt() / _batched_sq(ref, 0).sum().sqrt())


# -------------------------------------------------------------------------------------- registered methods

def _init(problem: ReconProblem, params: dict) -> torch.Tensor | None:
    """The starting image: ``problem.init`` (e.g. an FBP) unless ``params['init'] == 'zeros'``."""
    mode = params["init"]
    if mode not in ("problem", "zeros"):
        raise ConfigError(f"unknown init {mode!r}", fix="use init: problem (problem.init if given) or zeros.")
    if mode == "zeros" or problem.init is None:
        return None
    return problem.init


def _result(x: torch.Tensor, problem: ReconProblem, info: SolverInfo, t0: float, nfe: int) -> ReconResult:
    d = info.as_dict()
    d.pop("dual_tv", None)
    d["seconds"] = time.perf_counter() - t0
    return ReconResult(samples=x.reshape(1, *problem.image_shape), nfe=nfe, info=d)


@register_method("cgls", modalities=("CT",), defaults={"n_iter": 30, "tol": 1e-6, "init": "problem"},
                 paper="CGLS: Hestenes & Stiefel 1952; Bjorck, Numerical Methods for Least Squares Problems 1996",
                 memory_copies=8)
def cgls_method(problem: ReconProblem, params: dict, prior: Any = None,
                generator: torch.Generator | None = None) -> ReconResult:
    """CGLS. params: ``n_iter`` (int, 30: few iterations act as the regulariser), ``tol`` (float, 1e-6),
    ``init`` ('problem' | 'zeros', 'problem')."""
    t0 = time.perf_counter()
    x, info = cgls(problem.operator, problem.y, _init(problem, params), n_iter=int(params["n_iter"]),
                   tol=float(params["tol"]), progress=problem.progress)
    return _result(x, problem, info, t0, nfe=2 * info.n_iter + 2)


@register_method("sirt", modalities=("CT",),
                 defaults={"n_iter": 100, "nonneg": True, "relax": 1.0, "init": "problem"},
                 paper="SIRT: Gilbert, J. Theor. Biol. 1972; as Gregor & Benson, IEEE TMI 2008", memory_copies=8)
def sirt_method(problem: ReconProblem, params: dict, prior: Any = None,
                generator: torch.Generator | None = None) -> ReconResult:
    """SIRT. params: ``n_iter`` (int, 100), ``nonneg`` (bool, True), ``relax`` (float in (0, 2), 1.0),
    ``init`` ('problem' | 'zeros', 'problem')."""
    t0 = time.perf_counter()
    x, info = sirt(problem.operator, problem.y, _init(problem, params), n_iter=int(params["n_iter"]),
                   nonneg=bool(params["nonneg"]), relax=float(params["relax"]), progress=problem.progress)
    return _result(x, problem, info, t0, nfe=2 * info.n_iter + 3)


def absolute_tv_weight(op: LinearOperator, y: torch.Tensor, lam: float, scale: str,
                       adjoint_abs_max: float | None = None) -> float:
    """Convert the config's TV weight: ``scale='relative'`` multiplies by ||A^H y||_inf, 'absolute' keeps it.

    ||A^H y||_inf is the largest entry of the data term's gradient at x = 0: it scales like
    (operator norm)^2 x (image intensity), so a relative lam means the same on any geometry, pixel size or
    intensity unit. Slab-by-slab runs pass the whole volume's value (``adjoint_abs_max``, computed once by
    :mod:`medrecon.reconstruct`): each slab's own maximum differs, and a different weight per slab left
    seams of ~10 HU between slabs (measured, tests/recon/test_slabs.py).
    """
    if scale == "absolute":
        return float(lam)
    if scale != "relative":
        raise ConfigError(f"unknown TV lam_scale {scale!r}", fix="use lam_scale: relative or absolute.")
    if adjoint_abs_max is not None:
        return float(lam) * float(adjoint_abs_max)
    with torch.no_grad():
        return float(lam) * float(op.adjoint(y).abs().max())


@register_method("tv", modalities=("CT",),
                 defaults={"lam": 1e-4, "lam_scale": "relative", "n_iter": 300, "nonneg": True, "tv_ndim": 3,
                           "spacing_weights": True, "tol": 0.0, "init": "problem"},
                 paper="TV: Rudin, Osher, Fatemi, Physica D 1992; PDHG: Chambolle & Pock, JMIV 2011",
                 memory_copies=14)
def tv_method(problem: ReconProblem, params: dict, prior: Any = None,
              generator: torch.Generator | None = None) -> ReconResult:
    """TV-regularised least squares by PDHG.

    params: ``lam`` (float, 1e-4; best of a scan on the chest phantom at 30 and 60 views, I0 = 1e5),
    ``lam_scale`` ('relative' | 'absolute', 'relative': lam times
    ||A^T y||_inf, see :func:`absolute_tv_weight`), ``n_iter`` (int, 300), ``nonneg`` (bool, True),
    ``tv_ndim`` (2 | 3, 3), ``spacing_weights`` (bool, True: weight differences by problem.meta['spacing']
    (dz, dy, dx) mm when given), ``tol`` (float, 0: run all iterations), ``init`` ('problem' | 'zeros').
    """
    t0 = time.perf_counter()
    op = problem.operator
    lam = absolute_tv_weight(op, problem.y, float(params["lam"]), str(params["lam_scale"]),
                             problem.adjoint_abs_max)
    spacing = problem.meta.get("spacing") if params["spacing_weights"] else None
    tv_ndim = int(params["tv_ndim"])
    if tv_ndim not in (2, 3):
        raise ConfigError(f"tv_ndim must be 2 or 3, got {tv_ndim}", fix="set params.tv.tv_ndim to 2 or 3.")
    x0 = _init(problem, params)
    x, info = tv_pdhg(op, problem.y, lam, x0=x0, n_iter=int(params["n_iter"]), nonneg=bool(params["nonneg"]),
                      tv_ndim=tv_ndim, spacing=spacing, tol=float(params["tol"]), progress=problem.progress)
    return _result(x, problem, info, t0, nfe=2 * info.n_iter + 2 + 60)
