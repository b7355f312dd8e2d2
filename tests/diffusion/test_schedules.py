"""Schedules, reverse-chain updates, network denoiser adapters and the Prior image<->prior-domain map."""

from __future__ import annotations

import math

import pytest
import torch

from medrecon.diffusion.analytic import GaussianPrior
from medrecon.diffusion.denoiser import EDMDenoiser, EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import (
    EDMSchedule,
    VPSchedule,
    ddim_step,
    ddpm_step,
    schedule_from_dict,
)
from medrecon.errors import ConfigError

F64 = torch.float64



def test_vp_schedule_values():
    s = VPSchedule()
    betas = s.betas
    assert betas.dtype == F64 and betas.shape == (1000,)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    ab = s.alphas_cumprod
    assert float(ab[0]) == pytest.approx(1 - 1e-4, rel=1e-12)
    assert float(ab[1]) == pytest.approx((1 - 1e-4) * (1 - betas[1].item()), rel=1e-12)
    # known value of the DDPM linear schedule at the last step: ab_999 ~ 4.04e-5
    assert float(ab[-1]) == pytest.approx(4.036e-5, rel=1e-3)
    t = torch.tensor([-1, 0, 499, 999])
    assert s.alpha_bar(t).tolist()[0] == 1.0
    torch.testing.assert_close(s.alpha_bar(t)[1:], ab[[0, 499, 999]])
    sig = s.sigma_of_t(t)
    assert float(sig[0]) == 0.0
    torch.testing.assert_close(sig[1:], ((1 - ab[[0, 499, 999]]) / ab[[0, 499, 999]]).sqrt())
    with pytest.raises(ValueError, match="timesteps"):
        s.alpha_bar(1000)


def test_t_of_sigma_and_nearest_step():
    s = VPSchedule()
    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(s.t_of_sigma(s.sigma_of_t(t)), t.to(F64), atol=1e-9, rtol=0)
    # half-way in log sigma between steps 10 and 11 maps to 10.5
    mid = (s.sigma_of_t(10).log() + s.sigma_of_t(11).log()).div(2).exp()
    assert float(s.t_of_sigma(mid)) == pytest.approx(10.5, abs=1e-9)
    # clamped outside the trained range
    assert float(s.t_of_sigma(1e-9)) == 0.0 and float(s.t_of_sigma(1e9)) == 999.0
    assert s.nearest_timestep(s.sigma_of_t(t)).tolist() == t.tolist()
    near11 = (0.4 * s.sigma_of_t(10).log() + 0.6 * s.sigma_of_t(11).log()).exp()
    assert int(s.nearest_timestep(near11)) == 11


def test_ddim_grid():
    s = VPSchedule()
    g = s.ddim_timesteps(50)
    assert g.dtype == torch.long and g.tolist() == list(range(980, -1, -20))
    assert s.ddim_timesteps(1000).tolist() == list(range(999, -1, -1))
    g30 = s.ddim_timesteps(30)
    assert len(g30) == 30 and g30[0] == 29 * 33 and g30[-1] == 0
    pairs = s.step_pairs(4)
    assert pairs == [(750, 500), (500, 250), (250, 0), (0, -1)]
    for bad in (0, 1001):
        with pytest.raises(ConfigError, match="steps"):
            s.ddim_timesteps(bad)


def test_schedule_dicts_roundtrip():
    vp = VPSchedule(2e-4, 0.03, 500)
    assert schedule_from_dict(vp.to_dict()) == vp
    edm = EDMSchedule(0.01, 50.0, 5.0)
    assert schedule_from_dict(edm.to_dict()) == edm
    with pytest.raises(ConfigError, match="kind"):
        schedule_from_dict({"kind": "cosine"})
    with pytest.raises(ConfigError, match="beta_schedule"):
        schedule_from_dict({**vp.to_dict(), "beta_schedule": "cosine"})
    with pytest.raises(ConfigError):
        VPSchedule(0.02, 1e-4)


def test_edm_grid_and_training_sigmas():
    e = EDMSchedule()
    s = e.sigmas(18)
    assert s.shape == (19,) and float(s[-1]) == 0.0
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)
    assert bool((s[:-1].diff() < 0).all())
    # Karras formula at i = 1 of 18
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert float(s[1]) == pytest.approx((a + (b - a) / 17) ** 7, rel=1e-12)
    assert e.sigmas(5, append_zero=False).shape == (5,)
    g = torch.Generator().manual_seed(0)
    ls = e.training_sigmas(40000, g).log()
    # 40k samples: SE of the mean 1.2/200 = 0.006, of the std ~0.0042; allow 4 SE
    assert float(ls.mean()) == pytest.approx(-1.2, abs=0.025)
    assert float(ls.std()) == pytest.approx(1.2, abs=0.017)


def test_ddpm_step_is_ddim_eta_one_and_ddim_eta_zero_is_exact_on_the_noise_path():
    s = VPSchedule()
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(5, 3, generator=g, dtype=F64) for _ in range(3))
    ab, abn = s.alpha_bar(400), s.alpha_bar(380)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(ddpm_step(x_t, x0, ab, abn, z), ddim_step(x0, eps, ab, abn, 1.0, z))
    # eta = 0 moves along the same noise realisation
    torch.testing.assert_close(ddim_step(x0, eps, ab, abn, 0.0, z), abn.sqrt() * x0 + (1 - abn).sqrt() * eps)
    # DDS convention: noise fraction eta of sqrt(1 - ab')
    dds = ddim_step(x0, eps, ab, abn, 0.85, z, convention="dds")
    want = abn.sqrt() * x0 + (1 - abn).sqrt() * (0.85 * z + math.sqrt(1 - 0.85**2) * eps)
    torch.testing.assert_close(dds, want)
    # the last step (ab' = 1) returns x0 exactly in every form
    for out in (ddpm_step(x_t, x0, ab, 1.0, z), ddim_step(x0, eps, ab, 1.0, 0.85, z, "dds")):
        torch.testing.assert_close(out, x0)


