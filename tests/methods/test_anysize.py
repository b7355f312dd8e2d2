"""Every diffusion method on any in-plane size: odd, prime and non-square slices (61 x 67, 101 x 122) with
tiny untrained networks of every prior kind (slice, slab, patch, 3D patch, latent), the background canvas
(padded region stays exact noisy background, the core is what the network computes on the padded slice),
PaDIS coordinates for sizes other than the trained one, and one clear error where nothing can fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import medrecon.methods  # noqa: F401  (registers every sampler)
from medrecon.diffusion.canvas import Canvas, CanvasDenoiser, network_multiple, prior_background
from medrecon.diffusion.denoiser import Denoiser, EDMDenoiser, EpsilonDenoiser, Prior
from medrecon.diffusion.latent import LatentCodec, LatentPrior
from medrecon.diffusion.networks import build_autoencoder, build_unet, tiny_network_spec
from medrecon.diffusion.normalisation import default_normalisation, prior_affine
from medrecon.diffusion.patches import coordinate_channels
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError, InputError, MedreconError
from medrecon.methods.sampling import SliceLayout
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.ct import ParallelBeamCT
from medrecon.physics.ct_geometry import CTGeometry, sparse_view_angles
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem

MU_WATER = 0.0192
CT_NORM = default_normalisation("CT")
SIZES = [(61, 67), (101, 122)]
DEPTH = 3


def _spec(kind: str, levels: int = 3, **over) -> dict:
    """Tiny UNet spec; 3 levels = sides must be multiples of 4 (2 would let many odd sizes pass by luck)."""
    spec = tiny_network_spec(kind, 16)
    spec.update(channels=[8, 8, 16][-levels:] if levels <= 3 else [8] * levels, attention_levels=[False] * levels,
                attention_max_resolution=16, num_head_channels=8)
    spec.update(over)
    return spec


def _net(spec: dict, seed: int = 0) -> torch.nn.Module:
    """An untrained UNet whose zero-initialised layers (MONAI zeroes the output convolution, which would make
    every denoiser the identity) get small random weights, so its output depends on its whole input."""
    torch.manual_seed(seed)
    net = build_unet(spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not bool(p.any()):
                p.normal_(0.0, 0.05)
    return net


def _ct_meta(kind: str, **extra) -> dict:
    return {"kind": kind, "normalisation": CT_NORM, "image_size": 16, "checkpoint": f"tiny_{kind}.pt", **extra}


def slice_prior() -> Prior:
    scale, offset = prior_affine(CT_NORM, "attenuation", MU_WATER)
    return Prior(EpsilonDenoiser(_net(_spec("slice")), VPSchedule()), scale=scale, offset=offset,
                 meta=_ct_meta("slice"))


def perpendicular_priors() -> tuple[Prior, Prior]:
    """TPDM's axial and coronal slice priors (two tiny networks)."""
    coronal = slice_prior()
    coronal.denoiser.net = _net(_spec("slice"), seed=1)
    coronal.meta = {**coronal.meta, "plane": "coronal"}
    return slice_prior(), coronal


def slab_prior() -> Prior:
    scale, offset = prior_affine(CT_NORM, "attenuation", MU_WATER)
    net = _net(_spec("slab", in_channels=3, out_channels=3, num_class_embeds=2))
    return Prior(EpsilonDenoiser(net, VPSchedule()), scale=scale, offset=offset, meta=_ct_meta("slab", slab=3))


def patch_prior(depth: int | None) -> Prior:
    scale, offset = prior_affine(CT_NORM, "attenuation", MU_WATER)
    spec = _spec("patch", levels=2, coord_channels=3 if depth else 2, in_channels=depth or 1,
                 out_channels=depth or 1)
    geom = {"pad_width": 4, "pad_z": 2 if depth else None, "depth": depth, "patch_sizes": [8, 16],
            "patch_probs": [0.5, 0.5], "pad_value": -1.0, "image_channels": 1,
            "training_shapes": [[8, 48, 48]]}
    return Prior(EDMDenoiser(_net(spec)), scale=scale, offset=offset,
                 meta=_ct_meta("patch", patch=geom, network_multiple=2))


