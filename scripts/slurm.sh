#!/bin/bash
# An sbatch script for one node that survives preemption and time limits by requeueing itself.
#   sbatch scripts/slurm.sh [key=value ...]        (set RUN_DIR, NPROC and the #SBATCH lines for your cluster)
#
# 120 s before the time limit (or when SLURM preempts the job with a grace time) this batch shell gets SIGTERM
# (B: = the batch shell only) and passes it on once to torchrun, which passes it to the workers: they save the
# current step and exit 75, and ftrain writes $RUN_DIR/PREEMPTED. torchrun itself exits 1 (torch 2.13 has no
# option to pass the workers' status on), so scripts/preemptible.sh checks for that file and exits 75, and this
# script requeues the job; the requeued job resumes from the checkpoint. Any other status ends the job with it.
#SBATCH --nodes=1 --ntasks=1 --cpus-per-task=16
#SBATCH --signal=B:TERM@120
#SBATCH --requeue --open-mode=append
set -uo pipefail
ROOT=${FTRAIN_ROOT:-$(pwd)}
RUN_DIR=${RUN_DIR:-$ROOT/runs/slurm-${SLURM_JOB_NAME:-ftrain}}
# --shutdown-timeout: how long torchrun waits for the workers' save after forwarding the signal (default 30 s).
bash "$ROOT/scripts/preemptible.sh" "$RUN_DIR" \
  torchrun --standalone --nproc_per_node="${NPROC:-2}" --shutdown-timeout=100 -m ftrain train \
  run.dir="$RUN_DIR" "$@"
status=$?
if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
