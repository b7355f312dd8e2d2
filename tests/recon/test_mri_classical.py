"""Classical MR methods on the real SENSE / NUFFT operators and the MR brain phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medrecon.errors import ConfigError
from medrecon.io.phantoms import mr_brain_phantom
from medrecon.physics.coils import birdcage_coils
from medrecon.physics.ct import ct_operator
from medrecon.physics.ct_geometry import CTGeometry, sparse_view_angles
from medrecon.physics.mri import Sense2D, Sense3D, mri_operator_from_config, simulate_kspace
from medrecon.recon.mri_classical import zero_filled_image
from medrecon.recon.registry import METHODS, ReconProblem

SHAPE = (3, 64, 64)



@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    vol, _ = mr_brain_phantom(SHAPE, (2.0, 3.0, 3.0), seed=0)
    return vol


def psnr_mag(x: torch.Tensor, ref: np.ndarray) -> float:
    """PSNR of the magnitude against the reference magnitude, peak = the reference's maximum."""
    m = x.abs().numpy()
    return float(10 * np.log10(ref.max() ** 2 / np.mean((m - ref) ** 2)))


def _noisy(y: torch.Tensor, snr_db: float, seed: int) -> torch.Tensor:
    """Complex Gaussian noise on the sampled entries, std = (rms of the samples) * 10^(-snr/20)."""
    g = torch.Generator().manual_seed(seed)
    sampled = y != 0
    std = float(y[sampled].abs().square().mean().sqrt()) * 10 ** (-snr_db / 20)
    n = torch.complex(torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)) * (std / 2**0.5)
    return (y + n * sampled).to(torch.complex64)


def _problem(op, y, shape=SHAPE) -> ReconProblem:
    return ReconProblem(y=y, operator=op, modality="MR", image_shape=shape)


def test_zero_filled_of_full_sampling_is_exact(brain):
    op = Sense2D(birdcage_coils(6, SHAPE[1:]))  # fully sampled, maps with sum |S|^2 = 1
    x = torch.as_tensor(brain).to(torch.complex64)
    res = METHODS["zero_filled"](_problem(op, op.forward(x)), {})
    assert res.samples.shape == (1, *SHAPE) and res.samples.dtype == torch.complex64
    assert float((res.samples[0] - x).abs().max()) < 1e-5 * float(x.abs().max())


def test_demo_mask_r4_all_methods_beat_zero_filled(brain):
    """Demo-like measurement: 8 birdcage coils, variable-density ky lines at R = 4 with the demo's ACS
    fraction (24 of 128 lines -> 12 of 64), 30 dB SNR."""
    op = mri_operator_from_config({"operator": "sense2d", "acceleration": 4, "coils": 8, "acs_lines": 12},
                                  SHAPE, seed=1)
    problem = _problem(op, _noisy(simulate_kspace(brain, op), 30.0, seed=2))
    scores = {m: psnr_mag(METHODS[m](problem, {}).samples[0], brain)
              for m in ("zero_filled", "sense", "l1_wavelet", "mri_tv")}
    zf = scores.pop("zero_filled")
    for name, s in scores.items():
        assert s > zf + 0.5, (name, scores, zf)


def test_sense_unfolds_regular_undersampling(brain):
    """Equispaced R = 4 with 8 ACS lines: aliasing SENSE can unfold (zero-filled cannot)."""
    mask = np.zeros(SHAPE[1:], dtype=bool)
    mask[::4] = True
    mask[28:36] = True
    op = Sense2D(birdcage_coils(8, SHAPE[1:], radius=1.0), mask)
    x = torch.as_tensor(brain).to(torch.complex64)
    y = _noisy(op.forward(x), 40.0, seed=3)
    zf = psnr_mag(zero_filled_image(_problem(op, y)), brain)
    sense = psnr_mag(METHODS["sense"](_problem(op, y), {"n_iter": 50}).samples[0], brain)
    assert sense > zf + 8.0, (sense, zf)


def test_nufft_radial_gridding_and_sense(brain):
    op = mri_operator_from_config({"operator": "nufft2d", "trajectory": "radial", "acceleration": 2,
                                   "coils": 4}, SHAPE, seed=0)
    y = _noisy(simulate_kspace(brain, op), 40.0, seed=4)
    problem = _problem(op, y)
    grid = METHODS["zero_filled"](problem, {}).samples[0]
    # the density-compensated adjoint has the image's scale (dcf makes A^H W A ~ I)
    body = brain > 0.1 * brain.max()
    ratio = grid.abs().numpy()[body] / brain[body]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.1)
    sense = METHODS["sense"](problem, {"n_iter": 20}).samples[0]
    assert psnr_mag(sense, brain) > psnr_mag(grid, brain) + 1.0


def test_sense3d_volume(brain):
    rng = np.random.default_rng(0)
    mask = rng.random(SHAPE[:2]) < 0.4
    mask[:, 28:36] = True
    op = Sense3D(birdcage_coils(4, SHAPE, coils_per_ring=2), mask)
    y = simulate_kspace(brain, op)
    problem = _problem(op, y)
    zf = METHODS["zero_filled"](problem, {}).samples[0]
    res = METHODS["sense"](problem, {"n_iter": 30})
    assert res.samples.shape == (1, *SHAPE)
    assert psnr_mag(res.samples[0], brain) > psnr_mag(zf, brain) + 3.0


def test_bad_inputs(brain):
    g = CTGeometry.create("parallel", SHAPE[1:], (3.0, 3.0), sparse_view_angles(8, 180.0))
    ct = ReconProblem(y=torch.zeros(3, 8, g.detector_count), operator=ct_operator(g), modality="MR",
                      image_shape=SHAPE)
    with pytest.raises(ConfigError, match="SENSE operator"):
        METHODS["sense"](ct, {})
    op = Sense2D(birdcage_coils(2, SHAPE[1:]))
    problem = _problem(op, torch.zeros(3, 2, *SHAPE[1:], dtype=torch.complex64))
    with pytest.raises(ConfigError, match="lam"):
        METHODS["l1_wavelet"](problem, {"lam": -1})
    with pytest.raises(ConfigError, match="lam_scale"):
        METHODS["mri_tv"](problem, {"lam_scale": "percent"})
    per_slice = Sense2D(birdcage_coils(2, SHAPE[1:]), np.ones((3, *SHAPE[1:]), dtype=bool))
    with pytest.raises(ConfigError, match="per-slice"):
        METHODS["sense"](_problem(per_slice, torch.zeros(2, 2, *SHAPE[1:], dtype=torch.complex64),
                                  (2, *SHAPE[1:])), {})
