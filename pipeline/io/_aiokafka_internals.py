"""Where the pipeline reaches into aiokafka past its public API: here and only here.

Each function is one reach-in: what the public API lacks, what would remove it, and the
versions it was checked against. ``tests/io/test_internals.py`` asserts every private
name and signature used here, without a broker, so an aiokafka upgrade that moves one
fails there, naming the reach-in, instead of misbehaving at run time.

Checked against aiokafka 0.14.0.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from aiokafka.producer import sender as _sender

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.cluster import ClusterMetadata

__all__ = [
    "fetch_metadata",
    "retrieve_fatal_error",
    "send_to_node",
    "set_concurrent_transactions_backoff",
]


def set_concurrent_transactions_backoff(seconds: float) -> float:
    """Set aiokafka's wait after CONCURRENT_TRANSACTIONS; returns the one it replaces.

    Why: right after a commit the transaction coordinator is still writing its markers
    and answers the next transaction's first AddPartitionsToTxn with
    CONCURRENT_TRANSACTIONS (KAFKA-5477). aiokafka then waits
    ``aiokafka.producer.sender.BACKOFF_OVERRIDE`` (20 ms, as the Java client does), a
    module constant with no setting: the producer has no option for it.

    What would remove it: a producer option for that backoff (franz-go has
    ``ConcurrentTransactionBackoff``), or a broker and client with KIP-890's second
    transaction protocol, where the broker retries the partition registration itself
    (KAFKA-18654); aiokafka implements neither.

    The value is process-wide, read when the answer comes: a stage applies it when it
    starts (the router), not the import of this module.
    """
    previous = float(_sender.BACKOFF_OVERRIDE)
    _sender.BACKOFF_OVERRIDE = seconds
    return previous


def retrieve_fatal_error(producer: AIOKafkaProducer) -> None:
    """Mark a transactional producer's fatal error (ProducerFenced, say) as retrieved.

    Why: when its sender fails for good, aiokafka also sets the error on futures nobody
    awaits once the caller got the same error from its own call: the transaction
    manager's ``_transaction_waiter`` and each pending batch's ``_drain_waiter`` (in the
    message accumulator's ``_batches`` and ``_pending_batches``). When they are collected,
    asyncio logs "Future exception was never retrieved" with a traceback, at error
    level, after the caller's own message, once per future.

    What would remove it: aiokafka retrieving those futures' exceptions itself, as it
    does for a batch's delivery future (``MessageBatch.failure``).
    """
    waiters = [getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None)]
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        batches = [*itertools.chain(*accumulator._batches.values()), *accumulator._pending_batches]  # noqa: SLF001
        waiters += [getattr(batch, "_drain_waiter", None) for batch in batches]
    for waiter in waiters:
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()


async def send_to_node(client: AIOKafkaAdminClient, request: Any, node: int) -> Any:
    """Send a protocol ``request`` to broker ``node`` through the admin client's connections.

    Why: ``AIOKafkaAdminClient`` has no call for DeleteGroups (KIP-229), so the request
    is built from ``aiokafka.protocol.admin`` and sent with the client's
    ``_send_request(request, node_id)``, the helper its own public calls use.

    What would remove it: an ``AIOKafkaAdminClient.delete_consumer_groups`` (the Java
    admin client's ``deleteConsumerGroups``).
    """
    return await client._send_request(request, node)  # noqa: SLF001


async def fetch_metadata(
    consumer: AIOKafkaConsumer, cluster: ClusterMetadata, topics: Sequence[str]
) -> bool:
    """Fill ``cluster`` with fresh metadata for ``topics`` only; False when no broker answered.

    Why: a consumer outside any group (manual assignment) must learn a topic's partitions
    itself. aiokafka's public calls either ask for every topic of the cluster
    (``AIOKafkaConsumer.topics()``, which costs in proportion to all the topics of a
    shared cluster and returns names only) or answer from a cache filled only for
    subscribed topics (``partitions_for_topic``). The consumer's client
    (``AIOKafkaConsumer._client``) has ``_metadata_update(cluster, topics)``, the request
    its own refresh uses, for just the topics named.

    What would remove it: a public "partitions of these topics, fresh" call on the
    consumer (as the Java consumer's ``partitionsFor(topic)``, which asks the broker).
    """
    client = consumer._client  # noqa: SLF001
    return bool(await client._metadata_update(cluster, list(topics)))  # noqa: SLF001
