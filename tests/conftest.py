"""Shared test fixtures: the real-data folder beside the repo, GPU skipping, small volumes."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"


def pytest_configure(config):
    """One torch thread: the tests use small tensors, where thread start-up dominates (measured 10-40x
    slower with 2 threads on a loaded 2-core machine), and a fixed thread count keeps numbers repeatable."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests with a reason when torch sees no CUDA device (never silently)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def real_data() -> Path:
    """The real DICOM collection at ../shared/data/real, or a skip that says where it was looked for."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real DICOM data not found at {REAL_DATA} (it ships beside the repo in ../shared/data/real)")
    return REAL_DATA
