#!/usr/bin/env bash
# Installs fastsr (editable) and what it needs, keeping any torch >= 2.6 already present.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # the package + test dependencies (pytest, triton, ...)
# Without torch: a GPU machine gets the regular wheel; a machine without one gets a CPU
# build (PyTorch's CPU index when reachable, else the torch==2.13.0 CPU file these
# development machines keep on disk) instead of several GB of CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PYEOF
then
    echo "install.sh: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.6"
elif "$PY" -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    "$PY" -m pip install "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu
else
    "$PY" -m pip install "torch==2.13.0"
fi

if [ "${1:-}" = "--test" ]; then
    "$PY" -m pip install -e ".[test]"
else
    "$PY" -m pip install -e .
fi
