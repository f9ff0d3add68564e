#!/usr/bin/env bash
# Bring both local brokers up, down, or report on them.
set -o errexit -o pipefail -o nounset
HERE=$(dirname "$0")
case "${1:-}" in
  up|start) "$HERE/mosquitto.sh" start; "$HERE/kafka.sh" start ;;
  down|stop) "$HERE/kafka.sh" stop; "$HERE/mosquitto.sh" stop ;;
  status) rc=0; "$HERE/mosquitto.sh" status || rc=1; "$HERE/kafka.sh" status || rc=1; exit $rc ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
