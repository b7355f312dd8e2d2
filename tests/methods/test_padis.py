"""PaDIS: coordinates, tiling, stitched denoiser exactness on an analytic position-dependent prior, patch
training data, and the padis / padis3d samplers on small CT (parallel beam) and MRI (SENSE 2D) problems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrecon.diffusion.analytic import GaussianPrior
from medrecon.diffusion.denoiser import Denoiser, EDMDenoiser, Prior, sigma_batch
from medrecon.diffusion.networks import build_unet, tiny_network_spec
from medrecon.diffusion.patches import (
    PatchDataset,
    PatchDenoiser,
    axis_tiling,
    coordinate_channels,
    crop_image,
    extract_patches,
    pad_image,
    patch_indices,
    patch_prior_from_checkpoint,
    ring_mask,
    slab_coords,
    train_patch_prior,
)
from medrecon.errors import ConfigError
from medrecon.methods.padis import choose_patch_size
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.ct import ParallelBeamCT
from medrecon.physics.ct_geometry import CTGeometry, sparse_view_angles
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from medrecon.volume import Geometry, Volume

F64 = torch.float64



# --------------------------------------------------------------------------------- analytic position prior


def _mean(c: torch.Tensor) -> torch.Tensor:
    """Prior mean as a function of the normalised coordinates c = (..., y, x) channels."""
    return 0.3 * c[0] - 0.5 * c[1] + 0.2 * c[0] * c[1]


def _var(c: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.4 * torch.sin(3 * c[0]) * torch.cos(2 * c[1])


class AnalyticPatchNet(Denoiser):
    """Exact patch denoiser of a prior independent per pixel with position-dependent mean and variance.

    It knows nothing about where the patch is except what the coordinate channels say. Channel k of a
    C-channel image has mean (k + 1) * mean(pos). For slab patches (3D) the input holds C*d channels and
    the coordinates (z_centre, y, x); slice j of the slab sits at z_centre + (j - (d-1)/2) * 2/(Zp - 1), and
    the variance also depends on z.
    """

    def __init__(self, channels: int = 1, depth: int | None = None, z_padded: int | None = None) -> None:
        self.c, self.depth, self.zp = channels, depth, z_padded
        self.nfe = 0

    def moments(self, coords: torch.Tensor, n_ch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (B, n_ch, P, P) from coords (B, K, P, P)."""
        c = coords.movedim(1, 0)
        if self.depth is None:
            mu = torch.stack([(k + 1) * _mean(c) for k in range(n_ch)], dim=1)
            var = _var(c)[:, None].expand_as(mu)
            return mu, var
        zc, yx = c[0], c[1:]
        mus, vs = [], []
        for k in range(self.c):
            for j in range(self.depth):
                z = zc + (j - (self.depth - 1) / 2) * 2 / (self.zp - 1)
                mus.append((k + 1) * _mean(yx) + 0.25 * z)
                vs.append(_var(yx) * (1.0 + 0.3 * z))
        return torch.stack(mus, 1), torch.stack(vs, 1)

    def denoise(self, x, sigma, cond=None):
        mu, var = self.moments(cond["coords"].to(F64), x.shape[1])
        s2 = sigma_batch(sigma, x.shape[0]).to(F64).reshape(-1, 1, 1, 1) ** 2
        return (mu + var / (var + s2) * (x.to(F64) - mu)).to(x.dtype)


def exact_whole(x: torch.Tensor, sigma: float, pad: tuple[int, ...], pad_value: float,
                net: AnalyticPatchNet) -> torch.Tensor:
    """Exact denoiser of the whole padded image (B, C, *S): per pixel, padding ring = pad_value (var 0)."""
    spatial = tuple(x.shape[2:])
    coords = coordinate_channels(spatial, dtype=F64)
    if len(spatial) == 2:
        mu, var = net.moments(coords[None], x.shape[1])
    else:   # per slice z of the volume: z of slice j is the slab formula with a slab of depth 1
        c = coords.movedim(1, 0)                                       # (Z, 3, Y, X)
        mus = [torch.stack([(k + 1) * _mean(c[:, 1:].movedim(1, 0)) + 0.25 * c[:, 0] for k in range(x.shape[1])])]
        var = (_var(c[:, 1:].movedim(1, 0)) * (1.0 + 0.3 * c[:, 0]))[None].expand(x.shape[1], *spatial)
        mu, var = mus[0][None], var[None]
    d = mu + var / (var + sigma**2) * (x.to(F64) - mu)
    return torch.where(ring_mask(spatial, pad), torch.full_like(d, pad_value), d).to(x.dtype)


