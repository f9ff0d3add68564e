"""The sink's parts on their own: offset tracker, breaker, rate limiter and call slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import TopicPartition

from pipeline.errors import DpsTransient, DpsUnanswered
from pipeline.io.aio import Backoff
from pipeline.stages.sink import Breaker, OffsetTracker
from pipeline.stages.sink.limiter import RateLimiter
from pipeline.stages.sink.offsets import OutOfOrder
from pipeline.stages.sink.outcomes import parse_source, source_header
from pipeline.stages.sink.slots import CallSlots

# --------------------------------------------------------------------------------------
# Offsets


def test_offset_tracker_commits_only_contiguous_outcomes() -> None:
    t = OffsetTracker()
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    for offset in (5, 6, 7):
        t.start(p0, offset)
    t.start(p1, 0)
    t.done(p0, 7)
    assert t.take_commits() == {}  # 5 and 6 are still in flight
    t.done(p0, 5)
    assert t.take_commits() == {p0: 6}
    t.done(p0, 6)
    t.done(p1, 0)
    assert t.take_commits() == {p0: 8, p1: 1}
    assert t.take_commits() == {}
    assert t.in_flight() == 0
    t.start(p0, 8)
    t.forget([p0])
    t.done(p0, 8)  # revoked meanwhile: ignored
    assert t.take_commits() == {}


def test_offset_tracker_refuses_offsets_out_of_order() -> None:
    # A record of a batch fetched before a hand-back (105) is started after it, then 100
    # and 101 are fetched again from the committed offset. A tracker that trusted the
    # order of starts would call 106 safe to commit with 100 and 101 in flight; this one
    # refuses the offsets that come out of order, so the commit stays behind them.
    t = OffsetTracker()
    p = TopicPartition("t", 0)
    t.start(p, 105)
    for offset in (100, 101, 105):
        with pytest.raises(OutOfOrder, match=f"t/0: offset {offset} started after offset 105"):
            t.start(p, offset)
    assert t.in_flight() == 1  # the refused offsets are not tracked
    t.done(p, 105)
    assert t.take_commits() == {p: 106}
    # A new assignment of the partition starts afresh, from wherever Kafka says.
    t.forget([p])
    t.start(p, 100)
    t.start(p, 101)
    t.done(p, 101)
    assert t.take_commits() == {}
    t.done(p, 100)
    assert t.take_commits() == {p: 102}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            source_header("iotda.subdevices.added.x-1", 2, 105),
            ("iotda.subdevices.added.x-1", 2, 105),
        ),
        (b"no-slashes", None),
        (b"t/not-a-number/5", None),
        (b"\xff/1/2", None),
    ],
)
def test_parse_source_reads_what_source_header_writes(
    header: bytes, expected: tuple[str, int, int] | None
) -> None:
    assert parse_source(header) == expected


# --------------------------------------------------------------------------------------
# Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(
    changes: list[tuple[bool, str | None]],
    *,
    failures: int = 20,
    initial: float = 0.1,
    clock: Clock | None = None,
) -> Breaker:
    kwargs = {} if clock is None else {"clock": clock}
    return Breaker(
        Backoff(initial, 30.0),
        lambda failing, reason: changes.append((failing, reason)),
        failures=failures,
        **kwargs,
    )


def test_one_record_that_keeps_failing_among_healthy_ones_never_opens_the_breaker() -> None:
    # One sn that keeps failing is that record's problem, not DPS's: it retries on its own
    # backoff and must not pause the sink for every other record.
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes)
    for _ in range(1000):
        b.failed(False, "poison", "DPS code 500: Internal Server Error")
        b.succeeded(False)
    # ...nor when it is the only one left: one sn is not evidence that DPS is down.
    for _ in range(100):
        b.failed(False, "poison", "DPS code 500: Internal Server Error")
    assert changes == []
    assert not b.open


def test_calls_sent_before_dps_last_answered_do_not_open_the_breaker() -> None:
    # Calls that hung for dps.timeout end together while later calls were answered.
    clock = Clock()
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, failures=20, clock=clock)
    b.succeeded(False)  # answered at 1000
    for i in range(50):
        b.failed(False, f"sn-{i}", "timed out after 10.0 s", sent_at=990.0 + i / 100)
    assert (changes, b.open) == ([], False)
    # Sent after DPS last answered: evidence that it fails now.
    clock.now = 1001.0
    for i in range(20):
        b.failed(False, f"sn-{i}", "timed out after 10.0 s", sent_at=1000.5)
    assert changes == [(True, "timed out after 10.0 s")]


def test_breaker_opens_when_calls_for_different_sns_fail_in_a_row() -> None:
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, failures=20)
    for i in range(19):
        b.failed(False, f"sn-{i}", "DPS code 503")
    b.succeeded(False)  # one success: DPS works, the count starts again
    for i in range(19):
        b.failed(False, f"sn-{i % 3}", "DPS code 503")  # repeats count: three sns, retrying
    assert changes == []
    b.failed(False, "sn-0", "DPS: HTTP 503 without a DPS envelope")
    assert changes == [(True, "DPS: HTTP 503 without a DPS envelope")]
    assert b.open
    b.succeeded(False)  # a call that was in flight came back fine
    assert changes[-1] == (False, None)
    assert not b.open


@pytest.mark.parametrize("failures", [1, 2, 5])
def test_one_sn_alone_never_opens_the_breaker_a_second_one_does(failures: int) -> None:
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, failures=failures)
    for _ in range(failures):
        b.failed(False, "first", "down")
    assert changes == []
    b.failed(False, "second", "down")
    assert changes == [(True, "down")]


def test_a_failure_only_the_operator_can_cure_opens_the_breaker_at_once() -> None:
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes)
    reason = "DPS code 1003 (invalid encryption): check sink.dps.app_key and sink.dps.app_secret"
    b.failed(False, "sn-1", reason, operator=True)
    assert changes == [(True, reason)]


def probe_delay(b: Breaker, clock: Clock) -> float:
    """Seconds until the open breaker lets the next probe go."""
    return max(0.0, b._until - clock())


def test_concurrent_failures_do_not_lengthen_the_probe_period() -> None:
    # The calls in flight when DPS blips all fail at once; if each lengthened the probe
    # period, a 1 s blip at concurrency 32 would pause the sink for many seconds. Only the
    # opening and failed probes count.
    clock = Clock()
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, initial=0.1, clock=clock)
    for i in range(32):  # the calls in flight when DPS blipped all fail
        b.failed(False, f"sn-{i}", "down")
    assert b.open
    assert 0.05 <= probe_delay(b, clock) <= 0.1  # the first probe: after retry_initial at most


async def test_probe_schedule_doubles_only_on_failed_probes_and_a_success_closes() -> None:
    clock = Clock()
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, failures=2, initial=0.1, clock=clock)
    b.failed(False, "a", "down")
    b.failed(False, "b", "down")
    assert b.open
    ceilings = [0.2, 0.4, 0.8, 1.6]
    for ceiling in ceilings:
        clock.now += 10  # the period is over: the next caller probes at once
        probe = await asyncio.wait_for(b.acquire(), 1)
        assert probe is True
        b.failed(probe, "a", "still down")
        assert ceiling / 2 <= probe_delay(b, clock) <= ceiling
    # A 1 s blip is over after the probes due by 0.1 + 0.2 + 0.4 + 0.8 = 1.5 s at the
    # latest; the next one is due at most 1.6 s later: full rate within 2 s of the end.
    assert changes == [(True, "down"), (True, "still down")]
    clock.now += 10
    probe = await asyncio.wait_for(b.acquire(), 1)
    b.succeeded(probe)
    assert changes[-1] == (False, None)
    assert not b.open
    assert await asyncio.wait_for(b.acquire(), 1) is False


async def test_breaker_single_probe_while_open() -> None:
    changes: list[tuple[bool, str | None]] = []
    b = breaker(changes, failures=2, initial=0.05)
    assert await b.acquire() is False  # closed: everyone goes
    b.failed(False, "a", "down")
    b.failed(False, "b", "down")
    probe = await b.acquire()
    assert probe is True
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.2)
    assert not waiter.done()  # only the probe may call while open
    b.succeeded(probe)
    assert await asyncio.wait_for(waiter, 1) is False
    assert changes == [(True, "down"), (False, None)]


async def test_a_caller_cancelled_while_waiting_for_its_probe_turn_gives_it_back() -> None:
    clock = Clock()
    b = breaker([], failures=2, initial=0.1, clock=clock)
    b.failed(False, "a", "down")
    b.failed(False, "b", "down")
    clock.now -= 3600  # the probe period seems an hour away: the caller sleeps on it
    sleeper = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    sleeper.cancel()  # e.g. its record is handed back
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    clock.now += 7200
    assert await asyncio.wait_for(b.acquire(), 1) is True  # the turn was given back
    b.abandon(True)
    assert await asyncio.wait_for(b.acquire(), 1) is True  # ...and again after abandon


# --------------------------------------------------------------------------------------
# Rate limiter


async def test_throttling_sets_the_rate_to_the_observed_success_rate_then_probes_up() -> None:
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    start = clock.now
    assert await limiter.wait() == start  # unlimited: no wait
    for i in range(1, 21):  # 20 successes over 2 s: 10/s got through
        clock.now = start + i * 0.1
        limiter.succeeded()
    limiter.throttled(clock.now - 0.05)
    assert limiter.rate == 10.0
    limiter.throttled(clock.now - 0.01)  # taken before the cut: says nothing new
    assert limiter.rate == 10.0
    rates = {}
    for i in range(1, 21):  # 10 successes/s and no 429: +1/s (at least 5 %) each second
        clock.now = start + 2.0 + i * 0.1
        limiter.succeeded()
        rates[i] = limiter.rate
    assert (rates[5], rates[10], rates[15], rates[20]) == (10.0, 11.0, 11.0, 12.0)
    # A 429 for a call sent at the higher rate sets it back to what got through.
    limiter.throttled(clock.now)
    assert limiter.rate == 10.5  # 21 successes in the last 2 s


async def test_the_rate_never_exceeds_the_configured_limit() -> None:
    clock = Clock()
    limiter = RateLimiter(11.0, clock=clock)
    assert limiter.rate == 11.0
    await limiter.wait()
    for _ in range(30):
        clock.now += 0.05
        limiter.succeeded()
    limiter.throttled(clock.now)
    assert limiter.rate == 11.0  # 30 successes in 1.5 s: 20/s observed, capped at 11
    clock.now += 3
    limiter.throttled(clock.now)  # nothing got through lately: the floor
    assert limiter.rate == 1.0
    for _ in range(200):
        clock.now += 1
        limiter.succeeded()
    assert limiter.rate == 11.0


async def test_without_a_limit_the_learned_rate_is_lifted_once_it_limits_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    await limiter.wait()
    limiter.throttled(clock.now)
    assert limiter.rate == 1.0  # nothing got through yet
    rates = []
    for _ in range(8):  # two successes per second: the rate soon exceeds twice that
        clock.now += 0.5
        limiter.succeeded()
        rates.append(limiter.rate)
    assert rates == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, None]


async def test_limiter_spaces_calls_evenly() -> None:
    limiter = RateLimiter(50.0)
    started = time.monotonic()  # the limiter's clock
    turns = [await limiter.wait() for _ in range(6)]
    # Five intervals of 20 ms at least; no upper bound is asserted. The turns are an
    # absolute schedule, so a sleep that ends early does not carry over to the next turn:
    # only the last one's slack shows. asyncio's sleeps never end early; uvloop's timers
    # count whole milliseconds from the loop's cached time, and end up to about 1 ms
    # early (seen in CI: 99.0 ms for 100).
    assert time.monotonic() - started >= 5 * 0.02 - 0.002
    assert turns == sorted(turns)


# --------------------------------------------------------------------------------------
# Call slots: late calls give theirs back


async def _answers(slots: CallSlots, clock: Clock, latencies: list[float]) -> None:
    """Calls DPS answered after ``latencies`` (on ``clock``), one slot each."""

    async def answered(seconds: float) -> None:
        clock.now += seconds

    for seconds in latencies:
        async with slots:
            await slots.call(answered(seconds))


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.005)


async def test_the_soft_deadline_is_a_high_quantile_of_answered_calls() -> None:
    clock = Clock()
    slots = CallSlots(4, detached_limit=4, timeout=5.0, clock=clock)
    await _answers(slots, clock, [0.01] * 31)
    assert slots.soft_deadline == 5.0  # too few answers yet: nothing detaches
    await _answers(slots, clock, [0.01])
    assert slots.soft_deadline == 0.1  # 4 x 10 ms, raised to the floor
    # 8 % of the calls hang and answer late: the 90th percentile ignores them.
    await _answers(slots, clock, [0.05] * 470 + [4.0] * 42)
    assert slots.soft_deadline == pytest.approx(0.2)
    # Unanswered calls are no latency; refusals and errors DPS answered are.
    await _answers(slots, clock, [2.0] * 512)  # DPS slow for everyone: never detach
    assert slots.soft_deadline == 5.0

    async def failed(exc: Exception, seconds: float) -> None:
        clock.now += seconds
        raise exc

    for _ in range(512):
        async with slots:
            with pytest.raises(DpsUnanswered):
                await slots.call(failed(DpsUnanswered(None, "timed out"), 0.01))
    assert slots.soft_deadline == 5.0
    for _ in range(512):
        async with slots:
            with pytest.raises(DpsTransient):
                await slots.call(failed(DpsTransient(500, "err", http_status=500), 0.02))
    assert slots.soft_deadline == pytest.approx(0.1)


async def test_a_late_call_gives_its_slot_back_up_to_the_detached_limit() -> None:
    clock = Clock()
    slots = CallSlots(1, detached_limit=1, timeout=60.0, clock=clock)
    await _answers(slots, clock, [0.01] * 32)
    assert slots.soft_deadline == 0.1
    loop = asyncio.get_running_loop()
    hung_a, hung_b = loop.create_future(), loop.create_future()
    entered: list[str] = []

    async def attempt(name: str, call: asyncio.Future[None] | None) -> None:
        async with slots:
            entered.append(name)
            if call is not None:
                await slots.call(call)

    a = asyncio.create_task(attempt("a", hung_a))
    await _until(lambda: slots.detached == 1)  # a gave its slot back
    b = asyncio.create_task(attempt("b", hung_b))  # so b gets it
    await _until(lambda: entered == ["a", "b"])
    c = asyncio.create_task(attempt("c", None))
    # b is late too, but the one detached place is a's: b keeps its slot, c waits.
    await _until(lambda: bool(slots._late))  # b's deadline passed
    assert (entered, slots.detached) == (["a", "b"], 1)
    hung_a.set_result(None)  # a ends: b takes the detached place, c the slot
    await a
    await c
    assert (entered, slots.detached) == (["a", "b", "c"], 1)
    hung_b.set_result(None)
    await b
    assert slots.detached == 0
    async with asyncio.timeout(1):
        async with slots:  # the one slot is free again
            pass


async def test_without_detached_calls_a_slot_is_held_for_the_whole_call() -> None:
    clock = Clock()
    slots = CallSlots(1, detached_limit=0, timeout=60.0, clock=clock)
    await _answers(slots, clock, [0.01] * 64)
    assert slots.soft_deadline == 60.0
