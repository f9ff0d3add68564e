"""The one backoff, and stop-aware waits that leave no task behind."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest

from pipeline.errors import ConfigError, ServiceUnreachable
from pipeline.io import aio
from pipeline.io.aio import Backoff, KeyedLocks, Stopped, unless_stopped
from tests.conftest import EVENT_LOOP_ENV


def test_backoff_is_capped_jittered_and_honours_a_floor() -> None:
    backoff = Backoff(0.5, 30)
    assert 0.25 <= backoff.next() <= 0.5
    assert backoff.next(7.0) == 7.0  # a Retry-After above the schedule wins
    for _ in range(18):
        backoff.next()
    assert 15 <= backoff.next() <= 30  # capped
    assert backoff.attempts == 21
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_backoff_without_jitter_doubles() -> None:
    backoff = Backoff(1, 10, jitter=0)
    assert [backoff.next() for _ in range(6)] == [1, 2, 4, 8, 10, 10]


async def test_a_cancelled_wait_cancels_what_it_waited_for() -> None:
    # Left running, the probe's failure would be logged as "Task exception was never
    # retrieved" with a traceback, after the stage had already reported why it stopped.
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    started, ended = asyncio.Event(), asyncio.Event()

    async def probe() -> None:
        started.set()
        try:
            await asyncio.sleep(0.05)
            raise ServiceUnreachable("Kafka", "k:9092", "connection refused")
        finally:
            ended.set()

    stopped = loop.create_future()
    waiting = asyncio.create_task(unless_stopped(stopped, probe()))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ended.is_set()  # the probe was cancelled with the wait, not left running
    await asyncio.sleep(0.1)
    import gc  # noqa: PLC0415  (collect now: a leaked task reports its exception when freed)

    gc.collect()
    assert unretrieved == []


async def test_stop_first_cancels_the_work() -> None:
    stopped = asyncio.get_running_loop().create_future()
    stopped.set_result(None)
    never = asyncio.Event()  # work that would never end on its own
    with pytest.raises(Stopped):
        await unless_stopped(stopped, never.wait())


async def test_keyed_locks_serve_one_task_a_key_in_arrival_order_and_forget_free_keys() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    order: list[str] = []

    async def use(key: str, name: str, hold: asyncio.Event) -> None:
        await locks.acquire(key)
        try:
            order.append(name)
            await hold.wait()
        finally:
            locks.release(key)

    hold_a, hold_b, hold_c, hold_d = (asyncio.Event() for _ in range(4))
    a = asyncio.create_task(use("k", "a", hold_a))
    b = asyncio.create_task(use("k", "b", hold_b))
    c = asyncio.create_task(use("k", "c", hold_c))
    d = asyncio.create_task(use("other", "d", hold_d))  # another key does not wait
    await asyncio.sleep(0)
    assert (order, len(locks)) == (["a", "d"], 2)
    b.cancel()  # a waiter cancelled while it waits is passed over
    with pytest.raises(asyncio.CancelledError):
        await b
    hold_a.set()
    await a
    await asyncio.sleep(0)
    assert order == ["a", "d", "c"]
    hold_c.set()
    hold_d.set()
    await asyncio.gather(c, d)
    assert len(locks) == 0  # every key free again: nothing kept


async def test_a_key_handed_to_a_task_cancelled_before_it_resumes_goes_to_the_next() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    await locks.acquire("k")
    second = asyncio.create_task(locks.acquire("k"))
    third = asyncio.create_task(locks.acquire("k"))
    await asyncio.sleep(0)  # both wait
    locks.release("k")  # handed to the second...
    second.cancel()  # ...which is cancelled before it runs: the third gets it
    with pytest.raises(asyncio.CancelledError):
        await second
    async with asyncio.timeout(1):
        await third
    locks.release("k")
    assert len(locks) == 0


async def test_async_tests_run_on_the_loop_the_run_asks_for() -> None:
    """``make test-uvloop`` really runs them on uvloop (and ``make test`` on asyncio's)."""
    wanted = "uvloop" if os.environ.get(EVENT_LOOP_ENV) == "uvloop" else "asyncio"
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == wanted


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_run_on_the_configured_loop_unless_the_process_needs_asyncios(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="pipeline.io.aio"):
        assert aio.run(_loop_module(), "auto").startswith("uvloop")
        assert aio.run(_loop_module(), "uvloop").startswith("uvloop")
        assert aio.run(_loop_module(), "asyncio").startswith("asyncio")
        assert aio.run(_loop_module(), "auto", why="it runs ingest").startswith("asyncio")
        assert not caplog.records  # auto keeps asyncio's for ingest without a word
        assert aio.run(_loop_module(), "uvloop", why="it runs ingest").startswith("asyncio")
    assert [r.getMessage() for r in caplog.records] == [
        "runtime.event_loop is uvloop; this process runs on asyncio's loop: it runs ingest"
    ]


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # importing it raises ImportError
    assert aio.run(_loop_module(), "auto").startswith("asyncio")
    with pytest.raises(ConfigError) as caught:
        aio.run(_loop_module(), "uvloop")
    assert str(caught.value) == (
        "runtime.event_loop: uvloop is not installed here: install it, or set auto or asyncio"
    )
    assert caught.value.key == "runtime.event_loop"
