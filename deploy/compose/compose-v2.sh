#!/usr/bin/env bash
# Docker Compose v2 without a download site: built once from the Go module proxy into
# ~/.cache/iot-pipeline/compose/<version>/ and installed as the Docker CLI plugin
# ~/.docker/cli-plugins/docker-compose (a symlink), so `docker compose ...` works.
# Debian's own docker-compose is 1.29.2 (Python), which rejects compose.yaml's `name:`.
#
#   deploy/compose/compose-v2.sh            # build if needed, install the plugin
#   deploy/compose/compose-v2.sh --path     # ... and print the binary's path
#
# Needs Go (>= the version in compose's go.mod; v2.40.3 wants 1.24). COMPOSE_VERSION
# overrides the version.
set -o errexit -o pipefail -o nounset
# shellcheck source=deploy/container/lib.sh
. "$(dirname "$0")/../container/lib.sh"

COMPOSE_VERSION="${COMPOSE_VERSION:-v2.40.3}"
DIR="$CACHE/compose/$COMPOSE_VERSION"
BIN="$DIR/docker-compose"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

# shellcheck disable=SC2317  # called through timed
build() {
  command -v go >/dev/null || die "go is not installed (needed to build Compose $COMPOSE_VERSION)"
  log "building Docker Compose $COMPOSE_VERSION from the Go module proxy (several minutes)"
  mkdir -p "$DIR"
  # `go install module/cmd@version` refuses compose's go.mod (it has exclude
  # directives), so fetch the module source and build inside it as the main module:
  # exactly its go.mod and go.sum, nothing re-resolved.
  local src
  src=$(GOFLAGS=-mod=mod go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || die "go mod download gave no source directory for compose $COMPOSE_VERSION"
  (cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath \
    -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
    -o "$BIN.tmp" ./cmd)
  mv "$BIN.tmp" "$BIN"
}

[ -x "$BIN" ] || timed "compose $COMPOSE_VERSION go build" build
mkdir -p "$PLUGIN_DIR"
ln -sfn "$BIN" "$PLUGIN_DIR/docker-compose"
log "docker compose plugin: $PLUGIN_DIR/docker-compose -> $BIN"
[ "${1:-}" = "--path" ] && echo "$BIN"
exit 0
