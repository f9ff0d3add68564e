"""``pipeline healthcheck``: is the worker in this container (or on this host) healthy?

For a container's HEALTHCHECK (Docker and Compose; Kubernetes uses its own HTTP probes):
``GET /healthz`` (or another path) on the worker's metrics port, through the standard
library only, so it costs a fraction of a second. Without ``--port`` the configured
ports are tried in turn (``run``, ``ingest``, ``route``, ``sink``) and the first that
accepts a connection answers: a container runs one worker, so only its port is open.
"""

from __future__ import annotations

import http
import http.client
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import MetricsConfig

__all__ = ["healthcheck"]

_ANY = frozenset({"", "0.0.0.0", "::"})  # noqa: S104  (a listening address, not a bind)


def healthcheck(
    cfg: MetricsConfig, *, port: int | None = None, path: str = "/healthz", wait: float = 3.0
) -> tuple[bool, str]:
    """Ask the worker; return (healthy, one line saying what was asked and what it said)."""
    host = "127.0.0.1" if cfg.host in _ANY else cfg.host
    ports = [port] if port else [cfg.run_port, cfg.ingest_port, cfg.route_port, cfg.sink_port]
    refused: list[str] = []
    for candidate in ports:
        url = f"http://{host}:{candidate}{path}"
        conn = http.client.HTTPConnection(host, candidate, timeout=wait)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read(300).decode(errors="replace").strip()
        except ConnectionRefusedError:
            refused.append(str(candidate))
            continue
        except OSError as exc:
            return False, f"{url}: {exc}"
        finally:
            conn.close()
        return response.status == http.HTTPStatus.OK, f"{url}: HTTP {response.status} {body}"
    return False, f"nothing listens on {host} port {', '.join(refused)}"
