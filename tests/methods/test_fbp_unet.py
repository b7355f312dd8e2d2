"""fbp_unet (FBPConvNet) and its training kind ``supervised``: the L2-optimal linear map on a Gaussian prior, the
simulate -> FBP -> train -> reconstruct chain on an odd-size phantom, the one-geometry refusal (one acquisition,
a range of pixel sizes), determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medrecon.methods.fbp_unet  # noqa: F401  (registers the method)
from medrecon import config as cfgmod
from medrecon.diffusion.analytic import linear_gaussian_problem
from medrecon.diffusion.datasets import TrainingDataset
from medrecon.diffusion.kinds import train_prior
from medrecon.diffusion.normalisation import default_normalisation
from medrecon.diffusion.supervised import (
    SupervisedPrior,
    build_supervised_dataset,
    resolve_supervised_config,
    supervised_from_checkpoint,
    supervised_task,
)
from medrecon.diffusion.train import read_loss_log, run_training
from medrecon.errors import ConfigError
from medrecon.recon.registry import METHODS, ReconProblem

TINY = {"features": [4, 4, 8, 8, 16, 4]}
SHAPE = (21, 23)                 # odd, non-square: padded to a 32 x 32 canvas
SPACING = (4.0, 3.0, 3.0)
MEASURE = {"views": 8, "I0": 1e5}


def _train_cfg(**over) -> dict:
    cfg = {"kind": "supervised", "modality": "CT", "measure": dict(MEASURE), "network": TINY, "steps": 12,
           "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "device": "cpu", "checkpoint_every": 6}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A training phantom (6 x 21 x 23), an evaluation phantom (3 x 21 x 23) measured with 8 and with 20 views,
    and a tiny FBP-UNet trained for 8 views."""
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure

    tmp = tmp_path_factory.mktemp("fbp_unet")
    train = write_phantom_volume("ct_chest", tmp / "train.zarr", (6, *SHAPE), SPACING, 0)
    ev = write_phantom_volume("ct_chest", tmp / "eval.zarr", (3, *SHAPE), SPACING, 1)
    m8 = measure(ev, tmp / "m8.zarr", cfgmod.validate({"measure": {"ct": MEASURE}}))
    m20 = measure(ev, tmp / "m20.zarr", cfgmod.validate({"measure": {"ct": {**MEASURE, "views": 20}}}))
    ckpt = train_prior(_train_cfg(), [train], tmp / "p.pt")
    return {"tmp": tmp, "train": train, "eval": ev, "m8": m8, "m20": m20, "ckpt": ckpt}


def _problem(meas_path) -> ReconProblem:
    """The reconstruct step's problem of a whole measurement (its operator, meta and FBP start)."""
    from medrecon.measurement import Measurement
    from medrecon.recon.ct_fbp import fbp

    meas = Measurement.open(meas_path)
    op = meas.operator()
    y = torch.from_numpy(meas.read())
    return ReconProblem(y=y, operator=op, modality="CT", image_shape=meas.image_shape, meta=dict(meas.meta),
                        noise_std=meas.meta["noise"].get("std"), init=fbp(op, y))


def _prior(ckpt) -> SupervisedPrior:
    return supervised_from_checkpoint(ckpt, image_units="attenuation", mu_water=0.0192, expect_modality="CT")


# ------------------------------------------------------------------------------- linear-Gaussian optimality


