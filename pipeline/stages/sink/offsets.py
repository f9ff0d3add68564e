"""Which offsets the sink may commit: the contiguous prefix of finished records."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from pipeline.errors import InternalError

if TYPE_CHECKING:
    from aiokafka import TopicPartition

__all__ = ["OffsetTracker", "OutOfOrder"]


class OutOfOrder(InternalError):
    """A record was started at or below an offset already started in its partition.

    One assignment of a partition delivers its records in offset order, so this is a
    bug: committing past such a record could skip one whose outcome is not recorded.
    """


class OffsetTracker:
    """Per partition, the offset up to which every record's outcome is recorded.

    Offsets must be started in increasing order per partition (as one assignment of a
    partition delivers them); anything else is refused with :class:`OutOfOrder`, since
    the safe point is the first unfinished offset only if earlier offsets came first.
    """

    def __init__(self) -> None:
        self._open: dict[TopicPartition, collections.OrderedDict[int, bool]] = {}
        self._last: dict[TopicPartition, int] = {}
        self._safe: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        """A record was handed out.

        Raises:
            OutOfOrder: ``offset`` is not above every offset started in ``tp`` since it
                was last forgotten.
        """
        last = self._last.get(tp)
        if last is not None and offset <= last:
            msg = f"{tp.topic}/{tp.partition}: offset {offset} started after offset {last}"
            raise OutOfOrder(msg)
        self._last[tp] = offset
        self._open.setdefault(tp, collections.OrderedDict())[offset] = False

    def done(self, tp: TopicPartition, offset: int) -> None:
        """The record's outcome is recorded; advance the safe point past finished records."""
        pending = self._open.get(tp)
        if pending is None or offset not in pending:
            return  # the partition was revoked meanwhile
        pending[offset] = True
        while pending and pending[next(iter(pending))]:
            first, _ = pending.popitem(last=False)
            self._safe[tp] = first + 1

    def in_flight(self) -> int:
        """Records handed out and not finished."""
        return sum(
            sum(1 for finished in pending.values() if not finished)
            for pending in self._open.values()
        )

    def take_commits(self) -> dict[TopicPartition, int]:
        """The safe offsets that moved since the last call."""
        out, self._safe = self._safe, {}
        return out

    def forget(self, tps: list[TopicPartition]) -> None:
        """Drop revoked partitions (a later assignment starts them afresh)."""
        for tp in tps:
            self._open.pop(tp, None)
            self._last.pop(tp, None)
            self._safe.pop(tp, None)
