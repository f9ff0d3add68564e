"""Partial DPS failure degrades gracefully: measured against the emulator's faults.

Each test runs twice: ``quick`` (in ``make test``) checks what must hold whatever the
machine's speed (nothing lost, nothing twice, the breaker's and the limiter's decisions);
``full`` (``make test-long``) runs long enough to measure rates as well. Rates are
compared within one run on the same machine (healthy phases around a faulty one, same
sink, same concurrency), never against absolute figures; each prints its figures (run
with ``-s``), and the README quotes them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time

import msgspec
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import CallRecord, RunningEmulator, start_emulator
from pipeline.ops.server import Health
from pipeline.schemas import AllocationFailure
from pipeline.stages.sink import Sink
from tests.harness import read_topic, running, wait_check
from tests.stages.sink.support import (
    allocations,
    at,
    child,
    eventually,
    ok,
    opens,
    prepare,
    produce_children,
    with_emulator,
)

pytestmark = pytest.mark.services

SCALES = [pytest.param(False, id="quick"), pytest.param(True, id="full", marks=pytest.mark.long)]
"""``full``: long enough to measure rates."""


def ok_times(calls: list[CallRecord], sns: set[str]) -> list[float]:
    return sorted(at(c) for c in calls if c.sn in sns and ok(c))


async def until_allocated(
    emu: RunningEmulator, sns: set[str], task: asyncio.Task[None], timeout: float = 60
) -> None:
    def done() -> int:
        return len({c.sn for c in emu.state.calls if c.sn in sns and ok(c)})

    await eventually(
        lambda: done() == len(sns),
        lambda: f"{len(sns)} allocations (got {done()})",
        timeout=timeout,
        task=task,
        interval=0.05,
    )


@pytest.mark.parametrize("full", SCALES)
async def test_half_the_calls_failing_keeps_40_percent_of_the_healthy_rate(
    cfg: Config, uid: str, full: bool
) -> None:
    n, concurrency, latency_ms = 600 if full else 100, 8, 50
    phases = ["healthy-1", "faulty", "healthy-2"]
    sns = {phase: [f"{uid}-{phase}-{i:04d}" for i in range(n)] for phase in phases}
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": latency_ms})
        # The product's retry delays, but a shorter cap: it only bounds how long the
        # unluckiest record of the faulty phase waits, so the test ends sooner.
        cap = 2.0 if full else 0.4
        cfg = with_emulator(cfg, emu, concurrency=concurrency, retry_initial=0.1, retry_max=cap)
        opened = opens()
        async with running(Sink(cfg), Health()) as task:
            warm = f"{uid}-warm"  # group joined, token fetched: phases start warm
            await produce_children(cfg, [child(warm)])
            await until_allocated(emu, {warm}, task)
            for phase in phases:
                emu.state.set_faults({"error_rate": 0.5 if phase == "faulty" else 0.0})
                await produce_children(cfg, [child(sn) for sn in sns[phase]])
                await until_allocated(emu, set(sns[phase]), task)
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=3 * n + 1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0)
        calls = list(emu.state.calls)

    # Nothing lost, nothing twice, every failed call retried by its own record.
    assert dlq == []
    assert len(got) == 3 * n + 1
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(
        [warm, *(sn for phase in phases for sn in sns[phase])], 1
    )
    assert sum(a.attempts for a in allocations(got)) == len(calls)
    faulty = set(sns["faulty"])
    failed = [c for c in calls if c.sn in faulty and not ok(c)]
    assert {(c.http_status, c.code) for c in failed} == {(500, 500)}
    assert 0.2 < len(failed) / (len(failed) + n) < 0.8  # the fault was really about 50 %
    assert opens() == opened  # a failure rate of 50 % never opened the breaker
    if not full:
        return

    # Rates: how many the faulty phase allocated in the time a healthy phase took for n.
    def first_call(phase: str) -> float:
        return min(at(c) for c in calls if c.sn in set(sns[phase]))

    healthy_spans = [ok_times(calls, set(sns[p]))[-1] - first_call(p) for p in phases[::2]]
    span = sum(healthy_spans) / len(healthy_spans)
    start = first_call("faulty")
    within = sum(1 for t in ok_times(calls, faulty) if t <= start + span)
    ratio = within / n
    print(  # noqa: T201
        f"\n50 % errors at concurrency {concurrency}, {latency_ms} ms latency: healthy "
        f"{n / span:.0f}/s (phases {healthy_spans[0]:.2f} s, {healthy_spans[1]:.2f} s), "
        f"faulty {within / span:.0f}/s = {ratio:.0%} of healthy; "
        f"{len(failed)} failed calls of {len(failed) + n}"
    )
    assert ratio >= 0.4, f"{ratio:.0%} of the healthy rate with 50 % of calls failing"


@pytest.mark.parametrize("full", SCALES)
async def test_throttled_at_r_calls_per_second_the_sink_gets_at_least_0_9_r(
    cfg: Config, uid: str, full: bool
) -> None:
    rps, retry_after, total = 40.0, 1.0, 640 if full else 120
    window = (3.0, 13.0)  # s after the first call: learning done, records left to allocate
    sns = [f"{uid}-{i:04d}" for i in range(total)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"throttle_rps": rps, "retry_after": retry_after})
        cfg = with_emulator(cfg, emu, retry_initial=0.1, retry_max=2.0)
        opened = opens()
        await produce_children(cfg, [child(sn) for sn in sns])
        async with running(Sink(cfg), Health()) as task:
            await until_allocated(emu, set(sns), task, timeout=90)
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=total)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0)
        calls = list(emu.state.calls)

    assert dlq == []
    assert sorted(r.key for r in got) == sorted(sn.encode() for sn in sns)
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(sns, 1)
    throttled = [c for c in calls if c.http_status == 429]
    assert throttled, "the emulator never throttled: the test proves nothing"
    assert len(throttled) + total == len(calls)
    assert sum(a.attempts for a in allocations(got)) == len(calls)
    assert opens() == opened  # throttling is not failure
    # Retry-After is honoured by the throttled record: its next call comes no sooner.
    by_sn: dict[str | None, list[CallRecord]] = collections.defaultdict(list)
    for call in calls:
        by_sn[call.sn].append(call)
    for sn_calls in by_sn.values():
        for before, after in itertools.pairwise(sn_calls):
            assert before.http_status == 429
            assert at(after) - at(before) >= retry_after - 0.002, (before, after)
    if not full:
        return
    # The rate: allocations per second once the limiter has learned, against R.
    first = min(at(c) for c in calls)
    times = ok_times(calls, set(sns))
    assert times[-1] > first + window[1], "records ran out before the window closed"
    count = sum(1 for t in times if first + window[0] <= t < first + window[1])
    rate = count / (window[1] - window[0])
    print(  # noqa: T201
        f"\nthrottled at {rps:g}/s (Retry-After {retry_after:g} s): {rate:.1f} allocations/s "
        f"= {rate / rps:.0%} of R in [{window[0]:g} s, {window[1]:g} s); "
        f"{len(throttled)} calls throttled of {len(calls)}"
    )
    assert rate >= 0.9 * rps, f"{rate:.1f}/s under throttling at {rps}/s"


async def test_the_configured_rate_limit_is_never_exceeded(cfg: Config, uid: str) -> None:
    limit, total = 100.0, 101
    sns = [f"{uid}-{i:03d}" for i in range(total)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, rate_limit=limit)
        await produce_children(cfg, [child(sn) for sn in sns])
        async with running(Sink(cfg), Health()) as task:
            await until_allocated(emu, set(sns), task)
        calls = list(emu.state.calls)
    assert len(calls) == total
    times = sorted(at(c) for c in calls)[1:]  # the first call also waited for the token
    # Turns come 1/limit s apart; a call may reach DPS a little late, so 20 % slack. Not
    # limited, these calls take about a tenth of that.
    span = times[-1] - times[0]
    assert span >= 0.8 * (len(times) - 1) / limit, f"{len(times)} calls in {span:.2f} s"


@pytest.mark.parametrize("full", SCALES)
async def test_after_a_one_second_outage_the_full_rate_is_back_within_2_s(
    cfg: Config, uid: str, full: bool
) -> None:
    # Each failure in flight when the outage began is one failure, not a longer backoff.
    total, concurrency, latency_ms, blip = 2400 if full else 600, 8, 50, 1.0
    warm = 500 if full else 100
    sns = [f"{uid}-{i:04d}" for i in range(total)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": latency_ms})
        cfg = with_emulator(cfg, emu, concurrency=concurrency, retry_initial=0.1, retry_max=30.0)
        opened = opens()
        health = Health()
        async with running(Sink(cfg), health) as task:
            await produce_children(cfg, [child(sn) for sn in sns])
            await eventually(
                lambda: sum(1 for c in emu.state.calls if ok(c)) >= warm,
                lambda: f"{warm} allocations before the blip",
                timeout=60,
                task=task,
            )
            began = time.time()
            emu.state.set_faults({"outage": True})
            await asyncio.sleep(blip)
            emu.state.set_faults({"outage": False})
            ended = time.time()
            await until_allocated(emu, set(sns), task, timeout=90)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0)
            ready_after = health.report()
        calls = list(emu.state.calls)

    assert dlq == []
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(sns, 1)
    assert opens() == opened + 1  # the blip opened the breaker, once
    assert ready_after == {"sink.kafka": True, "sink.dps": True}
    times = ok_times(calls, set(sns))
    back = min(t for t in times if t >= ended) - ended
    assert back <= 2.0, f"first allocation {back:.2f} s after a 1 s outage ended"
    if not full:
        return
    assert times[-1] > ended + 4, "records ran out before the measurement window closed"

    def rate(start: float, end: float) -> float:
        return sum(1 for t in times if start <= t < end) / (end - start)

    before = rate(began - 2, began)
    after = rate(ended + 2, ended + 4)
    print(  # noqa: T201
        f"\n1 s outage at concurrency {concurrency}, {latency_ms} ms latency: {before:.0f}/s "
        f"before; first allocation {back:.2f} s after it ended; {after:.0f}/s from 2 s "
        f"to 4 s after ({after / before:.0%})"
    )
    assert after >= 0.7 * before, f"{after:.0f}/s after the outage, {before:.0f}/s before"


async def test_a_record_that_keeps_failing_never_pauses_the_others(cfg: Config, uid: str) -> None:
    # One record's failures are its own: the breaker (every partition paused, /readyz
    # false) is for DPS failing everyone.
    healthy = [f"{uid}-{i:03d}" for i in range(300)]
    poison = f"{uid}-poison"
    retry_initial, retry_max, give_up_after = 0.1, 0.4, 1.5
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": 20, "fail_sns": [poison], "error_status": 500})
        cfg = with_emulator(
            cfg, emu, concurrency=8, retry_initial=retry_initial, retry_max=retry_max,
            give_up_after=give_up_after,
        )  # fmt: skip
        opened = opens()
        health = Health()
        readiness: set[bool] = set()

        async def watch() -> None:
            while True:
                readiness.add(health.report().get("sink.dps", True))
                await asyncio.sleep(0.01)

        await produce_children(cfg, [child(poison), *(child(sn) for sn in healthy)])
        async with running(Sink(cfg), health) as task:
            await wait_check(health, "sink.dps", task)  # ready once subscribed
            watcher = asyncio.create_task(watch())
            await until_allocated(emu, {*healthy}, task)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
            watcher.cancel()
        calls = list(emu.state.calls)

    assert opens() == opened
    assert readiness == {True}
    assert collections.Counter(c.sn for c in calls if ok(c)) == dict.fromkeys(healthy, 1)
    poison_calls = [c for c in calls if c.sn == poison]
    assert {(c.http_status, c.code) for c in poison_calls} == {(500, 500)}
    [record] = dlq
    failure = msgspec.json.decode(record.value, type=AllocationFailure)
    assert (failure.sn, failure.error_kind, failure.code) == (poison, "exhausted", 500)
    assert failure.attempts == len(poison_calls) >= 2  # retried (how often: the machine's pace)
    # Its own backoff paced it: retry_initial doubling to retry_max (at least half, jitter).
    gaps = [at(b) - at(a) for a, b in itertools.pairwise(poison_calls)]
    floors = [min(retry_max, retry_initial * 2**k) / 2 for k in range(len(gaps))]
    assert all(gap >= floor - 0.002 for gap, floor in zip(gaps, floors, strict=True)), gaps
