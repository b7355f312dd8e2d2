"""MRI operators, coil maps, masks and trajectories: adjointness, SigPy parity, isometry, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import sigpy
import torch

from medrecon.errors import ConfigError
from medrecon.physics import mri
from medrecon.physics.coils import birdcage_coils, espirit_coils
from medrecon.physics.mri_phase import smooth_phase
from medrecon.physics.mri_sampling import (
    acceleration,
    cartesian_mask_1d,
    default_spokes,
    density_compensation,
    poisson_mask_2d,
    radial_trajectory,
    spiral_trajectory,
)
from medrecon.physics.operator import dot_test, operator_from_state


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    return (yy - n / 2) / (n / 2), (xx - n / 2) / (n / 2)


def _phantom(n: int) -> np.ndarray:
    """An elliptical head-like object with two smooth blobs; zero outside the ellipse."""
    yy, xx = _grid(n)
    inside = (yy / 0.8) ** 2 + (xx / 0.65) ** 2 < 1
    img = 0.5 + np.exp(-((yy - 0.2) ** 2 + xx**2) / 0.1)
    img += 0.5 * np.exp(-((yy + 0.3) ** 2 + (xx - 0.2) ** 2) / 0.02)
    return (img * inside).astype(np.float32)


def _crandn(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


# ------------------------------------------------------------------------------------------- operators

@pytest.mark.parametrize("kind", ["mri-sense-2d", "mri-sense-3d", "mri-nufft-2d"])
def test_dot_test_and_state_round_trip(kind):
    from medrecon.physics.operator import OPERATORS

    op = OPERATORS[kind].example()
    assert dot_test(op, generator=torch.Generator().manual_seed(1)) < 1e-4
    assert dot_test(op, batch=(3,), generator=torch.Generator().manual_seed(2)) < 1e-4
    params, arrays = op.state()
    op2 = operator_from_state(kind, params, arrays)
    x = _crandn((2, *op.in_shape))
    torch.testing.assert_close(op2.forward(x), op.forward(x))


@pytest.mark.parametrize("shape", [(32, 32), (31, 27)])  # even: modulation path; odd: fftshift path
def test_torch_sense_equals_sigpy_sense(shape):
    c = 6
    maps = birdcage_coils(c, shape)
    mask = cartesian_mask_1d(shape, 3.0, acs_lines=6, seed=3)
    op = mri.Sense2D(maps, mask)
    x = _crandn(shape, seed=4)
    ref = op.sigpy_linop()
    y = op.forward(x).numpy()
    y_sp = ref(x.numpy())
    assert np.abs(y - y_sp).max() < 1e-5 * np.abs(y_sp).max()
    xa = op.adjoint(torch.from_numpy(y_sp)).numpy()
    xa_sp = ref.H(y_sp)
    assert np.abs(xa - xa_sp).max() < 1e-5 * np.abs(xa_sp).max()
    assert (y[:, ~mask] == 0).all()  # unsampled lines are exactly zero


def test_sense2d_batched_per_slice_matches_slice_loop():
    n, z, c = 16, 3, 4
    maps = np.stack([birdcage_coils(c, (n, n), radius=r) for r in (1.2, 1.5, 2.0)])
    masks = cartesian_mask_1d((n, n), 2.0, acs_lines=4, seed=0, n_slices=z)
    op = mri.Sense2D(maps, masks)
    x = _crandn((z, n, n))
    y = op.forward(x)
    for k in range(z):
        single = mri.Sense2D(maps[k], masks[k])
        torch.testing.assert_close(y[k], single.forward(x[k]))
        torch.testing.assert_close(op.slab(k, k + 1).adjoint(y[k:k + 1])[0], single.adjoint(y[k]))
    with pytest.raises(ValueError, match="per-slice"):
        op.forward(x[:2])


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("per_slice", [False, True])
@pytest.mark.parametrize("shape", [(40, 56), (39, 28)])  # even: modulation path; odd: fftshift path
def test_sense2d_batch_equals_per_slice_application(per_slice, shape, chunk):
    """The CPU slice loop (forward, adjoint, fused normal) equals applying the operator slice by slice,
    also with an extra leading batch dim in front of the slice axis (per-slice maps/mask follow it) and
    with chunks that do not divide the slice count."""
    z, c = 3, 5
    if per_slice:
        maps = np.stack([birdcage_coils(c, shape, radius=r) for r in (1.2, 1.5, 2.0)])
        masks = cartesian_mask_1d(shape, 2.0, acs_lines=4, seed=0, n_slices=z)
        singles = [mri.Sense2D(maps[k], masks[k]) for k in range(z)]
    else:
        maps, masks = birdcage_coils(c, shape), cartesian_mask_1d(shape, 2.0, acs_lines=4, seed=0)
        singles = [mri.Sense2D(maps, masks)] * z
    op = mri.Sense2D(maps, masks)
    op.CPU_CHUNK_SLICES = chunk
    x = _crandn((2, z, *shape), seed=8)
    y = _crandn((2, z, c, *shape), seed=9)
    fwd, adj, nrm = op.forward(x), op.adjoint(y), op.normal(x)
    assert fwd.shape == y.shape and adj.shape == nrm.shape == x.shape
    for b in range(2):
        for k, single in enumerate(singles):
            for got, want in ((fwd[b, k], single.forward(x[b, k])), (adj[b, k], single.adjoint(y[b, k])),
                              (nrm[b, k], single.adjoint(single.forward(x[b, k])))):
                assert (got - want).norm() <= 1e-5 * want.norm()
    x.requires_grad_()
    torch.testing.assert_close(op.normal(x), nrm, atol=1e-5, rtol=1e-5)  # autograd path: forward + adjoint


def test_fully_sampled_sense_is_isometry_inside_object():
    n = 48
    x = torch.from_numpy(_phantom(n)).to(torch.complex64)
    op2 = mri.Sense2D(birdcage_coils(8, (n, n)))
    torch.testing.assert_close(op2.normal(x), x, atol=1e-5, rtol=0)
    op3 = mri.Sense3D(birdcage_coils(8, (4, n, n)))
    x3 = x.expand(4, n, n)
    torch.testing.assert_close(op3.normal(x3), x3, atol=1e-5, rtol=0)
    # ||A x|| = ||x||: the orthonormal FFT keeps noise levels and step sizes in image units
    assert abs(op2.forward(x).norm() / x.norm() - 1) < 1e-5


@pytest.mark.parametrize("shape", [(6, 10, 8), (5, 10, 7)])
def test_sense3d_matches_sigpy_3d_sense(shape):
    maps = birdcage_coils(4, shape, coils_per_ring=2)
    mask = poisson_mask_2d(shape[:2], 2.0, acs=2, seed=0)
    op = mri.Sense3D(maps, mask)
    x = _crandn(shape, seed=5)
    ref = sigpy.mri.linop.Sense(maps, weights=np.broadcast_to(mask[..., None], shape).astype(np.float32))
    y_sp = ref(x.numpy())
    assert np.abs(op.forward(x).numpy() - y_sp).max() < 1e-5 * np.abs(y_sp).max()
    xa_sp = ref.H(y_sp)
    assert np.abs(op.adjoint(torch.from_numpy(y_sp)).numpy() - xa_sp).max() < 1e-5 * np.abs(xa_sp).max()


def test_autograd_backward_is_adjoint():
    op = mri.Sense2D.example()
    x = _crandn((2, *op.in_shape)).requires_grad_()
    y = _crandn((2, *op.out_shape), seed=7)
    loss = (op.forward(x).conj() * y).real.sum()
    loss.backward()
    torch.testing.assert_close(x.grad, op.adjoint(y), atol=1e-5, rtol=1e-5)


def test_complex_channel_round_trip():
    x = _crandn((3, 5, 7))
    ch = mri.complex_to_channels(x)
    assert ch.shape == (3, 2, 5, 7) and ch.dtype == torch.float32
    torch.testing.assert_close(ch[:, 1], x.imag)
    torch.testing.assert_close(mri.channels_to_complex(ch), x)


# ---------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("accel", [2.0, 4.0, 6.0])
@pytest.mark.parametrize("density", ["polynomial", "gaussian"])
def test_cartesian_mask_acs_acceleration_determinism(accel, density):
    mask = cartesian_mask_1d((256, 200), accel, acs_lines=24, seed=11, density=density)
    assert mask.shape == (256, 200) and mask.dtype == bool
    assert mask[128 - 12:128 + 12].all()  # ACS block, centred on k = 0 (index N // 2)
    assert (mask == mask[:, :1]).all()  # whole readout lines
    assert abs(acceleration(mask) / accel - 1) < 0.10
    np.testing.assert_array_equal(mask, cartesian_mask_1d((256, 200), accel, 24, seed=11, density=density))
    assert not np.array_equal(mask, cartesian_mask_1d((256, 200), accel, 24, seed=12, density=density))
    # variable density: inner half of k-space sampled more densely than the outer half
    lines = mask[:, 0]
    outside_acs = np.r_[0:116, 140:256]
    inner = [k for k in outside_acs if abs(k - 128) < 64]
    outer = [k for k in outside_acs if abs(k - 128) >= 64]
    assert lines[inner].mean() > lines[outer].mean()


def test_cartesian_mask_per_slice_and_errors():
    masks = cartesian_mask_1d((64, 32), 4.0, acs_lines=8, seed=0, n_slices=5)
    assert masks.shape == (5, 64, 32)
    assert not np.array_equal(masks[0], masks[1])
    assert abs(acceleration(masks) / 4.0 - 1) < 0.10
    with pytest.raises(ConfigError, match="acs_lines"):
        cartesian_mask_1d((64, 32), 8.0, acs_lines=24)


def test_poisson_mask():
    mask = poisson_mask_2d((48, 64), 4.0, acs=12, seed=5)
    assert mask.shape == (48, 64)
    assert mask[24 - 6:24 + 6, 32 - 6:32 + 6].all()
    assert abs(acceleration(mask) / 4.0 - 1) < 0.10
    np.testing.assert_array_equal(mask, poisson_mask_2d((48, 64), 4.0, acs=12, seed=5))
    assert not np.array_equal(mask, poisson_mask_2d((48, 64), 4.0, acs=12, seed=6))


# --------------------------------------------------------------------------------------- trajectories

def test_trajectories_in_range():
    rad = radial_trajectory((64, 48), default_spokes((64, 48), 4.0))
    assert rad.shape == (51, 64, 2) and rad.dtype == np.float32
    assert np.abs(rad[..., -2]).max() <= 32 and np.abs(rad[..., -1]).max() <= 24
    assert np.allclose(rad[:, 0], 0)  # centre-out rays start at k = 0
    uni = radial_trajectory((32, 32), 8, golden=False)
    ang = np.arctan2(uni[:, -1, -2], uni[:, -1, -1])
    np.testing.assert_allclose(np.diff(np.unwrap(ang)), 2 * np.pi / 8, atol=1e-5)
    sp = spiral_trajectory((64, 64), 8, 1.0)
    assert sp.ndim == 2 and sp.shape[1] == 2 and np.abs(sp).max() <= 32
    assert np.sqrt((sp**2).sum(1)).max() > 31  # reaches the edge of k-space


@pytest.mark.parametrize(("traj", "dcf", "tol"), [("radial", "ramp", 0.05), ("spiral", "pipe_menon", 0.07)])
def test_nufft_gridding_reconstructs_smooth_image(traj, dcf, tol):
    """A^H (w * A x) ~ x for a smooth image: relative L2 error inside the object below ``tol``."""
    n = 64
    yy, xx = _grid(n)
    x = np.exp(-(yy**2 + xx**2) / 0.15).astype(np.float32)
    coord = radial_trajectory((n, n), default_spokes((n, n), 1.0)) if traj == "radial" \
        else spiral_trajectory((n, n), 16, 1.0)
    op = mri.Nufft2D(birdcage_coils(4, (n, n)), coord, density_compensation(coord, (n, n), dcf))
    rec = op.gridding(op.forward(torch.from_numpy(x))).numpy()
    inside = x > 0.05
    err = np.linalg.norm(rec[inside] - x[inside]) / np.linalg.norm(x[inside])
    assert err < tol
    assert np.abs(rec.imag).max() < 0.05 * x.max()


def test_nufft_matches_sigpy_sense_and_batches():
    n = 24
    maps = birdcage_coils(3, (n, n))
    coord = radial_trajectory((n, n), 20, 12)
    op = mri.Nufft2D(maps, coord)
    x = _crandn((2, n, n))
    y = op.forward(x)
    ref = sigpy.mri.linop.Sense(maps, coord=coord.reshape(-1, 2))
    for k in range(2):
        y_sp = ref(x[k].numpy())
        assert np.abs(y[k].numpy() - y_sp).max() < 1e-5 * np.abs(y_sp).max()


# ------------------------------------------------------------------------------------------ coil maps

def test_birdcage_normalised():
    m2 = birdcage_coils(8, (32, 40))
    m3 = birdcage_coils(12, (6, 32, 40))
    assert m2.shape == (8, 32, 40) and m3.shape == (12, 6, 32, 40) and m2.dtype == np.complex64
    np.testing.assert_allclose((np.abs(m2) ** 2).sum(0), 1, atol=1e-5)
    np.testing.assert_allclose((np.abs(m3) ** 2).sum(0), 1, atol=1e-5)
    # the coils see different regions: a coil's magnitude varies across the FOV
    assert np.abs(m2[0]).max() / np.abs(m2[0]).min() > 3


def _map_correlation(est: np.ndarray, true: np.ndarray, inside: np.ndarray) -> float:
    """Mean over object voxels of the coil-vector correlation |<s_est, s_true>| / (|s_est| |s_true|),
    blind to the one phase per voxel that ESPIRiT cannot determine."""
    num = np.abs((est * true.conj()).sum(0))
    den = np.sqrt((np.abs(est) ** 2).sum(0) * (np.abs(true) ** 2).sum(0)) + 1e-12
    return float((num / den)[inside].mean())


def test_espirit_recovers_birdcage_maps():
    n = 32
    maps = birdcage_coils(8, (n, n))
    img = _phantom(n)
    ksp = sigpy.fft(maps * img, axes=(-2, -1))
    est = espirit_coils(ksp, calib_width=12)
    inside = img > 0
    assert est.shape == maps.shape
    assert _map_correlation(est, maps, inside) > 0.9
    # unit RSS where ESPIRiT keeps the maps (eigenvalue > crop), zero elsewhere; kept on ~all of the object
    rss = (np.abs(est) ** 2).sum(0)
    kept = rss > 0.5
    np.testing.assert_allclose(rss[kept], 1, atol=1e-3)
    assert rss[~kept].max(initial=0) < 1e-6
    assert kept[inside].mean() > 0.98


def test_config_builds_operators_and_simulates():
    shape = (2, 48, 48)
    vol = np.stack([_phantom(48)] * 2)
    cfg = {"coils": 4, "acs_lines": 12, "acceleration": 3, "mask_per_slice": True, "snr_db": 30}
    op = mri.mri_operator_from_config(cfg, shape, seed=0)
    assert op.kind == "mri-sense-2d" and op.out_shape == (4, 48, 48) and op.mask_np.shape == shape
    assert abs(acceleration(op.mask_np) / 3 - 1) < 0.10
    np.testing.assert_array_equal(op.mask_np, mri.mri_operator_from_config(cfg, shape, seed=0).mask_np)
    phase = smooth_phase(shape, seed=1, max_phase=1.0)
    assert np.abs(phase).max() <= 1.0 and phase.std() > 0.01
    np.testing.assert_array_equal(smooth_phase(shape, 1, 1.0, z_range=(1, 2)), phase[1:2])
    y = mri.simulate_kspace(vol, op, phase)
    assert y.shape == (2, 4, 48, 48)
    torch.testing.assert_close(y[1:], mri.simulate_kspace(vol[1:], op.slab(1, 2), phase[1:]))

    op3 = mri.mri_operator_from_config({"operator": "sense3d", "mask": "poisson_2d", "acs_lines": 4,
                                        "acceleration": 2, "coils": 4}, (8, 16, 12), seed=0)
    assert op3.kind == "mri-sense-3d" and op3.mask_np.shape == (8, 16)
    opn = mri.mri_operator_from_config({"operator": "nufft2d", "spokes": 30}, (1, 32, 32), seed=0)
    assert opn.kind == "mri-nufft-2d" and opn.out_shape == (8, 30 * 32)
    with pytest.raises(ConfigError, match="sense3d"):
        mri.mri_operator_from_config({"mask": "poisson_2d"}, shape)
    with pytest.raises(ConfigError, match=r"mr\.operator"):
        mri.mri_operator_from_config({"operator": "grappa"}, shape)
    with pytest.raises(ConfigError, match="mask_per_slice"):
        mri.mri_operator_from_config({"operator": "nufft2d", "mask_per_slice": True}, shape)


@pytest.mark.parametrize("operator", ["sense2d", "nufft2d"])
def test_calibrated_operator_estimates_espirit_maps(operator):
    """coil_maps: espirit: maps re-estimated from the simulated data's ACS region (for nufft2d gridded from
    the oversampled centre of the radial data) match the true birdcage maps."""
    vol = _phantom(32)[None]
    cfg = {"operator": operator, "coils": 4, "acs_lines": 12, "acceleration": 2, "coil_maps": "espirit"}
    op = mri.mri_operator_from_config(cfg, (1, 32, 32), seed=0)
    rec = mri.calibrated_operator(cfg, op, mri.simulate_kspace(vol, op))
    assert rec.kind == op.kind
    maps = rec.maps_np.reshape(4, 32, 32)
    assert _map_correlation(maps, op.maps_np, vol[0] > 0) > 0.9
    assert mri.calibrated_operator({"coil_maps": "birdcage"}, op, None) is op


@pytest.mark.gpu
def test_gpu_parity():
    for op in (mri.Sense2D.example(), mri.Sense3D.example(), mri.Nufft2D.example()):
        x = _crandn((2, *op.in_shape))
        y_cpu = op.forward(x)
        y_gpu = op.forward(x.cuda()).cpu()
        torch.testing.assert_close(y_gpu, y_cpu, atol=1e-4, rtol=1e-4)
        assert dot_test(op, device="cuda") < 1e-4
