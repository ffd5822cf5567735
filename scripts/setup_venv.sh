#!/usr/bin/env bash
# Create a virtual environment with lohakit and its test dependencies.
# Prefers the CPU build torch==2.13.0 that lies on this kind of machine's disk (PyPI's
# default torch would pull a multi-GB CUDA build); falls back to any torch pip can find.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.2"
fi
"$PY" -m pip install -q -e ".[test,hf,diffusers,cli]"
"$PY" -c "import torch, lohakit; print('lohakit ready; torch', torch.__version__)"
