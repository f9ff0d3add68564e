"""Releasing a deleted child in DPS, as ``sink.on_delete`` says.

- ``record``: a :class:`~pipeline.schemas.Release` ``recorded`` in ``dps.releases``; no call.
- ``reset`` / ``delete``: the sn comes from the DeletedChild's DeviceInfo through the
  sink's mapping (a delete without one is dead-lettered ``invalid``: the pipeline never
  saw the child added, so its sn is unknown). Get DPS Device gives its registration
  group; an sn DPS does not know, or has not allocated, is ``not_allocated``. The others
  wait up to ``sink.release_linger`` for more of the same (orgId, groupId), at most
  ``sink.release_batch`` a call (DPS takes one group per call), then Reset Device
  Allocation Status or Delete DPS Device: ``reset`` / ``deleted`` per sn.
- Failures: a transient one is retried on the record's own backoff (Get DPS Device
  again first: the state may have changed), dead-lettered ``exhausted`` after
  ``sink.give_up_after``; a refusal, or an sn DPS leaves out of its answer, is
  dead-lettered ``rejected`` with ``operation`` reset or delete.
- A delete superseded by a later add (:mod:`.lifecycle`) makes no call: ``superseded``.

Calls are paced by the :class:`~.limiter.RateLimiter` and let through by the
:class:`~.breaker.Breaker`, like allocates. They take no allocate call slot: a batch
waits for its members, and they must not hold slots the allocates need.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec

from pipeline.dps.protocol import is_allocated
from pipeline.errors import DpsError, DpsTransient, MappingError
from pipeline.io.aio import Backoff
from pipeline.ops import tracing
from pipeline.ops.metrics import SINK_CALLS, SINK_RETRIES
from pipeline.schemas import AllocationFailure, DeviceInfo, Release, utc_now
from pipeline.stages.sink.outcomes import embeddable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiokafka import ConsumerRecord

    from pipeline.config import SinkConfig
    from pipeline.core.mapping import Mapper
    from pipeline.dps.client import DpsClient
    from pipeline.stages.sink.breaker import Breaker
    from pipeline.stages.sink.limiter import RateLimiter
    from pipeline.stages.sink.outcomes import Outcomes

__all__ = ["Releaser"]

log = logging.getLogger(__name__)


class _Deleted(msgspec.Struct, kw_only=True):
    """What the sink reads of a :class:`~pipeline.schemas.DeletedChild`.

    ``device`` is read as raw JSON (``null`` when absent): msgspec decodes a
    ``Raw | None`` field as null only, refusing an object there.
    """

    gateway_id: str
    device_id: str
    event_id: str | None = None
    generation: int = 0
    device: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))

    def info(self) -> bytes | None:
        """The DeviceInfo's JSON, or None when the record has none."""
        raw = bytes(self.device)
        return None if raw.strip() in (b"", b"null") else raw


_deleted = msgspec.json.Decoder(_Deleted)
_device = msgspec.json.Decoder(DeviceInfo)

T = TypeVar("T")

Action = Literal["recorded", "reset", "deleted", "not_allocated", "superseded"]


@dataclasses.dataclass
class _Batch:
    """Sns of one (orgId, groupId) waiting to share a call, each with its waiter."""

    members: list[tuple[str, asyncio.Future[tuple[list[str] | None, DpsError | None]]]] = (
        dataclasses.field(default_factory=list)
    )
    timer: asyncio.Task[None] | None = None


@dataclasses.dataclass
class _Target:
    """Where a deleted child is in DPS."""

    sn: str | None = None
    org_id: str | None = None
    group_id: str | None = None


