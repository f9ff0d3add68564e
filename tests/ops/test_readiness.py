"""Readiness tells the truth: it drops within a check's interval and timeout of losing Kafka,
and comes back with it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgspec
import pytest

from pipeline.config import Config
from pipeline.ops.server import Health
from pipeline.stages.router import Router
from tests.harness import private_kafka, running

pytestmark = [pytest.mark.services, pytest.mark.slow]


async def until(check: object, limit: float) -> float:
    """Seconds until ``check()`` is true; fails after ``limit``."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_readiness_follows_kafka(
    cfg: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    async with private_kafka(tmp_path) as broker:
        interval = 0.5
        cfg = msgspec.structs.replace(
            cfg,
            kafka=msgspec.structs.replace(
                cfg.kafka, bootstrap_servers=broker.bootstrap, liveness_interval=interval
            ),
        )
        health = Health()
        async with running(Router(cfg), health):
            await until(lambda: health.report() == {"route.kafka": True}, 60)
            broker.kill()
            lost = await until(lambda: health.report() == {"route.kafka": False}, 30)
            assert health.details()["route.kafka"]  # says why
            broker.start()
            await broker.ready()
            back = await until(lambda: health.report() == {"route.kafka": True}, 60)
    said = [
        (r.levelname, r.getMessage().split(" (")[0].split(";")[0])
        for r in caplog.records
        if r.name == "pipeline.io.kafka" and "Kafka at" in r.getMessage()
    ]
    where = f"Kafka at {broker.bootstrap}"
    assert said == [
        ("WARNING", f"route: {where} is not reachable"),
        ("INFO", f"route: {where} answers again"),
    ], said
    assert lost <= interval + 5  # the check's own timeout
    assert back <= 60