# --------------------------------------------------------------------------------- coordinates and tiling


def test_coordinate_channels_normalise_by_the_padded_size_and_windows_agree():
    full = coordinate_channels((5, 7))
    assert full.shape == (2, 5, 7)
    assert torch.allclose(full[0, :, 3], torch.linspace(-1, 1, 5), atol=1e-6)
    assert torch.allclose(full[1, 2], torch.linspace(-1, 1, 7), atol=1e-6)
    # reference formula (idx / (R - 1) - 0.5) * 2, e.g. idx 1 of 5 -> -0.5
    assert float(full[0, 1, 0]) == pytest.approx(-0.5)
    win = coordinate_channels((5, 7), start=(1, 2), size=(3, 4))
    assert torch.equal(win, full[:, 1:4, 2:6])
    assert torch.equal(coordinate_channels((1, 3))[0], torch.zeros(1, 3))


def test_reference_grid_and_exact_single_coverage_for_every_origin():
    t = axis_tiling(256, 24, 56)
    assert (t.k, t.lo, t.hi) == (5, 0, 24)      # the reference's 5 x 56 = 280 grid, origins 0..24
    for length, pad, size in [(12, 3, 5), (16, 4, 8), (13, 2, 4), (10, 0, 5), (7, 2, 11)]:
        t = axis_tiling(length, pad, size)
        assert t is not None
        spatial = (length + 2 * pad, length + 2 * pad)
        for oy in range(t.lo, t.hi + 1):
            for ox in (t.lo, t.hi):
                idx = patch_indices(spatial, (size, size), [t.starts(oy), t.starts(ox)])
                counts = torch.bincount(idx.reshape(-1), minlength=math.prod(spatial)).reshape(spatial)
                assert int(counts.max()) == 1                                   # non-overlapping
                assert bool((crop_image(counts, (pad, pad)) == 1).all())         # image covered exactly once
                assert int(counts.sum()) == idx.numel()                          # all inside the padded image
    assert axis_tiling(10, 0, 4) is None                                         # 4 never tiles 10 without pad


def test_patch_size_choice_and_error_names_valid_sizes():
    assert choose_patch_size((256, 256), (24, 24), [16, 32, 64], 4, "stitch") == 56
    assert choose_patch_size((12, 12), (2, 2), [4, 8], 2, "stitch") == 8      # fixed grid: only choice
    den = PatchDenoiser(AnalyticPatchNet(), (4, 4), (0, 0))
    with pytest.raises(ConfigError, match=r"patch size in \[.*5.*\]"):
        den(torch.zeros(1, 1, 10, 10), 0.5)


# --------------------------------------------------------------------------------- stitched denoiser


@pytest.mark.parametrize("channels,mode", [(1, "stitch"), (2, "stitch"), (1, "overlap")])
def test_stitched_analytic_denoiser_equals_exact_whole_image_denoiser(channels, mode):
    pad, n, size = 3, 11, 4
    net = AnalyticPatchNet(channels)
    gen = torch.Generator().manual_seed(0)
    den = PatchDenoiser(net, (size, size), (pad, pad), mode=mode, max_batch=7, pad_value=-1.0, generator=gen)
    x = torch.randn(3, channels, n + 2 * pad, n + 2 * pad, generator=torch.Generator().manual_seed(1), dtype=F64)
    sigma = torch.tensor([0.1, 0.7, 3.0], dtype=F64)
    origins = set()
    for _ in range(12):
        got = den(x, sigma)
        origins.add(den.last_origin)
        for b in range(3):
            want = exact_whole(x[b:b + 1], float(sigma[b]), (pad, pad), -1.0, net)
            assert torch.allclose(got[b:b + 1], want, atol=1e-12)
    assert len(origins) > 3                       # the grid really moved
    assert den.nfe == 12