def test_a_linear_fbp_unet_trained_by_the_loop_reaches_the_linear_mmse_map(tmp_path):
    """Notes 7.3 test 1: with u = F y, F = A^T (injective: A is 32 x 64 of full row rank), a Gaussian prior and
    Gaussian noise, the L2-optimal predictor of x from u is linear and equals the posterior mean E[x | y]. A
    linear residual network u + W u + b, trained by the supervised task (same loss, same loop: AdamW, cosine,
    EMA) on fresh simulated pairs, must converge to it. Measured (1500 steps of 128, lr 3e-2, EMA 0.995):
    relative error of the predictions 0.0196, MSE 4.3375 vs the posterior's 4.3168 (+0.48 %)."""
    torch.set_num_threads(1)
    prior, _, prob = linear_gaussian_problem(0)
    a, s_y, cov = prob.operator.m, float(prob.noise_std), prior.cov
    chol = torch.linalg.cholesky(cov).numpy()
    ata, at_s = (a.T @ a).numpy(), (s_y * a.T).numpy()

    class Pairs(TrainingDataset):       # fresh (x, u) per item: a pure function of the item's key
        kind, image_size = "supervised", 8

        def __len__(self) -> int:
            return 4096

        def sample(self, index, rng):
            x = chol @ rng.standard_normal(64)
            u = ata @ x + at_s @ rng.standard_normal(32)
            return {"x": torch.from_numpy(u.astype(np.float32).reshape(1, 8, 8)),
                    "target": torch.from_numpy(x.astype(np.float32).reshape(1, 8, 8))}

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, u):
            return self.lin(u.reshape(u.shape[0], -1)).reshape(u.shape)

    cfg = resolve_supervised_config({"steps": 1500, "batch_size": 128, "lr": 3e-2, "warmup_steps": 50,
                                     "grad_clip": 0, "ema_decay": 0.995, "device": "cpu",
                                     "checkpoint_every": 10_000})
    run_training(supervised_task(cfg, Linear, {"builder": "linear"}), cfg, Pairs(), tmp_path / "lin.pt",
                 modality="CT", normalisation=default_normalisation("CT"))
    net = Linear()
    net.load_state_dict(torch.load(tmp_path / "lin.pt", weights_only=True)["ema_weights"])
    w = torch.eye(64, dtype=torch.float64) + net.lin.weight.detach().double()
    b = net.lin.bias.detach().double()

    g = torch.Generator().manual_seed(123)
    xs = prior.sample(4000, g)
    ys = xs @ a.T + s_y * torch.randn(4000, 32, generator=g, dtype=torch.float64)
    gram = a @ cov @ a.T + s_y**2 * torch.eye(32, dtype=torch.float64)
    exact = torch.linalg.solve(gram, ys.T).T @ (cov @ a.T).T          # E[x | y] (prior mean 0)
    assert torch.allclose(exact[0], prior.posterior(a, ys[0], s_y).mean, atol=1e-10)
    pred = (ys @ a) @ w.T + b
    rel = float(torch.linalg.norm(pred - exact) / torch.linalg.norm(exact))
    mse, mse_exact = (float(((p - xs) ** 2).sum(1).mean()) for p in (pred, exact))
    print(f"linear FBP-UNet: relative error {rel:.4f}, MSE {mse:.4f} vs posterior {mse_exact:.4f}")
    assert rel < 0.04
    assert 1.0 <= mse / mse_exact < 1.015


# ------------------------------------------------------------------------------- the chain on a phantom


def test_training_pairs_are_the_measure_steps_fbp_and_the_reference(study):
    """The network input is the FBP of exactly what the measure step simulates: noiseless, no flips, the item
    equals the reconstruct step's FBP of a noiseless measurement; the target is the reference in the same units."""
    from medrecon.measure import measure
    from medrecon.physics.ct_geometry import hu_to_mu
    from medrecon.volume import Volume

    c = resolve_supervised_config(_train_cfg(measure={"views": 8, "I0": None}, flips=[]))
    ds, _ = build_supervised_dataset(c, [study["train"]])
    m = measure(study["train"], study["tmp"] / "m_clean.zarr", cfgmod.validate({"measure": {"ct": c["measure"]}}))
    want = _problem(m).init[4]
    got, mu = ds.pair(4, np.random.default_rng(0))
    assert torch.allclose(got, want, atol=1e-6 * float(want.abs().max()))
    ref = torch.from_numpy(hu_to_mu(Volume.open(study["train"]).read()[4], 0.0192))
    assert torch.allclose(mu, ref)
    item = ds[(4, 0)]
    assert item["x"].shape == item["target"].shape == (1, 32, 32)
    assert torch.allclose(item["x"][0, 5:26, 4:27], ds.scale * want + ds.offset, atol=1e-5)
    assert float(item["x"][0, 0, 0]) == -1.0            # the canvas: air (-1000 HU) around the slice


