#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for development and CI.
#
#   launch/local_slurm.sh up       # install (if needed), configure and start munged, slurmctld, slurmd
#   launch/local_slurm.sh status   # what runs, sinfo; exit 0 only when the partition is usable
#   launch/local_slurm.sh down     # stop only the daemons this script started (pid files)
#
# Idempotent. Needs root (apt-get and the daemons). State lives in $AVTS_SLURM_DIR
# (default /tmp/avts-slurm): slurm.conf, spool, logs, the pids of what we started.
# The rest of avts (submitit, sbatch, squeue) finds the cluster through SLURM_CONF, which
# `up` prints and which /etc/slurm/slurm.conf points to (a symlink, only if no slurm.conf exists).
set -euo pipefail

STATE="${AVTS_SLURM_DIR:-/tmp/avts-slurm}"
PARTITION="${AVTS_SLURM_PARTITION:-debug}"
# The partition's MaxTime: a job asking for more is refused up front (tests rely on it).
MAX_TIME="${AVTS_SLURM_MAX_TIME:-04:00:00}"
CONF="$STATE/slurm.conf"
HOST="$(hostname -s)"

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Runs a daemon (or what starts one) detached from its caller: a new Unix session, stdin from
# /dev/null, stdout and stderr appended to LOG, and none of the caller's other descriptors. A
# daemon keeps every descriptor it inherits for as long as it runs: a caller's lock would stay
# held, and a pipe a CI runner reads would never reach EOF. munged, for one, closes only 0-2.
detach() { # LOG command...
    local logfile="$1"
    shift
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd="${fd##*/}"
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        # --wait: when setsid must fork (a process-group leader), still return the exit status.
        exec setsid --wait "$@" </dev/null >>"$logfile" 2>&1
    )
}

mem_mb() { awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo; }

# The settings both clusters share (single node, and two nodes in network namespaces).
common_conf() {
    cat <<'EOF'
# No cgroups in a container, no accounting daemon: the lightest plugins that still run real jobs.
ProctrackType=proctrack/linuxproc
# Tasks are bound to their CPUs as on production clusters (task/affinity needs no cgroups):
# a task that srun is not told --cpus-per-task gets fewer CPUs, here too.
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
# Time between SIGTERM and SIGKILL on scancel/time limit: the trainer saves in that window.
KillWait=30
InactiveLimit=0
MinJobAge=600
JobRequeue=1
# Let preemption deliver the job's --signal (USR2) before SIGTERM, as on a production cluster.
SlurmctldParameters=preempt_send_user_signal
EOF
}

write_conf() {
    mkdir -p "$STATE"/{ctld,spool,log,pids}
    local cpus mem
    cpus="$(nproc --all)"
    mem="$(mem_mb)"
    cat >"$CONF.tmp" <<EOF
# Written by launch/local_slurm.sh for host $HOST: $cpus CPUs, $mem MB.
ClusterName=avts
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/pids/slurmctld.pid
SlurmdPidFile=$STATE/pids/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$(common_conf)
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=$MAX_TIME State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    if [ ! -e /etc/slurm/slurm.conf ]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" /etc/slurm/slurm.conf
        echo "/etc/slurm/slurm.conf" >"$STATE/pids/conf_link"
    fi
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return # a munged already answers (ours from an earlier `up`, or the system's)
    fi
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    # munged refuses to start when its key, log or socket dir belongs to another user.
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0600 /etc/munge/munge.key
    [ -e /var/log/munge/munged.log ] && chown munge:munge /var/log/munge/munged.log
    rm -f /run/munge/munged.pid
    mkdir -p "$STATE/log"
    detach "$STATE/log/munged.out" runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do
        [ -s /run/munge/munged.pid ] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$STATE/pids/munged.started"
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
}

start_daemon() { # name pidfile command...
    local name="$1" pidfile="$2"
    shift 2
    if alive "$pidfile"; then
        return
    fi
    mkdir -p "$STATE/log"
    detach "$STATE/log/$name.out" "$@" || die "$name failed to start (see $STATE/log/$name.log)"
    for _ in $(seq 100); do
        alive "$pidfile" && break
        sleep 0.1
    done
    alive "$pidfile" || die "$name did not come up (see $STATE/log/$name.log)"
    cp "$pidfile" "$STATE/pids/$name.started"
}

wait_ready() {
    export SLURM_CONF="$CONF"
    for _ in $(seq 120); do
        local state
        state="$(sinfo -h -p "$PARTITION" -o '%t' 2>/dev/null | head -n1)"
        case "$state" in
        idle* | mix* | alloc*) return 0 ;;
        drain* | down*)
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    die "partition $PARTITION not ready; sinfo says: $(sinfo 2>&1 | tail -n +2)"
}

