#!/usr/bin/env bash
# The main job: 2 ranks on CPU (or NPROC=N), default config plus any key=value overrides.
#   bash scripts/train.sh [--config FILE.yaml] [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$VENV/bin/torchrun" --standalone --nproc_per_node="${NPROC:-2}" recipes/train.py "$@"