def test_end_to_end_on_an_odd_size_stack_and_deterministic(study):
    """Train (fixture: 12 steps) -> reconstruct a 3 x 21 x 23 stack, through METHODS and through reconstruct();
    the same seed trains the same weights, and the method is a pure function of its input."""
    from medrecon.diffusion.checkpoint import load_checkpoint
    from medrecon.reconstruct import reconstruct

    prob = _problem(study["m8"])
    prior = _prior(study["ckpt"])
    res = METHODS["fbp_unet"](prob, {}, prior, torch.Generator().manual_seed(0))
    assert res.samples.shape == (1, 3, *SHAPE) and res.nfe == 1 and bool(torch.isfinite(res.samples).all())
    again = METHODS["fbp_unet"](prob, {}, _prior(study["ckpt"]), None)
    assert torch.equal(res.samples, again.samples)
    one_by_one = METHODS["fbp_unet"](prob, {"batch": 1}, prior, None)    # passes change only float rounding
    assert torch.allclose(res.samples, one_by_one.samples, atol=1e-6)
    assert not torch.allclose(res.samples[0], prob.init)        # the network did something
    losses = [r["loss"] for r in read_loss_log(str(study["ckpt"]) + ".loss.csv")]
    assert len(losses) == 12 and all(np.isfinite(losses))

    cfg = cfgmod.validate({"reconstruct": {"device": "cpu"}})
    vol = reconstruct(study["m8"], study["tmp"] / "r.zarr", "fbp_unet", cfg, prior_path=study["ckpt"])
    from medrecon.physics.ct_geometry import mu_to_hu
    assert np.allclose(vol.read(), mu_to_hu(res.samples[0], 0.0192).numpy(), atol=1e-2)

    second = train_prior(_train_cfg(), [study["train"]], study["tmp"] / "p2.pt")
    w1, w2 = (load_checkpoint(p, expect_kind="supervised").network.state_dict() for p in (study["ckpt"], second))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_zero_residual_network_returns_the_fbp_exactly(study):
    """The residual plumbing: affine to the network domain, background canvas, crop, affine back. With the
    network's output zeroed the method is the FBP (to float32 rounding)."""
    prob = _problem(study["m8"])
    prior = _prior(study["ckpt"])
    final = prior.network.unet.final_conv
    with torch.no_grad():
        final.weight.zero_()
        final.bias.zero_()
    res = METHODS["fbp_unet"](prob, {}, prior, None)
    assert torch.allclose(res.samples[0], prob.init, atol=1e-6)


# ------------------------------------------------------------------------------- one geometry only


def test_another_geometry_is_one_clear_error(study):
    """Trained for 8 views, given 20: one ConfigError naming both acquisitions and the fix; the same through the
    workflow entry point; and another I0 is refused too."""
    from medrecon.reconstruct import reconstruct

    prior = _prior(study["ckpt"])
    with pytest.raises(ConfigError) as err:
        METHODS["fbp_unet"](_problem(study["m20"]), {}, prior, None)
    text = str(err.value)
    assert "8 views" in text and "20 views" in text and "views (8 vs 20)" in text
    assert "train.<name>.measure" in err.value.fix and "views: 20" in err.value.fix
    cfg = cfgmod.validate({"reconstruct": {"device": "cpu"}})
    with pytest.raises(ConfigError, match=r"views \(8 vs 20\)"):
        reconstruct(study["m20"], study["tmp"] / "r20.zarr", "fbp_unet", cfg, prior_path=study["ckpt"])
    prob = _problem(study["m8"])
    prob.meta["noise"] = {**prob.meta["noise"], "I0": 1e4}
    with pytest.raises(ConfigError, match=r"I0 \(100000.0 vs 10000.0\)"):
        METHODS["fbp_unet"](prob, {}, prior, None)
    prob.meta = {}                 # a hand-built problem: the geometry is still checked, the unknown noise is not
    assert METHODS["fbp_unet"](prob, {}, prior, None).samples.shape == (1, 3, *SHAPE)
    p20 = _problem(study["m20"])
    p20.meta = {}
    with pytest.raises(ConfigError, match=r"views \(8 vs 20\)"):
        METHODS["fbp_unet"](p20, {}, prior, None)


