"""A stage beyond the three, added as a contributor would: its own work and one registry
entry; the runtime and the command line do the rest."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import pytest

from pipeline import cli
from pipeline.io import kafka
from pipeline.io.aio import Stopped, unless_stopped
from pipeline.stages.registry import STAGES, Entry
from pipeline.stages.runtime import Run, Subscription
from pipeline.tools.services import free_port

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiokafka import TopicPartition

    from pipeline.config import Config

log = logging.getLogger("tests.allocation_log")


async def _nothing(_: list[TopicPartition]) -> None:
    """Nothing to hand back or set up as partitions move."""


class AllocationLog:
    """Logs every allocation: the whole of a fourth stage."""

    name = "allocation-log"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def topics(self) -> Sequence[str]:
        return [self.cfg.kafka.topics.allocations]

    def needs_mqtt(self) -> bool:
        return False

    def subscription(self) -> Subscription:
        group = f"allocation-log-{self.cfg.kafka.client_id}"
        return Subscription(group, self.topics(), revoked=_nothing, assigned=_nothing)

    def checks(self) -> Sequence[str]:
        return []

    def busy(self) -> bool:
        return False

    async def work(self, run: Run) -> None:
        assert run.consumer is not None
        try:
            while True:
                batch = await unless_stopped(run.stopping, run.consumer.getmany(timeout_ms=500))
                for records in batch.values():
                    for record in records:
                        log.info("allocation %s", record.key.decode())
                run.beat()
        except Stopped:
            return


async def test_a_fourth_stage_runs_through_the_command_line_with_only_its_own_work(
    cfg: Config, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="tests.allocation_log")
    monkeypatch.setitem(
        STAGES, "allocation-log", Entry("log every allocation", lambda c, _: AllocationLog(c))
    )
    port = free_port()
    cfg = msgspec.structs.replace(
        cfg,
        metrics=msgspec.structs.replace(cfg.metrics, enabled=True, ports={"allocation-log": port}),
    )
    args = cli._parser().parse_args(["allocation-log"])
    assert cli._parser().parse_args(["run"]).stages == ("ingest", "route", "sink", "allocation-log")
    await kafka.ensure_topics(cfg.kafka, [cfg.kafka.topics.allocations])
    async with kafka.producer(cfg.kafka) as producer:
        for sn in ("sn-1", "sn-2", "sn-3"):
            await producer.send_and_wait(cfg.kafka.topics.allocations, b"{}", key=sn.encode())
    worker = asyncio.create_task(args.handler(args, cfg))

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "tests.allocation_log"]

    async with asyncio.timeout(60):
        while len(logged()) < 3:
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            assert await response.json() == {
                                "ready": True,
                                "checks": {"allocation-log.kafka": True},
                                "details": {},
                            }
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # as an orchestrator stops it
    assert await asyncio.wait_for(worker, 60) == 0
    assert sorted(logged()) == ["allocation sn-1", "allocation sn-2", "allocation sn-3"]
