#!/usr/bin/env bash
# A Docker engine on this machine, without a download site: Debian 12's docker.io (20.10)
# is installed when dockerd is missing, dockerd is started in the background when no
# daemon answers, and the script returns once `docker info` does.
#
#   deploy/container/docker-up.sh        # idempotent; prints the daemon's version
#   deploy/container/docker-down.sh      # stops dockerd only if docker-up.sh started it
#
# The pid of a dockerd started here is kept in $DOCKER_STATE/dockerd.pid (default
# ~/.local/state/iot-pipeline/docker/), its log in dockerd.log beside it. A daemon that
# was already running (systemd, someone else) is used as it is and never stopped.
#
# Any Docker CLI works against it: /usr/local/bin/docker (a newer CLI, first on PATH)
# negotiates the API version down to the daemon's (1.41), and Debian's /usr/bin/docker
# is the matching 20.10 CLI (the one with BuildKit built in, see build-base.sh).
set -o errexit -o pipefail -o nounset
# shellcheck source=deploy/container/lib.sh
. "$(dirname "$0")/lib.sh"

PIDFILE="$DOCKER_STATE/dockerd.pid"
LOGFILE="$DOCKER_STATE/dockerd.log"
WAIT_SECONDS="${DOCKER_UP_WAIT:-60}"

# `docker info` through Debian's CLI when present (it matches the daemon), else any.
docker_cli() { if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi; }
answers() { docker_cli info >/dev/null 2>&1; }

install_engine() {
  if [ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null; then return 0; fi
  # docker.io pulls in containerd, runc, tini (docker-init) and iptables. Its maintainer
  # scripts try to start the service; without an init system that is a no-op here.
  apt_install docker.io
  command -v dockerd >/dev/null || die "docker.io is installed but dockerd is not on PATH"
}

start_daemon() {
  mkdir -p "$DOCKER_STATE"
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    log "dockerd (pid $(cat "$PIDFILE"), started by this script) is starting"
    return 0
  fi
  rm -f "$PIDFILE"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "starting dockerd in the background (log: $LOGFILE)"
  # setsid: its own session, so that it outlives this shell and a Ctrl-C here.
  # dockerd starts its own containerd (no system containerd service is running).
  $sudo setsid dockerd >>"$LOGFILE" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
}

wait_ready() {
  local i
  for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
    answers && return 0
    if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      tail -n 30 "$LOGFILE" >&2 || true
      rm -f "$PIDFILE"
      die "dockerd exited during start-up (log above: $LOGFILE)"
    fi
    sleep 0.5
  done
  tail -n 30 "$LOGFILE" >&2 || true
  die "docker info did not answer within ${WAIT_SECONDS}s"
}

up() {
  if answers; then
    log "a Docker daemon already answers"
  else
    install_engine
    start_daemon
    wait_ready
  fi
  log "daemon: $(docker_cli version --format 'Docker {{.Server.Version}}, API {{.Server.APIVersion}}')"
  log "CLI on PATH ($(command -v docker)): $(docker version --format '{{.Client.Version}}, talking API {{.Client.APIVersion}}' 2>&1)"
}

timed "docker-up" up
