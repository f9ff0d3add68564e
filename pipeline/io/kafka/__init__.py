"""Kafka connections, wrapped once: clients, pre-flight, administration, ranges, watchers.

aiokafka is only partly annotated; this package is the typed boundary the stages use,
one concern a module:

- :mod:`~pipeline.io.kafka.clients`: producers, consumers, readers and admin clients,
  with their settings; each is entered with ``async with``.
- :mod:`~pipeline.io.kafka.preflight`: is Kafka there, and does it take our TLS and SASL
  settings (:func:`probe`, :func:`wait_until_reachable`)?
- :mod:`~pipeline.io.kafka.admin`: topics and consumer groups.
- :mod:`~pipeline.io.kafka.ranges`: reading a topic between two offsets
  (:func:`read_range`, the one way), and what such a range holds.
- :mod:`~pipeline.io.kafka.watch`: what the runtime watches while a stage runs.
- :mod:`~pipeline.io.kafka.outbox`: many records of a transaction, in batches per
  partition instead of one ``send`` each.

Where aiokafka offers no public way, :mod:`pipeline.io._aiokafka_internals` reaches in.
Every module logs as ``pipeline.io.kafka``. Use the names below from this package
(``from pipeline.io import kafka``; ``kafka.producer(...)``).
"""

from __future__ import annotations

from pipeline.io.kafka.admin import (
    delete_groups,
    delete_topics,
    ensure_topics,
    prepare_topics,
    record_limit,
)
from pipeline.io.kafka.clients import (
    TXN_RESTART_BACKOFF,
    admin,
    consumer,
    partition_of,
    producer,
    reader,
    shorten_transaction_backoff,
    transactional_producer,
)
from pipeline.io.kafka.outbox import Outbox
from pipeline.io.kafka.preflight import probe, wait_until_reachable
from pipeline.io.kafka.ranges import (
    Ranges,
    backlog,
    partitions,
    read_range,
    size,
    whole,
    window,
)
from pipeline.io.kafka.watch import Liveness, Rebalance, watch_lag

__all__ = [
    "TXN_RESTART_BACKOFF",
    "Liveness",
    "Outbox",
    "Ranges",
    "Rebalance",
    "admin",
    "backlog",
    "consumer",
    "delete_groups",
    "delete_topics",
    "ensure_topics",
    "partition_of",
    "partitions",
    "prepare_topics",
    "probe",
    "producer",
    "read_range",
    "reader",
    "record_limit",
    "shorten_transaction_backoff",
    "size",
    "transactional_producer",
    "wait_until_reachable",
    "watch_lag",
    "whole",
    "window",
]
