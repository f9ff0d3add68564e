"""Kafka clients and their settings: producers, consumers, readers, admin clients.

Every client of the package is made here, from the ``[kafka]`` section, and is entered
with ``async with``: started on the way in (closed again when starting fails), closed on
the way out.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner
from murmurhash2 import murmurhash2

from pipeline.io import _aiokafka_internals
from pipeline.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from types import TracebackType

    from pipeline.config import KafkaConfig

__all__ = [
    "TXN_RESTART_BACKOFF",
    "admin",
    "consumer",
    "partition_of",
    "producer",
    "reader",
    "settings",
    "shorten_transaction_backoff",
    "transactional_producer",
]


def settings(cfg: KafkaConfig) -> dict[str, Any]:
    """What every client takes from ``[kafka]``: servers, client id, timeouts, TLS, SASL."""
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
        opts["ssl_context"] = client_context(cfg.tls, key="kafka.tls")
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
        return all_partitions[partition_of(key, len(all_partitions))]


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``partitions`` that every pipeline producer puts ``key`` in.

    Java's (and aiokafka's) default for a keyed record: ``murmur2(key) % partitions``.
    ``pipeline trace`` reads only this partition of a topic keyed by ``key``.
    """
    return (murmurhash2(key, _MURMUR2_SEED) & 0x7FFFFFFF) % partitions


_DEFAULT = DefaultPartitioner()


TXN_RESTART_BACKOFF = 0.002
"""Seconds before a transaction that the coordinator is still closing asks again.

Right after a commit the coordinator is still writing the transaction's markers, and the
next transaction's first AddPartitionsToTxn is answered CONCURRENT_TRANSACTIONS
(KAFKA-5477). aiokafka then waits a fixed 20 ms (as the Java client does) though the
markers take about 1 ms here: every transaction after the first of a producer cost 20 ms
more. Asking again after 2 ms costs a request or two to the coordinator instead
(measured: 25 ms -> 3.5 ms per back-to-back transaction; README, Measured).
"""


def shorten_transaction_backoff() -> None:
    """Have transactions the coordinator is still closing ask again after 2 ms, not 20.

    For back-to-back transactions (the router's): see :data:`TXN_RESTART_BACKOFF`.
    aiokafka has no setting for it; this changes its process-wide constant
    (:func:`pipeline.io._aiokafka_internals.set_concurrent_transactions_backoff`), so a
    stage that wants it calls this when it starts.
    """
    _aiokafka_internals.set_concurrent_transactions_backoff(TXN_RESTART_BACKOFF)


_NO_BOOTSTRAP = "no bootstrap server answered (aiokafka logs why at debug)"


@contextlib.contextmanager
def _bootstrapping() -> Iterator[None]:
    """Say in words that bootstrapping failed (aiokafka names only its parsed host list).

    A client's ``start()`` raises KafkaConnectionError itself only when no bootstrap
    server answered: once it has the cluster's metadata, aiokafka retries connection
    failures (or wraps them in another error). The type stays, so callers that catch
    it (or KafkaError) are unchanged.
    """
    try:
        yield
    except KafkaConnectionError as exc:
        raise KafkaConnectionError(_NO_BOOTSTRAP) from exc


async def _start_or_close(
    start: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]
) -> None:
    """Start a client; close it again when starting fails or is cancelled."""
    try:
        await start()
    except BaseException:
        await close()
        raise


class _Producer(AIOKafkaProducer):  # type: ignore[misc]
    """aiokafka's producer, closed when ``async with`` fails to start it, quietly when fenced.

    aiokafka's own ``__aenter__`` leaves it open: when the broker is not there yet, the
    garbage collector later logs "Unclosed AIOKafkaProducer" at error, a false alarm.
    """

    async def start(self) -> None:
        """Connect (see :func:`_bootstrapping` for its failure)."""
        with _bootstrapping():
            await super().start()

    async def stop(self) -> None:
        """Close; a fatal transaction error (fenced) the caller already got is not logged again."""
        _aiokafka_internals.retrieve_fatal_error(self)
        await super().stop()

    async def __aenter__(self) -> Self:
        await _start_or_close(self.start, self.stop)
        return self


class _Consumer(AIOKafkaConsumer):  # type: ignore[misc]
    """aiokafka's consumer, closed when ``async with`` fails to start it (see _Producer)."""

    async def start(self) -> None:
        """Connect (see :func:`_bootstrapping` for its failure)."""
        with _bootstrapping():
            await super().start()

    async def __aenter__(self) -> Self:
        await _start_or_close(self.start, self.stop)
        return self


class _Admin(AIOKafkaAdminClient):  # type: ignore[misc]
    """aiokafka's admin client with the one life cycle of the others: ``async with``.

    aiokafka's has none: started on the way in (closed again when starting fails),
    closed on the way out.
    """

    async def start(self) -> None:
        """Connect (see :func:`_bootstrapping` for its failure)."""
        with _bootstrapping():
            await super().start()

    async def __aenter__(self) -> Self:
        await _start_or_close(self.start, self.close)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (``acks=all``)."""
    opts = settings(cfg) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": cfg.linger_ms,
        "compression_type": None,
        "max_request_size": cfg.max_record_size,
        "partitioner": _KeyPartitioner(),
    }
    return _Producer(**(opts | overrides))


TRANSACTION_BATCH_BYTES = 256 * 1024
"""Bytes of a transactional producer's batch per partition, at most (aiokafka's: 16 KiB)."""


def transactional_producer(cfg: KafkaConfig, transactional_id: str) -> AIOKafkaProducer:
    """A producer for read-process-write transactions (the router's): no linger, large batches.

    A transaction waits for its sends before it commits, so a linger would only delay it.
    aiokafka keeps one produce request in flight per broker, with at most one batch per
    partition in it, so a transaction's records for one partition leave one batch per round
    trip: at aiokafka's 16 KiB, the router's 280 KB a partition of a 500-event transaction
    (its ``added`` or ``lifecycle`` records, on 3 partitions) took 18 round trips. Batches
    of up to 256 KiB (or ``max_record_size``, if smaller; a batch is one message to the
    broker's size limit) take two.
    """
    batch = min(TRANSACTION_BATCH_BYTES, cfg.max_record_size)
    return producer(cfg, transactional_id=transactional_id, linger_ms=0, max_batch_size=batch)


def consumer(
    cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that commits explicitly and reads only committed transactional data."""
    opts = settings(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": cfg.max_record_size,
    }
    return _Consumer(*topics, **(opts | overrides))


def reader(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer outside any group, for :func:`~pipeline.io.kafka.read_range` (read committed)."""
    return consumer(cfg, group_id=None, **overrides)


def admin(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (topics, offsets, consumer groups); enter it with ``async with``."""
    return _Admin(**(settings(cfg) | overrides))
