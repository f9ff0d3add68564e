#!/usr/bin/env bash
# Jaeger v2 (the all-in-one `jaeger` binary, built on the OpenTelemetry Collector) without a
# download site or registry: built once from the Go module proxy into
# ~/.cache/iot-pipeline/jaeger/<version>/jaeger, outside git, like the Kafka jars.
#
#   deploy/local/jaeger.sh            # build if needed
#   deploy/local/jaeger.sh --path     # ... and print the binary's path
#
# Run it with deploy/local/jaeger.yaml (every listener on 127.0.0.1, ports from the
# environment; see the top of that file). JAEGER_VERSION overrides the module version
# (v1.75.0 is the approved one; its binary reports Jaeger v2).
# A lock in the cache folder makes a second caller wait for the first build instead of
# building again. Needs Go (1.24 or newer).
set -o errexit -o pipefail -o nounset
# shellcheck source=deploy/container/lib.sh
. "$(dirname "$0")/../container/lib.sh"

JAEGER_VERSION="${JAEGER_VERSION:-v1.75.0}"
DIR="$CACHE/jaeger/$JAEGER_VERSION"
BIN="$DIR/jaeger"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

# shellcheck disable=SC2317  # called through timed
build() {
  [ -x "$GO" ] || die "go is not installed (needed to build Jaeger $JAEGER_VERSION)"
  log "building Jaeger $JAEGER_VERSION from the Go module proxy (about 5 minutes on 2 cores)"
  # `go install .../cmd/jaeger@version` is refused (Jaeger's go.mod has replace
  # directives), so a throw-away module requires Jaeger as a tool and builds it.
  local mod="$DIR/build"
  rm -rf "$mod" "$BIN.tmp"
  mkdir -p "$mod"
  (
    cd "$mod"
    "$GO" mod init jaeger-build >/dev/null 2>&1
    GOFLAGS=-mod=mod "$GO" get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION"
    CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$GO" build -trimpath \
      -ldflags "-s -w" -o "$BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  )
  rm -rf "$mod"
  mv "$BIN.tmp" "$BIN"
  log "built $BIN ($(du -m "$BIN" | cut -f1) MB)"
}

if [ ! -x "$BIN" ]; then
  mkdir -p "$DIR"
  exec 9>"$DIR/.lock"
  flock 9                                   # another caller may be building: wait for it
  [ -x "$BIN" ] || timed "jaeger $JAEGER_VERSION go build" build
  exec 9>&-
fi
[ "${1:-}" = "--path" ] && echo "$BIN"
exit 0
