#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's slurm-wlm + munge) on this machine, for the SLURM tests and for
# developers: no systemd, daemons run as root in the background, state/logs/pids under $SLURM_SVC_DIR.
#
#   sudo bash tests/services/slurm.sh up      # install if needed, start munged, slurmctld, slurmd, the requeue kick
#   sudo bash tests/services/slurm.sh down    # stop them by PID (and `scontrol shutdown`)
#
# The kick loop makes requeued jobs eligible at once: this SLURM holds a requeued batch job ~120 s
# (Reason=BeginTime) before it may start again, which would dominate every preemption test.
# Accounting (slurmdbd) is not started: `sacct` is unavailable, so jobs are followed with squeue and the run's
# own ledger. Recipe and gotchas: ../shared/reference/ci_services.sh, feasibility.md §6.
set -euo pipefail
CMD=${1:-up}
BASE=${SLURM_SVC_DIR:-/tmp/meanflow-slurm}

down() {
  set +e
  [ -f "$BASE/kick.pid" ] && kill "$(cat "$BASE/kick.pid")" 2>/dev/null
  scontrol shutdown >/dev/null 2>&1          # slurmctld and slurmd
  for f in slurmctld slurmd; do [ -f "$BASE/$f.pid" ] && kill "$(cat "$BASE/$f.pid")" 2>/dev/null; done
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  for _ in $(seq 1 150); do   # gone, so that an `up` right after starts fresh daemons
    [ -z "$(ps -eo comm= | grep -E '^(slurmctld|slurmd|munged)$')" ] && break; sleep 0.1; done
  pkill -KILL -x slurmctld; pkill -KILL -x slurmd; pkill -KILL -x munged   # whatever ignored the polite stop
  rm -f "$BASE"/*.pid
  echo "slurm services stopped"
}
[ "$CMD" = down ] && { down; exit 0; }
[ "$CMD" = up ] || { echo "usage: $0 up|down" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: run as root (the daemons and /etc/slurm need it)" >&2; exit 2; }

started=$(date +%s)
mkdir -p "$BASE"/{state,spool,log}
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# ---- munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge; chmod 0700 /etc/munge /var/log/munge; chmod 0711 /var/lib/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null | unmunge >/dev/null || { echo "munge does not work" >&2; exit 1; }

# ---- slurm.conf: this machine's CPUs and memory, one partition
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 512 ))   # above the real memory: node INVAL
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=meanflow-ci
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool
SlurmctldPidFile=${BASE}/slurmctld.pid
SlurmdPidFile=${BASE}/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# setsid + redirected output: a backgrounded daemon must not hold the CI step's stdout open
pgrep -x slurmctld >/dev/null || setsid /usr/sbin/slurmctld -i </dev/null >"$BASE/log/slurmctld.out" 2>&1
for _ in $(seq 1 100); do [[ "$(timeout 5 scontrol ping 2>/dev/null)" == *"is UP"* ]] && break; sleep 0.1; done
[[ "$(timeout 5 scontrol ping 2>/dev/null)" == *"is UP"* ]] || { echo "slurmctld did not start" >&2; tail -n 20 "$BASE"/log/slurmctld.*; exit 1; }
pgrep -x slurmd >/dev/null || setsid /usr/sbin/slurmd </dev/null >"$BASE/log/slurmd.out" 2>&1
for _ in $(seq 1 300); do [ "$(timeout 5 sinfo -h -n "$HOST" -o '%t' 2>/dev/null)" = idle ] && break; sleep 0.1; done
[ "$(timeout 5 sinfo -h -n "$HOST" -o '%t')" = idle ] || { echo "SLURM node not idle" >&2; sinfo -R; tail -n 20 "$BASE"/log/slurm*.log; exit 1; }

if ! { [ -f "$BASE/kick.pid" ] && kill -0 "$(cat "$BASE/kick.pid")" 2>/dev/null; }; then
  # A job is kicked after 5 s held: kicked at once, it can be scheduled while its previous instance is still being
  # torn down on the node, and SLURM then kills it for good ("Job credential revoked").
  setsid bash -c 'declare -A held; while true; do
      now=$(date +%s); declare -A seen=()
      for j in $(squeue -h -t PD -o "%i %r" 2>/dev/null | awk "/BeginTime/{print \$1}"); do
        seen[$j]=1; held[$j]=${held[$j]:-$now}
        if (( now - held[$j] >= 5 )); then
          scontrol update JobId="$j" StartTime=now && echo "$(date +%T) kicked $j"; unset "held[$j]"; fi
      done
      for j in "${!held[@]}"; do [ -n "${seen[$j]:-}" ] || unset "held[$j]"; done
      sleep 1; done' </dev/null >"$BASE/log/kick.log" 2>&1 &
  echo $! > "$BASE/kick.pid"
fi
echo "slurm up in $(( $(date +%s) - started )) s: $(sinfo -h -o "%P %a %D %t %N")"
