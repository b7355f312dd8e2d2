"""Noise models: Monte-Carlo moments of CT counts, the floor, seeding, MRI noise level for a requested SNR."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medrecon.errors import ConfigError
from medrecon.physics import noise

I0 = 1e4
P = np.array([0.5, 2.0, 4.0])  # expected counts 6065, 1353, 183
N = 40_000  # samples per line integral


def _moments_ok(counts: np.ndarray, lam: np.ndarray, extra_var: float = 0.0) -> None:
    """Mean and variance within 5 standard errors (Poisson: Var(s^2) ~ (mu4 - sigma^4) / n)."""
    n = counts.shape[-1]
    var = lam + extra_var
    mean_se = np.sqrt(var / n)
    # 4th central moment of Poisson(lam) + Normal(0, e^2): lam(1 + 3 lam) + 6 lam e^2 + 3 e^4
    mu4 = lam * (1 + 3 * lam) + 6 * lam * extra_var + 3 * extra_var**2
    var_se = np.sqrt((mu4 - var**2) / n)
    assert np.all(np.abs(counts.mean(-1) - lam) < 5 * mean_se)
    assert np.all(np.abs(counts.var(-1, ddof=1) - var) < 5 * var_se)


def test_poisson_counts_mean_and_variance():
    p = np.repeat(P[:, None], N, axis=1)
    counts = noise.ct_counts(p, I0, seed=11)
    _moments_ok(counts, I0 * np.exp(-P))


def test_electronic_noise_adds_its_variance():
    p = np.repeat(P[:, None], N, axis=1)
    counts = noise.ct_counts(p, I0, electronic_std=20.0, seed=12)
    _moments_ok(counts, I0 * np.exp(-P), extra_var=400.0)


def test_noisy_line_integrals_and_floor():
    p = np.array([[0.0, 1.0, 30.0]], dtype=np.float32)  # exp(-30) * 1e4 ~ 1e-9 photons: always floored
    out = noise.ct_poisson_noise(p, I0, seed=1)
    assert out.line_integrals.dtype == np.float32
    np.testing.assert_allclose(out.line_integrals, -np.log(out.counts / I0), rtol=1e-6)
    assert out.counts[0, 2] == 1.0 and out.line_integrals[0, 2] == pytest.approx(math.log(I0))
    floored = noise.ct_poisson_noise(p, I0, seed=1, floor=0.5)
    assert floored.counts[0, 2] == 0.5
    # very high dose: noise vanishes (relative error ~ 1/sqrt(I0 e^-p) = 1e-6)
    hi = noise.ct_poisson_noise(p[:, :2], 1e12, seed=1).line_integrals
    np.testing.assert_allclose(hi, p[:, :2], atol=1e-4)


def test_ct_noise_is_deterministic_and_slab_independent():
    p = np.random.default_rng(0).uniform(0, 3, size=(6, 10, 12))
    a = noise.ct_poisson_noise(p, I0, electronic_std=2.0, seed=7).line_integrals
    b = noise.ct_poisson_noise(p, I0, electronic_std=2.0, seed=7).line_integrals
    c = noise.ct_poisson_noise(p, I0, electronic_std=2.0, seed=8).line_integrals
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    lo = noise.ct_poisson_noise(p[:2], I0, electronic_std=2.0, seed=7, z0=0).line_integrals
    hi = noise.ct_poisson_noise(p[2:], I0, electronic_std=2.0, seed=7, z0=2).line_integrals
    np.testing.assert_array_equal(np.concatenate([lo, hi]), a)
    g1 = noise.ct_poisson_noise(p, I0, generator=np.random.default_rng(5)).line_integrals
    g2 = noise.ct_poisson_noise(p, I0, generator=np.random.default_rng(5)).line_integrals
    np.testing.assert_array_equal(g1, g2)


def test_ct_noise_on_tensors_matches_numpy():
    p = np.random.default_rng(1).uniform(0, 3, size=(3, 8, 9)).astype(np.float32)
    ref = noise.ct_poisson_noise(p, I0, seed=4)
    t = noise.ct_poisson_noise(torch.from_numpy(p), I0, seed=4)
    assert isinstance(t.line_integrals, torch.Tensor) and t.line_integrals.dtype == torch.float32
    np.testing.assert_array_equal(t.line_integrals.numpy(), ref.line_integrals)
    assert json.loads(json.dumps(t.record)) == {
        "model": "ct_poisson",
        "seed": 4,
        "I0": I0,
        "electronic_std": 0.0,
        "floor": 1.0,
    }


def test_ct_noise_errors():
    with pytest.raises(ConfigError, match="I0"):
        noise.ct_poisson_noise(np.zeros(3), 0.0, seed=1)
    with pytest.raises(ConfigError, match="electronic_std"):
        noise.ct_poisson_noise(np.zeros(3), I0, electronic_std=-1.0, seed=1)
    with pytest.raises(ConfigError, match="exactly one"):
        noise.ct_poisson_noise(np.zeros(3), I0)
    with pytest.raises(ConfigError, match="NaN"):
        noise.ct_poisson_noise(np.array([np.nan]), I0, seed=1)


def _kspace(shape=(4, 128, 128), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 3 + 1j * rng.standard_normal(shape) + 0.5).astype(np.complex64)


def test_mri_noise_level_matches_requested_snr():
    """SNR 20 dB = 10: sigma = rms|k| / 10. Per complex sample E|n|^2 = sigma^2 with Var|n|^2 = sigma^4, so
    the sample mean of |n|^2 over n = 65536 samples is within 5 sigma^2 / sqrt(n) of sigma^2."""
    k = _kspace()
    noisy, sigma, record = noise.mri_gaussian_noise(k, 20.0, seed=3)
    rms = np.sqrt(np.mean(np.abs(k.astype(np.complex128)) ** 2))
    assert sigma == pytest.approx(rms / 10, rel=1e-9)
    n = (noisy - k).astype(np.complex128).ravel()
    assert abs(np.mean(np.abs(n) ** 2) - sigma**2) < 5 * sigma**2 / math.sqrt(n.size)
    # circular: real and imaginary parts each carry half of the power, zero mean
    for part in (n.real, n.imag):
        assert abs(part.var() - sigma**2 / 2) < 5 * (sigma**2 / 2) * math.sqrt(2 / n.size)
        assert abs(part.mean()) < 5 * sigma / math.sqrt(2 * n.size)
    assert noisy.dtype == np.complex64
    assert record["snr_db"] == pytest.approx(20.0) and record["sigma"] == pytest.approx(sigma)
    json.dumps(record)


def test_mri_noise_variants():
    k = _kspace((2, 32, 32))
    a, s_db, _ = noise.mri_gaussian_noise(k, 10.0, seed=1)
    b, s_lin, _ = noise.mri_gaussian_noise(k, snr=10**0.5, seed=1)
    assert s_db == pytest.approx(s_lin)
    np.testing.assert_array_equal(a, b)
    _, s_max, _ = noise.mri_gaussian_noise(k, 10.0, seed=1, reference="signal max")
    assert s_max == pytest.approx(np.abs(k).max() / 10**0.5)
    # a sampling mask: SNR over acquired samples, unacquired samples stay exactly zero
    mask = np.zeros((32, 32), dtype=bool)
    mask[::4] = True
    km = k * mask
    noisy, sigma, _ = noise.mri_gaussian_noise(km, 10.0, seed=2, mask=mask)
    assert np.all(noisy[:, ~mask] == 0)
    assert sigma == pytest.approx(np.sqrt(np.mean(np.abs(k[:, mask].astype(np.complex128)) ** 2)) / 10**0.5)
    t, _, _ = noise.mri_gaussian_noise(torch.from_numpy(k), 10.0, seed=1)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.complex64
    np.testing.assert_array_equal(t.numpy(), a)
    with pytest.raises(ConfigError, match="exactly one"):
        noise.mri_gaussian_noise(k, 10.0, snr=3.0, seed=1)
    with pytest.raises(ConfigError, match="complex"):
        noise.mri_gaussian_noise(k.real.copy(), 10.0, seed=1)
    with pytest.raises(ConfigError, match="reference"):
        noise.mri_gaussian_noise(k, 10.0, seed=1, reference="peak")
