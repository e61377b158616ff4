#!/usr/bin/env bash
# The test suite (what CI runs). Extra arguments go to pytest, e.g. -k resume, or -m soak for long runs.
# The quick loop, in-process unit tests only (no torchrun, recipe, CLI or spawned processes): -m "not scenario".
# The tests run on one pytest-xdist worker per core (most of a scenario's time is process start-up and waiting);
# tests/conftest.py keeps together those that share a module's fixture. One process, in order: -n 0 (or set
# FTRAIN_TEST_WORKERS=0); another number of workers: -n N.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -n "${FTRAIN_TEST_WORKERS:-auto}" --dist loadgroup "$@"
