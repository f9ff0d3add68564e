"""The trace context tracing passes along (pipeline/ops/tracing.py), and what an unsampled
hop costs (no span), without brokers."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from yarl import URL

from pipeline.config import TracingConfig
from pipeline.ops import tracing

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Record:
    topic, partition, offset, key = "t", 0, 0, None

    def __init__(self, headers: list[tuple[str, bytes]]) -> None:
        self.headers = headers


def _properties(*pairs: tuple[str, str]) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = list(pairs)
    return properties


def test_ingest_continues_a_valid_traceparent_user_property() -> None:
    props = _properties(("other", "x"), ("traceparent", PARENT), ("tracestate", "a=1"))
    with tracing.OFF.receive("t", props) as hop:
        assert hop.headers == [("traceparent", PARENT.encode()), ("tracestate", b"a=1")]
        assert tracing.log_ids() == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert tracing.log_ids() is None


def test_ingest_starts_an_unsampled_trace_for_none_or_an_invalid_one() -> None:
    for props in (None, _properties(), _properties(("traceparent", "00-zz-1-01")),
                  _properties(("traceparent", f"00-{'0' * 32}-00f067aa0ba902b7-01"))):  # fmt: skip
        with tracing.OFF.receive("t", props) as hop:
            [(name, value)] = hop.headers
            assert name == "traceparent"
            assert tracing.valid(value.decode())
            assert value.endswith(b"-00")
            assert value != PARENT.encode()


def test_downstream_passes_the_header_along_unchanged() -> None:
    with tracing.OFF.process(_Record([("x", b"y"), ("traceparent", PARENT.encode())])) as hop:
        out = hop.send("added", b"k")
        assert out.headers == [("traceparent", PARENT.encode())]
        assert tracing.current() is hop
        assert tracing.exemplar() is None  # nothing is exported: no exemplar
    with tracing.OFF.process(_Record([])) as fresh:  # a record from before tracing
        assert tracing.valid(fresh.traceparent)


def test_off_unless_enabled_and_not_disabled_by_the_environment(monkeypatch) -> None:
    assert not tracing.start("sink", TracingConfig()).enabled
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.start("sink", TracingConfig(enabled=True)).enabled


def test_log_lines_carry_the_hop_ids(json_logs) -> None:
    stream = json_logs("info")
    with tracing.OFF.process(_Record([("traceparent", PARENT.encode())])):
        logging.getLogger("pipeline.test").info("inside")
    logging.getLogger("pipeline.test").info("outside")
    inside, outside = stream.getvalue().splitlines()
    assert '"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7"' in inside
    assert "trace_id" not in outside


UNSAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def _production(monkeypatch, ratio: str) -> tuple[tracing.Tracing, InMemorySpanExporter]:
    """Tracing on with the documented production sampler at ``ratio``, spans in memory."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    kept = InMemorySpanExporter()
    return tracing.start("sink", TracingConfig(enabled=True), exporter=kept), kept


async def test_an_unsampled_parent_makes_no_span_and_passes_its_headers_along(
    monkeypatch, json_logs
) -> None:
    traces, kept = _production(monkeypatch, "1.0")  # even a ratio of 1 follows the parent
    stream = json_logs("info")
    record = _Record([("traceparent", UNSAMPLED.encode()), ("tracestate", b"a=1")])
    with traces.process(record, group="g") as hop:
        assert hop.headers == [("traceparent", UNSAMPLED.encode()), ("tracestate", b"a=1")]
        out = hop.send("allocations", b"k")
        assert out.headers == hop.headers
        out.sent()
        with traces.call("POST", URL("http://dps.test/dps/v1/allocate")) as call:
            assert call.headers() == {}
        assert tracing.exemplar() is None
        assert not hop.sampled
        logging.getLogger("pipeline.test").info("inside")
    props = _properties(("traceparent", UNSAMPLED))
    with traces.receive("t", props) as received:
        assert received.headers == [("traceparent", UNSAMPLED.encode())]
    await traces.close()
    assert kept.get_finished_spans() == ()
    assert '"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7"' in (
        stream.getvalue()
    )


async def test_a_sampled_parent_still_makes_its_spans(monkeypatch) -> None:
    traces, kept = _production(monkeypatch, "0.0")  # the ratio decides roots only
    with traces.process(_Record([("traceparent", PARENT.encode())]), group="g") as hop:
        assert hop.sampled
        hop.send("allocations", b"k").sent()
    await traces.close()
    names = sorted(s.name for s in kept.get_finished_spans())
    assert names == ["process t", "send allocations"]
    assert {s.context.trace_id for s in kept.get_finished_spans()} == {int(PARENT[3:35], 16)}


async def test_a_new_trace_is_a_span_only_when_its_trace_id_is_sampled(monkeypatch) -> None:
    for ratio, sampled in (("0.0", False), ("1.0", True)):
        traces, kept = _production(monkeypatch, ratio)
        with traces.receive("t", None) as hop:
            [(_, value)] = hop.headers
            assert tracing.valid(value.decode())
            assert int(value[-2:], 16) & 1 == sampled  # the flags' sampled bit
        await traces.close()
        spans = kept.get_finished_spans()
        assert len(spans) == (1 if sampled else 0)
        if sampled:  # the span is of the trace id the ratio was applied to
            assert f"{spans[0].context.trace_id:032x}" == hop.ids()[0]


async def test_the_ratio_applies_to_the_new_trace_id_as_the_sdk_would(monkeypatch) -> None:
    traces, kept = _production(monkeypatch, "0.25")
    ratio = TraceIdRatioBased(0.25)
    for _ in range(400):
        with traces.receive("t", None) as hop:
            trace_id = int(hop.ids()[0], 16)
            expected = (
                ratio.should_sample(None, trace_id, "x").decision is Decision.RECORD_AND_SAMPLE
            )
            assert hop.sampled is expected
    await traces.close()
    assert 40 < len(kept.get_finished_spans()) < 160  # about 100 of 400


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (True, None)),  # the SDK's default: parentbased_always_on
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
         (True, 1 << 63)),
        ({"OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0"}, (False, 0)),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
         (False, 1 << 64)),  # unreadable: 1.0, as the SDK does
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, (True, 0)),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, (False, None)),
        ({"OTEL_TRACES_SAMPLER": "my_entry_point_sampler"}, (False, None)),
    ],
)  # fmt: skip
def test_what_may_be_decided_without_the_sdk_follows_the_sampler_named(
    environ: dict[str, str], expected: tuple[bool, int | None]
) -> None:
    assert tracing._shortcuts(environ) == expected
