"""What every worker serves to its operator: /metrics, /healthz and /readyz."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from pipeline.ops.metrics import STAGE_LAST_PROGRESS, STAGE_WORK_WAITING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

__all__ = ["Health", "ops_server"]

log = logging.getLogger(__name__)


class Health:
    """What the operator endpoints report: readiness checks, and each stage's progress.

    Readiness (``/readyz``) is named checks, ready when every registered check is true; a
    failing check can say why (``detail``), e.g. the DPS code and a hint. Liveness
    (``/healthz``) fails when a stage has work waiting and has made no progress for
    ``stall_after`` seconds: each stage calls :meth:`beat` when it makes progress and
    registers, with :meth:`watch`, how to tell whether it has work waiting.

    Args:
        stall_after: seconds without progress, while work waits, after which a stage is
            reported stalled.
    """

    def __init__(self, stall_after: float = 120.0) -> None:
        self._checks: dict[str, bool] = {}
        self._optional: set[str] = set()
        self._details: dict[str, str] = {}
        self._stall_after = stall_after
        self._beats: dict[str, float] = {}
        self._waiting: dict[str, Callable[[], bool]] = {}

    def set(self, name: str, ok: bool, detail: str | None = None, *, required: bool = True) -> None:
        """Record the state of one dependency (``mqtt``, ``kafka``, ``dps``...).

        A check that is not ``required`` (one gateway's session among many, one bridge)
        is reported, with its detail, but does not make the worker unready.
        """
        self._checks[name] = ok
        if required:
            self._optional.discard(name)
        else:
            self._optional.add(name)
        if detail is None:
            self._details.pop(name, None)
        else:  # why it fails, or what is not quite right while it passes
            self._details[name] = detail

    def clear(self, name: str) -> None:
        """Forget check ``name``: one that is shown only while something is worth saying."""
        self._checks.pop(name, None)
        self._optional.discard(name)
        self._details.pop(name, None)

    @property
    def ready(self) -> bool:
        """True when there is at least one required check and all required checks pass."""
        required = [ok for name, ok in self._checks.items() if name not in self._optional]
        return bool(required) and all(required)

    def report(self) -> dict[str, bool]:
        """Each check and its state."""
        return dict(self._checks)

    def details(self) -> dict[str, str]:
        """Why a check fails, or what is degraded while it passes (49 of 50 sessions)."""
        return dict(self._details)

    def watch(self, stage: str, waiting: Callable[[], bool]) -> None:
        """Register ``stage``; ``waiting()`` tells whether it has work it has not done.

        Both are also exported, read at scrape time: ``pipeline_stage_work_waiting`` and
        ``pipeline_stage_last_progress_timestamp_seconds`` (the "no progress while work
        is waiting" alert).
        """
        self._waiting[stage] = waiting
        self._beats[stage] = time.monotonic()
        STAGE_WORK_WAITING.labels(stage).set_function(lambda: float(waiting()))
        STAGE_LAST_PROGRESS.labels(stage).set_function(
            lambda: time.time() - (time.monotonic() - self._beats[stage])
        )

    def beat(self, stage: str) -> None:
        """``stage`` made progress."""
        self._beats[stage] = time.monotonic()

    def stalled(self) -> dict[str, float]:
        """Stages with work waiting and no progress for ``stall_after`` s: seconds since."""
        now = time.monotonic()
        return {
            stage: round(now - self._beats[stage], 1)
            for stage, waiting in self._waiting.items()
            if now - self._beats[stage] > self._stall_after and waiting()
        }


@contextlib.asynccontextmanager
async def ops_server(host: str, port: int, health: Health) -> AsyncIterator[int]:
    """Serve the operator endpoints while the block runs; yields the bound port."""

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop runs; a stage with work waiting and no
        # progress for too long is stuck, and a restart is what helps.
        if stalled := health.stalled():
            return web.json_response({"status": "stalled", "stalled": stalled}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        status = 200 if health.ready else 503
        body = {"ready": health.ready, "checks": health.report(), "details": health.details()}
        return web.json_response(body, status=status)

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
