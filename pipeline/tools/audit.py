"""``pipeline audit``: did every child in a time window get exactly one outcome?

Read from the topics alone, with time-indexed seeks (:func:`pipeline.io.kafka.since`) and
:func:`pipeline.io.kafka.read_range`, in three passes; the bookkeeping is
:mod:`pipeline.core.audit` (what counts as an outcome, and why):

1. ``added``, ``deleted`` and ``failed`` from ``since`` (less :data:`SKEW`) to their end
   now: the children in the window (record time ``since <= t < until``), the DLQ records
   a redrive put back (``redriven-from``), and what the router wrote per event.
2. ``dps.allocations``, ``dps.releases`` and ``dps.allocations.dlq`` from ``since`` less
   :data:`SKEW` to their end: each outcome finds its child by its ``source`` header.
3. ``iotda.down-events`` in the window: each ``add_sub_device_response`` should have its
   successful children in ``added`` and its failed ones in ``failed``. A successful child
   the router skipped because it was already added (by an earlier event) is found in the
   lifecycle topic, read only when something is missing.

Then the gaps' details (device id, age, trace id) are read back for the gaps listed.
Memory stays bounded: a few bytes per child (:mod:`pipeline.core.audit`), plus the
consumer's fetch buffers.

The exit code: 0 when the promise holds, 1 when it does not (a child without an outcome
or with more than one, an event not routed); 2 for bad input, as for every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Literal

import msgspec
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.core.audit import (
    DETAIL_KINDS,
    Gap,
    Hashes,
    Ledger,
    Origins,
    Report,
    Verdict,
    child_key,
    failed_key,
    older_first,
    unrouted,
)
from pipeline.core.routing import route
from pipeline.core.tracecontext import TRACEPARENT, trace_id
from pipeline.errors import ConfigError, DecodeError
from pipeline.io import kafka
from pipeline.ops.metrics import write_audit_metrics
from pipeline.schemas import format_ms, format_time
from pipeline.stages.sink.outcomes import SOURCE, parse_source
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path
    from typing import IO

    from aiokafka import AIOKafkaConsumer, ConsumerRecord

    from pipeline.config import Config

__all__ = ["GAPS", "LIMIT", "SKEW", "Only", "audit", "check", "show", "summary"]

log = logging.getLogger(__name__)

Only = Literal["routing", "outcomes"]

GAPS = 1
"""The exit code when the promise does not hold."""
LIMIT = 100
"""Findings listed of each kind, at most (all are counted)."""
SKEW = dt.timedelta(minutes=1)
"""How much earlier than ``since`` the follow-up topics are read: an outcome (or the
router's record) written by a host whose clock is behind can carry a time before its
child's."""
REDRIVEN_FROM = "redriven-from"
_PROGRESS_STEP = 5000
_AT_A_TIME = 2000
"""Records taken from the consumer at a time: few decoded records held at once."""
_FETCH_BYTES = 8 * 1024 * 1024
"""The reader's ``fetch_max_bytes``: what one fetch brings of all partitions together
(Kafka still returns a larger record whole)."""


class _Id(msgspec.Struct):
    device_id: str


class _Added(msgspec.Struct):
    gateway_id: str
    device: _Id


class _Node(msgspec.Struct):
    node_id: str


class _Failed(msgspec.Struct):
    gateway_id: str
    reason: _Node
    event_id: str | None = None


class _Kind(msgspec.Struct):
    error_kind: str = ""


class _State(msgspec.Struct):
    gateway_id: str
    device_id: str


_ADDED = msgspec.json.Decoder(_Added)
_FAILED = msgspec.json.Decoder(_Failed)
_KIND = msgspec.json.Decoder(_Kind)
_STATE = msgspec.json.Decoder(_State)
_DECODING = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None


class _Progress:
    """A progress bar on a terminal (stderr): offsets read of the offsets to read."""

    def __init__(self, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self._console = make_console(file=stream or sys.stderr)
        self._enabled = enabled and self._console.is_terminal
        self._bar: Progress | None = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[_Progress]:
        if not self._enabled:
            yield self
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self._console, transient=False) as bar:
            self._bar = bar
            yield self

    @contextlib.asynccontextmanager
    async def reading(
        self, client: AIOKafkaConsumer, ranges: kafka.Ranges, what: str
    ) -> AsyncIterator[AsyncIterator[ConsumerRecord[bytes, bytes]]]:
        """:func:`kafka.read_range` over ``ranges``, counted on a bar named ``what``."""
        bar = self._bar
        total = sum(max(0, end - start) for start, end in ranges.values())
        task = bar.add_task(f"audit: {what}", total=total) if bar is not None else None

        async def records() -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
            n = 0
            reading = kafka.read_range(client, ranges, max_records=_AT_A_TIME)
            async with contextlib.aclosing(reading) as stream:
                async for record in stream:
                    yield record
                    n += 1
                    if bar is not None and task is not None and n % _PROGRESS_STEP == 0:
                        bar.update(task, completed=n)
            if bar is not None and task is not None:
                bar.update(task, completed=total)

        yield records()


class _Window:
    def __init__(self, since: dt.datetime, until: dt.datetime | None) -> None:
        self.since_ms = int(since.timestamp() * 1000)
        self.until_ms = None if until is None else int(until.timestamp() * 1000)
        self.early_ms = self.since_ms - int(SKEW.total_seconds() * 1000)

    def holds(self, ms: int) -> bool:
        return ms >= self.since_ms and (self.until_ms is None or ms < self.until_ms)


class _Audit:
    """One run's state: the ledgers, the redriven origins and the routing hashes."""

    def __init__(self, cfg: Config, window: _Window, now_ms: int, limit: int) -> None:
        topics = cfg.kafka.topics
        self.topics = topics
        self.window = window
        self.now_ms = now_ms
        self.limit = limit
        self.added = Ledger(topics.added)
        self.deleted = Ledger(topics.deleted)
        self.origins = Origins(topics.allocations_dlq)
        self.routed = Hashes()
        self.failures = Hashes()
        self.events = 0
        self.unreadable = 0
        self.suspects: list[
            tuple[ConsumerRecord[bytes, bytes], str, str | None, list[str], list[str]]
        ] = []

    def _skip(self, record: ConsumerRecord[bytes, bytes], exc: Exception) -> None:
        self.unreadable += 1
        where = f"{record.topic}/{record.partition}/{record.offset}"
        log.warning("audit: skipping the record at %s: %s", where, exc)

    # -- pass 1 ----------------------------------------------------------------------

    def child(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A record of ``added``, ``deleted`` or ``failed``."""
        if record.topic == self.topics.added:
            self._added(record)
        elif record.topic == self.topics.deleted:
            if self.window.holds(record.timestamp):
                self.deleted.add(record.partition, record.offset)
        elif record.value is not None:  # failed
            try:
                failed = _FAILED.decode(record.value)
            except _DECODING as exc:
                self._skip(record, exc)
            else:
                key = failed_key(failed.gateway_id, failed.event_id, failed.reason.node_id)
                self.failures.add(key)

    def _added(self, record: ConsumerRecord[bytes, bytes]) -> None:
        origin = _header(record, REDRIVEN_FROM)
        where = parse_source(origin) if origin is not None else None
        if where is not None and where[0] == self.origins.topic:
            self.origins.add(where[1], where[2])
        if self.window.holds(record.timestamp):
            self.added.add(record.partition, record.offset)
        if record.value is None:
            return
        try:
            added = _ADDED.decode(record.value)
        except _DECODING as exc:
            self._skip(record, exc)
        else:
            self.routed.add(child_key(added.gateway_id, added.device.device_id))

    # -- pass 2 ----------------------------------------------------------------------

    def _ledger(self, topic: str) -> Ledger | None:
        return {self.added.topic: self.added, self.deleted.topic: self.deleted}.get(topic)

    def outcome(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A record of ``dps.allocations``, ``dps.releases`` or ``dps.allocations.dlq``."""
        header = _header(record, SOURCE)
        source = parse_source(header) if header is not None else None
        if source is None:
            return
        ledger = self._ledger(source[0])
        if ledger is None:
            return
        if record.topic != self.topics.allocations_dlq:
            ledger.allocated(source[1], source[2])
            return
        redriven = self.origins.redriven(record.partition, record.offset)
        kind = ""
        if record.value is not None:
            with contextlib.suppress(*_DECODING):
                kind = _KIND.decode(record.value).error_kind
        ledger.dead_lettered(source[1], source[2], redriven=redriven, waiting=kind != "superseded")

    # -- pass 3 ----------------------------------------------------------------------

    def event(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """A record of ``iotda.down-events``."""
        if not self.window.holds(record.timestamp) or record.value is None:
            return
        try:
            routed = route(record.value)
        except DecodeError:
            return  # the router dead-letters it: not an event with children
        for event in routed.events:
            if event.source_event != "add_sub_device_response":
                continue
            self.events += 1
            nodes = [key.decode() for key, _ in event.failed]
            lost, also = unrouted(
                routed.gateway_id,
                event.event_id,
                [device_id for device_id, _ in event.children],
                nodes,
                added=self.routed,
                failures=self.failures,
            )
            if lost or also:
                self.suspects.append((record, routed.gateway_id, event.event_id, lost, also))

    def known(self, states: Hashes) -> list[Gap]:
        """The events still not routed once children the router knew already are set aside."""
        gaps = []
        for record, gateway, event_id, lost, also in self.suspects:
            missing = [d for d in lost if child_key(gateway, d) not in states]
            if not missing and not also:
                continue
            parts = []
            if missing:
                parts.append(f"not in added: {', '.join(missing)}")
            if also:
                parts.append(f"not in failed: {', '.join(also)}")
            gaps.append(
                Gap(
                    kind="unrouted",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    key=gateway,
                    at=format_ms(record.timestamp),
                    waiting_s=max(0.0, (self.now_ms - record.timestamp) / 1000),
                    trace_id=trace_id(_header(record, TRACEPARENT)) or "-",
                    detail=f"event {event_id}: {'; '.join(parts)}",
                )
            )
        return gaps


async def _states(client: AIOKafkaConsumer, cfg: Config, audit: _Audit) -> Hashes:
    """Every (gateway, child) the lifecycle topic knows, as routing hashes."""
    states = Hashes()
    if audit.suspects:
        wanted = {child_key(gateway, d) for _, gateway, _, lost, _ in audit.suspects for d in lost}
        ranges = await kafka.whole(client, cfg.kafka.topics.lifecycle)
        async for record in kafka.read_range(client, ranges):
            if record.value is None:
                continue
            try:
                state = _STATE.decode(record.value)
            except _DECODING:
                continue
            key = child_key(state.gateway_id, state.device_id)
            if key in wanted:
                states.add(key)
    states.seal()
    return states


async def _details(
    client: AIOKafkaConsumer, audit: _Audit, ledger: Ledger, counts: Counter[str]
) -> list[Gap]:
    """Count the ledger's verdicts and read back the first ones of each partition."""
    keep: dict[int, dict[int, Verdict]] = {}
    per: Counter[tuple[str, int]] = Counter()
    for verdict in ledger.verdicts():
        counts[verdict.kind] += 1
        if per[verdict.kind, verdict.partition] < audit.limit:
            per[verdict.kind, verdict.partition] += 1
            keep.setdefault(verdict.partition, {})[verdict.offset] = verdict
    if not keep:
        return []
    from aiokafka import TopicPartition  # noqa: PLC0415 - only when there are gaps

    ranges: kafka.Ranges = {
        TopicPartition(ledger.topic, p): (min(found), max(found) + 1) for p, found in keep.items()
    }
    gaps = []
    async for record in kafka.read_range(client, ranges):
        found = keep.get(record.partition, {}).get(record.offset)
        if found is None:
            continue
        verdict = found
        waited = None
        if verdict.kind == "missing":
            waited = max(0.0, (audit.now_ms - record.timestamp) / 1000)
        gaps.append(
            Gap(
                kind=verdict.kind,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key.decode(errors="replace") if record.key else "-",
                at=format_ms(record.timestamp),
                waiting_s=waited,
                trace_id=trace_id(_header(record, TRACEPARENT)) or "-",
                detail=verdict.detail,
            )
        )
    return gaps


async def check(
    cfg: Config,
    *,
    since: dt.datetime,
    until: dt.datetime | None = None,
    limit: int = LIMIT,
    progress: bool = True,
    now: dt.datetime | None = None,
    only: Only | None = None,
) -> Report:
    """Audit the window ``[since, until)``; the report.

    ``only``: ``routing`` checks the events alone (no sink running), ``outcomes`` the
    children's outcomes alone.

    Raises:
        ConfigError: the added topic does not exist.
    """
    moment = now or dt.datetime.now(dt.UTC)
    window = _Window(since, until)
    audit = _Audit(cfg, window, int(moment.timestamp() * 1000), limit)
    topics = cfg.kafka.topics
    bar = _Progress(enabled=progress)
    async with kafka.reader(cfg.kafka, fetch_max_bytes=_FETCH_BYTES) as client:
        with bar.shown():
            # One time-indexed seek for every topic: the first offsets request for a
            # topic the reader never read waits for its metadata (seconds, once).
            follow = (topics.allocations, topics.releases, topics.allocations_dlq)
            tps = await kafka.partitions(
                client,
                topics.added,
                topics.deleted,
                topics.failed,
                *follow,
                topics.down_events,
            )
            everything = await kafka.window(client, tps, max(0, window.early_ms))

            def of(*names: str) -> kafka.Ranges:
                return {tp: r for tp, r in everything.items() if tp.topic in names}

            children = of(topics.added, topics.deleted, topics.failed)
            if not any(tp.topic == topics.added for tp in children):
                reason = f"topic {topics.added} does not exist (pipeline topics create)"
                raise ConfigError.at("kafka.topics.added", reason)
            clock = time.monotonic()
            async with bar.reading(client, children, "children") as records:
                async for record in records:
                    audit.child(record)
            log.debug("audit: children read in %.2f s", time.monotonic() - clock)
            audit.origins.seal()
            audit.routed.seal()
            audit.failures.seal()
            if only != "routing":
                outcomes = of(*follow)
                clock = time.monotonic()
                async with bar.reading(client, outcomes, "outcomes") as records:
                    async for record in records:
                        audit.outcome(record)
                log.debug("audit: outcomes read in %.2f s", time.monotonic() - clock)
            if only != "outcomes":
                events = of(topics.down_events)  # from since less SKEW: filtered by time
                clock = time.monotonic()
                async with bar.reading(client, events, "events") as records:
                    async for record in records:
                        audit.event(record)
                log.debug("audit: events read in %.2f s", time.monotonic() - clock)
        counts: Counter[str] = Counter()
        gaps: list[Gap] = []
        if only != "routing":
            gaps += await _details(client, audit, audit.added, counts)
            gaps += await _details(client, audit, audit.deleted, counts)
        gaps += audit.known(await _states(client, cfg, audit))
    counts["unrouted"] = sum(g.kind == "unrouted" for g in gaps)
    missing = [g.waiting_s or 0.0 for g in gaps if g.kind == "missing"]
    return Report(
        since=format_time(since),
        until=None if until is None else format_time(until),
        children=len(audit.added),
        deleted=len(audit.deleted),
        events=audit.events,
        counts={kind: counts[kind] for kind in DETAIL_KINDS},
        oldest_missing_s=round(max(missing, default=0.0), 3),
        gaps=older_first(gaps, limit),
        limit=limit,
        unreadable=audit.unreadable,
    )


# -- The command -------------------------------------------------------------------------


def _table(report: Report) -> Table:
    table = Table(title="audit: children without exactly one outcome, events not routed")
    for column in ("kind", "child / gateway", "at", "waiting", "topic/partition/offset"):
        table.add_column(column)
    table.add_column("trace id")
    table.add_column("detail")
    for g in report.gaps:
        kind = g.kind if g.kind == "dead-lettered" else f"[red]{g.kind}[/red]"
        table.add_row(
            kind,
            escape(g.key),
            escape(g.at or "-"),
            "-" if g.waiting_s is None else f"{g.waiting_s:.0f} s",
            escape(f"{g.topic}/{g.partition}/{g.offset}"),
            g.trace_id,
            escape(g.detail),
        )
    return table


def summary(report: Report) -> str:
    """One line: what was audited and what was found."""
    window = f"since {report.since}" + (f" until {report.until}" if report.until else "")
    found = ", ".join(f"{report.counts[k]} {k}" for k in DETAIL_KINDS)
    verdict = "the promise holds" if report.holds else "the promise does not hold"
    oldest = (
        f"; the oldest without an outcome has waited {report.oldest_missing_s:.0f} s"
        if report.counts["missing"]
        else ""
    )
    return (
        f"{report.children} added and {report.deleted} deleted children and "
        f"{report.events} add responses {window}: {found}{oldest}: {verdict}"
    )


def show(report: Report, stream: IO[str], *, as_json: bool = False) -> None:
    """The findings as a table and the summary line, or one JSON document."""
    if as_json:
        document = msgspec.to_builtins(report) | {"holds": report.holds}
        stream.write(msgspec.json.encode(document).decode() + "\n")
        return
    console = make_console(file=stream)
    if report.gaps:
        console.print(_table(report))
    console.print(escape(summary(report)))


async def audit(
    cfg: Config,
    *,
    since: dt.datetime,
    until: dt.datetime | None = None,
    limit: int = LIMIT,
    as_json: bool = False,
    prometheus: Path | None = None,
    progress: bool = True,
    only: Only | None = None,
    out: IO[str] | None = None,
) -> int:
    """Audit, print, write the metrics if asked; returns the exit code (0 or :data:`GAPS`)."""
    stream = out or sys.stdout
    started = time.monotonic()
    report = await check(cfg, since=since, until=until, limit=limit, progress=progress, only=only)
    elapsed = time.monotonic() - started
    log.info("audit: %s in %.1f s", summary(report), elapsed)
    if prometheus is not None:
        window = (until or dt.datetime.now(dt.UTC)) - since
        await asyncio.to_thread(
            write_audit_metrics,
            prometheus,
            children=report.children,
            deleted=report.deleted,
            events=report.events,
            counts=report.counts,
            oldest_missing_s=report.oldest_missing_s,
            holds=report.holds,
            window_s=window.total_seconds(),
            duration_s=elapsed,
        )
    show(report, stream, as_json=as_json)
    if report.unreadable:
        log.warning("audit: %d records could not be read (not counted)", report.unreadable)
    return 0 if report.holds else GAPS
