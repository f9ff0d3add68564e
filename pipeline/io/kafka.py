"""Kafka connections, wrapped once: producers, consumers, topic administration and reads.

aiokafka is only partly annotated; this module is the typed boundary the stages use.
Every "read the records of a topic between two offsets" goes through :func:`read_range`,
and every "is Kafka there?" through :func:`probe` / :func:`wait_until_reachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.cluster import ClusterMetadata
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer import sender as _sender
from aiokafka.protocol.admin import DeleteGroupsRequest
from aiokafka.protocol.metadata import MetadataRequest
from murmurhash2 import murmurhash2

from pipeline.errors import ConfigError, ServiceUnreachable, StageFailed
from pipeline.io.aio import Backoff, wait_for_service, why_unreachable
from pipeline.io.tls import client_context

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping

    from aiokafka import ConsumerRecord

    from pipeline.config import KafkaConfig

__all__ = [
    "Liveness",
    "Ranges",
    "Rebalance",
    "admin",
    "backlog",
    "consumer",
    "delete_groups",
    "delete_topics",
    "ensure_topics",
    "partitions",
    "prepare_topics",
    "probe",
    "producer",
    "read_range",
    "reader",
    "record_limit",
    "size",
    "wait_until_reachable",
    "watch_lag",
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


_MURMUR2_SEED = 0x9747B28C


class _KeyPartitioner:
    """Java's default partitioner for keyed records: ``murmur2(key) % partitions``.

    The same partitions as any Kafka client (and as aiokafka's ``DefaultPartitioner``,
    which a test compares it with), with murmur2 from the ``murmurhash2`` package (Rust)
    instead of aiokafka's pure Python: 0.25 µs a key instead of 4.6, for every child the
    router writes. Records without a key go to any available partition, as aiokafka's do.
    """

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(_DEFAULT(key, all_partitions, available))
        return all_partitions[(murmurhash2(key, _MURMUR2_SEED) & 0x7FFFFFFF) % len(all_partitions)]


_DEFAULT = DefaultPartitioner()


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
        ConfigError: a server refused our TLS or SASL settings (a wrong password or
            mechanism, a certificate that does not verify against ``kafka.tls.ca_file``,
            TLS against a plaintext listener): one line saying what to check.
    """
    timeout = min(cfg.request_timeout, limit) if limit else cfg.request_timeout
    try:
        opts = _common(cfg)
    except (OSError, ssl.SSLError) as exc:  # the CA, certificate or key file
        msg = f"kafka.tls: cannot load the TLS files: {exc}"
        raise ConfigError(msg) from exc
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
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError, ssl.SSLError) as exc:
            # Waiting will not fix a wrong password, mechanism or CA: say so and stop.
            msg = f"Kafka at {host}:{port}: {_refusal(exc, cfg)}"
            raise ConfigError(msg) from exc
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


TXN_RESTART_BACKOFF = 0.002
"""Seconds before a transaction that the coordinator is still closing asks again.

Right after a commit the coordinator is still writing the transaction's markers, and the
next transaction's first AddPartitionsToTxn is answered CONCURRENT_TRANSACTIONS
(KAFKA-5477). aiokafka then waits a fixed 20 ms (``BACKOFF_OVERRIDE``, as the Java client
does) though the markers take about 1 ms here: every transaction after the first of a
producer cost 20 ms more. Asking again after 2 ms costs a request or two to the
coordinator instead (measured: 25 ms -> 3.5 ms per back-to-back transaction; README,
Measured). aiokafka has no setting for it: ``tests/io/test_kafka.py`` fails if the
constant moves.
"""
_sender.BACKOFF_OVERRIDE = TXN_RESTART_BACKOFF


class _Producer(AIOKafkaProducer):  # type: ignore[misc]
    """aiokafka's producer, closed when ``async with`` fails to start it.

    aiokafka's own ``__aenter__`` leaves it open: when the broker is not there yet, the
    garbage collector later logs "Unclosed AIOKafkaProducer" at error, a false alarm.
    """

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self


class _Consumer(AIOKafkaConsumer):  # type: ignore[misc]
    """aiokafka's consumer, closed when ``async with`` fails to start it (see _Producer)."""

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self


def producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (``acks=all``)."""
    opts = _common(cfg) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": cfg.linger_ms,
        "compression_type": None,
        "max_request_size": cfg.max_record_size,
        "partitioner": _KeyPartitioner(),
    }
    return _Producer(**(opts | overrides))


def consumer(
    cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that commits explicitly and reads only committed transactional data."""
    opts = _common(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": cfg.max_record_size,
    }
    return _Consumer(*topics, **(opts | overrides))


