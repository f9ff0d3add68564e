#!/usr/bin/env bash
# Start, stop or check the project's single-node Apache Kafka (KRaft) on 127.0.0.1,
# run from Maven Central jars that install.sh caches outside git.
set -o errexit -o pipefail -o nounset
. "$(dirname "$0")/lib.sh"
DIR="$STATE/kafka"
PIDFILE="$DIR/kafka.pid"
HERE=$(cd "$(dirname "$0")" && pwd)

ready() {  # a real Kafka client call (metadata + cluster description), not an open port
  [ -x "$PY" ] || die "no Python environment at $PY; run deploy/local/install.sh"
  "$PY" "$HERE/probe.py" kafka "127.0.0.1:$KAFKA_PORT" "${1:-1}"
}

java_opts() {
  echo "-Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:ActiveProcessorCount=2"
  echo "-XX:CICompilerCount=2 -XX:ParallelGCThreads=2 -XX:ConcGCThreads=1"
  echo "-Djava.awt.headless=true -Dkafka.logs.dir=$DIR/logs -Dlog4j2.configurationFile=$HERE/kafka/log4j2.properties"
}

start() {
  [ -f "$KAFKA_LIBS/.complete" ] || die "Kafka jars missing at $KAFKA_LIBS; run deploy/local/install.sh"
  if alive "$PIDFILE" && ready 1; then log "kafka already up on 127.0.0.1:$KAFKA_PORT"; return 0; fi
  if ! alive "$PIDFILE" && ready 1 2>/dev/null; then
    die "something else answers Kafka on 127.0.0.1:$KAFKA_PORT (stop it, or set PIPELINE_LOCAL_KAFKA_PORT)"
  fi
  mkdir -p "$DIR/data" "$DIR/logs"
  sed -e "s|@STATE@|$STATE|g" -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    "$HERE/kafka/server.properties.in" > "$DIR/server.properties"
  local cp="$KAFKA_LIBS/*"
  # shellcheck disable=SC2046
  if [ ! -f "$DIR/data/meta.properties" ]; then
    local cid
    cid=$("$PY" -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode().lstrip("-") or "x")')
    java $(java_opts) -cp "$cp" kafka.tools.StorageTool format -t "$cid" -c "$DIR/server.properties" \
      --ignore-formatted > "$DIR/logs/format.log" 2>&1 || { cat "$DIR/logs/format.log" >&2; die "formatting storage failed"; }
  fi
  # shellcheck disable=SC2046
  nohup java $(java_opts) -cp "$cp" kafka.Kafka "$DIR/server.properties" > "$DIR/broker.log" 2>&1 &
  echo $! > "$PIDFILE"
  local started=$SECONDS
  for _ in $(seq 120); do
    alive "$PIDFILE" || { tail -n 30 "$DIR/broker.log" >&2; die "kafka exited during start-up"; }
    ready 1 2>/dev/null && break
    sleep 0.5
  done
  ready 5 || { tail -n 30 "$DIR/broker.log" >&2; die "kafka did not answer within 60 s"; }
  log "kafka $KAFKA_VERSION up on 127.0.0.1:$KAFKA_PORT (pid $(cat "$PIDFILE"), $((SECONDS - started)) s)"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pid "$PIDFILE" kafka ;;
  status) if alive "$PIDFILE" && ready 2; then echo "kafka up on 127.0.0.1:$KAFKA_PORT"; else echo "kafka down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
