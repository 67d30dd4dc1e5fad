#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and demos (no systemd needed).
#   slurm/local_cluster.sh start [DIR]   install slurm-wlm + munge if missing, write DIR/slurm.conf,
#                                        start munged, slurmctld, slurmd; wait for an idle node;
#                                        print `export SLURM_CONF=...` for clients
#   slurm/local_cluster.sh stop [DIR]    stop exactly the daemons `start` recorded in DIR/pids
# DIR defaults to ${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/looped-pretrain-slurm-UID}. It must be
# the caller's own directory (not a symlink): another user's could feed us a munge key and a
# list of PIDs to kill. Only PIDs that are this user's munged/slurmctld/slurmd are stopped.
set -euo pipefail

cmd=${1:?usage: local_cluster.sh start|stop [DIR]}
dir=${2:-${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/looped-pretrain-slurm-$(id -u)}}

if [ -L "$dir" ] || { [ -e "$dir" ] && [ ! -O "$dir" ]; }; then
    echo "local_cluster.sh: $dir is not a directory owned by $(id -un); choose another DIR" >&2
    exit 2
fi

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge libpmix2 >/dev/null
}

ours() {  # a daemon this script started (PIDs are reused: check the name and the owner)
    [ -O "/proc/$1" ] && grep -qxE 'munged|slurmctld|slurmd' "/proc/$1/comm" 2>/dev/null
}

stop() {
    [ -f "$dir/pids" ] || return 0
    while read -r pid; do
        if ours "$pid"; then kill "$pid" 2>/dev/null || true; fi
    done < "$dir/pids"
    for _ in $(seq 50); do
        alive=0
        while read -r pid; do ours "$pid" && alive=1; done < "$dir/pids"
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    rm -f "$dir/pids"
}

start() {
    install
    stop
    mkdir -p -m 700 "$dir"
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 711 "$dir" "$dir/munge"
    local key="$dir/munge/munge.key" sock="$dir/munge/munge.socket"
    [ -f "$key" ] || { head -c 1024 /dev/urandom > "$key"; chmod 400 "$key"; }
    local host cpus mem user
    host=$(hostname -s)
    # the machine's CPUs: GNU nproc would honour OMP_NUM_THREADS (1 in a test's environment)
    # and declare a node too small for a 2-task job
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    user=$(id -un)
    cat > "$dir/slurm.conf" <<CONF
ClusterName=looped
SlurmctldHost=$host
SlurmctldPort=${LOCAL_SLURM_PORT:-16817}
SlurmdPort=$(( ${LOCAL_SLURM_PORT:-16817} + 1 ))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=5
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=600
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    munged -F --key-file="$key" --socket="$sock" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed" \
        < /dev/null >> "$dir/log/munged.out" 2>&1 &
    echo $! >> "$dir/pids"
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    # daemons keep no handle on the caller's stdin/stdout (a pipe to a test would never close)
    slurmctld -D -f "$dir/slurm.conf" < /dev/null >> "$dir/log/slurmctld.out" 2>&1 &
    echo $! >> "$dir/pids"
    slurmd -D -f "$dir/slurm.conf" < /dev/null >> "$dir/log/slurmd.out" 2>&1 &
    echo $! >> "$dir/pids"
    local deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if SLURM_CONF="$dir/slurm.conf" timeout 5 sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.2
    done
    echo "local SLURM cluster did not become idle; logs in $dir/log" >&2
    stop
    return 1
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: local_cluster.sh start|stop [DIR]" >&2; exit 2 ;;
esac
