"""The ingest worker: MQTT sessions in, one Kafka producer out.

It decides which sessions to hold (:func:`sessions_for`), owns the producer and the
pure :class:`~pipeline.core.landing.Lander` that decides what each message becomes, and
lands every message its sessions receive. Limits are learned from the topics whenever a
producer starts, so Kafka is never handed a record it would refuse; if it refuses one
anyway (a topic's limit lowered meanwhile), every session reconnects on a new producer
(aiokafka's idempotent producer is unusable after a refusal) with the limits learned
again, and the redelivered message is then dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import resource
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaError

from pipeline.config import listed_gateways
from pipeline.core.decode import service_label
from pipeline.core.landing import Lander, Landing
from pipeline.core.shards import share
from pipeline.errors import ConfigError
from pipeline.io import kafka, mqtt
from pipeline.io.aio import Backoff, Pacer, sleep_unless_stopped
from pipeline.ops import tracing
from pipeline.ops.metrics import INGEST_EVENTS, INGEST_INFLIGHT, INGEST_MESSAGES, UNEXPECTED_ERRORS
from pipeline.stages.ingest import sync
from pipeline.stages.ingest.session import Inbound, KafkaFailedError, Session

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import AIOKafkaProducer

    from pipeline.config import Config
    from pipeline.stages.runtime import Run

__all__ = ["Ingest", "ensure_descriptors", "sessions_for", "tune_collector"]

log = logging.getLogger(__name__)

_LANDED = INGEST_MESSAGES.labels("landed")
_DEAD = INGEST_MESSAGES.labels("dlq")
_SPARE_DESCRIPTORS = 64
"""Open files beyond the MQTT sockets: Kafka connections, the ops server, logs."""


def sessions_for(cfg: Config) -> list[tuple[mqtt.Identity, list[str]]]:
    """The sessions ingest holds: (identity, topic filters) each.

    - IoTDA device mode, many gateways (``mqtt.gateways_file``): one session per gateway,
      as that gateway, on its own down topic.
    - IoTDA device mode, one gateway (``[mqtt.iotda]``): one session, as it.
    - Broker mode with a gateway list: one session, one subscription per gateway.
    - Broker mode: one session on ``mqtt.topic``.

    Of a gateway list, only this replica's share (``mqtt.shard``) is held.
    """
    m = cfg.mqtt
    gateways = share(listed_gateways(m), m.shard)
    if m.iotda is not None and gateways:
        return [(mqtt.identity(m, g), [mqtt.subscription_topic(m, g.device_id)]) for g in gateways]
    who = mqtt.identity(m)
    if m.iotda is not None and m.iotda.device_id is not None:
        return [(who, [mqtt.subscription_topic(m, m.iotda.device_id)])]
    if gateways:
        return [(who, [mqtt.subscription_topic(m, g.device_id) for g in gateways])]
    return [(who, [mqtt.subscription_topic(m)])]


def ensure_descriptors(sessions: int) -> int:
    """Raise the soft open-file limit so ``sessions`` MQTT sockets fit; returns the limit.

    One descriptor per session, plus a margin for Kafka, the ops server and the like.
    Debian's default soft limit (1,024) stops a fleet of about a thousand gateways while
    the hard limit (often 524,288) allows far more, so lift the soft one as servers
    commonly do; when even the hard limit is too low, say so (the sessions beyond it
    would fail to connect, each with "Too many open files").
    """
    need = sessions + _SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    target = need if hard == resource.RLIM_INFINITY else min(hard, need)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning(
            "%d gateway sessions need about %d open files, and this process may open at "
            "most %d: raise its limit (LimitNOFILE=, ulimit -n) or split the gateways "
            "between replicas (mqtt.shard)",
            sessions, need, target,
        )  # fmt: skip
    return target


def tune_collector() -> None:
    """Never have the garbage collector traverse what start-up made: for an ingest process.

    Each message in flight (up to ``mqtt.max_inflight``) holds paho's and aiomqtt's
    message objects, its record's future and its own, so they outlive the youngest
    generation and reach the oldest, whose collections then traverse every object of the
    process: the modules, the clients, the configuration. ``gc.freeze()`` moves what
    start-up made out of the collector's sight (A/B in the bench's ingest round, 10,000
    messages, 3 rounds: 225 -> 206 CPU µs per message). Memory is still reclaimed by
    reference counting at once; only cycles among start-up's objects are never collected.

    Process-wide, so the command line calls it for a process that runs ingest, not the
    stage: a test process running ingest keeps its defaults.
    """
    gc.freeze()


_COUNT_EVERY = 1.0
"""Seconds between additions of the landed counts to the Prometheus counters."""


class _Counts:
    """Messages landed and the services in them, added to the Prometheus counters in bulk.

    A Prometheus increment takes a lock and checks its arguments: two or more per message
    cost ingest about 2 µs of its ~25 µs of own work per message. Counted here in plain
    ints, they reach ``pipeline_ingest_messages_total{outcome="landed"}`` and
    ``pipeline_ingest_events_total`` every :data:`_COUNT_EVERY` s and when ingest stops,
    so ``/metrics`` lags by at most that. With tracing on, the latest sampled trace of a
    landed message is the exemplar.
    """

    def __init__(self) -> None:
        self.landed = 0
        self.services: dict[tuple[str, str], int] = {}
        self.exemplar: dict[str, str] | None = None
        self._counters: dict[tuple[str, str], Any] = {}

    def add(self, landing: Landing) -> None:
        """One more message landed (``landing`` is its record)."""
        self.landed += 1
        if landing.event is not None:
            services = self.services
            for service in landing.event.services or ():
                label = service_label(service)
                services[label] = services.get(label, 0) + 1

    def flush(self) -> None:
        """Add what was counted since the last flush to the counters."""
        if self.landed:
            _LANDED.inc(self.landed, exemplar=self.exemplar)
            self.landed, self.exemplar = 0, None
        for label, n in self.services.items():
            counter = self._counters.get(label)
            if counter is None:
                counter = self._counters[label] = INGEST_EVENTS.labels(*label)
            counter.inc(n)
        self.services.clear()


def _nothing() -> None:
    """Where progress goes before ingest runs."""


def _refused(exc: BaseException) -> bool:
    """Kafka said no to this record for what it is, and would say it again."""
    return isinstance(exc, KafkaError) and not exc.retriable


class Ingest:
    """The ingest worker.

    Args:
        cfg: the whole configuration (``mqtt`` and ``kafka`` sections are used).
        retire: on stop, end the MQTT sessions instead of keeping them: stop new
            messages, land what the broker still holds for us, and have the broker drop
            the sessions (for a replica that is being removed).
    """

    name = "ingest"

    def __init__(self, cfg: Config, *, retire: bool = False) -> None:
        self.cfg = cfg
        self._topics = cfg.kafka.topics
        self._retire = retire
        self._lander = Lander(
            max_payload=cfg.mqtt.max_payload, max_record=cfg.kafka.max_record_size
        )
        self._producer: AIOKafkaProducer | None = None
        self._renew = asyncio.Event()
        self._counts = _Counts()
        self._sessions: list[Session] = []
        self._beat: Callable[[], None] = _nothing
        self._tracing = tracing.OFF

    def topics(self) -> list[str]:
        """Where it lands messages (and the sync requests it answers, if it does)."""
        t = self._topics
        extra = [t.sync_requests] if sync.enabled(self.cfg.mqtt) else []
        return [t.down_events, t.down_events_dlq, *extra]

    def needs_mqtt(self) -> bool:
        """It does: it starts once the broker answers."""
        return True

    def subscription(self) -> None:
        """It consumes nothing from Kafka."""

    def checks(self) -> list[str]:
        """``ingest.mqtt``: subscribed (with many gateway sessions: at least one is)."""
        return ["mqtt"]

    def busy(self) -> bool:
        """Messages wait for Kafka."""
        return any(s.pending for s in self._sessions)

    async def work(self, run: Run) -> None:
        """Land messages until stopping; each session reconnects by itself."""
        specs = sessions_for(self.cfg)
        ensure_descriptors(len(specs))
        pacer = Pacer(self.cfg.mqtt.connect_rate)
        self._sessions = [
            Session(
                self.cfg.mqtt, who, filters, sender=self, pacer=pacer, health=run.health,
                alone=len(specs) == 1,
            )
            for who, filters in specs
        ]  # fmt: skip
        self._beat = run.beat
        self._tracing = run.tracing
        INGEST_INFLIGHT.set_function(lambda: sum(s.pending for s in self._sessions))
        if len(specs) > 1:
            run.check("mqtt", False, f"0 of {len(specs)} gateway sessions connected")
        stop = asyncio.Event()
        run.stopping.add_done_callback(lambda _: stop.set())
        summary = asyncio.create_task(self._summarise(run, stop), name="ingest.sessions")
        counting = asyncio.create_task(self._count(stop), name="ingest.counts")
        syncs = None
        if sync.enabled(self.cfg.mqtt):
            requests = sync.SyncRequests(self.cfg, self._holder())
            syncs = asyncio.create_task(requests.run(stop), name="ingest.sync-requests")
            syncs.add_done_callback(lambda _: stop.set())  # it ends only when stopping, or failed
        try:
            while not stop.is_set():
                self._renew.clear()
                async with kafka.producer(self.cfg.kafka) as producer:
                    self._producer = producer
                    if not await self._learn_limits(stop):
                        continue
                    await self._run_sessions(stop)
        finally:
            for task in (summary, counting):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._counts.flush()
            if syncs is not None:
                stop.set()  # (when the sessions failed, nothing else has set it)
                await syncs  # what made it fail, if it did

    def _holder(self) -> Callable[[str], Session | None]:
        """Which session holds a gateway, or None.

        In IoTDA device mode each session is a gateway's own; through a broker the one
        session holds this replica's listed gateways, or any gateway when none is listed.
        """
        if self.cfg.mqtt.iotda is not None and all(s.who.name != "ingest" for s in self._sessions):
            by_gateway = {s.who.name: s for s in self._sessions}
            return by_gateway.get
        [session] = self._sessions
        listed = share(listed_gateways(self.cfg.mqtt), self.cfg.mqtt.shard)
        if not listed:
            return lambda _: session
        held = {g.device_id for g in listed}
        return lambda gateway: session if gateway in held else None

    async def _run_sessions(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                for session in self._sessions:
                    tasks.create_task(
                        session.run(stop, retire=self._retire, abandon=self._renew),
                        name=f"ingest[{session.who.name}]",
                    )
        except* ConfigError as group:
            raise group.exceptions[0] from None  # one line for the operator, not a group

    async def _learn_limits(self, stop: asyncio.Event) -> bool:
        """The biggest record the topics take; False if stopped before Kafka answered."""
        topics = [self._topics.down_events, self._topics.down_events_dlq]
        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            try:
                limit = await kafka.record_limit(self.cfg.kafka, topics)
            except KafkaError as exc:
                delay = backoff.next()
                log.warning(
                    "cannot read the topics' record limits (%s); again in %.1f s", exc, delay
                )
                await sleep_unless_stopped(stop, delay)
                continue
            if limit < self.cfg.mqtt.max_payload + 4096:
                log.warning(
                    "Kafka takes records of at most %d bytes on %s: events above about that "
                    "size will be dead-lettered (raise the topics' max.message.bytes)",
                    limit,
                    " and ".join(topics),
                )
            self._lander = Lander(max_payload=self.cfg.mqtt.max_payload, max_record=limit)
            return True
        return False

    async def _count(self, stop: asyncio.Event) -> None:
        """Bring the counters up to date every :data:`_COUNT_EVERY` s."""
        while not stop.is_set():
            await sleep_unless_stopped(stop, _COUNT_EVERY)
            self._counts.flush()

    async def _summarise(self, run: Run, stop: asyncio.Event) -> None:
        """With many sessions: ``ingest.mqtt`` is ready while at least one is connected."""
        if len(self._sessions) == 1:
            return
        while not stop.is_set():
            up = sum(s.connected for s in self._sessions)
            total = len(self._sessions)
            detail = None if up == total else f"{up} of {total} gateway sessions connected"
            run.check("mqtt", up > 0, detail)
            await sleep_unless_stopped(stop, 1.0)

    async def send(self, inbound: Inbound) -> None:
        """Land one message: hand its record to the producer; the session hears back.

        The record continues the message's trace (``traceparent``), or starts one.
        """
        producer = self._producer
        assert producer is not None  # noqa: S101  (run() sets it before sessions start)
        with self._tracing.receive(inbound.topic, inbound.properties) as hop:
            landing = self._landing(inbound)
            hop.describe(gateway_id=landing.gateway)
            if landing.reason is not None:
                hop.fail(landing.reason)
            topic = self._topics.down_events_dlq if landing.dead else self._topics.down_events
            out = hop.send(topic, landing.key)
            headers = landing.headers + out.headers if landing.headers else out.headers
            try:
                future = await producer.send(topic, landing.value, key=landing.key, headers=headers)
            except KafkaError as exc:
                out.sent(error=exc)
                if _refused(exc):
                    self._renew.set()
                raise KafkaFailedError(str(exc)) from exc
            out.watch(future)
            future.add_done_callback(functools.partial(self._landed, inbound, landing))

    def _landing(self, inbound: Inbound) -> Landing:
        try:
            return self._lander.land(inbound.topic, inbound.payload, inbound.received_at)
        except Exception as exc:
            # A bug must not stop the stage, nor hold the message hostage: dead-letter it.
            UNEXPECTED_ERRORS.labels("ingest").inc()
            log.exception("unexpected error handling a message on %s", inbound.topic)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            return self._lander.dead_letter(
                inbound.topic, inbound.payload, inbound.received_at, reason
            )

    def _landed(self, inbound: Inbound, landing: Landing, future: asyncio.Future[object]) -> None:
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        if exc is None:
            self._counted(landing)
            self._beat()
        elif _refused(exc):
            # Nothing more from this producer can be trusted: renew it, learn the limits.
            self._renew.set()
        inbound.session.landed(inbound, exc)

    def _counted(self, landing: Landing) -> None:
        if landing.dead:
            _DEAD.inc(exemplar=tracing.exemplar())
            log.warning(
                "dead-lettered a message from %s: %s",
                landing.gateway or "an unknown topic",
                landing.reason,
                extra={"gateway": landing.gateway},
            )
            return
        self._counts.add(landing)
        if self._tracing.enabled and (exemplar := tracing.exemplar()) is not None:
            self._counts.exemplar = exemplar
