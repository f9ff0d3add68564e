"""What the runtime watches while a stage runs: Kafka, rebalance callbacks, lag."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener

from pipeline.errors import StageFailed
from pipeline.io.kafka.clients import admin

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from pipeline.config import KafkaConfig

__all__ = ["Liveness", "Rebalance", "watch_lag"]

log = logging.getLogger(__package__)  # the package's one logger: pipeline.io.kafka


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
        async with contextlib.AsyncExitStack() as stack:
            while True:
                self._report(await self._check(stack))
                await asyncio.sleep(self._interval)

    async def _check(self, stack: contextlib.AsyncExitStack) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                client = await self._admin(stack)
                await client.describe_cluster()
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:  # any failure to answer is the same news: not reachable
            return str(exc) or type(exc).__name__
        return None

    async def _admin(self, stack: contextlib.AsyncExitStack) -> AIOKafkaAdminClient:
        """The admin client the checks use, opened the first time (it stays in ``stack``)."""
        if self._client is None:
            client = admin(self._cfg, request_timeout_ms=int(self._timeout * 1000))
            self._client = await stack.enter_async_context(client)
        return self._client

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
