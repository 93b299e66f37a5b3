#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (slurmctld + slurmd + munge), for testing
# slurm/pretrain.sbatch without a real cluster. Needs root and Debian's slurm-wlm and munge:
#   apt-get install -y slurm-wlm munge
# Idempotent: a running cluster is left alone. `bash slurm/local_cluster.sh stop` stops it.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
# Daemons are found by their pid files, not by name: another cluster on the machine (e.g.
# slurm/netns_cluster.sh's two nodes) runs slurmd and slurmctld too and is left alone.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "${1:-start}" = "stop" ]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if alive "$pidfile"; then kill "$(cat "$pidfile")" || true; fi
    done
    exit 0
fi
for cmd in slurmctld slurmd munged sbatch; do
    command -v "$cmd" >/dev/null || { echo "local_cluster: $cmd not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
done
if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
    echo "local_cluster: already running"; exit 0
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))"

if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
# (a munged answering on the default socket, not any munged: another cluster may run its own)
munge -n >/dev/null 2>&1 || su -s /bin/sh munge -c munged 2>/dev/null || munged --force

mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" /var/log/slurm
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
rm -f "$CONF_DIR/cgroup.conf"  # slurm 22.05 autodetects; "disabled" is not a plugin there

alive /run/slurmctld.pid || slurmctld
alive /run/slurmd.pid || slurmd
for _ in $(seq 1 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
        echo "local_cluster: up ($HOST, $CPUS CPUs)"; exit 0
    fi
    sleep 1
done
echo "local_cluster: the node did not come up; see /var/log/slurm/*.log" >&2
exit 1
