#!/bin/bash
# The batch step of launch/*.sbatch: `srun bash launch/train_task.sh ARGS`, stopped to be resumed.
# SLURM's early warning (--signal=B:USR1@N) and a time limit's or preemption's TERM reach this batch shell;
# they are passed to every task (srun forwards them), which stop at one step, save it and exit 75
# (c2f_jax.runtime.preemption). On 75 the job requeues itself (--requeue) and the next start resumes there.
set -uo pipefail
srun bash launch/train_task.sh "$@" &
step=$!
trap 'kill -USR1 "$step" 2>/dev/null' USR1 TERM
status=0
while kill -0 "$step" 2>/dev/null; do
  wait "$step"; status=$?  # a trapped signal ends the wait early: wait again until srun itself has ended
done
if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "stopped to be resumed: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
