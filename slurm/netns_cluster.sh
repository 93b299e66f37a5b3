#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for testing the multi-node path of
# slurm/pretrain.sbatch (tests/test_slurm.py). Each node is a network namespace with its own UTS
# namespace (hostname node1 / node2), joined by a veth pair named $IFNAME on both sides:
#
#   node1: 10.213.0.1/24 on rpnet0, slurmctld + slurmd      node2: 10.213.0.2/24 on rpnet0, slurmd
#
# The addresses exist only inside the namespaces; /etc/netns/<ns>/hosts (which `ip netns exec`
# mounts over /etc/hosts) maps node1 and node2 to them. munged, slurmctld and both slurmds are this
# cluster's own (own munge socket and key, own slurm.conf, state and logs, all under DIR), so a
# one-node cluster from slurm/local_cluster.sh or a real Slurm on the machine is not touched.
# Slurm commands reach this cluster from inside a node:
#
#   bash slurm/netns_cluster.sh start DIR           # prints the SLURM_CONF to use
#   SLURM_CONF=DIR/slurm.conf ip netns exec "$(cat DIR/ns1)" sbatch --nodes=2 ...
#   bash slurm/netns_cluster.sh node-down DIR 2     # node2 loses power (link down, its processes killed)
#   bash slurm/netns_cluster.sh node-up DIR 2       # ... and is back (link up, slurmd started)
#   bash slurm/netns_cluster.sh kill-trainers DIR 2 # kill -9 of node2's trainers only
#   bash slurm/netns_cluster.sh stop DIR            # every daemon, job process and namespace gone
#
# Needs root, iproute2 (ip netns), util-linux (unshare) and Debian's slurm-wlm and munge.
set -euo pipefail

ACTION="${1:-}"; DIR="${2:-}"
if [ -z "$ACTION" ] || [ -z "$DIR" ]; then
    echo "usage: bash slurm/netns_cluster.sh start|stop|node-down|node-up|kill-trainers DIR [NODE]" >&2
    exit 2
fi
IFNAME="${IFNAME:-rpnet0}"
SUBNET="${SUBNET:-10.213.0}"

stop() {
    [ -d "$DIR" ] || return 0
    # Every process in a node's namespaces (slurmd, slurmctld, job steps, trainers) is the node's:
    # the node is switched off. Then munged, then the namespaces and their hosts files.
    local ns pid
    for ns in $(cat "$DIR"/ns1 "$DIR"/ns2 2>/dev/null); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    if [ -s "$DIR/munged.pid" ]; then kill "$(cat "$DIR/munged.pid")" 2>/dev/null || true; fi
    for ns in $(cat "$DIR"/ns1 "$DIR"/ns2 2>/dev/null); do
        for _ in 1 2 3 4 5 6 7 8 9 10; do  # a killed process leaves the namespace when it is reaped
            [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.2
        done
        ip netns delete "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    rm -f "$DIR"/ns1 "$DIR"/ns2 "$DIR/munged.pid"
}

# Each daemon starts inside its node: network namespace, then its own hostname.
# (nsenter --net rather than `ip netns exec`, which remounts /sys without the cgroup file systems
# that slurmd needs; /etc/hosts is bind-mounted by hand instead.)
in_node() {  # in_node N command...
    local ns; ns="$(cat "$DIR/ns$1")"
    unshare --mount --uts --propagation private -- sh -c \
        'mount --bind "$1" /etc/hosts && hostname "$2" && shift 3 && exec nsenter --net="$0" "$@"' \
        "/run/netns/$ns" "/etc/netns/$ns/hosts" "node$1" "" "${@:2}"
}

case "$ACTION" in
    stop) stop; exit 0 ;;
    node-down)  # a node loses power: its link goes down (no reset reaches the others), then every
                # process in it dies (slurmd, job step, trainers)
        N="${3:?node-down DIR N}"; ns="$(cat "$DIR/ns$N")"
        ip -n "$ns" link set "$IFNAME" down
        for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
        exit 0 ;;
    kill-trainers)  # the node's trainers crash (kill -9); slurmd and the rest of the node stay up
        N="${3:?kill-trainers DIR N}"; ns="$(cat "$DIR/ns$N")"
        for pid in $(ip netns pids "$ns"); do
            if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-m launch.train"; then
                kill -9 "$pid" 2>/dev/null || true
            fi
        done
        exit 0 ;;
    node-up)  # the node is back: link up, slurmd started (Slurm returns it to service)
        N="${3:?node-up DIR N}"; ns="$(cat "$DIR/ns$N")"
        ip -n "$ns" link set "$IFNAME" up
        SLURM_CONF="$DIR/slurm.conf" in_node "$N" slurmd -f "$DIR/slurm.conf"
        exit 0 ;;
    start) ;;
    *) echo "netns_cluster: unknown action $ACTION; use start, stop, node-down, node-up or kill-trainers" >&2; exit 2 ;;
