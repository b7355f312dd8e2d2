"""Metrics: cross-checks against scikit-image, masks, streaming == in-memory, data residual, coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from medrecon.errors import ConfigError, InputError
from medrecon.metrics import (
    SCALAR_KEYS,
    RunningMoments,
    body_mask,
    coverage,
    coverage_volumes,
    data_residual,
    evaluate_arrays,
    evaluate_volumes,
    expected_coverage,
    iter_posterior_stats,
    posterior_stats,
    robust_range,
    to_unit_window,
)
from medrecon.physics.operator import LinearOperator
from medrecon.volume import Geometry, Volume

WINDOW = (-1000.0, 1000.0)
SK = {"data_range": 1.0, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


def _phantom_pair(shape=(14, 22, 26), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like reference (air, body ellipse with texture, 'lung') and a noisy, slice-wise biased recon."""
    rng = np.random.default_rng(seed)
    _, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (yy / 0.8) ** 2 + (xx / 0.75) ** 2 < 1
    lung = ((yy + 0.1) / 0.3) ** 2 + ((xx - 0.3) / 0.25) ** 2 < 1
    texture = 2000 * ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    ref = np.where(body, 40.0 + texture, -1000.0)
    ref = np.where(lung, -850.0 + 0.3 * texture, ref)
    rec = ref + 60 * rng.normal(size=shape) + 80 * rng.normal(size=(shape[0], 1, 1))
    return ref.astype(np.float32), rec.astype(np.float32)


def _unit(a: np.ndarray) -> np.ndarray:
    return np.clip((a.astype(np.float64) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def _planes(a: np.ndarray, axis: int) -> list[np.ndarray]:
    return [np.take(a, i, axis=axis) for i in range(a.shape[axis])]


def test_3d_psnr_ssim_nrmse_mae_match_skimage():
    ref, rec = _phantom_pair()
    m = evaluate_arrays(ref, rec, WINDOW)
    r, x = _unit(ref), _unit(rec)
    assert (_unit(rec) == 0).any() and r.max() > 0.5  # the window clips noisy air and spans the anatomy
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(r, x, data_range=1.0), abs=1e-4)
    assert m["ssim"] == pytest.approx(structural_similarity(r, x, **SK), abs=1e-4)
    assert m["nrmse"] == pytest.approx(normalized_root_mse(r, x), abs=1e-6)
    assert m["mae"] == pytest.approx(np.abs(x - r).mean(), abs=1e-9)
    assert 0.2 < m["ssim"] < 0.99 and 15 < m["psnr"] < 40  # a real, imperfect reconstruction
    assert m["notes"] == [] and m["info"]["n_voxels"] == ref.size


@pytest.mark.parametrize(("axis", "name"), [(0, "axial"), (1, "coronal"), (2, "sagittal")])
def test_per_plane_psnr_ssim_match_skimage(axis, name):
    ref, rec = _phantom_pair()
    m = evaluate_arrays(ref, rec, WINDOW)
    r, x = _unit(ref), _unit(rec)
    pairs = list(zip(_planes(r, axis), _planes(x, axis), strict=True))
    psnr = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in pairs]
    ssim = [structural_similarity(a, b, **SK) for a, b in pairs]
    assert m[f"psnr_{name}"] == pytest.approx(np.mean(psnr), abs=1e-4)
    assert m[f"ssim_{name}"] == pytest.approx(np.mean(ssim), abs=1e-4)
    if axis == 0:
        np.testing.assert_allclose(m["psnr_per_slice"], psnr, atol=1e-4)
        np.testing.assert_allclose(m["ssim_per_slice"], ssim, atol=1e-4)
        assert np.ptp(psnr) > 0.5  # slice-wise bias makes per-slice PSNR vary: the plot has something to show


def test_masked_metrics_equal_hand_computation():
    ref, rec = _phantom_pair()
    mask = body_mask(ref, -500)
    m = evaluate_arrays(ref, rec, WINDOW, mask=mask)
    r, x = _unit(ref), _unit(rec)
    e = (x - r)[mask]
    assert m["psnr"] == pytest.approx(10 * np.log10(1.0 / np.mean(e**2)), abs=1e-9)
    assert m["nrmse"] == pytest.approx(np.sqrt(np.sum(e**2) / np.sum(r[mask] ** 2)), abs=1e-9)
    assert m["mae"] == pytest.approx(np.mean(np.abs(e)), abs=1e-9)
    assert m["info"]["n_voxels"] == mask.sum() < ref.size
    # 3D SSIM: skimage's full SSIM map averaged over the mask inside its crop
    _, smap = structural_similarity(r, x, full=True, **SK)
    crop = (slice(5, -5),) * 3
    assert m["ssim"] == pytest.approx(smap[crop][mask[crop]].mean(), abs=1e-6)
    # axial plane k: its 2D SSIM map over the mask, and the masked 2D PSNR
    k = 7
    _, smap2 = structural_similarity(r[k], x[k], full=True, **SK)
    assert m["ssim_per_slice"][k] == pytest.approx(smap2[5:-5, 5:-5][mask[k, 5:-5, 5:-5]].mean(), abs=1e-6)
    ek = (x[k] - r[k])[mask[k]]
    assert m["psnr_per_slice"][k] == pytest.approx(10 * np.log10(1.0 / np.mean(ek**2)), abs=1e-9)
    assert m["psnr"] != pytest.approx(evaluate_arrays(ref, rec, WINDOW)["psnr"], abs=0.1)  # the mask matters


