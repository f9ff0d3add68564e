#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine, idempotently:
# Mosquitto (Debian package), Java + Maven if absent, the Kafka broker jars from Maven
# Central (cached outside git), Prometheus (promtool and the server, for the monitoring
# tests), and a Python virtualenv with the locked dependencies and the project.
set -o errexit -o pipefail -o nounset
. "$(dirname "$0")/lib.sh"

apt_install() {
  local missing=()
  command -v mosquitto >/dev/null || missing+=(mosquitto)
  command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  # promtool checks and unit-tests deploy/monitoring's rules; the Prometheus server runs
  # in tests/ops/test_prometheus.py. No recommends: they would pull in node-exporter.
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v openssl >/dev/null || missing+=(openssl)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

kafka_jars() {
  [ -f "$KAFKA_LIBS/.complete" ] && return 0
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
  rm -rf "$KAFKA_LIBS"; mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$ROOT/deploy/local/kafka/pom.xml" package -Dkafka.version="$KAFKA_VERSION" -Dlibs.dir="$KAFKA_LIBS"
  touch "$KAFKA_LIBS/.complete"
}

python_env() {
  # Exactly the locked dependency set (hashes checked), then the project itself, editable.
  # uv installs it (about 6 s from its cache, where pip takes 25 s); uv itself lives in
  # the cache, outside the venv, which holds only what the lock file says.
  # The marker holds a digest of what was installed: a changed lock file reinstalls.
  local marker="$ROOT/.venv/.installed" digest uv="$CACHE/uv-$UV_VERSION/bin/uv"
  digest=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-dev.lock" | sha256sum | cut -c1-16)
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$digest" ]; then return 0; fi
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python >= 3.11 is required"
  log "creating the Python environment in .venv (requirements-dev.lock)"
  if [ ! -x "$uv" ]; then
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
      --target "$CACHE/uv-$UV_VERSION" "uv==$UV_VERSION"
  fi
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  "$uv" pip sync -q --python "$ROOT/.venv/bin/python" --require-hashes "$ROOT/requirements-dev.lock"
  "$uv" pip install -q --python "$ROOT/.venv/bin/python" --no-deps -e "$ROOT"
  echo "$digest" > "$marker"
}

kafka_cds() {
  # A class-data-sharing archive of the classes a broker loads, written when one exits:
  # every later start (the demo's, the test run's) loads them from it instead.
  [ -f "$KAFKA_CDS" ] && return 0
  log "recording Kafka's class-data archive (once per JDK): a broker starts and stops"
  local tmp ports
  tmp=$(mktemp -d); ports=$("$PY" -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
  read -r kport cport <<< "$ports"
  local env=(PIPELINE_LOCAL_STATE="$tmp" PIPELINE_LOCAL_KAFKA_PORT="$kport" PIPELINE_LOCAL_KAFKA_CONTROLLER_PORT="$cport")
  env "${env[@]}" PIPELINE_LOCAL_KAFKA_EXTRA_OPTS="-XX:ArchiveClassesAtExit=$KAFKA_CDS.tmp" \
    "$ROOT/deploy/local/kafka.sh" start
  env "${env[@]}" "$ROOT/deploy/local/kafka.sh" stop
  rm -rf "$tmp"
  if [ -f "$KAFKA_CDS.tmp" ]; then mv "$KAFKA_CDS.tmp" "$KAFKA_CDS"; else log "no archive written: brokers start without it"; fi
}

apt_install
kafka_jars
python_env
kafka_cds
log "installed"
