"""Replay fixtures: publish recorded MQTT traffic again, and record live traffic into one.

A fixture is JSON Lines, one MQTT message per line::

    {"topic": "$oc/devices/gw-1/sys/events/down", "payload": {"services": []}}
    {"topic": "$oc/devices/gw-1/sys/events/down", "payload_b64": "bm90IGpzb24=", "qos": 0}
    {"topic": "$oc/devices/gw-1/sys/events/down", "payload": null, "delay_ms": 20}

``payload`` is any JSON value and is sent as its compact encoding (``orjson.dumps``);
``payload_b64`` is sent as exactly the bytes it encodes (for payloads that are not
JSON, or to pin exact bytes). ``qos`` is 0 or 1 (default 1; IoTDA has no QoS 2) and
``delay_ms`` is the gap before the message (default 0). Blank lines and lines starting
with ``#`` are ignored, so a fixture can say why each message is there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec
import orjson
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.config import MqttConfig
from pipeline.errors import InputError
from pipeline.io import mqtt
from pipeline.tools.console import make_console

__all__ = ["FixtureMessage", "load_fixture", "record", "replay", "replay_messages"]

log = logging.getLogger(__name__)

MAX_CONCURRENT_PUBLISHES = 100
"""Publishes awaiting their PUBACK at once, at most (also bounded by ``mqtt.max_inflight``)."""

_WILDCARDS = frozenset("+#\0")


class FixtureMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a replay fixture, decoded: the exact bytes to publish and how."""

    topic: str
    payload: bytes
    qos: int = 1
    delay_ms: float = 0.0
    """Milliseconds to wait before publishing this message."""


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    """A fixture line as written; ``UNSET`` tells an absent payload from ``null``."""

    topic: str
    payload: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    payload_b64: str | msgspec.UnsetType = msgspec.UNSET
    qos: int = 1
    delay_ms: float = 0.0


_line_decoder = msgspec.json.Decoder(_Line)


def _parse_line(line: bytes) -> FixtureMessage:
    """Decode one non-blank, non-comment fixture line; ``ValueError`` says what is wrong."""
    try:
        entry = _line_decoder.decode(line)
    except msgspec.ValidationError as exc:
        msg = f"invalid fixture line: {exc}"
        raise ValueError(msg) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        msg = f"not a JSON line: {exc}"
        raise ValueError(msg) from None
    if not entry.topic:
        msg = "topic is empty"
        raise ValueError(msg)
    if _WILDCARDS.intersection(entry.topic):
        msg = f"topic {entry.topic!r} contains a wildcard or NUL; it cannot be published to"
        raise ValueError(msg)
    if entry.qos not in {0, 1}:
        msg = f"qos must be 0 or 1, got {entry.qos}"
        raise ValueError(msg)
    if entry.delay_ms < 0:
        msg = f"delay_ms must be >= 0, got {entry.delay_ms}"
        raise ValueError(msg)
    return FixtureMessage(
        topic=entry.topic, payload=_payload(entry), qos=entry.qos, delay_ms=entry.delay_ms
    )


def _payload(entry: _Line) -> bytes:
    """The bytes a line stands for: compact JSON of ``payload`` or ``payload_b64`` decoded."""
    match entry.payload, entry.payload_b64:
        case msgspec.Raw() as raw, msgspec.UnsetType():
            try:
                return orjson.dumps(orjson.loads(bytes(raw)))
            except (orjson.JSONDecodeError, orjson.JSONEncodeError) as exc:
                msg = f"payload cannot be re-encoded ({exc}); give it as payload_b64"
                raise ValueError(msg) from None
        case msgspec.UnsetType(), str() as b64:
            try:
                return base64.b64decode(b64, validate=True)
            except binascii.Error as exc:
                msg = f"payload_b64 is not valid base64: {exc}"
                raise ValueError(msg) from None
        case _:
            msg = "exactly one of payload and payload_b64 is required"
            raise ValueError(msg)


