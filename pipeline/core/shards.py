"""Splitting a list of gateways between ingest replicas (pure).

``mqtt.shard = "i/n"``: of the listed gateways, replica i takes those whose stable hash
modulo n is i, so n replicas given the same list split it without overlap, and each
process computes the same split.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Shard", "shard_of", "share"]


class _Named(Protocol):
    @property
    def device_id(self) -> str: ...


_G = TypeVar("_G", bound=_Named)


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """One replica's part of a gateway list: ``index`` of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``i/n`` with ``0 <= i < n``.

        Raises:
            ValueError: ``text`` is not of that form.
        """
        index, _, count = text.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            msg = f"expected i/n with 0 <= i < n, got {text!r}"
            raise ValueError(msg)
        return cls(int(index), int(count))

    def takes(self, device_id: str) -> bool:
        """Whether this replica holds the gateway ``device_id``."""
        return shard_of(device_id, self.count) == self.index


def shard_of(device_id: str, count: int) -> int:
    """The shard of a gateway among ``count``: a stable hash, the same in every process."""
    return zlib.crc32(device_id.encode()) % count


def share(gateways: Iterable[_G], shard: str | None) -> list[_G]:
    """The gateways of ``shard`` (``i/n``), in list order; all of them when it is None.

    Raises:
        ValueError: ``shard`` is not ``i/n`` (the configuration is checked for it at load).
    """
    if shard is None:
        return list(gateways)
    part = Shard.parse(shard)
    return [g for g in gateways if part.takes(g.device_id)]