def admin(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (topics, offsets, consumer groups)."""
    return AIOKafkaAdminClient(**(_common(cfg) | overrides))


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
        # Records up to max_record_size (a 1 MiB event plus its envelope); the broker's
        # default (about 1 MB) would refuse the biggest events IoTDA can send.
        configs = {"max.message.bytes": str(cfg.max_record_size)}
        if cfg.min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(cfg.min_insync_replicas)
        response = await client.create_topics(
            [
                NewTopic(
                    n, partitions or cfg.partitions, cfg.replication_factor, topic_configs=configs
                )
                for n in missing
            ]
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


async def delete_topics(cfg: KafkaConfig, names: Iterable[str]) -> None:
    """Delete ``names`` (those that exist) and wait until the cluster no longer lists them."""
    wanted = set(names)
    client = admin(cfg)
    await client.start()
    try:
        doomed = sorted(wanted & set(await client.list_topics()))
        if not doomed:
            return
        await client.delete_topics(doomed)
        async with asyncio.timeout(30):
            while set(doomed) & set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await client.close()


_GROUP_NOT_FOUND = 69


async def delete_groups(cfg: KafkaConfig, groups: Iterable[str]) -> dict[str, str]:
    """Delete consumer ``groups``; returns those Kafka kept, with why: ask again later.

    Kafka keeps a group that has a live member, or whose coordinator is still loading. A
    group is deleted only once it has no member: one whose process was killed stays
    until its session times out. aiokafka's admin client has no call for DeleteGroups,
    so the request goes to each group's coordinator through it (its ``_send_request``).
    """
    kept: dict[str, str] = {}
    client = admin(cfg)
    await client.start()
    try:
        for group in dict.fromkeys(groups):
            try:
                node = await client.find_coordinator(group)
                request = DeleteGroupsRequest([group])
                response = await client._send_request(request, node)  # noqa: SLF001
            except KafkaError as exc:  # its coordinator is loading or moving: ask again later
                if not exc.retriable:
                    raise
                kept[group] = type(exc).__name__
                continue
            for name, code in response.results:
                if code not in (0, _GROUP_NOT_FOUND):
                    kept[name] = for_code(code).__name__
    finally:
        await client.close()
    return kept


async def prepare_topics(cfg: KafkaConfig, names: Iterable[str], *, wait: float = 120.0) -> None:
    """What a worker does with its topics at start-up.

    With ``kafka.create_topics`` (the default, for local runs) the missing ones are
    created. Without it (production: a one-shot ``pipeline topics create`` makes them with
    the cluster's replication settings) the worker waits up to ``wait`` seconds for them.

    Raises:
        StageFailed: a topic still does not exist after ``wait`` seconds.
    """
    if cfg.create_topics:
        await ensure_topics(cfg, names)
        return
    wanted = list(dict.fromkeys(names))
    client = admin(cfg)
    await client.start()
    try:
        deadline = time.monotonic() + wait
        warned = False
        while missing := [n for n in wanted if n not in set(await client.list_topics())]:
            if time.monotonic() > deadline:
                msg = (
                    f"topics {', '.join(missing)} do not exist and kafka.create_topics is "
                    "false: run `pipeline topics create`"
                )
                raise StageFailed(msg)
            if not warned:
                log.warning(
                    "waiting up to %g s for topics %s (kafka.create_topics is false; "
                    "`pipeline topics create` makes them)", wait, ", ".join(missing),
                )  # fmt: skip
                warned = True
            await asyncio.sleep(1.0)
    finally:
        await client.close()


async def record_limit(cfg: KafkaConfig, topics: Iterable[str]) -> int:
    """The biggest record every one of ``topics`` takes.

    That is ``kafka.max_record_size``, or less where a topic's ``max.message.bytes`` is
    lower (a topic the pipeline did not create, or one changed since).
    """
    client = admin(cfg)
    await client.start()
    try:
        wanted = {"max.message.bytes": None}
        responses = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs=wanted) for name in topics]
        )
    finally:
        await client.close()
    limit = cfg.max_record_size
    for response in responses:
        for error, _, _, name, entries in response.resources:
            for key, value, *_ in entries if not error else ():
                if key == "max.message.bytes" and int(value) < limit:
                    log.info("topic %s takes records up to %s bytes", name, value)
                    limit = int(value)
    return limit


async def partitions(client: AIOKafkaConsumer, *topics: str) -> list[TopicPartition]:
    """Every partition of ``topics``, from fresh cluster metadata (for manual assignment).

    Only ``topics`` are asked for: a cluster-wide metadata request costs in proportion
    to every topic of the cluster (thousands, on a shared one). aiokafka has no public
    call for it (``topics()`` asks for all and returns only names; the consumer's cache
    is filled only for subscribed topics).
    """
    cluster = ClusterMetadata()
    if not await client._client._metadata_update(cluster, list(topics)):  # noqa: SLF001
        msg = f"no broker answered a metadata request for {', '.join(topics)}"
        raise KafkaConnectionError(msg)
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
            done = await _group_offsets(client, group)
            for tp in tps:
                start = done[tp].offset if tp in done else begins[tp]
                if await _any_record(peek, tp, start, ends[tp]):
                    total += ends[tp] - start
    finally:
        await client.close()
    return total


_COORDINATOR_WAIT = 10.0
"""Seconds to keep asking for a group's offsets while its coordinator is not available."""


async def _group_offsets(client: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, Any]:
    """A group's committed offsets; a coordinator still loading or moving is waited for."""
    backoff = Backoff(0.1, 1.0)
    async with asyncio.timeout(_COORDINATOR_WAIT):
        while True:
            try:
                offsets: dict[TopicPartition, Any] = await client.list_consumer_group_offsets(group)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                await asyncio.sleep(backoff.next())
            else:
                return offsets


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


async def watch_lag(
    client: AIOKafkaConsumer,
    on_lag: Callable[[dict[tuple[str, int], int]], None],
    *,
    interval: float,
) -> None:
    """Every ``interval`` s until cancelled, tell ``on_lag`` each assigned partition's lag.

    Lag is what ``pipeline status`` and KEDA count: the partition's end offset minus the
    group's committed offset (its beginning when nothing is committed). On a
    transactional topic the commit markers take offsets too, so a caught-up partition
    may show a lag of one. A failed sample (a rebalance, Kafka away) is skipped.
    """
    while True:
        lags: dict[tuple[str, int], int] = {}
        try:
            assigned = sorted(client.assignment())
            if assigned:
                ends = await client.end_offsets(assigned)
                begins = await client.beginning_offsets(assigned)
                for tp in assigned:
                    committed = await client.committed(tp)
                    start = begins[tp] if committed is None else committed
                    lags[(tp.topic, tp.partition)] = max(0, ends[tp] - start)
        except Exception as exc:  # a rebalance or Kafka away: a gauge must never stop a stage
            log.debug("lag sample skipped: %s", exc)
        else:
            on_lag(lags)
        await asyncio.sleep(interval)


def _refusal(exc: Exception, cfg: KafkaConfig) -> str:
    """What the operator should look at, for a refusal :func:`probe` met."""
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f"SASL {cfg.sasl_mechanism} authentication of user {cfg.sasl_username!r} failed: "
            "check kafka.sasl_username and kafka.sasl_password"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"kafka.sasl_mechanism {cfg.sasl_mechanism} is not enabled on the broker ({exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed ({exc.verify_message}): check kafka.tls.ca_file"
        )
    reason = getattr(exc, "reason", None) or exc
    return f"TLS handshake failed ({reason}): is it a TLS listener? check kafka.security_protocol"


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


class Liveness:
    """Asks the cluster for its metadata every few seconds; says when Kafka is lost and back.

    aiokafka's clients reconnect by themselves and raise nothing while idle, so without
    this a worker would look ready through a whole outage. ``on_change(ok, reason)`` is
    called when the answer changes (and once at the start); the stage turns it into its
    readiness check. The pipeline's own words go to the log once per change: a warning
    when Kafka is lost, an info line when it answers again.

    Args:
        cfg: the Kafka configuration.
        stage: whose connection this is (for the log).
        on_change: told ``(True, None)`` or ``(False, reason)``.
        timeout: seconds a check may take before Kafka counts as lost.

    Checks are ``kafka.liveness_interval`` apart.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        stage: str,
        on_change: Callable[[bool, str | None], None],
        *,
        timeout: float = 5.0,
    ) -> None:
        self._cfg = cfg
        self._stage = stage
        self._on_change = on_change
        self._interval = cfg.liveness_interval
        self._timeout = timeout
        self.ok: bool | None = None
        self._client: AIOKafkaAdminClient | None = None

    async def run(self) -> None:
        """Check until cancelled."""
        try:
            while True:
                self._report(await self._check())
                await asyncio.sleep(self._interval)
        finally:
            if self._client is not None:
                await self._client.close()

    async def _check(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                if self._client is None:
                    client = admin(self._cfg, request_timeout_ms=int(self._timeout * 1000))
                    try:
                        await client.start()
                    except BaseException:
                        await client.close()
                        raise
                    self._client = client
                await self._client.describe_cluster()
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:  # any failure to answer is the same news: not reachable
            return str(exc) or type(exc).__name__
        return None

    def _report(self, reason: str | None) -> None:
        ok = reason is None
        if ok == self.ok:
            return
        where = self._cfg.bootstrap_servers
        if not ok:
            log.warning(
                "%s: Kafka at %s is not reachable (%s); waiting for it", self._stage, where, reason
            )
        elif self.ok is False:
            log.info("%s: Kafka at %s answers again", self._stage, where)
        self.ok = ok
        self._on_change(ok, reason)
