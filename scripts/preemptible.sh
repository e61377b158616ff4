#!/usr/bin/env bash
# Run a training command so that whoever started it (a scheduler, a shell) can tell "preempted, saved" apart.
#
#   bash scripts/preemptible.sh RUN_DIR COMMAND [ARGS...]
#   bash scripts/preemptible.sh runs/exp1 torchrun --standalone --nproc_per_node=2 -m ftrain train run.dir=runs/exp1
#
# SIGTERM and SIGUSR1 sent to this script are passed on to COMMAND once (torchrun passes SIGTERM on to its
# workers, which save the current step and exit 75). Exit status: 75 if the run saved and stopped for a signal
# during this call (ftrain writes RUN_DIR/PREEMPTED after every rank has saved; torchrun itself exits 1 then,
# after printing a SignalException traceback), otherwise COMMAND's own status.
# Signal this script, not every process of the job: torchrun signalled twice may stop waiting for its workers.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/preemptible.sh RUN_DIR COMMAND [ARGS...]" >&2
  exit 2
fi
run_dir=$1
shift
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
"$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -USR1 "$pid" 2>/dev/null' USR1
while :; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || break  # wait returned for a trapped signal: the command is still running
done
marker="$run_dir/PREEMPTED"
if [ -f "$marker" ] && [ "$marker" -nt "$stamp" ]; then
  echo "ftrain: preempted: $(tr -d '\n' < "$marker") saved in $run_dir; run the same command again to resume (command exited $status)" >&2
  exit 75
fi
exit "$status"
