"""Exemplars: a sampled trace's id on the hot-path metrics, served as OpenMetrics."""

from __future__ import annotations

import aiohttp

from pipeline.config import TracingConfig
from pipeline.ops import tracing
from pipeline.ops.metrics import SINK_CALL_SECONDS
from pipeline.ops.server import Health, ops_server
from tests.tracing.support import Kept


class _Record:
    topic, partition, offset, key, headers = "added", 0, 7, b"k", ()


async def test_metrics_serve_the_call_latency_exemplar_as_openmetrics():
    traces = tracing.start("sink", TracingConfig(enabled=True), exporter=Kept())
    with traces.process(_Record(), group="g") as hop:
        SINK_CALL_SECONDS.observe(7.5, exemplar=tracing.exemplar())  # the 10 s bucket
    await traces.close()
    trace_id = hop.ids()[0]
    async with ops_server("127.0.0.1", 0, Health()) as port, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/metrics"
        accept = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
        async with http.get(url, headers=accept) as answer:
            assert answer.content_type == "application/openmetrics-text"
            text = await answer.text()
        async with http.get(url) as plain:  # Prometheus' text format has no exemplars
            assert plain.content_type == "text/plain"
            assert "trace_id" not in await plain.text()
    [line] = [
        x for x in text.splitlines() if x.startswith('pipeline_sink_call_seconds_bucket{le="10.0"}')
    ]
    assert f'# {{trace_id="{trace_id}"}} 7.5' in line


def test_an_unsampled_hop_gives_no_exemplar():
    with tracing.OFF.process(_Record()) as hop:
        assert tracing.exemplar() is None
        assert hop.headers[0][0] == "traceparent"
    assert tracing.exemplar() is None  # outside any hop