esac
[ "$(id -u)" = "0" ] || { echo "netns_cluster: needs root (network namespaces, slurmd)" >&2; exit 1; }
for cmd in ip unshare nsenter slurmctld slurmd munged sbatch; do
    command -v "$cmd" >/dev/null || { echo "netns_cluster: $cmd not found; apt-get install -y slurm-wlm munge iproute2" >&2; exit 1; }
done
DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd)"
trap 'stop' ERR

# Namespace names unique on the machine (several test runs may share it).
PREFIX="rp$$"
NS1="${PREFIX}n1"; NS2="${PREFIX}n2"
ip netns add "$NS1"; echo "$NS1" > "$DIR/ns1"
ip netns add "$NS2"; echo "$NS2" > "$DIR/ns2"
ip link add "$IFNAME" netns "$NS1" type veth peer name "$IFNAME" netns "$NS2"
ip -n "$NS1" addr add "$SUBNET.1/24" dev "$IFNAME"
ip -n "$NS2" addr add "$SUBNET.2/24" dev "$IFNAME"
for ns in "$NS1" "$NS2"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$IFNAME" up
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s.1 node1\n%s.2 node2\n' "$SUBNET" "$SUBNET" > "/etc/netns/$ns/hosts"
done

# munge: this cluster's own daemon, key and socket.
mkdir -p "$DIR/munge" "$DIR/state/ctld" "$DIR/state/node1" "$DIR/state/node2" "$DIR/log"
chmod 700 "$DIR/munge"
[ -s "$DIR/munge/munge.key" ] || dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --socket="$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"

CPUS="$(nproc)"
cat > "$DIR/slurm.conf" <<CONF
ClusterName=netns
SlurmctldHost=node1($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (+1 s) before it starts again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.sock,cred_expire=5
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobRequeue=1
# A node that stops answering is DOWN after 10 s (the default 300 s is for real machines).
SlurmdTimeout=10
# SIGTERM to SIGKILL of a cancelled step's processes: 10 s (default 30 s); the test's trainers save in
# well under a second, and ranks blocked on a lost node's peers are not kept waiting for nothing.
KillWait=10
MinJobAge=600
NodeName=node1 NodeAddr=$SUBNET.1 CPUs=$CPUS RealMemory=2000 State=UNKNOWN
NodeName=node2 NodeAddr=$SUBNET.2 CPUs=$CPUS RealMemory=2000 State=UNKNOWN
PartitionName=nodes Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$DIR/slurm.conf"

in_node 1 slurmctld -f "$SLURM_CONF"
in_node 1 slurmd -f "$SLURM_CONF"
in_node 2 slurmd -f "$SLURM_CONF"

for _ in $(seq 1 60); do
    if [ "$(ip netns exec "$NS1" sinfo -h -N -o %T 2>/dev/null | grep -cE 'idle|mixed|alloc')" = "2" ]; then
        echo "netns_cluster: up: node1 ($NS1, $SUBNET.1) and node2 ($NS2, $SUBNET.2) on $IFNAME; SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "netns_cluster: the nodes did not come up: $(ip netns exec "$NS1" sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ';'); see $DIR/log/" >&2
stop
exit 1
