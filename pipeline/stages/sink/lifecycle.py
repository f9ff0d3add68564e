"""Each child's latest generation, and one operation at a time per child.

The router numbers a child's adds and deletes (``generation``, in its gateway's order)
and writes each with a :class:`~pipeline.schemas.ChildState` to the compacted
``iotda.subdevices.lifecycle`` topic, in the same transaction. ``added``, ``deleted`` and
``lifecycle`` have the same partition count and key (the child's device_id), so
partition p of each holds the same children, and the sink (range assignment) owns
``added`` p and ``deleted`` p together.

- On assignment of p, before any record of p starts (the read-back's gate,
  :class:`~.recovery.Recovery`), ``lifecycle`` p is read from its beginning to its end:
  the latest generation of each of its children, as committed by then.
- Every add or delete the sink starts raises its child's latest generation to its own.
- Operations on one child run one at a time (a per-child lock, first come first
  served). When its turn comes, an operation whose generation is below the child's
  latest is superseded: a later add or delete exists, so its DPS call is not made.
  Since every operation raised the latest when it started, the ones that do run run
  in generation order, and DPS ends as the latest generation says.
- Generation 0 (written before the router tracked lifecycles) is superseded only by a
  known generation above it, never by an absent entry.
- Generations count within one gateway (the router of that gateway's partition numbers
  them): a child added again under another gateway (a gateway replaced) starts at 1
  there. Between operations of two gateways the later record wins: the Kafka timestamps
  the routers gave them (the child record and its ChildState share a transaction).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from pipeline.io import kafka
from pipeline.io.aio import KeyedLocks

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

    from aiokafka import TopicPartition

    from pipeline.config import KafkaConfig

__all__ = ["Lifecycle", "Stamp", "stamp_of"]

log = logging.getLogger(__name__)


class _State(msgspec.Struct):
    """The fields of a ChildState the sink needs."""

    device_id: str
    gateway_id: str
    generation: int


class _Stamped(msgspec.Struct):
    gateway_id: str = ""
    generation: int = 0


class Stamp(msgspec.Struct, frozen=True):
    """Where an operation stands in its child's life.

    Its gateway, its generation (0 when absent: written before lifecycles were tracked)
    and its record's Kafka timestamp.
    """

    gateway_id: str = ""
    generation: int = 0
    at_ms: int = 0

    def before(self, other: Stamp) -> bool:
        """Whether ``other`` is a later operation of the child."""
        if self.gateway_id == other.gateway_id:
            return self.generation < other.generation
        return self.at_ms < other.at_ms


_state = msgspec.json.Decoder(_State)
_stamped = msgspec.json.Decoder(_Stamped)


def stamp_of(value: bytes | None, at_ms: int) -> Stamp | None:
    """The stamp of an added or deleted child's record written at ``at_ms``; None if unreadable."""
    if value is None:
        return None
    try:
        stamped = _stamped.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return Stamp(stamped.gateway_id, stamped.generation, at_ms)


class Lifecycle:
    """Per assigned partition number, each child's latest generation; per child, a lock.

    Args:
        cfg: the Kafka configuration (``kafka.topics.lifecycle`` is read with it).
    """

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg
        self._topic = cfg.topics.lifecycle
        self._latest: dict[int, dict[str, Stamp]] = {}
        self._turns: KeyedLocks[str] = KeyedLocks()

    async def learn(self, tps: Iterable[TopicPartition]) -> None:
        """Read ``lifecycle`` partitions of ``tps`` (by number) from beginning to end.

        What is read only raises what is known (a child's latest never goes down).
        """
        numbers = {tp.partition for tp in tps}
        if not numbers:
            return
        read = 0
        async with kafka.reader(self._cfg) as reader:
            ranges = {
                tp: span
                for tp, span in (await kafka.whole(reader, self._topic)).items()
                if tp.partition in numbers
            }
            async for record in kafka.read_range(reader, ranges):
                read += 1
                try:
                    state = _state.decode(record.value or b"")
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                    where = f"{record.topic}/{record.partition}/{record.offset}"
                    log.warning("skipping an unreadable lifecycle record at %s: %s", where, exc)
                    continue
                stamp = Stamp(state.gateway_id, state.generation, record.timestamp)
                self.see(record.partition, state.device_id, stamp)
        for number in numbers:
            self._latest.setdefault(number, {})
        log.info(
            "sink read %d lifecycle records of partitions %s", read, sorted(numbers),
            extra={"topic": self._topic},
        )  # fmt: skip

    def forget(self, numbers: Iterable[int]) -> None:
        """Drop the children of partitions no longer owned."""
        for number in numbers:
            self._latest.pop(number, None)

    def see(self, partition: int, device_id: str, stamp: Stamp) -> None:
        """An operation at ``stamp`` started (or was recorded): raise the latest."""
        known = self._latest.setdefault(partition, {})
        latest = known.get(device_id)
        if latest is None or latest.before(stamp):
            known[device_id] = stamp

    def latest(self, partition: int, device_id: str) -> Stamp:
        """The child's latest known (generation 0: none)."""
        return self._latest.get(partition, {}).get(device_id, Stamp())

    def superseded(self, partition: int, device_id: str, stamp: Stamp) -> bool:
        """Whether a later operation of the child, of the same gateway, is known."""
        return stamp.before(self.latest(partition, device_id))

    def turn(self, partition: int, device_id: str, stamp: Stamp) -> _Turn:
        """The turn of an operation at ``stamp``; ``async with`` it gives whether it is superseded.

        The operation raises the child's latest as it starts; it then waits for the
        operations on the child before it.
        """
        self.see(partition, device_id, stamp)
        return _Turn(self, self._turns, partition, device_id, stamp)


class _Turn:
    """:meth:`Lifecycle.turn` (a class, not a generator: it runs once per record)."""

    __slots__ = ("_device_id", "_held", "_lifecycle", "_partition", "_stamp", "_turns")

    def __init__(
        self,
        lifecycle: Lifecycle,
        turns: KeyedLocks[str],
        partition: int,
        device_id: str,
        stamp: Stamp,
    ) -> None:
        self._lifecycle = lifecycle
        self._turns = turns
        self._partition = partition
        self._device_id = device_id
        self._stamp = stamp
        self._held = False

    async def __aenter__(self) -> bool:
        lifecycle = self._lifecycle
        await self._turns.acquire(self._device_id)
        self._held = True
        return lifecycle.superseded(self._partition, self._device_id, self._stamp)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._held:
            self._held = False
            self._turns.release(self._device_id)
