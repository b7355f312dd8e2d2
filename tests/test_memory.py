"""Peak memory of the streaming steps does not grow with the number of slices (issue #9, item 2).

Each step runs in a fresh subprocess (one torch thread) on a CT phantom of N = 32 and of 4N = 128 slices of
256 x 256 and reports its own peak RSS. A step that held the whole volume would need at least one float32
copy more at 4N, ``3N x 256 x 256 x 4`` bytes = 24 MiB (evaluate works in float64 with ~30 copies: hundreds
of MiB); a streaming step needs the same slab working set at both sizes. The bound,
:data:`GROWTH_BOUND_MB`, leaves room for chunk-size and allocator effects (see :data:`ALLOCATOR`). Peak RSS
is ``VmHWM`` (:func:`medrecon.provenance.peak_rss_mb`): ``ru_maxrss`` of a child includes pytest's own RSS
at fork time.

Evaluate runs with slabs of 8 slices (``evaluate(..., slab=8)``) so that N already has middle slabs with a
full halo; the montage reads only the three planes it draws. Measured (2-core CPU, 1 thread): every step's
peak is within 1 MiB at 32 and 128 slices (ingest 270-280, measure 473, evaluate 421, montage 279 MiB).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medrecon.errors import InputError
from medrecon.io.dicom_writer import write_dicom_series
from medrecon.io.nifti import ingest_nifti, write_nifti
from medrecon.io.phantoms import make_phantom
from medrecon.volume import Volume

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 32, 256
GROWTH_BOUND_MB = 16.0  # allowed peak-RSS growth from N to 4N slices; a whole-volume copy at 4N is 24 MiB
SPACING = (2.0, 1.5, 1.5)
# glibc raises its mmap threshold adaptively (up to 32 MiB), after which freed slab buffers are reused
# from a heap that fragments a little more with every slab: the peak then creeps up by ~20 MiB per 4x
# slices (evaluate at 256 x 256, slab 8: 460 / 480 / 506 MiB at 32 / 128 / 512 slices) although no
# slab outlives its iteration. A fixed threshold removes that allocator noise (419 MiB at all three sizes),
# so the test sees what the code keeps alive.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}

# The step to measure, run in a fresh interpreter: argv = step, work folder, slices.
CHILD = r"""
import json, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from medrecon import config as cfgmod
from medrecon.provenance import peak_rss_mb

step, work, z = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
cfg = cfgmod.load(None)
if step == "ingest_phantom":
    from medrecon.io.ingest import ingest
    for seed, name in ((1, "ref"), (2, "rec")):
        ingest(f"phantom:ct_chest?seed={seed}&shape={z},256,256&spacing=2,1.5,1.5", work / f"{name}.zarr", cfg)
elif step in ("ingest_dicom", "ingest_nifti_gz"):
    from medrecon.io.ingest import ingest
    src = work / ("dicom" if step == "ingest_dicom" else "vol.nii.gz")
    ingest(src, work / f"{step}.zarr", cfg, modality="CT")
elif step == "measure":
    from medrecon.measure import measure
    cfg["measure"]["ct"].update(beam="parallel", views=60)
    measure(work / "ref.zarr", work / "meas.zarr", cfg, device="cpu")
elif step == "evaluate":
    from medrecon.evaluate import evaluate
    evaluate(work / "ref.zarr", work / "rec.zarr", work / "metrics.json", cfg, "s", "m", slab=8)
elif step == "montage":
    from medrecon.report.figures import montage
    from medrecon.volume import Volume
    montage(Volume.open(work / "ref.zarr"), {"m": Volume.open(work / "rec.zarr")}, (-1000, 1000),
            work / "montage.png")
print(json.dumps({"peak_mb": peak_rss_mb()}))
"""

STEPS = ("ingest_phantom", "ingest_dicom", "ingest_nifti_gz", "measure", "evaluate", "montage")


def _peak_mb(step: str, work: Path, z: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **ALLOCATOR}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, step, str(work), str(z)], capture_output=True,
                          text=True, env=env, timeout=300)
    print(f"{step} {z}: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, f"{step} at {z} slices failed:\n{proc.stderr[-3000:]}"
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict[str, dict[int, float]]:
    """Peak RSS (MiB) of every step at N and 4N slices; DICOM and NIfTI inputs are written first."""
    out: dict[str, dict[int, float]] = {s: {} for s in STEPS}
    for z in (N, 4 * N):
        work = tmp_path_factory.mktemp(f"z{z}")
        data, geometry, _ = make_phantom("ct_chest", (z, SIZE, SIZE), SPACING, seed=1)
        write_dicom_series(data, geometry, work / "dicom", modality="CT")
        write_nifti(work / "vol.nii.gz", data, geometry)
        del data
        for step in STEPS:
            out[step][z] = _peak_mb(step, work, z)
        assert Volume.open(work / "ingest_nifti_gz.zarr").shape == (z, SIZE, SIZE)
        assert not list(work.glob(".*.nii"))  # the temporary uncompressed copy is gone
        assert json.loads((work / "metrics.json").read_text())["metrics"]["psnr"] > 0
    return out


@pytest.mark.slow  # 12 fresh interpreters on 256 x 256 volumes: ~60 s on a loaded 2-core machine
@pytest.mark.parametrize("step", STEPS)
def test_peak_memory_is_flat_in_the_number_of_slices(peaks, step):
    volume_mb = 4 * N * SIZE * SIZE * 4 / 2**20
    assert volume_mb >= 2 * GROWTH_BOUND_MB  # the bound is well below one copy of the larger volume
    growth = peaks[step][4 * N] - peaks[step][N]
    print(f"{step}: peak RSS {peaks[step][N]:.0f} MiB at {N} slices, {peaks[step][4 * N]:.0f} MiB at {4 * N}")
    assert growth < GROWTH_BOUND_MB, (
        f"{step}: peak RSS grew by {growth:.1f} MiB from {N} to {4 * N} slices of {SIZE}x{SIZE} "
        f"({peaks[step]}); a whole-volume float32 copy at {4 * N} slices is {volume_mb:.0f} MiB")


def test_corrupt_gzip_nifti_is_an_error_naming_the_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii", np.zeros((20, 20, 20), np.float32),
                       make_phantom("ct_chest", (2, 16, 16), SPACING, 0)[1])
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(gzip.compress(good.read_bytes())[:-2000])  # header intact, data truncated
    with pytest.raises(InputError) as err:
        ingest_nifti(bad, tmp_path / "out" / "cut.zarr")
    assert str(bad) in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "out" / "cut.zarr").exists() and not list((tmp_path / "out").glob(".*"))
