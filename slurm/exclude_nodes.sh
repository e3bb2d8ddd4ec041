#!/bin/bash
# Add nodes to a requeued job's ExcNodeList, keeping what it holds (the user's --exclude, earlier failures), so
# that its later runs avoid them. Slurm refuses the change while the job runs: call this after `scontrol requeue`.
#
#   bash slurm/exclude_nodes.sh JOB NODELIST...      (NODELIST as Slurm writes it: n[1-2],gpu7)
job=${1:?usage: exclude_nodes.sh JOB NODELIST...}
shift
say() { echo "exclude_nodes: job $job: $*"; }
# a failed read must not drop what the list holds: no update then
if ! record=$(timeout 30 scontrol -o show job "$job" 2>&1); then
  say "could not read the job ($record): node(s) $* not excluded"
  exit 1
fi
before=$(tr ' ' '\n' <<<"$record" | sed -n 's/^ExcNodeList=//p')
[ "$before" = "(null)" ] && before=""
excluded=$(for nodes in "$before" "$@"; do [ -n "$nodes" ] && scontrol show hostnames "$nodes"; done |
           sort -u | paste -sd, -)
[ -n "$excluded" ] || exit 0
if [ "$excluded" = "$(scontrol show hostnames "${before:-none}" 2>/dev/null | sort -u | paste -sd, -)" ]; then
  exit 0  # excluded already
fi
if error=$(timeout 30 scontrol update JobId="$job" ExcNodeList="$excluded" 2>&1); then
  say "excluded node(s) $excluded from now on"
else
  say "could not exclude node(s) $excluded: $error"
  exit 1
fi
