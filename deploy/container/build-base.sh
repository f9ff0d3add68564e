#!/usr/bin/env bash
# The base images compose.yaml and the pipeline Dockerfile need, when no container
# registry can be reached: made locally from Debian packages (and Maven Central jars).
# When a registry answers, the upstream images are pulled instead.
#
#   deploy/container/build-base.sh            # auto: upstream if reachable, else local
#   deploy/container/build-base.sh --local    # always build the local stand-ins
#   deploy/container/build-base.sh --upstream # always pull the upstream images
#   deploy/container/build-base.sh --rebuild  # local, rebuilding images that exist
#   deploy/container/build-base.sh --jaeger   # also the Jaeger image (compose profile tracing)
#
#   local image              stand-in for          from
#   local/debian:bookworm    debian:bookworm-slim  debootstrap --variant=minbase + docker import
#   local/python:3.11        python:3.11-slim      python.Dockerfile (Debian's python3 3.11)
#   local/mosquitto:2        eclipse-mosquitto:2   mosquitto.Dockerfile (Debian's mosquitto)
#   local/kafka:4.1.1        apache/kafka:4.1.1    kafka.Dockerfile (OpenJDK 17 + Maven jars)
#   local/jaeger:1.75.0      jaegertracing/jaeger:2.12.0  jaeger.Dockerfile (only with --jaeger;
#                                                  the binary from deploy/local/jaeger.sh)
#
# Either way the image names go to ~/.cache/iot-pipeline/images.env (PYTHON_IMAGE,
# MOSQUITTO_IMAGE, KAFKA_IMAGE, and JAEGER_IMAGE once --jaeger made it), for
# `docker compose --env-file` or `set -a; . FILE`.
#
# The local Debian base trusts the same CAs as this host: the certificates in
# /usr/local/share/ca-certificates are copied in and update-ca-certificates is run, so
# apt and pip over HTTPS work inside builds behind a TLS-inspecting egress proxy too.
# Needs: a running Docker daemon (docker-up.sh), root (debootstrap, apt), Maven + Java.
set -o errexit -o pipefail -o nounset
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=deploy/container/lib.sh
. "$HERE/lib.sh"

MODE=auto REBUILD=0 JAEGER=0
for arg in "$@"; do
  case $arg in
    --local) MODE=local ;; --upstream) MODE=upstream ;; --auto) MODE=auto ;;
    --rebuild) MODE=local REBUILD=1 ;;
    --jaeger) JAEGER=1 ;;
    -h|--help) sed -n '2,/^set -o/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg" ;;
  esac
done

KAFKA_VERSION=4.1.1
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_IMAGE=local/debian:$SUITE
PYTHON_LOCAL=local/python:3.11     PYTHON_UPSTREAM=python:3.11-slim
MOSQUITTO_LOCAL=local/mosquitto:2  MOSQUITTO_UPSTREAM=eclipse-mosquitto:2
KAFKA_LOCAL=local/kafka:$KAFKA_VERSION KAFKA_UPSTREAM=apache/kafka:$KAFKA_VERSION
# Jaeger's Go module v1.75.0 is the release v2.12.0 (its RELEASE.md), the upstream image's tag.
JAEGER_LOCAL=local/jaeger:1.75.0   JAEGER_UPSTREAM=jaegertracing/jaeger:2.12.0
ENV_FILE="$CACHE/images.env"

docker info >/dev/null 2>&1 || die "no Docker daemon answers; run deploy/container/docker-up.sh"

