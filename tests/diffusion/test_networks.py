"""Networks (MONAI UNet / AutoencoderKL builders) and prior checkpoints: shapes, spec checks, save/load, hashing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrecon.diffusion.checkpoint import (
    content_hash,
    load_checkpoint,
    prior_from_checkpoint,
    save_checkpoint,
)
from medrecon.diffusion.denoiser import EDMDenoiser, EpsilonDenoiser, Prior
from medrecon.diffusion.networks import (
    autoencoder_spec_defaults,
    build_autoencoder,
    build_unet,
    count_parameters,
    latent_shape,
    network_spec_defaults,
    resolve_unet_spec,
    tiny_network_spec,
)
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError, InputError

CT_NORM = {"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "range": [-1.0, 1.0]}


def _net(spec: dict, seed: int = 0) -> torch.nn.Module:
    """A built UNet with every parameter jittered: MONAI zero-initialises the output convolution, so an
    untrained net would output exact zeros and hide wiring mistakes."""
    torch.manual_seed(seed)
    net = build_unet(spec).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


# ---------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("kind, in_ch, coords, classes", [("slice", 1, 0, None), ("slab", 3, 0, 4),
                                                            ("patch", 1, 2, None)])
def test_default_specs_resolve_with_attention_only_at_low_resolution(kind, in_ch, coords, classes):
    spec = resolve_unet_spec(network_spec_defaults(kind))
    assert (spec["in_channels"], spec["coord_channels"], spec["num_class_embeds"]) == (in_ch, coords, classes)
    res = [spec["image_size"] // 2**i for i in range(len(spec["channels"]))]
    assert res == [64, 32, 16]
    # "auto" attention: exactly the levels at or below the cap (16 px for the CPU demo specs)
    assert spec["attention_levels"] == [r <= spec["attention_max_resolution"] for r in res] == [False, False, True]
    net = build_unet(spec)
    assert 0.5e6 < count_parameters(net) < 5e6


def test_tiny_unet_shapes_for_real_and_complex_images():
    for ch in (1, 2):
        spec = {**tiny_network_spec("slice", 16), "in_channels": ch, "out_channels": ch}
        net = _net(spec)
        x = torch.randn(3, ch, 16, 16)
        with torch.no_grad():
            y = net(x, torch.tensor([0, 500, 999]))
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_patch_unet_takes_coordinates_but_predicts_image_channels_only():
    net = _net(tiny_network_spec("patch", 16))
    assert net.unet.in_channels == 3 and net.unet.out_channels == 1
    x, coords = torch.randn(2, 1, 16, 16), torch.linspace(-1, 1, 16).expand(2, 2, 16, 16)
    with torch.no_grad():
        y = net(x, torch.tensor([3, 7]), coords=coords)
        y_other = net(x, torch.tensor([3, 7]), coords=-coords)
    assert y.shape == (2, 1, 16, 16)
    assert not torch.allclose(y, y_other)  # the coordinates really reach the network
    with pytest.raises(ValueError, match="coords"):
        net(x, torch.tensor([3, 7]))


def test_slab_unet_is_class_conditional_and_its_label_starts_neutral():
    net = _net(tiny_network_spec("slab", 16))
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        y1 = net(x, t, class_labels=torch.tensor([1, 1]))
        y3 = net(x, t, class_labels=torch.tensor([3, 3]))
    assert y1.shape == (2, 3, 16, 16)
    assert (y1 - y3).abs().max() > 1e-6      # (jittered weights) the label reaches the network
    # Built fresh, the class embeddings are zero: the label has no effect until training gives it one.
    assert not build_unet(tiny_network_spec("slab", 16)).unet.class_embedding.weight.any()
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t)


def test_a_short_training_teaches_the_label_what_it_means(tmp_path):
    """Label 0 = dark discs, label 1 = bright discs: after 300 tiny steps the denoiser's answer inside the discs
    at high noise follows the label (the label is what tells the classes apart there; measured +0.13 at 300
    steps, +0.025 at 150)."""
    from medrecon.diffusion.datasets import ArrayDataset, toy_discs
    from medrecon.diffusion.denoiser import EpsilonDenoiser
    from medrecon.diffusion.train import train

    discs = toy_discs(64, 16, seed=0)
    labels = np.arange(64) % 2
    for i, lab in enumerate(labels):          # brightness of the discs by label: 0 -> 0.0, 1 -> 1.0
        inside = discs[i, 0] > -1
        discs[i, 0][inside] = float(lab)
    spec = {k: v for k, v in tiny_network_spec("slice", 16).items() if k not in ("image_size", "in_channels",
                                                                                  "out_channels")}
    cfg = dict(image_size=16, network={**spec, "num_class_embeds": 2}, batch_size=16, steps=300, lr=3e-3,
               warmup_steps=10, ema_decay=0.0, checkpoint_every=1000, seed=0, device="cpu")
    res = train(cfg, ArrayDataset(discs, class_labels=labels), tmp_path / "c.pt", modality="CT",
                normalisation={"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "range": [-1.0, 1.0]})
    from medrecon.diffusion.checkpoint import load_checkpoint

    lp = load_checkpoint(res.checkpoint)
    den = EpsilonDenoiser(lp.network, lp.schedule)
    x0 = torch.from_numpy(discs[:8])
    inside = x0 > -1
    sigma = 2.0
    xt = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d0 = den(xt, sigma, {"class_labels": torch.zeros(8, dtype=torch.long)})
        d1 = den(xt, sigma, {"class_labels": torch.ones(8, dtype=torch.long)})
    assert float((d1 - d0)[inside].mean()) > 0.05       # "bright" makes the estimate brighter
    assert lp.network.unet.class_embedding.weight.norm() > 0


@pytest.mark.parametrize("override, match", [
    ({"image_size": 64, "attention_levels": [True, False, False], "attention_max_resolution": 32}, "exceeds"),
    ({"image_size": 128, "attention_levels": [False, False, False]}, "middle block"),
    ({"norm_num_groups": 24}, "norm_num_groups"),
    ({"image_size": 66}, "halved"),
    ({"dropout": 0.1}, "unknown"),
    ({"attention_levels": [False, True]}, "entries"),
])
def test_bad_specs_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_unet_spec({**network_spec_defaults("slice"), **override})


def test_autoencoder_round_trips_shapes():
    spec = {**autoencoder_spec_defaults(), "image_size": 32, "channels": [8, 16, 16], "norm_num_groups": 8}
    torch.manual_seed(0)
    ae = build_autoencoder(spec).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(x)
        rec = ae.decode(z_mu)
        rec2, _, _ = ae(x)
    assert tuple(z_mu.shape[1:]) == latent_shape(spec) == (3, 8, 8)
    assert z_sigma.shape == z_mu.shape and bool((z_sigma > 0).all())
    assert rec.shape == rec2.shape == x.shape
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_autoencoder({**spec, "image_size": 30})


# ---------------------------------------------------------------------------------------------- checkpoints


def _save(path, net, ema_net=None, **over):
    fields = dict(kind="slice", modality="CT", objective="epsilon",
                  network={"builder": "unet", "spec": net.spec}, schedule=VPSchedule().to_dict(),
                  normalisation=CT_NORM, train_config={"seed": 0, "lr": 1e-3}, data=[{"path": "x.zarr",
                  "sha256": "00"}], step=7, weights=net.state_dict(),
                  ema_weights=(ema_net or net).state_dict())
    fields.update(over)
    return save_checkpoint(path, **fields)


@pytest.fixture
def ckpt(tmp_path):
    spec = tiny_network_spec("slice", 16)
    raw, ema = _net(spec, 0), _net(spec, 1)
    path = tmp_path / "prior.pt"
    h = _save(path, raw, ema)
    return path, raw, ema, h


def test_checkpoint_round_trip_gives_identical_outputs(ckpt):
    path, raw, ema, h = ckpt
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 900])
    lp = load_checkpoint(path, expect_modality="CT", expect_kind="slice",
                         expect_normalisation={"kind": "ct_window", "hu_min": -1000, "hu_max": 1000})
    lp_raw = load_checkpoint(path, ema=False)
    with torch.no_grad():
        assert torch.equal(lp.network(x, t), ema(x, t))
        assert torch.equal(lp_raw.network(x, t), raw(x, t))
        assert not torch.equal(lp.network(x, t), lp_raw.network(x, t))
    assert not lp.network.training and lp.hash == h and lp.step == 7
    assert lp.schedule == VPSchedule() and lp.normalisation == CT_NORM
    # only tensors and plain types inside: the safe loader reads it
    content = torch.load(path, weights_only=True)
    assert content["hash"] == content_hash(content) == h


def test_content_hash_is_canonical():
    a = {"b": [1, 2.5, "x"], "a": torch.arange(4.0), "n": None}
    b = {"n": None, "a": torch.arange(4.0), "b": (1, 2.5, "x")}
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash({**a, "b": [1, 2.5000001, "x"]})
    assert content_hash(a) != content_hash({**a, "a": torch.arange(4.0).double()})


def test_flipped_bytes_are_an_input_error_naming_the_file(ckpt):
    path = ckpt[0]
    raw = bytearray(path.read_bytes())
    # flip bytes in the middle of the file (tensor data), and in a second copy, near the start (pickle)
    for pos in (len(raw) // 2, 200):
        bad = bytearray(raw)
        for i in range(pos, pos + 16):
            bad[i] ^= 0xFF
        broken = path.with_name(f"broken{pos}.pt")
        broken.write_bytes(bytes(bad))
        with pytest.raises(InputError, match=f"broken{pos}.pt") as err:
            load_checkpoint(broken)
        assert "Fix:" in str(err.value)


def test_edited_content_fails_the_hash_check(ckpt, tmp_path):
    path = ckpt[0]
    content = torch.load(path, weights_only=True)
    content["normalisation"]["hu_max"] = 3000.0   # edited after the fact, hash left as it was
    edited = tmp_path / "edited.pt"
    torch.save(content, edited)
    with pytest.raises(InputError, match=r"edited\.pt is corrupted"):
        load_checkpoint(edited)
    path.with_name("cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"cut\.pt"):
        load_checkpoint(path.with_name("cut.pt"))
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatches_are_input_errors_with_expected_and_found(ckpt):
    path = ckpt[0]
    with pytest.raises(InputError, match="modality 'CT', but 'MR' was expected") as err:
        load_checkpoint(path, expect_modality="MR")
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="prior kind 'slice', but 'slab'"):
        load_checkpoint(path, expect_kind="slab")
    with pytest.raises(InputError, match="intensity normalisation") as err:
        load_checkpoint(path, expect_normalisation={"kind": "ct_window", "hu_min": -1024, "hu_max": 3071})
    assert "re-train" in str(err.value)
    with pytest.raises(InputError, match="intensity normalisation"):
        load_checkpoint(path, expect_normalisation={"kind": "mr_percentile"})


def test_weights_that_do_not_fit_the_spec_are_an_input_error(tmp_path):
    spec = tiny_network_spec("slice", 16)
    net = _net(spec)
    other = {**spec, "channels": [16, 16], "num_head_channels": 16}
    _save(tmp_path / "p.pt", net, network={"builder": "unet", "spec": other})
    with pytest.raises(InputError, match="do not fit"):
        load_checkpoint(tmp_path / "p.pt")


def test_prior_from_checkpoint_builds_the_epsilon_denoiser_and_normalisation(ckpt):
    path, _, ema, _ = ckpt
    prior = prior_from_checkpoint(path, expect_modality="CT")
    assert isinstance(prior, Prior) and isinstance(prior.denoiser, EpsilonDenoiser)
    assert (prior.scale, prior.offset, prior.channels) == (pytest.approx(1e-3), pytest.approx(0.0), 1)
    assert prior.meta["image_size"] == 16 and prior.schedule == VPSchedule()
    # D(x, sigma) = x - sigma * eps(sqrt(ab_t) x, t) at the trained step t of sigma
    sched = VPSchedule()
    t = 300
    sigma = float(sched.sigma_of_t(t))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        eps = ema(float(sched.alpha_bar(t).sqrt()) * x, torch.tensor([t, t]))
        d = prior.denoiser(x, sigma)
    torch.testing.assert_close(d, x - sigma * eps, rtol=1e-5, atol=1e-5)
    # attenuation units: mu_water maps to 0 HU -> 0.0 in the [-1, 1] window, 0 1/mm (air) to -1
    pa = prior_from_checkpoint(path, image_units="attenuation", mu_water=0.02)
    assert pa.scale * 0.02 + pa.offset == pytest.approx(0.0)
    assert pa.offset == pytest.approx(-1.0)


def test_prior_from_checkpoint_edm(tmp_path):
    spec = tiny_network_spec("slice", 16)
    net = _net(spec)
    _save(tmp_path / "edm.pt", net, objective="edm", schedule={"kind": "edm", "sigma_min": 0.002,
          "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2, "p_std": 1.2}, sigma_data=0.5)
    prior = prior_from_checkpoint(tmp_path / "edm.pt")
    assert isinstance(prior.denoiser, EDMDenoiser) and prior.denoiser.sigma_data == 0.5
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        d = prior.denoiser(x, 1e-4)
    assert (d - x).abs().max() < 1e-3   # c_skip -> 1, c_out -> sigma at tiny noise
