"""CT geometry, units (analytic disk), sparse-matrix vs ASTRA paths, HU conversion, cone beam without GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medrecon.errors import ConfigError, DeviceError, ResourceError
from medrecon.physics import ct
from medrecon.physics import ct_geometry as ctg


def disk(n: int, px: float, radius: float, supersample: int = 8) -> np.ndarray:
    """Centred disk of mu = 1/mm on an n x n grid of ``px`` mm pixels, pixel values = area fraction."""
    c = (np.arange(n) - n / 2 + 0.5) * px
    o = ((np.arange(supersample) + 0.5) / supersample - 0.5) * px
    y = c[:, None, None, None] + o[None, None, :, None]
    x = c[None, :, None, None] + o[None, None, None, :]
    return ((x**2 + y**2) <= radius**2).mean(axis=(2, 3)).astype(np.float32)


def bin_centres(geom: ctg.CTGeometry) -> np.ndarray:
    return (np.arange(geom.detector_count) - (geom.detector_count - 1) / 2) * geom.detector_spacing


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- HU <-> mu ---------------------------------------------------------------------------------------------


def test_hu_to_mu_values_clip_and_inverse():
    hu = np.array([-1200.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32)
    mu = ctg.hu_to_mu(hu)
    np.testing.assert_allclose(mu, [0.0, 0.0, 0.0192, 0.0384, 0.0768], rtol=1e-6, atol=1e-9)
    assert mu.dtype == np.float32
    np.testing.assert_allclose(ctg.mu_to_hu(mu[1:]), hu[1:], atol=1e-3)
    assert ctg.hu_to_mu(np.array([0.0]), mu_water=0.02)[0] == pytest.approx(0.02)
    t = ctg.hu_to_mu(torch.tensor([-1000, 0, 500]))  # integer HU become float
    assert t.dtype == torch.float32
    assert torch.allclose(t, torch.tensor([0.0, 0.0192, 0.0288]))
    with pytest.raises(ConfigError, match="mu_water"):
        ctg.hu_to_mu(hu, mu_water=0.0)


# --- angles ------------------------------------------------------------------------------------------------


def test_angle_sets():
    np.testing.assert_allclose(np.degrees(ctg.sparse_view_angles(4, 180)), [0, 45, 90, 135])
    np.testing.assert_allclose(np.degrees(ctg.sparse_view_angles(3, 360)), [0, 120, 240])
    np.testing.assert_allclose(np.degrees(ctg.limited_angle(90, 4)), [0, 30, 60, 90])
    np.testing.assert_allclose(
        ctg.angles_from_config({"angles_deg": [0, 10, 35.5]}), np.radians([0, 10, 35.5])
    )
    np.testing.assert_allclose(
        np.degrees(ctg.angles_from_config({"views": 6, "arc_deg": 180})), [0, 30, 60, 90, 120, 150]
    )
    np.testing.assert_allclose(
        np.degrees(ctg.angles_from_config({"views": 5, "arc_deg": 120, "angles_deg": None})),
        [0, 30, 60, 90, 120],
    )
    with pytest.raises(ConfigError, match="views"):
        ctg.angles_from_config({"views": 0, "arc_deg": 180})
    with pytest.raises(ConfigError, match="arc_deg"):
        ctg.sparse_view_angles(10, 400)
    with pytest.raises(ConfigError, match="angles_deg"):
        ctg.angles_from_config({"angles_deg": []})


def test_operator_uses_the_given_angles():
    angles = np.radians([3.0, 17.0, 101.0])
    op = ct.ParallelBeamCT(ctg.CTGeometry.create("parallel", (16, 16), (1.0, 1.0), angles))
    np.testing.assert_array_equal(op.angles, angles)
    assert op.out_shape == (3, op.detector_count)


# --- geometry ----------------------------------------------------------------------------------------------


def test_geometry_defaults_cover_the_field_of_view():
    par = ctg.CTGeometry.create("parallel", (100, 60), (0.8, 0.8), ctg.sparse_view_angles(10))
    diag = math.hypot(100 * 0.8, 60 * 0.8)
    assert par.detector_spacing == 0.8
    assert diag <= par.detector_count * par.detector_spacing <= diag + 3 * 0.8
    fan = ctg.CTGeometry.create("fan", (100, 60), (0.8, 0.8), ctg.sparse_view_angles(10, 360))
    r = diag / 2
    assert fan.source_distance == pytest.approx(595 / 250 * r)
    assert fan.detector_distance == pytest.approx(490 / 250 * r)
    assert fan.detector_spacing == pytest.approx(0.8 * fan.magnification)
    half_fan = math.asin(r / fan.source_distance)  # edge rays of the field of view hit the detector
    sd = fan.source_distance + fan.detector_distance
    assert fan.detector_count * fan.detector_spacing / 2 >= sd * math.tan(half_fan)
    cone = ctg.CTGeometry.create("cone", (20, 32, 32), (2.0, 1.0, 1.0), ctg.sparse_view_angles(8, 360))
    assert cone.detector_rows >= 20 and cone.detector_row_spacing == pytest.approx(2.0 * cone.magnification)


def test_geometry_json_round_trip_and_config():
    cfg = {
        "beam": "fan",
        "views": 12,
        "arc_deg": 360,
        "angles_deg": None,
        "detector_count": None,
        "detector_spacing": None,
        "source_distance": 500.0,
        "detector_distance": None,
    }
    g = ctg.CTGeometry.from_config(cfg, (40, 64, 48), (2.5, 0.7, 0.7))
    assert g.shape == (64, 48) and g.spacing == (0.7, 0.7) and g.source_distance == 500.0 and g.n_views == 12
    g2 = ctg.CTGeometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert g2 == g and g2.key() == g.key()
    assert "fan" in repr(g) and "12 views" in repr(g)


def test_non_square_pixels_are_a_config_error():
    with pytest.raises(ConfigError, match=r"square pixels.*resample"):
        ctg.CTGeometry.create("parallel", (32, 32), (0.5, 0.25), ctg.sparse_view_angles(4))


def test_bad_geometry_errors():
    with pytest.raises(ConfigError, match="beam"):
        ctg.CTGeometry.create("helical", (8, 8), (1.0, 1.0), [0.0])
    with pytest.raises(ConfigError, match="source"):
        ctg.CTGeometry.create("fan", (100, 100), (1.0, 1.0), [0.0], source_distance=50.0)
    with pytest.raises(ConfigError, match="fan-beam geometry"):
        ct.FanBeamCT(ctg.CTGeometry.create("parallel", (8, 8), (1.0, 1.0), [0.0]))


def test_3d_vectors_mirror_the_2d_geometry_in_y():
    """The GPU path mirrors ASTRA's 2D vectors in y (3D volumes index y upwards, 2D images downwards)."""
    import astra

    for beam in ("parallel", "fan"):
        g = ctg.CTGeometry.create(beam, (16, 16), (1.0, 1.0), ctg.sparse_view_angles(7, 360))
        v2 = astra.functions.geom_2vec(g.astra_proj_geom_2d())["Vectors"]
        v3 = g.astra_vectors_3d(5, 1.0)
        np.testing.assert_allclose(v3[:, [0, 1]], v2[:, [0, 1]] * [1, -1], atol=1e-9)  # ray / source
        np.testing.assert_allclose(v3[:, [3, 4]], v2[:, [2, 3]] * [1, -1], atol=1e-9)  # detector centre
        np.testing.assert_allclose(v3[:, [6, 7]], v2[:, [4, 5]] * [1, -1], atol=1e-12)
        assert np.all(v3[:, 11] == 1.0) and np.all(v3[:, [2, 5, 8, 9, 10]] == 0)


