"""Print a pip constraints file pinning every dependency of pyproject.toml to its floor (``>=X`` -> ``==X``).

CI's minimal-versions environment installs with it, so each floor in pyproject.toml is a version that is tested.
torch is left to the set-up's pin (TORCH_SPEC): its CPU builds are not on PyPI.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> dict[str, str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)$", dep)
        name, spec = m.group(1), m.group(2)
        lo = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if not lo:
            sys.exit(f"{pyproject}: dependency {dep!r} has no floor (>=X)")
        out[name.lower()] = lo.group(1)
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
    for name, version in floors(path).items():
        if name not in SKIP:
            print(f"{name}=={version}")