def test_training_over_several_pixel_sizes_accepts_that_range_only(study):
    """A study grid of fixed size over each patient's field of view gives every patient its own pixel size: the
    FBP-UNet trains on all of them (each volume simulated at its own geometry), records the range, reconstructs
    a measurement whose pixels lie inside it, and refuses one outside it, or of another acquisition, with one
    clear error."""
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure

    tmp = study["tmp"]
    coarse = write_phantom_volume("ct_chest", tmp / "coarse.zarr", (4, *SHAPE), (4.0, 4.0, 4.0), 2)
    c = resolve_supervised_config(_train_cfg(flips=[]))
    ds, _ = build_supervised_dataset(c, [study["train"], coarse])
    assert ds.spacings == [(3.0, 3.0), (4.0, 4.0)]
    assert ds.operator(0).geometry.spacing != ds.operator(1).geometry.spacing
    # each volume's pairs come from its own geometry: the FBP of a slice of `coarse` at 4 mm
    got, _ = ds.pair(len(ds) - 1, np.random.default_rng(0))
    m = measure(coarse, tmp / "m_coarse.zarr", cfgmod.validate({"measure": {"ct": c["measure"]}}))
    want = _problem(m).init[-1]
    assert not torch.allclose(got, want, atol=1e-3 * float(want.abs().max()))     # noise differs...
    assert float((got - want).abs().mean()) < 0.2 * float(want.abs().mean())        # ...the geometry does not
    rec = ds.record()
    assert rec["spacing_range"] == [[3.0, 3.0], [4.0, 4.0]]

    ckpt = train_prior(_train_cfg(steps=4), [study["train"], coarse], tmp / "p_range.pt")
    prior = _prior(ckpt)
    mid = write_phantom_volume("ct_chest", tmp / "mid.zarr", (3, *SHAPE), (4.0, 3.5, 3.5), 3)
    m_mid = measure(mid, tmp / "m_mid.zarr", cfgmod.validate({"measure": {"ct": MEASURE}}))
    assert METHODS["fbp_unet"](_problem(m_mid), {}, prior, None).samples.shape == (1, 3, *SHAPE)
    big = write_phantom_volume("ct_chest", tmp / "big.zarr", (3, *SHAPE), (4.0, 5.0, 5.0), 3)
    m_big = measure(big, tmp / "m_big.zarr", cfgmod.validate({"measure": {"ct": MEASURE}}))
    with pytest.raises(ConfigError, match=r"pixel sizes 3\.\.4 mm but this measurement's pixels are 5 mm") as err:
        METHODS["fbp_unet"](_problem(m_big), {}, prior, None)
    assert "retrain it including volumes of this pixel size" in err.value.fix
    m_mid20 = measure(mid, tmp / "m_mid20.zarr", cfgmod.validate({"measure": {"ct": {**MEASURE, "views": 20}}}))
    with pytest.raises(ConfigError, match=r"views \(8 vs 20\)"):
        METHODS["fbp_unet"](_problem(m_mid20), {}, prior, None)


