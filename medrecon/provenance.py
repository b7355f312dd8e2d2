"""What made an output: config hash, package versions, git commit, seeds, device.

Recorded in every zarr store medrecon writes (``attrs['medrecon']['provenance']``) so a result can be
traced back and reproduced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGES = (
    "medrecon", "numpy", "scipy", "torch", "monai", "astra-toolbox", "sigpy", "zarr",
    "pydicom", "nibabel", "scikit-image", "snakemake",
)


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, no whitespace) so equal configs hash equally."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of ``config`` (first 16 hex digits)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour determines medrecon's numbers."""
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """Commit of the medrecon source tree, when it is a git checkout with a clean state marker."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def device_description() -> str:
    """'cpu (<machine>)' or the CUDA device name when torch sees one."""
    # Only ask torch if the process already imported it: importing torch costs ~2 s, and a step that
    # never touched torch (ingest) ran on the CPU.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.machine()})"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB): what a job or a benchmark stage records as its memory.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of this program's own address
    space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux carries it across
    ``execve``: a process started by a large parent (pytest, Snakemake, a benchmark driver) reports at
    least the parent's RSS at fork time (measured: 443 MiB for a 100 MiB step run from pytest).
    Elsewhere ``ru_maxrss`` is the best there is (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(config: Any | None = None, seeds: dict[str, int] | None = None, **extra: Any) -> dict:
    """The provenance block stored with an output."""
    block = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config_hash": None if config is None else config_hash(config),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "device": device_description(),
        "seeds": dict(seeds or {}),
    }
    block.update(to_jsonable(extra))
    return block
