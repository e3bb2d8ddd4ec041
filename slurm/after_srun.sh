#!/bin/bash
# The batch step's last word, after the job's srun ended: requeue the job when its ranks asked for it or died with
# their node. It runs outside any container (pyxis and Apptainer wrap the srun step only), so scontrol works here
# even where the ranks cannot run it. The submitted job runs it as `bash slurm/after_srun.sh $?` right after srun.
#
#   srun's exit code   what the ranks said (nanochat/preemption.py)          what happens here
#   0                  done, or saved and requeued by rank 0 itself          nothing
#   75                 saved; requeue (time limit or preemption)             scontrol requeue
#   76                 saved after a SIGTERM they could not classify         requeue if Slurm preempted the job
#   77, or any other   no progress within the timeout (a peer or node       requeue, the nodes Slurm sees as down or
#   with a node down   gone), or killed along with a dead node               not responding added to ExcNodeList
#   anything else      a real error                                          none: the job fails
#
# The counts and caps (max_node_failures, ...) are kept by the ranks, which count the job's restarts on resume.
rc=${1:?usage: after_srun.sh EXIT_CODE_OF_SRUN}
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
    dead=$(dead_nodes)
    if [ "$rc" = 77 ] || [ -n "$dead" ]; then
      requeue "a rank made no progress or its node died (exit code $rc)" "$dead"
    else
      say "srun exited $rc: an error, not requeued"
    fi
    exit "$rc" ;;
esac
