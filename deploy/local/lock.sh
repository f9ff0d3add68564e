#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml, with hashes, for Python 3.11 on any
# platform (markers kept):
#   requirements.lock      the runtime dependencies (the container image installs these)
#   requirements-dev.lock  runtime + dev (deploy/local/install.sh installs these)
# Run it after changing a dependency in pyproject.toml, and commit both files.
# uv (from PyPI, in a throw-away virtualenv) resolves; pip installs the result.
set -o errexit -o pipefail -o nounset
. "$(dirname "$0")/lib.sh"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "uv==$UV_VERSION"
cd "$ROOT"
for extra in "" dev; do
  out=requirements${extra:+-$extra}.lock
  "$tmp/venv/bin/uv" pip compile -q pyproject.toml ${extra:+--extra "$extra"} --generate-hashes \
    --universal --python-version 3.11 --custom-compile-command "deploy/local/lock.sh" -o "$out"
  log "wrote $out ($(grep -c '==' "$out") packages)"
done
