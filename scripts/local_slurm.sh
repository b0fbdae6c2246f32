#!/bin/bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm_real.py).
#
#   sudo bash scripts/local_slurm.sh start    # install (Debian: slurm-wlm, munge) if missing, configure, start
#   sudo bash scripts/local_slurm.sh status   # exit 0 when the node takes jobs
#   sudo bash scripts/local_slurm.sh stop     # cancel every job, stop slurmd, slurmctld and munged
#
# Idempotent: `start` on a running cluster with the same configuration does nothing; with a changed
# configuration it restarts the daemons. It writes /etc/slurm/slurm.conf (refusing to replace one it
# did not write), a munge key when there is none, and keeps its state, spool and logs under
# /var/spool/slurm-local and /var/log/slurm-local. Needs root.
#
# The node: this host, with the CPUs and memory `slurmd -C` finds (CPUs = nproc), cores as the
# consumable resource (select/cons_tres, CR_Core; OverSubscribe=FORCE:4 lets 4 jobs share a CPU), JobRequeue=1 (batch jobs may be
# requeued), ReturnToService=2 (the node returns to service by itself after a restart), no
# accounting (use `scontrol show job`: JobState, Restarts, ExitCode), ProctrackType=proctrack/linuxproc
# and TaskPlugin=task/none (no cgroups needed, so it also runs inside a container).
#
# The wait before a requeued job starts again (measured here with `scontrol requeue`, 22.05.8):
# * AuthInfo=cred_expire (default 120 s): slurmctld sets a requeued job's BeginTime to
#   now + cred_expire + 1, so the old job's credential has expired before the new one starts
#   ("This also controls how long a requeued job must wait before starting again", slurm.conf(5)).
#   The job then waits with Reason=BeginTime.
# * After BeginTime, the job waits for the next scheduling pass: the main scheduler runs every
#   sched_interval (default 60 s), backfill every bf_interval (default 30 s). Together about
#   2.5 minutes by default.
# Measured from `scontrol requeue` of a running batch job to its second start (sleep job, idle node):
#   defaults (cred_expire=120, no SchedulerParameters)              175 s
#   cred_expire=5                                                    26 s
#   cred_expire=5, SchedulerParameters=sched_interval=2,bf_interval=1  6-7 s   <- used here
# 5 s is the smallest cred_expire slurmctld accepts: with 2 it logs "AuthInfo=cred_expire=2 invalid"
# and falls back to 120 s (so this script refuses values below 5). A production cluster keeps the
# defaults: credentials this short are only safe on a single, lightly loaded node.
#
# Also seen on this cluster: --signal=USR1@N arrives up to about 30 s before N (slurmctld checks time
# limits and warning signals every 30 s; sbatch(1) says up to 60 s), and the time limit is enforced at
# the same coarse pace.
#
# Environment: SLURM_CRED_EXPIRE (seconds, >= 5, default 5); SLURM_SCHEDULER_PARAMETERS (default
# sched_interval=2,bf_interval=1; empty: SLURM's defaults); SLURM_OVERSUBSCRIBE (jobs sharing one CPU,
# default 4: the tests' jobs mostly wait for signals, time limits and requeues, so they run side by side).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=${CONF_DIR}/slurm.conf
STATE=/var/spool/slurm-local
LOGS=/var/log/slurm-local
MARK="# written by scripts/local_slurm.sh"
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-5}
OVERSUBSCRIBE=${SLURM_OVERSUBSCRIBE:-4}
SCHED_PARAMS=${SLURM_SCHEDULER_PARAMETERS-sched_interval=2,bf_interval=1}

