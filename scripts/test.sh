#!/usr/bin/env bash
# The test suite (what CI runs). Extra arguments go to pytest, e.g. -k resume, or -m soak for long runs.
# The quick loop, in-process unit tests only (no torchrun, recipe, CLI or spawned processes): -m "not scenario".
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
