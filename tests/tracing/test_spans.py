"""Traces through ingest, router and sink, on the real brokers and the DPS emulator; spans
kept in memory (tests/tracing/test_jaeger.py sends them to a real Jaeger)."""

from __future__ import annotations

import json

import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.exposition import generate_latest

from pipeline.dps.emulator import start_emulator
from pipeline.ops import tracing
from pipeline.stages.sink import Sink
from pipeline.tools.redrive import redrive
from tests.harness import read_topic, running
from tests.stages.sink.support import GROUP, with_emulator
from tests.tracing.support import (
    ALLOCATED,
    FAILED,
    PUBLISHER,
    PUBLISHER_SPAN,
    PUBLISHER_TRACE,
    REJECTED,
    Kept,
    chain,
    devices,
    hexid,
    run_mix,
    spans_by_id,
    trace_of,
    traced,
    traceparent,
)

pytestmark = pytest.mark.services

CHAIN = [
    "process iotda.subdevices.added",
    "send iotda.subdevices.added",
    "process iotda.down-events",
    "send iotda.down-events",
    "receive $oc/devices/{device_id}/sys/events/down",
]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Kept:
    """Every span the stages of this test end, in memory."""
    kept = Kept()
    monkeypatch.setattr(tracing, "_default_exporter", lambda: kept)
    return kept


def _named(name: str, uid: str) -> str:
    """A span name as written with this test's topic names."""
    return name.replace("iotda.subdevices.added", f"iotda.subdevices.added.{uid}").replace(
        "iotda.down-events", f"iotda.down-events.{uid}"
    )


async def test_each_child_is_one_trace_from_mqtt_to_dps(cfg, uid, spans, json_logs):  # noqa: PLR0915
    logs = json_logs("info")
    async with await start_emulator(devices=devices()) as emu:
        cfg = traced(cfg, emu)
        out = await run_mix(cfg)
    t = out.topics

    # Every record written carries a traceparent; a record keeps its event's trace.
    for records in t.values():
        for record in records:
            traceparent(record)
    [down_dlq] = t["down_events_dlq"]
    by_gateway = {r.key: trace_of(r) for r in t["down_events"]}
    assert by_gateway[b"gw-tr-1"] == PUBLISHER_TRACE  # continued, not replaced
    assert by_gateway[b"gw-tr-2"] != PUBLISHER_TRACE
    assert trace_of(down_dlq) not in by_gateway.values()
    first, second = by_gateway[b"gw-tr-1"], by_gateway[b"gw-tr-2"]
    assert {r.key: trace_of(r) for r in t["added"]} == {
        f"prod_{ALLOCATED[0]}".encode(): first,
        f"prod_{REJECTED}".encode(): first,
        f"prod_{ALLOCATED[1]}".encode(): second,
    }
    assert [(r.key, trace_of(r)) for r in t["failed"]] == [(FAILED.encode(), first)]
    assert {trace_of(r) for r in t["lifecycle"]} == {first, second}
    assert {r.key: trace_of(r) for r in t["allocations"]} == {
        ALLOCATED[0].encode(): first,
        ALLOCATED[1].encode(): second,
    }
    [dlq] = t["allocations_dlq"]
    assert (dlq.key, trace_of(dlq)) == (REJECTED.encode(), first)  # keeps its trace
    assert dict(dlq.headers)["tracestate"] == b"vendor=1"  # tracestate travels too

    finished = spans.get_finished_spans()
    by_id = spans_by_id(finished)
    services = {s.resource.attributes["service.name"] for s in finished}
    assert services == {"pipeline-ingest", "pipeline-route", "pipeline-sink"}
    sink_spans = {
        s.attributes["dps.sn"]: s
        for s in finished
        if s.name == _named(CHAIN[0], uid) and "dps.sn" in s.attributes
    }
    assert sorted(sink_spans) == sorted([*ALLOCATED, REJECTED])
    for sn, span in sink_spans.items():
        assert chain(span, by_id) == [_named(n, uid) for n in CHAIN], sn
        assert span.kind is SpanKind.CONSUMER
        attrs = span.attributes
        assert attrs["messaging.system"] == "kafka"
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["messaging.destination.name"] == cfg.kafka.topics.added
        assert attrs["messaging.consumer.group.name"] == cfg.sink.group_id
        assert attrs["messaging.kafka.message.key"] == f"prod_{sn}"
        assert isinstance(attrs["messaging.kafka.offset"], int)
        assert attrs["iotda.gateway_id"] in ("gw-tr-1", "gw-tr-2")
        calls = [s for s in finished if parent_of(s) == span.context.span_id]
        [dps] = [s for s in calls if s.kind is SpanKind.CLIENT and "dps.sn" in s.attributes]
        assert dps.name == "POST /dps-service/v2.5/pvs/device"
        assert dps.attributes["http.request.method"] == "POST"
        assert dps.attributes["url.full"].startswith(emu.url)
        assert "allocate" in dps.attributes["url.full"]
        assert dps.attributes["http.response.status_code"] == 200
        [sent] = [s for s in calls if s.kind is SpanKind.PRODUCER]
        if sn == REJECTED:
            assert span.status.status_code is StatusCode.ERROR
            assert span.status.description.startswith("rejected: ")
            assert span.attributes["dps.code"] == 35601
            assert dps.attributes["dps.code"] == 35601
            assert dps.status.status_code is StatusCode.ERROR
            assert sent.name == f"send {cfg.kafka.topics.allocations_dlq}"
            assert hexid(sent.context.span_id, 16) == traceparent(dlq)[36:52]
        else:
            assert span.status.status_code is StatusCode.UNSET
            assert dps.attributes["dps.code"] == 0
            assert sent.name == f"send {cfg.kafka.topics.allocations}"
    # The publisher's span is the parent of the MQTT receive.
    [receive] = [
        s for s in finished if s.kind is SpanKind.CONSUMER and s.name.startswith("receive")
        and s.attributes["messaging.destination.name"].startswith("$oc/devices/gw-tr-1/")
    ]  # fmt: skip
    assert hexid(receive.context.trace_id, 32) == PUBLISHER_TRACE
    assert parent_id_of(receive) == PUBLISHER_SPAN
    assert receive.attributes["messaging.system"] == "mqtt"
    assert receive.attributes["iotda.gateway_id"] == "gw-tr-1"
    # The failed child: its own send in the router, in the event's trace.
    [failed] = [s for s in finished if s.name == f"send {cfg.kafka.topics.failed}"]
    assert hexid(failed.context.trace_id, 32) == first
    assert failed.attributes["messaging.kafka.message.key"] == FAILED
    # The undecodable message: the receive says why, the DLQ record is in its trace.
    [bad] = [s for s in finished if s.name.startswith("receive") and
             s.attributes["messaging.destination.name"].startswith("$oc/devices/gw-tr-3/")]  # fmt: skip
    assert bad.status.status_code is StatusCode.ERROR
    assert hexid(bad.context.trace_id, 32) == trace_of(down_dlq)

    # Log lines written while handling the rejected child carry its trace.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    [rejected] = [x for x in lines if x["msg"].startswith(f"DPS rejected sn {REJECTED}")]
    assert rejected["trace_id"] == first
    assert rejected["span_id"] == hexid(sink_spans[REJECTED].context.span_id, 16)

    # The call latency carries an exemplar of a sampled trace, in OpenMetrics.
    text = generate_latest(REGISTRY).decode()  # type: ignore[no-untyped-call]
    exemplars = [line for line in text.splitlines()
                 if line.startswith("pipeline_sink_call_seconds_bucket") and "# {" in line]  # fmt: skip
    assert exemplars
    assert any(f'trace_id="{tid}"' in line for line in exemplars for tid in (first, second))


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def parent_id_of(span: ReadableSpan) -> str | None:
    return hexid(span.parent.span_id, 16) if span.parent is not None else None


