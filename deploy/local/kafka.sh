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
  # The class-data archive install.sh made: a start takes a third of the CPU without it.
  [ -f "$KAFKA_CDS" ] && echo "-XX:SharedArchiveFile=$KAFKA_CDS"
  # More options: the test run's short-lived brokers add -XX:TieredStopAtLevel=1 (no
  # optimising compiler: half the start-up CPU, slower under sustained load).
  echo "${PIPELINE_LOCAL_KAFKA_EXTRA_OPTS:-}"
}

# Optional SASL_SSL listener (SCRAM-SHA-512 over TLS), as production clusters have:
#   PIPELINE_LOCAL_KAFKA_SASL_SSL_PORT  its port on 127.0.0.1 (unset: no such listener)
#   PIPELINE_LOCAL_KAFKA_KEYSTORE       PEM file: the broker's private key (PKCS#8,
#                                       unencrypted), its certificate (SAN IP:127.0.0.1)
#                                       and the CA; the tests make one with openssl
#   PIPELINE_LOCAL_KAFKA_SCRAM_USERS    user=password[,user=password...], created when the
#                                       storage is formatted (a fresh state directory)
# The PLAINTEXT listener stays, on loopback, for the broker itself and the readiness probe.
SASL_SSL_PORT="${PIPELINE_LOCAL_KAFKA_SASL_SSL_PORT:-}"
KEYSTORE="${PIPELINE_LOCAL_KAFKA_KEYSTORE:-}"
SCRAM_USERS="${PIPELINE_LOCAL_KAFKA_SCRAM_USERS:-}"

sasl_ssl_properties() {  # later keys win in a Java properties file
  [ -n "$SASL_SSL_PORT" ] || return 0
  [ -f "$KEYSTORE" ] || die "PIPELINE_LOCAL_KAFKA_KEYSTORE: no PEM keystore at '$KEYSTORE'"
  [ -n "$SCRAM_USERS" ] || die "PIPELINE_LOCAL_KAFKA_SCRAM_USERS is empty"
  cat <<PROPS

# SASL_SSL listener (PIPELINE_LOCAL_KAFKA_SASL_SSL_PORT)
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$KEYSTORE
PROPS
}

prepare() {  # the state directory, the broker's properties, and its formatted storage
  [ -f "$KAFKA_LIBS/.complete" ] || die "Kafka jars missing at $KAFKA_LIBS; run deploy/local/install.sh"
  mkdir -p "$DIR/data" "$DIR/logs"
  sed -e "s|@STATE@|$STATE|g" -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    "$HERE/kafka/server.properties.in" > "$DIR/server.properties"
  sasl_ssl_properties >> "$DIR/server.properties"
  [ -f "$DIR/data/meta.properties" ] && return 0
  local cid scram=() user
  cid=$("$PY" -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode().lstrip("-") or "x")')
  # SCRAM credentials live in the cluster metadata: they are created when it is formatted.
  if [ -n "$SASL_SSL_PORT" ]; then
    IFS=, read -r -a users <<< "$SCRAM_USERS"
    for user in "${users[@]}"; do scram+=(--add-scram "SCRAM-SHA-512=[name=${user%%=*},password=${user#*=}]"); done
  fi
  # shellcheck disable=SC2046
  java $(java_opts) -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$cid" -c "$DIR/server.properties" \
    --ignore-formatted "${scram[@]}" > "$DIR/logs/format.log" 2>&1 || { cat "$DIR/logs/format.log" >&2; die "formatting storage failed"; }
}

start() {
  [ -f "$KAFKA_LIBS/.complete" ] || die "Kafka jars missing at $KAFKA_LIBS; run deploy/local/install.sh"
  if alive "$PIDFILE" && ready 1; then log "kafka already up on 127.0.0.1:$KAFKA_PORT"; return 0; fi
  if ! alive "$PIDFILE" && ready 1 2>/dev/null; then
    # Another checkout's broker, or one of the machine's: use it, and never stop it.
    log "Kafka already answers on 127.0.0.1:$KAFKA_PORT (not started by this checkout): using it"
    return 0
  fi
  prepare
  # shellcheck disable=SC2046
  nohup java $(java_opts) -cp "$KAFKA_LIBS/*" kafka.Kafka "$DIR/server.properties" > "$DIR/broker.log" 2>&1 &
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

run() {  # in the foreground, for a supervisor (the test run) that owns the process
  prepare
  echo $$ > "$PIDFILE"
  # shellcheck disable=SC2046
  exec java $(java_opts) -cp "$KAFKA_LIBS/*" kafka.Kafka "$DIR/server.properties"
}

case "${1:-}" in
  start) start ;;
  run) run ;;
  stop) stop_pid "$PIDFILE" kafka ;;
  status)
    if ! ready 2 2>/dev/null; then echo "kafka down"; exit 1; fi
    if alive "$PIDFILE"; then echo "kafka up on 127.0.0.1:$KAFKA_PORT"; else echo "kafka up on 127.0.0.1:$KAFKA_PORT (not this checkout's)"; fi ;;
  *) echo "usage: $0 start|run|stop|status" >&2; exit 2 ;;
esac
