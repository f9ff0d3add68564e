"""The bookkeeping of ``pipeline audit``, pure: has every child exactly one outcome?

The promise: each child record the router wrote (``added``, and ``deleted``) gets
exactly one terminal outcome from the sink, and each ``add_sub_device_response`` is
routed whole. The reading is :mod:`pipeline.tools.audit`; this module keeps the count.

- A child's outcomes are the records whose ``source`` header names it
  (``topic/partition/offset``): for an added child an allocation or a
  ``dps.allocations.dlq`` record; for a deleted child a release (any action, ``superseded``
  and ``not_allocated`` included) or a DLQ record of its reset or delete.
- A DLQ record that a redrive put back (a later ``added`` record whose ``redriven-from``
  header names it) is not terminal: the redriven record is a child of its own, audited
  like any other. A DLQ record nobody redrove is terminal; unless it is ``superseded``
  (the child's later delete won: nothing to do), it is listed as *dead-lettered*, waiting
  for an operator's redrive. It does not break the promise.
- A gap is a child with no outcome yet (``missing``), one with more than one
  (``duplicate``), and a response whose children are not all in ``added`` and ``failed``
  (``unrouted``).

Memory is what a million children need: per audited child its offset (8 bytes) and four
counters (a byte each), kept per partition in arrays, never a Python object per child;
the routing check keeps an 8-byte hash per routed child. Details (device id, age, trace
id) are read back afterwards for the gaps listed only.
"""

from __future__ import annotations

import dataclasses
from array import array
from bisect import bisect_left
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "BREAKING",
    "DETAIL_KINDS",
    "Gap",
    "GapKind",
    "Hashes",
    "Ledger",
    "Origins",
    "Report",
    "Verdict",
    "child_key",
    "failed_key",
    "older_first",
    "unrouted",
]

GapKind = Literal["missing", "duplicate", "dead-lettered", "unrouted"]
DETAIL_KINDS: tuple[GapKind, ...] = ("missing", "duplicate", "dead-lettered", "unrouted")
"""Every kind of finding, in the order they are listed."""
BREAKING: frozenset[GapKind] = frozenset({"missing", "duplicate", "unrouted"})
"""The kinds that break the promise (exit 1); ``dead-lettered`` is an outcome, listed."""

_MAX = 255  # the counters saturate: "more than one" is all that matters past 1
_BUCKETS = 64


def child_key(gateway_id: str, device_id: str) -> int:
    """The routing check's hash of an added child (stable within one process)."""
    return hash((gateway_id, device_id))


def failed_key(gateway_id: str, event_id: str | None, node_id: str) -> int:
    """The routing check's hash of a failed child."""
    return hash((gateway_id, event_id, node_id))


class Hashes:
    """A set of 8-byte hashes: appended while reading, then sealed (sorted) for lookups.

    Kept in :data:`_BUCKETS` arrays by the hash's low bits, each sorted on its own: sorting
    makes a Python int of every value for a moment, and a bucket is a 64th of them.
    """

    def __init__(self) -> None:
        self._buckets = [array("q") for _ in range(_BUCKETS)]
        self._sealed = False

    def add(self, value: int) -> None:
        """Add one hash (before :meth:`seal`)."""
        self._buckets[value & (_BUCKETS - 1)].append(value)

    def seal(self) -> None:
        """Sort the hashes; lookups work from here on."""
        for i, bucket in enumerate(self._buckets):
            self._buckets[i] = array("q", sorted(bucket))
        self._sealed = True

    def __contains__(self, value: object) -> bool:
        if not self._sealed:
            msg = "Hashes.seal() first"
            raise RuntimeError(msg)
        if not isinstance(value, int):
            return False
        bucket = self._buckets[value & (_BUCKETS - 1)]
        i = bisect_left(bucket, value)
        return i < len(bucket) and bucket[i] == value

    def __len__(self) -> int:
        return sum(map(len, self._buckets))