def test_stitched_analytic_slab_denoiser_equals_exact_whole_volume_denoiser():
    pads, depth, size = (2, 2, 2), 3, 4
    zyx = (5, 9, 9)
    spatial = tuple(n + 2 * p for n, p in zip(zyx, pads, strict=True))
    net = AnalyticPatchNet(1, depth=depth, z_padded=spatial[0])
    den = PatchDenoiser(net, (depth, size, size), pads, pad_value=0.0, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 1, *spatial, generator=torch.Generator().manual_seed(4), dtype=F64)
    origins = set()
    for _ in range(8):
        got = den(x, 0.4)
        origins.add(den.last_origin)
        assert torch.allclose(got, exact_whole(x, 0.4, pads, 0.0, net).expand_as(got), atol=1e-12)
    assert len({o[0] for o in origins}) > 1       # the z grid moves too


def test_patch_as_large_as_the_padded_image_equals_the_whole_image_network():
    torch.manual_seed(0)
    spec = tiny_network_spec("patch", 16)
    net = build_unet(spec).eval()
    inner = EDMDenoiser(net)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    den = PatchDenoiser(inner, (16, 16), (2, 2), pad_value=-1.0)
    with torch.no_grad():
        got = den(x, torch.tensor([0.3, 2.0]))
        coords = coordinate_channels((16, 16))[None].expand(2, -1, -1, -1)
        whole = inner(x, torch.tensor([0.3, 2.0]), {"coords": coords})
    assert den.last_origin == (0, 0)
    ring = ring_mask((16, 16), (2, 2))
    assert torch.allclose(got[..., ~ring], whole[..., ~ring], atol=1e-6)
    assert bool((got[..., ring] == -1.0).all())


# --------------------------------------------------------------------------------- training data


def _stack(seed: int, z: int = 3, c: int = 1, n: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (z, c, n, n)).astype(np.float32)


def test_patch_items_have_the_inference_coordinates_and_padded_content():
    img = _stack(0, z=2, n=10)
    ds = PatchDataset.from_arrays([img], {"pad_width": 3, "patch_sizes": [4, 8], "patch_probs": [1, 1]},
                                  pad_value=-1.0)
    item = ds.patch_at(0, 1, (1, 5), 8)
    padded = pad_image(torch.from_numpy(img[1]), (3, 3), -1.0)
    assert torch.equal(item["x"], padded[:, 1:9, 5:13])
    # the inference path (PatchDenoiser, grid origin o) computes the same coordinates for the same pixels
    den = PatchDenoiser(AnalyticPatchNet(), (8, 8), (3, 3))
    idx = patch_indices((16, 16), (8, 8), [torch.tensor([1]), torch.tensor([5])])
    coords_inf = extract_patches(den.coords((16, 16), torch.device("cpu"), torch.float32)[None], idx, (8, 8))
    assert torch.equal(item["coords"], coords_inf[0])
    # a flipped item is the patch of the flipped image at the same place, with the same coordinates
    flipped = ds.patch_at(0, 1, (1, 5), 8, flips=("x",))
    assert torch.equal(flipped["x"], torch.flip(padded, dims=(-1,))[:, 1:9, 5:13])
    assert torch.equal(flipped["coords"], item["coords"])