def latent_prior(codec: str) -> LatentPrior:
    scale, offset = prior_affine(CT_NORM, "attenuation", MU_WATER)
    if codec == "autoencoder":
        ae_spec = {"channels": [8, 8], "attention_levels": [False, False], "latent_channels": 2,
                   "norm_num_groups": 8, "image_size": 16}
        torch.manual_seed(1)
        c = LatentCodec.from_autoencoder(build_autoencoder(ae_spec), ae_spec, 1.0)        # f = 2
    else:
        c = LatentCodec.space_to_depth(1, 3)                                                 # f = 3
    net = _net(_spec("slice", levels=2, in_channels=c.latent_channels, out_channels=c.latent_channels))
    return LatentPrior(denoiser=EpsilonDenoiser(net, VPSchedule()), schedule=VPSchedule(), codec=c, scale=scale,
                       offset=offset, meta=_ct_meta("latent"))


def ct_problem(h: int, w: int, depth: int = DEPTH) -> ReconProblem:
    """An off-centre water ellipse in air, 10-view parallel-beam CT of an h x w grid (attenuation, 1/mm)."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    inside = ((yy - 0.45 * h) / (0.3 * h)) ** 2 + ((xx - 0.55 * w) / (0.35 * w)) ** 2 < 1
    x = torch.from_numpy(np.repeat(inside[None], depth, 0) * MU_WATER).float()
    op = ParallelBeamCT(CTGeometry.create("parallel", (h, w), (1.0, 1.0), sparse_view_angles(10, 180.0)))
    return ReconProblem(y=op.forward(x), operator=op, modality="CT", image_shape=(depth, h, w))


PRIORS = {
    "dds": slice_prior, "dps": slice_prior, "diffusionblend": slab_prior, "diffusionblend++": slab_prior,
    "padis": lambda: patch_prior(None), "padis3d": lambda: patch_prior(3),
    "resample": lambda: latent_prior("autoencoder"), "latent_dps": lambda: latent_prior("space_to_depth"),
    "ddnm": slice_prior, "mcg": slice_prior,
    "dcdp": slice_prior,
    "tpdm": perpendicular_priors,
    "dcdp_latent": lambda: latent_prior("autoencoder"),
    "pnp_admm": slice_prior, "pnp_red": slice_prior,
    "diffusionmbir": slice_prior,
    "ddrm": slice_prior, "tilted": slice_prior,
    "scd": slice_prior,
    "padis_ood": lambda: patch_prior(None),
}
PARAMS = {
    "dds": {"steps": 3}, "dps": {"steps": 3, "zeta": 1e-3}, "diffusionblend": {"steps": 3},
    "diffusionblend++": {"steps": 3}, "padis": {"steps": 2, "inner": 1, "sigma_max": 1.0, "zeta": 1e-4},
    "padis3d": {"steps": 2, "inner": 1, "sigma_max": 1.0, "zeta": 1e-4},
    # pixel variant: the untrained decoder cannot represent the image, a final pixel fit can
    "resample": {"steps": 4, "variant": "pixel", "dc_every": 1, "splits": 2, "inter_steps": 1, "pixel_iters": 40,
                 "pixel_lr": 0.1, "dps_scale": 1e-3},
    "latent_dps": {"steps": 3, "dps_scale": 1e-3},
    "ddnm": {"steps": 3}, "mcg": {"steps": 3, "zeta": 1e-3},
    "dcdp": {"steps": 3, "t_start": 100, "ddim_steps": 2},
    "tpdm": {"steps": 3},
    "dcdp_latent": {"steps": 3, "t_start": 100, "ddim_steps": 2},
    "pnp_admm": {"iterations": 3}, "pnp_red": {"iterations": 3},
    "diffusionmbir": {"steps": 3},
    # ct_problem records no noise level; ddrm and tilted need one (sigma* = 0.01 / ||A|| in prior units lies
    # between the schedule's 2nd and 3rd trained sigma for 101 x 122, so tilted's stage 2 has 2 steps there)
    "ddrm": {"steps": 3, "sigma_y": 0.01},
    "tilted": {"steps": 2, "ula_steps": 0, "sigma_y": 0.01},
    "scd": {"steps": 3, "adapt_iters": 1},
    "padis_ood": {"steps": 3, "adapt_iters": 1, "sigma_max": 1000.0},     # every step of the grid runs
}
# methods with hard data consistency: their output must fit the data far better than empty space does
HARD_DC = {"dds", "diffusionblend", "diffusionblend++", "resample", "ddnm", "mcg"}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", list(PRIORS))
def test_every_method_reconstructs_odd_prime_and_non_square_slices(method, size):
    h, w = size
    prob = ct_problem(h, w)
    prior = PRIORS[method]()
    res = METHODS[method](prob, PARAMS[method], prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, DEPTH, h, w)
    assert bool(torch.isfinite(res.samples).all())
    resid = float(torch.linalg.vector_norm(prob.y - prob.operator.forward(res.samples[0])))
    empty = float(torch.linalg.vector_norm(prob.y))      # the all-air image
    print(f"{method} {h}x{w}: residual {resid:.4g} (empty image {empty:.4g})")
    if method in HARD_DC:   # measured 0.07-0.13 of the empty image's after 3-4 steps
        assert resid < 0.3 * empty
    if method in ("resample", "latent_dps"):
        f_m = 4 if method == "resample" else 6            # autoencoder f=2 x UNet 2; space-to-depth f=3 x 2
        assert res.info["canvas"] == [math.ceil(h / f_m) * f_m, math.ceil(w / f_m) * f_m]


def test_complex_mri_on_a_non_square_prime_grid():
    h, w = 61, 67
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=6, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 30) / 20.0) ** 2 + ((xx - 33) / 25.0) ** 2 < 1).astype(np.float32))
    x = torch.stack([mag, 0.5 * mag]).to(torch.complex64)
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(2, h, w))
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                  meta={"kind": "slice", "normalisation": mr})
    lay = SliceLayout(prob, prior, torch.float32)
    assert lay.canvas.shape == (64, 68) and prior_background(prior) == 0.0
    res = METHODS["dds"](prob, {"steps": 3}, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 2, h, w) and res.samples.is_complex() and torch.isfinite(res.samples).all()
    assert float(torch.linalg.vector_norm(prob.y - op.forward(res.samples[0]))) < \
        0.5 * float(torch.linalg.vector_norm(prob.y))


# --------------------------------------------------------------------------------- the canvas


@pytest.mark.parametrize("h, w, m", [(61, 67, 4), (101, 122, 8), (64, 68, 4), (5, 3, 16)])
def test_canvas_centres_the_image_in_background_and_crops_it_back(h, w, m):
    c = Canvas(h, w, m, value=-1.0)
    hh, ww = c.shape
    assert hh % m == 0 and ww % m == 0 and 0 <= hh - h < m and 0 <= ww - w < m
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    p = c.pad(x)
    assert p.shape == (2, 3, hh, ww) and torch.equal(c.crop(p), x)
    assert bool((p[..., c.mask()] == -1.0).all()) and int(c.mask().sum()) == hh * ww - h * w
    top, bottom, left, right = c.widths
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1
    assert torch.equal(c.force(p + 5.0)[..., c.mask()], p[..., c.mask()])
    assert c.identity == ((h, w) == (hh, ww)) and (not c.identity or c.pad(x) is x)


def test_layout_pads_only_what_the_network_needs_and_uses_the_ct_background():
    prior = slice_prior()
    assert network_multiple(prior.denoiser) == 4 and prior_background(prior) == -1.0     # -1000 HU
    # the prior value of attenuation 0 is the same air: padding and image agree on what empty space is
    assert prior.offset == pytest.approx(-1.0)
    exact = SliceLayout(ct_problem(64, 68, 1), prior, torch.float32)
    assert exact.canvas.identity and exact.denoiser is prior.denoiser    # nothing changes at exact multiples
    odd = SliceLayout(ct_problem(61, 67, 1), prior, torch.float32)
    assert odd.canvas.shape == (64, 68) and isinstance(odd.denoiser, CanvasDenoiser)
    assert odd.batch_shape(2) == (2, 1, 64, 68)


def test_the_padded_core_is_the_network_on_the_background_padded_slice():
    """No leak: the core of the canvas denoiser is exactly the network applied to the slice surrounded by air
    (an exact-multiple input), and the padded region is air, whatever the network says there."""
    prior = slice_prior()
    lay = SliceLayout(ct_problem(61, 67, 1), prior, torch.float32)
    x = torch.randn(2, 1, 61, 67, generator=torch.Generator().manual_seed(3))
    canvas = lay.canvas.pad(x)
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        got = lay.denoiser(canvas, sigma)
        whole = prior.denoiser(torch.nn.functional.pad(x, (0, 1, 1, 2), value=-1.0), sigma)   # 64 x 68 directly
    assert torch.allclose(lay.canvas.crop(got), whole[..., 1:62, 0:67], atol=1e-6)
    assert bool((got[..., lay.canvas.mask()] == -1.0).all())
    assert not bool((whole[..., lay.canvas.mask()] == -1.0).all())      # the network itself would not say so


class _Recorder(Denoiser):
    """Records the VE-form inputs (x, sigma) of a denoiser; exposes the network's size multiple."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner, self.net, self.schedule, self.seen, self.nfe = inner, inner.net, inner.schedule, [], 0

    def denoise(self, x, sigma, cond=None):
        self.seen.append((x.detach().clone(), float(torch.as_tensor(sigma).reshape(-1)[0])))
        return self.inner(x, sigma, cond)


