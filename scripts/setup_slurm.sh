#!/usr/bin/env bash
# Brings up a real single-node Slurm 22.05 cluster (munge, slurmctld, slurmd) from
# Debian's packages, for CI and for developers who test the Slurm backend locally.
# Idempotent: on a machine where the cluster is up, a run only checks (a tenth of a second).
# The slurm.conf is rewritten on every run so that a changed host name, core count or
# memory size is picked up (the daemons are restarted when it changed).
# Usage: sudo bash scripts/setup_slurm.sh      (SLURM_SETUP_TIMEOUT=seconds, default 60)
set -euo pipefail

PACKAGES=(slurm-wlm slurm-client munge libpmix2 libpmix-dev)
# The daemons and commands read this file (SLURM_CONF set elsewhere would point them away).
export SLURM_CONF=/etc/slurm/slurm.conf
SLURM_LOG_DIR=/var/log/slurm
SLURM_STATE_DIR=/var/lib/slurm/slurmctld
SLURM_SPOOL_DIR=/var/lib/slurm/slurmd
MUNGE_KEY=/etc/munge/munge.key
TIMEOUT=${SLURM_SETUP_TIMEOUT:-60}
NODE=$(hostname -s)
started_at=$SECONDS

SCRIPT_NAME=setup_slurm
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # say, fail, wait_for, show_last_lines, missing_packages

# The node's state as sinfo prints it (idle, mix, alloc, down*, drain, ...), or empty.
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1 || true; }

# True when the node accepts jobs: responding and neither down nor drained.
node_is_up() {
  case "$(node_state)" in
    idle | mix | alloc | comp) return 0 ;;
    *) return 1 ;;
  esac
}

summary() {
  local cpus memory
  cpus=$(sinfo -h -n "$NODE" -o %c 2>/dev/null | head -n 1)
  memory=$(sinfo -h -n "$NODE" -o %m 2>/dev/null | head -n 1)
  echo "slurm: node ${NODE} $(node_state), ${cpus} CPUs, ${memory} MiB, partition debug (ready after $((SECONDS - started_at)) s)"
}

show_logs() { show_last_lines "$SLURM_LOG_DIR/slurmctld.log" "$SLURM_LOG_DIR/slurmd.log" /var/log/munge/munged.log; }

if [ "$(id -u)" != 0 ]; then
  if command -v sinfo >/dev/null 2>&1 && node_is_up; then
    summary
    exit 0
  fi
  {
    echo "setup_slurm: the Slurm cluster is not up, and bringing it up needs root"
    echo "setup_slurm: (it installs ${PACKAGES[*]} and starts munged, slurmctld, slurmd). Run:"
    echo "  sudo bash scripts/setup_slurm.sh"
    echo "setup_slurm: which installs the packages with:"
    echo "  sudo sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PACKAGES[*]}'"
  } >&2
  exit 1
fi

# --- packages -------------------------------------------------------------------
mapfile -t missing < <(missing_packages "${PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || fail "missing packages ${missing[*]} and no apt-get on this machine; install them with the system's package manager"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- munge ------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
  say "writing a new munge key to $MUNGE_KEY"
  head -c 1024 /dev/urandom >"$MUNGE_KEY"
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

munge_works() { munge -n 2>/dev/null | unmunge 2>/dev/null | grep -q 'STATUS: *Success'; }
if ! munge_works; then
  if ! pgrep -x munged >/dev/null; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
  fi
  wait_for 15 "munge credentials to decode ('munge -n | unmunge' says Success)" munge_works || {
    show_logs
    fail "munge does not work: 'munge -n | unmunge' did not say Success within 15 s; see the munged log above"
  }
fi

# --- slurm.conf ---------------------------------------------------------------------
cpus=$(nproc)
memory_mib=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.95) }' /proc/meminfo)
conf=$(cat <<EOF
# Written by scripts/setup_slurm.sh: a single-node cluster for CI and development.
# Rewritten on every run of that script; edit the script, not this file.
ClusterName=jaxsurro
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=${SLURM_STATE_DIR}
SlurmdSpoolDir=${SLURM_SPOOL_DIR}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${SLURM_LOG_DIR}/slurmctld.log
SlurmdLogFile=${SLURM_LOG_DIR}/slurmd.log
# A node that was down (slurmd restarted, machine resumed) returns to service on registering.
ReturnToService=2
SlurmdTimeout=60
# Finished jobs stay visible to 'scontrol show job' for two minutes.
MinJobAge=120
KillWait=5
InactiveLimit=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mib} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)

