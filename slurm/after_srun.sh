#!/bin/bash
# The batch step's last word, after the job's srun ended: requeue the job when its ranks asked for it or died with
# their node. It runs outside any container (pyxis and Apptainer wrap the srun step only), so scontrol works here
# even where the ranks cannot run it. The submitted job runs it as `bash slurm/after_srun.sh $?` right after srun.
#
#   what the ranks left (nanochat/preemption.py)                       what happens here
#   exit code 0                  done, or saved and requeued by rank 0      nothing
#   75, or a "requeue" verdict   saved; requeue (time limit or preemption)  scontrol requeue
#   76, or a "sigterm" verdict   saved after a SIGTERM they could not       requeue if Slurm preempted the job
#                                classify
#   a node down or not responding                                           requeue, excluding the dead nodes
#   an "error" verdict           a real error                               none: the job fails
#   77, a "hung" or "peer"       no progress within the timeout, or a       requeue
#   verdict                      collective lost a peer
#   anything else and the job preempted, or 140 (SIGUSR2) near the time     requeue
#   limit: a rank was killed by the signal before its handler was installed
#   anything else                                                           none: the job fails
# The verdicts are files in FOLDER, one per rank of this run of the job that could write one; they come first
# because srun exits with 128+signal when it had to kill a task (--kill-on-bad-exit), hiding the ranks' codes.
# At most NANOCHAT_MAX_REQUEUES restarts (the run's max_requeues): the ranks count and cap each kind when they
# resume from a checkpoint, this cap also holds for a job that fails before its first checkpoint.
rc=${1:?usage: after_srun.sh EXIT_CODE_OF_SRUN [VERDICT_FOLDER]}
folder=${2:-}
run=${SLURM_RESTART_COUNT:-0}
job=${SLURM_JOB_ID:?not in a Slurm job}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
say() { echo "after_srun: job $job: $*"; }
# Slurm signals the batch step when the requeue takes the job down: finish the few commands left first.
trap '' TERM

job_field() { scontrol -o show job "$job" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"; }
# The job's nodes that Slurm sees as down, failed or not responding ("*" after the state).
dead_nodes() {
  sinfo -h -N -n "$SLURM_JOB_NODELIST" -o '%N %t' 2>/dev/null |
    awk '$2 ~ /\*$|^down|^fail/ { print $1 }' | sort -u | paste -sd, -   # not drain: an admin's routine
}
verdicts() { [ -n "$folder" ] && ls "$folder/$job.run$run".rank*."$1" 2>/dev/null | wc -l || echo 0; }
requeue() {  # requeue WHY [NODES_TO_EXCLUDE]
  local error
  if [ "$run" -ge "${NANOCHAT_MAX_REQUEUES:-50}" ]; then
    say "not requeued ($1): the job already restarted $run times (max_requeues=${NANOCHAT_MAX_REQUEUES:-50})"
    return 1
  fi
  if error=$(scontrol requeue "$job" 2>&1); then
    say "requeued: $1"
  elif [ -n "${2:-}" ] && [ "$(job_field JobState)" != RUNNING ]; then  # Slurm requeues for a node failure itself
    say "requeued by Slurm for the node failure ($1; scontrol requeue said: $error)"
  else
    say "scontrol requeue failed ($1): $error; the job ends here"
    return 1
  fi
  # the nodes dead now and those that failed under an earlier run (slurm/before_srun.sh), once the job is pending
  [ -z "${2:-}${NANOCHAT_FAILED_NODES:-}" ] ||
    bash "$(dirname "$0")/exclude_nodes.sh" "$job" ${2:-} ${NANOCHAT_FAILED_NODES:-}
}

# Slurm sends the time-limit signal up to a minute before `--signal`'s lead ("resolution of event handling");
# an end time that cannot be read is far away (never a reason to requeue)
seconds_left() {
  local end
  end=$(SLURM_TIME_FORMAT=standard job_field EndTime)
  end=$(date -d "$end" +%s 2>/dev/null) && [ -n "$end" ] && echo $(( end - $(date +%s) )) || echo 999999
}
# how this run ended when Slurm's accounting cannot tell (it says REQUEUED): slurm/before_srun.sh reads it
ended() { [ -n "$folder" ] && echo "$1" >"$folder/$job.run$run.end"; }

preempted() {
  local at
  at=$(job_field PreemptTime)
  [ -n "$at" ] && [ "$at" != None ] && [ "$at" != Unknown ]
}

[ "$rc" = 0 ] && exit 0
dead=$(dead_nodes)
if [ "$rc" = 75 ] || [ "$(verdicts requeue)" -gt 0 ]; then
  requeue "the ranks saved and asked for it (time limit or preemption)"
elif [ "$rc" = 76 ] || [ "$(verdicts sigterm)" -gt 0 ]; then
  if preempted; then requeue "preempted at $(job_field PreemptTime)"
  else say "stopped by SIGTERM without a preemption (a user's scancel): not requeued"; fi
elif [ -n "$dead" ]; then
  requeue "node(s) $dead died (srun exited $rc)" "$dead"
elif [ "$(verdicts error)" -gt 0 ]; then
  say "srun exited $rc: a rank failed with an error (see $(ls "$folder/$job.run$run".rank*.error | head -1)):" \
    "not requeued"
elif [ "$rc" = 77 ] || [ "$(verdicts hung)" -gt 0 ] || [ "$(verdicts peer)" -gt 0 ]; then
  requeue "a rank made no progress or lost a peer (srun exited $rc)"
# the signal reached a rank before its handler was installed (the first second of a run), which it killed
# (recorded first: the requeue takes the batch step down KillWait later)
elif preempted; then
  ended PREEMPTED
  requeue "preempted at $(job_field PreemptTime), before the ranks could save"
elif [ "$rc" = $((128 + 12)) ] && [ "$(seconds_left)" -le $(( ${NANOCHAT_SIGNAL_LEAD_S:-180} + 60 )) ]; then
  ended TIMEOUT  # a rank died of SIGUSR2 itself, the time-limit signal
  requeue "the time-limit signal came before the ranks could save ($(seconds_left) s left)"
else
  say "srun exited $rc: an error, not requeued"
fi
exit "$rc"