cmd_up() {
    need_root
    install_packages
    # Rewrite the config only when no daemon of ours runs: slurmctld would refuse a changed node.
    if ! alive "$STATE/pids/slurmctld.pid"; then
        write_conf
    fi
    start_munge
    export SLURM_CONF="$CONF"
    # -c: a fresh start, no jobs carried over from a previous life of the state dir.
    start_daemon slurmctld "$STATE/pids/slurmctld.pid" /usr/sbin/slurmctld -f "$CONF" -c
    start_daemon slurmd "$STATE/pids/slurmd.pid" /usr/sbin/slurmd -f "$CONF"
    wait_ready
    log "up: partition '$PARTITION' on $HOST ($(nproc --all) CPUs)"
    echo "export SLURM_CONF=$CONF"
}

stop_pids() { # name file [name file...]: the pids we started, stopped together
    # SIGTERM to all first, then one wait: each SLURM daemon takes ~2 s to exit, and a
    # four-node cluster stopped one daemon after the other took 10 s.
    local -a names=() pids=() files=()
    while [ "$#" -ge 2 ]; do
        if [ -f "$2" ]; then
            local pid
            pid="$(cat "$2")"
            files+=("$2")
            if kill -0 "$pid" 2>/dev/null; then
                kill "$pid"
                names+=("$1")
                pids+=("$pid")
            fi
        fi
        shift 2
    done
    local i
    for _ in $(seq 100); do
        local left=0
        for i in "${!pids[@]}"; do
            kill -0 "${pids[$i]}" 2>/dev/null && left=1
        done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null && kill -9 "${pids[$i]}"
        log "stopped ${names[$i]} (${pids[$i]})"
    done
    [ "${#files[@]}" = 0 ] || rm -f "${files[@]}"
}

cmd_down() {
    need_root
    stop_pids slurmd "$STATE/pids/slurmd.started" slurmctld "$STATE/pids/slurmctld.started"
    stop_pids munged "$STATE/pids/munged.started" # after the daemons that use it
    if [ -f "$STATE/pids/conf_link" ]; then
        rm -f "$(cat "$STATE/pids/conf_link")" "$STATE/pids/conf_link"
    fi
    log "down"
}

cmd_status() {
    local rc=0
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        if alive "$STATE/pids/munged.started"; then
            echo "munged: running (pid $(cat "$STATE/pids/munged.started"))"
        else
            echo "munged: running (not started by local_slurm.sh; down leaves it)"
        fi
    else
        echo "munged: not answering"
        rc=1
    fi
    for name in slurmctld slurmd; do
        local f="$STATE/pids/$name.started"
        if alive "$f"; then
            echo "$name: running (pid $(cat "$f"))"
        else
            echo "$name: not started by local_slurm.sh"
            rc=1
        fi
    done
    if [ -f "$CONF" ] && command -v sinfo >/dev/null; then
        SLURM_CONF="$CONF" sinfo 2>&1 || rc=1
        echo "export SLURM_CONF=$CONF"
    else
        rc=1
    fi
    return $rc
}

# ---------------------------------------------------------------------------------------------
# N SLURM nodes on this machine (AVTS_SLURM_MN_NODES, default 2, at most 9), each slurmd in its
# own network namespace (avts-n1 .. avts-nN): a multi-node job's torch.distributed traffic
# crosses a real interface. Each node's `avts0` is one end of a veth pair whose other end is a
# port of a bridge in a namespace of its own (avts-sw), so every node reaches every other one.
# The addresses (10.77.0.1 .. 10.77.0.N) exist only inside the node namespaces. The controller
# runs in avts-n1 (entered with nsenter --net, which keeps /sys and its cgroup mount, unlike
# `ip netns exec`); clients run there too: `local_slurm.sh mn-exec sbatch ...`. A running
# cluster of another size is stopped and rebuilt by `mn-up` (slurmctld refuses changed nodes).

MN="${AVTS_SLURM_MN_DIR:-/tmp/avts-slurm-mn}"
MN_CONF="$MN/slurm.conf"
MN_NODES="${AVTS_SLURM_MN_NODES:-2}"
NS1=avts-n1
NS_SW=avts-sw
IFACE=avts0

mn_check_nodes() {
    case "$MN_NODES" in
    [2-9]) ;;
    *) die "AVTS_SLURM_MN_NODES=$MN_NODES: must be a number of nodes from 2 to 9" ;;
    esac
}

# The number of nodes of the cluster mn-up built last (its namespaces may still exist).
mn_built_nodes() { cat "$MN/pids/nodes" 2>/dev/null || echo 2; }

