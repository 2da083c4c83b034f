#!/usr/bin/env bash
# A real SLURM cluster on this one machine (Debian's slurm-wlm + munge), for the SLURM tests and for developers:
# no systemd, daemons run as root in the background, state/logs/pids under $SLURM_SVC_DIR.
#
#   sudo bash tests/services/slurm.sh up      # install if needed and start everything below
#   sudo bash tests/services/slurm.sh down    # stop, by PID, only what `up` started; delete its namespaces
#
# Drills on the hosts of `multi` (the multi-host tests use them):
#   ... cut-links | heal-links      drop | restore the traffic between the hosts; each still reaches this side
#                                   (slurmctld, the tests' S3 server): a network partition between the hosts
#   ... lose-host mf-n1             the host dies: its link goes down, every process in it is killed (no peer
#                                   hears a connection close), and slurmctld marks it DOWN at once, as it does
#                                   itself once SlurmdTimeout (30 s) passes without an answer
#   ... revive-host mf-n1           its link up and its slurmd started again; back to idle
#
# What `up` makes:
#   - partition `debug` (the default): this machine's own slurmd, node <hostname> at 127.0.0.1;
#   - partition `multi`: $SLURM_HOSTS (default 2) compute hosts mf-n1, mf-n2, ... Each is a Linux network
#     namespace of the same name with its own address 10.213.7.1<i> on a bridge mf-br0 (10.213.7.1 on this side),
#     its own host name (a UTS namespace) and its own slurmd. So MASTER_ADDR really names another host and gloo
#     really crosses an interface. The file system is shared (the run directory and the venv are the same paths
#     everywhere); a service for the hosts (the tests' S3 server) listens on 10.213.7.1. Host names resolve on the
#     hosts through /etc/netns/<ns>/hosts, mounted over /etc/hosts in each host's mount namespace.
#     Where namespaces cannot be made (no CAP_SYS_ADMIN), `multi` is left out and the multi-node tests skip.
#   - accounting ($SLURM_ACCOUNTING, default 1): MariaDB + slurmdbd, so `sacct` answers;
#   - the requeue kick: this SLURM holds a requeued batch job ~120 s (Reason=BeginTime) before it may start
#     again, which would dominate every preemption test; a loop makes it eligible after 5 s.
set -euo pipefail
CMD=${1:-up}
BASE=${SLURM_SVC_DIR:-/tmp/meanflow-slurm}
HOSTS=${SLURM_HOSTS:-2}
ACCOUNTING=${SLURM_ACCOUNTING:-1}
NET=10.213.7            # the hosts' /24: gateway .1, host i at .1<i>
BRIDGE=mf-br0

# ---------------------------------------------------------------------------------------------------- down
stop_pid() {   # stop_pid <pid file> <command name>: TERM, wait, KILL — only that PID, and only if it is still <name>
  local file=$1 name=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

down() {
  set +e
  stop_pid "$BASE/kick.pid" bash
  for f in "$BASE"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  stop_pid "$BASE/slurmctld.pid" slurmctld
  stop_pid "$BASE/slurmdbd.pid" slurmdbd
  stop_pid "$BASE/mariadb.pid" mariadbd
  stop_pid "$BASE/munged.pid" munged
  remove_hosts
  echo "slurm services stopped"
}
remove_hosts() {   # ours by name: the hosts this script makes are mf-n1..mf-n<SLURM_HOSTS> and mf-br0
  local ns
  for ns in $(sort -u "$BASE/namespaces" 2>/dev/null); do   # job processes left in our hosts, then the hosts
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    ip link del "$ns-br" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  rm -f "$BASE/namespaces"
  [ -f "$BASE/bridge" ] && ip link del "$BRIDGE" 2>/dev/null && rm -f "$BASE/bridge"
  return 0
}
start_host_slurmd() {   # start_host_slurmd <host>
  # its own network, host name (UTS) and /etc/hosts (a mount namespace). Not `ip netns exec`: it remounts /sys,
  # hiding /sys/fs/cgroup, and slurmd then refuses to start.
  local ns=$1
  mkdir -p "$BASE/spool/$ns"
  setsid nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
    "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $ns && exec /usr/sbin/slurmd -N $ns" \
    </dev/null >"$BASE/log/slurmd-$ns.out" 2>&1
}
wait_for() {   # wait_for <tenths of a second> <command...>: bounded poll; the command's status at the end
  local n=$1; shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@" >/dev/null 2>&1
}
idle() { [ "$(timeout 5 sinfo -h -n "$1" -o '%t' 2>/dev/null)" = idle ]; }
our_host() {   # our_host <name>: one of the hosts `up` made, or exit 2
  grep -qx "$1" "$BASE/namespaces" 2>/dev/null || { echo "$0: $1 is not a host of this cluster" >&2; exit 2; }
}
isolate_links() {   # isolate_links on|off: bridge ports in isolation reach the bridge (this side), not each other
  local ns
  for ns in $(sort -u "$BASE/namespaces"); do bridge link set dev "$ns-br" isolated "$1"; done
}

[ "$CMD" = down ] && { down; exit 0; }
case "$CMD" in up|cut-links|heal-links|lose-host|revive-host) ;; *)
  echo "usage: $0 up|down|cut-links|heal-links|lose-host HOST|revive-host HOST" >&2; exit 2;; esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (the daemons, namespaces and /etc/slurm need it)" >&2; exit 2; }