def load_fixture(path: str | Path) -> list[FixtureMessage]:
    """Read a replay fixture.

    Args:
        path: a JSON Lines fixture file.

    Returns:
        Its messages, in file order.

    Raises:
        InputError: a line is malformed; the message is ``file:line: problem``.
        OSError: the file cannot be read.
    """
    path = Path(path)
    messages: list[FixtureMessage] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = (raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw).strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            messages.append(_parse_line(line))
        except ValueError as exc:
            msg = f"{path}:{lineno}: {exc}"
            raise InputError(msg) from None
    return messages


def _fixture_line(topic: str, payload: bytes, qos: int, delay_ms: int | None) -> str:
    """Encode one received message as a fixture line that replays to the same bytes."""
    entry: dict[str, Any] = {"topic": topic}
    try:
        canonical = orjson.dumps(orjson.loads(payload)) == payload
    except orjson.JSONDecodeError:
        canonical = False
    if canonical:
        # Already the compact encoding replay would produce: embed the bytes as they are.
        entry["payload"] = orjson.Fragment(payload)
    else:
        entry["payload_b64"] = base64.b64encode(payload).decode("ascii")
    entry["qos"] = qos
    if delay_ms is not None:
        entry["delay_ms"] = delay_ms
    return orjson.dumps(entry).decode() + "\n"


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (or nothing); yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=make_console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _unique_client_id(cfg: MqttConfig, role: str) -> str:
    return f"{cfg.client_id}-{role}-{secrets.token_hex(4)}"


async def replay(
    cfg: MqttConfig,
    paths: Sequence[str | Path],
    *,
    rate: float | None = None,
    topic_prefix: str = "",
    progress: bool = True,
    honour_delays: bool = True,
) -> int:
    """Publish every message of every fixture, in order, to the MQTT broker of ``cfg``.

    Every file is read and checked before anything is sent. Messages go out in file
    order on one connection; without ``rate`` up to :data:`MAX_CONCURRENT_PUBLISHES`
    QoS 1 publishes wait for their PUBACK at once, which keeps the wire order (each
    publish is handed to the client in the order the tasks start, which is call order).

    Args:
        cfg: the MQTT section of the configuration (host, port, credentials, TLS).
        paths: fixture files, published one after the other.
        rate: at most this many messages per second; as fast as possible when ``None``.
        topic_prefix: prepended to every fixture topic (tests use their own namespace).
        progress: show a progress bar on stderr.
        honour_delays: wait each message's ``delay_ms`` before publishing it.

    Returns:
        The number of messages published (and acknowledged, for QoS 1).

    Raises:
        InputError: a fixture line is malformed, or ``rate`` is not positive.
        ServiceUnreachable: the broker could not be reached or refused the connection.
        aiomqtt.MqttError: the broker refused a publish or went away.
    """
    if rate is not None and rate <= 0:
        msg = f"rate must be > 0 messages/s, got {rate}"
        raise InputError(msg)
    messages = [message for path in paths for message in load_fixture(path)]
    log.info("replaying %d messages from %d files", len(messages), len(paths))
    return await replay_messages(
        cfg,
        messages,
        rate=rate,
        topic_prefix=topic_prefix,
        progress=progress,
        honour_delays=honour_delays,
    )


