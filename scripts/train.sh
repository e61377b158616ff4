#!/usr/bin/env bash
# The main job: 2 ranks on CPU (or NPROC=N), default config plus any key=value overrides.
#   bash scripts/train.sh [--config FILE.yaml] [key=value ...]
# Exit status: 0 finished, 75 preempted after saving (SIGTERM to this script; run it again to resume),
# 1 error, 2 bad configuration.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
cmd=("$VENV/bin/torchrun" --standalone --nproc_per_node="${NPROC:-2}" recipes/train.py "$@")
# The run directory, to tell a preemption from a failure (torchrun exits 1 for both); "" if the config is bad.
run_dir=$("$PY" -c 'import sys
from ftrain.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1:]).run.dir)
except ConfigError:
    print("")' "$@")
if [ -z "$run_dir" ]; then
  exec "${cmd[@]}"  # reports the configuration error itself (exit 2)
fi
exec bash "$ROOT/scripts/preemptible.sh" "$run_dir" "${cmd[@]}"
