"""`pipeline healthcheck`: the container health check, against a real ops server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from pipeline.config import MetricsConfig
from pipeline.ops.healthcheck import healthcheck
from pipeline.ops.server import Health, ops_server
from pipeline.tools.services import free_port


async def test_healthy_worker_found_on_its_configured_port() -> None:
    health = Health()
    health.set("route.kafka", False)
    port = free_port()
    cfg = MetricsConfig(host="0.0.0.0", route_port=port, run_port=free_port())  # noqa: S104
    async with ops_server("127.0.0.1", port, health):
        ok, line = await asyncio.to_thread(healthcheck, cfg)
        assert ok, line
        assert line.startswith(f"http://127.0.0.1:{port}/healthz: HTTP 200")
        ready, line = await asyncio.to_thread(healthcheck, cfg, port=port, path="/readyz")
        assert not ready
        assert f"http://127.0.0.1:{port}/readyz: HTTP 503" in line


async def test_stalled_worker_is_unhealthy() -> None:
    health = Health(stall_after=0.01)
    health.watch("ingest", lambda: True)
    port = free_port()
    async with ops_server("127.0.0.1", port, health):
        await asyncio.sleep(0.05)
        ok, line = await asyncio.to_thread(healthcheck, MetricsConfig(), port=port)
    assert not ok
    assert "HTTP 503" in line
    assert "stalled" in line


def test_cli_exit_code_when_nothing_listens() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "healthcheck", "--port", str(port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == f"healthcheck: nothing listens on 127.0.0.1 port {port}"