@pytest.mark.parametrize("method", ["dds", "dps", "diffusionblend", "ddnm", "mcg"])
def test_padded_region_of_the_state_stays_exact_noisy_background(method):
    """At every step the network sees, in the padded region, background + sigma * N(0, 1): the clean-space
    padding is re-noised by the sampler's own update, so nothing there is out of distribution (padding x_t
    with the constant -1 would give a standard deviation 0 here; network output leaking into the padding
    would shift the mean)."""
    prior = slab_prior() if method == "diffusionblend" else slice_prior()
    rec = _Recorder(prior.denoiser)
    prior = Prior(rec, scale=prior.scale, offset=prior.offset, meta=prior.meta)
    prob = ct_problem(61, 67, 6)
    METHODS[method](prob, {"steps": 6, **({"zeta": 0.1} if method in ("dps", "mcg") else {})}, prior,
                    torch.Generator().manual_seed(0))
    mask = Canvas(61, 67, 4).mask()
    assert len(rec.seen) == 6
    for x, sigma in rec.seen:
        z = (x[..., mask] + 1.0) / sigma           # 6 slices x 265 padded pixels
        assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.15, (sigma, z.mean(), z.std())


# --------------------------------------------------------------------------------- patch coordinates


def test_patch_coordinates_keep_their_trained_meaning_for_other_sizes():
    pad, trained = 4, (48, 48)
    same = coordinate_channels((56, 56), pad=(pad, pad), reference=trained, dtype=torch.float64)
    assert torch.equal(same, coordinate_channels((56, 56), dtype=torch.float64))   # trained size: unchanged
    ref = coordinate_channels((56, 56), dtype=torch.float64)
    for h, w in [(61, 67), (31, 122)]:
        c = coordinate_channels((h + 2 * pad, w + 2 * pad), pad=(pad, pad), reference=trained, dtype=torch.float64)
        for axis, n in ((0, h), (1, w)):
            line = c[axis].select(1 - axis, 0)
            trained_line = ref[axis].select(1 - axis, 0)
            # first/last image pixel where the trained image's were; the padding ring exactly the trained ring
            assert line[pad].item() == pytest.approx(trained_line[pad].item())
            assert line[pad + n - 1].item() == pytest.approx(trained_line[pad + 47].item())
            assert torch.allclose(line[:pad], trained_line[:pad]) and torch.allclose(line[-pad:], trained_line[-pad:])
            assert bool((line.diff() > 0).all()) and line.abs().max() <= 1.0


