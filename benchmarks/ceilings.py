"""The ceilings: minimal loops of the same clients and settings, doing only the transport.

A stage's figure means little alone on a shared 2-core machine; next to the fastest loop
the same client library manages on the same input, in the same run, it says how much the
stage's own work costs. Each loop here is deliberately naive and short, so a reader can
check that it does the transport and nothing else:

- :func:`drain`: aiomqtt, QoS 1, **manual** PUBACK of each message as soon as it arrives
  (the same client options as ingest: :func:`pipeline.io.mqtt.connect`);
- :func:`naive`: the same drain plus one aiokafka ``send`` per message on the ingest
  producer (``acks=all``, idempotent, same linger); each message is acknowledged from its
  send's completion callback, in completion order, with no decoding and no record
  envelope (the payload is the value, the MQTT topic the key);
- :func:`in_order`: the naive loop acknowledging as MQTT requires and ingest must: each
  message's PUBACK waits until its send and every earlier message's have completed
  (a deque of received messages; the contiguous done prefix is acknowledged);
- :func:`transactional`: aiokafka read-process-write, the router's consumer and
  transactional producer, ``router.batch_max`` records per transaction; per input record
  it sends the same number of child records of the same size (slices of the input value)
  under keys as long as the children's and as distinct (each child has its own device id,
  so the partitioner hashes every key: with a few repeated keys it would not), without
  decoding anything;
- :func:`allocate`: aiohttp with ``concurrency`` requests in flight against DPS (the
  emulator) allocate, each with a fresh timestamp and signature
  (:func:`pipeline.dps.protocol.sign`) over the very bodies the sink sends, on a pool as
  large as the DPS client's; success is checked (HTTP 200 and code 0), nothing is parsed;
- :func:`http`: the loop of :func:`allocate` on the sink's own HTTP client
  (:class:`pipeline.io.http.HttpPool`, as ``DpsClient`` opens it), unjudged: the gap to
  the transport the sink uses;
- :func:`kiko` ("Kafka in, Kafka out"): the sink's transport around the same calls:
  the sink's consumer settings (its group, range assignment, ``max_records`` of
  ``sink.pending_limit``) read the same added records; per record, in one of
  ``concurrency`` slots, the signed allocate call of :func:`allocate` (the request bodies
  the sink sends, one per record, in the order the records arrive), then one outcome
  record (the DPS answer, under the record's key) sent on the sink's producer (``linger_ms
  0``) and awaited in the slot, as the sink does; the highest finished offset of each
  partition committed every ``sink.commit_interval`` and at the end (no contiguous-prefix
  bookkeeping: the commit's cost is the same);
- :func:`typed_decode`: msgspec typed decode of the same Structs as
  :func:`pipeline.core.decode.decode_down`, without its checks and error translation.

Run one alone (it prints one JSON line)::

    python -m benchmarks.ceilings [--config FILE] drain --count 3000

with the measurement's topics, client id and groups in ``PIPELINE_...`` variables,
as :mod:`benchmarks.procs` sets them. The loops resume an MQTT session that
already holds the messages (``drain``, ``naive``), or read a topic from the beginning.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import orjson
import yarl
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from benchmarks.workload import Request
from pipeline.config import Config, load_config
from pipeline.dps.protocol import DEVICE_PATH, TOKEN_PATH, sign, token_encryption
from pipeline.io import aio, kafka, mqtt
from pipeline.io.http import HttpPool
from pipeline.ops.logs import setup_logging
from pipeline.schemas import ADD_RESPONSE, PARAS, SUB_DEVICE_MANAGER, DownEvent

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import aiomqtt
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

__all__ = [
    "allocate",
    "drain",
    "http",
    "in_order",
    "kiko",
    "main",
    "naive",
    "transactional",
    "typed_decode",
]

POOL_SIZE = 100
"""Connections the DPS client keeps (``DpsClient(pool_size=100)``); the ceiling uses as many."""

_ENVELOPE = msgspec.json.Decoder(DownEvent)
_ADD = msgspec.json.Decoder(PARAS[SUB_DEVICE_MANAGER, ADD_RESPONSE])
_REQUESTS = msgspec.json.Decoder(list[Request])


class _Clock:
    """Wall and CPU time from the first completion to the end of the loop."""

    def __init__(self) -> None:
        self.first = 0.0
        self._cpu = 0.0

    def start(self) -> None:
        if not self.first:
            self.first, self._cpu = time.time(), time.process_time()

    def result(self, count: int) -> dict[str, Any]:
        last = time.time()
        cpu = (time.process_time() - self._cpu) / max(last - self.first, 1e-3)
        return {"count": count, "first": self.first, "last": last, "cpu": cpu}


def typed_decode(payload: bytes) -> DownEvent:
    """Decode a down event and every add_sub_device_response in it: msgspec alone."""
    event = _ENVELOPE.decode(payload)
    for service in event.services or ():
        if service.service_id == SUB_DEVICE_MANAGER and service.event_type == ADD_RESPONSE:
            _ADD.decode(service.paras)
    return event


async def drain(cfg: Config, count: int) -> dict[str, Any]:
    """Receive ``count`` QoS 1 messages, acknowledging each on arrival."""
    client = mqtt.connect(cfg.mqtt)
    mqtt.manual_ack(client)
    received = 0
    clock = _Clock()
    async with client:
        await mqtt.subscribe(client, cfg.mqtt, mqtt.subscription_topic(cfg.mqtt))
        async for message in client.messages:
            mqtt.ack(client, message)
            received += 1
            if received == 1:
                clock.start()
            if received == count:
                break
    return clock.result(received)


async def naive(cfg: Config, count: int) -> dict[str, Any]:
    """Receive ``count`` messages; one Kafka send each; acknowledge when Kafka has it."""
    topic = cfg.kafka.topics.down_events
    client = mqtt.connect(cfg.mqtt)
    mqtt.manual_ack(client)
    received = 0
    clock = _Clock()
    async with kafka.producer(cfg.kafka) as producer, client:
        await mqtt.subscribe(client, cfg.mqtt, mqtt.subscription_topic(cfg.mqtt))
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)  # noqa: S101  (received messages are bytes)
            future = await producer.send(topic, payload, key=message.topic.value.encode())
            future.add_done_callback(functools.partial(_ack, client, message))
            received += 1
            if received == 1:
                clock.start()
            if received == count:
                break
        await producer.flush()
        await asyncio.sleep(0)  # let the last completion callbacks run
    return clock.result(received)


async def in_order(cfg: Config, count: int) -> dict[str, Any]:
    """As :func:`naive`, but each PUBACK in receive order once it and all before it are safe."""
    topic = cfg.kafka.topics.down_events
    client = mqtt.connect(cfg.mqtt)
    mqtt.manual_ack(client)
    window: collections.deque[list[Any]] = collections.deque()  # [message, done]

    def done(entry: list[Any], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        entry[1] = True
        while window and window[0][1]:
            mqtt.ack(client, window.popleft()[0])

    received = 0
    clock = _Clock()
    async with kafka.producer(cfg.kafka) as producer, client:
        await mqtt.subscribe(client, cfg.mqtt, mqtt.subscription_topic(cfg.mqtt))
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)  # noqa: S101  (received messages are bytes)
            entry = [message, False]
            window.append(entry)
            future = await producer.send(topic, payload, key=message.topic.value.encode())
            future.add_done_callback(functools.partial(done, entry))
            received += 1
            if received == 1:
                clock.start()
            if received == count:
                break
        await producer.flush()
        await asyncio.sleep(0)  # let the last completion callbacks run
    return clock.result(received)


def _ack(client: aiomqtt.Client, message: aiomqtt.Message, future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        mqtt.ack(client, message)


async def transactional(
    cfg: Config, count: int, children: int, child_bytes: int, key_bytes: int
) -> dict[str, Any]:
    """Consume ``count`` records; per record ``children`` sends, in Kafka transactions."""
    group = cfg.router.group_id
    out = cfg.kafka.topics.added
    consumer = kafka.consumer(cfg.kafka, group_id=group)
    kafka.shorten_transaction_backoff()  # as the router does
    producer = kafka.transactional_producer(cfg.kafka, cfg.router.transactional_id)  # the router's
    consumed = 0
    clock = _Clock()
    async with consumer, producer:
        consumer.subscribe([cfg.kafka.topics.down_events])
        while consumed < count:
            batch = await consumer.getmany(timeout_ms=1000, max_records=cfg.router.batch_max)
            if not batch:
                continue
            clock.start()
            await _transaction(
                producer, batch, out, group,
                children=children, child_bytes=child_bytes, key_bytes=key_bytes,
            )  # fmt: skip
            consumed += sum(len(records) for records in batch.values())
    return clock.result(consumed * children)


async def _transaction(
    producer: AIOKafkaProducer,
    batch: dict[Any, list[Any]],
    out: str,
    group: str,
    *,
    children: int,
    child_bytes: int,
    key_bytes: int,
) -> None:
    async with producer.transaction():
        sends = []
        for tp, records in batch.items():
            for record in records:
                for i in range(children):
                    key = (b"%d-%d-%d-" % (tp.partition, record.offset, i)).ljust(key_bytes, b"k")
                    sends.append(await producer.send(out, record.value[:child_bytes], key=key))
        await asyncio.gather(*sends)
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        await producer.send_offsets_to_transaction(offsets, group)


async def allocate(cfg: Config, requests: list[Request], concurrency: int) -> dict[str, Any]:
    """Every request once, ``concurrency`` at a time; returns when all have answered."""
    dps = cfg.sink.dps
    secret = dps.app_secret.reveal()
    base = yarl.URL(dps.base_url)
    failed: list[str] = []
    connector = aiohttp.TCPConnector(limit=POOL_SIZE)
    async with aiohttp.ClientSession(connector=connector) as session:
        token = await _token(session, base, dps.app_key, secret)

        async def call(request: Request) -> None:
            await _call(session, base, token, secret, request, failed=failed)

        return await _all_answered(requests, concurrency, call, failed, name="allocate")


async def _call(
    session: aiohttp.ClientSession,
    base: yarl.URL,
    token: str,
    secret: str,
    request: Request,
    *,
    failed: list[str],
) -> bytes:
    """One signed allocate call; its answer (a failure is noted in ``failed``)."""
    url, headers, body = _signed(base, token, secret, request)
    async with session.post(url, data=body, headers=headers) as response:
        answer = await response.read()
    if response.status != 200 or b'"code":0,' not in answer:  # noqa: PLR2004
        failed.append(f"HTTP {response.status}: {answer[:200]!r}")
    return answer


def _signed(
    base: yarl.URL, token: str, secret: str, request: Request
) -> tuple[yarl.URL, dict[str, str], bytes]:
    """An allocate call's URL, headers (signed now) and body, as the sink sends them."""
    params = {"action": "allocate", "orgId": request.org_id}
    body = request.body.encode()
    stamp = time.time_ns() // 1_000_000
    headers = {
        "apim-accesstoken": token,
        "apim-timestamp": str(stamp),
        "apim-signature": sign(token, params, body, stamp, secret),
        "Content-Type": "application/json",
    }
    return (base / DEVICE_PATH).with_query(params), headers, body


