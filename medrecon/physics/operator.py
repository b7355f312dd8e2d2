"""The linear-operator interface every forward model implements, and the registry of all of them.

An operator maps tensors whose *trailing* dimensions are ``in_shape`` to tensors whose trailing dimensions
are ``out_shape``; any leading dimensions are a batch (for per-slice geometries: the slices of a volume, so
one call handles a whole slab). ``forward`` is differentiable: its backward is the adjoint, through
:class:`_Apply`, so samplers can take gradients of data-fidelity terms through ASTRA or SigPy code that
torch cannot see into.

Subclasses implement ``_forward`` and ``_adjoint`` on detached tensors and register themselves with
:func:`register_operator`, giving a small ``example()`` instance so that one parametrised test checks
adjointness (and CPU/GPU parity) of every operator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

OPERATORS: dict[str, type[LinearOperator]] = {}


def register_operator(name: str) -> Callable[[type[LinearOperator]], type[LinearOperator]]:
    """Class decorator: register an operator class under ``name`` (its ``kind``).

    The registry serves two purposes: the shared tests iterate over it (each class's ``example()``), and
    :func:`operator_from_state` rebuilds an operator from what a measurement store saved.
    """

    def deco(cls: type[LinearOperator]) -> type[LinearOperator]:
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} registered twice")
        cls.kind = name
        OPERATORS[name] = cls
        return cls

    return deco


def operator_from_state(kind: str, params: dict, arrays: dict[str, np.ndarray] | None = None,
                        device: torch.device | str = "cpu") -> LinearOperator:
    """Rebuild an operator saved with :meth:`LinearOperator.state` (e.g. from a measurement store)."""
    if kind not in OPERATORS:
        raise KeyError(f"unknown operator kind {kind!r}; known: {sorted(OPERATORS)}")
    return OPERATORS[kind].from_state(params, arrays or {}, device=device)


class _Apply(torch.autograd.Function):
    """y = A x with backward A^H g (the conjugate-linear convention torch uses for complex tensors)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: LinearOperator, adjoint: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.adjoint = op, adjoint
        return op._adjoint(x) if adjoint else op._forward(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        op = ctx.op
        return (op._forward(g) if ctx.adjoint else op._adjoint(g)), None, None


class LinearOperator(ABC):
    """A linear map between tensor spaces, batched over leading dimensions.

    Attributes:
        in_shape: trailing shape of the input (image) tensor.
        out_shape: trailing shape of the output (measurement) tensor.
        in_dtype / out_dtype: real or complex torch dtypes.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x on a detached tensor with trailing dims ``in_shape``."""

    @abstractmethod
    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^H y on a detached tensor with trailing dims ``out_shape``."""

    kind: str = ""

    @classmethod
    @abstractmethod
    def example(cls) -> LinearOperator:
        """A small, fast instance for the registry's shared tests (adjointness, parity)."""

    @abstractmethod
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything needed to rebuild this operator: JSON-able params and named numpy arrays
        (masks, coil maps, trajectories). Stored in the measurement zarr so a reconstruction needs
        nothing else."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray],
                   device: torch.device | str = "cpu") -> LinearOperator:
        """Inverse of :meth:`state`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x, differentiable with respect to x (backward = adjoint)."""
        self._check(x, self.in_shape, "input")
        return _Apply.apply(x, self, False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^H y, differentiable with respect to y (backward = forward)."""
        self._check(y, self.out_shape, "measurement")
        return _Apply.apply(y, self, True)

    __call__ = forward

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x, the system matrix of least squares / CG data consistency."""
        return self.adjoint(self.forward(x))

    def norm(self, n_iter: int = 30, generator: torch.Generator | None = None,
             device: torch.device | str | None = None, shape: tuple[int, ...] | None = None) -> float:
        """Spectral norm ||A||_2 by power iteration on A^H A (for step sizes of gradient methods).

        ``shape``: the probe's shape when the operator needs leading dims (default ``in_shape``), e.g.
        ``(1, *in_shape)`` for a one-slice slab of an operator with per-slice coil maps or masks."""
        x = torch.randn(shape or self.in_shape, generator=generator, dtype=torch.float64).to(self.in_dtype)
        if device is not None:
            x = x.to(device)
        x = x / x.norm()
        lam = torch.zeros(())
        with torch.no_grad():
            for _ in range(n_iter):
                z = self.normal(x)
                lam = z.norm()
                if lam == 0:
                    return 0.0
                x = z / lam
        return float(lam.sqrt())

    def _check(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        n = len(shape)
        if tuple(t.shape[t.ndim - n:]) != tuple(shape) or t.ndim < n:
            raise ValueError(f"{type(self).__name__}: {what} must end with shape {tuple(shape)}, "
                             f"got {tuple(t.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in={tuple(self.in_shape)}, out={tuple(self.out_shape)})"


def dot_test(op: LinearOperator, batch: tuple[int, ...] = (), generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> float:
    """Relative adjointness error |<Ax, y> - <x, A^H y>| / (|<Ax,y>|) with float64 accumulation."""
    def rand(shape, dtype):
        t = torch.randn((*batch, *shape), generator=generator, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn((*batch, *shape), generator=generator, dtype=torch.float64))
        return t.to(dtype).to(device)

    x = rand(op.in_shape, op.in_dtype)
    y = rand(op.out_shape, op.out_dtype)
    with torch.no_grad():
        ax = op.forward(x).to(torch.complex128)
        aty = op.adjoint(y).to(torch.complex128)
    lhs = torch.vdot(ax.flatten(), y.to(torch.complex128).flatten())
    rhs = torch.vdot(x.to(torch.complex128).flatten(), aty.flatten())
    return float((lhs - rhs).abs() / max(lhs.abs().item(), 1e-30))