# --- units: analytic disk ----------------------------------------------------------------------------------


def test_parallel_disk_matches_analytic_chords_in_mm():
    """mu = 1/mm disk of radius 12 mm on 0.5 mm pixels: p(s) = 2 sqrt(R^2 - s^2) mm, for every angle.

    Tolerance: away from the edge (|s| <= R - 1 mm) within 1.5% of the diameter everywhere and 0.3% on
    average (the disk is pixelised; measured 0.8% and 0.16%).
    """
    n, px, radius = 128, 0.5, 12.0
    g = ctg.CTGeometry.create("parallel", (n, n), (px, px), ctg.sparse_view_angles(24))
    sino = ct.ParallelBeamCT(g)(torch.from_numpy(disk(n, px, radius))).numpy()
    s = bin_centres(g)
    analytic = 2 * np.sqrt(np.clip(radius**2 - s**2, 0, None))
    inner = np.abs(s) <= radius - 2 * px
    err = np.abs(sino[:, inner] - analytic[inner]) / (2 * radius)
    assert err.max() < 1.5e-2 and err.mean() < 3e-3
    outside = np.abs(s) > radius + 2 * px
    assert np.abs(sino[:, outside]).max() < 1e-5


def test_fan_disk_central_chord_is_the_diameter():
    """Fan beam, same disk: the central ray's chord is 2R = 24 mm for all views (within 1%); every ray at
    isocentre distance d = u SO / sqrt(SD^2 + u^2) matches 2 sqrt(R^2 - d^2) within 3% of 2R (0.5% mean)."""
    n, px, radius = 128, 0.5, 12.0
    g = ctg.CTGeometry.create("fan", (n, n), (px, px), ctg.sparse_view_angles(24, 360))
    assert g.detector_count % 2 == 1  # one bin on the central ray
    sino = ct.FanBeamCT(g)(torch.from_numpy(disk(n, px, radius))).numpy()
    centre = sino[:, g.detector_count // 2]
    np.testing.assert_allclose(centre, 2 * radius, rtol=1e-2)
    u = bin_centres(g)
    sd = g.source_distance + g.detector_distance
    d = u * g.source_distance / np.sqrt(sd**2 + u**2)
    analytic = 2 * np.sqrt(np.clip(radius**2 - d**2, 0, None))
    inner = np.abs(d) <= radius - 2 * px
    err = np.abs(sino[:, inner] - analytic[inner]) / (2 * radius)
    assert err.max() < 3e-2 and err.mean() < 5e-3


# --- sparse-matrix path vs ASTRA's own projector -----------------------------------------------------------


@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_matrix_path_equals_astra_per_slice(beam):
    g = ctg.CTGeometry.create(
        beam, (48, 40), (0.9, 0.9), ctg.sparse_view_angles(17, 360 if beam == "fan" else 180)
    )
    op_m = ct.ct_operator(g, backend="matrix")
    op_a = ct.ct_operator(g, backend="astra", threads=2)
    assert op_m.uses_matrix and not op_a.uses_matrix
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5, *op_m.in_shape, generator=gen)
    y = torch.rand(5, *op_m.out_shape, generator=gen)
    assert rel(op_m(x), op_a(x)) < 1e-4
    assert rel(op_m.adjoint(y), op_a.adjoint(y)) < 1e-4
    # the per-slice batch equals projecting each slice alone
    assert rel(op_m(x)[3], op_m(x[3])) < 1e-6