def _gauss():
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.2]], dtype=F64)
    return GaussianPrior(torch.tensor([0.2, -0.1, 0.4]), cov)


class _ExactEps(torch.nn.Module):
    """The epsilon a perfect network would predict for a Gaussian prior; records the timesteps it gets."""

    def __init__(self, prior: GaussianPrior, sched: VPSchedule) -> None:
        super().__init__()
        self.prior, self.sched, self.seen = prior, sched, []

    def forward(self, x_t, timesteps, **cond):
        self.seen.append(timesteps.clone())
        ab = self.sched.alpha_bar(timesteps).reshape(-1, 1)
        sig = ((1 - ab) / ab).sqrt()
        x0 = self.prior(x_t / ab.sqrt(), sig.reshape(-1))
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def test_epsilon_denoiser_matches_analytic_at_schedule_sigmas():
    prior, sched = _gauss(), VPSchedule()
    net = _ExactEps(prior, sched)
    den = EpsilonDenoiser(net, sched)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 10, 250, 999])
    sig = sched.sigma_of_t(t)
    x = prior.sample(4, g) + sig[:, None] * torch.randn(4, 3, generator=g, dtype=F64)
    torch.testing.assert_close(den(x, sig), prior(x, sig), rtol=1e-10, atol=1e-10)
    assert net.seen[-1].tolist() == t.tolist() and den.nfe == 1
    # an off-grid sigma uses the nearest trained step; scalar sigma is broadcast over the batch
    off = (0.3 * sched.sigma_of_t(100).log() + 0.7 * sched.sigma_of_t(101).log()).exp()
    den(x, off)
    assert net.seen[-1].tolist() == [101] * 4 and den.nfe == 2
    den.reset_nfe()
    assert den.nfe == 0
    clipped = EpsilonDenoiser(net, sched, clip=0.05)(x, sig)
    assert float(clipped.abs().max()) <= 0.05


def test_epsilon_denoiser_wraps_monai_unet_with_class_labels():
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    net = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                             attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
                             num_class_embeds=4)
    sched = VPSchedule()
    den = EpsilonDenoiser(net, sched)
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    sig = sched.sigma_of_t(torch.tensor([5, 50, 500]))
    with torch.no_grad():
        out = den(x, sig, {"class_labels": torch.tensor([0, 1, 3])})
        eps = net((sched.alpha_bar(torch.tensor([5, 50, 500])).sqrt().reshape(-1, 1, 1, 1) * x).float(),
                  torch.tensor([5, 50, 500]), class_labels=torch.tensor([0, 1, 3])).double()
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, x - sig.reshape(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)


def test_edm_denoiser_matches_analytic_with_exact_raw_network():
    prior, sd = _gauss(), 0.5

    def raw(x_in, c_noise):  # F such that c_skip x + c_out F = D_exact
        s = (4 * c_noise).exp().reshape(-1, 1)
        x = x_in * (s**2 + sd**2).sqrt()
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        return (prior(x, s.reshape(-1)) - c_skip * x) / c_out

    den = EDMDenoiser(raw, sd)
    g = torch.Generator().manual_seed(3)
    sig = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=F64)
    x = prior.sample(4, g) + sig[:, None] * torch.randn(4, 3, generator=g, dtype=F64)
    torch.testing.assert_close(den(x, sig), prior(x, sig), rtol=1e-9, atol=1e-9)
    c_skip, c_out, c_in, c_noise = den.coefficients(torch.tensor([0.0, 0.5], dtype=F64))
    assert c_skip.tolist() == [1.0, 0.5] and float(c_out[0]) == 0.0
    assert float(c_in[1]) == pytest.approx(1 / math.sqrt(0.5))
    assert float(c_noise[1]) == pytest.approx(math.log(0.5) / 4)


def test_prior_maps_real_and_complex_images():
    real = Prior(denoiser=None, scale=2.0, offset=-1.0)
    x = torch.rand(2, 3, 4, 5)
    p = real.to_prior(x)
    assert p.shape == (2, 3, 1, 4, 5)
    torch.testing.assert_close(p[..., 0, :, :], 2 * x - 1)
    torch.testing.assert_close(real.from_prior(p), x)
    b = real.pack(x)
    assert b.shape == (6, 1, 4, 5)
    torch.testing.assert_close(real.unpack(b, (2, 3)), x)
    cplx = Prior(denoiser=None, scale=3.0, channels=2)
    z = torch.complex(torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    pc = cplx.to_prior(z)
    assert pc.shape == (3, 2, 4, 5) and pc.dtype == torch.float32
    torch.testing.assert_close(pc[:, 0], 3 * z.real)
    torch.testing.assert_close(pc[:, 1], 3 * z.imag)
    torch.testing.assert_close(cplx.from_prior(pc), z)
    with pytest.raises(ValueError, match="channels=2"):
        real.to_prior(z)
    labels = Prior(denoiser=None, cond={"class_labels": torch.tensor([0, 1, 2])})
    assert labels.batch_cond(2)["class_labels"].tolist() == [0, 1, 2, 0, 1, 2]
