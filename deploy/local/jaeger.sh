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
# building again. Needs Go (1.24 or newer). Measured here (2 cores shared with other work):
# 7.5 min with Jaeger's modules not yet downloaded, 23 min with an empty build cache while
# the machine ran at load 16, 35 s with a warm build cache; an 81 MB static binary
# (-trimpath, -s -w). It has no UI assets (they are not in the Go module): the query API
# works, the UI page is Jaeger's placeholder.
set -o errexit -o pipefail -o nounset
# shellcheck source=deploy/container/lib.sh
. "$(dirname "$0")/../container/lib.sh"

JAEGER_VERSION="${JAEGER_VERSION:-v1.75.0}"
DIR="$CACHE/jaeger/$JAEGER_VERSION"
BIN="$DIR/jaeger"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# What `jaeger version` reports: the v2 release of the module version (as Jaeger's own
# build stamps it; v1.75.0 is v2.12.0, see its RELEASE.md), else the module version.
case $JAEGER_VERSION in v1.75.0) RELEASE=v2.12.0 ;; *) RELEASE=$JAEGER_VERSION ;; esac

# shellcheck disable=SC2317  # called through timed
build() {
  [ -x "$GO" ] || die "go is not installed (needed to build Jaeger $JAEGER_VERSION)"
  log "building Jaeger $JAEGER_VERSION from the Go module proxy (5-8 min on 2 cores with cold Go caches, ~35 s warm)"
  # `go install .../cmd/jaeger@version` is refused (Jaeger's go.mod has replace
  # directives), so a throw-away module requires Jaeger as a tool and builds it.
  local mod="$DIR/build"
  rm -rf "$mod" "$BIN.tmp"
  mkdir -p "$mod"
  (
    cd "$mod"
    "$GO" mod init jaeger-build >/dev/null 2>&1
    # (its ~300 lines of "go: added ..." only when it fails)
    GOFLAGS=-mod=mod "$GO" get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION" \
      2>get.log || { cat get.log >&2; exit 1; }
    CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$GO" build -trimpath \
      -ldflags "-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=$RELEASE" \
      -o "$BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
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
