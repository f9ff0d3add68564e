"""Calls DPS hangs on give their call slot back; the others go on, nothing is allocated twice.

The emulator's hang fault holds chosen calls unanswered (``hang_sns``), or a share of
them (``hang_rate``), until the caller gives up or the fault is lifted; it counts the
calls in flight. Rates under hung calls are measured by ``python -m benchmarks
--degraded``, not here.
"""

from __future__ import annotations

import collections

import pytest
from prometheus_client import REGISTRY

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.ops.server import Health
from pipeline.stages.sink import Sink
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    GROUP,
    allocations,
    check_allocation,
    child,
    eventually,
    ok,
    prepare,
    produce_children,
    with_emulator,
)

pytestmark = pytest.mark.services

WARM = 40
"""Children allocated first: more answers than the soft deadline needs to apply (32)."""


def detaches() -> float:
    """Calls that gave their slot back in this process so far."""
    return REGISTRY.get_sample_value("pipeline_sink_detaches_total") or 0.0


async def test_hung_calls_give_their_slots_back_up_to_the_limit(cfg: Config, uid: str) -> None:
    """Every slot's call hangs, yet the next records are allocated; the limit holds.

    Phase 1: as many hung calls as slots; 40 children produced afterwards are allocated
    while all of them still hang (without detaching, none could be: every slot is held
    for the 60 s timeout). Phase 2: more hung calls than slots and detached places
    together: the calls in flight at DPS reach concurrency + detached_limit and never
    more (the emulator counts them). Lifting the fault answers the hung calls; each
    child is allocated by exactly one call.
    """
    concurrency = limit = 4
    warm = [f"{uid}-warm-{i:02d}" for i in range(WARM)]
    hung = [f"{uid}-hung-{i}" for i in range(concurrency)]
    after = [f"{uid}-after-{i:02d}" for i in range(40)]
    more = [f"{uid}-more-{i:02d}" for i in range(concurrency + limit + 4)]
    everyone = warm + hung + after + more
    await prepare(cfg)
    async with await start_emulator(
        devices=[{"sn": sn, "group_id": GROUP} for sn in everyone]
    ) as emu:
        cfg = with_emulator(cfg, emu, timeout=60.0, concurrency=concurrency, detached_limit=limit)
        state = emu.state
        detached = detaches()
        async with running(Sink(cfg), Health()) as task:
            await produce_children(cfg, [child(sn) for sn in warm])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=WARM)

            state.set_faults({"hang_sns": hung})
            state.reset_peak()
            await produce_children(cfg, [child(sn) for sn in hung])
            await eventually(
                lambda: state.in_flight == concurrency,
                lambda: f"{concurrency} hung calls in flight (now {state.in_flight})",
                timeout=30,
                task=task,
            )
            await produce_children(cfg, [child(sn) for sn in after])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=WARM + len(after))
            # Allocated while every hung call was still pending.
            assert state.in_flight == concurrency
            assert [c.http_status for c in state.calls if c.sn in set(hung)] == [None] * 4
            assert detaches() - detached >= concurrency  # (a slow warm call may have too)

            state.set_faults({"hang_sns": hung + more})
            await produce_children(cfg, [child(sn) for sn in more])
            await eventually(
                lambda: state.in_flight == concurrency + limit,
                lambda: f"{concurrency + limit} calls in flight (now {state.in_flight})",
                timeout=30,
                task=task,
            )
            state.set_faults({"hang_sns": []})  # lifted: every hung call is answered
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=len(everyone))
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)
        calls = list(state.calls)
        peak = state.peak_in_flight

    assert peak == concurrency + limit  # reached, never passed
    assert dlq == []
    assert collections.Counter(c.sn for c in calls) == dict.fromkeys(everyone, 1)
    assert all(ok(c) for c in calls)
    assert sorted(r.key for r in got) == sorted(sn.encode() for sn in everyone)
    for record in got:
        check_allocation(cfg, record, record.key.decode())


async def test_hung_allocates_that_took_effect_are_checked_not_repeated(
    cfg: Config, uid: str
) -> None:
    """10 % of every DPS call takes effect, then hangs until the sink gives up (3 s).

    Exact accounting from the emulator's call log, as for cut connections: one allocate
    per sn, and for each sn whose allocate was abandoned one Get DPS Device, plus one per
    get that was abandoned itself. The hung calls gave their slots back meanwhile.
    """
    count = 300
    sns = [f"{uid}-{i:03d}" for i in range(count)]
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(
            cfg, emu, timeout=3.0, concurrency=8, detached_limit=16,
            retry_initial=0.05, retry_max=0.2,
        )  # fmt: skip
        detached = detaches()
        async with running(Sink(cfg), Health()):
            await produce_children(cfg, [child(sn) for sn in sns[:WARM]])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=WARM)
            emu.state.set_faults({"hang_rate": 0.1, "hang_after_effect": True})
            await produce_children(cfg, [child(sn) for sn in sns[WARM:]])
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=count)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)
        calls = list(emu.state.calls)

    allocates = [c for c in calls if c.action == "allocate"]
    gets = [c for c in calls if c.action == "get"]
    abandoned = {c.sn for c in allocates if c.abandoned}
    assert len(abandoned) > 5  # 10 % of 260: p of 5 or fewer ~ 1e-5
    assert all(c.hung for c in calls if c.abandoned)
    assert collections.Counter(c.sn for c in allocates) == dict.fromkeys(sns, 1)
    assert all(c.http_status == 200 and c.code == 0 for c in allocates)
    abandoned_gets = collections.Counter(c.sn for c in gets if c.abandoned)
    assert collections.Counter(c.sn for c in gets) == {
        sn: 1 + abandoned_gets[sn] for sn in abandoned
    }
    assert detaches() > detached  # hung calls gave their slots back
    assert dlq == []
    assert sorted(r.key for r in got) == sorted(sn.encode() for sn in sns)
    from_get = {a.sn for a in allocations(got) if a.request_id is None}
    assert from_get == abandoned  # recorded from Get DPS Device, those alone


async def test_a_slow_but_healthy_dps_is_not_cut_short(cfg: Config, uid: str) -> None:
    """DPS turns slow for everyone (1 s a call, 25 x the soft deadline learnt before).

    The calls give their slots back at first, then the soft deadline follows the answers;
    none is cut short: every child is allocated at its first attempt, by one call, and no
    Get DPS Device was needed.
    """
    slow = [f"{uid}-slow-{i:02d}" for i in range(40)]
    warm = [f"{uid}-warm-{i:02d}" for i in range(WARM)]
    await prepare(cfg)
    async with await start_emulator(
        devices=[{"sn": sn, "group_id": GROUP} for sn in warm + slow]
    ) as emu:
        cfg = with_emulator(cfg, emu, timeout=5.0, concurrency=8, detached_limit=8)
        async with running(Sink(cfg), Health()):
            await produce_children(cfg, [child(sn) for sn in warm])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=WARM)
            emu.state.set_faults({"latency_ms": 1000})
            await produce_children(cfg, [child(sn) for sn in slow])
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2 * WARM)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)
        calls = list(emu.state.calls)
        peak = emu.state.peak_in_flight

    assert dlq == []
    assert [c.action for c in calls] == ["allocate"] * len(calls)  # no get: none unanswered
    assert collections.Counter(c.sn for c in calls) == dict.fromkeys(warm + slow, 1)
    assert all(ok(c) and not c.abandoned for c in calls)
    assert peak <= 8 + 8
    for record in got:
        check_allocation(cfg, record, record.key.decode(), attempts=1)
