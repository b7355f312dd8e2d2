"""Generic solvers (CGLS, SIRT, TV-PDHG) on small dense operators whose exact answers numpy can compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrecon.errors import ConfigError
from medrecon.physics.operator import LinearOperator
from medrecon.recon.classical import (
    cgls,
    gradient,
    gradient_adjoint,
    gradient_norm_bound,
    kkt_residual,
    sirt,
    total_variation,
    tv_pdhg,
    tv_weights,
)
from medrecon.recon.registry import METHODS, ReconProblem


class DenseOp(LinearOperator):
    """y = M vec(x) per slice: a test-only operator (not registered, so the shared registry test skips it)."""

    def __init__(self, m: np.ndarray, in_shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> None:
        self.M = torch.as_tensor(m, dtype=dtype)
        self.in_shape = tuple(in_shape)
        self.out_shape = (m.shape[0],)
        self.in_dtype = self.out_dtype = dtype

    def _forward(self, x):
        n = len(self.in_shape)
        return x.reshape(*x.shape[: x.ndim - n], -1) @ self.M.T

    def _adjoint(self, y):
        return (y @ self.M.conj()).reshape(*y.shape[:-1], *self.in_shape)

    @classmethod
    def example(cls):
        return cls(np.eye(4), (2, 2))

    def state(self):
        return {}, {"M": self.M.numpy()}

    @classmethod
    def from_state(cls, params, arrays, device="cpu"):
        raise NotImplementedError



def _rng(seed=0):
    return np.random.default_rng(seed)


def test_cgls_matches_lstsq_per_slice():
    rng = _rng(1)
    m = rng.standard_normal((40, 25))
    op = DenseOp(m, (5, 5))
    y = torch.as_tensor(rng.standard_normal((3, 40)))  # 3 slices, inconsistent data
    x, info = cgls(op, y, n_iter=100, tol=1e-10)
    ref = np.linalg.lstsq(m, y.numpy().T, rcond=None)[0].T.reshape(3, 5, 5)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-8)
    assert info.stopped_early and info.n_iter <= 30  # 25 unknowns: <= 25 CG steps in exact arithmetic
    assert info.history["rel_normal_residual"][-1] <= 1e-10


def test_cgls_warm_start_and_zero_slice():
    rng = _rng(2)
    m = rng.standard_normal((30, 16))
    op = DenseOp(m, (4, 4))
    x_true = rng.standard_normal((2, 16))
    y = torch.as_tensor(x_true @ m.T)
    y[1] = 0.0  # an empty slice must stay exactly zero, not produce NaN
    x, _ = cgls(op, y, n_iter=40, tol=1e-12)
    np.testing.assert_allclose(x[0].numpy().ravel(), x_true[0], atol=1e-9)
    assert torch.all(x[1] == 0)
    # warm start at the solution: stops at once
    x2, info2 = cgls(op, y, x0=x, n_iter=40, tol=1e-8)
    assert info2.n_iter == 0 and info2.stopped_early
    torch.testing.assert_close(x2, x)


def test_sirt_weighted_residual_monotone_and_converges():
    rng = _rng(3)
    m = rng.uniform(0, 1, (60, 36)) * (rng.uniform(size=(60, 36)) < 0.3)  # sparse non-negative, like CT
    op = DenseOp(m, (6, 6))
    x_true = rng.uniform(0.5, 1.5, (2, 36))
    y = torch.as_tensor(x_true @ m.T)
    x, info = sirt(op, y, n_iter=300, nonneg=False)
    wr = np.array(info.history["weighted_residual"])
    assert np.all(np.diff(wr) <= 1e-12 * wr[0])
    assert wr[-1] < 1e-3 * wr[0]
    r = np.array(info.history["rel_residual"])
    assert r[-1] < 0.2 * r[0]
    err = np.linalg.norm(x.numpy().reshape(2, 36) - x_true) / np.linalg.norm(x_true)
    assert err < 0.05


def test_sirt_nonneg_and_complex_refused():
    rng = _rng(4)
    m = rng.uniform(0, 1, (30, 16))
    op = DenseOp(m, (4, 4))
    y = torch.as_tensor(rng.standard_normal((1, 30)))  # noisy data pushes some pixels negative
    x, _ = sirt(op, y, n_iter=20, nonneg=True)
    assert float(x.min()) >= 0.0
    x_free, _ = sirt(op, y, n_iter=20, nonneg=False)
    assert float(x_free.min()) < 0.0
    cop = DenseOp(m.astype(complex), (4, 4), dtype=torch.complex128)
    with pytest.raises(ConfigError, match="complex"):
        sirt(cop, y.to(torch.complex128))


def test_gradient_adjoint_and_norm_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    w = tv_weights((3.0, 1.0, 1.5), 3)
    assert w == pytest.approx((1 / 3, 1.0, 2 / 3))
    p = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    lhs = float((gradient(x, w) * p).sum())
    rhs = float((x * gradient_adjoint(p, w)).sum())
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    # power iteration on D^T D stays below the analytic bound
    v = torch.randn(8, 8, 8, generator=g, dtype=torch.float64)
    for _ in range(200):
        v = gradient_adjoint(gradient(v, w), w)
        v /= v.norm()
    est = float(gradient_adjoint(gradient(v, w), w).norm()) ** 0.5
    assert est <= gradient_norm_bound(w) and est > 0.9 * gradient_norm_bound(w)
    # TV of a step of height 2 across a 4x5 face, z weight 1/3 -> 2 * 20 / 3
    step = torch.zeros(4, 5, 6, dtype=torch.float64)
    step[2:] = 2.0
    assert total_variation(step, w) == pytest.approx(2 * 30 / 3)


def test_tv_lambda_zero_is_least_squares():
    rng = _rng(5)
    m = rng.standard_normal((50, 16)) / np.sqrt(50)
    op = DenseOp(m, (4, 4))
    y = torch.as_tensor(rng.standard_normal((3, 50)))
    x, _ = tv_pdhg(op, y, lam=0.0, n_iter=800)
    ref = np.linalg.lstsq(m, y.numpy().T, rcond=None)[0].T.reshape(3, 4, 4)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)


def test_tv_pdhg_reaches_the_optimum():
    """Objective drops, a run from a different start lands on the same x, and the KKT conditions hold."""
    rng = _rng(6)
    z, ny, nx = 3, 6, 6
    m = rng.standard_normal((30, ny * nx)) / np.sqrt(30)  # under-determined: TV decides the answer
    op = DenseOp(m, (ny, nx))
    x_true = np.zeros((z, ny, nx))
    x_true[:, 1:4, 2:5] = 1.0
    x_true[1:, 3:, :2] = 0.5
    y = torch.as_tensor(x_true.reshape(z, -1) @ m.T + 0.01 * rng.standard_normal((z, 30)))
    lam = 0.02
    x, info = tv_pdhg(op, y, lam=lam, n_iter=1000, record_every=1)
    obj = info.history["objective"]
    assert obj[-1] < 0.2 * obj[0]
    assert obj[-1] <= min(obj) + 1e-8 * obj[0]  # it ends at (numerically) the best value it visited
    x2, _ = tv_pdhg(op, y, lam=lam, n_iter=1000, x0=torch.as_tensor(rng.standard_normal((z, ny, nx))))
    np.testing.assert_allclose(x2.numpy(), x.numpy(), atol=1e-4)
    w = tv_weights(None, 3)
    q = info.extra["dual_tv"]
    assert float(q.square().sum(0).sqrt().max()) <= lam * (1 + 1e-9)
    assert kkt_residual(op, y, x, q, w) < 1e-6
    dual_tv = float((q * gradient(x, w)).sum())
    assert dual_tv == pytest.approx(lam * total_variation(x, w), rel=1e-4)
    # and TV recovers the piecewise-constant truth far better than minimum-norm least squares
    ls = np.linalg.lstsq(m, y.numpy().T, rcond=None)[0].T.reshape(z, ny, nx)
    assert np.linalg.norm(x.numpy() - x_true) < 0.5 * np.linalg.norm(ls - x_true)


def test_tv_nonneg_and_2d():
    rng = _rng(7)
    m = rng.standard_normal((20, 16)) / np.sqrt(20)
    op = DenseOp(m, (4, 4))
    y = torch.as_tensor(rng.standard_normal((1, 20)))
    x, info = tv_pdhg(op, y, lam=0.01, n_iter=300, nonneg=True)
    assert float(x.min()) >= 0 and info.extra["tv_ndim"] == 2  # one slice -> 2D TV
    _, info3 = tv_pdhg(op, torch.cat([y, y]), lam=0.01, n_iter=300, tv_ndim=2)
    assert info3.extra["tv_ndim"] == 2
    with pytest.raises(ConfigError, match="lam"):
        tv_pdhg(op, y, lam=-1.0)


def test_registered_methods_return_one_sample():
    rng = _rng(8)
    m = rng.uniform(0, 1, (40, 16))
    op = DenseOp(m, (4, 4))
    x_true = rng.uniform(0, 1, (2, 4, 4))
    y = torch.as_tensor(x_true.reshape(2, -1) @ m.T)
    problem = ReconProblem(y=y, operator=op, modality="CT", image_shape=(2, 4, 4),
                           meta={"spacing": (2.0, 1, 1)})
    for name, params in [("cgls", {"n_iter": 40}), ("sirt", {"n_iter": 400}),
                         ("tv", {"lam": 1e-6, "n_iter": 3000})]:
        res = METHODS[name](problem, params)
        assert res.samples.shape == (1, 2, 4, 4)
        err = np.linalg.norm(res.samples[0].numpy() - x_true) / np.linalg.norm(x_true)
        assert err < 0.05, (name, err)
        assert res.info["n_iter"] > 0 and res.info["seconds"] >= 0
    with pytest.raises(ConfigError, match="init"):
        METHODS["cgls"](problem, {"init": "fbp?"})
