"""No import circles in medrecon: the static import graph (module-level and deferred imports inside functions
alike) has no cycle, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medrecon"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The medrecon modules ``name`` imports anywhere in its source (``from a import b`` counts a.b when b is
    a module, else a). Imports under ``if TYPE_CHECKING:`` do not run and are not counted."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import circles (modules that import each other, directly or deferred): {cycles}"


def test_training_loop_imports_no_prior_kind():
    graph = import_graph()
    kinds = {"medrecon.diffusion.slab_data", "medrecon.diffusion.patches", "medrecon.diffusion.latent"}
    assert not graph["medrecon.diffusion.train"] & kinds
    assert not graph["medrecon.diffusion.kinds"] & kinds


def test_every_module_imports_alone():
    """Each module imported with no other medrecon module loaded (one fresh interpreter; medrecon's modules are
    dropped from sys.modules before each import, third-party ones are kept: torch cannot be imported twice)."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(MODULES)!r}:\n"
            "    for m in [m for m in sys.modules if m == 'medrecon' or m.startswith('medrecon.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]


def test_training_a_prior_needs_neither_sigpy_nor_astra():
    """A training machine (a lent GPU) carries torch, MONAI and zarr, not the operators' libraries: training an
    MR prior with the measure step's phase model (``random_phase: smooth``) must not import SigPy or ASTRA."""
    code = ("import sys, numpy as np\n"
            "from medrecon.diffusion.datasets import training_phase\n"
            "import medrecon.diffusion.kinds, medrecon.diffusion.train, medrecon.cli\n"
            "training_phase((8, 8), np.random.default_rng(0), 'smooth')\n"
            "print(sorted(m for m in ('sigpy', 'astra') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]", out.stdout