async def replay_messages(
    cfg: MqttConfig,
    messages: Sequence[FixtureMessage],
    *,
    rate: float | None = None,
    topic_prefix: str = "",
    progress: bool = True,
    honour_delays: bool = True,
) -> int:
    """Publish ``messages`` in order; see :func:`replay` (which reads them from files)."""
    interval = 1.0 / rate if rate is not None else 0.0
    limit = max(1, min(MAX_CONCURRENT_PUBLISHES, cfg.max_inflight))
    in_flight = asyncio.Semaphore(limit)
    published = 0
    client_id = _unique_client_id(cfg, "replay")
    log.debug("publishing %d messages as %s", len(messages), client_id)
    with _progress(progress, "replay", len(messages)) as advance:
        client = mqtt.connect(cfg, client_id=client_id, persistent=False)
        # Many publishes awaiting their PUBACK is the point here, not a warning sign.
        client.pending_calls_threshold = limit
        async with mqtt.connected(cfg, client):

            async def publish(message: FixtureMessage) -> None:
                nonlocal published
                try:
                    await client.publish(
                        topic_prefix + message.topic, message.payload, qos=message.qos
                    )
                finally:
                    in_flight.release()
                published += 1
                advance()

            started = last = time.monotonic()
            try:
                async with asyncio.TaskGroup() as tasks:
                    for index, message in enumerate(messages):
                        delay = message.delay_ms / 1000 if honour_delays else 0.0
                        gap = max(delay, interval if index else 0.0)
                        wait = last + gap - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        await in_flight.acquire()
                        last = time.monotonic()
                        tasks.create_task(publish(message), name=f"replay-publish-{index}")
            except ExceptionGroup as group:
                # One failed publish cancels the others; surface that failure itself.
                raise group.exceptions[0] from None
    elapsed = time.monotonic() - started
    log.info(
        "replayed %d messages in %.3f s (%.0f msg/s)",
        published,
        elapsed,
        published / elapsed if elapsed > 0 else 0.0,
    )
    return published


async def record(
    cfg: MqttConfig,
    out: Path | TextIO,
    *,
    topic: str | None = None,
    count: int | None = None,
    duration: float | None = None,
    progress: bool = True,
    ready: asyncio.Event | None = None,
) -> int:
    """Capture MQTT messages into a replay fixture, one line per message, as they arrive.

    A payload is written as a JSON value when replaying it gives back the same bytes
    (valid compact JSON), else as ``payload_b64``. Each line carries the QoS it was
    received at and, after the first, ``delay_ms``: the gap since the previous message.
    Every line is flushed at once, so a capture stopped by cancellation keeps what it saw.

    Args:
        cfg: the MQTT section of the configuration.
        out: the fixture file (created or truncated) or an open text stream.
        topic: the topic filter to subscribe to; ``cfg.topic`` by default (never as a
            shared subscription, so recording takes no messages away from ingest).
        count: stop after this many messages.
        duration: stop after this many seconds of listening.
        progress: show a progress display on stderr.
        ready: set once the subscription is in place (tests publish after it).

    Returns:
        The number of messages written.

    Raises:
        InputError: ``count`` or ``duration`` is negative.
        ServiceUnreachable: the broker could not be reached or refused the connection.
        aiomqtt.MqttError: the broker refused the subscription or went away.
    """
    if count is not None and count < 0:
        msg = f"count must be >= 0, got {count}"
        raise InputError(msg)
    if duration is not None and duration < 0:
        msg = f"duration must be >= 0, got {duration}"
        raise InputError(msg)
    if count == 0:
        return 0
    filter_ = topic or cfg.topic
    client_id = _unique_client_id(cfg, "record")
    written = 0
    with contextlib.ExitStack() as stack:
        stream = (
            stack.enter_context(out.open("w", encoding="utf-8", newline="\n"))
            if isinstance(out, Path)
            else out
        )
        advance = stack.enter_context(_progress(progress, f"record {filter_}", count))
        try:
            client = mqtt.connect(cfg, client_id=client_id, persistent=False)
            async with mqtt.connected(cfg, client):
                await client.subscribe(filter_, qos=1)
                log.info("recording %s as %s", filter_, client_id)
                if ready is not None:
                    ready.set()
                previous: float | None = None
                deadline = asyncio.timeout(duration)
                try:
                    async with deadline:
                        async for message in client.messages:
                            now = time.monotonic()
                            gap = None if previous is None else round((now - previous) * 1000)
                            line = _fixture_line(
                                message.topic.value, message.payload, message.qos, gap
                            )
                            stream.write(line)
                            stream.flush()
                            previous = now
                            written += 1
                            advance()
                            if count is not None and written >= count:
                                break
                except TimeoutError:
                    if not deadline.expired():
                        raise
        finally:
            log.info("recorded %d messages from %s", written, filter_)
    return written
