"""padis_ood (SCD's self-supervised LoRA adaptation with PaDIS's patch prior): LoRA in the patch UNet, the adaptation
of a deliberately wrong patch prior with an exact denoiser, CT/MR end to end on odd sizes, determinism, and no
leakage between subjects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medrecon.methods  # noqa: F401  (registers every sampler)
from medrecon.diffusion.adapt import LoRA, inject_lora
from medrecon.diffusion.analytic import DenseOperator
from medrecon.diffusion.denoiser import EDMDenoiser, Prior
from medrecon.errors import ConfigError
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _spec, ct_problem, patch_prior

torch.set_num_threads(1)
FAST = {"steps": 8, "adapt_iters": 2, "skip": 2, "lr": 1e-3, "sigma_max": 1.0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_lora_in_the_patch_unet_starts_as_the_base_network():
    net = _net(_spec("patch", levels=2, coord_channels=2))
    x, c = torch.randn(3, 1, 8, 8, generator=_gen()), torch.tensor([-1.0, 0.0, 0.5])
    coords = torch.rand(3, 2, 8, 8, generator=_gen(1))
    adapted, loras = inject_lora(net, 4, _gen())
    assert loras and torch.equal(adapted(x, c, coords=coords), net(x, c, coords=coords))
    assert not any(isinstance(m, LoRA) for m in net.modules())


def test_zero_learning_rate_is_the_unadapted_patch_chain():
    """The adaptation draws its patch grids from its own generator: with lr = 0 the chain is bit-identical."""
    prob = ct_problem(21, 23, 1)
    a = METHODS["padis_ood"](prob, {**FAST, "lr": 0.0}, patch_prior(None), _gen())
    b = METHODS["padis_ood"](prob, {**FAST, "adapt_iters": 0}, patch_prior(None), _gen())
    assert a.info["adaptation_passes"] > 0 and b.info["adaptation_passes"] == 0
    assert torch.equal(a.samples, b.samples)


# ------------------------------------------------------------------------------------- deliberately wrong prior


class GaussianPatchNet(nn.Module):
    """Raw EDM network F of the exact patch denoiser of N(mu, s^2 I), mu = a 1x1 convolution of the all-ones patch
    (mu_train = 0): D = c_skip x + c_out F = mu + s^2 / (s^2 + sigma^2) (x - mu). LoRA on it is one learnable
    level shared by every pixel of every patch (the analytic stand-in of algorithms-wave2 5.4)."""

    def __init__(self, s: float, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.mean = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.zeros_(self.mean.weight)
        self.s2, self.sd = s * s, sigma_data

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        sig = (4 * c_noise.to(torch.float64)).exp().reshape(-1, 1, 1, 1)
        c_in = 1 / (sig**2 + self.sd**2).sqrt()
        c_skip, c_out = self.sd**2 / (sig**2 + self.sd**2), sig * self.sd / (sig**2 + self.sd**2).sqrt()
        x = x_in.to(torch.float64) / c_in
        mu = self.mean(torch.ones(1, 1, *x_in.shape[-2:], dtype=x_in.dtype)).to(torch.float64)
        d = mu + self.s2 / (self.s2 + sig**2) * (x - mu)
        return ((d - c_skip * x) / c_out).to(x_in.dtype)


def test_adaptation_of_a_wrong_patch_prior_lowers_the_reconstruction_error():
    g = _gen(7)
    geom = {"pad_width": 4, "pad_z": None, "depth": None, "patch_sizes": [8], "patch_probs": [1.0], "pad_value": 0.0,
            "image_channels": 1, "training_shapes": [[1, 8, 8]]}
    prior = Prior(EDMDenoiser(GaussianPatchNet(0.1)), meta={"kind": "patch", "patch": geom})
    truth = torch.ones(8, 8) + 0.1 * torch.randn(8, 8, generator=g)
    op = DenseOperator(torch.randn(24, 64, generator=g) / 8, (8, 8))
    prob = ReconProblem(y=op.forward(truth), operator=op, modality="CT", image_shape=(8, 8))
    params = {"steps": 40, "skip": 2, "adapt_iters": 10, "lr": 0.05, "rank": 1, "gamma": 0.5, "tv": 0.0}
    naive = METHODS["padis_ood"](prob, {**params, "adapt_iters": 0}, prior, _gen())
    res = METHODS["padis_ood"](prob, params, prior, _gen())
    err = [float(torch.linalg.vector_norm(r.samples[0] - truth) / torch.linalg.vector_norm(truth))
           for r in (naive, res)]
    sd = res.info["artifacts"]["adapted"]["passes"][0]
    level = float(sd["mean.up"].reshape(-1) @ sd["mean.down"].reshape(-1))
    losses = res.info["adaptation_losses"][0]
    print(f"rel err naive {err[0]:.4f} adapted {err[1]:.4f}; level {level:.4f}; loss {losses[0]:.4g} -> "
          f"{losses[-1]:.4g}; steps run {res.nfe // 2}")
    # measured: rel err 0.854 -> 0.482, loss 0.655 -> 0.12 (27 steps with sigma <= 10). The final level is small
    # (0.007): the 4 smallest-t adaptation steps, where the level barely changes D (weight sigma^2 / (s^2 +
    # sigma^2)), let Adam's normalised steps walk it back; the chain gained from the levels it had on the way
    assert err[0] == pytest.approx(0.8536, abs=0.01) and err[1] == pytest.approx(0.4821, abs=0.03)
    assert losses[-1] < 0.25 * losses[0]


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("size", [(21, 23), (61, 67)])
def test_padis_ood_on_small_parallel_beam_ct(size):
    prob = ct_problem(*size, 2)
    calls = []
    prob.progress = calls.append
    res = METHODS["padis_ood"](prob, FAST, patch_prior(None), _gen())
    assert res.samples.shape == (1, 2, *size) and torch.isfinite(res.samples).all()
    steps = res.nfe // 2
    assert 1 <= steps < 8 and len(calls) == steps        # sigma_max 1 keeps the grid's last steps only
    assert res.info["adaptation_passes"] == 2 * steps and all(np.isfinite(res.info["adaptation_losses"][0]))
    assert res.info["artifacts"]["adapted"]["method"] == "padis_ood"


def test_padis_ood_on_multicoil_mri_of_an_odd_size():
    h, w = 21, 23
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 10) / 7.0) ** 2 + ((xx - 11) / 8.0) ** 2 < 1).astype(np.float32))
    prob = ReconProblem(y=op.forward(mag.to(torch.complex64)[None]), operator=op, modality="MR",
                        image_shape=(1, h, w))
    spec = _spec("patch", levels=2, coord_channels=2, in_channels=2, out_channels=2)
    geom = {"pad_width": 4, "pad_z": None, "depth": None, "patch_sizes": [8, 16], "patch_probs": [0.5, 0.5],
            "pad_value": 0.0, "image_channels": 2, "training_shapes": [[8, 48, 48]]}
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EDMDenoiser(_net(spec)), channels=2,
                  meta={"kind": "patch", "normalisation": mr, "patch": geom, "network_multiple": 2})
    res = METHODS["padis_ood"](prob, {**FAST, "output": "cg", "gamma": 100.0, "cg_iter": 10}, prior, _gen())
    assert res.samples.shape == (1, 1, h, w) and res.samples.is_complex() and torch.isfinite(res.samples).all()
    fit = float(torch.linalg.vector_norm(prob.y - op.forward(res.samples[0])))
    print(f"MR residual {fit:.4g} of |y| {float(torch.linalg.vector_norm(prob.y)):.4g}")
    assert fit < 0.3 * float(torch.linalg.vector_norm(prob.y))


def test_bad_input_is_one_clear_error():
    prob = ct_problem(21, 23, 1)
    with pytest.raises(ConfigError, match="sigma_max"):
        METHODS["padis_ood"](prob, {"sigma_max": 0.0}, patch_prior(None), _gen())
    with pytest.raises(ConfigError, match="3D slab"):
        METHODS["padis_ood"](prob, FAST, patch_prior(3), _gen())        # a 3D slab prior
    with pytest.raises(ConfigError, match="multiple of 2"):
        METHODS["padis_ood"](prob, {**FAST, "patch_size": 7}, patch_prior(None), _gen())


# ----------------------------------------------------------------------------------- determinism, no leakage


def test_same_seed_same_numbers_and_no_leakage_between_subjects():
    prior = patch_prior(None)
    before = {k: v.clone() for k, v in prior.denoiser.net.state_dict().items()}
    prob_a, prob_b = ct_problem(21, 23, 1), ct_problem(16, 18, 1)
    prob_a.y.mul_(1.5)
    METHODS["padis_ood"](prob_a, FAST, prior, _gen())
    after_a = METHODS["padis_ood"](prob_b, FAST, prior, _gen(3))
    alone = METHODS["padis_ood"](prob_b, FAST, patch_prior(None), _gen(3))
    assert torch.equal(after_a.samples, alone.samples)
    sa, sb = (r.info["artifacts"]["adapted"]["passes"][0] for r in (after_a, alone))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(v, prior.denoiser.net.state_dict()[k]) for k, v in before.items())
