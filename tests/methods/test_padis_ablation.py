"""PaDIS ablation variants (the paper's Table 2) as parameters of padis / padis3d: the fixed-grid patch modes
(averaging, tiling) against an explicit loop of the reference and the exact denoisers of analytic Gaussian
priors, grid coverage, the Langevin / predictor-corrector samplers against exact Gaussian moments, VE-DDNM's
range-null-space data fit, and every variant end to end with tiny untrained patch networks (CT, MR, odd sizes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrecon.diffusion.denoiser import Denoiser, EDMDenoiser, Prior, sigma_batch
from medrecon.diffusion.patches import (
    PatchDenoiser,
    coordinate_channels,
    crop_image,
    last_cover_weights,
    mode_tiling,
)
from medrecon.diffusion.schedules import EDMSchedule
from medrecon.errors import ConfigError
from medrecon.methods.padis import choose_patch_size
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _spec, ct_problem, patch_prior
from tests.methods.test_padis import (
    AnalyticPatchNet,
    _ct,
    _geom,
    _mean,
    _mse,
    _posterior_mean,
    _var,
    analytic_ct_problem,
    exact_whole,
)

F64 = torch.float64


# --------------------------------------------------------------------------------- stationary Gaussian prior


def _cov(shape: tuple[int, int], var: float = 0.8, ell: float = 1.5) -> torch.Tensor:
    """Covariance of a stationary Gaussian field on a (Y, X) grid: var exp(-|d|^2 / (2 ell^2))."""
    yy, xx = torch.meshgrid(torch.arange(shape[0], dtype=F64), torch.arange(shape[1], dtype=F64), indexing="ij")
    pts = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1)
    return var * torch.exp(-torch.cdist(pts, pts).pow(2) / (2 * ell**2))


class StationaryPatchNet(Denoiser):
    """Exact denoiser of a P x P patch of a stationary Gaussian field (mean MU): the patch's marginal is
    Gaussian with covariance C_P, so E[x | x + sigma n] = MU + C_P (C_P + sigma^2 I)^-1 (y - MU). Ignores the
    coordinates (a stationary prior is the same everywhere)."""

    MU = 0.2

    def __init__(self) -> None:
        self.nfe = 0

    def denoise(self, x, sigma, cond=None):
        b, c, h, w = x.shape
        cp = _cov((h, w))
        s2 = sigma_batch(sigma, b).to(F64) ** 2
        gain = cp @ torch.linalg.inv(cp + s2.reshape(-1, 1, 1) * torch.eye(h * w, dtype=F64))     # (B, n, n)
        r = (x.to(F64) - self.MU).reshape(b, c, h * w)
        return (self.MU + torch.einsum("bij,bcj->bci", gain, r)).reshape(b, c, h, w).to(x.dtype)


def _reference_loop(x, sigma, net, pad, psize, overlap, average):
    """The reference's denoisedOverlap (average) / denoisedTile (later patches overwrite) written out as its
    loop, with the grid starting at the image's first pixel (pad) as medrecon's fixed grids do."""
    n = x.shape[-1]
    inds, skip = [pad], psize - overlap
    while inds[-1] < n - pad - psize:
        inds.append(inds[-1] + skip)
    out, count = torch.zeros_like(x), torch.zeros_like(x)
    for a in inds:
        for b in inds:
            d = net(x[:, :, a:a + psize, b:b + psize], sigma, None)
            if average:
                out[:, :, a:a + psize, b:b + psize] += d
                count[:, :, a:a + psize, b:b + psize] += 1
            else:
                out[:, :, a:a + psize, b:b + psize] = d
                count[:, :, a:a + psize, b:b + psize] = 1
    return out / count.clamp_min(1), count


@pytest.mark.parametrize("mode", ["average", "tile"])
def test_fixed_grid_modes_are_the_reference_loop_and_measured_against_the_exact_stationary_denoiser(mode):
    pad, n, psize, overlap = 3, 10, 4, 2              # stride 2: patches at 3, 5, 7, 9 cover the image exactly
    net = StationaryPatchNet()
    den = PatchDenoiser(net, (psize, psize), (pad, pad), mode=mode, pad_value=-1.0, overlap=overlap)
    x = torch.randn(2, 1, n + 2 * pad, n + 2 * pad, generator=torch.Generator().manual_seed(0), dtype=F64)
    errs = {}
    for sigma in (0.3, 1.0):
        got = den(x, sigma)
        assert den.last_origin == (pad, pad)       # fixed grid: same origin every call
        want, count = _reference_loop(x, sigma, net, pad, psize, overlap, mode == "average")
        img = (slice(None), slice(None), slice(pad, pad + n), slice(pad, pad + n))
        assert bool((count[img] >= 1).all())
        assert torch.allclose(got[img], want[img], atol=1e-12)
        assert bool((crop_image(got, (0, 0))[..., :pad, :] == -1.0).all())     # ring = background
        # the exact whole-image denoiser of the same field on the image: what patches approximate
        c = _cov((n, n))
        y = x[img].reshape(2, -1) - net.MU
        exact = net.MU + y @ torch.linalg.solve(c + sigma**2 * torch.eye(n * n, dtype=F64), c)
        errs[sigma] = float((got[img].reshape(2, -1) - exact).norm() / (exact - net.MU).norm())
    # measured (correlation length 1.5 px, 4 x 4 patches, overlap 2): relative error of the denoising step
    # against the exact whole-image one, average 0.303 / 0.263 and tile 0.413 / 0.389 at sigma 0.3 / 1.0: a
    # patch sees no context beyond itself; averaging the overlaps recovers some of it, overwriting does not
    want = {"average": (0.303, 0.263), "tile": (0.413, 0.389)}[mode]
    assert errs[0.3] == pytest.approx(want[0], abs=0.01) and errs[1.0] == pytest.approx(want[1], abs=0.01)


@pytest.mark.parametrize("mode", ["average", "tile"])
def test_fixed_grid_modes_are_exact_for_independent_pixels(mode):
    """Independent pixels: every patch mode is the exact whole-image denoiser (any overlap, any owner)."""
    pad, n = 3, 11
    net = AnalyticPatchNet(1)
    den = PatchDenoiser(net, (5, 5), (pad, pad), mode=mode, pad_value=-1.0, overlap=2, max_batch=4)
    x = torch.randn(2, 1, n + 2 * pad, n + 2 * pad, generator=torch.Generator().manual_seed(1), dtype=F64)
    for sigma in (0.2, 2.0):
        assert torch.allclose(den(x, sigma), exact_whole(x, sigma, (pad, pad), -1.0, net), atol=1e-12)


def test_grids_cover_every_image_pixel_stitch_exactly_once_per_evaluation():
    pad, n = 4, 21
    spatial = (n + 2 * pad, n + 2 * pad + 2)
    image = crop_image(torch.ones(spatial, dtype=torch.bool), (pad, pad))
    stitch = PatchDenoiser(AnalyticPatchNet(), (8, 8), (pad, pad), generator=torch.Generator().manual_seed(0))
    origins = set()
    for _ in range(40):
        idx = stitch.grid(spatial)
        origins.add(stitch.last_origin)
        counts = torch.bincount(idx.reshape(-1), minlength=math.prod(spatial)).reshape(spatial)
        assert int(counts.max()) == 1 and bool((crop_image(counts, (pad, pad)) == 1).all())
    assert len(origins) == math.prod(t.n_offsets for t in stitch.tilings(spatial)) == 8   # every shift drawn
    for mode in ("average", "tile"):
        den = PatchDenoiser(AnalyticPatchNet(), (8, 8), (pad, pad), mode=mode, overlap=3)
        idx = den.grid(spatial)
        assert den.grid(spatial).equal(idx)         # fixed
        counts = torch.bincount(idx.reshape(-1), minlength=math.prod(spatial)).reshape(spatial)
        assert bool((crop_image(counts, (pad, pad)) >= 1).all()) and int(counts.max()) == 4   # 2 x 2 overlaps
        w = last_cover_weights(idx, math.prod(spatial))
        owners = torch.zeros(math.prod(spatial), dtype=F64).index_add(0, idx.reshape(-1), w.reshape(-1))
        assert bool((owners.reshape(spatial)[counts > 0] == 1).all())                # one owner per pixel
        assert image.shape == crop_image(counts, (pad, pad)).shape
    t = mode_tiling(21, 4, 8, "average", 3)
    assert (t.k, t.lo, t.stride) == (4, 4, 5)        # starts 4, 9, 14, 19: covers [4, 25), the image
    assert mode_tiling(21, 0, 8, "average", 3) is None                       # 4 patches need 23 pixels
    assert choose_patch_size((21, 21), (4, 4), [8, 16], 2, "average", 3) == 16


# --------------------------------------------------------------------------------- samplers vs exact moments


def _prior_moments(n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = crop_image(coordinate_channels((n + 2 * pad, n + 2 * pad), dtype=F64), (pad, pad))
    return _mean(c), _var(c)


def _prior_problem(n: int = 6, samples: int = 1):
    op = _ct(n, views=4)
    prob = ReconProblem(y=op.forward(torch.zeros(1, n, n)), operator=op, modality="CT", image_shape=(1, n, n))
    return prob, Prior(denoiser=AnalyticPatchNet(1), meta={"patch": _geom(3, [8])})


def _langevin_moments(mu, var, sigmas, inner, lang, sigma_max):
    """Exact mean and variance of the Langevin chain with the exact score of N(mu, var) per pixel: the step
    x <- x + (alpha/2) s + sqrt(alpha) z is linear, e <- a e + sqrt(alpha) z, a = 1 - alpha / (2 (var + s^2))."""
    m, v = -mu.clone(), torch.full_like(mu, sigma_max**2)
    for i, s in enumerate(sigmas):
        alpha = lang * s**2
        a = 1 - alpha / (2 * (var + s**2))
        for _ in range(inner):
            m, v = a * m, a * a * v + (alpha if i < len(sigmas) - 1 else 0.0)
    return mu + m, v


def test_langevin_sampler_with_the_exact_score_has_the_exact_chain_moments():
    n, pad, s = 6, 3, 600
    prob, prior = _prior_problem(n)
    params = {"sampler": "langevin", "zeta": 0.0, "steps": 25, "sigma_max": 3.0, "sigma_min": 0.05,
              "patch_size": 4, "samples": s, "dtype": "float64"}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    assert res.nfe == 25 * 10 and res.info["params"]["langevin"] == 1.0   # reference: inner 10, alpha = sigma^2
    x = res.samples[:, 0]
    mu, var = _prior_moments(n, pad)
    sig = EDMSchedule(0.05, 3.0, 7.0).sigmas(25, append_zero=False).tolist()
    m_exact, v_exact = _langevin_moments(mu, var, sig, 10, 1.0, 3.0)
    z_mean = (x.mean(0) - m_exact) / (v_exact / s).sqrt()
    z_var = (x.var(0) / v_exact - 1) / math.sqrt(2 / (s - 1))
    assert float(z_mean.abs().max()) < 4.5 and float(z_var.abs().max()) < 4.5      # 36 pixels each, MC error
    # the chain's own bias against its target, the prior N(mu, var): mean exact (the sigma_max^2 start has
    # decayed), variance 0.6 % low on average (measured 0.994: the noise-free last level contracts, the
    # discretisation inflates; with inner 4 it is 11 % high: too few steps per level to forget larger sigmas)
    assert float((m_exact - mu).abs().max()) < 1e-6
    assert float((v_exact / var).mean()) == pytest.approx(0.994, abs=0.002)


# measured variance / target, mean over the 36 pixels (MC error about 0.01): Song et al.'s corrector 1.036
# (60 levels of Euler-Maruyama predictor, one corrector step at snr 0.16); the reference's corrector 0.873 -
# it denoises at the previous level's sigma but divides by the new one, and its step 2 r ||z|| / ||s|| lacks
# Song's square, so it over-contracts.
@pytest.mark.parametrize("corrector,var_ratio", [("song", 1.036), ("reference", 0.873)])
def test_predictor_corrector_with_the_exact_score_samples_the_prior(corrector, var_ratio):
    n, pad, s = 6, 3, 600
    prob, prior = _prior_problem(n)
    params = {"sampler": "pc", "corrector": corrector, "zeta": 0.0, "steps": 60, "sigma_max": 3.0,
              "sigma_min": 0.02, "patch_size": 4, "samples": s, "dtype": "float64"}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(1))
    assert res.nfe == 59 * 2                        # reference: predictor + 1 corrector per level, S - 1 levels
    x = res.samples[:, 0]
    mu, var = _prior_moments(n, pad)
    target = var + 0.02**2                          # the reference stops at noise level sigma_min
    z_mean = (x.mean(0) - mu) / (target / s).sqrt()
    ratio = x.var(0) / target
    assert float(z_mean.abs().max()) < 4.5
    assert float(ratio.mean()) == pytest.approx(var_ratio, abs=0.03)


def test_ddnm_sampler_fits_the_data_through_the_range_null_space_step():
    op, pad, n = _ct(12, views=10), 3, 12
    x_true = torch.randn(1, n, n, generator=torch.Generator().manual_seed(3))
    y = op.forward(x_true)
    prob = ReconProblem(y=y, operator=op, modality="CT", image_shape=(1, n, n))
    prior = Prior(denoiser=AnalyticPatchNet(1), meta={"patch": _geom(pad, [8])})
    params = {"sampler": "ddnm", "steps": 20, "inner": 2, "sigma_max": 3.0, "sigma_min": 0.01, "patch_size": 4,
              "pinv_iters": 60, "dtype": "float64", "samples": 2}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    rel = float(torch.linalg.vector_norm(y - op.forward(res.samples)) / torch.linalg.vector_norm(y))
    no_dc = METHODS["padis"](prob, {**params, "sampler": "langevin", "zeta": 0.0}, prior,
                             torch.Generator().manual_seed(0))
    rel_prior = float(torch.linalg.vector_norm(y - op.forward(no_dc.samples)) / torch.linalg.vector_norm(y))
    # measured: relative residual 0.0079 (prior samples, no data step: 2.04); A^+ by 60 CG iterations
    assert rel < 0.02 and rel_prior > 1.5


# measured: mean of 4 samples, MSE from the exact posterior mean (the least-squares-scaled adjoint: 0.251)
@pytest.mark.parametrize("extra,want", [
    ({}, 0.085), ({"sampler": "langevin"}, 0.098), ({"sampler": "pc", "steps": 60, "inner": None}, 0.127),
    ({"sampler": "pc", "steps": 60, "inner": None, "corrector": "song"}, 0.089), ({"sampler": "ddnm"}, 0.024)],
    ids=["dps", "langevin", "pc", "pc-song", "ddnm"])
def test_samplers_with_the_analytic_prior_on_ct_approach_the_exact_posterior_mean(extra, want):
    prob, prior, pad, _ = analytic_ct_problem()
    op, y = prob.operator, prob.y
    params = {"steps": 30, "inner": 5, "sigma_max": 3.0, "sigma_min": 0.02, "zeta": 0.2, "patch_size": 4,
              "samples": 4, "dtype": "float64", **extra}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    got = _mse(res.samples.mean(0), _posterior_mean(op, y, pad, 1, 0.05))
    assert got == pytest.approx(want, abs=0.005)


# --------------------------------------------------------------------------------- end to end, tiny networks


VARIANTS = [("dps", "average", "norm"), ("dps", "tile", "norm"), ("langevin", "stitch", "norm"),
            ("pc", "stitch", "norm"), ("ddnm", "stitch", "norm"), ("pc", "average", "landweber"),
            ("langevin", "tile", "landweber")]
FAST = {"steps": 2, "inner": 1, "sigma_max": 1.0, "zeta": 1e-4, "patch_overlap": 4, "pinv_iters": 3}


@pytest.mark.parametrize("sampler,mode,guidance", VARIANTS)
def test_every_variant_runs_on_odd_ct_and_is_deterministic(sampler, mode, guidance):
    prob = ct_problem(21, 23, depth=2)
    prior = patch_prior(None)
    params = {**FAST, "sampler": sampler, "mode": mode, "guidance": guidance}
    a = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    b = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    assert a.samples.shape == (1, 2, 21, 23) and bool(torch.isfinite(a.samples).all())
    assert torch.equal(a.samples, b.samples)
    assert a.nfe == 2            # pc: 1 level x (predictor + 1 corrector); the others: 2 levels x inner 1
    assert a.info["params"]["sampler"] == sampler and a.info["params"]["mode"] == mode


@pytest.mark.parametrize("sampler,mode", [("langevin", "tile"), ("pc", "stitch"), ("dps", "average"),
                                          ("ddnm", "stitch")])
def test_variants_on_complex_mri_and_3d_slabs(sampler, mode):
    h, w = 21, 23
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 10) / 7.0) ** 2 + ((xx - 11) / 8.0) ** 2 < 1).astype(np.float32))
    prob = ReconProblem(y=op.forward(mag[None].to(torch.complex64)), operator=op, modality="MR",
                        image_shape=(1, h, w))
    spec = _spec("patch", levels=2, coord_channels=2, in_channels=2, out_channels=2)
    geom = _geom(4, [8, 16], channels=2)
    prior = Prior(EDMDenoiser(_net(spec)), channels=2, meta={"patch": geom, "network_multiple": 2})
    params = {**FAST, "sampler": sampler, "mode": mode}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 1, h, w) and res.samples.is_complex() and torch.isfinite(res.samples).all()
    res3 = METHODS["padis3d"](ct_problem(21, 23, depth=3), params, patch_prior(3), torch.Generator().manual_seed(0))
    assert res3.samples.shape == (1, 3, 21, 23) and torch.isfinite(res3.samples).all()
    assert res3.info["patch_shape"][0] == 3


def test_bad_variant_names_are_one_clear_error():
    prob, prior = _prior_problem()
    for key, bad, word in [("sampler", "ula", "unknown sampler"), ("mode", "blend", "unknown mode"),
                           ("corrector", "x", "corrector must be"), ("patch_overlap", -1, "patch_overlap >= 0")]:
        with pytest.raises(ConfigError, match=word):
            METHODS["padis"](prob, {key: bad, "patch_size": 4}, prior)
    with pytest.raises(ConfigError, match="patch_overlap 4 must be smaller than the patch size 4"):
        METHODS["padis"](prob, {"mode": "tile", "patch_overlap": 4, "patch_size": 4}, prior)
    with pytest.raises(ConfigError, match="steps >= 2"):
        METHODS["padis"](prob, {"sampler": "pc", "steps": 1, "patch_size": 4}, prior)


def test_quality_benchmark_rows_map_to_padis_params():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    args = q.parse_args(["--methods", "padis", "padis[pc]", "--mr-methods", "padis[langevin]", "--padis-ablation"])
    q.check_methods(args)                                   # ablation rows are accepted names
    assert q.row_method("padis[tile]") == "padis" and q.row_method("dds") == "dds"
    p = q.row_params("padis[pc]", "padis", {"padis": {"steps": 7}, "padis[pc]": {"snr": 0.1}})
    assert p["sampler"] == "pc" and p["steps"] == 7 and p["snr"] == 0.1 and p["guidance"] == "landweber"
    assert q.row_params("padis", "padis", {"padis[pc]": {"snr": 0.1}}) == q.SAMPLER_PARAMS["padis"]
    from medrecon.recon.registry import validate_params
    for row, (method, _) in q.PADIS_ABLATION.items():      # every row's params are valid padis params
        validate_params(method, q.row_params(row, method, {}))
        assert q.PRIOR_OF["CT"][row] == "patch" and q.PRIOR_OF["MR"][row] == "mr_patch"
    with pytest.raises(ConfigError, match="unknown method"):
        q.check_methods(q.parse_args(["--methods", "padis[foo]"]))


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,mode", [("langevin", "tile"), ("pc", "average"), ("ddnm", "stitch")])
def test_variants_on_cuda_match_cpu(sampler, mode):
    n, pad = 12, 3
    maps, mask = birdcage_coils(4, (n, n)), cartesian_mask_1d((n, n), 2.0, acs_lines=4, seed=0)
    x_true = torch.complex(torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)),
                           torch.zeros(2, n, n)).to(torch.complex64)
    prior = Prior(denoiser=AnalyticPatchNet(2), channels=2, meta={"patch": _geom(pad, [8], channels=2)})
    params = {"steps": 5, "inner": 2, "sigma_max": 1.0, "zeta": 0.5, "patch_size": 4, "dtype": "float64",
              "sampler": sampler, "mode": mode, "patch_overlap": 2, "pinv_iters": 5}
    out = []
    for dev in ("cpu", "cuda"):
        op = Sense2D(maps, mask, device=dev)
        prob = ReconProblem(y=op.forward(x_true.to(dev)), operator=op, modality="MR", image_shape=(2, n, n))
        out.append(METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0)).samples.cpu())
    assert torch.allclose(out[0], out[1], atol=1e-4)