install -d -m 0755 /etc/slurm "$SLURM_LOG_DIR" "$SLURM_STATE_DIR" "$SLURM_SPOOL_DIR"
conf_changed=0
host_changed=0
if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$conf" ]; then
  conf_changed=1
  previous_host=$(sed -n 's/^SlurmctldHost=\([^(]*\).*/\1/p' "$SLURM_CONF" 2>/dev/null || true)
  if [ -n "$previous_host" ] && [ "$previous_host" != "$NODE" ]; then
    host_changed=1
  fi
  say "writing $SLURM_CONF (node ${NODE}, ${cpus} CPUs, ${memory_mib} MiB)"
  printf '%s\n' "$conf" >"$SLURM_CONF.new"
  chmod 0644 "$SLURM_CONF.new"
  mv "$SLURM_CONF.new" "$SLURM_CONF"
fi

# --- daemons ------------------------------------------------------------------------
# Pids of a daemon, started under its name or under Debian's alternative (slurmd-wlm).
daemon_pids() {
  pgrep -x "$1" || true
  pgrep -x "$1-wlm" || true
}
daemon_gone() { [ -z "$(daemon_pids "$1")" ]; }

stop_daemon() {
  local name=$1 pids
  pids=$(daemon_pids "$name")
  [ -z "$pids" ] && return 0
  say "stopping $name (pid $(echo $pids)) to load the new configuration"
  # shellcheck disable=SC2086  # one pid per word
  kill $pids 2>/dev/null || true  # one may have exited already
  wait_for 30 "$name to exit" daemon_gone "$name" || fail "$name (pid $(echo $pids)) did not exit within 30 s after SIGTERM; stop it by that pid and run this script again"
}

if [ "$conf_changed" = 1 ]; then
  stop_daemon slurmd
  stop_daemon slurmctld
fi

if daemon_gone slurmctld; then
  clear_state=()
  if [ "$host_changed" = 1 ]; then
    say "the host name changed to ${NODE}: starting slurmctld with a cleared state"
    clear_state=(-c)
  else
    say "starting slurmctld"
  fi
  slurmctld "${clear_state[@]}" || { show_logs; fail "slurmctld did not start; see its log above"; }
fi
wait_for "$TIMEOUT" "slurmctld to answer ('scontrol ping' says UP)" sh -c 'scontrol ping 2>/dev/null | grep -q UP' || {
  show_logs
  fail "slurmctld did not answer within ${TIMEOUT} s; see its log above"
}

if daemon_gone slurmd; then
  say "starting slurmd"
  slurmd || { show_logs; fail "slurmd did not start; see its log above"; }
fi

# --- the node -----------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
last_state=""
last_resume=-100
until node_is_up; do
  state=$(node_state)
  if [ "$state" != "$last_state" ]; then
    say "waiting up to $((deadline - SECONDS)) s for node ${NODE} to be idle (now: ${state:-not listed})"
    last_state=$state
  fi
  case "$state" in
    down | drain | drng | drained | fail | failg)
      if [ $((SECONDS - last_resume)) -ge 5 ]; then
        reason=$(sinfo -h -n "$NODE" -o %E 2>/dev/null | head -n 1)
        say "resuming node ${NODE} (state ${state}, reason: ${reason:-none})"
        scontrol update nodename="$NODE" state=resume || true
        last_resume=$SECONDS
      fi
      ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    show_logs
    fail "node ${NODE} is '${state:-not listed}', expected idle or mix, ${TIMEOUT} s after start; see the logs above, fix, and run this script again"
  fi
  sleep 0.2  # polling interval of a condition with a deadline
done

summary
