#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the test that runs the audit as SLURM arrays
# (tests/test_slurm.py) and for trying `-m hydra/launcher=slurm` by hand.
#
#   scripts/slurm_cluster.sh [start]        install slurm-wlm + munge if missing, configure, start, wait
#   scripts/slurm_cluster.sh start --no-install   start only what is installed (no apt-get)
#   scripts/slurm_cluster.sh status         exit 0 when `sinfo` and `srun -N1 true` answer
#   scripts/slurm_cluster.sh stop           stop the daemons this script started (by their pid files)
#
# Idempotent: a cluster that already answers is left as it is, and a running daemon is not
# started twice. Needs root (Debian's slurm-wlm 22.05 and munge, no cgroups). It writes
# /etc/slurm/slurm.conf and /etc/munge/munge.key only when missing or written by this script:
# a machine with its own SLURM configuration is never changed. When the cluster cannot start,
# it exits 1 after one line on stderr that starts with "slurm_cluster: cannot start SLURM: ".
# SLURM_WAIT_S (default 90) bounds the wait for the node to answer.
set -uo pipefail

MARK="# Written by memaudit scripts/slurm_cluster.sh (single-node test cluster)."
CONF=/etc/slurm/slurm.conf
KEY=/etc/munge/munge.key
LOGDIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S="${SLURM_WAIT_S:-90}"

fail() {
    echo "slurm_cluster: cannot start SLURM: $*" >&2
    exit 1
}

note() { echo "slurm_cluster: $*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

# `sinfo` answers and a node runs jobs: one is busy with some, or an idle one runs `srun -N1 true`.
answers() {
    have sinfo && have srun || return 1
    local states
    states="$(timeout 10 sinfo -h -N -o %T 2>/dev/null)" || return 1
    grep -qE '^(mixed|allocated|completing)$' <<<"$states" && return 0
    grep -qxF idle <<<"$states" || return 1
    timeout 30 srun -N1 -n1 -t 1 true >/dev/null 2>&1
}

alive() {  # alive PIDFILE: the process its pid file names is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

log_tail() {  # the last lines of a daemon's log, on one line, for the failure message
    [[ -s "$1" ]] && echo " ($(basename "$1"): $(tail -n 3 "$1" | tr '\n' ' ' | cut -c1-400))"
}

install_packages() {
    have slurmctld && have slurmd && have munged && have sinfo && have srun && return 0
    [[ "$INSTALL" == 1 ]] || fail "slurm-wlm and munge are not installed (run scripts/slurm_cluster.sh as root to install them)"
    have apt-get || fail "slurm-wlm and munge are not installed and there is no apt-get to install them"
    note "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed (offline?)"
    local out
    out="$(apt-get install -y -qq --no-install-recommends slurm-wlm munge 2>&1)" \
        || fail "apt-get install slurm-wlm munge failed: $(echo "$out" | tail -n 1)"
    have slurmctld && have slurmd && have munged || fail "slurm-wlm/munge installed but slurmctld, slurmd or munged is missing"
}

start_munge() {
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return 0
    fi
    if [[ ! -s "$KEY" ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none || fail "cannot write $KEY"
    fi
    chown munge:munge "$KEY" && chmod 400 "$KEY" || fail "cannot set the owner of $KEY to munge"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! alive "$MUNGE_PID"; then
        su -s /bin/sh munge -c /usr/sbin/munged >/dev/null 2>&1 || fail "munged did not start$(log_tail /var/log/munge/munged.log)"
    fi
    for _ in $(seq 1 20); do
        timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    fail "munged runs but munge -n | unmunge fails$(log_tail /var/log/munge/munged.log)"
}

write_conf() {
    local host cpus mem_mb conf
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    # Below the machine's memory, so that slurmd accepts the node (it drains one that has less).
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 85 / 100 ))
    conf="$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    if [[ -e "$CONF" ]] && ! head -n 1 "$CONF" | grep -qxF "$MARK"; then
        fail "$CONF exists and was not written by this script; not changing it (is SLURM set up but stopped?)"
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
    if [[ ! -e "$CONF" ]] || [[ "$(cat "$CONF")" != "$conf" ]]; then
        printf '%s\n' "$conf" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF" || fail "cannot write $CONF"
        # Running daemons read the old file: restart them.
        stop_daemons
    fi
}

start_daemons() {
    alive "$CTLD_PID" || slurmctld >/dev/null 2>&1 || fail "slurmctld did not start$(log_tail $LOGDIR/slurmctld.log)"
    alive "$SLURMD_PID" || slurmd >/dev/null 2>&1 || fail "slurmd did not start$(log_tail $LOGDIR/slurmd.log)"
}

wait_until_answers() {
    local host deadline state
    host="$(hostname -s)"
    deadline=$(( SECONDS + WAIT_S ))
    while (( SECONDS < deadline )); do
        alive "$CTLD_PID" || fail "slurmctld exited$(log_tail $LOGDIR/slurmctld.log)"
        alive "$SLURMD_PID" || fail "slurmd exited$(log_tail $LOGDIR/slurmd.log)"
        state="$(timeout 10 sinfo -h -N -n "$host" -o %T 2>/dev/null | head -n 1)"
        case "$state" in
            idle)
                timeout 60 srun -N1 -n1 -t 1 true >/dev/null 2>&1 && return 0 ;;
            mixed|allocated|completing)  # busy with jobs: it runs them
                return 0 ;;
            down*|drain*|drained*|fail*)
                timeout 10 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 ;;
        esac
        sleep 1
    done
    if [[ -z "$state" ]]; then
        fail "sinfo did not answer within ${WAIT_S} s$(log_tail $LOGDIR/slurmctld.log)"
    fi
    fail "the node did not run a job within ${WAIT_S} s (sinfo state: $state)$(log_tail $LOGDIR/slurmd.log)"
}

stop_daemons() {  # only the daemons named by this cluster's pid files
    local f pid
    for f in "$SLURMD_PID" "$CTLD_PID"; do
        if alive "$f"; then
            pid="$(cat "$f")"
            kill "$pid" 2>/dev/null
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
    done
}

cmd="${1:-start}"
INSTALL=1
[[ "${2:-}" == "--no-install" ]] && INSTALL=0

case "$cmd" in
    start)
        started=$SECONDS
        if answers; then
            note "SLURM already answers (sinfo, srun -N1 true)"
            exit 0
        fi
        [[ "$(id -u)" == 0 ]] || fail "not root, and no running cluster answers (sinfo, srun -N1 true)"
        install_packages
        start_munge
        write_conf
        start_daemons
        wait_until_answers
        note "single-node cluster up on $(hostname -s) ($(nproc --all) CPUs, partition debug) in $(( SECONDS - started )) s"
        ;;
    status)
        if answers; then sinfo; exit 0; fi
        echo "slurm_cluster: no SLURM cluster answers (sinfo, srun -N1 true)" >&2
        exit 1
        ;;
    stop)
        [[ -e "$CONF" ]] && ! head -n 1 "$CONF" | grep -qxF "$MARK" && { note "$CONF is not this script's; not stopping anything"; exit 1; }
        stop_daemons
        if alive "$MUNGE_PID"; then kill "$(cat "$MUNGE_PID")" 2>/dev/null; fi
        note "stopped"
        ;;
    *)
        echo "usage: $0 [start [--no-install] | status | stop]" >&2
        exit 2
        ;;
esac