async def _all_answered(
    requests: list[Request],
    concurrency: int,
    call: Callable[[Request], Awaitable[None]],
    failed: list[str],
    *,
    name: str,
) -> dict[str, Any]:
    """``call`` every request once, ``concurrency`` at a time; raise if any ``failed``."""
    pending = iter(requests)
    done = 0
    clock = _Clock()

    async def worker() -> None:
        nonlocal done
        for request in pending:
            await call(request)
            done += 1
            clock.start()

    async with asyncio.TaskGroup() as tg:
        for i in range(concurrency):
            tg.create_task(worker(), name=f"ceiling.{name}-{i}")
    if failed:
        msg = f"{len(failed)} of {done} allocations failed, e.g. {failed[0]}"
        raise RuntimeError(msg)
    return clock.result(done)


async def http(cfg: Config, requests: list[Request], concurrency: int) -> dict[str, Any]:
    """As :func:`allocate`, on the DPS client's HTTP pool instead of aiohttp."""
    dps = cfg.sink.dps
    secret = dps.app_secret.reveal()
    base = yarl.URL(dps.base_url)
    failed: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        HttpPool(dps.base_url, size=POOL_SIZE, timeout=dps.timeout) as pool,
    ):
        token = await _token(session, base, dps.app_key, secret)

        async def call(request: Request) -> None:
            url, headers, body = _signed(base, token, secret, request)
            answer = await pool.request("POST", url.raw_path_qs, headers, body)
            if answer.status != 200 or b'"code":0,' not in answer.body:  # noqa: PLR2004
                failed.append(f"HTTP {answer.status}: {answer.body[:200]!r}")

        return await _all_answered(requests, concurrency, call, failed, name="http")


