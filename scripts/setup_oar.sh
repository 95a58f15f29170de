#!/usr/bin/env bash
# Brings up a real single-node OAR 2.5.9 (PostgreSQL, the node's sshd on port 6667, the OAR
# server Almighty) from Debian's packages, for CI and for developers who test the OAR backend.
# OAR refuses jobs from root and from oar, so it also creates an ordinary user, jaxsurro-oar,
# for the tests to submit as (runs go in its home directory).
# Idempotent: on a machine where the cluster is up, a run only checks (about two seconds).
# It stops only what it started, by pid (the pids are kept in /run/jaxsurro-oar).
# Where it cannot run (not root, packages unavailable) it prints one line saying why, writes the
# reason to .cache/setup_oar.status for the tests to print, and exits 0.
# Usage: sudo bash scripts/setup_oar.sh [stop]      (OAR_SETUP_TIMEOUT=seconds, default 120)
set -euo pipefail

# libjson-perl: oarstat -J and oarnodes -J need it, and the OAR packages do not depend on it.
PACKAGES=(postgresql oar-server oar-server-pgsql oar-node oar-user oar-user-pgsql libjson-perl)
OAR_USER=jaxsurro-oar
OAR_CONF=/etc/oar/oar.conf
NODE=localhost  # the host name OAR connects to (with ssh -p 6667) and lists the resources under
# Like Slurm's OverSubscribe=FORCE:4: four job slots per core, so a server job and its clients run together.
RESOURCES=$((4 * $(nproc)))
SERVER_PID_FILE=/var/run/oar-server.pid  # written by /usr/sbin/oar-server: Almighty, leader of its process group
SSHD_PID_FILE=/var/run/oar-node_sshd.pid
STATE_DIR=/run/jaxsurro-oar  # the pids of the daemons this script started
REPO=$(cd "$(dirname "$0")/.." && pwd)
STATUS_FILE=$REPO/.cache/setup_oar.status  # "ready" or "unavailable: why", read by tests/live_oar.py
TIMEOUT=${OAR_SETUP_TIMEOUT:-120}
started_at=$SECONDS

SCRIPT_NAME=setup_oar
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # say, fail, wait_for, show_last_lines, missing_packages

# Says why OAR cannot be brought up here, on one line and in the status file, and exits 0.
unavailable() {
  echo "setup_oar: OAR not brought up: $*; the live OAR tests will say so and not run"
  write_status "unavailable: $*"
  exit 0
}

write_status() {
  { mkdir -p "$(dirname "$STATUS_FILE")" && echo "$1" >"$STATUS_FILE"; } 2>/dev/null \
    || echo "setup_oar: warning: cannot write $STATUS_FILE; the live OAR tests will ask for this script to run" >&2
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_in() { [ -s "$1" ] && head -n 1 "$1" | tr -d ' \n' || true; }
gone() { ! alive "$1"; }

# The resources of the node and their states, one "ID STATE" line each (oarnodes -J is keyed by resource id).
resources() {
  oarnodes -J 2>/dev/null | perl -MJSON -e '
    my $text = do { local $/; <STDIN> }; exit 0 unless $text =~ /^\s*\{/;  # or "/!\ No nodes to display"
    my $data = decode_json($text);
    for my $id (sort { $a <=> $b } keys %$data) {
      print "$id $data->{$id}{state}\n" if $data->{$id}{network_address} eq $ARGV[0];
    }' "$NODE"
}
alive_resources() { resources | awk '$2 == "Alive"' | wc -l; }

show_logs() { show_last_lines /var/log/oar.log /var/log/postgresql/postgresql-*-main.log; }

# --- stop -------------------------------------------------------------------------------
# Sends SIGTERM to Almighty's process group (its children: the scheduler, bipbip, sarko...). The pid file
# names Almighty; /usr/sbin/oar-server made the session, whose id is the group's.
stop_server() {
  local pid=$1 group
  group=$(ps -o pgid= -p "$pid" | tr -d ' ')
  if [ -n "$group" ] && [ "$group" != "$(ps -o pgid= -p $$ | tr -d ' ')" ]; then
    kill -TERM -- "-$group"
  else
    kill -TERM "$pid"
  fi
}

# Stops, by pid, the daemons this script started: the server's process group, the node's sshd, PostgreSQL.
stop_started() {
  local name pid
  for name in oar-server oar-node-sshd postgresql; do
    pid=$(pid_in "$STATE_DIR/$name.pid")
    if alive "$pid"; then
      say "stopping $name (pid $pid)"
      case $name in
        oar-server) stop_server "$pid" ;;
        postgresql) kill -INT "$pid" ;;  # PostgreSQL's fast shutdown
        *) kill -TERM "$pid" ;;
      esac
      wait_for 30 "$name (pid $pid) to exit" gone "$pid" || fail "$name (pid $pid) did not exit within 30 s; stop it by that pid"
    fi
    rm -f "$STATE_DIR/$name.pid"
  done
  rm -f "$STATUS_FILE"
}

