# Shared by the deploy/local scripts: where things live, and small helpers.
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE="${PIPELINE_LOCAL_STATE:-$ROOT/.local}"          # data, logs, pids: one ignored folder
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/iot-pipeline"   # downloaded jars, outside git
KAFKA_VERSION=4.1.1
UV_VERSION="${UV_VERSION:-0.13.9}"                     # installs the locked Python dependencies
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
# Kafka's class-data-sharing archive, made by install.sh for this JDK (a JDK update makes
# a new one; the JVM ignores an archive that does not match, with a warning).
KAFKA_CDS="$CACHE/kafka-$KAFKA_VERSION/cds-$( (java -version 2>&1 || true) | cksum | cut -d' ' -f1).jsa"
KAFKA_PORT="${PIPELINE_LOCAL_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${PIPELINE_LOCAL_KAFKA_CONTROLLER_PORT:-9093}"
MQTT_PORT="${PIPELINE_LOCAL_MQTT_PORT:-1883}"
PY="$ROOT/.venv/bin/python"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# alive PIDFILE: the process recorded in PIDFILE is running
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid PIDFILE NAME: SIGTERM, wait up to 30 s, then SIGKILL
stop_pid() {
  local pidfile=$1 name=$2 pid
  if ! alive "$pidfile"; then log "$name is not running"; rm -f "$pidfile"; return 0; fi
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 30 s; killing"; kill -KILL "$pid"; fi
  rm -f "$pidfile"
  log "$name stopped"
}