has_image() { [ "$REBUILD" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

# The classic builder is enough for these small Dockerfiles and needs no buildx plugin.
# Debian's CLI (20.10, the daemon's own) when present: a newer CLI prints a deprecation
# notice for the classic builder.
build() {
  local cli=docker; [ -x /usr/bin/docker ] && cli=/usr/bin/docker
  DOCKER_BUILDKIT=0 "$cli" build -q "$@" >/dev/null
}

registry_reachable() {  # Docker Hub's registry answers 401 (auth needed) when reachable
  local code
  code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' https://registry-1.docker.io/v2/ || true)
  [ "$code" = 401 ] || [ "$code" = 200 ]
}

debian_base() {
  has_image "$DEBIAN_IMAGE" && { log "$DEBIAN_IMAGE exists"; return 0; }
  apt_install debootstrap
  local dir="$CACHE/rootfs/$SUITE-minbase"
  rm -rf "$dir"; mkdir -p "$dir"
  timed "debootstrap $SUITE minbase" \
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$dir" "$MIRROR" >/dev/null
  # What the official Debian images set up for apt in containers, and the same sources
  # as this host (with updates and security).
  rm -f "$dir/etc/apt/sources.list"
  cat > "$dir/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${MIRROR}
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  cat > "$dir/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
  echo 'Acquire::Languages "none";' > "$dir/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' > "$dir/etc/apt/apt.conf.d/docker-gzip-indexes"
  # Slim, as debian:bookworm-slim: no documentation, manuals or translations, now or in
  # any later apt install (man1 stays: openjdk's postinst links into it).
  cat > "$dir/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
DPKG
  find "$dir/usr/share/doc" -type f ! -name copyright -delete
  find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$dir"/usr/share/info/* "$dir"/usr/share/locale/* "$dir"/usr/share/man/* \
         "$dir"/usr/share/groff/* "$dir"/usr/share/lintian/overrides/*
  mkdir -p "$dir/usr/share/man/man1"
  # Trust the host's extra CAs (if any), the Debian way.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
    chroot "$dir" update-ca-certificates >/dev/null
  fi
  # Nothing of this host's identity or caches in the image; Docker mounts its own
  # resolv.conf, hostname and hosts.
  : > "$dir/etc/resolv.conf"; : > "$dir/etc/hostname"
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
         "$dir"/var/log/*.log "$dir"/var/log/apt/* "$dir"/tmp/* "$dir"/var/tmp/*
  # shellcheck disable=SC2016  # expanded by the inner bash
  timed "docker import $DEBIAN_IMAGE" bash -c '
    tar --numeric-owner -C "$1" -c . | docker import \
      --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change "CMD [\"bash\"]" - "$2" >/dev/null' _ "$dir" "$DEBIAN_IMAGE"
  rm -rf "$dir"
}

python_base() {
  has_image "$PYTHON_LOCAL" && { log "$PYTHON_LOCAL exists"; return 0; }
  timed "build $PYTHON_LOCAL" build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$PYTHON_LOCAL" -f "$HERE/python.Dockerfile" "$HERE/kafka"  # context: any small dir
}

mosquitto_image() {
  has_image "$MOSQUITTO_LOCAL" && { log "$MOSQUITTO_LOCAL exists"; return 0; }
  timed "build $MOSQUITTO_LOCAL" build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$MOSQUITTO_LOCAL" -f "$HERE/mosquitto.Dockerfile" "$HERE/kafka"
}

kafka_image() {
  has_image "$KAFKA_LOCAL" && { log "$KAFKA_LOCAL exists"; return 0; }
  local libs="$CACHE/kafka-$KAFKA_VERSION/image-libs"
  if [ ! -f "$libs/.complete" ]; then
    command -v mvn >/dev/null || apt_install maven openjdk-17-jre-headless
    rm -rf "$libs"; mkdir -p "$libs"
    timed "mvn kafka $KAFKA_VERSION jars (broker + tools)" \
      mvn -q -B -f "$HERE/kafka/pom.xml" package -Dkafka.version="$KAFKA_VERSION" -Dlibs.dir="$libs"
    touch "$libs/.complete"
  fi
  # The build context: the jars plus the image's scripts and configuration.
  local ctx="$CACHE/kafka-$KAFKA_VERSION/image-context"
  rm -rf "$ctx"; mkdir -p "$ctx/libs"
  cp -l "$libs"/*.jar "$ctx/libs/" 2>/dev/null || cp "$libs"/*.jar "$ctx/libs/"
  cp "$HERE/kafka/run" "$HERE/kafka/kafka-run-class.sh" "$HERE/kafka/server.properties" \
     "$HERE/kafka/log4j2.properties" "$ctx/"
  timed "build $KAFKA_LOCAL" build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$KAFKA_LOCAL" -f "$HERE/kafka.Dockerfile" "$ctx"
  rm -rf "$ctx"
}

jaeger_image() {
  has_image "$JAEGER_LOCAL" && { log "$JAEGER_LOCAL exists"; return 0; }
  local bin ctx
  bin=$(JAEGER_VERSION=v1.75.0 "$ROOT/deploy/local/jaeger.sh" --path)  # builds it once (~8 min)
  ctx=$(mktemp -d "$CACHE/jaeger-context.XXXXXX")
  cp -l "$bin" "$ctx/jaeger" 2>/dev/null || cp "$bin" "$ctx/jaeger"
  timed "build $JAEGER_LOCAL" build --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -t "$JAEGER_LOCAL" -f "$HERE/jaeger.Dockerfile" "$ctx"
  rm -rf "$ctx"
}

write_env() {  # write_env PYTHON MOSQUITTO KAFKA [JAEGER] (none: keep the file's JAEGER_IMAGE)
  mkdir -p "$CACHE"
  local jaeger=${4:-$(sed -n 's/^JAEGER_IMAGE=//p' "$ENV_FILE" 2>/dev/null || true)}
  printf 'PYTHON_IMAGE=%s\nMOSQUITTO_IMAGE=%s\nKAFKA_IMAGE=%s\n' "$1" "$2" "$3" > "$ENV_FILE"
  [ -z "$jaeger" ] || printf 'JAEGER_IMAGE=%s\n' "$jaeger" >> "$ENV_FILE"
  log "image names in $ENV_FILE:"; sed 's/^/  /' "$ENV_FILE" >&2
}

if [ "$MODE" = auto ]; then
  if registry_reachable; then MODE=upstream; else MODE=local; log "no registry reachable: building local base images"; fi
fi
if [ "$MODE" = upstream ]; then
  images=("$PYTHON_UPSTREAM" "$MOSQUITTO_UPSTREAM" "$KAFKA_UPSTREAM")
  [ "$JAEGER" = 0 ] || images+=("$JAEGER_UPSTREAM")
  for image in "${images[@]}"; do
    timed "pull $image" docker pull -q "$image" >/dev/null
  done
  write_env "${images[@]}"
else
  debian_base
  python_base
  mosquitto_image
  kafka_image
  [ "$JAEGER" = 0 ] || jaeger_image
  write_env "$PYTHON_LOCAL" "$MOSQUITTO_LOCAL" "$KAFKA_LOCAL" "$([ "$JAEGER" = 0 ] || echo "$JAEGER_LOCAL")"
fi
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(local/|python|eclipse-mosquitto|apache/kafka|jaegertracing)' >&2 || true