async def _commit(consumer: AIOKafkaConsumer, finished: dict[TopicPartition, int]) -> None:
    if finished:
        await consumer.commit({tp: offset + 1 for tp, offset in finished.items()})


async def _committer(
    consumer: AIOKafkaConsumer, finished: dict[TopicPartition, int], interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        await _commit(consumer, finished)


async def kiko(cfg: Config, requests: list[Request], concurrency: int) -> dict[str, Any]:
    """Consume one added record per request; call, record the outcome, commit; see above."""
    dps, sink = cfg.sink.dps, cfg.sink
    secret = dps.app_secret.reveal()
    base = yarl.URL(dps.base_url)
    bodies = iter(requests)
    slots = asyncio.Semaphore(concurrency)
    finished: dict[TopicPartition, int] = {}
    done = 0
    failed: list[str] = []
    clock = _Clock()
    consumer = kafka.consumer(
        cfg.kafka,
        group_id=sink.group_id,
        partition_assignment_strategy=(RangePartitionAssignor,),
    )
    producer = kafka.producer(cfg.kafka, linger_ms=0)  # as the sink's
    connector = aiohttp.TCPConnector(limit=POOL_SIZE)
    async with (
        consumer,
        producer,
        aiohttp.ClientSession(connector=connector) as session,
        asyncio.TaskGroup() as tg,
    ):
        token = await _token(session, base, dps.app_key, secret)

        async def call(tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
            nonlocal done
            try:
                answer = await _call(session, base, token, secret, next(bodies), failed=failed)
                await (await producer.send(cfg.kafka.topics.allocations, answer, key=record.key))
                finished[tp] = max(finished.get(tp, -1), record.offset)
                done += 1
                clock.start()
            finally:
                slots.release()

        commits = tg.create_task(
            _committer(consumer, finished, sink.commit_interval), name="ceiling.kiko-commit"
        )
        consumer.subscribe([cfg.kafka.topics.added])
        started = 0
        while started < len(requests):
            batch = await consumer.getmany(timeout_ms=500, max_records=sink.pending_limit)
            for tp, records in batch.items():
                for record in records[: len(requests) - started]:
                    await slots.acquire()
                    tg.create_task(call(tp, record), name=f"ceiling.kiko-{started}")
                    started += 1
        for _ in range(concurrency):  # every call has finished once all slots are free
            await slots.acquire()
        commits.cancel()
        await _commit(consumer, finished)
    if failed:
        msg = f"{len(failed)} of {done} allocations failed, e.g. {failed[0]}"
        raise RuntimeError(msg)
    return clock.result(done)


async def _token(session: aiohttp.ClientSession, base: yarl.URL, key: str, secret: str) -> str:
    stamp = time.time_ns() // 1_000_000
    body = {"appKey": key, "encryption": token_encryption(key, stamp, secret), "timestamp": stamp}
    async with session.post(base / TOKEN_PATH, json=body) as response:
        answer = orjson.loads(await response.read())
    token: str = answer["data"]["accessToken"]
    return token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ceilings",
        description="One ceiling loop of the bench (`python -m benchmarks`); prints one JSON line.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration")
    sub = parser.add_subparsers(dest="loop", required=True)
    for name, text in (
        ("drain", "aiomqtt drain, manual PUBACK on arrival"),
        ("naive", "aiomqtt drain + one aiokafka send per message, PUBACK after Kafka"),
        ("in-order", "as naive, PUBACKs in receive order (as MQTT requires)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--count", type=int, required=True, help="messages to receive")
    p = sub.add_parser("transactional", help="aiokafka transactional consume -> produce")
    p.add_argument("--count", type=int, required=True, help="input records to consume")
    p.add_argument("--children", type=int, required=True, help="records produced per input")
    p.add_argument("--child-bytes", type=int, required=True, help="size of each produced value")
    p.add_argument("--key-bytes", type=int, required=True, help="size of each produced key")
    for name, text in (
        ("allocate", "aiohttp, N allocate calls in flight"),
        ("http", "the same on the DPS client's HTTP pool"),
        ("kiko", "Kafka in, the allocate calls, one outcome record each out, commits"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--requests", required=True, help="JSON list of {org_id, body}")
        p.add_argument("--concurrency", type=int, default=32)
    return parser


async def _run(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    match args.loop:
        case "drain":
            return await drain(cfg, args.count)
        case "naive":
            return await naive(cfg, args.count)
        case "in-order":
            return await in_order(cfg, args.count)
        case "transactional":
            return await transactional(
                cfg, args.count, args.children, args.child_bytes, args.key_bytes
            )
        case _:  # the sink's: kiko, allocate, http
            loop = {"kiko": kiko, "http": http}.get(args.loop, allocate)
            requests = _REQUESTS.decode(await asyncio.to_thread(Path(args.requests).read_bytes))
            return await loop(cfg, requests, args.concurrency)


def main(argv: list[str] | None = None) -> int:
    """Run one ceiling loop; print its result as one JSON line on stdout."""
    args = _parser().parse_args(argv)
    setup_logging("warning")
    cfg = load_config(args.config)
    # On the event loop of the stage it is the ceiling of: ingest's keep asyncio's.
    why = "an ingest ceiling" if args.loop in {"drain", "naive", "in-order"} else ""
    result = aio.run(_run(args, cfg), cfg.runtime.event_loop, why=why)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