def test_derived_keys_are_checked_consistently_and_the_old_record_exactly(study):
    """Inside the trained range, a detector that differs from what the problem's own pixel size implies is still
    refused; a single-pixel-size record (no range: the old record) still refuses any other pixel size exactly."""
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure

    tmp = study["tmp"]
    mid = write_phantom_volume("ct_chest", tmp / "mid_b.zarr", (2, *SHAPE), (4.0, 3.5, 3.5), 6)
    m_mid = measure(mid, tmp / "m_mid_b.zarr", cfgmod.validate({"measure": {"ct": MEASURE}}))
    old = _prior(study["ckpt"])                       # trained at 3 mm only: no spacing_range in its record
    assert "spacing_range" not in old.geometry
    with pytest.raises(ConfigError, match=r"spacing \(\[3\.0, 3\.0\] vs \[3\.5, 3\.5\]\)"):
        METHODS["fbp_unet"](_problem(m_mid), {}, old, None)

    coarse = write_phantom_volume("ct_chest", tmp / "coarse_b.zarr", (2, *SHAPE), (4.0, 4.0, 4.0), 7)
    ranged = _prior(train_prior(_train_cfg(steps=2), [study["train"], coarse], tmp / "p_range_b.pt"))
    assert METHODS["fbp_unet"](_problem(m_mid), {}, ranged, None).samples.shape == (1, 2, *SHAPE)
    m_det = measure(mid, tmp / "m_det.zarr",
                    cfgmod.validate({"measure": {"ct": {**MEASURE, "detector_spacing": 7.0}}}))
    with pytest.raises(ConfigError, match=r"detector_spacing \(3\.5 vs 7\.0\)"):
        METHODS["fbp_unet"](_problem(m_det), {}, ranged, None)


def test_bad_training_configs_are_one_clear_error(tmp_path, study):
    with pytest.raises(ConfigError, match="stesp"):
        resolve_supervised_config({"stesp": 3})
    with pytest.raises(ConfigError, match="cone"):
        resolve_supervised_config({"measure": {"beam": "cone"}})
    with pytest.raises(ConfigError, match=r"train\.<name>\.measure"):
        resolve_supervised_config({"measure": {"views": 0}})
    with pytest.raises(ConfigError, match="modality must be CT"):
        resolve_supervised_config({"modality": "MR"})
    with pytest.raises(ConfigError, match="features"):
        resolve_supervised_config({"network": {"features": [4, 8]}})


def test_the_study_measure_is_the_default_acquisition():
    """`medrecon train` and the workflow's train rule train a supervised prior for the study's measure.ct, with the
    section's own measure keys over it; other kinds are left alone."""
    study = cfgmod.validate({"measure": {"ct": {"views": 12, "I0": 5e4}}})
    sec = cfgmod.training_section({"kind": "supervised", "modality": "CT", "measure": {"I0": None}}, study)
    assert sec["measure"]["views"] == 12 and sec["measure"]["I0"] is None and sec["measure"]["beam"] == "parallel"
    assert resolve_supervised_config({k: v for k, v in sec.items() if k != "modality"})["measure"]["views"] == 12
    plain = {"kind": "slice", "modality": "CT"}
    assert cfgmod.training_section(plain, study) == plain


def test_the_workflow_trains_a_supervised_prior_for_the_study_acquisition(tmp_path):
    """`snakemake <results>/<study>/priors/<name>.pt` for a supervised config: the train job gets the study's
    measure.ct (with the section's own measure keys over it) in its --config (dry run)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    cfg = {"study": "s", "results": str(tmp_path / "results"),
           "subjects": [{"id": "t1", "input": "phantom:ct_chest?seed=6&shape=6,40,40&spacing=5,5,5",
                         "modality": "CT", "role": "train"}],
           "measure": {"ct": {"views": 12, "I0": 5e4}},
           "train": {"ct_fbpu": {"modality": "CT", "kind": "supervised", "measure": {"electronic_std": 2.0}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    target = tmp_path / "results" / "s" / "priors" / "ct_fbpu.pt"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--snakefile",
                           str(repo / "workflow" / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                           str(tmp_path / "c.yaml"), "--", str(target)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if "medrecon train" in ln)
    sent = json.loads(line.split("--config '", 1)[1].split("'", 1)[0])["train"]["ct_fbpu"]["measure"]
    assert (sent["views"], sent["I0"], sent["electronic_std"], sent["beam"]) == (12, 5e4, 2.0, "parallel")