def test_batches_have_one_patch_size_with_multipliers_and_are_pure_functions_of_their_keys():
    ds = PatchDataset.from_arrays([_stack(1), _stack(2)], {"pad_width": 2, "patch_sizes": [4, 8],
                                                           "patch_probs": [0.5, 0.5]})
    sizes = {}
    for seed in range(12):
        keys = [(i, 1000 * seed + i) for i in range(3)]
        items = ds.__getitems__(keys)
        p = items[0]["x"].shape[-1]
        assert all(it["x"].shape == (1, p, p) and it["coords"].shape == (2, p, p) for it in items)
        assert len(items) == 3 * (8 // p)                 # reference ratio: 16 x4, 32 x2, 64 x1
        again = ds.__getitems__(keys)
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(items, again, strict=True))
        sizes[p] = sizes.get(p, 0) + 1
    assert set(sizes) == {4, 8}
    ds3 = PatchDataset.from_arrays([_stack(3, z=4)], {"pad_width": 2, "patch_sizes": [4], "patch_probs": [1],
                                                      "depth": 3})
    it = ds3.sample(0, np.random.default_rng(0))
    assert it["x"].shape == (3, 4, 4) and it["coords"].shape == (3, 4, 4)
    assert ds3.padded_shape(0) == (8, 14, 14)     # pad_z = depth - 1
    item3 = ds3.patch_at(0, 0, (1, 2, 3), 4)
    idx = patch_indices((8, 14, 14), (3, 4, 4), [torch.tensor([1]), torch.tensor([2]), torch.tensor([3])])
    coords_inf = extract_patches(coordinate_channels((8, 14, 14))[None], idx, (3, 4, 4))
    assert torch.equal(item3["coords"], slab_coords(coords_inf)[0])
    assert float(item3["coords"][0, 0, 0]) == pytest.approx((2 / 7 - 0.5) * 2)   # z of the slab centre
    with pytest.raises(ConfigError, match="unknown patch option"):
        PatchDataset.from_arrays([_stack(0)], {"pad": 3})


# --------------------------------------------------------------------------------- samplers


def _geom(pad, sizes, pad_value=0.0, channels=1, depth=None, pad_z=None):
    return {"pad_width": pad, "pad_z": pad_z, "depth": depth, "patch_sizes": sizes, "pad_value": pad_value,
            "image_channels": channels}


def _ct(n=12, views=10):
    return ParallelBeamCT(CTGeometry.create("parallel", (n, n), (1.0, 1.0), sparse_view_angles(views, 180.0)))