class _Failed(Exception):
    """A release that ends in the DLQ (carries what the DLQ record says)."""

    def __init__(
        self,
        kind: Literal["rejected", "exhausted", "invalid"],
        message: str,
        *,
        code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code
        self.request_id = request_id


class Releaser:
    """Turns one ``iotda.subdevices.deleted`` record into exactly one recorded outcome.

    Args:
        cfg: the ``[sink]`` section.
        mapper: sn and orgId of a child.
        dps: an open DPS client.
        breaker: shared with the allocator.
        limiter: shared with the allocator.
        outcomes: where releases and DLQ records go.
        on_answer: called when a DPS call has ended (progress, for liveness).
    """

    def __init__(
        self,
        cfg: SinkConfig,
        *,
        mapper: Mapper,
        dps: DpsClient,
        breaker: Breaker,
        limiter: RateLimiter,
        outcomes: Outcomes,
        on_answer: Callable[[], None],
    ) -> None:
        self._cfg = cfg
        self._mapper = mapper
        self._dps = dps
        self._breaker = breaker
        self._limiter = limiter
        self._outcomes = outcomes
        self._on_answer = on_answer
        self._operation: Literal["reset", "delete"] = (
            "delete" if cfg.on_delete == "delete" else "reset"
        )
        self._batches: dict[tuple[str, str], _Batch] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self.busy: set[bytes] = set()
        """Sources of the records whose call is on the wire or whose outcome is being written."""

    async def close(self) -> None:
        """Cancel the batch calls still under way (at shutdown, after the records)."""
        for batch in self._batches.values():
            if batch.timer is not None:
                batch.timer.cancel()
        self._batches.clear()
        for task in self._calls:
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def process(
        self, record: ConsumerRecord[bytes, bytes], source: bytes, *, superseded: bool
    ) -> None:
        """Release (or record) the deleted child of ``record``, and record the outcome."""
        try:
            await self._process(record, source, superseded=superseded)
        finally:
            self.busy.discard(source)

    async def _process(
        self, record: ConsumerRecord[bytes, bytes], source: bytes, *, superseded: bool
    ) -> None:
        try:
            deleted = _deleted.decode(record.value or b"")
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            why = "the record has no value (a tombstone)" if record.value is None else str(exc)
            await self._dead_letter(record, source, None, _Target(), _Failed("invalid", why))
            return
        target = _Target()
        info = deleted.info()
        if info is not None:
            with contextlib.suppress(MappingError, msgspec.DecodeError):
                target.sn, target.org_id = self._mapper.locate(_device.decode(info))
        tracing.current().describe(
            sn=target.sn, gateway_id=deleted.gateway_id, event_id=deleted.event_id
        )
        if superseded:
            await self._released(record, source, deleted, target, "superseded")
            return
        if self._cfg.on_delete == "record":
            await self._released(record, source, deleted, target, "recorded")
            return
        try:
            action, request_id = await self._release(source, deleted, target)
        except _Failed as failed:
            await self._dead_letter(record, source, deleted, target, failed)
            return
        await self._released(record, source, deleted, target, action, request_id=request_id)

    async def _release(
        self,
        source: bytes,
        deleted: _Deleted,
        target: _Target,
    ) -> tuple[Action, str | None]:
        info = deleted.info()
        if info is None:
            msg = (
                "the deleted child has no DeviceInfo: the pipeline never saw it added, so "
                "its sn is unknown"
            )
            raise _Failed("invalid", msg)
        try:
            sn, org_id = self._mapper.locate(_device.decode(info))
        except (MappingError, msgspec.DecodeError) as exc:
            raise _Failed("invalid", f"cannot map the deleted child: {exc}") from None
        backoff = Backoff(self._cfg.retry_initial, self._cfg.retry_max)
        first = time.monotonic()
        while True:
            try:
                device = await self._guarded(sn, source, lambda: self._dps.get_device(org_id, sn))
                if device is None or not is_allocated(device) or not device.group_id:
                    return "not_allocated", None
                target.group_id = device.group_id
                done = await self._batched(org_id, device.group_id, sn, source)
            except DpsError as exc:
                if not exc.retriable:
                    raise _Failed(
                        "rejected", exc.msg, code=exc.code, request_id=exc.request_id
                    ) from None
                if time.monotonic() - first >= self._cfg.give_up_after:
                    raise _Failed(
                        "exhausted", exc.msg, code=exc.code, request_id=exc.request_id
                    ) from None
                self.busy.discard(source)
                SINK_RETRIES.inc()
                await asyncio.sleep(backoff.next(exc.retry_after))
                continue
            if sn not in done:
                what = "reset" if self._operation == "reset" else "deleted"
                msg = f"DPS did not list sn {sn} among those it {what} (group {target.group_id})"
                raise _Failed("rejected", msg)
            return ("reset" if self._operation == "reset" else "deleted"), None

    async def _guarded(self, sn: str, source: bytes | None, call: Callable[[], Awaitable[T]]) -> T:
        """One DPS call, paced by the limiter and let through by the breaker."""
        taken_at = await self._limiter.wait()
        probe = await self._breaker.acquire()
        if source is not None:  # a batch call: its members' sources are busy already
            self.busy.add(source)
        try:
            result = await call()
        except DpsError as exc:
            self._report(exc, probe, sn, taken_at)
            raise
        except BaseException:
            self._breaker.abandon(probe)
            raise
        finally:
            self._on_answer()
        SINK_CALLS.labels("ok").inc()
        self._breaker.succeeded(probe)
        self._limiter.succeeded()
        return result

    def _report(self, exc: DpsError, probe: bool, sn: str, taken_at: float) -> None:
        if not exc.retriable:
            SINK_CALLS.labels("rejected").inc()
            self._breaker.succeeded(probe)
        elif exc.throttled:
            SINK_CALLS.labels("throttled").inc()
            self._limiter.throttled(taken_at)
            self._breaker.succeeded(probe)
        else:
            SINK_CALLS.labels("transient").inc()
            self._breaker.failed(
                probe, sn, exc.diagnosis(), operator=exc.hint is not None,
                retry_after=exc.retry_after,
            )  # fmt: skip

    async def _batched(self, org_id: str, group_id: str, sn: str, source: bytes) -> list[str]:
        """Reset or delete ``sn`` with others of its group; the sns DPS listed.

        Raises:
            DpsError: the call failed (for every member of the batch).
        """
        key = (org_id, group_id)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch()
            batch.timer = asyncio.create_task(self._linger(key, batch), name="sink.release-linger")
        waiter: asyncio.Future[tuple[list[str] | None, DpsError | None]] = (
            asyncio.get_running_loop().create_future()
        )
        batch.members.append((sn, waiter))
        if len(batch.members) >= self._cfg.release_batch:
            self._send(key, batch)
        self.busy.add(source)
        done, error = await asyncio.shield(waiter)
        if error is not None:
            raise error
        assert done is not None  # noqa: S101  (one of the two is set)
        return done

    async def _linger(self, key: tuple[str, str], batch: _Batch) -> None:
        await asyncio.sleep(self._cfg.release_linger)
        if self._batches.get(key) is batch:
            self._send(key, batch)

    def _send(self, key: tuple[str, str], batch: _Batch) -> None:
        if self._batches.get(key) is batch:
            del self._batches[key]
        if batch.timer is not None and batch.timer is not asyncio.current_task():
            batch.timer.cancel()
        task = asyncio.create_task(self._call(key, batch), name="sink.release-call")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, key: tuple[str, str], batch: _Batch) -> None:
        org_id, group_id = key
        sns = [sn for sn, _ in batch.members]
        operation = (
            self._dps.reset_allocation if self._operation == "reset" else self._dps.delete_devices
        )
        result: tuple[list[str] | None, DpsError | None]
        try:
            done = await self._guarded(sns[0], None, lambda: operation(org_id, group_id, sns))
            result = (done, None)
        except DpsError as exc:
            result = (None, exc)
        except BaseException as exc:
            error = DpsTransient(None, f"the {self._operation} call was stopped: {exc!r}")
            for _, waiter in batch.members:
                if not waiter.done():
                    waiter.set_result((None, error))
            raise
        for _, waiter in batch.members:
            if not waiter.done():
                waiter.set_result(result)

    async def _released(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        deleted: _Deleted,
        target: _Target,
        action: Action,
        *,
        request_id: str | None = None,
    ) -> None:
        self.busy.add(source)
        release = Release(
            sn=target.sn,
            org_id=target.org_id,
            device_id=deleted.device_id,
            gateway_id=deleted.gateway_id,
            generation=deleted.generation,
            action=action,
            group_id=target.group_id,
            request_id=request_id,
            released_at=utc_now(),
            record=msgspec.Raw(record.value or b"null"),
        )
        await self._outcomes.released(release, source)

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        deleted: _Deleted | None,
        target: _Target,
        failed: _Failed,
    ) -> None:
        log.warning(
            "cannot %s the deleted child %s: %s", self._operation,
            deleted.device_id if deleted else "(unreadable)", failed.message,
            extra={"topic": record.topic, "partition": record.partition,
                   "offset": record.offset, "sn": target.sn},
        )  # fmt: skip
        self.busy.add(source)
        failure = AllocationFailure(
            sn=target.sn,
            org_id=target.org_id,
            device_id=deleted.device_id if deleted else None,
            gateway_id=deleted.gateway_id if deleted else None,
            event_id=deleted.event_id if deleted else None,
            attempts=0,
            error_kind=failed.kind,
            code=failed.code,
            msg=failed.message,
            request_id=failed.request_id,
            failed_at=utc_now(),
            operation=self._operation,
            record=embeddable(record.value),
        )
        await self._outcomes.release_failed(failure, source)
