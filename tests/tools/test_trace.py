"""pipeline trace: journeys produced by the real stages, read back from the real Kafka."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from pipeline.dps.emulator import start_emulator
from pipeline.errors import InputError
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from pipeline.tools.redrive import redrive
from pipeline.tools.replay import replay
from pipeline.tools.trace import NOT_FOUND, check_query, trace, walk
from tests.harness import add_response, read_topic, running, wait_check
from tests.stages.sink.support import child, with_emulator

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import Config
    from pipeline.tools.trace import Journey

GROUP = "group-1"


def steps(journey: Journey) -> list[tuple[str, str]]:
    return [(s.step, s.topic) for s in journey.steps]


async def test_journeys_of_children_the_real_stages_handled(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    ok, nogroup, unknown, bad = (f"{kind}-{uid}" for kind in ("ok", "nogroup", "unknown", "bad"))
    gateway, event_id = f"gw-{uid}", f"ev-{uid}"
    message: dict[str, Any] = {
        "topic": f"$oc/devices/{gateway}/sys/events/down",
        "payload": add_response(event_id, [ok, nogroup, unknown], failed=[bad]),
    }
    fixture = tmp_path / "journey.jsonl"
    fixture.write_bytes(orjson.dumps(message) + b"\n")
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    devices: list[dict[str, Any]] = [
        {"sn": ok, "group_id": GROUP},
        {"sn": nogroup, "group_id": None},
    ]
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu)
        health = Health()
        async with (
            running(Ingest(cfg), health) as task,
            running(Router(cfg)),
            running(Sink(cfg), Health()),
        ):
            await wait_check(health, "ingest.mqtt", task)
            assert await replay(cfg.mqtt, [fixture], progress=False) == 1
            await read_topic(cfg.kafka, t.allocations, expect=1)
            await read_topic(cfg.kafka, t.allocations_dlq, expect=2)
            # The operator registers the unknown sn and redrives its rejection (35601).
            emu.state.register([{"sn": unknown, "group_id": GROUP}])
            assert await redrive(cfg, "allocations", codes=[35601]) == 1
            await read_topic(cfg.kafka, t.allocations, expect=2)

    await _single_journeys(cfg, uid, message)
    await _outputs(cfg, uid)
    await _partitions(cfg)


async def _single_journeys(cfg: Config, uid: str, message: dict[str, Any]) -> None:
    ok, nogroup, unknown, bad = (f"{kind}-{uid}" for kind in ("ok", "nogroup", "unknown", "bad"))
    gateway, event_id = f"gw-{uid}", f"ev-{uid}"
    t = cfg.kafka.topics
    # Allocated: the down event, the router's added record, the allocation.
    journey = await walk(cfg, sn=ok)
    assert steps(journey) == [
        ("down_event", t.down_events),
        ("added", t.added),
        ("allocated", t.allocations),
    ]
    down, added, allocated = journey.steps
    assert down.detail["gateway_id"] == gateway
    assert down.detail["mqtt_topic"] == message["topic"]
    assert down.detail["event_id"] == event_id
    assert down.detail["event_time"] == "20261122T063000Z"
    assert "received_at" in down.detail
    assert added.detail["device_id"] == f"prod_{ok}"
    assert (allocated.detail["sn"], allocated.detail["device_id"]) == (ok, f"prod_{ok}")
    # With the trace helper's headers, a trace id each; without, none (shown as "-").
    assert all(s.trace_id is None or len(s.trace_id) == 32 for s in journey.steps)
    assert steps(await walk(cfg, device_id=f"prod_{ok}")) == steps(journey)

    # Rejected by DPS: the reason and the code.
    journey = await walk(cfg, sn=nogroup)
    assert steps(journey) == [
        ("down_event", t.down_events),
        ("added", t.added),
        ("dlq", t.allocations_dlq),
    ]
    rejected = journey.steps[-1].detail
    assert (rejected["error_kind"], rejected["code"]) == ("rejected", 35404)

    # Failed in IoTDA: the router's failed record, keyed by node_id (= the sn by default).
    journey = await walk(cfg, sn=bad)
    assert steps(journey) == [("down_event", t.down_events), ("failed", t.failed)]
    failed = journey.steps[-1].detail
    assert (failed["node_id"], failed["error_code"], failed["error_msg"]) == (bad, "101004", "x")

    # Rejected, redriven, allocated.
    journey = await walk(cfg, sn=unknown)
    assert steps(journey) == [
        ("down_event", t.down_events),
        ("added", t.added),
        ("dlq", t.allocations_dlq),
        ("redriven", t.added),
        ("allocated", t.allocations),
    ]
    dlq, redriven = journey.steps[2], journey.steps[3]
    assert dlq.detail["code"] == 35601
    assert redriven.detail["redriven_from"] == f"{dlq.topic}/{dlq.partition}/{dlq.offset}"

    # An event: every child it names, each record once.
    journey = await walk(cfg, event_id=event_id)
    assert sorted(s.step for s in journey.steps) == sorted(
        ["down_event", "failed", "dlq", "dlq", "redriven"] + 3 * ["added"] + 2 * ["allocated"]
    )


async def _outputs(cfg: Config, uid: str) -> None:
    ok, nogroup = f"ok-{uid}", f"nogroup-{uid}"
    t = cfg.kafka.topics
    # --json: the shape machines read.
    out = io.StringIO()
    assert await trace(cfg, sn=ok, as_json=True, out=out) == 0
    document = json.loads(out.getvalue())
    assert set(document) == {"query", "since", "until", "steps"}
    assert document["query"] == {"sn": ok}
    assert [s["step"] for s in document["steps"]] == ["down_event", "added", "allocated"]
    for step in document["steps"]:
        assert set(step) == {
            "step",
            "topic",
            "partition",
            "offset",
            "timestamp",
            "trace_id",
            "detail",
        }
        assert step["timestamp"].endswith("Z")

    # Plain lines off a terminal, oldest first.
    out = io.StringIO()
    assert await trace(cfg, sn=nogroup, out=out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["down_event", "added", "dlq"]
    assert "code=35404" in lines[2]
    assert lines[-1] == f"sn {nogroup}: 3 records"

    # A window: nothing before it, everything within it.
    now = dt.datetime.now(dt.UTC)
    out = io.StringIO()
    assert await trace(cfg, sn=ok, since=now, out=out) == NOT_FOUND
    assert out.getvalue().startswith(f"sn {ok}: no record in the topics since ")
    within = await walk(cfg, sn=ok, since=now - dt.timedelta(hours=1), until=now)
    assert steps(within) == [
        ("down_event", t.down_events),
        ("added", t.added),
        ("allocated", t.allocations),
    ]


async def _partitions(cfg: Config) -> None:
    t = cfg.kafka.topics
    # Every record is in the partition kafka.partition_of gives its key.
    for topic in (t.down_events, t.added, t.failed, t.allocations, t.allocations_dlq):
        async with kafka.reader(cfg.kafka) as client:
            count = len(await kafka.partitions(client, topic))
        assert count == cfg.kafka.partitions > 1
        records = await read_topic(cfg.kafka, topic)
        assert records
        for record in records:
            assert record.key is not None
            assert record.partition == kafka.partition_of(record.key, count), (topic, record.key)


async def test_nothing_found(cfg: Config, uid: str) -> None:
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all())
    out = io.StringIO()
    assert await trace(cfg, sn=f"none-{uid}", out=out) == NOT_FOUND
    assert out.getvalue() == f"sn none-{uid}: no record in the topics\n"
    out = io.StringIO()
    assert await trace(cfg, device_id=f"none-{uid}", as_json=True, out=out) == NOT_FOUND
    assert json.loads(out.getvalue())["steps"] == []


async def test_a_child_without_an_outcome_is_found_by_its_sn(cfg: Config, uid: str) -> None:
    # The sink has not got to it: only the router's added record, keyed by device_id.
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    sn, device_id = f"waiting-{uid}", f"prod_waiting-{uid}"
    async with kafka.producer(cfg.kafka) as producer:
        for n in range(3):  # others first, in whichever partitions
            await producer.send_and_wait(t.added, child(f"other-{n}-{uid}"), key=b"other-%d" % n)
        await producer.send_and_wait(t.added, child(sn), key=device_id.encode())
    journey = await walk(cfg, sn=sn)
    assert steps(journey) == [("added", t.added)]
    assert journey.steps[0].detail["device_id"] == device_id
    assert journey.steps[0].detail["node_id"] == sn


def test_bad_input_is_refused_before_any_broker() -> None:
    with pytest.raises(InputError, match="give one of"):
        check_query()
    with pytest.raises(InputError, match="--sn: empty"):
        check_query(sn=" ")
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(InputError, match="is not before --until"):
        check_query(sn="x", since=now, until=now)
    # The command line: bad input is exit 2, and no broker is needed to say so.
    for args, line in (
        (["--sn", ""], "pipeline: --sn: empty"),
        (["--sn", "x", "--until", "soon"], "pipeline: --until 'soon': give a duration"),
        (["--sn", "x", "--device-id", "y"], "not allowed with argument"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "--log-level", "error", "trace", *args],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": "/usr/bin:/bin", "PIPELINE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert line in done.stderr
