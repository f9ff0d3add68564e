"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["Stopped", "unless_stopped"]

T = TypeVar("T")


class Stopped(Exception):
    """The stop event came first."""


async def unless_stopped(stopped: asyncio.Future[Any], coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro``, unless ``stopped`` finishes first: then cancel it and raise Stopped."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Stopped
    return task.result()