def _truth(shape, pad, channels, seed):
    """A draw from the analytic prior on the image region (prior domain = image domain)."""
    spatial = tuple(s + 2 * pad for s in shape[-2:])
    c = crop_image(coordinate_channels(spatial, dtype=F64), (pad, pad))
    mu = torch.stack([(k + 1) * _mean(c) for k in range(channels)])
    sd = _var(c).sqrt()
    z = torch.randn((*shape[:-2], channels, *shape[-2:]), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return mu + sd * z


def _mse(a, b):
    return float((a - b).abs().pow(2).mean())


def _posterior_mean(op, y, pad, channels, noise_std):
    """Exact posterior mean per slice of the analytic prior (dense A; complex data as stacked real system)."""
    n = op.in_shape[-1]
    basis = torch.eye(n * n).reshape(n * n, n, n).to(op.in_dtype)
    a = op.forward(basis).reshape(n * n, -1).T.to(torch.complex128)
    c = crop_image(coordinate_channels((n + 2 * pad, n + 2 * pad), dtype=F64), (pad, pad))
    mean = torch.cat([(k + 1) * _mean(c).reshape(-1) for k in range(channels)])
    prior = GaussianPrior(mean, _var(c).reshape(-1).repeat(channels))
    if channels == 1:
        a_r, std = a.real, noise_std
    else:
        a_r, std = torch.cat([torch.cat([a.real, -a.imag], 1), torch.cat([a.imag, a.real], 1)]), noise_std / 2**0.5
    out = []
    for yz in y.to(torch.complex128):
        y_r = yz.reshape(-1).real if channels == 1 else torch.cat([yz.reshape(-1).real, yz.reshape(-1).imag])
        m = prior.posterior(a_r, y_r, std).mean
        out.append((m if channels == 1 else torch.complex(m[:n * n], m[n * n:])).reshape(n, n))
    return torch.stack(out)


def analytic_ct_problem() -> tuple[ReconProblem, Prior, int, torch.Tensor]:
    """Two 12 x 12 slices drawn from the analytic patch prior, 0.05 noise on a small parallel-beam CT; its exact
    posterior mean is :func:`_posterior_mean` (problem, prior, pad, true slices)."""
    op, pad = _ct(), 3
    x_true = _truth((2, 12, 12), pad, 1, seed=5)[:, 0].float()
    y0 = op.forward(x_true)
    y = y0 + 0.05 * torch.randn(y0.shape, generator=torch.Generator().manual_seed(6))
    prob = ReconProblem(y=y, operator=op, modality="CT", image_shape=(2, 12, 12), noise_std=0.05)
    return prob, Prior(denoiser=AnalyticPatchNet(1), meta={"patch": _geom(pad, [8])}), pad, x_true


def test_padis_ct_with_analytic_prior_approaches_the_exact_posterior_and_patches_equal_whole_image():
    prob, prior, pad, x_true = analytic_ct_problem()
    op, y = prob.operator, prob.y
    params = {"steps": 30, "inner": 5, "sigma_max": 3.0, "sigma_min": 0.02, "zeta": 0.2, "patch_size": 4,
              "samples": 4, "sample_batch": 1, "dtype": "float64"}
    res = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (4, 2, 12, 12)
    assert res.info["grid_origins"] == [3, 3] and res.nfe == 4 * 30 * 5
    # independent pixels: the patch prior IS the whole-image prior, so the chains agree step for step
    whole = METHODS["padis"](prob, {**params, "patch_size": 18, "samples": 1}, prior, torch.Generator().manual_seed(0))
    assert whole.info["grid_origins"] == [1, 1]
    assert torch.allclose(res.samples[:1], whole.samples, atol=1e-9)
    pm = _posterior_mean(op, y, pad, 1, 0.05)
    aty = op.adjoint(y)
    init = aty * (op.forward(aty) * y).sum() / op.forward(aty).pow(2).sum()
    # measured: mean of 4 samples 0.085 from the posterior mean (the adjoint init: 0.251)
    assert _mse(res.samples.mean(0), pm) < 0.5 * _mse(init, pm)
    assert _mse(res.samples.mean(0), x_true) < 0.6 * _mse(init, x_true)


def test_padis_mri_sense2d_complex_with_analytic_prior_approaches_the_exact_posterior():
    n, pad = 12, 3
    op = Sense2D(birdcage_coils(4, (n, n)), cartesian_mask_1d((n, n), 2.0, acs_lines=4, seed=0))
    t = _truth((2, n, n), pad, 2, seed=7)
    x_true = torch.complex(t[:, 0], t[:, 1]).to(torch.complex64)
    y0 = op.forward(x_true)
    y = y0 + 0.02 * torch.randn(y0.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(8))
    prob = ReconProblem(y=y, operator=op, modality="MR", image_shape=(2, n, n), noise_std=0.02)
    prior = Prior(denoiser=AnalyticPatchNet(2), channels=2, meta={"patch": _geom(pad, [8], channels=2)})
    res = METHODS["padis"](prob, {"steps": 50, "inner": 6, "sigma_max": 1.0, "sigma_min": 0.02, "zeta": 1.0,
                                  "patch_size": 4, "samples": 4}, prior, torch.Generator().manual_seed(1))
    assert res.samples.shape == (4, 2, n, n) and res.samples.is_complex()
    pm = _posterior_mean(op, y, pad, 2, 0.02)
    init = op.adjoint(y)
    # measured: 0.11 from the posterior mean (adjoint: 0.226; 100 x 10 steps reach 0.078)
    assert _mse(res.samples.mean(0), pm) < 0.6 * _mse(init, pm)
    assert not torch.allclose(res.samples[0], res.samples[1])           # different posterior samples


@pytest.mark.gpu
def test_padis_on_cuda_matches_cpu():
    n, pad = 12, 3
    maps, mask = birdcage_coils(4, (n, n)), cartesian_mask_1d((n, n), 2.0, acs_lines=4, seed=0)
    t = _truth((2, n, n), pad, 2, seed=7)
    x_true = torch.complex(t[:, 0], t[:, 1]).to(torch.complex64)
    prior = Prior(denoiser=AnalyticPatchNet(2), channels=2, meta={"patch": _geom(pad, [8], channels=2)})
    params = {"steps": 5, "inner": 2, "sigma_max": 1.0, "zeta": 1.0, "patch_size": 4, "dtype": "float64"}
    out = []
    for dev in ("cpu", "cuda"):
        op = Sense2D(maps, mask, device=dev)
        prob = ReconProblem(y=op.forward(x_true.to(dev)), operator=op, modality="MR", image_shape=(2, n, n))
        out.append(METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0)).samples.cpu())
    assert torch.allclose(out[0], out[1], atol=1e-4)