class Origins:
    """The DLQ records a redrive put back: (partition, offset) of each ``redriven-from``."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._by_partition: dict[int, Hashes] = {}

    def add(self, partition: int, offset: int) -> None:
        """A redriven record named ``topic/partition/offset`` as its origin."""
        self._by_partition.setdefault(partition, Hashes()).add(offset)

    def seal(self) -> None:
        """Done adding; :meth:`redriven` works from here on."""
        for offsets in self._by_partition.values():
            offsets.seal()

    def redriven(self, partition: int, offset: int) -> bool:
        """Whether the DLQ record at ``partition``/``offset`` was put back."""
        offsets = self._by_partition.get(partition)
        return offsets is not None and offset in offsets


@dataclasses.dataclass(slots=True)
class _Partition:
    offsets: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    terminal: bytearray = dataclasses.field(default_factory=bytearray)
    """Allocations or releases, and DLQ records nobody redrove."""
    allocated: bytearray = dataclasses.field(default_factory=bytearray)
    waiting: bytearray = dataclasses.field(default_factory=bytearray)
    """DLQ records nobody redrove that were not ``superseded``."""
    redriven: bytearray = dataclasses.field(default_factory=bytearray)


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """A child that is not simply done: where it is and what is wrong."""

    kind: GapKind
    partition: int
    offset: int
    detail: str


class Ledger:
    """The child records of one topic in the window, and the outcomes found for them.

    Offsets are added in ascending order per partition (as a topic is read); outcomes
    then find their child by its offset (a binary search).
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._parts: dict[int, _Partition] = {}
        self._count = 0

    def add(self, partition: int, offset: int) -> None:
        """A child record in the window, at ``partition``/``offset`` (ascending)."""
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition()
        if part.offsets and offset <= part.offsets[-1]:
            msg = f"{self.topic}/{partition}: offset {offset} after {part.offsets[-1]}"
            raise ValueError(msg)
        part.offsets.append(offset)
        for counter in (part.terminal, part.allocated, part.waiting, part.redriven):
            counter.append(0)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def _find(self, partition: int, offset: int) -> tuple[_Partition, int] | None:
        part = self._parts.get(partition)
        if part is None:
            return None
        i = bisect_left(part.offsets, offset)
        if i < len(part.offsets) and part.offsets[i] == offset:
            return part, i
        return None

    @staticmethod
    def _bump(counter: bytearray, i: int) -> None:
        if counter[i] < _MAX:
            counter[i] += 1

    def allocated(self, partition: int, offset: int) -> bool:
        """An allocation (or a release) names this child; False if it is not one of ours."""
        found = self._find(partition, offset)
        if found is None:
            return False
        part, i = found
        self._bump(part.terminal, i)
        self._bump(part.allocated, i)
        return True

    def dead_lettered(self, partition: int, offset: int, *, redriven: bool, waiting: bool) -> bool:
        """A DLQ record names this child; False if it is not one of ours.

        Args:
            partition: the child's partition.
            offset: the child's offset.
            redriven: a redrive put the DLQ record back (not terminal).
            waiting: it waits for an operator (not ``superseded``).
        """
        found = self._find(partition, offset)
        if found is None:
            return False
        part, i = found
        if redriven:
            self._bump(part.redriven, i)
            return True
        self._bump(part.terminal, i)
        if waiting:
            self._bump(part.waiting, i)
        return True

    def verdicts(self) -> Iterator[Verdict]:
        """Every child that is not simply done, partition by partition in offset order."""
        for partition in sorted(self._parts):
            part = self._parts[partition]
            for i, offset in enumerate(part.offsets):
                terminal, redriven = part.terminal[i], part.redriven[i]
                if terminal + redriven == 0:
                    yield Verdict("missing", partition, offset, "no outcome yet")
                elif terminal + redriven > 1:
                    allocated = part.allocated[i]
                    dlq = terminal - allocated
                    detail = f"{allocated} allocations, {dlq} DLQ records, {redriven} redriven"
                    yield Verdict("duplicate", partition, offset, detail)
                elif part.waiting[i]:
                    yield Verdict("dead-lettered", partition, offset, "waiting for a redrive")


class Gap(msgspec.Struct, kw_only=True):
    """One finding, as listed."""

    kind: GapKind
    topic: str
    partition: int
    offset: int
    key: str
    """The child's device_id (the record's key), or the event's gateway."""
    at: str | None
    """When the record was written (its Kafka timestamp, UTC)."""
    waiting_s: float | None
    """Seconds since then, for a child without an outcome or an event not routed."""
    trace_id: str
    """From the record's ``traceparent`` header; ``-`` when it has none."""
    detail: str


class Report(msgspec.Struct, kw_only=True):
    """What an audit counted and found."""

    since: str
    until: str | None
    children: int
    """Added children in the window."""
    deleted: int
    """Deleted children in the window."""
    events: int
    """``add_sub_device_response`` events in the window."""
    counts: dict[str, int]
    """Findings by kind (every kind, zeros included)."""
    oldest_missing_s: float
    """Seconds the oldest child without an outcome has waited (0 when none)."""
    gaps: list[Gap]
    """The findings listed, oldest first within each kind, at most ``limit`` of each."""
    limit: int
    unreadable: int = 0
    """Records that could not be read (each logged)."""

    @property
    def holds(self) -> bool:
        """Whether the promise holds: no child missing or doubled, every event routed."""
        return not any(self.counts.get(kind, 0) for kind in BREAKING)


def unrouted(
    gateway_id: str,
    event_id: str | None,
    children: Sequence[str],
    failed: Iterable[str],
    *,
    added: Hashes,
    failures: Hashes,
) -> tuple[list[str], list[str]]:
    """The children of one add response not found routed: (added ones, failed ones)."""
    lost = [d for d in children if child_key(gateway_id, d) not in added]
    also = [n for n in failed if failed_key(gateway_id, event_id, n) not in failures]
    return lost, also


def older_first(gaps: list[Gap], limit: int) -> list[Gap]:
    """At most ``limit`` gaps of each kind, in kind order, oldest first within each."""
    listed: list[Gap] = []
    for kind in DETAIL_KINDS:
        mine = sorted((g for g in gaps if g.kind == kind), key=lambda g: (g.at or "", g.offset))
        listed.extend(mine[:limit])
    return listed
