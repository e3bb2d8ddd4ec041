#!/usr/bin/env bash
# Start a real three-node Slurm cluster (controller, three slurmd "nodes", accounting) on this one machine, for
# CI's slurm test tier and for trying the harness on a laptop. It is set up as "hostile" as real sites are:
# 2 CPUs and 2 (fake) GPUs per node, preemption by a high-priority partition, nodes that can die
# (slurm/dev/fault.sh). Idempotent: run it again and it says the cluster is already up. Stop everything with
# slurm/dev/down.sh. See slurm/dev/README.md.
#
# Layout: everything the cluster writes (logs, PIDs, job state, spool, MariaDB data) is under the state dir
# ($NANOCHAT_SLURM_DEV_DIR, default /tmp/nanochat-slurm-dev). The config files are generated there too and
# then installed into /etc/slurm, because that is where every daemon AND every client (sbatch, sacct,
# submitit's calls, a user's shell) looks without being told; SLURM_CONF would have to be exported into
# every one of those environments, which is exactly the kind of thing that silently goes wrong.
#
# Network: each node's slurmd runs in its own network namespace (nanochat-n1 ...) and UTS namespace
# (hostname n1 ...), wired to a bridge on this machine (ncbr0, 10.77.0.1/24; nodes 10.77.0.11-13),
# so that every job step sees its node's own loopback and address, as on a real cluster: a server a job binds
# to 127.0.0.1 is NOT reachable from this machine (the "login node"), one bound to the node's address is.
# The controller, slurmdbd, MariaDB and munged stay here (MariaDB and munge talk over unix sockets). Without
# the rights to create namespaces (no CAP_NET_ADMIN), or with NANOCHAT_SLURM_DEV_NETNS=0, the nodes share
# this machine's network on 127.0.0.1 instead (one warning line says so).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
STATE=${NANOCHAT_SLURM_DEV_DIR:-/tmp/nanochat-slurm-dev}
. "$here/common.sh"   # NODES, their addresses and ports, start_slurmd, ...
READY_TIMEOUT=${NANOCHAT_SLURM_DEV_TIMEOUT:-90}
NETNS=${NANOCHAT_SLURM_DEV_NETNS:-auto}   # auto: namespaced nodes where possible; 0: all on loopback; 1: must

# The daemons run as root (SlurmUser=root) and we install packages and write /etc: re-run under sudo.
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "slurm/dev/up.sh: needs root (or sudo)" >&2; exit 1; }
  exec sudo NANOCHAT_SLURM_DEV_DIR="$STATE" NANOCHAT_SLURM_DEV_TIMEOUT="$READY_TIMEOUT" \
    NANOCHAT_SLURM_DEV_NETNS="$NETNS" "$here/up.sh" "$@"
fi

log() { echo "slurm/dev/up.sh: $*"; }
die() { echo "slurm/dev/up.sh: ERROR: $*" >&2; exit 1; }

# munged is not in this list: it may be the machine's own, and up.sh records it only when it started it.
daemons=("mariadb mariadbd" "slurmdbd slurmdbd" "slurmctld slurmctld")
for n in "${NODES[@]}"; do daemons+=("slurmd-$n slurmd"); done
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
# What the preemption check below depends on; its verdict is kept in $STATE/preempt-check under this key.
preempt_key() { echo "$(slurmctld -V) GraceTime=$GRACE_TIME KillWait=$KILL_WAIT"; }
preempt_checked() { [ "$(head -1 "$STATE/preempt-check" 2>/dev/null)" = "$(preempt_key)" ]; }
# The layout the running cluster was started with (run/layout: "netns" or "loopback") is still in place:
# for netns, each slurmd still lives in its node's namespace (not just: the namespace exists).
layout_intact() {
  local layout n pid
  layout=$(cat "$STATE/run/layout" 2>/dev/null) || return 1
  [ "$layout" = loopback ] && return 0
  [ "$layout" = netns ] || return 1
  for n in "${NODES[@]}"; do
    pid=$(cat "$STATE/run/slurmd-$n.pid" 2>/dev/null) &&
      [ "$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null)" = \
        "$(stat -L -c %i "/run/netns/nanochat-$n" 2>/dev/null)" ] || return 1
  done
}

