# Shared by the deploy/container and deploy/compose scripts. Source, do not run.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/iot-pipeline"          # built tools, jars, rootfs
# dockerd is one per machine, so its pid file is too (not per checkout).
DOCKER_STATE="${IOT_DOCKER_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/iot-pipeline/docker}"
TIMINGS="$CACHE/timings.log"                                  # one line per timed step

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# timed NAME CMD...: run CMD, log and append its wall time to $TIMINGS
timed() {
  local name=$1 start end rc=0; shift
  start=$(date +%s.%N)
  # In the background so that errexit still applies inside CMD (a function called as
  # `f || ...` would run with errexit off).
  "$@" &
  wait $! || rc=$?
  end=$(date +%s.%N)
  mkdir -p "$(dirname "$TIMINGS")"
  local secs; secs=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')
  printf '%s\t%s\t%ss\trc=%s\n' "$(date -u +%FT%TZ)" "$name" "$secs" "$rc" >> "$TIMINGS"
  log "$name: ${secs}s (rc=$rc)"
  return "$rc"
}

# apt_install PKG...: install the Debian packages that are missing (root or sudo)
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
