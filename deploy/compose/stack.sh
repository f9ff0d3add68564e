#!/usr/bin/env bash
# The compose stack from a bare Debian 12 machine, with or without a container registry:
#
#   deploy/compose/stack.sh up [ARGS]   # Docker engine (docker-up.sh), Compose v2
#                                       # (compose-v2.sh), base images (build-base.sh),
#                                       # then up -d --wait (builds the pipeline image
#                                       # only when missing: `up --build` after changes)
#   deploy/compose/stack.sh up --tracing [ARGS]  # ... with the profile "tracing": Jaeger
#                                       # (its image once: build-base.sh --jaeger, ~8 min to
#                                       # build the binary the first time) and the workers'
#                                       # tracing on; query API/UI on 127.0.0.1:16686
#                                       # (JAEGER_UI_HOST_PORT)
#   deploy/compose/stack.sh down        # compose down, volumes kept (--volumes: forget data)
#   deploy/compose/stack.sh ARGS...     # any docker compose command: ps, logs -f kafka, ...
#
# Each step is skipped when already done, and timed into ~/.cache/iot-pipeline/timings.log.
# The image names come from ~/.cache/iot-pipeline/images.env (written by build-base.sh);
# host ports from the environment as compose.yaml documents, e.g. on a machine where
# deploy/local's services hold 1883/9092 and the tests use 9100-9103:
#   MQTT_HOST_PORT=21883 KAFKA_HOST_PORT=29092 DPS_HOST_PORT=28085 INGEST_METRICS_PORT=29101 \
#   ROUTE_METRICS_PORT=29102 SINK_METRICS_PORT=29103 deploy/compose/stack.sh up
# The Docker daemon keeps running afterwards: deploy/container/docker-down.sh stops it.
set -o errexit -o pipefail -o nounset
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=deploy/container/lib.sh
. "$HERE/../container/lib.sh"
ENV_FILE="$CACHE/images.env"

compose() {
  local env=(); [ -f "$ENV_FILE" ] && env=(--env-file "$ENV_FILE")
  # Builds: without the buildx plugin Compose v2.40 warns that it cannot use Bake and
  # falls back to its own BuildKit client, through the daemon (works with 20.10).
  docker compose "${env[@]}" -f "$HERE/compose.yaml" "$@"
}

images_ready() {  # images_ready [VAR...]: the base images (and these) exist
  [ -f "$ENV_FILE" ] || return 1
  local var
  for var in PYTHON_IMAGE MOSQUITTO_IMAGE KAFKA_IMAGE "$@"; do
    grep -q "^$var=" "$ENV_FILE" || return 1
    docker image inspect "$(sed -n "s/^$var=//p" "$ENV_FILE")" >/dev/null 2>&1 || return 1
  done
}

case "${1:-}" in
  up)
    shift
    base=() images=()
    if [ "${1:-}" = --tracing ]; then
      shift
      base=(--jaeger) images=(JAEGER_IMAGE)
      # Later commands see the jaeger service only with the profile in their environment:
      #   COMPOSE_PROFILES=tracing deploy/compose/stack.sh logs jaeger   (or ... down)
      export COMPOSE_PROFILES=tracing TRACING_ENABLED=true
    fi
    "$ROOT/deploy/container/docker-up.sh"
    docker compose version 2>/dev/null | grep -q ' v2\.' || "$HERE/compose-v2.sh"
    images_ready "${images[@]}" || "$ROOT/deploy/container/build-base.sh" "${base[@]}"
    # Every build writes a new image id (BuildKit stamps the creation time), which makes
    # compose recreate the containers: hence no unconditional build here.
    timed "compose up -d --wait $*" compose up -d --wait "$@"
    compose ps
    ;;
  "" | -h | --help) sed -n '2,/^set -o/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) compose "$@" ;;
esac