# --------------------------------------------------------------------------------- clear errors


def test_a_network_given_a_size_it_cannot_halve_says_so_instead_of_a_torch_traceback():
    net = _net(_spec("slice"))
    with pytest.raises(InputError) as err:
        net(torch.zeros(1, 1, 101, 122), torch.zeros(1, dtype=torch.long))
    msg = str(err.value)
    assert "trained on 16x16" in msg and "101x122" in msg and "multiples of 4" in msg and "Fix:" in msg
    with pytest.raises(InputError, match="multiples of 2"):
        LatentCodec.space_to_depth(1, 2).encode(torch.zeros(1, 1, 61, 67))


def test_an_image_too_small_for_any_trained_patch_is_one_clear_error():
    prior = patch_prior(None)
    prob = ct_problem(3, 5, 1)     # padded by 4: 11 x 13, smaller than the smallest trained patch (8 fits, 16 not)
    prior.meta["patch"]["patch_sizes"] = [16]
    with pytest.raises(ConfigError) as err:
        METHODS["padis"](prob, PARAMS["padis"], prior, torch.Generator().manual_seed(0))
    msg = str(err.value)
    assert isinstance(err.value, MedreconError)
    assert "tiny_patch.pt" in msg and "[16]" in msg and "3x5" in msg and "Fix:" in msg