say() { echo "local_slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }
if ! [[ ${CRED_EXPIRE} =~ ^[0-9]+$ ]] || [[ ${CRED_EXPIRE} -lt 5 ]]; then
    say "SLURM_CRED_EXPIRE=${CRED_EXPIRE}: must be an integer >= 5 (slurmctld replaces smaller values by 120)"; exit 2
fi
if ! [[ ${OVERSUBSCRIBE} =~ ^[1-9][0-9]*$ ]]; then
    say "SLURM_OVERSUBSCRIBE=${OVERSUBSCRIBE}: must be an integer >= 1 (jobs sharing one CPU)"; exit 2
fi

need_root() {
    [[ $(id -u) -eq 0 ]] || die "needs root (installs slurm-wlm and munge, starts munged, slurmctld and slurmd)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o DPkg::Lock::Timeout=300 || say "apt-get update failed; trying the install anyway"
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 slurm-wlm munge >/dev/null
}

node_line() {  # this host as slurmd sees it: CPUs, sockets, cores, threads, memory
    slurmd -C | head -n 1
}

render_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
${MARK}: a one-node test cluster (host ${host})
ClusterName=difftime-local
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
${SCHED_PARAMS:+SchedulerParameters=${SCHED_PARAMS}}
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
$(node_line) State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=$( \
    [[ ${OVERSUBSCRIBE} -gt 1 ]] && echo "FORCE:${OVERSUBSCRIBE}" || echo NO)
EOF
}

write_conf() {  # prints "changed" when the file was (re)written
    local wanted
    wanted=$(render_conf)
    if [[ -f ${CONF} ]] && ! grep -qF "${MARK}" "${CONF}"; then
        die "${CONF} exists and was not written by this script; not replacing it"
    fi
    mkdir -p "${CONF_DIR}" "${STATE}/ctld" "${STATE}/d" "${LOGS}"
    if [[ -f ${CONF} ]] && [[ "$(cat "${CONF}")" == "${wanted}" ]]; then
        return 0
    fi
    printf '%s\n' "${wanted}" > "${CONF}"
    chmod 644 "${CONF}"
    echo changed
}

munge_key() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge
    if [[ ! -s ${key} ]]; then
        dd if=/dev/urandom of="${key}" bs=1024 count=1 status=none
    fi
    chown munge:munge "${key}"
    chmod 400 "${key}"
}

alive() {  # alive PIDFILE: the daemon named there runs (a zombie left for an init that does not reap does not count)
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n ${pid} && -d /proc/${pid} ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/${pid}/status" 2>/dev/null
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM to the daemon, then wait up to 10 s for it to go
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    if alive "$1"; then kill "${pid}" 2>/dev/null || true; fi
    for _ in $(seq 40); do alive "$1" || return 0; sleep 0.25; done
    say "$1: process ${pid} did not stop"
}

start_munge() {
    munge_key
    if alive /run/munge/munged.pid; then
        return 0
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

wait_for_node() {  # until the node takes jobs
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
        case ${state} in
            idle|mix|mixed|alloc|allocated) return 0 ;;
            drain*|down*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node did not come up (state '${state}'; see ${LOGS}/slurmctld.log and slurmd.log)"
}

stop_daemons() {
    if alive /run/slurmctld.pid; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
        if [[ -n ${jobs} ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            scancel ${jobs} 2>/dev/null || true
            for _ in $(seq 40); do [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break; sleep 0.5; done
        fi
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        for _ in $(seq 40); do alive "${pidfile}" || break; sleep 0.25; done
        stop_pid "${pidfile}"
    done
}

start() {
    need_root
    install_packages
    local changed
    changed=$(write_conf)
    start_munge
    if [[ -n ${changed} ]] && { alive /run/slurmctld.pid || alive /run/slurmd.pid; }; then
        say "configuration changed: restarting the daemons"
        stop_daemons
    fi
    alive /run/slurmctld.pid || slurmctld
    alive /run/slurmd.pid || slurmd
    wait_for_node
    say "up: $(sinfo -h -N -o '%N %t CPUs=%c' | head -n 1)"
}

stop() {
    need_root
    stop_daemons
    stop_pid /run/munge/munged.pid
    say "stopped"
}

status() {
    if command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
        sinfo -N -o '%N %t CPUs=%c'
        return 0
    fi
    say "not running"
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash scripts/local_slurm.sh start|stop|status" >&2; exit 2 ;;
esac
