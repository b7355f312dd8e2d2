"""Data-consistency solvers for diffusion samplers: CG on the normal equations and DDS's z-TV ADMM step.

DDS (Chung, Lee, Ye, ICLR 2024; ``HJ-harry/DDS@509b140``, ``utils.py:CG``, ``solver_3d.py``) replaces the
gradient step of DPS by a few conjugate-gradient iterations on the normal equations, warm-started at the
Tweedie estimate x0_hat, so the update stays in a Krylov subspace around x0_hat (early stopping is the
regulariser). What medrecon does the same and differently:

* ``cg_normal`` solves ``(A^H A + lam I) x = A^H y + lam x0``. ``lam = 0`` is DDS's noiseless system;
  DDS's "noisy" system ``(I + gamma A^T A) x = x0_hat + gamma A^T y`` is the same with ``lam = 1/gamma``.
  lam is in image-domain units (it competes with ``A^H A``), so it depends on the operator's scaling.
* Inner products are Hermitian (real part of ``vdot``) so CG is right for complex MRI data; DDS's code uses
  the bilinear ``r^T r`` there.
* ``n_batch`` leading dims index *independent* systems with their own CG step sizes (e.g. 1 for
  posterior samples, 2 for samples x slices). For a per-slice operator the stacked system is block
  diagonal, so joint CG (DDS 3D: one step size for the whole volume) and per-slice CG converge to the same
  exact solution; after a few iterations the iterates differ, and per-slice CG is at least as far along in
  every slice. Samples must always be separate systems or their early-stopped iterates would be coupled.
* The early exit is relative (``||r|| <= tol ||rhs||`` per system); DDS uses an absolute 1e-5.
* Weights are dimensionless by default (:func:`absolute_dc_weights`): ``lam`` and ``rho`` are fractions of
  ||A||^2 and ``ztv_lambda`` of ||A^H y||_inf, so one value means the same on any geometry, pixel size or
  number of views (measured on the real validation CT: ||A||^2 = 1.5e4 .. 3.8e4 for three subjects of one
  study, because the grid's pixel size follows each FOV; DDS's absolute rho = 10 is for its own Radon).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medrecon.errors import ConfigError
from medrecon.physics.operator import LinearOperator


def operator_norm_sq(op: LinearOperator, device: torch.device | None = None, n_iter: int = 30) -> float:
    """||A||^2 by power iteration from a fixed seed (reruns agree). A per-slice operator is probed on its first
    slice: CT slices share one geometry, and MR coil maps are normalised, so every slice has the same norm
    (up to its mask); this keeps the cost at 30 single-slice normal operations."""
    probe = op.slab(0, 1) if hasattr(op, "slab") else op
    shape = (1, *probe.in_shape) if probe is not op else None
    return probe.norm(n_iter, generator=torch.Generator().manual_seed(0), device=device, shape=shape) ** 2


def absolute_dc_weights(op: LinearOperator, aty: torch.Tensor, params: dict,
                        adjoint_abs_max: float | None = None) -> dict[str, float]:
    """``lam``, ``rho`` and ``ztv_lambda`` of a sampler's params in the operator's units.

    ``weights: relative`` (the default): lam and rho multiply ||A||^2 (:func:`operator_norm_sq`), ztv_lambda
    multiplies ||A^H y||_inf (the whole volume's, when slab-wise runs pass ``adjoint_abs_max``, as TV does).
    The soft threshold ztv_lambda / rho is then a fraction of the image scale ||A^H y||_inf / ||A||^2 (about
    the largest attenuation for CT). ``weights: absolute`` keeps them as given (DDS's convention; they then
    depend on the operator's scaling). The norm is only estimated when a weight that needs it is used.
    """
    mode = params.get("weights", "relative")
    raw = {k: float(params.get(k, 0.0)) for k in ("lam", "rho", "ztv_lambda")}
    if mode == "absolute":
        return raw
    if mode != "relative":
        raise ConfigError(f"unknown weights {mode!r}", fix="use weights: relative (fractions of ||A||^2 and "
                          "||A^H y||_inf) or absolute (the operator's units)")
    uses_rho = bool(params.get("ztv", False))
    norm_sq = operator_norm_sq(op, aty.device) if raw["lam"] or (uses_rho and raw["rho"]) else 0.0
    amax = float(adjoint_abs_max) if adjoint_abs_max is not None else float(aty.abs().max())
    return {"lam": raw["lam"] * norm_sq, "rho": raw["rho"] * norm_sq if uses_rho else raw["rho"],
            "ztv_lambda": raw["ztv_lambda"] * amax}


def _dot(a: torch.Tensor, b: torch.Tensor, n_batch: int) -> torch.Tensor:
    """Re <a, b> over all but the first n_batch dims, kept for broadcasting."""
    dims = tuple(range(n_batch, a.ndim))
    return (a.conj() * b).real.sum(dim=dims, keepdim=True) if dims else (a.conj() * b).real


@torch.no_grad()
def cg(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x0: torch.Tensor, n_iter: int,
       tol: float = 1e-6, n_batch: int = 0) -> torch.Tensor:
    """Conjugate gradients for a Hermitian positive (semi-)definite ``apply(x) = rhs``, warm-started at x0.

    Runs at most ``n_iter`` iterations; systems (indexed by the first ``n_batch`` dims) whose residual
    fell below ``tol * ||rhs||`` stop moving.
    """
    x = x0.clone()
    r = rhs - apply(x)
    p = r.clone()
    rr = _dot(r, r, n_batch)
    stop = tol * _dot(rhs, rhs, n_batch).sqrt()
    for _ in range(int(n_iter)):
        active = rr.sqrt() > stop
        if not bool(active.any()):
            break
        ap = apply(p)
        pap = _dot(p, ap, n_batch)
        alpha = torch.where(active & (pap > 0), rr / pap.clamp_min(1e-300), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r, n_batch)
        beta = torch.where(active & (rr > 0), rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
    return x


def cg_normal(op: LinearOperator, y: torch.Tensor | None, x0: torch.Tensor, n_iter: int = 5, lam: float = 0.0,
              tol: float = 1e-6, n_batch: int = 0, aty: torch.Tensor | None = None) -> torch.Tensor:
    """Early-stopped CG on ``(A^H A + lam I) x = A^H y + lam x0`` from x0 (DDS data consistency).

    ``x0`` has shape ``(*batch, *op.in_shape)``; ``y`` broadcasts against ``op.forward(x0)``. Pass a
    precomputed ``aty = A^H y`` (then ``y`` may be None) to save one adjoint per diffusion step.
    """
    if aty is None:
        if y is None:
            raise ValueError("cg_normal needs y or aty")
        with torch.no_grad():
            aty = op.adjoint(y)
    rhs = aty + lam * x0 if lam else aty.expand_as(x0)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return op.normal(x) + lam * x if lam else op.normal(x)

    return cg(apply, rhs, x0, n_iter, tol, n_batch)


def pinv_normal(op: LinearOperator, rhs: torch.Tensor, n_iter: int = 20, tol: float = 1e-6,
                n_batch: int = 0) -> torch.Tensor:
    """``A^+ b`` from ``rhs = A^H b``: CG from zero on ``A^H A x = rhs`` (DDNM's and MCG's projections).

    Every CG iterate lies in the Krylov space of ``A^H A`` started at ``A^H b``, inside range(A^H), so the
    limit is the minimum-norm least-squares solution, i.e. the Moore-Penrose pseudo-inverse applied to b,
    without an SVD. Early stopping (``n_iter``) truncates it, which for ill-conditioned operators (CT) is also
    the regulariser. ``A^+ A v`` (the range-space part of v) is ``pinv_normal(op, op.normal(v))``.
    """
    return cg_normal(op, None, torch.zeros_like(rhs), n_iter, 0.0, tol, n_batch, aty=rhs)


def diff_z(x: torch.Tensor, axis: int = -3) -> torch.Tensor:
    """Circular forward difference along the slice axis: (D_z x)[i] = x[i+1] - x[i] (DDS ``_Dz``)."""
    return torch.roll(x, -1, dims=axis) - x


def diff_z_adjoint(v: torch.Tensor, axis: int = -3) -> torch.Tensor:
    """D_z^T v: (D_z^T v)[i] = v[i-1] - v[i] (circular)."""
    return torch.roll(v, 1, dims=axis) - v


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """prox of t|.|_1 (complex-aware: shrinks the magnitude, keeps the phase)."""
    mag = v.abs()
    return v * (1 - t / mag.clamp_min(1e-30)).clamp_min(0)


@dataclass
class ZTVState:
    """ADMM split variable z = D_z x and scaled dual u; persistent across diffusion steps (DDS 3D)."""

    z: torch.Tensor | None = None
    u: torch.Tensor | None = None


@torch.no_grad()
def ztv_admm_step(op: LinearOperator, y: torch.Tensor | None, x0: torch.Tensor, state: ZTVState, rho: float,
                  lam: float, n_cg: int = 5, axis: int = -3, n_batch: int = 0, tol: float = 1e-6,
                  aty: torch.Tensor | None = None, prox: float = 0.0) -> torch.Tensor:
    """One ADMM iteration for min_x 1/2 ||A x - y||^2 + lam ||D_z x||_1 (DDS ``solver_3d.py``).

    x-update: ``n_cg`` CG steps from x0 on ``(A^H A + rho D_z^T D_z) x = A^H y + rho D_z^T (z - u)``;
    then ``z = soft(D_z x + u, lam / rho)`` and ``u += D_z x - z``. ``state`` is updated in place and
    carries (z, u) to the next diffusion step; it starts at zero. ``axis`` is the slice axis of x.
    ``prox`` > 0 adds ``prox/2 ||x - x0||^2`` to the objective (``+ prox I`` left, ``+ prox x0`` right): the
    noise-aware data consistency of DiffusionMBIR (:mod:`medrecon.methods.diffusionmbir`); 0 is DDS's step.
    """
    if aty is None:
        aty = op.adjoint(y)
    if state.z is None or state.z.shape != x0.shape:
        state.z = torch.zeros_like(x0)
        state.u = torch.zeros_like(x0)

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = op.normal(x) + rho * diff_z_adjoint(diff_z(x, axis), axis)
        return out + prox * x if prox else out

    rhs = aty + rho * diff_z_adjoint(state.z - state.u, axis)
    if prox:
        rhs = rhs + prox * x0
    x = cg(apply, rhs, x0, n_cg, tol, n_batch)
    dx = diff_z(x, axis)
    state.z = soft_threshold(dx + state.u, lam / rho)
    state.u = state.u + dx - state.z
    return x