def test_unit_window_and_robust_range(tmp_path):
    np.testing.assert_allclose(to_unit_window(np.array([-2000.0, -160, 40, 240, 900]), -160, 240),
                               [0, 0, 0.5, 1, 1])
    with pytest.raises(ConfigError, match=r"evaluate\.ct_window"):
        to_unit_window(np.zeros(3), 100, 100)
    rng = np.random.default_rng(3)
    data = np.concatenate([np.zeros(700), rng.gamma(2.0, 50.0, 2165), -rng.random(204), [1e5, 7.5, 7.5]])
    data = rng.permutation(data).astype(np.float32).reshape(12, 16, 16)
    expected = np.percentile(data.astype(np.float64), (0.5, 99.5))
    assert robust_range(data) == pytest.approx(tuple(expected), rel=1e-12)
    vol = Volume.from_array(tmp_path / "mr.zarr", data, Geometry(), chunk_depth=5)
    assert robust_range(vol, slab=3) == pytest.approx(tuple(expected), rel=1e-6)
    for p in [(0, 100), (30, 50.2)]:
        expected = np.percentile(data.astype(np.float64), p)
        assert robust_range(vol, *p) == pytest.approx(tuple(expected), rel=1e-6)
    with pytest.raises(ConfigError, match="mr_percentiles"):
        robust_range(data, 60, 40)


def test_body_mask_keeps_largest_component_and_fills_holes():
    z, n = 5, 40
    _, yy, xx = np.meshgrid(np.arange(z), np.arange(n), np.arange(n), indexing="ij")
    disk = (yy - 18) ** 2 + (xx - 20) ** 2 <= 13**2
    tube = (yy - 18) ** 2 + (xx - 20) ** 2 <= 4**2  # an airway running through every slice
    table = (yy >= 35) & (xx >= 5) & (xx < 35)
    ct = np.full((z, n, n), -1000.0)
    ct[disk] = 30.0
    ct[tube] = -950.0
    ct[table] = 200.0
    ct[4] = -1000.0  # an empty slice (above the patient)
    per_slice = body_mask(ct, -500)
    expected = disk.copy()
    expected[4] = False
    np.testing.assert_array_equal(per_slice, expected)
    in_3d = body_mask(ct, -500, per_slice=False)
    np.testing.assert_array_equal(in_3d, expected & ~tube)  # the airway opens to the outside in 3D


def test_slice_consistency_zero_for_z_constant_error_positive_otherwise():
    rng = np.random.default_rng(1)
    ref = rng.uniform(-400, 400, size=(9, 12, 12))
    err_yx = rng.uniform(-100, 100, size=(1, 12, 12))
    m = evaluate_arrays(ref, ref + err_yx, WINDOW)
    assert m["slice_consistency"] == pytest.approx(0.0, abs=1e-15)
    assert m["slice_consistency_ratio"] == pytest.approx(0.0, abs=1e-12)
    rec = ref + err_yx + rng.uniform(-100, 100, size=(9, 1, 1))
    m = evaluate_arrays(ref, rec, WINDOW)
    e = _unit(rec) - _unit(ref)
    sc = np.abs(np.diff(e, axis=0)).mean()
    sc_ref = np.abs(np.diff(_unit(ref), axis=0)).mean()
    assert sc > 0.01
    assert m["slice_consistency"] == pytest.approx(sc, rel=1e-12)
    assert m["info"]["slice_consistency_ref"] == pytest.approx(sc_ref, rel=1e-12)
    assert m["slice_consistency_ratio"] == pytest.approx(sc / sc_ref, rel=1e-12)


