"""The sink against the real Kafka and the DPS emulator over real HTTP.

Children are produced straight into ``iotda.subdevices.added``; what the sink did is read
back from ``dps.allocations`` / ``dps.allocations.dlq`` and from the emulator's call log
(every allocate call it received, in order, with its answer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import time
from typing import Any

import msgspec
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import AllocationFailure
from pipeline.stages.sink import Sink
from pipeline.stages.sink.allocator import Allocator
from pipeline.tools.redrive import redrive
from tests.harness import audit_holds, kill, read_topic, running, spawn, terminate
from tests.stages.sink.support import (
    GATEWAY,
    GROUP,
    Tail,
    allocations,
    at,
    check_allocation,
    child,
    eventually,
    ok,
    ok_calls,
    opens,
    prepare,
    produce,
    produce_children,
    source_of,
    with_emulator,
)

pytestmark = pytest.mark.services

# --------------------------------------------------------------------------------------
# 1. Happy path and business errors


async def test_allocates_every_child_and_dead_letters_rejections(cfg: Config, uid: str) -> None:
    sns = [f"{uid}-{i:02d}" for i in range(30)]
    unknown, no_group = sns[0], sns[1]
    devices = [{"sn": no_group, "group_id": None}] + [
        {"sn": sn, "group_id": GROUP} for sn in sns[2:]
    ]
    await prepare(cfg)
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu)
        values = {sn: child(sn, event_id=f"ev-{sn}") for sn in sns}
        sources = dict(zip(sns, await produce_children(cfg, list(values.values())), strict=True))
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=28)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=2)
        calls = list(emu.state.calls)

    # DPS was asked exactly once per child, in this test's org, with the right answers.
    assert collections.Counter(c.sn for c in calls) == dict.fromkeys(sns, 1)
    assert {c.org_id for c in calls} == {cfg.sink.org_id}
    assert {c.sn: (c.http_status, c.code) for c in calls} == {
        sn: (200, {unknown: 35601, no_group: 35404}.get(sn, 0)) for sn in sns
    }

    # Exactly the successful ones are in dps.allocations, once each, with what DPS returned.
    assert sorted(r.key for r in got) == [sn.encode() for sn in sns[2:]]
    for record in got:
        sn = record.key.decode()
        value = check_allocation(cfg, record, sn)
        assert value.event_id == f"ev-{sn}"
        assert source_of(record) == sources[sn]

    # The two rejections are dead-lettered with DPS's code and message, and the input.
    assert sorted(r.key for r in dlq) == sorted([unknown.encode(), no_group.encode()])
    expected = {
        unknown: (35601, "Verify not pass/sn not found"),
        no_group: (35404, "Group/Device group not found"),
    }
    for record in dlq:
        sn = record.key.decode()
        failure = msgspec.json.decode(record.value, type=AllocationFailure)
        assert (failure.code, failure.msg) == expected[sn]
        assert failure.error_kind == "rejected"
        assert failure.attempts == 1
        assert (failure.sn, failure.org_id, failure.device_id) == (
            sn,
            cfg.sink.org_id,
            f"prod_{sn}",
        )
        assert (failure.gateway_id, failure.event_id) == (GATEWAY, f"ev-{sn}")
        assert failure.request_id
        assert failure.failed_at.endswith("Z")
        assert bytes(failure.record) == values[sn]
        assert source_of(record) == sources[sn]


# --------------------------------------------------------------------------------------
# 2. Input the sink cannot read


async def test_unreadable_input_is_dead_lettered_as_invalid_without_calling_dps(
    cfg: Config, uid: str
) -> None:
    good = f"{uid}-good"
    empty_node = child("", device_id=f"prod_{uid}-empty")
    inputs: list[tuple[bytes | None, bytes | None]] = [
        (b"not-json", b"not json"),
        (f"prod_{uid}-empty".encode(), empty_node),
        (b"tombstone", None),
        (f"prod_{good}".encode(), child(good)),
    ]
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": good, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu)
        sources = await produce(cfg, inputs)
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=3)
        calls = list(emu.state.calls)

    assert [c.sn for c in calls] == [good]  # nothing was sent for the unreadable records
    assert [r.key for r in got] == [good.encode()]
    check_allocation(cfg, got[0], good)
    by_source = {
        source_of(r): (r.key, msgspec.json.decode(r.value, type=AllocationFailure)) for r in dlq
    }
    assert set(by_source) == set(sources[:3])
    expected = [
        (
            b'"not json"',  # not JSON: kept readable, as a JSON string
            "not an added-child record: JSON is malformed: invalid character (byte 4)",
        ),
        (empty_node, "sn: node_id is empty (sink.sn_from = 'node_id')"),
        (b"null", "not an added-child record: the record has no value (a tombstone)"),
    ]
    for source, (record, msg) in zip(sources[:3], expected, strict=True):
        key, failure = by_source[source]
        assert key is None
        assert (failure.error_kind, failure.code, failure.msg) == ("invalid", None, msg)
        assert failure.attempts == 0
        assert (failure.sn, failure.org_id, failure.device_id) == (None, None, None)
        assert (failure.gateway_id, failure.event_id, failure.request_id) == (None, None, None)
        assert bytes(failure.record) == record


# --------------------------------------------------------------------------------------
# 3. An outage in the middle of a stream


@pytest.mark.slow
async def test_outage_pauses_and_probes_then_everything_is_allocated_once(
    cfg: Config, uid: str
) -> None:
    total, outage = 800, 4.0
    concurrency, retry_initial, retry_max, breaker_failures = 32, 0.1, 0.5, 20
    sns = [f"{uid}-{i:04d}" for i in range(total)]
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(
            cfg, emu, concurrency=concurrency, retry_initial=retry_initial, retry_max=retry_max,
            breaker_failures=breaker_failures,
        )  # fmt: skip
        health = Health()
        async with running(Sink(cfg), health) as task:
            await produce_children(cfg, [child(sn) for sn in sns])
            await eventually(
                lambda: len(ok_calls(emu)) >= 200,
                lambda: f"200 allocations (got {len(ok_calls(emu))})",
                timeout=60,
                task=task,
                interval=0.005,
            )
            emu.state.set_faults({"outage": True})
            began = time.monotonic()
            before = len(emu.state.calls)
            allocated_before = len(ok_calls(emu))
            await eventually(
                lambda: health.report().get("sink.dps") is False,
                lambda: "the breaker opened",
                timeout=outage,
                task=task,
            )
            ready_during, details_during = health.report(), health.details()
            await asyncio.sleep(outage - (time.monotonic() - began))  # the outage goes on
            emu.state.set_faults({"outage": False})
            during = emu.state.calls[before:]
            got = await read_topic(
                cfg.kafka, cfg.kafka.topics.allocations, expect=total, timeout=120
            )
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0)
            ready_after = health.report()
        calls = list(emu.state.calls)

    assert allocated_before < total - 300, "the outage did not hit the middle of the stream"
    # Every call during the outage failed, and there were few. They are, at most:
    # - the calls sent before DPS last answered (no evidence, breaker.py): in flight beside
    #   that last answer, so fewer than `concurrency`. A loaded machine makes many of them,
    #   arriving after the fault though sent before it (23 of 68 in one run at load 5);
    # - the run that opens it, `breaker_failures` calls of different sns;
    # - those in flight when it opened, at most `concurrency`;
    # - then one probe per backoff period (retry_initial doubling to retry_max, at least
    #   half of it). Without the breaker each of the 32 slots would call every 0.1-0.5 s.
    assert during, "no call reached DPS during the outage"
    assert {(c.http_status, c.code) for c in during} == {(503, None)}
    probes = math.ceil(math.log2(retry_max / retry_initial)) + math.ceil(outage / (retry_max / 2))
    bound = (concurrency - 1) + breaker_failures + concurrency + probes + 1
    assert len(during) <= bound, f"{len(during)} calls during a {outage} s outage"
    assert ready_during == {"sink.kafka": True, "sink.dps": False}  # /readyz says why
    assert details_during == {
        "sink.dps": "DPS: HTTP 503 without a DPS envelope: service unavailable"
    }
    assert ready_after == {"sink.kafka": True, "sink.dps": True}
    # Everything was allocated exactly once, nothing was dead-lettered.
    assert dlq == []
    assert len(got) == total
    assert {r.key for r in got} == {sn.encode() for sn in sns}
    assert len({source_of(r) for r in got}) == total  # one outcome per input record
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(sns, 1)
    # Every call was an attempt of exactly one record: the accounting adds up.
    assert sum(a.attempts for a in allocations(got)) == len(calls)
    assert len(calls) - total == sum(1 for c in calls if c.http_status == 503)


# --------------------------------------------------------------------------------------
# 5. SIGKILL mid-stream


@contextlib.asynccontextmanager
async def stderr_of(proc: asyncio.subprocess.Process) -> Any:
    """Drain a worker's stderr (so it never blocks on a full pipe); yields the lines."""
    lines: list[str] = []

    async def drain() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line.decode(errors="replace").rstrip())

    task = asyncio.create_task(drain())
    try:
        yield lines
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing_and_repeats_at_most_the_in_flight_calls(
    cfg: Config, uid: str
) -> None:
    total, concurrency, detached = 600, 32, 8
    in_flight = concurrency + detached  # slots, and calls DPS was late to answer
    sns = [f"{uid}-{i:04d}" for i in range(total)]
    env = {
        "SINK__RETRY_INITIAL": "0.2",
        "SINK__RETRY_MAX": "2",
        "SINK__DPS__TIMEOUT": "5",
        "SINK__COMMIT_INTERVAL": "5",
    }
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        emu.state.set_faults({"latency_ms": 50})
        cfg = with_emulator(cfg, emu, concurrency=concurrency, detached_limit=detached)
        first = await spawn("sink", cfg, env=env)
        async with stderr_of(first) as first_log:
            await produce_children(cfg, [child(sn) for sn in sns])
            await eventually(
                lambda: len(ok_calls(emu)) >= 200 or first.returncode is not None,
                lambda: f"200 allocations (got {len(ok_calls(emu))})",
                timeout=90,
            )
            assert first.returncode is None, "\n".join(first_log)
            await kill(first)
        killed_at = len(ok_calls(emu))
        assert killed_at < total - 150, "the kill did not hit the middle of the stream"

        second = await spawn("sink", cfg, env=env)
        async with (
            stderr_of(second) as second_log,
            Tail(cfg.kafka, cfg.kafka.topics.allocations) as tail,
        ):

            async def alive() -> None:
                assert second.returncode is None, "\n".join(second_log)

            await tail.until(
                lambda _: tail.keys() == {sn.encode() for sn in sns},
                "every sn in dps.allocations",
                timeout=120,
                alive=alive,
            )
            assert await terminate(second) == 0, "\n".join(second_log)
        got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=total)
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0)
        calls = list(emu.state.calls)

    assert not [line for line in second_log if "Traceback" in line], "\n".join(second_log)
    assert dlq == []
    assert {r.key for r in got} == {sn.encode() for sn in sns}
    per_sn = collections.Counter(c.sn for c in calls if ok(c))
    assert set(per_sn) == set(sns)
    repeated_calls = sum(per_sn.values()) - total
    assert repeated_calls <= in_flight, f"{repeated_calls} sns allocated again after the kill"
    assert all(c.http_status == 200 for c in calls)
    # An sn has more than one outcome only if DPS was really called more than once for it.
    outcomes = collections.Counter(r.key.decode() for r in got)
    assert len(got) - total <= in_flight
    assert all(per_sn[sn] >= n for sn, n in outcomes.items())
    assert all(source_of(r) for r in got)
    # The oracle: each child exactly one outcome (no router ran: outcomes only).
    await audit_holds(cfg, only="outcomes", children=total)