def test_padis3d_with_analytic_slab_prior_beats_the_adjoint():
    op, pad, depth = _ct(), 3, 3
    x_true = _truth((4, 12, 12), pad, 1, seed=9)[:, 0].float()
    y = op.forward(x_true)
    prob = ReconProblem(y=y, operator=op, modality="CT", image_shape=(4, 12, 12))
    prior = Prior(denoiser=AnalyticPatchNet(1, depth=depth, z_padded=4 + 4),
                  meta={"patch": _geom(pad, [8], depth=depth, pad_z=2)})
    res = METHODS["padis3d"](prob, {"steps": 30, "inner": 5, "sigma_max": 3.0, "sigma_min": 0.02, "zeta": 0.2,
                                    "patch_size": 4, "samples": 4, "dtype": "float64"}, prior,
                             torch.Generator().manual_seed(2))
    assert res.samples.shape == (4, 4, 12, 12)
    assert res.info["patch_shape"] == [3, 4, 4] and res.info["pad"] == [2, 3, 3]
    aty = op.adjoint(y)
    init = aty * (op.forward(aty) * y).sum() / op.forward(aty).pow(2).sum()
    # measured: mean of 4 samples 0.149 from the truth (adjoint init: 0.440)
    assert _mse(res.samples.mean(0), x_true) < 0.5 * _mse(init, x_true)
    with pytest.raises(ConfigError, match="use method 'padis3d'"):
        METHODS["padis"](prob, {"patch_size": 4}, prior)


# --------------------------------------------------------------------------------- tiny networks end to end


_TINY = {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [False, False],
         "attention_max_resolution": 4, "num_head_channels": 8, "norm_num_groups": 8}


def _train_cfg(**kw):
    return {"kind": "patch", "loss": "edm", "network": dict(_TINY), "batch_size": 4, "steps": 6, "lr": 2e-3,
            "warmup_steps": 2, "ema_decay": 0.5, "checkpoint_every": 3, "seed": 0, "device": "cpu", **kw}


def _ct_volume(path, seed):
    rng = np.random.default_rng(seed)
    hu = np.full((3, 12, 12), -1000.0, dtype=np.float32)
    hu[:, 3:9, 2:10] = rng.uniform(-100, 300)
    return Volume.from_array(path, hu, Geometry(), meta={"modality": "CT"}).path


def test_trained_ct_patch_prior_round_trips_its_geometry_and_reconstructs(tmp_path):
    vols = [_ct_volume(tmp_path / f"ct{i}.zarr", i) for i in range(2)]
    out = train_patch_prior(_train_cfg(), vols, tmp_path / "padis.pt",
                            patch={"pad_width": 2, "patch_sizes": [4, 8], "patch_probs": [0.5, 0.5]})
    prior = patch_prior_from_checkpoint(out, expect_modality="CT")
    g = prior.meta["patch"]
    assert (g["pad_width"], g["patch_sizes"], g["pad_value"], g["depth"]) == (2, [4, 8], -1.0, None)
    assert prior.meta["network_multiple"] == 2 and prior.offset == pytest.approx(0.0)
    op = _ct()
    hu = Volume.open(vols[0]).read()
    y = op.forward(torch.from_numpy(hu))
    prob = ReconProblem(y=y, operator=op, modality="CT", image_shape=(3, 12, 12))
    params = {"steps": 3, "inner": 2, "sigma_max": 2.0, "zeta": 1e-4}
    a = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    b = METHODS["padis"](prob, params, prior, torch.Generator().manual_seed(0))
    assert a.info["params"]["patch_size"] == 8            # largest trained size that tiles 12 + 2*2
    assert torch.isfinite(a.samples).all() and torch.equal(a.samples, b.samples)
    assert a.nfe == 6
    with pytest.raises(ConfigError, match="multiple of 2"):
        METHODS["padis"](prob, {**params, "patch_size": 5}, prior)


