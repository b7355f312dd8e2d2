"""TPDM (medrecon/methods/tpdm.py): perpendicular slice priors and the alternating DDS sampler.

* the ``plane`` training option: a coronal / sagittal dataset returns the volume's own planes, a coronal prior
  trains, its checkpoint records the plane, and every loader refuses a prior of the wrong plane;
* with K larger than the number of steps TPDM is DDS number for number (CT and MR, odd sizes, canvases);
* with a separable prior (pixels independent; mean and variance varying along the axis both planes share) the
  axial and perpendicular Tweedie estimates are the same exact posterior mean, so TPDM with the alternation on
  equals DDS: an exact check of the plane views, their canvases and the way back;
* end to end on 5 x 21 x 23 CT (ASTRA parallel) and MR (Sense2D) volumes with two tiny untrained networks;
  determinism; bad parameters are one ConfigError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import medrecon.methods.dds  # noqa: F401  (registers dds)
from medrecon.diffusion.checkpoint import load_checkpoint, prior_from_checkpoint, read_grid
from medrecon.diffusion.datasets import SliceDataset, VolumeSlices
from medrecon.diffusion.denoiser import Denoiser, EpsilonDenoiser, Prior
from medrecon.diffusion.kinds import train_prior
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.diffusion.normalisation import default_normalisation, to_network
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError, InputError
from medrecon.methods.sampling import SliceLayout
from medrecon.methods.tpdm import PerpendicularPriors, PlaneView, load_tpdm_priors
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from medrecon.volume import Geometry, Volume
from tests.methods.test_anysize import _net, _spec, ct_problem, slice_prior

torch.set_num_threads(1)
SHAPE = (5, 21, 23)     # Z, Y, X: odd everywhere; canvases 8 x 24 (coronal) and 24 x 24 (axial)
CT_NORM = default_normalisation("CT")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ct_priors(plane: str = "coronal") -> tuple[Prior, Prior]:
    """Two different tiny untrained slice networks (3 levels: sides multiples of 4)."""
    axial, aux = slice_prior(), slice_prior()
    aux.denoiser = EpsilonDenoiser(_net(_spec("slice"), seed=7), VPSchedule())
    aux.meta = {**aux.meta, "plane": plane}
    return axial, aux


def mr_problem() -> ReconProblem:
    z, h, w = SHAPE
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 10) / 7.0) ** 2 + ((xx - 11) / 8.0) ** 2 < 1).astype(np.float32))
    x = torch.stack([mag * (0.6 + 0.1 * k) for k in range(z)]).to(torch.complex64) * (1 + 0.3j)
    return ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=SHAPE)


def mr_priors() -> tuple[Prior, Prior]:
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    mk = [Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2), seed=s), VPSchedule()),
                channels=2, meta={"kind": "slice", "normalisation": mr}) for s in (0, 3)]
    mk[1].meta["plane"] = "coronal"
    return mk[0], mk[1]


def _residual(prob: ReconProblem, x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(prob.y - prob.operator.forward(x)))


# ------------------------------------------------------------------------------------------ planes in training


def _volume(tmp_path, shape=(16, 10, 16), seed=0, name="v") -> tuple[Path, np.ndarray]:
    hu = np.random.default_rng(seed).uniform(-1000, 1000, size=shape).astype(np.float32)
    return Volume.from_array(tmp_path / f"{name}{seed}.zarr", hu, Geometry(), meta={"modality": "CT"}).path, hu


@pytest.mark.parametrize("cache", [1 << 30, 0], ids=["preloaded", "lru"])
def test_coronal_and_sagittal_datasets_return_the_volumes_planes(tmp_path, cache):
    path, hu = _volume(tmp_path)                       # Z 16, Y 10, X 16
    cor = SliceDataset(VolumeSlices([path], "CT", cache, plane="coronal"), CT_NORM, 16, flips=())
    assert len(cor) == 10                              # one plane per y
    for y in (0, 3, 9):                                # (z, x) = 16 x 16: no padding, no resizing
        np.testing.assert_array_equal(cor.image(y), to_network(hu[:, y, :], CT_NORM, clip=True))
    sag = SliceDataset(VolumeSlices([path], "CT", cache, plane="sagittal"), CT_NORM, 16, flips=())
    assert len(sag) == 16
    img = sag.image(5)                                 # (z, y) = 16 x 10, centred in 16 x 16 with air (-1)
    np.testing.assert_array_equal(img[:, 3:13], to_network(hu[:, :, 5], CT_NORM, clip=True))
    assert (img[:, :3] == -1).all() and (img[:, 13:] == -1).all()
    ax = SliceDataset(VolumeSlices([path], "CT", cache), CT_NORM, 16, flips=())
    assert len(ax) == 16 and ax.source.plane == "axial"
    np.testing.assert_array_equal(ax.image(2)[3:13], to_network(hu[2], CT_NORM, clip=True))
    with pytest.raises(ConfigError, match="plane"):
        VolumeSlices([path], "CT", plane="oblique")


_UNET = {k: v for k, v in tiny_network_spec("slice", 16).items()
         if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution", "num_head_channels",
                  "norm_num_groups")}
_FAST = {"image_size": 16, "batch_size": 2, "steps": 2, "warmup_steps": 1, "checkpoint_every": 10, "seed": 0,
         "device": "cpu", "network": _UNET}


def test_a_coronal_prior_trains_records_its_plane_and_loaders_refuse_a_mismatch(tmp_path):
    vols = [_volume(tmp_path, (7, 16, 16), seed=s)[0] for s in (1, 2)]
    axial = train_prior({"kind": "slice", **_FAST}, vols, tmp_path / "axial.pt")
    coronal = train_prior({"kind": "slice", "plane": "coronal", **_FAST}, vols, tmp_path / "coronal.pt")
    assert load_checkpoint(coronal).train_config["plane"] == "coronal"
    assert load_checkpoint(axial).train_config["plane"] == "axial"
    assert read_grid(coronal)[1] and not read_grid(axial)[1]       # a coronal prior sees the z pixel scale
    pri = load_tpdm_priors(axial, coronal, device="cpu", expect_modality="CT", image_units="attenuation",
                           mu_water=0.0192)
    assert isinstance(pri, PerpendicularPriors) and pri.plane == "coronal"
    assert pri.primary.meta["plane"] == "axial" and pri.meta["perpendicular"]["plane"] == "coronal"
    pri.scale = 2.0                                                 # reconstruct's per-volume MR rescale: both
    assert pri.primary.scale == pri.aux.scale == 2.0
    with pytest.raises(InputError, match="coronal planes, but axial"):
        prior_from_checkpoint(coronal)                              # dds & co. take axial priors only
    with pytest.raises(InputError, match="axial planes, but coronal or sagittal"):
        load_tpdm_priors(axial, axial)
    with pytest.raises(InputError, match="coronal planes, but axial"):
        load_tpdm_priors(coronal, axial)                            # swapped
    with pytest.raises(ConfigError, match="two prior checkpoints"):
        load_tpdm_priors(axial)
    with pytest.raises(ConfigError, match="kind 'slice' only"):
        train_prior({"kind": "slab", "plane": "coronal", **_FAST}, vols, tmp_path / "slab.pt")
    with pytest.raises(ConfigError, match="plane must be one of"):
        train_prior({"kind": "slice", "plane": "axial2", **_FAST}, vols, tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_with_k_beyond_the_steps_tpdm_is_dds(modality):
    prob = ct_problem(*SHAPE[1:], depth=SHAPE[0]) if modality == "CT" else mr_problem()
    axial, aux = ct_priors() if modality == "CT" else mr_priors()
    params = {"steps": 4, "cg_iter": 3}
    dds = METHODS["dds"](prob, params, axial, _gen(3))
    tp = METHODS["tpdm"](prob, {**params, "K": 5}, (axial, aux), _gen(3))
    assert tp.info["aux_steps"] == 0 and tp.nfe == dds.nfe == 4
    assert torch.equal(tp.samples, dds.samples)
    # K = 2: half the steps go to the perpendicular prior, and the result differs
    alt = METHODS["tpdm"](prob, {**params, "K": 2}, (axial, aux), _gen(3))
    assert alt.info["aux_steps"] == 2 and alt.info["primary_steps"] == 2 and alt.info["network_calls"] == 4
    assert not torch.allclose(alt.samples, dds.samples)


class IIDGaussian(Denoiser):
    """Exact denoiser of a separable Gaussian: pixel (.., r, c) ~ N(mean[c], var[c]) independently, on canvases
    whose sides must be multiples of ``size_multiple`` (so the samplers pad); the value along the shared axis."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, size_multiple: int) -> None:
        self.mean, self.var, self.size_multiple, self.nfe = mean, var, size_multiple, 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        assert x.shape[-1] % self.size_multiple == 0 and x.shape[-2] % self.size_multiple == 0
        w = x.shape[-1]
        pad = (w - self.mean.numel()) // 2
        m = torch.nn.functional.pad(self.mean, (pad, w - self.mean.numel() - pad)).to(x.dtype)
        v = torch.nn.functional.pad(self.var, (pad, w - self.var.numel() - pad), value=1.0).to(x.dtype)
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return m + v / (v + s2) * (x - m)


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_separable_gaussian_prior_both_views_are_exact_and_tpdm_equals_dds(plane):
    """Pixels independent, mean/variance varying along x (coronal shares x with axial) or y (sagittal shares y):
    the 3D density is the product of the axial and of the perpendicular slice densities, each slice denoiser is
    the exact posterior mean, and the two agree pixel for pixel. TPDM alternating them (with data consistency
    after every step, aux_dc) must then be DDS, through the plane permutation and both padded canvases."""
    z, h, w = SHAPE
    prob = ct_problem(h, w, depth=z)
    n_shared = w if plane == "coronal" else h
    g = _gen(5)
    mean = -1 + 0.5 * torch.rand(n_shared, generator=g, dtype=torch.float64)
    var = 0.05 + 0.2 * torch.rand(n_shared, generator=g, dtype=torch.float64)
    scale, offset = slice_prior().scale, slice_prior().offset
    if plane == "coronal":      # axial (y, x) and coronal (z, x) slices: the value depends on the last axis
        axial = Prior(IIDGaussian(mean, var, 8), scale=scale, offset=offset, meta={"normalisation": CT_NORM})
        aux = Prior(IIDGaussian(mean, var, 8), scale=scale, offset=offset,
                    meta={"normalisation": CT_NORM, "plane": "coronal"})
    else:                       # sagittal (z, y) slices: the shared axis y is the axial rows, the sagittal columns
        axial = Prior(Transposed(IIDGaussian(mean, var, 8)), scale=scale, offset=offset,
                      meta={"normalisation": CT_NORM})
        aux = Prior(IIDGaussian(mean, var, 8), scale=scale, offset=offset,
                    meta={"normalisation": CT_NORM, "plane": "sagittal"})
    params = {"steps": 6, "cg_iter": 2, "dtype": "float64"}
    dds = METHODS["dds"](prob, params, axial, _gen(1))
    tp = METHODS["tpdm"](prob, {**params, "K": 2, "aux_dc": True}, (axial, aux), _gen(1))
    assert tp.info["aux_steps"] == 3 and tp.info["aux_canvas"] == [8, 24] and tp.info["canvas"] == [24, 24]
    torch.testing.assert_close(tp.samples, dds.samples, rtol=1e-5, atol=1e-7)
    # without data consistency after the perpendicular steps (the reference's rule) the chain differs
    ref = METHODS["tpdm"](prob, {**params, "K": 2}, (axial, aux), _gen(1))
    assert not torch.allclose(ref.samples, dds.samples)


