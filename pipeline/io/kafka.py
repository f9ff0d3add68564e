"""Kafka connections, wrapped once: producers, consumers, topic administration and reads.

aiokafka is only partly annotated; this module is the typed boundary the stages use.
Every "read the records of a topic between two offsets" goes through :func:`read_range`,
and every "is Kafka there?" through :func:`probe` / :func:`wait_until_reachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from pipeline.errors import ServiceUnreachable, StageFailed
from pipeline.io.aio import wait_for_service, why_unreachable
from pipeline.io.tls import client_context

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping

    from aiokafka import ConsumerRecord

    from pipeline.config import KafkaConfig

__all__ = [
    "Ranges",
    "Rebalance",
    "admin",
    "backlog",
    "consumer",
    "ensure_topics",
    "partitions",
    "probe",
    "producer",
    "read_range",
    "reader",
    "size",
    "wait_until_reachable",
    "whole",
]

log = logging.getLogger(__name__)

Ranges = dict[TopicPartition, tuple[int, int]]
"""Per partition, the offsets ``[start, end)`` to read."""


def _common(cfg: KafkaConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": int(cfg.request_timeout * 1000),
    }
    if cfg.tls.enabled and cfg.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        # [kafka.tls] enabled = true upgrades the plain protocol to its TLS form.
        opts["security_protocol"] = cfg.security_protocol.replace("PLAINTEXT", "SSL")
    if opts["security_protocol"] in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = client_context(cfg.tls)
    if cfg.sasl_mechanism:
        opts["sasl_mechanism"] = cfg.sasl_mechanism
        opts["sasl_plain_username"] = cfg.sasl_username
        opts["sasl_plain_password"] = cfg.sasl_password.reveal() if cfg.sasl_password else None
    return opts


async def probe(cfg: KafkaConfig, limit: float | None = None) -> None:
    """One attempt to reach Kafka the way the clients will, without their retry loops.

    Each bootstrap server in turn: connect (TLS and SASL as configured), ApiVersions, and
    a metadata request that must list at least one broker (a broker still starting lists
    none). aiokafka's own bootstrap failure says only "Unable to bootstrap" and logs the
    cause; here the cause is in the error.

    Args:
        cfg: the Kafka section.
        limit: seconds for each server, at most (``kafka.request_timeout`` otherwise).

    Raises:
        ServiceUnreachable: no server answered; the reason says why, per server.
    """
    timeout = min(cfg.request_timeout, limit) if limit else cfg.request_timeout
    opts = _common(cfg)
    reasons: list[tuple[str, str]] = []
    for host, port, _ in collect_hosts(cfg.bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(timeout):
                conn = await create_conn(
                    host,
                    port,
                    client_id=cfg.client_id,
                    request_timeout_ms=int(timeout * 1000),
                    ssl_context=opts.get("ssl_context"),
                    security_protocol=opts["security_protocol"],
                    sasl_mechanism=opts.get("sasl_mechanism"),
                    sasl_plain_username=opts.get("sasl_plain_username"),
                    sasl_plain_password=opts.get("sasl_plain_password"),
                )
            try:
                async with asyncio.timeout(timeout):
                    metadata = await conn.send(MetadataRequest([]))
            finally:
                conn.close()
                await asyncio.sleep(0)  # let the transport close its socket now
        except (OSError, TimeoutError, KafkaError) as exc:
            reasons.append((f"{host}:{port}", _reason(exc, timeout)))
            continue
        if metadata.brokers:
            return
        reasons.append((f"{host}:{port}", "the broker is starting (it lists no broker yet)"))
    if len(reasons) == 1:
        reason = reasons[0][1]
    else:
        reason = "; ".join(f"{address}: {why}" for address, why in reasons)
    raise ServiceUnreachable("Kafka", cfg.bootstrap_servers, reason)


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, KafkaError):
        text = str(exc.args[0]) if exc.args else ""
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return why_unreachable(exc, timeout)


async def wait_until_reachable(
    cfg: KafkaConfig, stop: asyncio.Event | None = None, *, within: float | None = None
) -> None:
    """Return once Kafka answers (:func:`probe`), waiting up to ``kafka.startup_timeout``.

    Every stage calls this before it starts its clients, so a worker started together
    with Kafka waits for it instead of dying. While waiting it says so at warning, in the
    pipeline's own words (``waiting for Kafka at 127.0.0.1:9092: connection refused``),
    at most every few seconds.

    Args:
        cfg: the Kafka section.
        stop: set (SIGTERM) to give up waiting at once.
        within: seconds to wait instead of ``cfg.startup_timeout``; 0 tries once.

    Raises:
        ServiceUnreachable: Kafka did not answer in time; one line naming the address.
        Stopped: ``stop`` was set first.
    """
    await wait_for_service(
        lambda limit: probe(cfg, limit),
        service="Kafka",
        address=cfg.bootstrap_servers,
        within=cfg.startup_timeout if within is None else within,
        stop=stop,
        log=log,
    )


def producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (``acks=all``)."""
    opts = _common(cfg) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": cfg.linger_ms,
        "compression_type": None,
    }
    return AIOKafkaProducer(**(opts | overrides))


