#!/usr/bin/env bash
# Faults for the dev cluster of up.sh, as tests/slurm_fixtures.py calls them:
#   fault.sh kill-node NODE       power loss: the node's link goes down first (peers' TCP connections hang, no
#                                 RST), then SIGKILL to everything on it (slurmd, slurmstepd, job processes)
#   fault.sh revive-node NODE     link up, slurmd started again as up.sh starts it; waits until it is usable
#   fault.sh freeze-rank JOB RANK SIGSTOP to the processes of that rank's task (a hung rank)
#   fault.sh thaw-rank JOB RANK   SIGCONT to them
# kill-node and revive-node need the netns layout: on the loopback fallback the nodes have no link of their
# own and no process table of their own to tell apart.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
STATE=${NANOCHAT_SLURM_DEV_DIR:-/tmp/nanochat-slurm-dev}
. "$here/common.sh"
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "slurm/dev/fault.sh: needs root (or sudo)" >&2; exit 1; }
  exec sudo NANOCHAT_SLURM_DEV_DIR="$STATE" "$here/fault.sh" "$@"
fi
die() { echo "slurm/dev/fault.sh: $*" >&2; exit 1; }
usage() { sed -n '2,6s/^# \{0,1\}//p' "$0" >&2; exit 2; }

need_node() {  # need_node NODE: a node of ours, in the netns layout
  [[ " ${NODES[*]} " == *" $1 "* ]] || die "no node $1 (nodes: ${NODES[*]})"
  [ "$(cat "$STATE/run/layout" 2>/dev/null)" = netns ] ||
    die "$2 needs the netns layout (this cluster's nodes share this machine's network: not supported)"
}

kill_node() {
  local n=$1 ns=nanochat-$1 pids
  ip link set "ncv-$n" down
  # What runs in the namespace is the node's: slurmd, the slurmstepd it forked, their job processes. A
  # slurmstepd may be forking while we kill: repeat until the namespace is empty.
  for _ in $(seq 50); do
    pids=$(ip netns pids "$ns" | tr '\n' ' ')
    [ -n "${pids// }" ] || { echo "node $n killed (link down, no process left)"; return 0; }
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes in $ns survive SIGKILL: $(ip netns pids "$ns" | tr '\n' ' ')"
}

revive_node() {
  local n=$1 deadline
  ip link set "ncv-$n" up
  alive "slurmd-$n" slurmd || start_slurmd "$n" netns
  deadline=$(( $(date +%s) + 60 ))
  until node_usable "$n"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "node $n not usable 60 s after its slurmd started: $(node_state "$n")"
    sleep 0.5
  done
  echo "node $n revived ($(node_state "$n"))"
}

# The processes of task RANK of job JOB: those whose environment says so and that belong to a job step
# (SLURM_STEP_ID set: srun's tasks). The batch shell and srun itself also carry SLURM_PROCID=0, but no
# SLURM_STEP_ID; a batch-only job (no srun) falls back to its batch processes for rank 0.
rank_pids() {  # rank_pids JOB RANK
  local f pid step=() batch=()
  # grep -l lists the environ files with the job's id (-z: NUL-separated entries), one grep for all of them.
  for f in $(grep -lzx "SLURM_JOB_ID=$1" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${f#/proc/}; pid=${pid%/environ}
    grep -qzx "SLURM_PROCID=$2" "$f" 2>/dev/null || continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != slurmstepd ] || continue
    if grep -qz "^SLURM_STEP_ID=" "$f"; then step+=("$pid"); else batch+=("$pid"); fi
  done
  if [ ${#step[@]} -gt 0 ]; then echo "${step[*]}"; elif [ "$2" = 0 ]; then echo "${batch[*]}"; fi
}

signal_rank() {  # signal_rank SIGNAL VERB JOB RANK
  local pids
  pids=$(rank_pids "$3" "$4")
  [ -n "$pids" ] || die "no process of rank $4 of job $3 on this machine"
  kill "-$1" $pids
  echo "$2 rank $4 of job $3: pids $pids"
}

[ $# -ge 1 ] || usage
case $1 in
  kill-node)   [ $# -eq 2 ] || usage; need_node "$2" kill-node; kill_node "$2" ;;
  revive-node) [ $# -eq 2 ] || usage; need_node "$2" revive-node; revive_node "$2" ;;
  freeze-rank) [ $# -eq 3 ] || usage; signal_rank STOP froze "$2" "$3" ;;
  thaw-rank)   [ $# -eq 3 ] || usage; signal_rank CONT thawed "$2" "$3" ;;
  *) usage ;;
esac