def test_leading_dims_and_dtype():
    op = ct.ParallelBeamCT.example()
    x = torch.rand(2, 3, *op.in_shape, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 3, *op.out_shape) and y.dtype == torch.float64
    assert rel(y[1, 2], op(x[1, 2])) < 1e-6
    with pytest.raises(ValueError, match="must end with shape"):
        op(torch.zeros(3, 5, 5))


def test_budget_fallback_and_matrix_cache():
    g = ctg.CTGeometry.create("parallel", (64, 64), (1.0, 1.0), ctg.sparse_view_angles(30))
    small = ct.ParallelBeamCT(g, matrix_budget_mb=0.01)
    assert not small.uses_matrix  # auto falls back to ASTRA's per-slice projector
    with pytest.raises(ResourceError, match="matrix_budget_mb"):
        ct.ParallelBeamCT(g, matrix_budget_mb=0.01, backend="matrix")
    ct.clear_matrix_cache()
    big = ct.ParallelBeamCT(g)
    x = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(2))
    assert rel(small(x), big(x)) < 1e-4
    m1 = ct.system_matrix(g)
    t0 = time.perf_counter()
    again = ct.ParallelBeamCT(ctg.CTGeometry.from_dict(g.to_dict()))  # equal geometry, new object
    again(x)
    assert ct.system_matrix(again.geometry) is m1  # served from the cache, not rebuilt
    assert time.perf_counter() - t0 < m1.build_s + 0.5
    # the estimate made before building bounds the real size (and is not wildly pessimistic)
    assert m1.nbytes / 1e6 <= big.estimated_matrix_mb <= 2.0 * m1.nbytes / 1e6


def test_matrix_estimate_bounds_fan():
    g = ctg.CTGeometry.create("fan", (64, 64), (1.0, 1.0), ctg.sparse_view_angles(20, 360))
    actual = ct.system_matrix(g).nbytes / 1e6
    assert actual <= ct.estimate_matrix_mb(g) <= 2.0 * actual


