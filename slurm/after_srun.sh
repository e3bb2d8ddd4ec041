#!/bin/bash
# The batch step's last word, after the job's srun ended: requeue the job when its ranks asked for it or died with
# their node. It runs outside any container (pyxis and Apptainer wrap the srun step only), so scontrol works here
# even where the ranks cannot run it. The submitted job runs it as `bash slurm/after_srun.sh $?` right after srun.
#
#   srun's exit code   what the ranks said (nanochat/preemption.py)          what happens here
#   0                  done, or saved and requeued by rank 0 itself          nothing
#   75                 saved; requeue (time limit or preemption)             scontrol requeue
#   76                 saved after a SIGTERM they could not classify         requeue if Slurm preempted the job
#   anything else      a rank left abnormally: the verdict files in FOLDER (one per rank that could write one:
#                      hung, peer, error) and the nodes' states decide, since srun reports 128+signal of any task
#                      it killed rather than the 77 of the rank that saw the hang:
#                        an "error" verdict                                  none: a real error, the job fails
#                        "hung" or "peer", exit code 77, or a node down     requeue, the nodes Slurm sees as down
#                                                                            or not responding added to ExcNodeList
#                        none of these                                       none: the job fails
#
# The counts and caps (max_node_failures, ...) are kept by the ranks, which count the job's restarts on resume.
rc=${1:?usage: after_srun.sh EXIT_CODE_OF_SRUN [VERDICT_FOLDER]}
folder=${2:-}
job=${SLURM_JOB_ID:?not in a Slurm job}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
say() { echo "after_srun: job $job: $*"; }
# Slurm signals the batch step when the requeue takes the job down: finish the few commands left first.
trap '' TERM

job_field() { scontrol -o show job "$job" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"; }
# The job's nodes that Slurm sees as down, failed, drained or not responding ("*" after the state).
dead_nodes() {
  sinfo -h -N -n "$SLURM_JOB_NODELIST" -o '%N %t' 2>/dev/null |
    awk '$2 ~ /\*$|^down|^fail|^drain|^drng/ { print $1 }' | sort -u | paste -sd, -
}
requeue() {  # requeue WHY [NODES_TO_EXCLUDE]
  local error
  if error=$(scontrol requeue "$job" 2>&1); then
    say "requeued: $1"
  elif [ -n "${2:-}" ]; then  # a node failure: Slurm requeues a batch job itself (JobRequeue=1 or --requeue)
    say "requeued by Slurm for the node failure ($1; scontrol requeue said: $error)"
  else
    say "scontrol requeue failed ($1): $error; the job ends here"
    return 1
  fi
  [ -n "${2:-}" ] || return 0
  local before
  before=$(job_field ExcNodeList)
  [ "$before" = "(null)" ] && before=""
  if scontrol update JobId="$job" ExcNodeList="${before:+$before,}$2"; then
    say "excluded node(s) $2 from now on (ExcNodeList=${before:+$before,}$2)"
  else
    say "could not exclude node(s) $2"
  fi
}

case $rc in
  0) exit 0 ;;
  75) requeue "the ranks saved and asked for it (time limit or preemption)" ;;
  76)
    preempt=$(job_field PreemptTime)
    if [ -n "$preempt" ] && [ "$preempt" != None ] && [ "$preempt" != Unknown ]; then
      requeue "preempted at $preempt"
    else
      say "stopped by SIGTERM without a preemption (a user's scancel): not requeued"
    fi ;;
  *)
    run=${SLURM_RESTART_COUNT:-0}
    verdicts() { [ -n "$folder" ] && ls "$folder/$job.run$run".rank*."$1" 2>/dev/null | wc -l || echo 0; }
    dead=$(dead_nodes)
    if [ "$(verdicts error)" -gt 0 ]; then
      say "srun exited $rc: a rank failed with an error (see $(ls "$folder/$job.run$run".rank*.error | head -1)):" \
        "not requeued"
    elif [ "$(verdicts hung)" -gt 0 ] || [ "$(verdicts peer)" -gt 0 ] || [ "$rc" = 77 ] || [ -n "$dead" ]; then
      requeue "a rank made no progress, lost a peer or its node (exit code $rc)" "$dead"
    else
      say "srun exited $rc: an error, not requeued"
    fi
    exit "$rc" ;;
esac