def consumer(
    cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that commits explicitly and reads only committed transactional data."""
    opts = _common(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    return AIOKafkaConsumer(*topics, **(opts | overrides))


def admin(cfg: KafkaConfig) -> AIOKafkaAdminClient:
    """An admin client (topics, offsets, consumer groups)."""
    return AIOKafkaAdminClient(**_common(cfg))


async def ensure_topics(
    cfg: KafkaConfig, names: Iterable[str], *, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    client = admin(cfg)
    await client.start()
    try:
        existing = set(await client.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        response = await client.create_topics(
            [NewTopic(n, partitions or cfg.partitions, cfg.replication_factor) for n in missing]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                error = for_code(code)
                msg = f"creating topic {name} failed: {error.message} {rest[0] if rest else ''}"
                raise error(msg)
        # Metadata propagates asynchronously; wait until every new topic is visible.
        async with asyncio.timeout(30):
            while not set(missing) <= set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        log.info("created topics %s", missing)
        return missing
    finally:
        await client.close()


async def partitions(client: AIOKafkaConsumer, *topics: str) -> list[TopicPartition]:
    """Every partition of ``topics``, from fresh cluster metadata (for manual assignment)."""
    # The public `topics()` fetches the same metadata but returns only the names, and
    # `partitions_for_topic()` reads a cache that manual assignment never fills.
    cluster = await client._client.fetch_all_metadata()  # noqa: SLF001
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(cluster.partitions_for_topic(topic) or ())
    ]


def reader(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer outside any group, for :func:`read_range` (read committed)."""
    return consumer(cfg, group_id=None, **overrides)


async def read_range(
    client: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
) -> AsyncGenerator[ConsumerRecord[bytes, bytes]]:
    """Every record with ``start <= offset < end``, partition by partition in offset order.

    ``client`` is assigned exactly the partitions with something to read. A partition
    is done when the consumer's position reaches ``end``: a read-committed consumer never
    sees transaction markers or aborted records, so the record at ``end - 1`` may not
    exist. Use :func:`contextlib.aclosing` to stop early, and ``asyncio.timeout`` around
    the loop to bound it.
    """
    live = {tp: end for tp, (start, end) in ranges.items() if start < end}
    if not live:
        return
    client.assign(list(live))
    for tp, (start, _) in ranges.items():
        if tp in live:
            client.seek(tp, start)
    while live:
        batch = await client.getmany(*live, timeout_ms=500)
        for tp, records in batch.items():
            for record in records:
                if record.offset < live.get(tp, -1):
                    yield record
        live = {tp: end for tp, end in live.items() if await client.position(tp) < end}


async def backlog(cfg: KafkaConfig, group: str, topic: str) -> int:
    """Records of ``topic`` that consumer group ``group`` has not committed yet.

    ``end - committed`` overcounts on transactional topics: every commit marker takes an
    offset. Where that difference is non-zero, look: if no committed record follows the
    group's offset, the group is idle on that partition.
    """
    client = admin(cfg)
    await client.start()
    total = 0
    try:
        async with reader(cfg) as peek:
            tps = await partitions(peek, topic)
            ends = await peek.end_offsets(tps)
            begins = await peek.beginning_offsets(tps)
            done = await client.list_consumer_group_offsets(group)
            for tp in tps:
                start = done[tp].offset if tp in done else begins[tp]
                if await _any_record(peek, tp, start, ends[tp]):
                    total += ends[tp] - start
    finally:
        await client.close()
    return total


async def _any_record(client: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> bool:
    async with contextlib.aclosing(read_range(client, {tp: (start, end)})) as records:
        async for _ in records:
            return True
    return False


async def size(cfg: KafkaConfig, *topics: str) -> int:
    """Offsets held by ``topics`` (records, plus a marker per transaction if transactional)."""
    async with reader(cfg) as peek:
        tps = await partitions(peek, *topics)
        if not tps:
            return 0
        ends = await peek.end_offsets(tps)
        begins = await peek.beginning_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)


async def whole(client: AIOKafkaConsumer, *topics: str) -> Ranges:
    """The ranges holding every record of ``topics`` now: beginning to end."""
    tps = await partitions(client, *topics)
    if not tps:
        return {}
    begins = await client.beginning_offsets(tps)
    ends = await client.end_offsets(tps)
    return {tp: (begins[tp], ends[tp]) for tp in tps}


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """A stage's rebalance callbacks, guarded.

    aiokafka only logs an exception raised in a rebalance listener and carries on, so a
    failed de-duplication rebuild or outcome read-back would silently weaken the
    guarantees. Here a failure is kept, :attr:`failed` is set, and the stage ends with
    :meth:`raise_if_failed` (exit non-zero: the orchestrator restarts it).

    Args:
        stage: the stage's name, for the error.
        revoked: called with the partitions being taken away (before they go).
        assigned: called with the partitions just given (before records are handed out).
    """

    def __init__(
        self,
        stage: str,
        *,
        revoked: Callable[[list[TopicPartition]], Awaitable[None]],
        assigned: Callable[[list[TopicPartition]], Awaitable[None]],
    ) -> None:
        self._stage = stage
        self._revoked = revoked
        self._assigned = assigned
        self.failed = asyncio.Event()
        self.error: Exception | None = None

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Run ``revoked`` (the hook aiokafka calls), guarded."""
        await self._guard("revoked", self._revoked, list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Run ``assigned`` (the hook aiokafka calls), guarded."""
        await self._guard("assigned", self._assigned, list(assigned))

    async def _guard(
        self,
        what: str,
        callback: Callable[[list[TopicPartition]], Awaitable[None]],
        tps: list[TopicPartition],
    ) -> None:
        try:
            await callback(tps)
        except Exception as exc:
            log.error(  # noqa: TRY400  (one line: the traceback goes with StageFailed)
                "%s: handling %s partitions %s failed (%s); stopping",
                self._stage, what, sorted(f"{tp.topic}/{tp.partition}" for tp in tps), exc,
            )  # fmt: skip
            if self.error is None:
                self.error = exc
            self.failed.set()

    def raise_if_failed(self) -> None:
        """Raise :class:`~pipeline.errors.StageFailed` if a callback failed.

        Raises:
            StageFailed: naming the stage and the callback's error.
        """
        if self.error is not None:
            msg = f"{self._stage} stopped: a rebalance callback failed: {self.error}"
            raise StageFailed(msg) from self.error
