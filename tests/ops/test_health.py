"""Readiness: every stage says "not ready" from construction until it really is."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink


def test_stages_register_not_ready_at_construction() -> None:
    health = Health()
    assert not health.ready  # nothing registered: not ready either
    cfg = Config()
    Ingest(cfg, health)
    Router(cfg, health)
    health.set("ingest.kafka", True)
    health.set("route.kafka", True)
    assert not health.ready  # ingest has not subscribed yet
    health.set("ingest.mqtt", True)
    assert health.ready


async def test_sink_registers_not_ready() -> None:
    health = Health()
    Sink(Config(), health)
    assert health.report() == {"sink.kafka": False, "sink.dps": False}
