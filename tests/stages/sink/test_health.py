"""What the sink tells its operator: readiness with the cause, warnings with context, liveness."""

from __future__ import annotations

import asyncio
import collections
import logging

import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.ops.logs import JsonFormatter
from pipeline.ops.server import Health
from pipeline.stages.sink import Sink
from pipeline.tools.services import free_port
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    GATEWAY,
    child,
    eventually,
    ok,
    prepare,
    produce_children,
    with_emulator,
)

pytestmark = pytest.mark.services

SECRET_HINT = "check sink.dps.app_key and sink.dps.app_secret"


async def test_a_wrong_secret_pauses_the_sink_and_readiness_says_what_to_check(
    cfg: Config, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The operator must see the cause (code 1003) and what to check: in /readyz, and in a
    # warning carrying the record's context, not only in a line at info.
    sns = [f"{uid}-{i}" for i in range(3)]
    caplog.set_level(logging.WARNING, logger="pipeline")
    await prepare(cfg)
    async with await start_emulator(app_secret="the-real-secret", accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)  # the sink has the demo secret: code 1003
        await produce_children(cfg, [child(sn) for sn in sns])
        health = Health()
        async with running(Sink(cfg), health) as task:
            await eventually(
                lambda: "sink.dps" in health.details(),
                lambda: f"sink.dps failing with a reason ({health.report()})",
                timeout=30,
                task=task,
            )
            ready, details = health.report(), health.details()
            # The operator sets the right secret (here: the gateway accepts the sink's):
            # the sink notices by itself and carries on where it stopped.
            emu.state.app_secret = cfg.sink.dps.app_secret.reveal()
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=3)
            ready_after, details_after = health.report(), health.details()
        calls = list(emu.state.calls)

    diagnosis = (
        "DPS code 1003 (token request for app key demo-app-key refused: invalid encryption): "
        f"{SECRET_HINT}"
    )
    assert (ready, details) == ({"sink.kafka": True, "sink.dps": False}, {"sink.dps": diagnosis})
    assert (ready_after, details_after) == ({"sink.kafka": True, "sink.dps": True}, {})
    assert sorted(r.key for r in got) == sorted(sn.encode() for sn in sns)
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(sns, 1)
    # At warning level, with the code, the hint and the record's context as JSON fields.
    failures = [r for r in caplog.records if r.getMessage() == diagnosis]
    assert failures
    assert {r.levelno for r in failures} == {logging.WARNING}
    line = orjson.loads(JsonFormatter().format(failures[0]))
    assert (line["level"], line["code"], line["hint"]) == ("warning", 1003, SECRET_HINT)
    assert line["sn"] in sns
    assert (line["gateway"], line["event_id"]) == (GATEWAY, "ev-1")
    assert line["topic"] == cfg.kafka.topics.added
    assert isinstance(line["partition"], int)
    assert isinstance(line["offset"], int)
    paused = [r for r in caplog.records if r.getMessage().startswith("DPS fails for everyone")]
    assert [(r.levelno, r.getMessage()) for r in paused] == [
        (
            logging.WARNING,
            f"DPS fails for everyone: pausing intake, probing with backoff ({diagnosis})",
        )
    ]


async def test_an_unreachable_dps_says_to_check_the_base_url(cfg: Config, uid: str) -> None:
    port = free_port()  # nothing listens there
    dps = msgspec.structs.replace(cfg.sink.dps, base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    cfg = msgspec.structs.replace(cfg, sink=msgspec.structs.replace(cfg.sink, dps=dps))
    await prepare(cfg)
    await produce_children(cfg, [child(f"{uid}-0")])
    health = Health()
    async with running(Sink(cfg), health) as task:
        await eventually(
            lambda: "sink.dps" in health.details(),
            lambda: f"sink.dps failing with a reason ({health.report()})",
            timeout=30,
            task=task,
        )
        details = health.details()
    assert details == {
        "sink.dps": f"DPS (token request: connection refused by 127.0.0.1:{port}): "
        "check sink.dps.base_url and that the API gateway is reachable from here"
    }


async def test_liveness_fails_only_while_records_wait_and_nothing_moves(
    cfg: Config, uid: str
) -> None:
    steady, stall_after = [f"{uid}-{i:02d}" for i in range(20)], 1.0
    stuck = f"{uid}-stuck"
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": 100})  # an answer every 0.1 s: 10 x inside the bound
        cfg = with_emulator(cfg, emu, concurrency=1, timeout=30.0)
        health = Health(stall_after=stall_after)
        seen: list[dict[str, float]] = []
        async with running(Sink(cfg), health) as task:
            assert health.stalled() == {}  # registered, nothing waiting
            # Warm: joined, outcomes read back, token fetched (those take what they take).
            await produce_children(cfg, [child(f"{uid}-warm")])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            await produce_children(cfg, [child(sn) for sn in steady])
            while sum(1 for c in emu.state.calls if ok(c)) < len(steady) + 1:
                assert not task.done()
                seen.append(health.stalled())
                await asyncio.sleep(0.05)
            # Now DPS hangs on the next call: a record waits and nothing moves.
            emu.state.set_faults({"latency_ms": 3000})
            await produce_children(cfg, [child(stuck)])
            await eventually(
                lambda: "sink" in health.stalled(),
                lambda: f"the sink reported stalled ({health.stalled()})",
                timeout=30,
                task=task,
            )
            stalled = health.stalled()["sink"]
            await eventually(
                lambda: any(c.sn == stuck and ok(c) for c in emu.state.calls),
                lambda: "the slow call answered",
                timeout=30,
                task=task,
            )
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=len(steady) + 2)
            after = health.stalled()

    assert seen
    assert all(s == {} for s in seen), [s for s in seen if s]
    assert stalled >= stall_after
    assert after == {}
