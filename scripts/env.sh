# Sourced by train.sh and test.sh: make ./.venv with everything ftrain needs, once.
# A torch that the base Python already has is kept (the venv sees system packages); otherwise torch 2.13.0
# is installed by exact version, so that no range lets pip pick a multi-GB CUDA build by accident.
# Set FTRAIN_TORCH to another pip requirement (e.g. a CUDA build) to choose differently.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "${FTRAIN_TORCH:-torch==2.13.0}"
fi
if ! "$PY" -c "import ftrain, torchdata, omegaconf, tensorboard, matplotlib, pytest, xdist" 2>/dev/null \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.ftrain-installed" ]; then
  "$PY" -m pip install --quiet -e "$ROOT[dev]"
  touch "$VENV/.ftrain-installed"
fi