def _assert_same_metrics(a: dict, b: dict) -> None:
    for k in SCALAR_KEYS:
        if a[k] is None:
            assert b[k] is None, k
        else:
            assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12), k
    np.testing.assert_allclose(b["psnr_per_slice"], a["psnr_per_slice"], rtol=1e-10)
    np.testing.assert_allclose(b["ssim_per_slice"], a["ssim_per_slice"], rtol=1e-10)
    assert a["notes"] == b["notes"]
    assert a["info"]["n_voxels"] == b["info"]["n_voxels"] and a["info"]["window"] == b["info"]["window"]
    assert b["info"]["slice_consistency_ref"] == pytest.approx(a["info"]["slice_consistency_ref"], rel=1e-10)


@pytest.mark.parametrize("slab", [3, 7, 40])
@pytest.mark.parametrize("mask_kind", ["none", "body", "array", "volume"])
def test_streaming_equals_in_memory(tmp_path, slab, mask_kind):
    ref, rec = _phantom_pair(shape=(23, 16, 18), seed=2)
    geom = Geometry((2.0, 0.8, 0.8))
    vref = Volume.from_array(tmp_path / "ref.zarr", ref, geom, {"modality": "CT"}, chunk_depth=4)
    vrec = Volume.from_array(tmp_path / "rec.zarr", rec, geom, chunk_depth=5)
    arr = body_mask(ref, -500) & (np.arange(23)[:, None, None] % 6 != 2)  # a mask with gaps along z
    mask = {"none": None, "body": "body", "array": arr,
            "volume": Volume.from_array(tmp_path / "m.zarr", arr.astype(np.float32), geom)}[mask_kind]
    mem = evaluate_arrays(ref, rec, WINDOW, mask=arr if mask_kind == "volume" else mask)
    streamed = evaluate_volumes(vref, vrec, WINDOW, mask=mask, slab=slab)
    mem["info"]["mask"] = streamed["info"]["mask"]
    _assert_same_metrics(mem, streamed)
    if mask_kind == "array":
        assert np.isnan(streamed["psnr_per_slice"][2])  # a slice outside the mask has no PSNR


def test_thin_volume_reports_undefined_ssim(tmp_path):
    ref, rec = _phantom_pair(shape=(6, 16, 16), seed=4)
    m = evaluate_arrays(ref, rec, WINDOW)
    assert m["ssim"] is None and m["ssim_coronal"] is None and m["ssim_sagittal"] is None
    axial = [structural_similarity(a, b, **SK) for a, b in zip(_unit(ref), _unit(rec), strict=True)]
    assert m["ssim_axial"] == pytest.approx(np.mean(axial), abs=1e-4)
    assert any("ssim undefined" in n and "11 voxels" in n for n in m["notes"])
    v1 = Volume.from_array(tmp_path / "a.zarr", ref, Geometry(), chunk_depth=2)
    v2 = Volume.from_array(tmp_path / "b.zarr", rec, Geometry(), chunk_depth=2)
    _assert_same_metrics(m, evaluate_volumes(v1, v2, WINDOW, slab=2))


def test_bad_inputs_raise_clear_errors(tmp_path):
    ref, rec = _phantom_pair(shape=(12, 12, 12))
    with pytest.raises(InputError, match="shape"):
        evaluate_arrays(ref, rec[:-1], WINDOW)
    bad = rec.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="1 NaN/Inf"):
        evaluate_arrays(ref, bad, WINDOW)
    with pytest.raises(ConfigError, match="'none' or 'body'"):
        evaluate_arrays(ref, rec, WINDOW, mask="lungs")
    with pytest.raises(InputError, match=r"Mask shape \(3, 3, 3\) differs"):
        evaluate_arrays(ref, rec, WINDOW, mask=np.ones((3, 3, 3), bool))
    with pytest.raises(InputError, match="NaN/Inf"):
        robust_range(bad)
    with pytest.raises(InputError, match="mask is empty"):
        evaluate_arrays(ref, rec, WINDOW, mask=np.zeros(ref.shape, bool))
    v1 = Volume.from_array(tmp_path / "a.zarr", ref, Geometry())
    v2 = Volume.from_array(tmp_path / "b.zarr", rec, Geometry(spacing=(3.0, 1.0, 1.0)))
    with pytest.raises(InputError, match=r"a\.zarr.*b\.zarr.*different geometries"):
        evaluate_volumes(v1, v2, WINDOW)


