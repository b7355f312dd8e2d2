"""Sampler progress: every diffusion method calls ``problem.progress`` once per step (k-diffusion's callback),
the logging callback throttles its lines, and a reconstruct job's log shows the steps."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from medrecon.recon.progress import StepReporter, logging_progress, relative_residual
from medrecon.recon.registry import METHODS, load_all
from tests.methods.test_anysize import PARAMS, PRIORS, ct_problem

H, W = 16, 20


def _steps(method: str) -> int:
    return int(PARAMS[method].get("steps", PARAMS[method].get("iterations")))     # optimisers: iterations


def test_every_diffusion_method_is_covered():
    # fbp_unet's "supervised" network is one pass per slice, not an iterative sampler
    diffusion = {name for name, spec in load_all().items() if spec.prior not in (None, "supervised")}
    assert diffusion == set(PRIORS)


@pytest.mark.parametrize("method", list(PRIORS))
def test_every_sampler_calls_the_callback_once_per_step(method):
    calls: list[dict] = []
    prob = dataclasses.replace(ct_problem(H, W), progress=calls.append)
    res = METHODS[method](prob, PARAMS[method], PRIORS[method](), torch.Generator().manual_seed(0))
    k = _steps(method)
    assert [c["i"] for c in calls] == list(range(k))
    assert all(c["n"] == k for c in calls) and calls[-1]["i"] == k - 1
    elapsed = [c["elapsed_s"] for c in calls]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    for c in calls:
        assert c["x0"].shape == res.samples.shape and not c["x0"].requires_grad
        assert ("t" in c) or ("sigma" in c)
    # the estimate of the last step is the last one reported; its residual is finite
    assert relative_residual(prob.operator, calls[-1]["x0"], prob.y) < float("inf")


def test_sample_passes_number_steps_across_passes():
    calls: list[dict] = []
    prob = dataclasses.replace(ct_problem(H, W, 1), progress=calls.append)
    METHODS["dds"](prob, {"steps": 3, "samples": 2, "sample_batch": 1}, PRIORS["dds"](),
                   torch.Generator().manual_seed(0))
    assert [c["i"] for c in calls] == list(range(6)) and {c["n"] for c in calls} == {6}
    assert [c["pass"] for c in calls] == [0, 0, 0, 1, 1, 1] and calls[0]["passes"] == 2


def test_a_sampler_without_callback_gives_the_same_samples():
    prob = ct_problem(H, W, 1)
    a = METHODS["dds"](prob, {"steps": 3}, PRIORS["dds"](), torch.Generator().manual_seed(0)).samples
    b = METHODS["dds"](dataclasses.replace(prob, progress=lambda info: None), {"steps": 3}, PRIORS["dds"](),
                       torch.Generator().manual_seed(0)).samples
    assert torch.equal(a, b)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.progress"]


def test_logging_callback_logs_first_every_tenth_and_last(caplog):
    logger = logging.getLogger("test.progress")
    clock = FakeClock()
    cb = logging_progress(logger, "dds slab 1/2", clock=clock)
    caplog.set_level(logging.INFO, logger="test.progress")
    rep = StepReporter(cb, 50)
    for _ in range(50):
        clock.now += 1.0
        rep(torch.zeros(1, 2))
    lines = _lines(caplog)
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert lines[0].startswith("dds slab 1/2 step 1/50, elapsed") and "residual" not in lines[0]
    assert "ETA" in lines[1] and "ETA" not in lines[-1]


def test_logging_callback_logs_at_least_every_interval(caplog):
    logger = logging.getLogger("test.progress")
    clock = FakeClock()
    cb = logging_progress(logger, "m", clock=clock, every=1000, min_interval_s=30.0)
    caplog.set_level(logging.INFO, logger="test.progress")
    for i in range(10):
        clock.now += 20.0
        cb({"i": i, "n": 10, "elapsed_s": clock.now})
    steps = [int(line.split("step ")[1].split("/")[0]) for line in _lines(caplog)]
    assert steps == [1, 3, 5, 7, 9, 10]        # 40 s apart, and the first and last


def test_residual_only_on_logged_steps(caplog):
    prob = ct_problem(H, W, 1)
    forwards = []

    class Counting:
        def __init__(self, op):
            self.op, self.in_dtype, self.out_dtype = op, op.in_dtype, op.out_dtype

        def forward(self, x):
            forwards.append(1)
            return self.op.forward(x)

    cb = logging_progress(logging.getLogger("test.progress"), "m", Counting(prob.operator), prob.y, every=5,
                          clock=FakeClock())
    caplog.set_level(logging.INFO, logger="test.progress")
    truth = torch.zeros(1, *prob.image_shape)
    for i in range(20):
        cb({"i": i, "n": 20, "elapsed_s": float(i), "x0": truth})
    lines = _lines(caplog)
    assert len(lines) == len(forwards) == 5                     # steps 1, 5, 10, 15, 20
    assert all(line.endswith("residual 1") for line in lines)   # the empty image misses all of y


def test_reconstruct_job_log_shows_sampler_steps(tmp_path, caplog):
    from medrecon import config as cfgmod
    from medrecon.io.phantoms import write_phantom_volume
    from medrecon.measure import measure
    from medrecon.reconstruct import reconstruct
    from tests.methods.test_anysize import _save_tiny, _spec

    vol = write_phantom_volume("ct_chest", tmp_path / "ct.zarr", (2, 32, 32), (4.0, 3.0, 3.0), 0)
    meas = measure(vol, tmp_path / "m.zarr", cfgmod.validate({"measure": {"ct": {"views": 16, "I0": 1e5}}}))
    ckpt = _save_tiny(tmp_path / "p.pt", "slice", _spec("slice"))
    cfg = cfgmod.validate({"reconstruct": {"params": {"dds": {"steps": 4}}}})
    caplog.set_level(logging.INFO, logger="medrecon")
    reconstruct(meas, tmp_path / "r.zarr", "dds", cfg, prior_path=ckpt)
    lines = [r.getMessage() for r in caplog.records if r.name == "medrecon.reconstruct"]
    steps = [line for line in lines if " step " in line]
    assert [s.split(",")[0] for s in steps] == [f"dds slab 1/1 step {k}/4" for k in (1, 2, 3, 4)]
    assert all("elapsed" in s and "residual" in s for s in steps)


@pytest.mark.parametrize("method, params", [("cgls", {"n_iter": 5, "tol": 0.0}), ("sirt", {"n_iter": 6}),
                                            ("tv", {"n_iter": 7})])
def test_classical_iterative_methods_report_their_iterations(method, params):
    calls: list[dict] = []
    prob = dataclasses.replace(ct_problem(H, W), progress=calls.append)
    res = METHODS[method](prob, params, None, None)
    k = params["n_iter"]
    assert [c["i"] for c in calls] == list(range(k)) and {c["n"] for c in calls} == {k}
    assert calls[-1]["x0"].shape == res.samples.shape
    torch.testing.assert_close(calls[-1]["x0"], res.samples)      # the last iterate is the result
    assert not torch.equal(calls[0]["x0"], calls[-1]["x0"])        # each step's own estimate, not a view
    if method in ("cgls", "sirt"):         # the residual they compute anyway
        hist = res.info["history"]["rel_residual"]
        assert [c["residual"] for c in calls] == pytest.approx(hist[1:] if method == "cgls" else hist[:-1])
