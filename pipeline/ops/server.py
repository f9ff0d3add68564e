"""What every worker serves to its operator: /metrics, /healthz and /readyz."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["Health", "ops_server"]

log = logging.getLogger(__name__)


class Health:
    """Named readiness checks; ready when every registered check is true."""

    def __init__(self) -> None:
        self._checks: dict[str, bool] = {}

    def set(self, name: str, ok: bool) -> None:
        """Record the state of one dependency (``mqtt``, ``kafka``, ``dps``...)."""
        self._checks[name] = ok

    @property
    def ready(self) -> bool:
        """True when there is at least one check and all pass."""
        return bool(self._checks) and all(self._checks.values())

    def report(self) -> dict[str, bool]:
        """Each check and its state."""
        return dict(self._checks)


@contextlib.asynccontextmanager
async def ops_server(host: str, port: int, health: Health) -> AsyncIterator[int]:
    """Serve the operator endpoints while the block runs; yields the bound port."""

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop is not stuck.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        status = 200 if health.ready else 503
        return web.json_response({"ready": health.ready, "checks": health.report()}, status=status)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound: int = runner.addresses[0][1]  # the real port when `port` is 0
    log.info("serving /metrics, /healthz, /readyz on http://%s:%d", host, bound)
    try:
        yield bound
    finally:
        await runner.cleanup()
