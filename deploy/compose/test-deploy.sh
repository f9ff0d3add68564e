#!/usr/bin/env bash
# `make test-deploy`: the container path, run for real, from a bare Debian 12 machine.
#
#  1. Docker: installs Debian's docker.io when dockerd is missing, starts dockerd when no
#     daemon answers (and stops it at the end, only then: docker-down.sh).
#  2. Compose v2 from the Go module proxy (compose-v2.sh), once.
#  3. Base images: upstream when a registry answers, else made from Debian packages and
#     Maven Central jars (build-base.sh), once.
#  4. The pipeline image twice, with BuildKit and with the classic builder, from
#     requirements.lock: both must hold the same `pip freeze`.
#  5. `compose up --wait` under its own project name, on host ports 2xxxx (nothing here
#     collides with deploy/local's 1883/9092 or the tests' 9100-9103): every container
#     with a health check healthy, every worker's /readyz 200.
#  6. The bundled demo replayed into it (the compose `replay` service), then exact
#     expectations read from the stack's Kafka on the host (deploy/compose/verify.py).
#  7. `compose stop` (SIGTERM, 60 s grace): every worker exits 0. Then `down --volumes`.
# TEST_DEPLOY_TRACING=1 adds the profile "tracing" (the Jaeger image once, build-base.sh
# --jaeger; the workers' tracing on; query API on 127.0.0.1:$JAEGER_UI_HOST_PORT) and, after
# step 6, the trace of inverter-a-02 from ingest through the DPS call (verify.py trace).
# Each step is timed into ~/.cache/iot-pipeline/timings.log; the whole run on stderr.
set -o errexit -o pipefail -o nounset
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=deploy/container/lib.sh
. "$HERE/../container/lib.sh"
cd "$ROOT"

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-iot-pipeline-test}"
export MQTT_HOST_PORT="${MQTT_HOST_PORT:-21883}" KAFKA_HOST_PORT="${KAFKA_HOST_PORT:-29092}"
export DPS_HOST_PORT="${DPS_HOST_PORT:-28085}" INGEST_METRICS_PORT="${INGEST_METRICS_PORT:-29101}"
export ROUTE_METRICS_PORT="${ROUTE_METRICS_PORT:-29102}" SINK_METRICS_PORT="${SINK_METRICS_PORT:-29103}"
export PIPELINE_IMAGE="${PIPELINE_IMAGE:-iot-pipeline:test}"
TRACING="${TEST_DEPLOY_TRACING:-0}"
if [ "$TRACING" = 1 ]; then
  export COMPOSE_PROFILES=tracing TRACING_ENABLED=true JAEGER_UI_HOST_PORT="${JAEGER_UI_HOST_PORT:-26686}"
fi
ENV_FILE="$CACHE/images.env"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || die "no .venv: run deploy/local/install.sh (make install) first"
STARTED=$(date +%s)

# Debian's 20.10 CLI (the daemon's own: BuildKit built in, no deprecation notice) if present.
DOCKER_CLI=/usr/bin/docker; [ -x "$DOCKER_CLI" ] || DOCKER_CLI=docker
docker_cli() { "$DOCKER_CLI" "$@"; }
compose() { docker compose --env-file "$ENV_FILE" -f "$HERE/compose.yaml" "$@"; }

images_ready() {
  [ -f "$ENV_FILE" ] || return 1
  local var vars=(PYTHON_IMAGE MOSQUITTO_IMAGE KAFKA_IMAGE)
  [ "$TRACING" = 0 ] || vars+=(JAEGER_IMAGE)
  for var in "${vars[@]}"; do
    grep -q "^$var=" "$ENV_FILE" || return 1
    docker image inspect "$(sed -n "s/^$var=//p" "$ENV_FILE")" >/dev/null 2>&1 || return 1
  done
}

started_dockerd=0
docker_cli info >/dev/null 2>&1 || started_dockerd=1
cleanup() {
  local rc=$?
  if [ -f "$ENV_FILE" ] && docker info >/dev/null 2>&1; then
    compose logs --no-color > "$CACHE/test-deploy.log" 2>&1 || true
    [ "$rc" = 0 ] || { log "failed: the stack's logs are in $CACHE/test-deploy.log"; compose ps -a >&2 || true; }
    timed "compose down --volumes" compose down --volumes --remove-orphans --timeout 60 >/dev/null 2>&1 || true
  fi
  if [ "$started_dockerd" = 1 ]; then "$ROOT/deploy/container/docker-down.sh" || true; fi
  log "test-deploy: $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - STARTED )) s"
  exit "$rc"
}
trap cleanup EXIT

# 1-3: engine, Compose, base images (each skipped when already there).
"$ROOT/deploy/container/docker-up.sh"
docker compose version 2>/dev/null | grep -q ' v2\.' || "$HERE/compose-v2.sh"
if ! images_ready; then
  if [ "$TRACING" = 1 ]; then "$ROOT/deploy/container/build-base.sh" --jaeger; else "$ROOT/deploy/container/build-base.sh"; fi