# --------------------------------------------------------------------------------------
# 6. Giving up


# 20: too few failures to open the breaker, each record retries on its own. 2: the
# breaker opens, the records give up while it is open, and with none left to probe with
# the sink takes in the next record to probe.
@pytest.mark.parametrize("breaker_failures", [20, 2])
async def test_gives_up_after_give_up_after_and_recovers_when_dps_returns(
    cfg: Config, uid: str, breaker_failures: int
) -> None:
    sns = [f"{uid}-{i}" for i in range(3)]
    late = f"{uid}-late"
    devices = [{"sn": sn, "group_id": GROUP} for sn in [*sns, late]]
    await prepare(cfg)
    async with await start_emulator(devices=devices) as emu:
        emu.state.set_faults({"outage": True})
        cfg = with_emulator(
            cfg, emu, retry_initial=0.2, retry_max=1.0, give_up_after=2.0,
            breaker_failures=breaker_failures,
        )  # fmt: skip
        values = {sn: child(sn) for sn in sns}
        sources = dict(zip(sns, await produce_children(cfg, list(values.values())), strict=True))
        opened = opens()
        started = time.monotonic()
        async with running(Sink(cfg), Health()):
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=3)
            elapsed = time.monotonic() - started
            token_requests = emu.state.token_requests
            # DPS is back: the sink must notice by itself and carry on with new records.
            emu.state.set_faults({"outage": False})
            await produce_children(cfg, [child(late)])
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1, timeout=30)

    assert elapsed >= 2.0
    assert opens() - opened == (1 if breaker_failures == 2 else 0)
    assert sorted(r.key for r in dlq) == sorted(sn.encode() for sn in sns)
    total_attempts = 0
    for record in dlq:
        sn = record.key.decode()
        failure = msgspec.json.decode(record.value, type=AllocationFailure)
        assert failure.error_kind == "exhausted"
        assert failure.attempts >= 2
        # The outage answers HTTP 503 with no envelope (no DPS code); even the token request fails.
        assert (failure.code, failure.http_status) == (None, 503)
        assert failure.msg == "token service answered HTTP 503: service unavailable"
        assert (failure.sn, failure.device_id, failure.request_id) == (sn, f"prod_{sn}", None)
        assert bytes(failure.record) == values[sn]
        assert source_of(record) == sources[sn]
        total_attempts += failure.attempts
    assert total_attempts == token_requests  # every attempt reached the gateway, once
    assert [r.key for r in got] == [late.encode()]
    check_allocation(cfg, got[0], late)
    assert [c.sn for c in emu.state.calls] == [late]