# ---------------------------------------------------------------------------------------------- already up?
if [ -d "$STATE/run" ]; then
  n_alive=0
  for d in "${daemons[@]}"; do alive $d && n_alive=$((n_alive + 1)) || true; done
  if [ "$n_alive" -eq "${#daemons[@]}" ] && layout_intact && munge_works && preempt_checked && timeout 10 sinfo -h >/dev/null 2>&1; then
    log "already up ($(cat "$STATE/run/layout") layout, state in $STATE); tear down with slurm/dev/down.sh"
    exit 0
  elif [ "$n_alive" -gt 0 ] || alive munged munged; then
    # Half a cluster (a daemon died, or a previous up.sh failed): start over rather than patch it up.
    # Also: every daemon runs but a node left its namespace, or an older up.sh started the cluster (it records
    # no layout). Either way the cluster gets the layout this script sets up.
    log "partly up ($n_alive of ${#daemons[@]} daemons alive, network layout $(cat "$STATE/run/layout" 2>/dev/null ||
      echo unknown)$(layout_intact || echo ' not intact')$(preempt_checked || echo ', preemption not checked')): stopping it first"
    "$here/down.sh"
  fi
fi

# ------------------------------------------------------------------------------------------------ packages
pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get (Debian/Ubuntu only)"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet: update only when the first try fails.
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"/tmp/nanochat-slurm-dev-apt.log" 2>&1 || {
    apt-get update -q >>"/tmp/nanochat-slurm-dev-apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"/tmp/nanochat-slurm-dev-apt.log" 2>&1 ||
      { tail -20 /tmp/nanochat-slurm-dev-apt.log >&2; die "apt-get install failed (log above)"; }
  }
fi
# The packages start nothing in a container (no systemd) and on a systemd host we start our own copies.