def test_tiny_mri_and_slab_priors_train_and_sample(tmp_path):
    from medrecon.diffusion.train import train

    rng = np.random.default_rng(0)
    mag = rng.uniform(0, 1, (3, 1, 12, 12)).astype(np.float32)
    cplx = np.concatenate([mag, 0.5 * mag], axis=1)
    norm = {"kind": "mr_percentile", "percentile": 99.0, "value": 1.0}
    ds = PatchDataset.from_arrays([cplx], {"pad_width": 2, "patch_sizes": [8], "patch_probs": [1]})
    out = train(_train_cfg(), ds, tmp_path / "mr.pt", modality="MR", normalisation=norm).checkpoint
    prior = patch_prior_from_checkpoint(out)
    n = 12
    op = Sense2D(birdcage_coils(4, (n, n)), cartesian_mask_1d((n, n), 2.0, acs_lines=4, seed=0))
    x = torch.complex(torch.from_numpy(cplx[:, 0]), torch.from_numpy(cplx[:, 1]))
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(3, n, n))
    res = METHODS["padis"](prob, {"steps": 2, "inner": 2, "sigma_max": 1.0}, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 3, n, n) and res.samples.is_complex() and torch.isfinite(res.samples).all()

    ds3 = PatchDataset.from_arrays([mag[:, :1]], {"pad_width": 2, "patch_sizes": [8], "patch_probs": [1],
                                                  "depth": 3})
    out3 = train(_train_cfg(steps=4), ds3, tmp_path / "slab.pt", modality="MR", normalisation=norm).checkpoint
    prior3 = patch_prior_from_checkpoint(out3)
    assert prior3.meta["patch"]["depth"] == 3 and prior3.channels == 1
    op_ct = _ct()
    prob3 = ReconProblem(y=op_ct.forward(torch.from_numpy(mag[:, 0])), operator=op_ct, modality="CT",
                         image_shape=(3, 12, 12))
    res3 = METHODS["padis3d"](prob3, {"steps": 2, "inner": 1, "sigma_max": 1.0}, prior3,
                              torch.Generator().manual_seed(0))
    assert res3.samples.shape == (1, 3, 12, 12) and torch.isfinite(res3.samples).all()
    assert res3.info["patch_shape"] == [3, 8, 8]


def test_padis_starts_from_the_fbp_the_reconstruct_step_gives_it(tmp_path):
    """Registered with init='fbp': every slab problem of padis/padis3d carries the FBP of its data (issue 14:
    the documented FBP start never reached the sampler); other methods get none."""
    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure
    from medrecon.measurement import Measurement
    from medrecon.recon.ct_fbp import fbp
    from medrecon.recon.slabs import plan_slabs
    from medrecon.reconstruct import _slab_problem
    write_phantom_volume("ct_chest", tmp_path / "v.zarr", (4, 24, 24), (5.0, 8.0, 8.0), 1)
    cfg = cfgmod.validate({"measure": {"ct": {"views": 12, "I0": None}}})
    meas = Measurement.open(measure(tmp_path / "v.zarr", tmp_path / "m.zarr", cfg))
    op = meas.operator(torch.device("cpu"))
    slab = plan_slabs(4, 2, 1, True)[1]
    for method in ("padis", "padis3d"):
        p = _slab_problem(meas, op, slab, True, torch.device("cpu"), None, method)
        assert p.init is not None and p.init.shape == p.image_shape
        assert torch.allclose(p.init, fbp(p.operator, p.y))
    assert _slab_problem(meas, op, slab, True, torch.device("cpu"), None, "dds").init is None