# --------------------------------------------------------------------------------------
# 7. One call at a time per sn


async def test_never_two_calls_at_once_for_the_same_sn(cfg: Config, uid: str) -> None:
    sn, latency = f"{uid}-same", 0.2
    values = [
        child(sn, device_id=f"prod_{sn}_{i}", event_id=f"ev-{i}") for i in range(5)
    ]  # five records, one sn
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        emu.state.set_faults({"latency_ms": latency * 1000})
        cfg = with_emulator(cfg, emu, concurrency=32)
        async with running(Sink(cfg), Health()) as task:
            sources = await produce_children(cfg, values[:3])
            # The first call is answered and the second is on the wire: more records for
            # the same sn arrive now, while the first three are still being worked through.
            await eventually(
                lambda: len(emu.state.calls) >= 2,
                lambda: f"two calls (got {len(emu.state.calls)})",
                timeout=30,
                task=task,
                interval=0.005,
            )
            sources += await produce_children(cfg, values[3:])
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=5)
        calls = list(emu.state.calls)

    assert [c.sn for c in calls] == [sn] * 5
    assert all(ok(c) for c in calls)
    arrivals = [at(c) for c in calls]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Each call is answered after `latency`; the next one may only start after that.
    assert min(gaps) >= latency - 0.005, f"overlapping calls for {sn}: gaps {gaps}"
    assert [r.key for r in got] == [sn.encode()] * 5
    assert {source_of(r) for r in got} == set(sources)
    assert sorted(str(a.event_id) for a in allocations(got)) == [f"ev-{i}" for i in range(5)]
    assert sorted(a.device_id for a in allocations(got)) == [f"prod_{sn}_{i}" for i in range(5)]