if [ "${1:-}" = stop ]; then
  [ "$(id -u)" = 0 ] || fail "stopping the daemons needs root: sudo bash scripts/setup_oar.sh stop"
  stop_started
  exit 0
elif [ $# -gt 0 ]; then
  fail "unknown argument '$1'; usage: bash scripts/setup_oar.sh [stop]"
fi

# --- who may bring it up -------------------------------------------------------------------
previous_status=$(cat "$STATUS_FILE" 2>/dev/null || true)
rm -f "$STATUS_FILE" 2>/dev/null || true
if [ "$(id -u)" != 0 ]; then
  if command -v oarnodes >/dev/null 2>&1 && [ "$(alive_resources)" -gt 0 ] && id "$OAR_USER" >/dev/null 2>&1; then
    write_status ready
    echo "oar: node ${NODE} up, $(alive_resources) resources Alive, submitting user ${OAR_USER} (checked, not root)"
    exit 0
  fi
  unavailable "bringing OAR up needs root (it installs ${PACKAGES[*]} and starts PostgreSQL, sshd and the OAR server): run sudo bash scripts/setup_oar.sh"
fi

# --- packages --------------------------------------------------------------------------------
mapfile -t missing < <(missing_packages "${PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || unavailable "packages ${missing[*]} are missing and there is no apt-get on this machine"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || unavailable "'apt-get update' failed, so packages ${missing[*]} cannot be installed"
  for package in "${missing[@]}"; do
    candidate=$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
      unavailable "package $package is not available from this machine's apt sources (OAR 2.5 is in Debian's main archive)"
    fi
  done
  say "installing ${missing[*]}"
  # Package scripts must not start daemons (PostgreSQL, sshd, the OAR server): this script starts what it needs.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  install_status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || install_status=$?
  [ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$install_status" = 0 ] || fail "apt-get install ${missing[*]} failed (exit $install_status)"
fi

install -d -m 0755 "$STATE_DIR"
conf_changed=0  # set when oar.conf changed: a running server must be restarted to read it
# Set when something was started or reconfigured, or the last run did not end ready: then a trivial job
# checks the whole chain.
changed=0
[ "$previous_status" = ready ] || changed=1

# --- PostgreSQL --------------------------------------------------------------------------------
# The cluster on port 5432, where oar.conf's DB_PORT points.
pg_on_5432() { pg_lsclusters -h | awk '$3 == 5432 { print $1, $2, $4, $6; exit }'; }
read -r pg_version pg_cluster pg_status pg_data < <(pg_on_5432) || true
if [ -z "${pg_version:-}" ]; then
  pg_version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  pg_cluster=main
  say "creating PostgreSQL cluster ${pg_version}/${pg_cluster}"
  pg_createcluster --port 5432 "$pg_version" "$pg_cluster" >/dev/null
  read -r pg_version pg_cluster pg_status pg_data < <(pg_on_5432)
fi
if [[ "$pg_status" != online* ]]; then
  say "starting PostgreSQL ${pg_version}/${pg_cluster}"
  pg_ctlcluster "$pg_version" "$pg_cluster" start || { show_logs; fail "PostgreSQL ${pg_version}/${pg_cluster} did not start; see its log above"; }
  pid_in "$pg_data/postmaster.pid" >"$STATE_DIR/postgresql.pid"
  changed=1
fi

# --- oar.conf and the database -------------------------------------------------------------------
# The stock oar.conf has empty database passwords, and oar-database refuses to create the database then.
for key in DB_BASE_PASSWD DB_BASE_PASSWD_RO; do
  if grep -q "^${key}=\"\"" "$OAR_CONF"; then
    say "setting ${key} in $OAR_CONF"
    sed -i "s/^${key}=\"\"/${key}=\"$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')\"/" "$OAR_CONF"
    changed=1
  fi
done
# No cpuset job manager: the resources are job slots (four per core), not cores, and it would delete
# the user's files in /tmp when their last job ends.
if grep -q '^JOB_RESOURCE_MANAGER_PROPERTY_DB_FIELD=' "$OAR_CONF"; then
  say "turning OAR's cpuset job manager off in $OAR_CONF"
  sed -i 's/^JOB_RESOURCE_MANAGER_PROPERTY_DB_FIELD=/#&/' "$OAR_CONF"
  conf_changed=1
  changed=1
fi
# The server schedules at most every SCHEDULER_MIN_TIME_BETWEEN_2_CALLS seconds (5 by default), and a job
# submitted just after a pass waits for the next wake-up, up to 10 s: 1 s lets a study's clients start sooner.
if ! grep -q '^SCHEDULER_MIN_TIME_BETWEEN_2_CALLS="1"$' "$OAR_CONF"; then
  say "setting SCHEDULER_MIN_TIME_BETWEEN_2_CALLS=\"1\" in $OAR_CONF"
  if grep -q '^#\?SCHEDULER_MIN_TIME_BETWEEN_2_CALLS=' "$OAR_CONF"; then
    sed -i 's/^#\?SCHEDULER_MIN_TIME_BETWEEN_2_CALLS=.*/SCHEDULER_MIN_TIME_BETWEEN_2_CALLS="1"/' "$OAR_CONF"
  else
    echo 'SCHEDULER_MIN_TIME_BETWEEN_2_CALLS="1"' >>"$OAR_CONF"
  fi
  conf_changed=1
  changed=1
fi
if ! oar-database --check >/dev/null 2>&1; then
  say "creating OAR's database"
  oar-database --create --db-is-local -y >/dev/null || fail "oar-database --create --db-is-local failed; see its output above"
  changed=1
fi

# --- the node's sshd (port 6667), through which the server starts jobs ------------------------------
if ! alive "$(pid_in "$SSHD_PID_FILE")"; then
  say "starting the OAR node's sshd on port 6667"
  install -d -m 0755 /run/sshd
  # The packaged sshd_config has the deprecated UsePrivilegeSeparation line: sshd warns about it on stderr.
  sshd_output=$(/usr/sbin/sshd -f /etc/oar/sshd_config -o "PidFile=$SSHD_PID_FILE" 2>&1) \
    || fail "the OAR node's sshd did not start: $sshd_output"
  wait_for 10 "sshd to write $SSHD_PID_FILE" sh -c "[ -s '$SSHD_PID_FILE' ]" || fail "the OAR node's sshd wrote no pid file"
  pid_in "$SSHD_PID_FILE" >"$STATE_DIR/oar-node-sshd.pid"
  changed=1
fi

# --- the server -------------------------------------------------------------------------------------
server_pid=$(pid_in "$SERVER_PID_FILE")
if alive "$server_pid" && [ "$conf_changed" = 1 ]; then
  [ "$(pid_in "$STATE_DIR/oar-server.pid")" = "$server_pid" ] \
    || fail "$OAR_CONF changed and the OAR server (pid $server_pid) was not started by this script; restart it, then run this script again"
  say "restarting the OAR server (pid $server_pid) to load $OAR_CONF"
  stop_server "$server_pid"
  wait_for 30 "the OAR server (pid $server_pid) to exit" gone "$server_pid" || fail "the OAR server (pid $server_pid) did not exit within 30 s"
fi
if ! alive "$(pid_in "$SERVER_PID_FILE")"; then
  say "starting the OAR server"
  rm -f "$SERVER_PID_FILE"
  /usr/sbin/oar-server || { show_logs; fail "the OAR server did not start; see the logs above"; }
  wait_for 10 "the OAR server to write $SERVER_PID_FILE" sh -c "[ -s '$SERVER_PID_FILE' ]" || fail "the OAR server wrote no pid file"
  pid_in "$SERVER_PID_FILE" >"$STATE_DIR/oar-server.pid"
  changed=1
fi

# --- the node's resources ---------------------------------------------------------------------------
have=$(resources | wc -l)
if [ "$have" -lt "$RESOURCES" ]; then
  say "registering $((RESOURCES - have)) resources on node ${NODE} (${RESOURCES} in all: four per core)"
  for _ in $(seq $((RESOURCES - have))); do
    oarnodesetting -a -h "$NODE" >/dev/null
  done
  changed=1
fi
if [ "$(alive_resources)" -lt "$RESOURCES" ]; then
  say "setting node ${NODE} Alive"
  oarnodesetting -s Alive -h "$NODE" >/dev/null
  changed=1
fi

# --- the submitting user ----------------------------------------------------------------------------
if ! id "$OAR_USER" >/dev/null 2>&1; then
  say "creating the user ${OAR_USER}, who submits the test jobs (OAR refuses root's)"
  useradd --create-home --shell /bin/bash "$OAR_USER"
  changed=1
fi
user_home=$(getent passwd "$OAR_USER" | cut -d: -f6)
# The user runs this checkout's virtual environment: open every directory on the way to its interpreter.
python=$REPO/.venv/bin/python
if [ -x "$python" ] && ! runuser -u "$OAR_USER" -- "$python" -c pass 2>/dev/null; then
  for target in "$REPO/.venv/bin" "$(dirname "$(readlink -f "$python")")"; do
    dir=$target
    while [ "$dir" != / ]; do
      if [ -z "$(find "$dir" -maxdepth 0 -perm -o+x)" ]; then
        say "letting ${OAR_USER} run ${python}: chmod o+x $dir"
        chmod o+x "$dir"
      fi
      dir=$(dirname "$dir")
    done
  done
  runuser -u "$OAR_USER" -- "$python" -c pass || fail "${OAR_USER} cannot run $python even with every directory on its way open"
fi

# --- a trivial job, submitted as the user ------------------------------------------------------------
job_state() { oarstat -f -J -j "$1" 2>/dev/null | perl -MJSON -e '
  my $text = do { local $/; <STDIN> }; exit 0 unless $text =~ /\S/;
  my $job = (values %{decode_json($text)})[0];
  print $job->{state}, " ", ($job->{exit_code} // "none"), "\n";'; }
job_ended() { case "$(job_state "$1")" in Terminated* | Error*) return 0 ;; *) return 1 ;; esac; }

if [ "$changed" = 1 ]; then
  check_dir=$user_home/setup_oar
  runuser -u "$OAR_USER" -- mkdir -p "$check_dir"
  output=$(cd "$check_dir" && runuser -u "$OAR_USER" -- oarsub -O check.%jobid%.out -E check.%jobid%.out "echo ok" 2>&1) \
    || { show_logs; fail "oarsub as ${OAR_USER} failed: $output"; }
  job_id=$(sed -n 's/^OAR_JOB_ID=\([0-9]*\)$/\1/p' <<<"$output")
  [ -n "$job_id" ] || fail "oarsub printed no OAR_JOB_ID=N line: $output"
  wait_for "$TIMEOUT" "trivial OAR job ${job_id} to finish" job_ended "$job_id" || {
    show_logs
    fail "OAR job ${job_id} is '$(job_state "$job_id")' ${TIMEOUT} s after its submission, expected Terminated; see the logs above"
  }
  result=$(job_state "$job_id")
  job_output=$(cat "$check_dir/check.$job_id.out" 2>/dev/null || true)
  if [ "$result" != "Terminated 0" ] || [ "$job_output" != ok ]; then
    show_logs
    fail "OAR job ${job_id} ended '${result}' with output '${job_output}', expected 'Terminated 0' and 'ok'; see the logs above"
  fi
  rm -f "$check_dir/check.$job_id.out"
fi

write_status ready
echo "oar: node ${NODE} $(alive_resources)/${RESOURCES} resources Alive, submitting user ${OAR_USER} (home ${user_home}) (ready after $((SECONDS - started_at)) s)"
