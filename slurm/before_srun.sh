#!/bin/bash
# The batch step's first word in a restarted job, before srun: how each earlier run of the job ended, from Slurm's
# accounting, and which nodes failed under it. It runs outside any container (pyxis and Apptainer wrap the srun
# step only), where sacct and scontrol work; the submitted job runs `eval "$(bash slurm/before_srun.sh FOLDER)"`.
#
# It prints, for the batch shell:
#   export NANOCHAT_SLURM_ENDS=STATE,...  the end state of runs 0..N-1 of the job (PREEMPTED, TIMEOUT, NODE_FAIL,
#       REQUEUED, ...). The ranks count a restart that left no checkpoint record by it (nanochat/preemption.py): a
#       preemption with no grace time to save in, a node that died with its ranks. Without accounting it prints
#       nothing and such a restart counts as a node failure.
#   export NANOCHAT_FAILED_NODES=NODE,...  nodes that failed under an earlier run: a run that ended in NODE_FAIL
#       names all its nodes, the failed ones are those down or not responding now, or whose slurmd started since
#       that run did (they died and came back). Slurm requeued that run itself, and a running job's ExcNodeList
#       cannot be changed, so slurm/after_srun.sh adds them when it next requeues the job. Slurm does not place
#       the job on a node while it is down; one revived meanwhile may be in this allocation, which is said here.
folder=${1:-}  # the job's log folder, where slurm/after_srun.sh records how a run it requeued ended
run=${SLURM_RESTART_COUNT:-0}
[ "$run" -gt 0 ] || exit 0
job=${SLURM_JOB_ID:?not in a Slurm job}
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
say() { echo "before_srun: job $job: $*" >&2; }

# one line per run of the job, oldest first, this run last ("None assigned": a pending job cancelled, not a run)
if ! runs=$(sacct -j "$job" -D -X -n -P -o State,Start,NodeList 2>&1); then
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
ended=$(grep -v '|None assigned$' <<<"$runs" | head -n -1 | relabel)
if [ "$(grep -c . <<<"$ended")" != "$run" ]; then
  say "accounting lists $(grep -c . <<<"$ended") earlier runs for restart $run: not used"
  exit 0
fi

node_field() { scontrol -o show node "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
failed=()
while IFS='|' read -r state start nodes; do
  [ "${state%% *}" = NODE_FAIL ] || continue
  for node in $(scontrol show hostnames "$nodes"); do
    node_state=$(node_field "$node" State)
    if [[ $node_state =~ DOWN|FAIL|NOT_RESPONDING ]] || [[ $(node_field "$node" SlurmdStartTime) > $start ]]; then
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
