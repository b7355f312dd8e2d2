"""DDRM: its SVD (exact factorisation of the operator in the prior domain, per-slice coil maps, cache, size limit),
its measured bias on analytic posteriors (wave2 section 0.2: under-dispersed even on a Gaussian prior), prior
consistency with eta = 0, noiseless consistency, determinism, and CT / single- and multi-coil MR end to end with
a tiny untrained network on odd slice sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import medrecon.methods  # noqa: F401  (registers ddrm)
from medrecon.diffusion.analytic import DenseOperator, GaussianMixturePrior, GaussianPrior, linear_gaussian_problem
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError
from medrecon.methods import ddrm as ddrm_mod
from medrecon.methods.sampling import SliceLayout
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.ct import ParallelBeamCT
from medrecon.physics.ct_geometry import CTGeometry, sparse_view_angles
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _spec, ct_problem, slice_prior

F64 = torch.float64
SEED_PRIOR = ([0.3, 0.5, 0.2], [[-2.5], [0.0], [1.5]], [[0.09], [0.16], [0.09]])


def seed_problem(a: float = 1.0, y: float = 0.5, noise: float | None = 0.8) -> ReconProblem:
    op = DenseOperator(torch.full((1, 1), a, dtype=F64), (1, 1))
    return ReconProblem(y=torch.tensor([y]), operator=op, modality="CT", image_shape=(1, 1, 1), noise_std=noise)


def moments(r) -> tuple[float, float]:
    x = r.samples.reshape(-1).double()
    return float(x.mean()), float(x.std())


def mr_prior() -> Prior:
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    return Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                 scale=2.0, meta={"kind": "slice", "normalisation": mr})


def mr_problem(coils: int, h: int = 15, w: int = 17, per_slice: bool = False, depth: int = 2) -> ReconProblem:
    maps = birdcage_coils(coils, (h, w))
    mask = cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0)
    if per_slice:
        maps = np.stack([maps, np.roll(maps, 1, axis=-1)])
        mask = np.stack([mask, cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=1)])
    op = Sense2D(maps, mask)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1).astype(np.float32))
    x = torch.stack([mag, 0.5 * mag][:depth]).to(torch.complex64)
    return ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(depth, h, w), noise_std=0.01)


# ------------------------------------------------------------------------------------------------ the SVD

@pytest.mark.parametrize("case", ["ct", "mr-multicoil-per-slice"])
def test_svd_factorises_the_operator_in_the_prior_domain(case):
    if case == "ct":
        prob, prior = ct_problem(15, 17, 2), slice_prior()
    else:
        prob, prior = mr_problem(3, per_slice=True), mr_prior()
    lay = SliceLayout(prob, prior, torch.float64)
    svd, units = ddrm_mod.spectral_operator(lay)
    assert units.groups == (2 if case.startswith("mr") else 1)
    g = torch.Generator().manual_seed(0)
    for grp in range(units.groups):
        v = torch.randn(3, units.d, generator=g, dtype=F64)
        u, s, vv, keep = svd.u[grp], svd.s[grp], svd.v[grp], svd.keep[grp]
        assert torch.allclose(vv.T @ vv, torch.diag(keep.to(F64)), atol=1e-9)       # dropped vectors are 0
        assert torch.allclose(u[:, keep].T @ u[:, keep], torch.eye(int(keep.sum()), dtype=F64), atol=1e-9)
        direct = units.apply_real(v, grp)
        via_svd = (v @ vv) * s @ u.T + svd.offset[grp]
        # exact up to the dropped singular values (< 1e-3 s_max) and float32 operator arithmetic
        err = torch.linalg.vector_norm(via_svd - direct, dim=1)
        assert bool((err <= 1e-3 * float(s[0]) * torch.linalg.vector_norm(v, dim=1) + 1e-5 *
                     torch.linalg.vector_norm(direct, dim=1)).all())
        # the thin SVD of the Gram route agrees with a dense SVD on the kept singular values
        a, _ = units.matrix(grp)
        ref = torch.linalg.svdvals(a)[: int(keep.sum())]
        assert torch.allclose(s[keep], ref, rtol=1e-8, atol=1e-12 * float(ref[0]))
    assert bool((svd.keep.sum(-1) > 0).all())
    assert bool((svd.s[~svd.keep] <= 1e-3 * svd.s[:, :1].expand_as(svd.s)[~svd.keep]).all())


def test_svd_is_cached_per_geometry_and_the_size_limit_is_one_clear_error():
    ddrm_mod.clear_svd_cache()
    prob, prior = ct_problem(15, 17, 1), slice_prior()
    lay = SliceLayout(prob, prior, torch.float32)
    a, _ = ddrm_mod.spectral_operator(lay)
    b, _ = ddrm_mod.spectral_operator(SliceLayout(ct_problem(15, 17, 1), prior, torch.float32))
    assert a.u is b.u and len(ddrm_mod._SVD_CACHE) == 1          # same geometry: computed once
    other = ct_problem(15, 17, 1)
    other.operator = ParallelBeamCT(CTGeometry.create("parallel", (15, 17), (1.0, 1.0), sparse_view_angles(6, 180.0)))
    other.y = other.operator.forward(torch.zeros(1, 15, 17))
    c, _ = ddrm_mod.spectral_operator(SliceLayout(other, prior, torch.float32))
    assert len(ddrm_mod._SVD_CACHE) == 2 and c.u.shape[1] < a.u.shape[1]    # another geometry: its own SVD
    units = ddrm_mod.UnitLayout(lay)
    with pytest.raises(ConfigError) as e:
        METHODS["ddrm"](prob, {"max_svd_elements": 1000, "sigma_y": 0.01}, prior)
    msg = str(e.value)
    assert f"{units.d} pixels x {units.m} real measurements" in msg and "max_svd_elements" in msg
    assert "dds" in e.value.fix


def test_bad_parameters_and_unknown_noise_are_config_errors():
    prior = GaussianPrior(torch.zeros(1), torch.ones(1, 1)).as_prior()
    for params in ({"eta": 1.5}, {"eta_b": -0.1}, {"svd_rtol": 0.0}):
        with pytest.raises(ConfigError):
            METHODS["ddrm"](seed_problem(), params, prior)
    with pytest.raises(ConfigError, match="noise level is unknown"):
        METHODS["ddrm"](seed_problem(noise=None), {}, prior)


# ------------------------------------------------------------------------------------------------ analytic

def test_ddrm_defaults_are_under_dispersed_on_the_seed_mixture_and_a_gaussian_prior():
    """Measured bias (wave2 section 0.2, 200k samples: mixture 0.3115 / 0.3771, Gaussian 0.2992 / 0.3581) against
    the exact posteriors (0.3496 / 0.6199 and 0.3049 / 0.6247); 8000 samples: SE 0.004 (mean), 0.003 (std)."""
    n = 8000
    mix = GaussianMixturePrior(*SEED_PRIOR)
    m, s = moments(METHODS["ddrm"](seed_problem(), {"samples": n, "dtype": "float64"}, mix.as_prior(),
                                   torch.Generator().manual_seed(0)))
    print(f"ddrm mixture: mean {m:.4f} std {s:.4f} (exact 0.3496 / 0.6199)")
    assert abs(m - 0.3115) < 0.02 and abs(s - 0.377) < 0.015
    assert s < 0.45                                  # ~80 SE under the posterior's 0.62 at this n
    gauss = GaussianPrior(torch.zeros(1), torch.ones(1, 1))
    m, s = moments(METHODS["ddrm"](seed_problem(), {"samples": n, "dtype": "float64"}, gauss.as_prior(),
                                   torch.Generator().manual_seed(1)))
    print(f"ddrm Gaussian: mean {m:.4f} std {s:.4f} (exact 0.3049 / 0.6247)")
    assert abs(m - 0.2992) < 0.02 and abs(s - 0.358) < 0.015
    # eta = 1 over-disperses instead (wave2: 0.2615 / 0.6636)
    m, s = moments(METHODS["ddrm"](seed_problem(), {"samples": n, "eta": 1.0, "dtype": "float64"},
                                   mix.as_prior(), torch.Generator().manual_seed(2)))
    assert abs(m - 0.2615) < 0.025 and abs(s - 0.66) < 0.02


def test_with_no_data_and_eta_zero_ddrm_reproduces_the_prior():
    """A = 0: every coordinate is missing, and with eta = 0 the chain is DDIM (wave2: mean -0.445, std 1.501)."""
    mix = GaussianMixturePrior(*SEED_PRIOR)
    n = 4000
    r = METHODS["ddrm"](seed_problem(a=0.0), {"samples": n, "eta": 0.0, "steps": 200, "dtype": "float64"},
                        mix.as_prior(), torch.Generator().manual_seed(0))
    m, s = moments(r)
    assert r.info["rank"] == [0]
    assert abs(m - float(mix.mean[0])) < 4 * 1.499 / math.sqrt(n) and abs(s - 1.499) < 0.04


def test_linear_gaussian_bias_and_noiseless_consistency_and_determinism():
    prior, post, prob = linear_gaussian_problem()
    p = {"samples": 400, "dtype": "float64"}
    a = METHODS["ddrm"](prob, p, prior.as_prior(), torch.Generator().manual_seed(3))
    b = METHODS["ddrm"](prob, p, prior.as_prior(), torch.Generator().manual_seed(3))
    assert torch.equal(a.samples, b.samples) and a.nfe == 20
    x = a.samples.reshape(400, -1).double()
    mean_err = float((x.mean(0) - post.mean).norm() / post.mean.norm())
    std_err = float((x.std(0) - post.std).norm() / post.std.norm())
    print(f"ddrm linear-Gaussian: rel err mean {mean_err:.3f} std {std_err:.3f}")
    # measured (1000 samples, fidelity.py): 0.19 / 0.12; the MC error of the mean is 0.016 at 400 samples
    assert 0.1 < mean_err < 0.3 and 0.05 < std_err < 0.2
    # sigma_y = 0: measured coordinates are the last denoiser output at sigma_1 ~ 0.01 around ybar
    r = METHODS["ddrm"](prob, {"samples": 4, "sigma_y": 0.0, "dtype": "float64"}, prior.as_prior(),
                        torch.Generator().manual_seed(4))
    resid = torch.linalg.vector_norm(prob.y.double()[None] - r.samples.reshape(4, -1).double() @ prob.operator.m.T,
                                     dim=1)
    assert float(resid.max()) < 0.05 * float(prob.y.norm())


# ------------------------------------------------------------------------------------------------ end to end

def test_ddrm_on_small_ct_with_a_tiny_network_on_an_odd_size():
    prob = ct_problem(15, 17, 2)
    r = METHODS["ddrm"](prob, {"steps": 4, "sigma_y": 1e-3, "samples": 2}, slice_prior(),
                        torch.Generator().manual_seed(0))
    assert r.samples.shape == (2, 2, 15, 17) and bool(torch.isfinite(r.samples).all()) and r.nfe == 4
    assert r.info["rank"][0] > 0


@pytest.mark.parametrize("coils, per_slice", [(1, False), (4, False), (3, True)])
def test_ddrm_on_single_and_multi_coil_mr(coils, per_slice):
    prob = mr_problem(coils, per_slice=per_slice)
    r = METHODS["ddrm"](prob, {"steps": 3}, mr_prior(), torch.Generator().manual_seed(0))
    assert r.samples.shape == (1, 2, 15, 17) and r.samples.is_complex() and bool(torch.isfinite(r.samples).all())
    if coils == 1:      # single-coil Cartesian: A = M F, singular values 1 on the sampled k-space points
        lay = SliceLayout(prob, mr_prior(), torch.float32)
        svd, _ = ddrm_mod.spectral_operator(lay)
        kept = svd.s[svd.keep]
        assert torch.allclose(kept, kept.new_full(kept.shape, float(kept[0])), rtol=1e-4)   # all equal (1/scale)
        assert int(svd.keep.sum()) == 2 * int(prob.operator.mask_np.sum())
