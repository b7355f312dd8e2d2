"""Software environments stay in step: the rules' conda env (workflow/envs/medrecon.yaml), setup.sh's torch pin,
pyproject.toml's ranges, and CI's minimal-versions constraints (.ci/min_constraints.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DEPS = {Requirement(d).name.lower(): Requirement(d) for d in PYPROJECT["dependencies"]}


def setup_torch_spec() -> Requirement:
    m = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (REPO / "setup.sh").read_text())
    assert m, "setup.sh sets a default TORCH_SPEC"
    return Requirement(m.group(1))


def test_conda_env_installs_medrecon_from_the_repository_with_setup_sh_torch():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "medrecon.yaml").read_text())
    assert "conda-forge" in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in conda if d.startswith("python="))
    assert Version(python.split("=", 1)[1]) in SpecifierSet(PYPROJECT["requires-python"])
    assert "pip" in conda
    # medrecon itself (and so every range of pyproject.toml) from the repository that workflow/Snakefile names
    assert "-e ${MEDRECON_ROOT}" in pip
    assert 'os.environ.setdefault("MEDRECON_ROOT"' in (REPO / "workflow" / "Snakefile").read_text()
    # torch: the same pin as setup.sh, inside pyproject's range
    torch = [Requirement(p) for p in pip if p.startswith("torch")]
    assert torch == [setup_torch_spec()]
    pinned = Version(str(torch[0].specifier).removeprefix("=="))
    assert DEPS["torch"].specifier.contains(pinned), (torch, DEPS["torch"])


def test_every_dependency_has_a_tested_floor_inside_its_range():
    out = subprocess.run([sys.executable, str(REPO / ".ci" / "min_constraints.py")], capture_output=True, text=True,
                         check=True).stdout
    pins = dict(line.split("==") for line in out.split())
    assert set(pins) == set(DEPS) - {"torch"}      # torch: the set-up's pin (its CPU builds are not on PyPI)
    for name, version in pins.items():
        assert DEPS[name].specifier.contains(Version(version)), (name, version, DEPS[name])
    # setup.sh's torch is torch's floor: the only torch build CI installs
    floor = next(Version(s.version) for s in DEPS["torch"].specifier if s.operator == ">=")
    assert [(s.operator, Version(s.version)) for s in setup_torch_spec().specifier] == [("==", floor)]