class Transposed(Denoiser):
    """``inner`` on the transposed slice (so an x-varying IIDGaussian varies along the rows)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner, self.size_multiple, self.nfe = inner, inner.size_multiple, 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        return self.inner(x.transpose(-1, -2), sigma).transpose(-1, -2)


class Recorder(Denoiser):
    """Returns its (VE) input unchanged and keeps it: the plane view must round-trip exactly."""

    size_multiple = 8

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.nfe = 0

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        self.seen.append(x.clone())
        return x


def test_the_perpendicular_view_shows_the_network_the_volumes_planes_on_noisy_background():
    z, h, w = SHAPE
    prob = ct_problem(h, w, depth=z)
    axial = slice_prior()
    rec = Recorder()
    aux = Prior(rec, scale=axial.scale, offset=axial.offset, meta={"normalisation": CT_NORM})
    lay = SliceLayout(prob, axial, torch.float64)
    view = PlaneView(lay, aux, "coronal")
    n, ab = 2, torch.tensor(0.25, dtype=torch.float64)
    x = torch.randn(lay.batch_shape(n), generator=_gen(0), dtype=torch.float64)
    x0 = view.estimate(x, n, ab, ((1 - ab) / ab).sqrt(), _gen(1))
    vol = lay.canvas.crop(x).reshape(n, z, 1, h, w)
    # the way back: the image part is the denoiser's output (here its input x / sqrt(ab)), the rest background
    torch.testing.assert_close(lay.canvas.crop(x0), lay.canvas.crop(x) / ab.sqrt(), rtol=0, atol=1e-12)
    assert bool((x0[..., lay.canvas.mask()] == -1.0).all())
    # what the network saw: plane (sample s, y) = vol[s, :, :, y, :] centred on an 8 x 24 canvas
    seen = rec.seen[0]
    assert seen.shape == (n * h, 1, 8, 24) and view.canvas.widths == (1, 2, 0, 1)
    planes = seen[:, :, 1:6, 0:23].reshape(n, h, 1, z, w)
    torch.testing.assert_close(planes[1, 7], vol[1, :, :, 7, :].transpose(0, 1) / ab.sqrt(), rtol=0, atol=1e-12)
    # padded region: noisy air in VE form, b + sigma n with n ~ N(0, 1)
    sigma = float(((1 - ab) / ab).sqrt())
    noise = (seen[..., view.canvas.mask()] + 1.0) / sigma
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1.0) < 0.1


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_end_to_end_on_odd_volumes_with_two_tiny_networks_and_determinism(modality):
    prob = ct_problem(*SHAPE[1:], depth=SHAPE[0]) if modality == "CT" else mr_problem()
    pri = ct_priors() if modality == "CT" else mr_priors()
    params = {"steps": 5, "K": 2, "samples": 2, "cg_iter": 10}
    steps_seen: list[str] = []
    prob.progress = lambda d: steps_seen.append(d["prior"])
    a = METHODS["tpdm"](prob, params, pri, _gen(11))
    prob.progress = None
    b = METHODS["tpdm"](prob, params, pri, _gen(11))
    c = METHODS["tpdm"](prob, params, pri, _gen(12))
    assert a.samples.shape == (2, *SHAPE) and a.samples.is_complex() == (modality == "MR")
    assert bool(torch.isfinite(a.samples).all())
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)
    # the reference's integer-K rule, K = 2: steps 1, 3 are perpendicular (0-based), per sample pass
    assert steps_seen == ["axial", "perpendicular", "axial", "perpendicular", "axial"]
    assert a.info["canvas"] == [24, 24] and a.info["aux_canvas"] == [8, 24]
    # 5 steps, the last one axial with 10 CG steps: the output fits the data far better than empty space.
    # Measured: 0.25 (CT) and 0.43 (MR) of the empty image's residual; DDS with the same settings and axial
    # network 0.17 and 0.22 (the untrained perpendicular network's steps, without a data step, pull away)
    resid, empty = _residual(prob, a.samples[0]), float(torch.linalg.vector_norm(prob.y))
    print(f"{modality}: residual {resid:.4g}, empty image {empty:.4g}")
    assert resid < 0.5 * empty
    # random turns (the reference's float K) are drawn from the side generator: deterministic too
    r1 = METHODS["tpdm"](prob, {**params, "turns": "random", "K": 2.0}, pri, _gen(11))
    r2 = METHODS["tpdm"](prob, {**params, "turns": "random", "K": 2.0}, pri, _gen(11))
    assert torch.equal(r1.samples, r2.samples)
    # warm start like DDS: init image diffused to the start level, the last round(start * steps) steps run
    prob.init = torch.zeros(SHAPE, dtype=prob.operator.in_dtype)
    ws = METHODS["tpdm"](prob, {**params, "init": "fbp", "start": 0.4, "samples": 1}, pri, _gen(1))
    assert ws.nfe == 2 and ws.info["aux_steps"] == 1
    prob.init = None


def test_bad_input_is_one_clear_error():
    prob = ct_problem(*SHAPE[1:], depth=SHAPE[0])
    axial, aux = ct_priors()
    for params, match in [({"K": 1}, "integer >= 2"), ({"K": 2.5}, "integer >= 2"),
                          ({"turns": "random", "K": 0.5}, "K must be >= 1"), ({"turns": "sometimes"}, "turns"),
                          ({"eta": 2.0}, "eta"), ({"K": "two"}, "K must be a number")]:
        with pytest.raises(ConfigError, match=match):
            METHODS["tpdm"](prob, params, (axial, aux), _gen())
    with pytest.raises(ConfigError, match="two slice priors"):
        METHODS["tpdm"](prob, {}, axial, _gen())
    with pytest.raises(InputError, match="perpendicular one"):
        PerpendicularPriors(axial, aux, "axial")
    other = Prior(aux.denoiser, scale=aux.scale * 2, offset=aux.offset, meta={"plane": "coronal"})
    with pytest.raises(InputError, match="different prior domains"):
        METHODS["tpdm"](prob, {}, (axial, other), _gen())
    flat = ReconProblem(y=prob.y[0], operator=prob.operator, modality="CT", image_shape=SHAPE[1:])
    with pytest.raises(ConfigError, match="needs a volume"):
        METHODS["tpdm"](flat, {}, (axial, aux), _gen())


def test_a_run_interrupted_before_planes_existed_still_resumes(tmp_path):
    """Its resume file's train_config has no ``plane``: it counts as the default (axial), not as a change."""
    from medrecon.diffusion.train import _check_resume, resolve_train_config

    cfg = resolve_train_config({"kind": "slice", **_FAST})
    old = {k: v for k, v in cfg.items() if k != "plane"}
    data = [{"sha256": "abc"}]
    _check_resume({"train_config": old, "data": data}, cfg, data, tmp_path / "x.resume.pt", "slice prior")
    with pytest.raises(ConfigError, match="plane"):
        _check_resume({"train_config": old, "data": data}, {**cfg, "plane": "coronal"}, data,
                      tmp_path / "x.resume.pt", "slice prior")
