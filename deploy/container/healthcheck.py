"""Docker HEALTHCHECK: GET /healthz from the worker this container runs.

Which port to ask is worked out the way the worker itself does: the command line of
the ``pipeline`` process (the sub-command and ``--config``) and the configuration it
reads (file plus ``PIPELINE_*`` environment, which a health check inherits). Commands
without an operator endpoint (``topics``, ``replay``...) are reported healthy; the DPS
emulator is asked for its fault settings instead.

Kubernetes ignores HEALTHCHECK: the manifests in deploy/kubernetes use their own
liveness (/healthz) and readiness (/readyz) probes. Exit status: 0 healthy, 1 not.
"""

from __future__ import annotations

import http.client
import sys
from pathlib import Path

from pipeline.config import load_config

WORKERS = frozenset({"ingest", "route", "sink", "run"})
EMULATOR = "dps-emulator"
TIMEOUT = 3.0
LOOPBACK = frozenset({"", "0.0.0.0", "127.0.0.1", "localhost", "::", "::1"})  # noqa: S104


def _pipeline_argv() -> list[str]:
    """The arguments after ``pipeline`` (or ``-m pipeline``) in some process's command line."""
    proc = Path("/proc")
    pids = sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for pid in pids:
        try:
            raw = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        for i, arg in enumerate(argv):
            if Path(arg).name == "pipeline" and (i == 0 or argv[i - 1] != "--config"):
                return argv[i + 1 :]
    return []


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _command(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in {"--config", "--log-level"}:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _get(host: str, port: int, path: str) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def main() -> int:
    argv = _pipeline_argv()
    command = _command(argv)
    if command == EMULATOR:
        host = _option(argv, "--host") or "127.0.0.1"
        port = int(_option(argv, "--port") or 8085)
        path = "/_emulator/faults"
    elif command in WORKERS:
        cfg = load_config(_option(argv, "--config")).metrics
        if not cfg.enabled:
            return 0
        host, port, path = cfg.host, getattr(cfg, f"{command}_port"), "/healthz"
    else:
        print(f"healthcheck: nothing to probe for command {command!r}")
        return 0
    host = "127.0.0.1" if host in LOOPBACK else host
    try:
        status = _get(host, port, path)
    except OSError as exc:
        print(f"healthcheck: http://{host}:{port}{path}: {exc}")
        return 1
    print(f"healthcheck: http://{host}:{port}{path}: HTTP {status}")
    return 0 if status == http.HTTPStatus.OK else 1


if __name__ == "__main__":
    sys.exit(main())
