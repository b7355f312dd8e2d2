"""The one test over every registered operator (``medrecon.physics.operator.OPERATORS``).

For each kind's ``example()``: adjointness (dot test, float64 accumulation) on a batch of slices when the
operator works per slice; autograd's backward equals the adjoint; ``state()`` / ``from_state()`` through
JSON rebuilds an operator with identical outputs; and, where a CUDA GPU is present, CPU/GPU parity.

Kinds with ``requires_gpu = True`` (cone-beam CT) have no CPU path: on a CPU machine their tests skip with
that reason, and on a GPU machine they run on the GPU (with the class's ``gpu_dot_tol``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medrecon.physics.operator import OPERATORS, LinearOperator, dot_test, operator_from_state

# Registration happens on import. mri.py is written in parallel by another helper: import it when present,
# and report (not hide) an import failure.
IMPORT_ERRORS: dict[str, str] = {}
for _mod in ("medrecon.physics.ct", "medrecon.physics.mri"):
    if importlib.util.find_spec(_mod) is None:
        continue
    try:
        importlib.import_module(_mod)
    except Exception as err:  # a broken module must fail a test, not the collection of all of them
        IMPORT_ERRORS[_mod] = repr(err)

KINDS = sorted(OPERATORS)
HAS_CUDA = torch.cuda.is_available()


def _example(kind: str) -> tuple[LinearOperator, str]:
    """The kind's example and the device its checks run on (GPU-only kinds skip on CPU machines)."""
    cls = OPERATORS[kind]
    if getattr(cls, "requires_gpu", False):
        if not HAS_CUDA:
            pytest.skip(f"{kind} needs a CUDA GPU (requires_gpu); this machine has none")
        return cls.example(), "cuda"
    return cls.example(), "cpu"


def _batch(op: LinearOperator) -> tuple[int, ...]:
    """A batch of 3 slices for per-slice (2D image) operators; none for volume operators."""
    return (3,) if getattr(op, "per_slice", len(op.in_shape) == 2) else ()


def _rand(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, smooth: bool = False
) -> torch.Tensor:
    """Random tensor of ``dtype``; ``smooth`` upsamples noise 4x along the last two dims (for parity checks
    of GPU kernels that interpolate, which white noise would exaggerate)."""

    def real() -> torch.Tensor:
        if smooth and len(shape) >= 2 and min(shape[-2:]) >= 4:
            lo = torch.randn((*shape[:-2], -(-shape[-2] // 4), -(-shape[-1] // 4)), generator=gen)
            flat = lo.reshape(-1, 1, *lo.shape[-2:])
            up = F.interpolate(flat, size=shape[-2:], mode="bilinear", align_corners=False)
            return up.reshape(shape).double()
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    t = torch.complex(real(), real()) if dtype.is_complex else real()
    return t.to(dtype)


def test_operator_modules_import():
    assert not IMPORT_ERRORS, f"operator modules failed to import: {IMPORT_ERRORS}"
    assert {"ct-parallel", "ct-fan", "ct-cone"} <= set(OPERATORS)


@pytest.mark.parametrize("kind", KINDS)
def test_adjointness(kind):
    op, device = _example(kind)
    gen = torch.Generator().manual_seed(0)
    err = dot_test(op, _batch(op), gen, device=device)
    tol = getattr(type(op), "gpu_dot_tol", 1e-4) if device == "cuda" else 1e-4
    assert err < tol, f"{kind}: relative adjointness error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_backward_is_adjoint(kind):
    """grad_x Re<A x, y> = A^H y (torch's convention for complex tensors)."""
    op, device = _example(kind)
    gen = torch.Generator().manual_seed(1)
    batch = _batch(op)
    x = _rand((*batch, *op.in_shape), op.in_dtype, gen).to(device).requires_grad_(True)
    y = _rand((*batch, *op.out_shape), op.out_dtype, gen).to(device)
    loss = (y.conj() * op(x)).real.sum() if y.is_complex() else (y * op(x)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    expected = op.adjoint(y).detach()
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # and the adjoint's backward is the forward
    y.requires_grad_(True)
    xs = _rand(x.shape, op.in_dtype, gen).to(device)
    loss2 = (xs.conj() * op.adjoint(y)).real.sum() if xs.is_complex() else (xs * op.adjoint(y)).sum()
    (grad_y,) = torch.autograd.grad(loss2, y)
    fx = op(xs).detach()
    assert torch.allclose(grad_y, fx, rtol=1e-5, atol=1e-6 * float(fx.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip(kind):
    op, device = _example(kind)
    params, arrays = op.state()
    params2 = json.loads(json.dumps(params))  # what a measurement store keeps
    arrays2 = {k: np.array(v, copy=True) for k, v in arrays.items()}
    op2 = operator_from_state(kind, params2, arrays2, device=device)
    assert type(op2) is type(op)
    assert tuple(op2.in_shape) == tuple(op.in_shape) and tuple(op2.out_shape) == tuple(op.out_shape)
    gen = torch.Generator().manual_seed(2)
    batch = _batch(op)
    x = _rand((*batch, *op.in_shape), op.in_dtype, gen).to(device)
    y = _rand((*batch, *op.out_shape), op.out_dtype, gen).to(device)
    assert torch.equal(op(x), op2(x))
    assert torch.equal(op.adjoint(y), op2.adjoint(y))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_gpu_parity(kind):
    """Same operator on CPU and CUDA tensors; tolerance from the class (``gpu_parity_rtol``, default 1e-4).

    GPU-only kinds have no CPU reference; their GPU adjointness runs in :func:`test_adjointness`.
    """
    cls = OPERATORS[kind]
    if getattr(cls, "requires_gpu", False):
        pytest.skip(f"{kind} has no CPU path to compare with (GPU adjointness is tested instead)")
    op = cls.example()
    tol = getattr(cls, "gpu_parity_rtol", 1e-4)
    gen = torch.Generator().manual_seed(3)
    batch = _batch(op)
    x = _rand((*batch, *op.in_shape), op.in_dtype, gen, smooth=True)
    y = _rand((*batch, *op.out_shape), op.out_dtype, gen, smooth=True)
    for apply, t in ((op.forward, x), (op.adjoint, y)):
        cpu = apply(t)
        gpu = apply(t.cuda()).cpu()
        err = float((gpu - cpu).norm() / cpu.norm())
        assert err < tol, f"{kind}: CPU/GPU relative difference {err:.2e} >= {tol:.0e}"
