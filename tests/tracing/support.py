"""What the tracing tests share: spans in memory, a traced run of the three stages."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import orjson
from aiomqtt import Client
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.config import Config, TracingConfig
from pipeline.dps.emulator import RunningEmulator
from pipeline.io import mqtt
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from tests.harness import add_response, read_topic, running, wait_check
from tests.stages.sink.support import GROUP, with_emulator

PUBLISHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISHER_SPAN = "00f067aa0ba902b7"
PUBLISHER = f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"

ALLOCATED = ["tr-ok-1", "tr-ok-2"]
REJECTED = "tr-unknown-1"  # not registered: DPS answers 35601
FAILED = "tr-failed-1"  # in IoTDA's failed_devices


class Kept(InMemorySpanExporter):
    """Spans in memory, kept when a stage's provider shuts its exporter down."""

    def shutdown(self) -> None:
        """Three stages share this exporter: one stopping must not end it."""


def traced(cfg: Config, emu: RunningEmulator) -> Config:
    """``cfg`` with tracing on and the sink calling ``emu``."""
    return msgspec.structs.replace(with_emulator(cfg, emu), tracing=TracingConfig(enabled=True))


def devices() -> list[dict[str, str]]:
    return [{"sn": sn, "group_id": GROUP} for sn in ALLOCATED]


def traceparent(record: Any) -> str:
    """The record's traceparent header (it must have exactly one)."""
    found = [bytes(v).decode() for k, v in record.headers or () if k == "traceparent"]
    assert len(found) == 1, f"{record.topic}/{record.partition}/{record.offset}: {found}"
    return found[0]


def trace_of(record: Any) -> str:
    return traceparent(record)[3:35]


async def publish(cfg: Config, topic: str, payload: bytes, parent: str | None = None) -> None:
    """Publish as a gateway's platform would, MQTT 5, with ``parent`` as user property."""
    properties = None
    if parent is not None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("traceparent", parent), ("tracestate", "vendor=1")]
    client: Client = mqtt.connect(cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-pub", persistent=False)
    async with client:
        await client.publish(topic, payload, qos=1, properties=properties)


@dataclasses.dataclass
class Outcome:
    """What a traced run wrote, topic by topic."""

    topics: dict[str, list[Any]]


@contextlib.asynccontextmanager
async def three_stages(cfg: Config) -> AsyncIterator[None]:
    """Ingest, router and sink on the runtime, ingest subscribed before the block runs."""
    health = Health()
    async with running(Ingest(cfg), health) as ingest:
        await wait_check(health, "ingest.mqtt", ingest)
        async with running(Router(cfg)), running(Sink(cfg)):
            yield


async def run_mix(cfg: Config) -> Outcome:
    """Two events (one with a publisher's traceparent) and an undecodable message through
    the three stages; returns every record they wrote, once they stopped."""
    t = cfg.kafka.topics
    async with three_stages(cfg):
        first = add_response("ev-tr-1", [ALLOCATED[0], REJECTED], failed=[FAILED])
        await publish(cfg, "$oc/devices/gw-tr-1/sys/events/down", orjson.dumps(first), PUBLISHER)
        second = add_response("ev-tr-2", [ALLOCATED[1]])
        await publish(cfg, "$oc/devices/gw-tr-2/sys/events/down", orjson.dumps(second))
        await publish(cfg, "$oc/devices/gw-tr-3/sys/events/down", b"{not json")
        await read_topic(cfg.kafka, t.allocations, expect=2)
        await read_topic(cfg.kafka, t.allocations_dlq, expect=1)
    names = ("down_events", "down_events_dlq", "added", "failed", "lifecycle", "allocations",
             "allocations_dlq")  # fmt: skip
    return Outcome({n: await read_topic(cfg.kafka, getattr(t, n)) for n in names})


def hexid(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def spans_by_id(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {hexid(s.context.span_id, 16): s for s in spans if s.context is not None}


def parent_id(span: ReadableSpan) -> str | None:
    return hexid(span.parent.span_id, 16) if span.parent is not None else None


def chain(span: ReadableSpan, spans: dict[str, ReadableSpan]) -> list[str]:
    """``span``'s name and its ancestors' (recorded ones), innermost first."""
    names = [span.name]
    while (up := parent_id(span)) is not None and up in spans:
        span = spans[up]
        names.append(span.name)
    return names