# ------------------------------------------------------------------------------------------------- network
# Remove what a previous run of ours left (down.sh does the same; nothing of ours runs at this point).
net_down() {
  local n
  for n in "${NODES[@]}"; do
    ip link del "ncv-$n" 2>/dev/null || true   # deleting our end of the veth pair deletes both, at once
    ip netns del "nanochat-$n" 2>/dev/null || true
    rm -rf "/etc/netns/nanochat-$n"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rmdir /etc/netns 2>/dev/null || true
}
# The bridge with this machine's address on it, and per node: a network namespace whose eth0 is one end of
# a veth pair (the other end on the bridge), loopback up, and the /etc/hosts the node sees. No default
# route: the nodes reach this machine and each other, nothing else (a DNS lookup fails at once instead of
# timing out). Fails (non-zero) at the first step that is not allowed.
net_up() {
  local i j n ns names
  command -v ip >/dev/null || { echo "no ip command (iproute2)" >&2; return 1; }
  ip link add "$BRIDGE" type bridge && ip addr add "$BRIDGE_IP/24" dev "$BRIDGE" && ip link set "$BRIDGE" up ||
    return 1
  # This machine's names, which the nodes must resolve to the bridge address (its /etc/hosts usually maps them
  # to 127.0.x.x, which on a node would be the node itself): the login node, SLURM_SUBMIT_HOST of every job.
  names=$(printf '%s\n' "$(hostname)" "$(hostname -f 2>/dev/null)" "$(hostname -s)" | grep -v '^localhost$' |
          awk 'NF && !seen[$0]++' | paste -sd ' ')
  for i in "${!NODES[@]}"; do
    n=${NODES[$i]}; ns=nanochat-$n
    ip netns add "$ns" &&
      ip link add "ncv-$n" type veth peer name eth0 netns "$ns" &&
      ip link set "ncv-$n" master "$BRIDGE" up &&
      ip -n "$ns" addr add "${NODE_IPS[$i]}/24" dev eth0 &&
      ip -n "$ns" link set eth0 up &&
      ip -n "$ns" link set lo up || return 1
    # ip netns exec bind-mounts /etc/netns/NS/hosts over /etc/hosts for what it starts (slurmd, its jobs).
    mkdir -p "/etc/netns/$ns" || return 1
    {
      echo "$MARK: /etc/hosts as node $n sees it"
      echo "127.0.0.1 localhost"
      echo "::1 localhost ip6-localhost ip6-loopback"
      echo "$BRIDGE_IP $names"
      for j in "${!NODES[@]}"; do echo "${NODE_IPS[$j]} ${NODES[$j]}"; done
      echo "# the rest of this machine's /etc/hosts, less the names above"
      awk -v drop="localhost ip6-localhost ip6-loopback $names ${NODES[*]}" -v mark="$HOSTS_MARK" '
        BEGIN { split(drop, d, " "); for (k in d) skip[d[k]] = 1 }
        index($0, mark) || /^[[:space:]]*(#|$)/ { next }
        { line = $1; kept = 0
          for (f = 2; f <= NF && $f !~ /^#/; f++) if (!($f in skip)) { line = line " " $f; kept = 1 }
          if (kept) print line }' /etc/hosts
    } >"/etc/netns/$ns/hosts" || return 1
  done
  return 0
}
net_down
layout=loopback
if [ "$NETNS" != 0 ]; then
  if net_err=$(net_up 2>&1 >/dev/null); then
    layout=netns
  else
    net_down
    [ "$NETNS" = auto ] || die "cannot create the nodes' network namespaces: ${net_err:-unknown error}"
    log "WARNING: cannot create network namespaces (${net_err:-unknown error}; needs CAP_NET_ADMIN):" \
        "nodes ${NODES[*]} share this machine's 127.0.0.1, so a job's server bound to loopback by mistake is not caught"
  fi
fi

# ------------------------------------------------------------------------------------------------- configs
mkdir -p "$STATE"/{etc,log,run,state,mysql}
for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done

# Every "node" has 2 CPUs, whatever this machine has: two 1-CPU tasks fit on a node, a third goes to the next
# node, as on a real cluster where ranks outnumber nodes (4 ranks on 2 nodes: SLURM_LOCALID 0 and 1). The
# nodes share the same cores; SlurmdParameters=config_overrides makes slurmd trust these numbers instead of
# checking them. One thread per core, so that under CR_Core a 1-CPU task takes one CPU, not a whole core.
cpus=2

# Fake GPUs: gres/gpu wants a File= per GPU, and slurmd drops one that is not a character or block device
# ("not a valid character or block device"): then the GPUs are still counted and allocated, but no task gets
# CUDA_VISIBLE_DEVICES. So: device nodes with NVIDIA's numbers (195, N) that nothing opens (there is no driver
# behind them); plain files where mknod is not allowed (no CAP_MKNOD), with a warning.
gpu_files=devices
for n in "${NODES[@]}"; do
  mkdir -p "$STATE/dev/$n"
  for g in $(seq 0 $((NODE_GPUS - 1))); do
    f=$STATE/dev/$n/nvidia$g
    [ -c "$f" ] && continue
    rm -f "$f"
    mknod "$f" c 195 "$g" 2>/dev/null || { touch "$f"; gpu_files=plain; }
  done
done
[ "$gpu_files" = devices ] || log "WARNING: cannot mknod the fake GPU devices under $STATE/dev: --gpus jobs run," \
  "but without CUDA_VISIBLE_DEVICES"

# Where the nodes find the controller and slurmdbd (this machine): its bridge address in their namespaces.
# slurmctld insists on being named after this machine's hostname (or localhost) in SlurmctldHost.
if [ "$layout" = netns ]; then
  ctl_host="$(hostname -s)($BRIDGE_IP)"; dbd_host=$(hostname -s); node_ips=("${NODE_IPS[@]}")
else
  ctl_host=localhost; dbd_host=localhost; node_ips=(); for n in "${NODES[@]}"; do node_ips+=(127.0.0.1); done
fi

cat >"$STATE/etc/slurm.conf" <<EOF
$MARK (state dir $STATE); up.sh rewrites it on every start.
ClusterName=$CLUSTER
# Network layout: $layout (see up.sh).
SlurmctldHost=$ctl_host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Why: a requeued job is held for cred_expire+1 seconds before it may start again (121 s by default).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups to rely on in a container: track processes by parent PID and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MailProg=/bin/true
# Preemption as sites set it up: a job in partition high takes the nodes of jobs in debug (requeued) or cancel
# (cancelled), after a grace time; see the partitions below and README.md for what exactly happens.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# A dead node (fault.sh kill-node) is DOWN after SlurmdTimeout; its jobs then end (NODE_FAIL). slurmctld
# notices only when a ping fails, and a ping to a node that is gone fails after MessageTimeout (10 s by
# default): with a lower one the node is NOT_RESPONDING and then DOWN sooner.
SlurmdTimeout=$SLURMD_TIMEOUT
MessageTimeout=$MESSAGE_TIMEOUT
GresTypes=gpu
# Jobs may be requeued (submitit's preemption/timeout handling relies on it); a node whose slurmd comes back
# is usable again without an admin's "scontrol update state=resume".
JobRequeue=1
ReturnToService=2
# Fast turn-around for tests: schedule every 2 s, give processes 5 s between SIGTERM and SIGKILL.
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=$KILL_WAIT
# Accounting through slurmdbd: sacct is where submitit reads job states from.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$dbd_host
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
for i in "${!NODES[@]}"; do
  echo "NodeName=${NODES[$i]} NodeAddr=${node_ips[$i]} Port=${NODE_PORTS[$i]} CPUs=$cpus Sockets=1" \
    "CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 Gres=gpu:$NODE_GPUS" >>"$STATE/etc/slurm.conf"
done
nodelist=$(IFS=,; echo "${NODES[*]}")
cat >>"$STATE/etc/slurm.conf" <<EOF
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=cancel Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=$GRACE_TIME
PartitionName=high Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF

# One gres.conf for all the nodes (each slurmd reads its NodeName= lines).
{
  echo "$MARK"
  for n in "${NODES[@]}"; do echo "NodeName=$n Name=gpu File=$STATE/dev/$n/nvidia[0-$((NODE_GPUS - 1))]"; done
} >"$STATE/etc/gres.conf"

# slurmd 22.05 loads a cgroup plugin whatever the other settings say; cgroup/v1 is the one that starts even
# where no cgroup filesystem is mounted.
cat >"$STATE/etc/cgroup.conf" <<EOF
$MARK
CgroupPlugin=cgroup/v1
EOF

# MariaDB listens on a unix socket in the state dir only (no TCP port to clash with a site database);
# StorageUser=root gets in through MariaDB's unix_socket authentication, so there is no password anywhere.
cat >"$STATE/etc/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF

# Install into /etc/slurm, but never over a configuration that is not ours (a real site's, say).
mkdir -p /etc/slurm
# An empty file (some images ship an empty gres.conf) configures nothing: ours may replace it.
for f in slurm.conf cgroup.conf gres.conf slurmdbd.conf; do
  if grep -q '[^[:space:]]' "/etc/slurm/$f" 2>/dev/null && ! grep -qF "$MARK" "/etc/slurm/$f"; then
    die "/etc/slurm/$f exists and was not written by this script; move it away to use the dev cluster"
  fi
done
install -m 644 "$STATE/etc/slurm.conf" /etc/slurm/slurm.conf
install -m 644 "$STATE/etc/cgroup.conf" /etc/slurm/cgroup.conf
install -m 644 "$STATE/etc/gres.conf" /etc/slurm/gres.conf
install -m 600 "$STATE/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf   # slurmdbd refuses a readable one

# The nodes' names must resolve to their addresses here too (slurmd -N n1 looks itself up, srun and
# MASTER_ADDR=n1 resolve them, a user types them): our lines in /etc/hosts, rewritten in place (in a
# container /etc/hosts is a mount point: no mv over it). Checked through the resolver afterwards, since a line
# of the site's that names n1 first would win.
grep -vF "$HOSTS_MARK" /etc/hosts >"$STATE/run/hosts.new" || true
for i in "${!NODES[@]}"; do echo "${node_ips[$i]} ${NODES[$i]}    $HOSTS_MARK"; done >>"$STATE/run/hosts.new"
cat "$STATE/run/hosts.new" >/etc/hosts && rm -f "$STATE/run/hosts.new"
for i in "${!NODES[@]}"; do
  got=$(getent ahostsv4 "${NODES[$i]}" | awk 'NR == 1 { print $1 }')
  [ "$got" = "${node_ips[$i]}" ] ||
    die "${NODES[$i]} resolves to ${got:-nothing}, not ${node_ips[$i]}: another line of /etc/hosts names it"
done

# --------------------------------------------------------------------------------------------------- start
deadline=$(( $(date +%s) + READY_TIMEOUT ))
fail() {  # fail MESSAGE LOGFILE...: say what did not come up and show the end of its log
  echo "slurm/dev/up.sh: ERROR: $1 (waited up to ${READY_TIMEOUT}s; stop the rest with slurm/dev/down.sh)" >&2
  shift
  for f in "$@"; do [ -e "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }; done
  if timeout 5 scontrol ping >/dev/null 2>&1; then echo "--- sinfo -N" >&2; sinfo -N >&2; fi
  exit 1
}
wait_for() {  # wait_for DESCRIPTION "LOG..." COMMAND...: poll COMMAND until it succeeds or time is up
  local what=$1 logs=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$what" $logs
    sleep 0.5
  done
}

# munge: slurm's authentication. Reuse a munged that is already running (the machine's own), else start one.
if munge_works; then
  log "munged already running: using it"
else
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- munged
  wait_for "munged did not start" "/var/log/munge/munged.log" munge_works
  cp /run/munge/munged.pid "$STATE/run/munged.pid"
fi

# MariaDB for slurmdbd: its own data dir and socket, no option files (--no-defaults: a site's my.cnf must not
# move the socket or turn networking on). Runs in the foreground, so $! is its PID.
sock=$STATE/run/mysqld.sock
if [ ! -d "$STATE/mysql/mysql" ]; then
  mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
    fail "mariadb-install-db failed" "$STATE/log/mariadb-install.log"
fi
setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$sock" --skip-networking \
  --pid-file="$STATE/run/mariadb.pid" --log-error="$STATE/log/mariadb.log" \
  --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
echo $! >"$STATE/run/mariadb.pid"
wait_for "mariadbd did not start" "$STATE/log/mariadb.log" mariadb-admin --no-defaults --socket="$sock" ping

# slurmdbd reaches MariaDB through the client library's default socket, which MYSQL_UNIX_PORT overrides.
MYSQL_UNIX_PORT=$sock slurmdbd
wait_for "slurmdbd did not start" "$STATE/log/slurmdbd.log" sacctmgr -n show cluster
# No "sacctmgr add cluster" needed: slurmctld registers cluster $CLUSTER (and root's association) itself
# the first time it connects, and jobs are accounted from the first one on (checked with 22.05).

slurmctld
wait_for "slurmctld did not start" "$STATE/log/slurmctld.log" scontrol ping
# slurmctld keeps its jobs across restarts (so job IDs keep counting up, matching the accounting database).
# down.sh cancels every job, so jobs still here were cut off by an unclean stop; they would hold "their"
# node (state mix) until slurmctld gives up on them. A fresh cluster starts with an empty queue.
leftover=$(squeue -h -o %A)
if [ -n "$leftover" ]; then
  log "cancelling jobs left from an unclean stop: $(echo $leftover)"
  scancel $leftover
fi
for n in "${NODES[@]}"; do start_slurmd "$n" "$layout"; done

# Ready = every node idle and sacct answering (sacct asks slurmdbd, which lags slurmctld by a second or two).
nodes_idle() {
  local states
  states=$(sinfo -h -N -p debug -o '%N %t' | sort -u | tr '\n' ' ')
  [ "$states" = "$(printf '%s idle ' "${NODES[@]}")" ]
}
slurmd_logs=$(printf "$STATE/log/slurmd-%s.log " "${NODES[@]}")
wait_for "nodes ${NODES[*]} not all idle" "$STATE/log/slurmctld.log $slurmd_logs" nodes_idle
wait_for "sacct does not answer" "$STATE/log/slurmdbd.log $STATE/log/slurmctld.log" sacct -n -X -S now
for d in "${daemons[@]}"; do  # nothing died while we waited for the rest
  set -- $d
  alive "$1" "$2" || fail "$1 is not running" "$STATE/log/$1.log"
done

echo "$layout" >"$STATE/run/layout"

# -------------------------------------------------------------------------------------- preemption check
# Once per Slurm version and setting (the verdict is kept in the state dir, so later starts stay fast): a job
# in debug preempted by one in high must get SIGTERM at least GraceTime-2 s before SIGKILL, which is what the
# harness counts on to save its state. Measured on the task of an srun step: it records when TERM comes and
# keeps writing a timestamp until KILL stops it.
if ! preempt_checked; then
  log "checking once that preemption gives SIGTERM ${GRACE_TIME}s before SIGKILL (takes 20-50 s)"
  d=$STATE/run/preempt-check; rm -rf "$d"; mkdir -p "$d"
  victim=$(sbatch --parsable -p debug -w "${NODES[0]}" -n1 -c1 -t 5 -o /dev/null -J preempt-check \
    --wrap "srun bash -c 'trap \"date +%s.%N >>$d/term\" TERM; while :; do date +%s.%N >$d/alive; sleep 0.2; done'")
  deadline=$(( $(date +%s) + 30 ))
  wait_for "the preemption check's job did not start" "$STATE/log/slurmctld.log" test -s "$d/alive"
  high=$(sbatch --parsable -p high -w "${NODES[0]}" --exclusive -t 1 -o /dev/null -J preempt-check --wrap true)
  killed() { [ -s "$d/term" ] && awk -v now="$(date +%s.%N)" '{ exit !(now - $1 > 2) }' "$d/alive"; }
  deadline=$(( $(date +%s) + 90 ))
  wait_for "the preemption check's job was not killed" "$STATE/log/slurmctld.log" killed
  scancel "$victim" "$high"   # the victim was requeued: it would run again
  gap=$(awk -v last="$(cat "$d/alive")" 'NR == 1 { printf "%.1f", last - $1 }' "$d/term")
  if awk -v g="$gap" -v want="$GRACE_TIME" 'BEGIN { exit !(g >= want - 2) }'; then
    { preempt_key; echo "SIGTERM to SIGKILL: ${gap}s (GraceTime=$GRACE_TIME)"; } >"$STATE/preempt-check"
    log "preemption check passed: SIGTERM came ${gap}s before SIGKILL"
  else
    "$here/down.sh" >/dev/null 2>&1 || true
    die "preemption gives only ${gap}s between SIGTERM and SIGKILL, not GraceTime=${GRACE_TIME}s: cluster stopped"
  fi
  rm -rf "$d"
fi

if [ "$layout" = netns ]; then
  where="in network namespaces of their own ($(for i in "${!NODES[@]}"; do
    printf '%s %s, ' "${NODES[$i]}" "${NODE_IPS[$i]}"; done)this machine $BRIDGE_IP)"
else
  where="on this machine's loopback"
fi
echo "slurm dev cluster up: ${#NODES[@]} nodes (${NODES[*]}) ${where}, partition debug;" \
  "tear down with slurm/dev/down.sh"
