"""Traces in a real Jaeger v2 over OTLP/HTTP: ingest, router and sink on the real brokers
and the DPS emulator, a mix of allocated, DPS-rejected and IoTDA-failed children."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from pipeline.dps.emulator import start_emulator
from tests.tracing.conftest import Jaeger
from tests.tracing.support import (
    ALLOCATED,
    FAILED,
    PUBLISHER_SPAN,
    PUBLISHER_TRACE,
    REJECTED,
    devices,
    run_mix,
    trace_of,
    traced,
)

pytestmark = [pytest.mark.services, pytest.mark.jaeger]


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def parent(span: dict[str, Any]) -> str | None:
    refs = [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]
    return refs[0] if refs else None


async def get(http: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with http.get(url, params=params) as answer:
        answer.raise_for_status()
        return (await answer.json())["data"]


async def traces_of(
    http: aiohttp.ClientSession, jaeger: Jaeger, sn: str, spans: int
) -> list[dict[str, Any]]:
    """The traces whose sink span is sn's, once one holds at least ``spans`` spans."""
    query = {"service": "pipeline-sink", "tags": json.dumps({"dps.sn": sn}), "limit": "20"}
    async with asyncio.timeout(30):
        while True:
            found = await get(http, f"{jaeger.api}/api/traces", **query)
            if found and max(len(t["spans"]) for t in found) >= spans:
                return list(found)
            await asyncio.sleep(0.2)


async def test_each_child_has_one_trace_in_jaeger(cfg, uid, jaeger, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    async with await start_emulator(devices=devices()) as emu:
        cfg = traced(cfg, emu)
        out = await run_mix(cfg)  # the stages stopped: their spans are flushed
    t = cfg.kafka.topics
    first = {trace_of(r) for r in out.topics["failed"]}
    assert first == {PUBLISHER_TRACE}

    async with aiohttp.ClientSession() as http:
        services = await get(http, f"{jaeger.api}/api/services")
        assert {"pipeline-ingest", "pipeline-route", "pipeline-sink"} <= set(services)
        for sn in [*ALLOCATED, REJECTED]:
            # receive, send, process, send, process, the DPS call, the outcome's send
            found = await traces_of(http, jaeger, sn, 7)
            assert len(found) == 1, f"{sn}: {len(found)} traces"
            [trace] = found
            names = {p: trace["processes"][p]["serviceName"] for p in trace["processes"]}
            spans = {s["spanID"]: s for s in trace["spans"]}

            def one(service: str, name: str, spans=spans, names=names, sn=sn, **want: Any):
                hits = [
                    s for s in spans.values()
                    if names[s["processID"]] == service and s["operationName"] == name
                    and all(tags(s).get(k) == v for k, v in want.items())
                ]  # fmt: skip
                assert len(hits) == 1, f"{sn}: {service} {name} {want}: {len(hits)} spans"
                return hits[0]

            dps = one("pipeline-sink", "POST /dps-service/v2.5/pvs/device", **{"dps.sn": sn})
            sink = one("pipeline-sink", f"process {t.added}", **{"dps.sn": sn})
            routed = one("pipeline-route", f"send {t.added}", **{
                "messaging.kafka.message.key": f"prod_{sn}"})  # fmt: skip
            gateway = "gw-tr-1" if sn in (ALLOCATED[0], REJECTED) else "gw-tr-2"
            router = one("pipeline-route", f"process {t.down_events}")
            landed = one("pipeline-ingest", f"send {t.down_events}")
            receive = one(
                "pipeline-ingest", "receive $oc/devices/{device_id}/sys/events/down",
                **{"iotda.gateway_id": gateway},
            )  # fmt: skip
            assert parent(dps) == sink["spanID"]
            assert parent(sink) == routed["spanID"]
            assert parent(routed) == router["spanID"]
            assert parent(router) == landed["spanID"]
            assert parent(landed) == receive["spanID"]
            assert tags(receive)["messaging.system"] == "mqtt"
            assert tags(sink)["messaging.consumer.group.name"] == cfg.sink.group_id
            assert tags(dps)["http.request.method"] == "POST"
            assert tags(dps)["http.response.status_code"] == 200
            if gateway == "gw-tr-1":  # the publisher's trace, continued
                assert trace["traceID"] == PUBLISHER_TRACE
                assert parent(receive) == PUBLISHER_SPAN
            if sn == REJECTED:
                assert tags(sink)["dps.code"] == 35601
                assert tags(sink)["otel.status_code"] == "ERROR"
                assert tags(sink)["otel.status_description"].startswith("rejected: ")
                assert tags(dps)["dps.code"] == 35601
                one("pipeline-sink", f"send {t.allocations_dlq}")
            else:
                assert tags(dps)["dps.code"] == 0
                one("pipeline-sink", f"send {t.allocations}")
                if sn == ALLOCATED[0]:  # the IoTDA-failed child of the same event
                    one("pipeline-route", f"send {t.failed}", **{
                        "messaging.kafka.message.key": FAILED})  # fmt: skip