class _DenseOperator(LinearOperator):
    """A per-slice dense matrix (test only, not registered): image (ny, nx) -> measurement (m,)."""

    def __init__(self, matrix: torch.Tensor, in_shape: tuple[int, int]) -> None:
        self.matrix = matrix
        self.in_shape, self.out_shape = in_shape, (matrix.shape[0],)
        self.in_dtype = self.out_dtype = matrix.dtype

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2) @ self.matrix.T

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.matrix.conj()).unflatten(-1, self.in_shape)

    @classmethod
    def example(cls) -> _DenseOperator:
        return cls(torch.ones(2, 4), (2, 2))

    def state(self):
        return {}, {"matrix": self.matrix.numpy()}

    @classmethod
    def from_state(cls, params, arrays, device="cpu"):
        raise NotImplementedError


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_data_residual_zero_for_exact_data_and_matches_hand_value(dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(40, 30, generator=g, dtype=dtype)
    op = _DenseOperator(a, (5, 6))
    x = torch.rand(9, 5, 6, generator=g)  # a real image
    y = op.forward(x.to(dtype))
    assert data_residual(op, x, y) < 1e-6
    noise = 0.05 * torch.randn(y.shape, generator=g, dtype=dtype)
    yn = (y + noise).numpy()
    expected = np.linalg.norm(noise.numpy().astype(np.complex128)) / np.linalg.norm(yn.astype(np.complex128))
    assert data_residual(op, x.numpy(), yn, slab=2) == pytest.approx(expected, rel=1e-5)
    assert data_residual(op, x, yn, slab=100) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError, match="do not fit the operator"):
        data_residual(op, x[:, :4], yn)


def test_posterior_stats_streaming_variants_agree(tmp_path):
    rng = np.random.default_rng(6)
    samples = (rng.normal(size=(5, 7, 8, 9)) * 10 + 1000).astype(np.float32)  # large offset: stability
    mean, std = posterior_stats(samples)
    np.testing.assert_allclose(mean, samples.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, samples.astype(np.float64).std(0, ddof=1), rtol=1e-5)
    rm = RunningMoments()
    rm.add(samples[0])
    rm.add_batch(samples[1:3])
    rm.add(torch.from_numpy(samples[3]))
    rm.add(samples[4])
    assert rm.count == 5
    np.testing.assert_allclose(rm.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(rm.std, std, rtol=1e-5)
    vols = [Volume.from_array(tmp_path / f"s{i}.zarr", s, Geometry()) for i, s in enumerate(samples)]
    for source in (vols, samples):
        got_m, got_s = np.zeros_like(mean), np.zeros_like(std)
        for z0, z1, m, s in iter_posterior_stats(source, slab=3):
            got_m[z0:z1], got_s[z0:z1] = m, s
        np.testing.assert_array_equal(got_m, mean)
        np.testing.assert_array_equal(got_s, std)
    with pytest.raises(InputError, match="at least 2 samples"):
        posterior_stats(samples[:1])


def test_coverage_of_a_calibrated_gaussian_posterior():
    rng = np.random.default_rng(7)
    shape = (20, 100, 100)  # 200k voxels: Monte Carlo std of a coverage fraction <= 1.1e-3
    mu = rng.uniform(-500, 500, size=shape)
    sigma = rng.uniform(5, 50, size=shape)
    ref = mu + sigma * rng.normal(size=shape)
    cov = coverage(mu, sigma, ref)
    assert cov["cov1"] == pytest.approx(0.6827, abs=5e-3)
    assert cov["cov2"] == pytest.approx(0.9545, abs=3e-3)
    assert expected_coverage(1) == pytest.approx(0.682689, abs=1e-6)
    assert expected_coverage(2, 10**7) == pytest.approx(0.954500, abs=1e-6)
    # with the mean and std of only S = 4 samples, coverage drops, as the Student-t formula predicts
    samples = mu + sigma * rng.normal(size=(4, *shape))
    mean, std = posterior_stats(samples)
    cov4 = coverage(mean, std, ref, ks=(1, 2, 3))
    assert set(cov4) == {"cov1", "cov2", "cov3"}
    for k in (1, 2, 3):
        assert cov4[f"cov{k}"] == pytest.approx(expected_coverage(k, 4), abs=5e-3)
    assert cov4["cov1"] < 0.62  # clearly below the Gaussian 0.683: the correction matters
    # an over-confident posterior (std halved) covers far less
    assert coverage(mu, sigma / 2, ref)["cov1"] == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=5e-3)


def test_coverage_volumes_equals_in_memory(tmp_path):
    ref, _ = _phantom_pair(shape=(10, 16, 16), seed=8)
    rng = np.random.default_rng(9)
    std = rng.uniform(10, 60, size=ref.shape).astype(np.float32)
    mean = (ref + std * rng.normal(size=ref.shape)).astype(np.float32)
    g = Geometry()
    vols = [Volume.from_array(tmp_path / f"{n}.zarr", a, g, chunk_depth=3)
            for n, a in (("mean", mean), ("std", std), ("ref", ref))]
    expected = coverage(mean, std, ref, mask=body_mask(ref, -500))
    assert coverage_volumes(*vols, mask="body", slab=4) == expected
    assert 0.5 < expected["cov1"] < 0.85
