"""Memory budget: refuse, before any work, a job whose working set would not fit the configured ``memory_mb``.

A job killed by the out-of-memory killer (or by SLURM for exceeding ``mem_mb``) says nothing useful and may
have run for hours; an estimate made from the shapes alone, compared with the budget before the first slab is
read, turns that into one clear error with the slab size that would fit.

The estimates are *working sets of image-sized float32 arrays*: ``slices x Y x X x 4 bytes x copies``, where
``slices`` is the slab being processed (slab size plus both halos; the whole depth when slabs are off) and
``copies`` is what each method registers (``memory_copies``, :mod:`medrecon.recon.registry`). Fixed costs
that do not scale with the slab (network weights, the CT system matrix, which has its own budget in
:mod:`medrecon.physics.ct`) are not included.
"""

from __future__ import annotations

import math
from pathlib import Path

from medrecon.errors import ResourceError
from medrecon.volume import default_chunk_depth

# Ingest holds one output chunk being written and compressed (2 copies of a chunk of about
# volume._CHUNK_BYTES, at least one slice) plus the decoded slice in its stored type and as float32.
INGEST_CHUNK_COPIES = 2
INGEST_SLICE_COPIES = 2
_MB = float(2**20)
_F32 = 4


def _slice_mb(shape_zyx: tuple[int, ...]) -> float:
    return int(shape_zyx[1]) * int(shape_zyx[2]) * _F32 / _MB


def _copies(method: str) -> float:
    """Image-sized float32 copies alive at once for ``method``: its registered ``memory_copies``. These are
    ROUGH UPPER BOUNDS chosen from the algorithms (iterates, residuals, gradients, duals; MR k-space counted for
    8 complex coils = 16 float copies), to be replaced by the peak RSS per slice measured by benchmarks/scale.py;
    diffusion methods keep the network's activations for every slice of the batch (DPS and the latent methods
    also for backpropagation)."""
    from medrecon.recon.registry import get_method

    return get_method(method).memory_copies


def estimate_reconstruct_mb(shape_zyx: tuple[int, int, int], slab_size: int | None, method: str,
                            halo: int = 0) -> float:
    """Working set (MB) of reconstructing a ``(Z, Y, X)`` volume slab by slab with ``method``.

    ``slab_size`` 0 or None means the whole volume at once (``halo`` is then ignored).
    """
    depth = int(shape_zyx[0])
    slices = depth if not slab_size else min(depth, int(slab_size) + 2 * int(halo))
    return slices * _slice_mb(shape_zyx) * _copies(method)


def check_memory_budget(path: str | Path, shape_zyx: tuple[int, int, int], slab_size: int | None, method: str,
                        budget_mb: float | None, halo: int = 0) -> float:
    """Return the estimate; raise :class:`ResourceError` naming ``path`` when it exceeds ``budget_mb``.

    ``budget_mb`` None means no budget (config ``memory_mb: null``). The fix names the largest
    ``reconstruct.slab.size`` that fits, or the ``memory_mb`` needed when not even one slice fits.
    """
    estimate = estimate_reconstruct_mb(shape_zyx, slab_size, method, halo)
    if budget_mb is None or estimate <= budget_mb:
        return estimate
    per_slice = estimate_reconstruct_mb(shape_zyx, 1, method)
    fits = int(budget_mb // per_slice) - 2 * int(halo)
    how = f"slab size {slab_size} (halo {halo})" if slab_size else "the whole volume at once"
    if fits >= 1:
        fix = (f"set reconstruct.slab.size to {fits} (or less), or raise memory_mb to at least "
               f"{math.ceil(estimate)}.")
    else:
        need = math.ceil(estimate_reconstruct_mb(shape_zyx, 1, method, halo))
        what = "one slice with its halo" if halo else "one slice"
        fix = f"raise memory_mb to at least {need} ({what} needs that much), or reconstruct on a bigger machine."
    raise ResourceError(
        f"Reconstructing {path} (shape {tuple(shape_zyx)}) with {method!r} on {how} needs about "
        f"{estimate:.0f} MB, more than the memory budget memory_mb = {budget_mb:g} MB.",
        path=path, fix=fix)


def estimate_ingest_mb(shape_zyx: tuple[int, int, int], whole_volume: bool = False) -> float:
    """Working set (MB) of ingesting a ``(Z, Y, X)`` volume: one output chunk plus the slice being decoded.

    ``whole_volume``: the reader has to hold every slice (gzip-compressed NIfTI is decompressed in full).
    """
    slices = INGEST_CHUNK_COPIES * default_chunk_depth(tuple(shape_zyx)) + INGEST_SLICE_COPIES
    if whole_volume:
        slices += int(shape_zyx[0])
    return slices * _slice_mb(shape_zyx)


def check_ingest_budget(path: str | Path, shape_zyx: tuple[int, int, int], budget_mb: float | None,
                        whole_volume: bool = False) -> float:
    """Return the ingest estimate; raise :class:`ResourceError` naming ``path`` when it exceeds ``budget_mb``."""
    estimate = estimate_ingest_mb(shape_zyx, whole_volume)
    if budget_mb is None or estimate <= budget_mb:
        return estimate
    if whole_volume:
        streamed = estimate_ingest_mb(shape_zyx)
        fix = (f"decompress it first (gunzip; uncompressed NIfTI is read slab by slab, about {streamed:.0f} MB), "
               f"or raise memory_mb to at least {math.ceil(estimate)}.")
    else:
        fix = f"raise memory_mb to at least {math.ceil(estimate)}, or ingest on a machine with more memory."
    raise ResourceError(
        f"Ingesting {path} (shape {tuple(shape_zyx)}, {_slice_mb(shape_zyx):.1f} MB per slice) needs about "
        f"{estimate:.0f} MB, more than the memory budget memory_mb = {budget_mb:g} MB.", path=path, fix=fix)
