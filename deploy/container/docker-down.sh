#!/usr/bin/env bash
# Stops the dockerd that deploy/container/docker-up.sh started, and nothing else: without
# its pid file (a daemon started some other way) this only says so. Running containers
# are stopped by dockerd itself on SIGTERM (it waits for them, then exits).
set -o errexit -o pipefail -o nounset
# shellcheck source=deploy/container/lib.sh
. "$(dirname "$0")/lib.sh"

PIDFILE="$DOCKER_STATE/dockerd.pid"
if [ ! -f "$PIDFILE" ]; then log "no dockerd started by docker-up.sh ($PIDFILE absent): nothing to stop"; exit 0; fi
pid=$(cat "$PIDFILE")
if ! kill -0 "$pid" 2>/dev/null || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
  log "dockerd (pid $pid) is no longer running"; rm -f "$PIDFILE"; exit 0
fi
kill -TERM "$pid"
# dockerd gives each container its stop timeout (compose sets up to 60 s), then exits.
for _ in $(seq 900); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then log "dockerd did not stop in 90 s; killing"; kill -KILL "$pid"; fi
rm -f "$PIDFILE"
log "dockerd (pid $pid) stopped"
