"""The trace context tracing off passes along (pipeline/ops/tracing.py), without brokers."""

from __future__ import annotations

import logging

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