async def test_tracing_off_passes_headers_along_and_makes_no_span(cfg, spans, json_logs):
    logs = json_logs("info")
    async with await start_emulator(devices=devices()) as emu:
        cfg = with_emulator(cfg, emu)  # [tracing] enabled = false
        out = await run_mix(cfg)
    t = out.topics
    assert spans.get_finished_spans() == ()
    parents = {r.key: traceparent(r) for r in t["down_events"]}
    assert parents[b"gw-tr-1"] == PUBLISHER  # passed along unchanged
    started = parents[b"gw-tr-2"]
    assert started.startswith("00-")
    assert started.endswith("-00")
    for name in ("added", "failed", "lifecycle", "allocations", "allocations_dlq"):
        for record in t[name]:
            assert traceparent(record) in (PUBLISHER, started), name
    [dlq] = t["allocations_dlq"]
    assert traceparent(dlq) == PUBLISHER
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    [rejected] = [x for x in lines if x["msg"].startswith(f"DPS rejected sn {REJECTED}")]
    assert (rejected["trace_id"], rejected["span_id"]) == (PUBLISHER_TRACE, PUBLISHER_SPAN)


async def test_a_redriven_record_continues_its_trace_with_a_link_to_the_redrive(cfg, uid, spans):
    async with await start_emulator(devices=devices()) as emu:
        cfg = traced(cfg, emu)
        await run_mix(cfg)
        emu.state.register([{"sn": REJECTED, "group_id": GROUP}])
        assert await redrive(cfg, "allocations") == 1
        async with running(Sink(cfg)):
            allocations = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=3)
    [again] = [r for r in allocations if r.key == REJECTED.encode()]
    assert trace_of(again) == PUBLISHER_TRACE
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added)
    [redriven] = [r for r in added if dict(r.headers).get("redriven-from")]
    assert trace_of(redriven) == PUBLISHER_TRACE
    finished = spans.get_finished_spans()
    [run] = [s for s in finished if s.name == "redrive allocations"]
    assert run.resource.attributes["service.name"] == "pipeline-redrive"
    [send] = [s for s in finished if s.attributes.get("pipeline.redriven_from")]
    assert hexid(send.context.trace_id, 32) == PUBLISHER_TRACE
    assert [link.context.span_id for link in send.links] == [run.context.span_id]
    assert traceparent(redriven)[36:52] == hexid(send.context.span_id, 16)
    processed = [
        s for s in finished
        if s.name == _named(CHAIN[0], uid) and s.attributes.get("dps.sn") == REJECTED
    ]  # fmt: skip
    assert len(processed) == 2  # rejected, then allocated after the redrive
    assert msgspec.json.decode(again.value)["sn"] == REJECTED
