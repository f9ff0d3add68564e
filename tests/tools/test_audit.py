"""pipeline audit against the real Kafka: each kind of gap planted, each one reported."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import sys
import time
from typing import TYPE_CHECKING

import msgspec
import orjson
import pytest

from pipeline.io import kafka
from pipeline.schemas import DownEventRecord
from pipeline.tools.audit import audit, check
from tests import harness
from tests.harness import add_response

if TYPE_CHECKING:
    from pathlib import Path

    from aiokafka import AIOKafkaProducer

    from pipeline.config import Config

pytestmark = pytest.mark.services

PIPELINE = (sys.executable, "-m", "pipeline")
TRACE = "4bf92f3577b34da6a3ce929d0e0e47{:02x}"


def traceparent(n: int) -> list[tuple[str, bytes]]:
    return [("traceparent", f"00-{TRACE.format(n)}-00f067aa0ba902b7-01".encode())]


class Planter:
    """Writes records as the stages would, and remembers where each one went."""

    def __init__(self, cfg: Config, producer: AIOKafkaProducer, at_ms: int) -> None:
        self.t = cfg.kafka.topics
        self.producer = producer
        self.at_ms = at_ms

    async def send(
        self,
        topic: str,
        value: object,
        key: str,
        headers: list[tuple[str, bytes]] | None = None,
        at_ms: int | None = None,
    ) -> str:
        meta = await self.producer.send_and_wait(
            topic,
            orjson.dumps(value),
            key=key.encode(),
            headers=headers or [],
            timestamp_ms=at_ms or self.at_ms,
        )
        return f"{topic}/{meta.partition}/{meta.offset}"

    async def event(self, gateway: str, event: dict[str, object], trace: int) -> None:
        record = DownEventRecord(
            gateway_id=gateway,
            mqtt_topic=f"$oc/devices/{gateway}/sys/events/down",
            received_at="2026-12-04T18:00:00.000Z",
            event=msgspec.Raw(orjson.dumps(event)),
        )
        await self.producer.send_and_wait(
            self.t.down_events,
            msgspec.json.encode(record),
            key=gateway.encode(),
            headers=traceparent(trace),
            timestamp_ms=self.at_ms,
        )

    async def added(self, gateway: str, event_id: str, sn: str, trace: int, **more: object) -> str:
        value = {
            "gateway_id": gateway,
            "event_id": event_id,
            "event_time": None,
            "event_time_raw": None,
            "generation": 1,
            "device": {"node_id": sn, "device_id": f"prod_{sn}"},
        }
        headers = traceparent(trace) + list(more.pop("headers", []))  # type: ignore[call-overload]
        return await self.send(self.t.added, value, f"prod_{sn}", headers, **more)  # type: ignore[arg-type]

    async def failed(self, gateway: str, event_id: str, node: str) -> None:
        value = {
            "gateway_id": gateway,
            "event_id": event_id,
            "event_time": None,
            "event_time_raw": None,
            "reason": {"node_id": node, "product_id": "prod", "error_code": "1", "error_msg": "x"},
        }
        await self.send(self.t.failed, value, node)

    async def outcome(self, topic: str, source: str, value: dict[str, object]) -> str:
        return await self.send(topic, value, "sn", [("source", source.encode())])


async def plant(cfg: Config, at_ms: int) -> None:
    """Every kind of gap, and outcomes that are no gap; see the expectations below."""
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all())
    t = cfg.kafka.topics
    rejected = {"error_kind": "rejected", "code": 11404}
    async with kafka.producer(cfg.kafka) as producer:
        p = Planter(cfg, producer, at_ms)
        await p.event("gw-1", add_response("e1", ["c1", "c2", "c3", "c4", "c5"], ["f1"]), 1)
        await p.event("gw-1", add_response("e2", ["c6"], ["f2"]), 2)  # not routed
        await p.failed("gw-1", "e1", "f1")
        c1 = await p.added("gw-1", "e1", "c1", 11)
        await p.outcome(t.allocations, c1, {"sn": "c1"})  # done
        await p.added("gw-1", "e1", "c2", 12)  # no outcome
        c3 = await p.added("gw-1", "e1", "c3", 13)
        await p.outcome(t.allocations, c3, {"sn": "c3"})
        await p.outcome(t.allocations, c3, {"sn": "c3"})  # allocated twice
        c4 = await p.added("gw-1", "e1", "c4", 14)
        await p.outcome(t.allocations_dlq, c4, rejected)  # waiting for a redrive
        c5 = await p.added("gw-1", "e1", "c5", 15)
        dlq = await p.outcome(t.allocations_dlq, c5, rejected)
        again = await p.added("gw-1", "e1", "c5", 15, headers=[("redriven-from", dlq.encode())])
        await p.outcome(t.allocations, again, {"sn": "c5"})  # the redrive allocated: no gap
        c7 = await p.added("gw-1", "e3", "c7", 17)
        await p.outcome(t.allocations_dlq, c7, {"error_kind": "superseded"})  # deleted: done
        deleted = {"gateway_id": "gw-1", "device_id": "prod_c7", "generation": 2}
        d1 = await p.send(t.deleted, deleted, "prod_c7")
        await p.outcome(t.releases, d1, {"action": "superseded"})
        await p.send(t.deleted, deleted | {"device_id": "prod_c8"}, "prod_c8")  # no release
        # Outside the window: never counted.
        await p.added("gw-1", "e0", "old", 20, at_ms=at_ms - 3_600_000)


async def test_each_planted_gap_is_reported_with_its_trace_id(cfg: Config) -> None:
    at_ms = int(time.time() * 1000)
    await plant(cfg, at_ms)
    since = dt.datetime.fromtimestamp(at_ms / 1000 - 60, dt.UTC)
    report = await check(cfg, since=since, progress=False)
    assert report.counts == {"missing": 2, "duplicate": 1, "dead-lettered": 1, "unrouted": 1}
    assert (report.children, report.deleted, report.events) == (7, 2, 2)
    assert not report.holds
    found = {(g.kind, g.key, g.trace_id) for g in report.gaps}
    assert found == {
        ("missing", "prod_c2", TRACE.format(12)),
        ("missing", "prod_c8", "-"),
        ("duplicate", "prod_c3", TRACE.format(13)),
        ("dead-lettered", "prod_c4", TRACE.format(14)),
        ("unrouted", "gw-1", TRACE.format(2)),
    }
    [unrouted] = [g for g in report.gaps if g.kind == "unrouted"]
    assert unrouted.detail == "event e2: not in added: prod_c6; not in failed: f2"
    waited = {g.key: g.waiting_s for g in report.gaps if g.kind == "missing"}
    assert all(w is not None and 0 <= w < 600 for w in waited.values())
    assert report.oldest_missing_s == max(w or 0 for w in waited.values())
    # The window: a start after every record sees nothing; an end before them, nothing.
    later = await check(cfg, since=since + dt.timedelta(minutes=5), progress=False)
    assert (later.children, later.events, later.holds) == (0, 0, True)
    earlier = await check(
        cfg, since=since - dt.timedelta(hours=2), until=since - dt.timedelta(minutes=30),
        progress=False,
    )  # fmt: skip
    assert (earlier.children, earlier.counts["missing"], earlier.holds) == (1, 1, False)
    assert [g.key for g in earlier.gaps] == ["prod_old"]
    routing = await check(cfg, since=since, progress=False, only="routing")
    assert routing.counts == {"missing": 0, "duplicate": 0, "dead-lettered": 0, "unrouted": 1}


async def test_exit_codes_json_and_metrics(cfg: Config, tmp_path: Path) -> None:
    at_ms = int(time.time() * 1000)
    await plant(cfg, at_ms)
    metrics = tmp_path / "audit.prom"
    out = io.StringIO()
    since = dt.datetime.fromtimestamp(at_ms / 1000 - 60, dt.UTC)
    code = await audit(cfg, since=since, as_json=True, prometheus=metrics, progress=False, out=out)
    assert code == 1
    document = json.loads(out.getvalue())
    assert document["holds"] is False
    assert document["counts"]["missing"] == 2
    text = metrics.read_text()
    assert 'pipeline_audit_gaps{kind="missing"} 2.0' in text
    assert 'pipeline_audit_gaps{kind="unrouted"} 1.0' in text
    assert 'pipeline_audit_children{topic="added"} 7.0' in text
    assert "pipeline_audit_promise_holds 0.0" in text
    # A window with nothing in it holds: exit 0, through the command line.
    env = harness.worker_env(cfg)
    proc = await harness.start(
        *PIPELINE, "audit", "--since", "1s", "--until", "0s", "--no-progress",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert "the promise holds" in stdout.decode()
    proc = await harness.start(
        *PIPELINE, "audit", "--since", "2h", "--no-progress",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 1, stderr.decode()
    # the child an hour old is in this window too
    assert "3 missing, 1 duplicate, 1 dead-lettered, 1 unrouted" in stdout.decode()


@pytest.mark.parametrize(
    "argv",
    [
        ["--since", "yesterday"],
        ["--since", "1h", "--until", "2h"],
        ["--since", "1h", "--every", "5m"],
        ["--since", "1h", "--every", "soon", "--prometheus", "x.prom"],
    ],
)
async def test_bad_input_exits_2(argv: list[str]) -> None:
    proc = await harness.start(
        *PIPELINE, "audit", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await proc.communicate()
    assert proc.returncode == 2, stderr.decode()


async def test_every_rewrites_the_metrics_file_each_round(cfg: Config, tmp_path: Path) -> None:
    await plant(cfg, int(time.time() * 1000))
    metrics = tmp_path / "audit.prom"
    proc = await harness.start(
        *PIPELINE, "audit", "--since", "1h", "--every", "1s", "--prometheus", str(metrics),
        env=harness.worker_env(cfg), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    runs: set[str] = set()
    async with asyncio.timeout(60):
        while len(runs) < 2:  # two rounds, each one rewriting the file whole
            assert proc.returncode is None
            if metrics.exists():
                text = metrics.read_text()
                assert 'pipeline_audit_gaps{kind="missing"} 2.0' in text
                runs |= {
                    line for line in text.splitlines()
                    if line.startswith("pipeline_audit_last_run_timestamp_seconds ")
                }  # fmt: skip
            await asyncio.sleep(0.2)
    await harness.kill(proc)
