# Shell helpers shared by scripts/setup_slurm.sh and scripts/setup_oar.sh, which source this file
# (it is not run on its own). The sourcing script sets SCRIPT_NAME first: say and fail prefix their
# messages with it.

say() { echo "${SCRIPT_NAME}: $*"; }
fail() { echo "${SCRIPT_NAME}: error: $*" >&2; exit 1; }

# Runs "$@" until it succeeds; gives up after $1 seconds, naming what it waited for.
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  "$@" && return 0
  say "waiting up to ${timeout} s for ${what}"
  until "$@"; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2  # polling interval of a condition with a deadline
  done
}

# Prints the last 25 lines of each given log file that exists, to stderr.
show_last_lines() {
  local log
  for log in "$@"; do
    if [ -f "$log" ]; then
      echo "----- last lines of $log" >&2
      tail -n 25 "$log" >&2
    fi
  done
}

# Prints, one a line, those of the given Debian packages that are not installed.
missing_packages() {
  local package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || echo "$package"
  done
}
