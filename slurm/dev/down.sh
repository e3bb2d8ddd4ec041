#!/usr/bin/env bash
# Stop the dev cluster that slurm/dev/up.sh started: cancel its jobs, then stop each daemon by the PID up.sh
# recorded (SIGTERM, wait, SIGKILL). Idempotent: with nothing running it says so and exits 0.
# Keeps the state dir (job-ID counter, accounting database, logs), so the next up.sh continues where this
# one stopped; delete $NANOCHAT_SLURM_DEV_DIR as well for a clean slate.
# Then removes what up.sh set up around the daemons: the nodes' network namespaces (nanochat-*), their veth
# pairs (ncv-*), the bridge ncbr0, /etc/netns/nanochat-*, its lines in /etc/hosts, the fake GPU devices.
set -uo pipefail   # no -e: one daemon that will not stop must not leave the others running

here=$(cd "$(dirname "$0")" && pwd)
STATE=${NANOCHAT_SLURM_DEV_DIR:-/tmp/nanochat-slurm-dev}
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "slurm/dev/down.sh: needs root (or sudo)" >&2; exit 1; }
  exec sudo NANOCHAT_SLURM_DEV_DIR="$STATE" "$here/down.sh" "$@"
fi
log() { echo "slurm/dev/down.sh: $*"; }

# PID of a daemon we recorded, only if that PID still runs the expected program (PIDs get recycled).
pid_of() {  # pid_of NAME COMM
  local f="$STATE/run/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }

# stop "PID LABEL"...: SIGTERM to all of them together, up to 15 s for clean exits (slurmctld saves its state,
# MariaDB flushes), then SIGKILL to whatever is left. Each daemon takes ~2 s to exit, hence groups.
stop() {
  local t0 item pid label left
  t0=$(now_ms)
  for item in "$@"; do kill -TERM "${item%% *}" 2>/dev/null; done
  for _ in $(seq 150); do
    left=()
    for item in "$@"; do
      pid=${item%% *}; label=${item#* }
      if kill -0 "$pid" 2>/dev/null; then left+=("$item"); else
        [ -n "${reported[$pid]:-}" ] || log "stopped $label (pid $pid) after $(( $(now_ms) - t0 )) ms"
        reported[$pid]=1
      fi
    done
    [ ${#left[@]} -eq 0 ] && return 0
    sleep 0.1
  done
  for item in "${left[@]}"; do
    kill -KILL "${item%% *}" 2>/dev/null; log "killed ${item#* } (pid ${item%% *}): it ignored SIGTERM for 15 s"
  done
}
declare -A reported=()

stopped=0
# 1. Jobs first, while the controller is there to cancel them: otherwise their slurmstepd processes and the
#    job's own processes outlive slurmd. Wait a little longer than KillWait (5 s) for them to go.
if pid_of slurmctld slurmctld >/dev/null && jobs=$(timeout 10 squeue -h -o %A 2>/dev/null) && [ -n "$jobs" ]; then
  log "cancelling jobs: $(echo $jobs)"
  scancel $jobs 2>/dev/null
  for _ in $(seq 30); do [ -z "$(timeout 5 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.5; done
fi

# 2. Daemons, in groups that may stop together, most dependent first: slurmctld reports its final state to
#    slurmdbd, slurmdbd needs MariaDB, and all of them authenticate through munged. slurmd-*.pid covers
#    however many nodes up.sh started.
group=()
for f in "$STATE"/run/slurmd-*.pid; do
  [ -e "$f" ] || continue
  name=$(basename "$f" .pid)
  pid=$(pid_of "$name" slurmd) && group+=("$pid $name")
done
[ ${#group[@]} -eq 0 ] || { stop "${group[@]}"; stopped=$((stopped + ${#group[@]})); }
for g in "slurmctld:slurmctld" "slurmdbd:slurmdbd" "mariadb:mariadbd munged:munged"; do
  group=()
  for d in $g; do pid=$(pid_of "${d%%:*}" "${d#*:}") && group+=("$pid ${d%%:*}"); done
  [ ${#group[@]} -eq 0 ] || { stop "${group[@]}"; stopped=$((stopped + ${#group[@]})); }
done
rm -f "$STATE"/run/*.pid
# The shared mount point of common.sh's shared_mounts, and whatever a test left mounted under it.
if mountpoint -q "$STATE/mnt" 2>/dev/null; then
  umount -R "$STATE/mnt" && log "unmounted $STATE/mnt"
fi

# 3. Stray job-step daemons (slurmstepd) of this cluster, left when the controller was already gone and
#    could not cancel the jobs. They detach from slurmd and keep no trace of it in their environment, but they
#    keep slurmd's log file open: a slurmstepd with a file of $STATE/log open is ours. slurmstepd ignores
#    SIGTERM, so it and the job processes under it get SIGKILL.
descendants() {  # descendants PID: all PIDs below PID, by walking PPid
  local child
  for child in $(awk -v p="$1" '$1 == "PPid:" && $2 == p { split(FILENAME, a, "/"); print a[3] }' \
                 /proc/[0-9]*/status 2>/dev/null); do
    echo "$child"; descendants "$child"
  done
}
for fd_dir in /proc/[0-9]*/fd; do
  pid=${fd_dir#/proc/}; pid=${pid%/fd}
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || continue
  for fd in "$fd_dir"/*; do
    case $(readlink "$fd" 2>/dev/null) in
      "$STATE/log/"*)
        tree=$(descendants "$pid")
        kill -KILL "$pid" $tree 2>/dev/null
        log "killed stray slurmstepd (pid $pid) and its job processes ($(echo $tree))"
        stopped=$((stopped + 1))
        break ;;
    esac
  done
done

# 4. The network up.sh set up (names as in up.sh). Whatever still runs in a node's namespace was started by
#    that node's slurmd (a job's process that escaped its step): SIGKILL. Then our end of each veth pair
#    (which takes the other end with it, at once), the namespaces, the bridge, the node's /etc/hosts.
removed=()
for nsfile in /run/netns/nanochat-*; do
  [ -e "$nsfile" ] || continue
  ns=$(basename "$nsfile")
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [ -n "${pids// }" ]; then
    kill -KILL $pids 2>/dev/null
    log "killed processes left in $ns: $pids"
    stopped=$((stopped + 1))
  fi
  ip link del "ncv-${ns#nanochat-}" 2>/dev/null
  ip netns del "$ns" 2>/dev/null && removed+=("$ns")
done
for link in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^ncv-/ { sub(/@.*/, "", $2); print $2 }'); do
  ip link del "$link" 2>/dev/null && removed+=("$link")
done
ip link show ncbr0 >/dev/null 2>&1 && ip link del ncbr0 && removed+=(ncbr0)
for d in /etc/netns/nanochat-*; do [ -e "$d" ] && rm -rf "$d" && removed+=("$d"); done
rmdir /etc/netns 2>/dev/null
if grep -qF "# nanochat slurm/dev" /etc/hosts 2>/dev/null; then
  # Rewritten in place: in a container /etc/hosts is a mount point.
  kept=$(grep -vF "# nanochat slurm/dev" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts && removed+=("its /etc/hosts lines")
fi
[ ${#removed[@]} -eq 0 ] || log "removed ${removed[*]}"
rm -f "$STATE/run/layout"
# The fake GPUs' device files (up.sh makes them again); the preemption check's verdict stays with the state.
rm -rf "$STATE/dev"

if [ "$stopped" -eq 0 ]; then log "nothing was running (state dir $STATE)"; else log "slurm dev cluster down"; fi
