#!/usr/bin/env bash
# Create .venv with medrecon and its pinned-range dependencies (idempotent: a second run is quick).
# torch is installed first and pinned (CPU build on CPU machines) so nothing pulls a multi-GB CUDA build;
# set TORCH_SPEC to choose another build, e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index on GPU nodes.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "medrecon needs Python >= 3.11"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
printf '%s\n' "$TORCH_SPEC" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[dev,slurm]"
.venv/bin/python -m pip check
