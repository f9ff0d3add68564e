#!/usr/bin/env bash
# Start, stop or check the project's Mosquitto on 127.0.0.1 (Debian's package, our config).
set -o errexit -o pipefail -o nounset
. "$(dirname "$0")/lib.sh"
DIR="$STATE/mosquitto"
PIDFILE="$DIR/mosquitto.pid"

ready() {  # a real MQTT round trip: read the broker's $SYS version topic
  mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t '$SYS/broker/version' -C 1 -W 2 >/dev/null 2>&1
}

start() {
  command -v mosquitto >/dev/null || die "mosquitto is not installed; run deploy/local/install.sh"
  if alive "$PIDFILE" && ready; then log "mosquitto already up on 127.0.0.1:$MQTT_PORT"; return 0; fi
  if ready; then
    # Debian's mosquitto service, or another checkout's broker: use it, and never stop it.
    log "MQTT already answers on 127.0.0.1:$MQTT_PORT (not started by this checkout): using it"
    return 0
  fi
  mkdir -p "$DIR/data"
  sed -e "s|@STATE@|$STATE|g" -e "s|@PORT@|$MQTT_PORT|g" "$(dirname "$0")/mosquitto.conf.in" > "$DIR/mosquitto.conf"
  # (mosquitto warns on stderr about running as root; the config keeps root on purpose)
  mosquitto -d -c "$DIR/mosquitto.conf" 2>>"$DIR/mosquitto.log"
  for _ in $(seq 100); do ready && break; sleep 0.1; done
  ready || { tail -n 20 "$DIR/mosquitto.log" >&2 || true; die "mosquitto did not answer within 10 s"; }
  log "mosquitto $(mosquitto -h | head -n 1 | awk '{print $3}') up on 127.0.0.1:$MQTT_PORT (pid $(cat "$PIDFILE"))"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pid "$PIDFILE" mosquitto ;;
  status)
    if ! ready; then echo "mosquitto down"; exit 1; fi
    if alive "$PIDFILE"; then echo "mosquitto up on 127.0.0.1:$MQTT_PORT"; else echo "mosquitto up on 127.0.0.1:$MQTT_PORT (not this checkout's)"; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