# --------------------------------------------------------------------------------- through reconstruct()


def _save_tiny(path, kind: str, spec: dict) -> str:
    from medrecon.diffusion.checkpoint import save_checkpoint
    from medrecon.diffusion.networks import resolve_unet_spec

    net = _net(spec)
    weights = net.state_dict()
    save_checkpoint(path, kind=kind, modality="CT", objective="epsilon",
                    network={"builder": "unet", "spec": resolve_unet_spec(spec)}, schedule=VPSchedule().to_dict(),
                    normalisation=CT_NORM, train_config={}, data=[], step=0, weights=weights, ema_weights=weights)
    return str(path)


@pytest.mark.parametrize("method", ["dds", "diffusionblend"])
def test_a_101x122_measurement_reconstructs_through_the_workflow_entry_point(tmp_path, method):
    """The issue's case: a real-size CT measurement of 101 x 122 slices died inside MONAI."""
    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure
    from medrecon.reconstruct import reconstruct

    vol = write_phantom_volume("ct_chest", tmp_path / "ct.zarr", (3, 101, 122), (4.0, 3.0, 3.0), 0)
    meas = measure(vol, tmp_path / "m.zarr", cfgmod.validate({"measure": {"ct": {"views": 16, "I0": 1e5}}}))
    spec = _spec("slab", in_channels=3, out_channels=3, num_class_embeds=2) if method == "diffusionblend" \
        else _spec("slice")
    ckpt = _save_tiny(tmp_path / "p.pt", "slab" if method == "diffusionblend" else "slice", spec)
    cfg = cfgmod.validate({"reconstruct": {"params": {method: {"steps": 2}}}})
    out = reconstruct(meas, tmp_path / "r.zarr", method, cfg, prior_path=ckpt)
    img = out.read()
    assert img.shape == (3, 101, 122) and np.isfinite(img).all()
