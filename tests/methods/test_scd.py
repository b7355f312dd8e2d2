"""SCD (self-supervised LoRA adaptation of a whole-slice prior to one measurement): the LoRA wrapper, the
adaptation on a deliberately wrong prior with an exact answer, CT/MR end to end on odd sizes, determinism, and
that adapted weights are an output of the run that never leaks into another subject."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medrecon.methods  # noqa: F401  (registers every sampler)
from medrecon.diffusion.adapt import LoRA, adapt_denoiser, adaptation_loss, cg_prox, inject_lora
from medrecon.diffusion.analytic import DenseOperator
from medrecon.diffusion.denoiser import EpsilonDenoiser, Prior
from medrecon.diffusion.schedules import VPSchedule
from medrecon.errors import ConfigError
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.mri import Sense2D
from medrecon.physics.mri_sampling import cartesian_mask_1d
from medrecon.recon.registry import METHODS, ReconProblem
from tests.methods.test_anysize import _net, _save_tiny, _spec, ct_problem, slice_prior

torch.set_num_threads(1)
FAST = {"steps": 4, "adapt_iters": 2, "skip": 2, "lr": 1e-3}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_with_zero_up_weights_is_exactly_the_base_network_and_only_lora_trains():
    net = _net(_spec("slice", attention_levels=[False, False, True]))
    x, t = torch.randn(2, 1, 16, 16, generator=_gen()), torch.tensor([10, 500])
    base_out = net(x, t)
    adapted, loras = inject_lora(net, 4, _gen())
    kinds = {type(lo.base) for lo in loras}
    assert nn.Conv2d in kinds and nn.Linear in kinds      # convolutions and the attention projections
    assert not any(isinstance(m, LoRA) for m in net.modules())   # the base network is untouched
    assert torch.equal(adapted(x, t), base_out)
    adapted(x, t).pow(2).mean().backward()
    trained = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith(("down.weight", "up.weight")) for n in trained)
    assert all(p.grad is None for p in net.parameters())
    assert not any("time_embed" in n for n in trained)
    # with a non-zero up the output moves, and scale 0 switches the adapter off again
    with torch.no_grad():
        for lo in loras:
            lo.up.weight.normal_(0, 0.1, generator=_gen(1))
    assert not torch.allclose(adapted(x, t), base_out)
    for lo in loras:
        lo.scale = 0.0
    assert torch.equal(adapted(x, t), base_out)


def test_a_denoiser_without_a_network_is_one_clear_error():
    with pytest.raises(ConfigError, match="torch network"):
        adapt_denoiser(lambda x, s, c=None: x, 4)


def test_cg_prox_solves_the_regularised_system_and_is_differentiable():
    g = _gen(3)
    op = DenseOperator(torch.randn(10, 16, generator=g), (4, 4))
    x0 = torch.randn(2, 4, 4, generator=g, requires_grad=True)
    y = torch.randn(10, generator=g)
    aty = op.adjoint(y)
    u = cg_prox(op, x0, aty, 0.3, 16, 1)
    m = op.m.double()
    exact = torch.linalg.solve(torch.eye(16, dtype=torch.float64) + 0.3 * m.T @ m,
                               (x0.detach().double().reshape(2, 16) + 0.3 * aty.double().reshape(16)).T).T
    assert torch.allclose(u.detach().double().reshape(2, 16), exact, atol=1e-4)
    u.sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


# ------------------------------------------------------------------------------------- deliberately wrong prior


class GaussianEpsNet(nn.Module):
    """Exact eps-network of the prior N(mu, s^2 I) on 8x8 images; mu_train = 0 is a layer's output, so LoRA on it
    is a learnable mean shift delta (the analytic stand-in of algorithms-wave2 5.4). ``free``: mu = Linear(1, 64)
    of a constant 1 (delta = up @ down, any image); otherwise mu = a 1x1 convolution of the all-ones image (delta
    = one level shared by every pixel: a small set of shared weights, which is what lets the measured rows
    inform the unmeasured ones)."""

    def __init__(self, schedule: VPSchedule, s: float, free: bool) -> None:
        super().__init__()
        self.free = free
        self.mean = nn.Linear(1, 64, bias=False) if free else nn.Conv2d(1, 1, 1, bias=False)
        nn.init.zeros_(self.mean.weight)            # mu_train = 0
        self.schedule, self.s2 = schedule, s * s

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.schedule.alpha_bar(t).to(x_t.dtype).reshape(-1, 1, 1, 1)
        sig2 = (1 - ab) / ab
        one = torch.ones(1, 1, dtype=x_t.dtype) if self.free else torch.ones(1, 1, 8, 8, dtype=x_t.dtype)
        mu = self.mean(one).reshape(1, 1, 8, 8)
        return sig2.sqrt() * (x_t / ab.sqrt() - mu) / (self.s2 + sig2)


def _ood_problem(free: bool, mu_test: torch.Tensor) -> tuple[ReconProblem, Prior, torch.Tensor, torch.Tensor]:
    """Prior N(0, 0.1^2 I); truth = mu_test + N(0, 0.1^2 I); noiseless y = A x with A (24, 64) Gaussian / 8."""
    g = _gen(7)
    sched = VPSchedule()
    prior = Prior(EpsilonDenoiser(GaussianEpsNet(sched, 0.1, free), sched), meta={"kind": "slice"})
    truth = mu_test + 0.1 * torch.randn(8, 8, generator=g)
    op = DenseOperator(torch.randn(24, 64, generator=g) / 8, (8, 8))
    return ReconProblem(y=op.forward(truth), operator=op, modality="CT", image_shape=(8, 8)), prior, truth, op.m


OOD = {"steps": 20, "skip": 2, "adapt_iters": 10, "lr": 0.05, "rank": 1, "gamma": 0.5, "tv": 0.0}


def _rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - truth) / torch.linalg.vector_norm(truth))


def test_a_free_mean_shift_learns_the_row_space_of_the_truth():
    """The loss's gradient in delta lies in the row space (y says nothing about the null space), and the row-space
    part of the adapted shift points along the truth's. Adam's per-coordinate step sizes (the reference's
    optimiser) do move the null-space part too: measured |null| 0.78 against |row| 0.98, asserted so a change
    shows (algorithms-wave2 5.4 expects "nearly unchanged", which holds for plain gradient steps only)."""
    square = torch.nn.functional.pad(torch.ones(4, 4), (2, 2, 2, 2))
    prob, prior, truth, m = _ood_problem(True, square)
    res = METHODS["scd"](prob, OOD, prior, _gen())
    losses = res.info["adaptation_losses"][0]
    sd = res.info["artifacts"]["adapted"]["passes"][0]
    delta = (sd["mean.up"] @ sd["mean.down"]).reshape(64).double()
    _, _, vh = torch.linalg.svd(m.double())        # its first 24 rows span the row space
    vr = vh[:24]
    row, null = vr.T @ (vr @ delta), delta - vr.T @ (vr @ delta)
    target = vr @ truth.double().reshape(64)
    cos = float(torch.dot(vr @ delta, target) / (torch.linalg.vector_norm(vr @ delta) * target.norm()))
    print(f"loss {losses[0]:.4g} -> {losses[-1]:.4g}; |row delta| {float(row.norm()):.4f} "
          f"|null delta| {float(null.norm()):.2e}; cos(V_r delta, V_r x) {cos:.3f}")
    assert losses[-1] < 0.01 * losses[0]
    assert float(row.norm()) == pytest.approx(0.9765, abs=0.02) and float(null.norm()) == pytest.approx(0.778, abs=0.02)
    assert cos > 0.97
    x0 = torch.randn(1, 8, 8, generator=_gen(2), requires_grad=True)     # the loss gradient: row space exactly
    u = cg_prox(prob.operator, x0, prob.operator.adjoint(prob.y), 0.3, 3, 1)
    (g,) = torch.autograd.grad(adaptation_loss(prob.operator, prob.y, u, 0.0, 1.0), x0)
    g = g.double().reshape(64)
    assert float((g - vr.T @ (vr @ g)).norm()) < 1e-5 * float(g.norm())


def test_adaptation_of_a_wrong_prior_lowers_the_reconstruction_error():
    """Prior mean 0, truth around 1 everywhere: the naive chain fills the 40 unmeasured directions with the prior's
    0; one adapted level, learnt from the measured rows, fills them with about 1."""
    prob, prior, truth, _ = _ood_problem(False, torch.ones(8, 8))
    naive = METHODS["scd"](prob, {**OOD, "adapt_iters": 0}, prior, _gen())
    res = METHODS["scd"](prob, OOD, prior, _gen())
    level = float(res.info["artifacts"]["adapted"]["passes"][0]["mean.up"].reshape(-1)
                  @ res.info["artifacts"]["adapted"]["passes"][0]["mean.down"].reshape(-1))
    err = [_rel(naive.samples[0], truth), _rel(res.samples[0], truth)]
    losses = res.info["adaptation_losses"][0]
    print(f"rel err naive {err[0]:.4f} adapted {err[1]:.4f}; level {level:.4f}; loss {losses[0]:.4g} -> "
          f"{losses[-1]:.4g}")
    # measured: rel err 0.913 -> 0.159 with the adapted prior mean at 0.385 (the CG steps of the chain supply the
    # rest once the unmeasured directions start from a non-zero level)
    assert level == pytest.approx(0.3848, abs=0.02)
    assert err[0] == pytest.approx(0.9128, abs=0.01) and err[1] == pytest.approx(0.1585, abs=0.02)
    assert losses[-1] < 0.05 * losses[0]


def test_zero_learning_rate_is_the_unadapted_chain():
    """algorithms-wave2 5.4 (1): with lr = 0 the adapted network stays the base one (LoRA up = 0), so the chain
    is bit-identical to running without adaptation."""
    prob = ct_problem(21, 23, 1)
    a = METHODS["scd"](prob, {**FAST, "lr": 0.0}, slice_prior(), _gen())
    b = METHODS["scd"](prob, {**FAST, "adapt_iters": 0}, slice_prior(), _gen())
    assert a.info["adaptation_passes"] == 4 * 2 and b.info["adaptation_passes"] == 0
    assert torch.equal(a.samples, b.samples)


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("size", [(21, 23), (16, 16)])
def test_scd_on_small_parallel_beam_ct(size):
    prob = ct_problem(*size, 2)
    calls = []
    prob.progress = calls.append
    res = METHODS["scd"](prob, FAST, slice_prior(), _gen())
    assert res.samples.shape == (1, 2, *size) and torch.isfinite(res.samples).all()
    # NFE: base + adapted per step; every one of the 4 steps is among the 4 smallest t, so all adapt (2 iters)
    assert res.nfe == 8 and len(calls) == 4 and res.info["adaptation_passes"] == 4 * 2
    assert res.info["lora_parameters"] > 0
    losses = res.info["adaptation_losses"][0]
    assert len(losses) == 8 and all(np.isfinite(losses))
    six = METHODS["scd"](prob, {**FAST, "steps": 6}, slice_prior(), _gen())
    assert res.info["adapted_steps"] != six.info["adapted_steps"] and six.info["adaptation_passes"] == 5 * 2


def test_scd_on_multicoil_mri_of_an_odd_size():
    h, w = 21, 23
    op = Sense2D(birdcage_coils(4, (h, w)), cartesian_mask_1d((h, w), 2.0, acs_lines=4, seed=0))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mag = torch.from_numpy((((yy - 10) / 7.0) ** 2 + ((xx - 11) / 8.0) ** 2 < 1).astype(np.float32))
    x = mag.to(torch.complex64)[None]
    prob = ReconProblem(y=op.forward(x), operator=op, modality="MR", image_shape=(1, h, w))
    mr = {"kind": "mr_percentile", "percentile": 99.5, "value": 1.0, "scope": "dataset"}
    prior = Prior(EpsilonDenoiser(_net(_spec("slice", in_channels=2, out_channels=2)), VPSchedule()), channels=2,
                  meta={"kind": "slice", "normalisation": mr})
    # the untrained network's estimates are ~40x the image; a strong CG solve makes the last correction fit y
    res = METHODS["scd"](prob, {**FAST, "output": "cg", "gamma": 100.0, "cg_iter": 10}, prior, _gen())
    assert res.samples.shape == (1, 1, h, w) and res.samples.is_complex() and torch.isfinite(res.samples).all()
    fit = float(torch.linalg.vector_norm(prob.y - op.forward(res.samples[0])))
    print(f"MR residual: {fit:.4g}, |y| {float(torch.linalg.vector_norm(prob.y)):.4g}")
    assert fit < 0.3 * float(torch.linalg.vector_norm(prob.y))     # measured 3.28 of 12.7


def test_bad_parameters_are_one_clear_error():
    prob = ct_problem(16, 16, 1)
    for bad in ({"output": "u"}, {"rank": 0}, {"skip": 0}, {"eta": 2.0}, {"lora": 1}):
        with pytest.raises(ConfigError):
            METHODS["scd"](prob, bad, slice_prior(), _gen())


# ----------------------------------------------------------------------------------- determinism, no leakage


def test_same_seed_same_numbers_and_same_adapted_weights():
    prob = ct_problem(16, 16, 1)
    a = METHODS["scd"](prob, FAST, slice_prior(), _gen(5))
    b = METHODS["scd"](prob, FAST, slice_prior(), _gen(5))
    assert torch.equal(a.samples, b.samples)
    sa, sb = a.info["artifacts"]["adapted"]["passes"][0], b.info["artifacts"]["adapted"]["passes"][0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_adapting_on_subject_a_leaves_subject_b_exactly_its_own_result():
    prior = slice_prior()
    before = {k: v.clone() for k, v in prior.denoiser.net.state_dict().items()}
    prob_a, prob_b = ct_problem(16, 16, 1), ct_problem(21, 23, 1)
    prob_a.y.mul_(1.5)      # another subject: a denser object
    METHODS["scd"](prob_a, FAST, prior, _gen())
    after_a = METHODS["scd"](prob_b, FAST, prior, _gen())
    alone = METHODS["scd"](prob_b, FAST, slice_prior(), _gen())
    assert torch.equal(after_a.samples, alone.samples)
    assert all(torch.equal(v, prior.denoiser.net.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(mod, LoRA) for mod in prior.denoiser.net.modules())


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_reconstruct_step_writes_the_adapted_weights_and_records_them_per_subject(tmp_path):
    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure
    from medrecon.reconstruct import reconstruct

    cfg_m = cfgmod.validate({"measure": {"ct": {"views": 8, "I0": 1e5}}})
    meas = {}
    for name, seed in (("a", 0), ("b", 1)):
        vol = write_phantom_volume("ct_chest", tmp_path / f"{name}.zarr", (1, 20, 22), (4.0, 3.0, 3.0), seed)
        meas[name] = measure(vol, tmp_path / f"m_{name}.zarr", cfg_m)
    ckpt = _save_tiny(tmp_path / "p.pt", "slice", _spec("slice"))
    cfg = cfgmod.validate({"reconstruct": {"params": {"scd": FAST}}})
    alone = reconstruct(meas["b"], tmp_path / "alone" / "r_b.zarr", "scd", cfg, prior_path=ckpt)
    out_a = reconstruct(meas["a"], tmp_path / "r_a.zarr", "scd", cfg, prior_path=ckpt)
    out_b = reconstruct(meas["b"], tmp_path / "r_b.zarr", "scd", cfg, prior_path=ckpt)
    assert np.array_equal(out_b.read(), alone.read())
    recs = {k: v.meta["info"]["artifacts"]["adapted"] for k, v in (("a", out_a), ("b", out_b))}
    for k, rec in recs.items():
        assert rec["path"] == str(tmp_path / f"r_{k}.zarr.adapted.pt")
        assert rec["sha256"] == _sha(rec["path"])
        saved = torch.load(rec["path"], weights_only=True)
        assert saved["method"] == "scd" and saved["passes"][0] and saved["base_prior"].endswith("p.pt")
    assert recs["a"]["measurement_sha256"] != recs["b"]["measurement_sha256"]
    assert recs["a"]["sha256"] != recs["b"]["sha256"]
    assert _sha(alone.meta["info"]["artifacts"]["adapted"]["path"]) == recs["b"]["sha256"]


def test_slab_wise_runs_write_one_adapted_file_per_slab(tmp_path):
    """Each slab is its own measurement (its own rows of y): its own adapted weights, file and digests."""
    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure
    from medrecon.reconstruct import reconstruct

    vol = write_phantom_volume("ct_chest", tmp_path / "v.zarr", (4, 16, 18), (4.0, 3.0, 3.0), 0)
    meas = measure(vol, tmp_path / "m.zarr", cfgmod.validate({"measure": {"ct": {"views": 8, "I0": 1e5}}}))
    ckpt = _save_tiny(tmp_path / "p.pt", "slice", _spec("slice"))
    cfg = cfgmod.validate({"reconstruct": {"slab": {"size": 2, "halo": 0}, "params": {"scd": FAST}}})
    out = reconstruct(meas, tmp_path / "r.zarr", "scd", cfg, prior_path=ckpt)
    recs = [s["artifacts"]["adapted"] for s in out.meta["info"]["slabs"]]
    assert [r["path"] for r in recs] == [str(tmp_path / f"r.zarr.adapted.slab{i}.pt") for i in range(2)]
    assert all(r["sha256"] == _sha(r["path"]) for r in recs)
    assert recs[0]["measurement_sha256"] != recs[1]["measurement_sha256"]


def test_each_sample_pass_records_its_own_adaptation():
    """Passes of a multi-sample run (2 samples, 1 per pass) each adapt a fresh LoRA and each is in the artifact."""
    prob = ct_problem(16, 16, 1)
    res = METHODS["scd"](prob, {**FAST, "samples": 2, "sample_batch": 1}, slice_prior(), _gen())
    assert res.samples.shape == (2, 1, 16, 16) and len(res.info["artifacts"]["adapted"]["passes"]) == 2
    first, second = res.info["adaptation_losses"]
    assert len(first) == len(second) == 8 and not torch.equal(res.samples[0], res.samples[1])
    a, b = res.info["artifacts"]["adapted"]["passes"]
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
