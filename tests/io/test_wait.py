"""Waiting for a service at start-up: bounded, stop-aware, said at warning not too often."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ServiceUnreachable
from pipeline.io import aio, kafka, mqtt
from pipeline.io.aio import Stopped
from pipeline.tools.services import free_port


@contextlib.asynccontextmanager
async def late_proxy(port: int, target: int, after: float) -> AsyncIterator[None]:
    """From ``after`` seconds on, forward 127.0.0.1:``port`` to 127.0.0.1:``target``."""
    writers: list[asyncio.StreamWriter] = []
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        writers.extend((writer, up_writer))
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            pipes.add(asyncio.create_task(task))

    async def serve() -> None:
        await asyncio.sleep(after)
        server = await asyncio.start_server(forward, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        for writer in writers:
            writer.close()
        await asyncio.gather(task, *pipes, return_exceptions=True)
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.mark.services
async def test_waits_for_kafka_that_comes_up_late(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    kafka_port = int(cfg.kafka.bootstrap_servers.rpartition(":")[2])
    late = load_config(environ={"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.INFO, logger="pipeline.io.kafka"):
        async with late_proxy(port, kafka_port, after=1.5):
            await kafka.wait_until_reachable(late.kafka, within=20)
    assert 1.5 <= loop.time() - started < 10
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"waiting for Kafka at 127.0.0.1:{port}: connection refused"),
        ("INFO", f"Kafka at 127.0.0.1:{port} answers"),
    ]


async def test_warnings_are_spaced_and_the_wait_is_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aio, "WAIT_LOG_EVERY", 0.5)
    port = free_port()
    cfg = load_config(environ={"PIPELINE_MQTT__PORT": str(port)})
    attempts = 0

    async def probe(limit: float | None) -> None:
        nonlocal attempts
        attempts += 1
        await mqtt.probe(cfg.mqtt, limit)

    loop = asyncio.get_running_loop()
    started = loop.time()
    log = logging.getLogger("test.wait")
    with (
        caplog.at_level(logging.WARNING, logger="test.wait"),
        pytest.raises(ServiceUnreachable) as info,
    ):
        await aio.wait_for_service(
            probe, service="MQTT", address=f"127.0.0.1:{port}", within=1.6, stop=None, log=log
        )
    assert 1.6 <= loop.time() - started < 3
    assert (
        str(info.value) == f"MQTT 127.0.0.1:{port} not reachable within 1.6 s: connection refused"
    )
    assert {r.getMessage() for r in caplog.records} == {
        f"waiting for MQTT at 127.0.0.1:{port}: connection refused"
    }
    # Tried every 0.25-2 s (jittered), said at most every 0.5 s: spaced by the monotonic
    # clock, seen here on the records' wall clock (which may read a few µs less).
    times = [r.created for r in caplog.records]
    assert 2 <= len(times) < attempts
    assert all(b - a >= 0.5 - 0.005 for a, b in itertools.pairwise(times)), times


async def test_stop_ends_the_wait_at_once() -> None:
    cfg = load_config(environ={"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, stop.set)
    started = loop.time()
    with pytest.raises(Stopped):
        await kafka.wait_until_reachable(cfg.kafka, stop, within=30)
    assert loop.time() - started < 2


async def test_a_stop_asked_before_the_wait_tries_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A SIGTERM while starting: no probe, and nothing said, however fast a probe fails."""
    stop = asyncio.Event()
    stop.set()
    attempts = 0

    async def refused_at_once(_: float | None) -> None:
        nonlocal attempts
        attempts += 1
        raise ServiceUnreachable("Kafka", "127.0.0.1:1", "connection refused")

    with caplog.at_level(logging.WARNING, logger="test.wait"), pytest.raises(Stopped):
        await aio.wait_for_service(
            refused_at_once, service="Kafka", address="127.0.0.1:1", within=30, stop=stop,
            log=logging.getLogger("test.wait"),
        )  # fmt: skip
    assert attempts == 0
    assert caplog.records == []


@pytest.mark.parametrize("within", [30, 0])
async def test_a_stop_asked_while_an_attempt_fails_ends_the_wait_without_a_word(
    caplog: pytest.LogCaptureFixture, within: float
) -> None:
    """A SIGTERM landing while a probe is refused: Stopped, not a warning (nor, with no
    time left, ServiceUnreachable)."""
    stop = asyncio.Event()

    async def refused_as_stop_comes(_: float | None) -> None:
        stop.set()
        raise ServiceUnreachable("Kafka", "127.0.0.1:1", "connection refused")

    with caplog.at_level(logging.WARNING, logger="test.wait"), pytest.raises(Stopped):
        await aio.wait_for_service(
            refused_as_stop_comes, service="Kafka", address="127.0.0.1:1", within=within,
            stop=stop, log=logging.getLogger("test.wait"),
        )  # fmt: skip
    assert caplog.records == []


async def test_one_attempt_names_each_server() -> None:
    a, b = free_port(), free_port()
    cfg = load_config(environ={"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{a},127.0.0.1:{b}"})
    with pytest.raises(ServiceUnreachable) as info:
        await kafka.wait_until_reachable(cfg.kafka, within=0)
    assert str(info.value) == (
        f"Kafka 127.0.0.1:{a},127.0.0.1:{b} not reachable: "
        f"127.0.0.1:{a}: connection refused; 127.0.0.1:{b}: connection refused"
    )