case "$CMD" in
  cut-links) isolate_links on; exit 0;;
  heal-links) isolate_links off; exit 0;;
  lose-host)
    our_host "${2:-}"
    ip link set "$2-br" down
    for pid in $(ip netns pids "$2"); do kill -KILL "$pid" 2>/dev/null; done
    timeout 20 scontrol update NodeName="$2" State=DOWN Reason="lost host (slurm.sh lose-host)"
    exit 0;;
  revive-host)   # (a host that was not lost is left as it is)
    our_host "${2:-}"
    ip link set "$2-br" up
    for pid in $(ip netns pids "$2"); do [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] && exit 0; done
    start_host_slurmd "$2"
    wait_for 300 idle "$2" || { echo "SLURM node $2 not idle" >&2; sinfo -R; exit 1; }
    exit 0;;
esac

started=$(date +%s)
mkdir -p "$BASE"/{state,spool,log}
need=slurm-wlm; command -v slurmctld >/dev/null && command -v munged >/dev/null && need=
[ "$ACCOUNTING" = 1 ] && ! { command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; } \
  && need="$need slurmdbd mariadb-server"
if [ -n "$need" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge $need >/dev/null
fi
# ---- munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge; chmod 0700 /etc/munge /var/log/munge; chmod 0711 /var/lib/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$BASE/munged.pid"   # ours to stop
  wait_for 50 munge_ok || { echo "munge does not work" >&2; exit 1; }
fi

# ---- the hosts: network namespaces on a bridge
HOST=$(hostname -s)
CTLD_ADDR=127.0.0.1
NODES=(); MULTI=""
make_hosts() {
  echo "$BRIDGE" > "$BASE/bridge"
  ip link del "$BRIDGE" 2>/dev/null
  ip link add "$BRIDGE" type bridge || return 1
  ip addr add "$NET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
  local hosts_file
  hosts_file=$(printf '127.0.0.1 localhost\n%s.1 %s mf-gateway\n' "$NET" "$HOST"
               for i in $(seq 1 "$HOSTS"); do echo "$NET.1$i mf-n$i"; done)
  for i in $(seq 1 "$HOSTS"); do
    local ns=mf-n$i
    echo "$ns" >> "$BASE/namespaces"
    ip netns del "$ns" 2>/dev/null; ip link del "$ns-br" 2>/dev/null   # ours, left by a killed `up`
    ip netns add "$ns" || return 1
    ip link add "$ns-br" type veth peer name "$ns-eth" || return 1
    ip link set "$ns-br" master "$BRIDGE" && ip link set "$ns-br" up
    ip link set "$ns-eth" netns "$ns"
    ip -n "$ns" link set "$ns-eth" name eth0
    ip -n "$ns" addr add "$NET.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    mkdir -p "/etc/netns/$ns" && echo "$hosts_file" > "/etc/netns/$ns/hosts"
    NODES+=("$ns")
  done
}
if [ "$HOSTS" -gt 0 ]; then
  rm -f "$BASE/namespaces"
  if make_hosts; then
    CTLD_ADDR=$NET.1; MULTI=$(IFS=,; echo "${NODES[*]}")
  else
    echo "warning: no network namespaces here: the multi-host partition is left out (multi-node tests skip)" >&2
    remove_hosts; NODES=()
  fi
fi

# ---- accounting: MariaDB on a socket only, slurmdbd
ACCT="AccountingStorageType=accounting_storage/none"
if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mariadb -uroot -e 'select 1' >/dev/null 2>&1; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # setsid + redirects: a backgrounded daemon must not hold the CI step's stdout open
    setsid runuser -u mysql -- /usr/sbin/mariadbd --skip-networking --socket=/run/mysqld/mysqld.sock \
      --datadir=/var/lib/mysql --pid-file=/run/mysqld/mariadbd.pid --log-error=/run/mysqld/mariadb.err \
      </dev/null >/dev/null 2>&1 &
    wait_for 300 mariadb -uroot -e 'select 1' || { echo "mariadb did not start" >&2; tail /run/mysqld/mariadb.err; exit 1; }
    cp /run/mysqld/mariadbd.pid "$BASE/mariadb.pid"   # ours to stop
  fi
  mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
PidFile=${BASE}/slurmdbd.pid
LogFile=${BASE}/log/slurmdbd.log
CONF
  chmod 600 /etc/slurm/slurmdbd.conf        # slurmdbd refuses a world-readable conf with a password
  if ! pgrep -x slurmdbd >/dev/null; then
    setsid /usr/sbin/slurmdbd </dev/null >"$BASE/log/slurmdbd.out" 2>&1
    wait_for 200 grep -q 'slurmdbd version .* started' "$BASE/log/slurmdbd.log" \
      || { echo "slurmdbd did not start" >&2; tail "$BASE/log/slurmdbd.log"; exit 1; }
  fi
  timeout 20 sacctmgr -i add cluster meanflow-ci >/dev/null 2>&1 || true   # before slurmctld registers
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
fi

# ---- slurm.conf: this machine's CPUs and memory on every node; `debug` here, `multi` on the hosts
CPUS=$(nproc)
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 512 ))   # above the real memory: node INVAL
mkdir -p /etc/slurm
{
cat <<CONF
ClusterName=meanflow-ci
SlurmctldHost=${HOST}(${CTLD_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool/%n
SlurmctldPidFile=${BASE}/slurmctld.pid
SlurmdPidFile=${BASE}/slurmd-%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${ACCT}
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
SlurmdTimeout=30
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
for i in "${!NODES[@]}"; do
  echo "NodeName=${NODES[$i]} NodeAddr=$NET.1$((i + 1)) CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
done
[ -n "$MULTI" ] && echo "PartitionName=multi Nodes=${MULTI} MaxTime=INFINITE State=UP OverSubscribe=NO"
} > /etc/slurm/slurm.conf

ctld_up() { [[ "$(timeout 5 scontrol ping 2>/dev/null)" == *"is UP"* ]]; }
if ! pgrep -x slurmctld >/dev/null; then
  setsid /usr/sbin/slurmctld -i </dev/null >"$BASE/log/slurmctld.out" 2>&1
  wait_for 100 ctld_up || { echo "slurmctld did not start" >&2; tail -n 20 "$BASE"/log/slurmctld.*; exit 1; }
else
  timeout 20 scontrol reconfigure
fi
[ -f "$BASE/slurmd-$HOST.pid" ] && kill -0 "$(cat "$BASE/slurmd-$HOST.pid")" 2>/dev/null \
  || setsid /usr/sbin/slurmd </dev/null >"$BASE/log/slurmd-$HOST.out" 2>&1
for ns in "${NODES[@]}"; do start_host_slurmd "$ns"; done
for node in "$HOST" "${NODES[@]}"; do
  wait_for 300 idle "$node" || { echo "SLURM node $node not idle" >&2; sinfo -R; tail -n 20 "$BASE"/log/slurm*.log; exit 1; }
done

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
echo "slurm up in $(( $(date +%s) - started )) s:" $(sinfo -h -o "%P/%D/%t/%N")
