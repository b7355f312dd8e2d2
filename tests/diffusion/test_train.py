"""Training: loss goes down, kill + resume is bit-exact, seeds determine weights; normalisation and datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrecon.device import pick_device
from medrecon.diffusion.checkpoint import load_checkpoint, load_resume, prior_from_checkpoint, resume_path
from medrecon.diffusion.datasets import (
    ArrayDataset,
    SliceDataset,
    VolumeSlices,
    fit_normalisation,
    fit_square,
    store_sha256,
    toy_discs,
)
from medrecon.diffusion.denoiser import EDMDenoiser
from medrecon.diffusion.kinds import train_prior
from medrecon.diffusion.networks import tiny_network_spec
from medrecon.diffusion.normalisation import from_network, prior_affine, to_network, validate_normalisation
from medrecon.diffusion.train import (
    StepBatchSampler,
    TrainingTask,
    loss_log_path,
    read_loss_log,
    resolve_train_config,
    run_training,
    train,
    warmup_cosine,
)
from medrecon.errors import ConfigError, DeviceError, InputError
from medrecon.volume import Geometry, Volume

CT = {"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0, "range": [-1.0, 1.0]}
_TINY = {k: v for k, v in tiny_network_spec("slice", 16).items()
         if k in ("channels", "num_res_blocks", "attention_levels", "attention_max_resolution",
                  "num_head_channels", "norm_num_groups")}



def cfg(**kw) -> dict:
    base = dict(image_size=16, network=dict(_TINY), batch_size=8, steps=100, lr=2e-3, warmup_steps=10,
                ema_decay=0.9, checkpoint_every=25, seed=0, device="cpu")
    return {**base, **kw}


@pytest.fixture(scope="module")
def discs():
    return ArrayDataset(toy_discs(64, 16, seed=0))


@pytest.fixture(scope="module")
def full_run(discs, tmp_path_factory):
    """100 uninterrupted steps of the tiny net on 16x16 discs (shared by several tests)."""
    out = tmp_path_factory.mktemp("full") / "prior.pt"
    return train(cfg(), discs, out, modality="CT", normalisation=CT), out


def _weights(path):
    c = torch.load(path, weights_only=True)
    return c["weights"], c["ema_weights"]


def test_training_lowers_the_loss(full_run):
    res, out = full_run
    losses = np.array(res.losses)
    assert len(losses) == 100 and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.5 * first, (first, last)
    rows = read_loss_log(loss_log_path(out))
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert np.allclose([r["loss"] for r in rows], losses)
    lrs = [r["lr"] for r in rows]  # warm-up then cosine
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3) and lrs[-1] < 1e-5
    assert np.all(np.diff(lrs[10:]) <= 0)


def test_kill_and_resume_reproduce_the_uninterrupted_run_bit_for_bit(full_run, discs, tmp_path):
    res_full, out_full = full_run
    out = tmp_path / "prior.pt"
    # killed at step 60: the last resume state is from step 50, the loss log already has 60 rows
    killed = train(cfg(), discs, out, modality="CT", normalisation=CT, stop_at=60)
    assert killed.checkpoint is None and not out.exists()
    assert load_resume(resume_path(out))["step"] == 50
    assert len(read_loss_log(loss_log_path(out))) == 60
    resumed = train(cfg(), discs, out, modality="CT", normalisation=CT)
    assert resumed.start_step == 50 and resumed.step == 100 and resumed.checkpoint == out
    rows = read_loss_log(loss_log_path(out))
    assert [r["step"] for r in rows] == list(range(1, 101))   # no gaps, no duplicates
    assert resumed.losses == res_full.losses
    (w, e), (wf, ef) = _weights(out), _weights(out_full)
    assert all(torch.equal(w[k], wf[k]) for k in wf)
    assert all(torch.equal(e[k], ef[k]) for k in ef)
    assert load_checkpoint(out).step == 100


def test_status_lines_when_stderr_is_not_a_terminal(discs, tmp_path, caplog):
    """Under Snakemake (stderr to a file) the bar is off: status lines every steps // 20, first and last step;
    a resumed run continues the count from its resume step."""
    import logging

    caplog.set_level(logging.INFO, logger="medrecon.diffusion.train")
    out = tmp_path / "p.pt"
    train(cfg(steps=40, checkpoint_every=10), discs, out, modality="CT", normalisation=CT, stop_at=25)
    train(cfg(steps=40, checkpoint_every=10), discs, out, modality="CT", normalisation=CT)
    lines = [r.getMessage() for r in caplog.records if r.name == "medrecon.diffusion.train"]
    status = [line for line in lines if " loss " in line]
    steps = [int(line.split("step ")[1].split("/")[0]) for line in status]
    assert steps == [1, *range(2, 25, 2), 25, 21, *range(22, 41, 2)]
    assert all(line.startswith("slice prior: step ") and "/40 loss " in line and "(EMA " in line
               and " lr " in line and " s/step, ETA " in line for line in status)
    assert any("resumed from" in line and "steps 21..40" in line for line in lines)
    assert any("stopped at step 25" in line for line in lines)
    assert any("finished: 40 steps" in line for line in lines)


def test_resume_with_a_changed_config_is_refused(full_run, discs, tmp_path):
    _, out_full = full_run
    out = tmp_path / "prior.pt"
    resume_path(out).write_bytes(resume_path(out_full).read_bytes())
    with pytest.raises(ConfigError, match=r"\['lr'\]") as err:
        train(cfg(lr=1e-3), discs, out, modality="CT", normalisation=CT)
    assert "prior.pt.resume.pt" in str(err.value)


def test_same_seed_same_weights_other_seed_other_weights(discs, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(cfg(steps=5, seed=seed), discs, tmp_path / f"{name}.pt", modality="CT", normalisation=CT)
        runs[name] = _weights(tmp_path / f"{name}.pt")[0]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_edm_training_lowers_the_loss_and_loads_as_an_edm_prior(discs, tmp_path):
    out = tmp_path / "edm.pt"
    res = train(cfg(loss="edm", steps=60, checkpoint_every=1000), discs, out, modality="CT", normalisation=CT)
    losses = np.array(res.losses)
    assert losses[-15:].mean() < 0.85 * losses[:15].mean(), (losses[:15].mean(), losses[-15:].mean())
    prior = prior_from_checkpoint(out, expect_modality="CT")
    assert isinstance(prior.denoiser, EDMDenoiser)
    # at a moderate noise level the trained denoiser beats returning the noisy input
    x0 = torch.from_numpy(toy_discs(16, 16, seed=9))
    g = torch.Generator().manual_seed(0)
    x = x0 + 0.5 * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        d = prior.denoiser(x, 0.5)
    assert ((d - x0) ** 2).mean() < 0.65 * ((x - x0) ** 2).mean()


def test_the_loop_takes_any_task_and_keeps_finish_entries_out_of_the_resume_file(discs, tmp_path):
    """run_training serves every network (diffusion UNets, the autoencoder): a 3x3 convolution learning the
    identity trains, ``finish`` gets the EMA network once and its entries go to the checkpoint's train_config
    only (a resumed run must not inherit them), and a non-finite loss stops the run naming the task."""
    calls = []

    def finish(ema, device):
        calls.append((ema, device))
        return {"extra": float(ema.weight.detach().sum())}

    def task(loss):
        return TrainingTask(name="identity conv", build=lambda: torch.nn.Conv2d(1, 1, 3, padding=1), loss=loss,
                            checkpoint={"kind": "slice", "objective": "epsilon",
                                        "network": {"builder": "conv", "spec": {}}, "schedule": None,
                                        "sigma_data": None}, finish=finish)

    c = resolve_train_config(cfg(steps=40, checkpoint_every=20, lr=1e-2, warmup_steps=0))
    res = run_training(task(lambda net, b, g: torch.mean((net(b["x"]) - b["x"]) ** 2)), c, discs,
                       tmp_path / "conv.pt", modality="CT", normalisation=CT)
    assert np.mean(res.losses[-5:]) < 0.2 * np.mean(res.losses[:5])
    saved = torch.load(tmp_path / "conv.pt", weights_only=True)
    assert len(calls) == 1 and calls[0][1].type == "cpu"
    assert torch.equal(saved["ema_weights"]["weight"], calls[0][0].weight.detach())
    assert saved["train_config"]["extra"] == pytest.approx(float(saved["ema_weights"]["weight"].sum()))
    assert "extra" not in load_resume(resume_path(tmp_path / "conv.pt"))["train_config"]
    with pytest.raises(ConfigError, match="identity conv training loss became nan at step 1"):
        run_training(task(lambda net, b, g: net(b["x"]).sum() * float("nan")), c, discs, tmp_path / "nan.pt",
                     modality="CT", normalisation=CT)


@pytest.mark.slow
def test_brief_resume_100_of_200_at_32px(tmp_path):
    """The full-size version: (16, 32) channels, 32x32 discs, kill at 100 of 200, resume, compare."""
    net = {"channels": [16, 32], "num_res_blocks": 1, "attention_levels": [False, False],
           "attention_max_resolution": 16, "num_head_channels": 16, "norm_num_groups": 8}
    ds = ArrayDataset(toy_discs(128, 32, seed=1))
    c = cfg(image_size=32, network=net, steps=200, checkpoint_every=50)
    full = train(c, ds, tmp_path / "a.pt", modality="CT", normalisation=CT)
    train(c, ds, tmp_path / "b.pt", modality="CT", normalisation=CT, stop_at=100)
    resumed = train(c, ds, tmp_path / "b.pt", modality="CT", normalisation=CT)
    assert resumed.start_step == 100 and len(read_loss_log(loss_log_path(tmp_path / "b.pt"))) == 200
    assert np.mean(full.losses[-20:]) < 0.5 * np.mean(full.losses[:20])
    (w, e), (wf, ef) = _weights(tmp_path / "b.pt"), _weights(tmp_path / "a.pt")
    assert all(torch.equal(w[k], wf[k]) and torch.equal(e[k], ef[k]) for k in wf)


@pytest.mark.gpu
def test_cuda_training_with_bf16_autocast(discs, tmp_path):
    res = train(cfg(steps=20, device="cuda", amp=True), discs, tmp_path / "g.pt", modality="CT", normalisation=CT)
    assert np.isfinite(res.losses).all() and np.mean(res.losses[-5:]) < np.mean(res.losses[:5])


# ---------------------------------------------------------------------------------------------- config, sampler


def test_config_errors_and_device():
    with pytest.raises(ConfigError, match="unknown training option"):
        resolve_train_config({"stepz": 10})
    with pytest.raises(ConfigError, match="loss must be"):
        resolve_train_config({"loss": "v"})
    with pytest.raises(ConfigError, match="kind must be one of"):
        resolve_train_config({"kind": "slices"})
    assert resolve_train_config({})["ema_decay"] == 0.999
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match="no CUDA"):
            pick_device("cuda")
        assert pick_device("auto").type == "cpu"


def test_step_batches_cover_each_epoch_and_are_pure_functions_of_the_step():
    whole = list(StepBatchSampler(10, 4, seed=1, start=0, stop=5))
    tail = list(StepBatchSampler(10, 4, seed=1, start=3, stop=5))
    assert whole[3:] == tail
    idx = [i for b in whole for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert idx[:10] != idx[10:20]   # a new permutation each epoch
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0] and f(20) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- normalisation


def test_ct_window_is_an_exact_affine_map_and_clips_only_when_asked():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    y = to_network(hu, CT)
    assert np.allclose(y, [-2, -1, 0, 0.5, 1, 3])
    assert np.allclose(from_network(y, CT), hu)
    assert np.allclose(to_network(hu, CT, clip=True), [-1, -1, 0, 0.5, 1, 1])
    soft = validate_normalisation({"kind": "ct_window", "hu_min": -160, "hu_max": 240, "range": [0, 1]}, "CT")
    assert np.allclose(to_network(np.array([-160.0, 40.0, 240.0]), soft), [0, 0.5, 1])
    # the Prior map for attenuation images agrees with HU -> network
    mu_w = 0.0192
    scale, offset = prior_affine(soft, "attenuation", mu_w)
    mu = np.array([0.0, mu_w, 1.5 * mu_w])
    assert np.allclose(scale * mu + offset, to_network(1000 * (mu - mu_w) / mu_w, soft))
    with pytest.raises(ConfigError, match="for MR"):
        validate_normalisation(CT, "MR")
    with pytest.raises(ConfigError, match="mu_water"):
        prior_affine(CT, "attenuation")


def _volume(path, data, modality):
    return Volume.from_array(path, data.astype(np.float32), Geometry(), meta={"modality": modality})


def test_mr_percentile_normalisation_dataset_and_volume_scope(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (4, 12, 12))
    b = rng.uniform(0, 300, (4, 12, 12))
    src = VolumeSlices([_volume(tmp_path / "a.zarr", a, "MR"), _volume(tmp_path / "b.zarr", b, "MR")], "MR")
    n, per = fit_normalisation({"kind": "mr_percentile", "percentile": 99.0}, src)
    assert per is None
    assert n["value"] == pytest.approx(np.percentile(np.concatenate([a.ravel(), b.ravel()]), 99.0), rel=1e-5)
    nv, per = fit_normalisation({"kind": "mr_percentile", "percentile": 99.0, "scope": "volume"}, src)
    assert per == pytest.approx([np.percentile(a, 99.0), np.percentile(b, 99.0)], rel=1e-5)
    ds = SliceDataset(src, nv, image_size=12, flips=(), volume_values=per)
    assert np.allclose(ds.image(5), b[1] / per[1], atol=1e-6)   # item 5 = volume b, slice 1
    ds2 = SliceDataset(src, n, image_size=12, channels=2, flips=(), random_phase=True)
    item = ds2[(0, 7)]["x"].numpy()
    assert item.shape == (2, 12, 12)
    assert np.allclose(np.hypot(item[0], item[1]), a[0] / n["value"], atol=1e-6)   # phase changes, not |x|
    assert prior_affine(n) == (pytest.approx(1 / n["value"]), 0.0)
    # "smooth": the measure step's phase family (a degree-2 polynomial map, |phi| <= pi/2), not one constant
    ds3 = SliceDataset(src, n, image_size=12, channels=2, flips=(), random_phase="smooth")
    item = ds3[(0, 7)]["x"].numpy()
    assert np.allclose(np.hypot(item[0], item[1]), a[0] / n["value"], atol=1e-6)
    phi = np.arctan2(item[1], item[0])
    assert np.abs(phi).max() <= np.pi / 2 + 1e-5 and np.ptp(phi) > 0.05
    other = ds3[(0, 8)]["x"].numpy()                    # another draw (seed) gives another map
    assert not np.allclose(np.arctan2(other[1], other[0]), phi)
    with pytest.raises(ConfigError, match="random_phase"):
        SliceDataset(src, n, image_size=12, channels=2, random_phase="wobbly")


def test_training_phase_smooth_is_the_measure_steps_family():
    from medrecon.diffusion.datasets import phase_mode, training_phase
    from medrecon.physics.mri_phase import smooth_phase

    assert [phase_mode(v) for v in (False, True, "smooth", None)] == ["none", "constant", "smooth", "none"]
    seed = int(np.random.default_rng(3).integers(0, 2**31 - 1))
    assert np.array_equal(training_phase((9, 11), np.random.default_rng(3), "smooth"), smooth_phase((9, 11), seed))
    assert training_phase((9, 11), np.random.default_rng(3), "none") == 0.0


def test_slice_dataset_pads_resizes_and_flips_deterministically(tmp_path):
    data = np.full((3, 8, 16), 1000.0)
    data[:, :, :8] = 0.0    # left half water (0 in the window), right half +1000 HU (1.0)
    src = VolumeSlices([_volume(tmp_path / "v.zarr", data, "CT")], "CT")
    ds = SliceDataset(src, CT, image_size=8, flips=("x",))
    img = ds.image(1)
    assert img.shape == (8, 8)
    # 8x16 padded with air (-1) to 16x16, then 2x2 area averaging to 8x8
    assert np.allclose(img[:2], -1.0) and np.allclose(img[6:], -1.0)
    assert np.allclose(img[2:6, :4], 0.0) and np.allclose(img[2:6, 4:], 1.0)
    items = {ds[(1, s)]["x"][0, 3, 0].item() for s in range(20)}
    assert items == {0.0, 1.0}   # flipped for some seeds, not for others
    assert torch.equal(ds[(1, 11)]["x"], ds[(1, 11)]["x"])
    assert np.allclose(fit_square(data[0], 4, "crop", -1.0)[:, :2], 0.0)


def test_lazy_slab_cache_stays_within_its_budget(tmp_path):
    data = np.arange(12 * 4 * 4, dtype=np.float32).reshape(12, 4, 4)
    vol = Volume.from_array(tmp_path / "v.zarr", data, Geometry(), meta={"modality": "CT"}, chunk_depth=2)
    src = VolumeSlices([vol], "CT", cache_bytes=3 * 2 * 4 * 4 * 4)   # three 2-slice slabs
    assert not src.preloaded
    for z in [0, 5, 11, 3, 0, 7, 9, 1]:
        assert np.array_equal(src.read(0, z), data[z])
        assert src._lru_bytes <= src.cache_bytes
    assert len(src._lru) == 3
    assert VolumeSlices([vol], "CT").preloaded


# ---------------------------------------------------------------------------------------------- from volumes


def test_train_prior_from_volumes_records_data_and_normalisation(tmp_path):
    rng = np.random.default_rng(1)
    vols = []
    for i in range(2):
        hu = np.full((4, 20, 24), -1000.0)
        hu[:, 5:15, 6:18] = rng.uniform(-100, 200)
        vols.append(_volume(tmp_path / f"ct{i}.zarr", hu, "CT").path)
    out = tmp_path / "priors" / "ct_slice.pt"
    path = train_prior(cfg(steps=4, checkpoint_every=2), vols, out)
    assert path == out and out.is_file()
    lp = load_checkpoint(out, expect_modality="CT", expect_kind="slice", expect_normalisation=CT)
    assert [d["path"] for d in lp.data] == [str(v) for v in vols]
    assert [d["sha256"] for d in lp.data] == [store_sha256(v) for v in vols]
    assert lp.step == 4 and lp.spec["image_size"] == 16 and lp.train_config["steps"] == 4
    with pytest.raises(InputError, match=r"mr\.zarr") as err:
        train_prior(cfg(steps=2), [vols[0], _volume(tmp_path / "mr.zarr", np.ones((2, 8, 8)), "MR").path],
                    tmp_path / "x.pt")
    assert "modality 'MR', expected 'CT'" in str(err.value)


def test_ema_only_checkpoint_is_smaller_and_loads_its_ema_weights(tmp_path):
    """save_raw: false (shipped demo priors) keeps only the EMA weights: the same EMA network, half the bytes."""
    hu = np.full((4, 20, 24), -1000.0)
    hu[:, 5:15, 6:18] = 50.0
    vol = _volume(tmp_path / "ct.zarr", hu, "CT").path
    full = train_prior(cfg(steps=3), [vol], tmp_path / "full.pt")
    slim = train_prior(cfg(steps=3, save_raw=False), [vol], tmp_path / "slim.pt")
    assert slim.stat().st_size < 0.6 * full.stat().st_size
    a, b = load_checkpoint(full), load_checkpoint(slim)
    for (ka, va), (kb, vb) in zip(a.network.state_dict().items(), b.network.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(InputError, match="only the EMA weights"):
        load_checkpoint(slim, ema=False)


def test_half_precision_export_halves_the_file_and_keeps_the_denoiser(tmp_path):
    from medrecon.diffusion.checkpoint import export_checkpoint

    vol = _volume(tmp_path / "v.zarr", np.random.default_rng(0).uniform(-1000, 500, (4, 16, 16)), "CT")
    full = train_prior(cfg(steps=3, save_raw=False), [vol.path], tmp_path / "f.pt")
    h = export_checkpoint(full, tmp_path / "h.pt")
    a, b = load_checkpoint(full), load_checkpoint(tmp_path / "h.pt")
    assert b.hash == h != a.hash and b.provenance["exported"] == {"from_hash": a.hash, "weights_dtype": "float16"}
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * full.stat().st_size
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        ya, yb = a.network(x, t), b.network(x, t)
    assert next(b.network.parameters()).dtype == torch.float32
    assert float((ya - yb).abs().max()) <= 1e-3 * float(ya.abs().max()) + 1e-6