# --------------------------------------------------------------------------------------
# 8. Redrive


async def test_redrive_after_the_missing_group_is_created(cfg: Config, uid: str) -> None:
    fixed, unknown, fine = f"{uid}-nogroup", f"{uid}-unknown", f"{uid}-fine"
    devices: list[dict[str, Any]] = [
        {"sn": fixed, "group_id": None},
        {"sn": fine, "group_id": GROUP},
    ]
    await prepare(cfg)
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu)
        values = {sn: child(sn) for sn in (fixed, unknown, fine)}
        await produce_children(cfg, list(values.values()))
        async with running(Sink(cfg), Health()) as task:
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=2)
            assert sorted(r.key for r in dlq) == sorted([fixed.encode(), unknown.encode()])
            # The operator creates the group, then redrives the 35404s only.
            emu.state.register([{"sn": fixed, "group_id": GROUP}])
            assert await redrive(cfg, "allocations", codes=[35404]) == 1
            assert not task.done()
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
            assert await redrive(cfg, "allocations", codes=[35404]) == 0  # already moved
            added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=4)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=2)
        calls = list(emu.state.calls)

    assert sorted(r.key for r in got) == sorted([fixed.encode(), fine.encode()])
    for record in got:
        check_allocation(cfg, record, record.key.decode())
    assert sorted(r.key for r in dlq) == sorted([fixed.encode(), unknown.encode()])
    # The redriven record is the input, byte for byte, keyed by its device_id again.
    assert len(added) == 4
    redriven = [r for r in added if "redriven-from" in dict(r.headers or ())]
    assert [(r.key, r.value) for r in redriven] == [(f"prod_{fixed}".encode(), values[fixed])]
    # ...and its allocation names the redriven record as its source.
    [allocation] = [r for r in got if r.key == fixed.encode()]
    assert (
        source_of(allocation)
        == f"{redriven[0].topic}/{redriven[0].partition}/{redriven[0].offset}".encode()
    )
    assert [(c.sn, c.code) for c in calls if c.sn == fixed] == [(fixed, 35404), (fixed, 0)]
    assert collections.Counter(c.sn for c in calls) == {fixed: 2, unknown: 1, fine: 1}


# --------------------------------------------------------------------------------------
# 9. A bug while handling one record dead-letters it instead of blocking the partition


async def test_unexpected_error_dead_letters_the_record_and_the_rest_flows(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad, good = f"{uid}-bad", f"{uid}-good"
    real_map = Allocator._map

    def flaky_map(self: Allocator, value: bytes | None) -> Any:
        if value is not None and bad.encode() in value:
            msg = "simulated bug"
            raise RuntimeError(msg)
        return real_map(self, value)

    monkeypatch.setattr(Allocator, "_map", flaky_map)
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        # Same key: one partition, the bad record first.
        await produce(cfg, [(b"k", child(bad)), (b"k", child(good))])
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
            async with asyncio.timeout(30):
                while await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added):
                    await asyncio.sleep(0.1)
    assert [r.key for r in got] == [good.encode()]
    failure = msgspec.json.decode(dlq[0].value, type=AllocationFailure)
    assert (failure.error_kind, failure.msg) == (
        "invalid",
        "internal error: RuntimeError('simulated bug')",
    )
    assert bytes(failure.record) == child(bad)