mn_net_up() {
    ip netns list | grep -qw "$NS1" && return
    ip netns add "$NS_SW"
    ip -n "$NS_SW" link add br0 type bridge
    ip -n "$NS_SW" link set br0 up
    local k ns
    for k in $(seq "$MN_NODES"); do
        ns="avts-n$k"
        ip netns add "$ns"
        ip link add "$IFACE" netns "$ns" type veth peer name "p$k" netns "$NS_SW"
        ip -n "$ns" addr add "10.77.0.$k/24" dev "$IFACE"
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$IFACE" up
        ip -n "$NS_SW" link set "p$k" master br0
        ip -n "$NS_SW" link set "p$k" up
    done
    echo "$MN_NODES" >"$MN/pids/nodes"
    echo created >"$MN/pids/netns.started"
}

mn_write_conf() {
    mkdir -p "$MN"/{ctld,log,pids}
    local cpus mem k
    # The machine shared by the nodes; at least one CPU each (4 nodes on 2 cores share them).
    cpus=$(($(nproc --all) / MN_NODES))
    [ "$cpus" -ge 1 ] || cpus=1
    mem=$(($(mem_mb) / MN_NODES))
    {
        cat <<EOF
# Written by launch/local_slurm.sh mn-up: $MN_NODES nodes in network namespaces avts-n1..avts-n$MN_NODES.
ClusterName=avtsmn
SlurmctldHost=$HOST(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$MN/ctld
SlurmdSpoolDir=$MN/spool-%n
SlurmctldPidFile=$MN/pids/slurmctld.pid
SlurmdPidFile=$MN/pids/slurmd-%n.pid
SlurmctldLogFile=$MN/log/slurmctld.log
SlurmdLogFile=$MN/log/slurmd-%n.log
$(common_conf)
EOF
        for k in $(seq "$MN_NODES"); do
            echo "NodeName=n$k NodeAddr=10.77.0.$k NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=n[1-$MN_NODES] Default=YES MaxTime=$MAX_TIME State=UP"
    } >"$MN_CONF.tmp"
    mv "$MN_CONF.tmp" "$MN_CONF"
}

mn_exec() { SLURM_CONF="$MN_CONF" nsenter --net=/run/netns/"$NS1" "$@"; }

cmd_mn_up() {
    need_root
    mn_check_nodes
    install_packages
    command -v ip >/dev/null || apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
    mkdir -p "$MN/pids" "$STATE/pids"
    if [ "$(mn_built_nodes)" != "$MN_NODES" ] && [ -f "$MN/pids/netns.started" ]; then
        log "mn-up: the cluster has $(mn_built_nodes) nodes, $MN_NODES asked for: rebuilding it"
        cmd_mn_down
    fi
    mn_net_up
    alive "$MN/pids/slurmctld.pid" || mn_write_conf
    start_munge
    local saved="$STATE" k
    STATE="$MN" # start_daemon records what it started under $STATE/pids
    start_daemon slurmctld "$MN/pids/slurmctld.pid" \
        nsenter --net=/run/netns/"$NS1" /usr/sbin/slurmctld -f "$MN_CONF" -c
    for k in $(seq "$MN_NODES"); do
        start_daemon "slurmd-n$k" "$MN/pids/slurmd-n$k.pid" \
            nsenter --net=/run/netns/"avts-n$k" /usr/sbin/slurmd -f "$MN_CONF" -N "n$k"
    done
    STATE="$saved"
    for _ in $(seq 120); do
        local idle
        idle="$(mn_exec sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s += $1} END {print s + 0}')"
        if [ "$idle" = "$MN_NODES" ]; then
            log "mn-up: nodes n1..n$MN_NODES (10.77.0.1..$MN_NODES in avts-n1..), partition '$PARTITION'"
            echo "export SLURM_CONF=$MN_CONF  # run clients with: $0 mn-exec CMD"
            return 0
        fi
        sleep 0.5
    done
    die "the $MN_NODES nodes did not become idle: $(mn_exec sinfo 2>&1 | tail -n +2)"
}

cmd_mn_down() {
    need_root
    local built k
    local -a daemons=()
    built="$(mn_built_nodes)"
    for k in $(seq "$built" -1 1); do
        daemons+=("slurmd-n$k" "$MN/pids/slurmd-n$k.started")
    done
    stop_pids "${daemons[@]}" slurmctld "$MN/pids/slurmctld.started"
    if [ -f "$MN/pids/netns.started" ]; then
        for k in $(seq "$built"); do
            ip netns del "avts-n$k" 2>/dev/null || true
        done
        ip netns del "$NS_SW" 2>/dev/null || true
        rm -f "$MN/pids/netns.started" "$MN/pids/nodes"
    fi
    log "mn-down"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
mn-up) cmd_mn_up ;;
mn-down) cmd_mn_down ;;
mn-status) mn_exec sinfo ;;
mn-exec)
    shift
    mn_exec "$@"
    ;;
*)
    echo "usage: $0 up|down|status | mn-up|mn-down|mn-status|mn-exec CMD..." >&2
    exit 2
    ;;
esac