fi
set -a
# shellcheck source=/dev/null  # written by build-base.sh: PYTHON_IMAGE, MOSQUITTO_IMAGE, KAFKA_IMAGE
. "$ENV_FILE"
set +a

# 4: the pipeline image with BuildKit (Debian's 20.10 CLI has it built in; without it,
# Compose's own BuildKit client) and with the classic builder; same dependency set.
if [ -x /usr/bin/docker ]; then
  timed "build $PIPELINE_IMAGE (BuildKit)" env DOCKER_BUILDKIT=1 /usr/bin/docker build -q \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" -t "$PIPELINE_IMAGE" -f deploy/container/Dockerfile . >/dev/null
else
  timed "build $PIPELINE_IMAGE (BuildKit, compose)" compose build --quiet topics
fi
timed "build $PIPELINE_IMAGE-classic (classic builder)" env DOCKER_BUILDKIT=0 "$DOCKER_CLI" build -q \
  --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" -t "$PIPELINE_IMAGE-classic" -f deploy/container/Dockerfile . >/dev/null
freeze() { docker run --rm -e PIP_NO_CACHE_DIR=1 --entrypoint /opt/venv/bin/pip "$1" freeze --all --exclude pip --exclude setuptools; }
a=$(freeze "$PIPELINE_IMAGE"); b=$(freeze "$PIPELINE_IMAGE-classic")
[ "$a" = "$b" ] || { diff <(echo "$a") <(echo "$b") >&2; die "BuildKit and classic builds hold different packages"; }
locked=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\).*/\1==\2/p' requirements.lock | tr 'A-Z_' 'a-z-' | sort)
installed=$(echo "$a" | grep -v '^iot-pipeline' | tr 'A-Z_' 'a-z-' | sort)
[ "$locked" = "$installed" ] || { diff <(echo "$locked") <(echo "$installed") >&2; die "the image's packages differ from requirements.lock"; }
log "both builds hold exactly requirements.lock ($(echo "$installed" | wc -l) packages) + iot-pipeline"
# The classic image stays: it is the classic builder's layer cache for the next run.

# 5: the stack, healthy and ready.
compose down --volumes --remove-orphans >/dev/null 2>&1 || true  # leftovers of an aborted run
timed "compose up -d --wait" compose up -d --wait --no-build --quiet-pull
for service in mosquitto kafka dps-emulator ingest route sink; do
  health=$(docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q "$service")")
  [ "$health" = healthy ] || die "$service is $health"
done
log "every container with a health check is healthy"
topics_rc=$(docker inspect --format '{{.State.ExitCode}}' "$(compose ps -a -q topics)")
[ "$topics_rc" = 0 ] || die "the topics one-shot exited $topics_rc"

# 6: the demo through the containers, then exact expectations from the host.
timed "replay the demo" compose --profile demo run --rm --no-deps replay
timed "verify the demo" env PYTHONPATH="$ROOT" "$PY" "$HERE/verify.py" demo \
  --bootstrap "127.0.0.1:$KAFKA_HOST_PORT" --wait 120
PYTHONPATH="$ROOT" "$PY" "$HERE/verify.py" endpoints \
  --ports "$INGEST_METRICS_PORT,$ROUTE_METRICS_PORT,$SINK_METRICS_PORT"
# What an operator asks next, through the image: why was this child refused (its journey
# names DPS's code), and did every child get exactly one outcome (exit 0).
journey=$(compose --profile demo run --rm --no-deps replay trace --sn nogroup-sn-0001 --since 1h) \
  || die "pipeline trace --sn nogroup-sn-0001 failed"
echo "$journey" | sed 's/^/  /'
echo "$journey" | grep -q 'code=35404' || die "the journey of nogroup-sn-0001 does not show DPS's 35404"
timed "pipeline audit --since 1h" compose --profile demo run --rm --no-deps replay \
  audit --since 1h --no-progress
if [ "$TRACING" = 1 ]; then
  timed "verify the trace of inverter-a-02" env PYTHONPATH="$ROOT" "$PY" "$HERE/verify.py" trace \
    --jaeger "http://127.0.0.1:$JAEGER_UI_HOST_PORT" --sn inverter-a-02 --wait 60
fi

# 7: SIGTERM; every worker stops cleanly.
timed "compose stop (SIGTERM)" compose stop --timeout 60 >/dev/null 2>&1
for service in ingest route sink dps-emulator; do
  code=$(docker inspect --format '{{.State.ExitCode}}' "$(compose ps -a -q "$service")")
  log "$service exited $code"
  [ "$code" = 0 ] || die "$service exited $code after SIGTERM"
done
