#!/bin/bash
# The batch step's first word in a restarted job, before srun: how each earlier run of the job ended, from Slurm's
# accounting, and which nodes failed under it. It runs outside any container (pyxis and Apptainer wrap the srun
# step only), where sacct and scontrol work; the submitted job runs `eval "$(bash slurm/before_srun.sh FOLDER)"`.
#
# It prints, for the batch shell:
#   export NANOCHAT_SLURM_ENDS=STATE,...  how runs 0..N-1 of the job ended: accounting's state (PREEMPTED,
#       NODE_FAIL, REQUEUED, ...), or what slurm/after_srun.sh recorded in FOLDER for a run it requeued after a
#       signal killed the ranks (PREEMPTED, TIMEOUT; accounting says REQUEUED). The ranks count a restart that
#       left no checkpoint record by it (nanochat/preemption.py): a preemption with no grace time to save in, a
#       node that died with its ranks. Without accounting it is not set: such a restart counts as a node failure.
#   export NANOCHAT_FAILED_NODES=NODE,...  nodes that failed under an earlier run: a run that ended in NODE_FAIL
#       names all its nodes; the failed ones are those down or not responding now, or whose slurmd started
#       between that run's start and shortly after its end (they died and came back). Slurm requeued that run
#       itself and refuses to change a running job's ExcNodeList, so they are added (slurm/exclude_nodes.sh)
#       when this run is requeued by rank 0 or by slurm/after_srun.sh; not when Slurm requeues it itself. Slurm
#       does not place a job on a node while it is down; one revived meanwhile may be in this allocation, which
#       is said here.
folder=${1:-}  # the job's log folder, where slurm/after_srun.sh records how a run it requeued ended
run=${SLURM_RESTART_COUNT:-0}
echo "unset NANOCHAT_SLURM_ENDS NANOCHAT_FAILED_NODES"  # never a value of the shell that submitted the job
[ "$run" -gt 0 ] || exit 0
job=${SLURM_JOB_ID:?not in a Slurm job}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
say() { echo "before_srun: job $job: $*" >&2; }

# one line per run of the job, oldest first, this run last ("None assigned": a pending job cancelled, not a run)
if ! runs=$(timeout 60 sacct -j "$job" -D -X -n -P -o State,Start,End,NodeList 2>&1); then
  say "no accounting ($runs): a restart without a checkpoint record counts as a node failure"
  exit 0
fi
relabel() {  # a run that slurm/after_srun.sh requeued for a signal its ranks could not act on: accounting says REQUEUED
  local k=0 state rest
  while IFS='|' read -r state rest; do
    [ -n "$folder" ] && [ -s "$folder/$job.run$k.end" ] && state=$(<"$folder/$job.run$k.end")
    echo "$state|$rest"
    k=$((k + 1))
  done
}
# this run's line last: dropped first (slurmdbd may not have its start yet, which makes it "None assigned" too)
ended=$(head -n -1 <<<"$runs" | grep -v '|None assigned$' | relabel)
if [ "$(grep -c . <<<"$ended")" != "$run" ]; then
  say "accounting lists $(grep -c . <<<"$ended") earlier runs for restart $run: not used"
  exit 0
fi

node_field() { scontrol -o show node "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
failed=()
while IFS='|' read -r state start end nodes; do
  [ "${state%% *}" = NODE_FAIL ] || continue
  # a slurmd started between that run's start and a few minutes after its end came back from that failure; one
  # restarted later (an upgrade, a reboot) says nothing about it
  back_by=$(date -d "@$(( $(date -d "$end" +%s 2>/dev/null || date +%s) + 600 ))" +%Y-%m-%dT%H:%M:%S)
  for node in $(scontrol show hostnames "$nodes"); do
    node_state=$(node_field "$node" State)
    slurmd_start=$(node_field "$node" SlurmdStartTime)
    if [[ $node_state =~ DOWN|FAIL|NOT_RESPONDING ]] || [[ $slurmd_start > $start && ! $slurmd_start > $back_by ]]; then
      failed+=("$node")
    fi
  done
done <<<"$ended"

mapfile -t failed < <(printf '%s\n' "${failed[@]}" | grep . | sort -u)
if [ ${#failed[@]} -gt 0 ]; then
  say "node(s) ${failed[*]} failed under an earlier run of the job"
  for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    [[ " ${failed[*]} " == *" $node "* ]] && say "node $node failed under an earlier run and is in this one again"
  done
  echo "export NANOCHAT_FAILED_NODES=$(IFS=,; echo "${failed[*]}")"
fi
echo "export NANOCHAT_SLURM_ENDS=$(cut -d'|' -f1 <<<"$ended" | cut -d' ' -f1 | paste -sd, -)"