# --- cone beam without a GPU -------------------------------------------------------------------------------

_needs_no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a GPU: cone beam works here"
)


@_needs_no_gpu
def test_cone_beam_without_gpu_raises_device_error():
    g = ctg.CTGeometry.create("cone", (8, 16, 16), (1.0, 1.0, 1.0), ctg.sparse_view_angles(6, 360))
    with pytest.raises(DeviceError, match=r"needs a CUDA GPU.*Fix: run on a GPU node or use measure.ct.beam"):
        ct.ConeBeamCT(g)
    with pytest.raises(DeviceError):
        ct.ConeBeamCT.example()
    with pytest.raises(DeviceError):
        ct.ct_operator(g)


@_needs_no_gpu
def test_cone_beam_error_leaves_the_interpreter_alive():
    """In a fresh interpreter (so a SIGFPE from ASTRA would show as a crash, not kill the test run)."""
    code = (
        "from medrecon.errors import DeviceError\n"
        "from medrecon.physics import ct\n"
        "try:\n"
        "    ct.ConeBeamCT.example()\n"
        "except DeviceError as e:\n"
        "    print('DeviceError:', e)\n"
        "print('still alive')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "DeviceError: cone-beam CT needs a CUDA GPU" in r.stdout and "still alive" in r.stdout


# --- GPU (run where a CUDA GPU is present) -----------------------------------------------------------------


def _smooth_phantom(n: int) -> torch.Tensor:
    """Asymmetric smooth phantom: off-centre ellipse plus a gradient (catches flips and shifts)."""
    c = torch.arange(n, dtype=torch.float32) - n / 2 + 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    blob = torch.exp(-(((xx - n / 6) / (n / 8)) ** 2 + ((yy + n / 5) / (n / 12)) ** 2))
    return blob + 0.3 * (xx / n + 0.5) * (((xx**2 + yy**2) < (0.4 * n) ** 2).float())


@pytest.mark.gpu
@pytest.mark.parametrize("beam", ["parallel", "fan"])
def test_gpu_astra_matches_cpu_on_smooth_phantom(beam):
    g = ctg.CTGeometry.create(
        beam, (96, 96), (0.7, 0.7), ctg.sparse_view_angles(40, 360 if beam == "fan" else 180)
    )
    op = ct.ct_operator(g)  # CPU reference: the sparse matrix
    oa = ct.ct_operator(g, backend="astra")  # on CUDA tensors: ASTRA's CUDA projectors
    x = torch.stack([_smooth_phantom(96), _smooth_phantom(96).flip(-1)])
    y_cpu = op(x)
    y_gpu = oa(x.cuda()).cpu()
    assert rel(y_gpu, y_cpu) < type(op).gpu_parity_rtol
    assert rel(oa.adjoint(y_cpu.cuda()).cpu(), op.adjoint(y_cpu)) < type(op).gpu_parity_rtol
    gm = ct.ct_operator(g, backend="matrix")  # the CSR on the GPU: same numbers as on the CPU
    assert rel(gm(x.cuda()).cpu(), y_cpu) < 1e-5


@pytest.mark.gpu
def test_gpu_cone_central_rows_match_fan_beam():
    """A z-invariant object: the cone beam's central detector row pair averages to the fan-beam sinogram."""
    n, nz = 64, 16
    angles = ctg.sparse_view_angles(30, 360)
    cone_g = ctg.CTGeometry.create("cone", (nz, n, n), (1.0, 1.0, 1.0), angles)
    fan_g = ctg.CTGeometry.create(
        "fan",
        (n, n),
        (1.0, 1.0),
        angles,
        source_distance=cone_g.source_distance,
        detector_distance=cone_g.detector_distance,
        detector_count=cone_g.detector_count,
        detector_spacing=cone_g.detector_spacing,
    )
    img = _smooth_phantom(n)
    vol = img.expand(nz, n, n).contiguous()
    cone = ct.ConeBeamCT(cone_g)(vol.cuda()).cpu()
    fan = ct.FanBeamCT(fan_g)(img)
    r = cone_g.detector_rows
    mid = cone[r // 2] if r % 2 else 0.5 * (cone[r // 2 - 1] + cone[r // 2])
    assert rel(mid, fan) < 3e-2
