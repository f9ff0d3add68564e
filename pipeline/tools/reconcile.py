"""``pipeline reconcile``: does DPS hold what the topics say it should?

1. What should hold: the compacted lifecycle topic (``kafka.topics.lifecycle``), read to
   its end now (read committed), the latest :class:`~pipeline.schemas.ChildState` of
   each child (the last record of its key). With ``since``, only the children whose
   latest change (``changed_at``) is at or after it: a child added before the window and
   deleted within it is compared as deleted; one whose last change is older is not
   compared at all. Each child's sn and orgId are what the sink computes
   (:func:`pipeline.core.reconcile.expect`).
2. What DPS holds, for those sns: ``get`` asks Get DPS Device once per sn (exact: it sees
   an sn allocated in any orgId); ``search`` asks Search DPS Device for
   ``sn in (...)``, up to :data:`SEARCH_BATCH` sns a call, in the orgId the mapping says
   (fewer calls; if DPS filtered a search by orgId, an sn allocated in another one would
   read as missing, so check such findings with ``get``); ``auto`` uses ``get`` for up to
   :data:`AUTO_GET_MAX` sns, else ``search``. Every call waits its turn at the sink's
   :class:`~pipeline.stages.sink.limiter.RateLimiter` (``sink.rate_limit``, lowered by
   itself under HTTP 429), at most ``sink.concurrency`` in flight; transient failures
   are retried with backoff, :data:`ATTEMPTS` times at most, then the run fails (exit 1).
3. The findings (:mod:`pipeline.core.reconcile`), as a table or JSON.
4. ``redrive``: every ``missing`` child goes back on the added topic as the
   :class:`~pipeline.schemas.AddedChild` it was (source_event ``reconcile``, its latest
   generation, its DeviceInfo), all in one Kafka transaction: the sink (read committed)
   sees all of them or, if the run dies or is fenced by another, none, so running it
   again never doubles a child that a first run put back.

The exit code: 0 when everything agrees, 3 when something counted differs (the
``--redrive`` run too: it reports what it found), 1 and 2 as for every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from pipeline.core.mapping import Mapper
from pipeline.core.reconcile import Expected, Finding, Seen, added_record, expect, judge, within
from pipeline.dps.client import DpsClient
from pipeline.dps.protocol import is_allocated
from pipeline.errors import ConfigError, DpsRejected, DpsTransient
from pipeline.io import kafka
from pipeline.io.aio import Backoff
from pipeline.schemas import ChildState, PvsDevice, utc_now
from pipeline.stages.sink.limiter import RateLimiter
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from typing import IO

    from pipeline.config import Config

__all__ = [
    "ATTEMPTS",
    "AUTO_GET_MAX",
    "DIFFERENCES",
    "SEARCH_BATCH",
    "Report",
    "check",
    "put_back",
    "reconcile",
    "summary",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Method = Literal["auto", "get", "search"]

DIFFERENCES = 3
"""The exit code when something counted differs."""
SEARCH_BATCH = 1000
"""Sns in one Search DPS Device call: DPS's largest page."""
AUTO_GET_MAX = 100
"""``auto`` asks Get DPS Device per sn for up to this many sns, else searches."""
ATTEMPTS = 8
"""Tries of one DPS call that keeps failing transiently before the run fails."""

_STATE = msgspec.json.Decoder(ChildState)
_encode = msgspec.json.Encoder().encode


class Report(msgspec.Struct, kw_only=True):
    """What a run compared and found."""

    method: Literal["get", "search"]
    since: str | None
    children: int
    """Children compared (their latest change in the window)."""
    added: int
    deleted: int
    sns: int
    """Distinct (orgId, sn) looked up in DPS."""
    dps_calls: int
    differences: int
    """Findings that count (exit 3 when any)."""
    findings: list[Finding]
    unreadable: int = 0
    """Lifecycle records that are not a ChildState (skipped, each logged)."""
    redriven: list[str] = msgspec.field(default_factory=list)
    """Device ids put back on the added topic."""


# -- What should hold --------------------------------------------------------------------


async def read_states(cfg: Config, since: dt.datetime | None) -> tuple[list[ChildState], int]:
    """The latest state of each child in the window, and how many records were unreadable.

    Raises:
        ConfigError: the lifecycle topic does not exist.
    """
    topic = cfg.kafka.topics.lifecycle
    latest: dict[bytes, tuple[ChildState, int]] = {}
    unreadable = 0
    async with kafka.reader(cfg.kafka) as reader:
        ranges = await kafka.whole(reader, topic)
        if not ranges:
            reason = f"topic {topic} does not exist (the router writes it: pipeline topics create)"
            raise ConfigError.at("kafka.topics.lifecycle", reason)
        async for record in kafka.read_range(reader, ranges):
            if record.key is None:
                continue
            if record.value is None:  # a tombstone: the child is forgotten
                latest.pop(record.key, None)
                continue
            try:
                state = _STATE.decode(record.value)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                unreadable += 1
                where = f"{record.topic}/{record.partition}/{record.offset}"
                log.warning("skipping the lifecycle record at %s: %s", where, exc)
                continue
            latest[record.key] = (state, record.timestamp)
    states = [s for s, ts in latest.values() if since is None or within(s, since, ts)]
    return sorted(states, key=lambda s: s.device_id), unreadable


# -- What DPS holds ----------------------------------------------------------------------


def _seen(device: PvsDevice) -> Seen:
    status = device.allocate_status
    if status is None and device.status is not None:
        status = device.status.current_status
    return Seen(allocated=is_allocated(device), status=status or "?", org_id=device.org_id)


class _Progress:
    """A progress bar on a terminal (stderr), else a plain line at each tenth done."""

    def __init__(self, total: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self._total = total
        self._done = 0
        self._enabled = enabled and total > 0
        self._stream = stream or sys.stderr
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._shown = 0

    @contextlib.contextmanager
    def shown(self) -> Iterator[_Progress]:
        console = make_console(file=self._stream)
        if self._enabled and console.is_terminal:
            columns = (
                TextColumn("reconcile"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console) as bar:
                self._bar = bar
                self._task = bar.add_task("reconcile", total=self._total)
                yield self
            return
        yield self

    def advance(self, count: int = 1) -> None:
        self._done += count
        if not self._enabled:
            return
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, count)
            return
        tenth = self._done * 10 // self._total
        if tenth > self._shown:
            self._shown = tenth
            print(f"reconcile: {self._done}/{self._total} sns looked up", file=self._stream)


class _Lookup:
    """DPS calls at the sink's pace: the limiter, a bound on calls in flight, retries."""

    def __init__(self, cfg: Config, dps: DpsClient, *, rate: float | None) -> None:
        self._cfg = cfg.sink
        self._dps = dps
        self.limiter = RateLimiter(rate)
        self.calls = 0

    async def call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        """``request()`` at its turn; retried while DPS fails transiently.

        Raises:
            DpsTransient: still failing after :data:`ATTEMPTS` tries, or at once when only
                the operator can cure it (credentials, ``base_url``: it has a hint).
            DpsRejected: DPS refused it.
        """
        backoff = Backoff(self._cfg.retry_initial, self._cfg.retry_max)
        attempt = 0
        while True:
            attempt += 1
            taken_at = await self.limiter.wait()
            self.calls += 1
            try:
                result = await request()
            except DpsTransient as exc:
                if exc.throttled:
                    self.limiter.throttled(taken_at)
                if exc.hint is not None or attempt >= ATTEMPTS:
                    raise
                delay = backoff.next(exc.retry_after)
                log.debug("%s: %s; again in %.2f s", what, exc, delay)
                await asyncio.sleep(delay)
                continue
            except DpsRejected:
                self.limiter.succeeded()  # DPS answered: it judged the request
                raise
            self.limiter.succeeded()
            return result


async def _workers(count: int, jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs``, at most ``count`` at a time (a pool: no task per job waiting)."""
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:
            await job()

    async with asyncio.TaskGroup() as group:
        for n in range(min(count, len(jobs))):
            group.create_task(worker(), name=f"reconcile-lookup-{n}")


async def _by_get(
    lookup: _Lookup,
    dps: DpsClient,
    wanted: list[tuple[str, str]],
    concurrency: int,
    progress: _Progress,
) -> tuple[dict[tuple[str, str], Seen | None], dict[tuple[str, str], str]]:
    seen: dict[tuple[str, str], Seen | None] = {}
    refused: dict[tuple[str, str], str] = {}

    def job(org_id: str, sn: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                device = await lookup.call(f"get {sn}", lambda: dps.get_device(org_id, sn))
            except DpsRejected as exc:
                refused[org_id, sn] = str(exc)
            else:
                seen[org_id, sn] = None if device is None else _seen(device)
            progress.advance()

        return run

    await _workers(concurrency, [job(org, sn) for org, sn in wanted])
    return seen, refused


async def _by_search(
    lookup: _Lookup,
    dps: DpsClient,
    wanted: list[tuple[str, str]],
    concurrency: int,
    progress: _Progress,
    *,
    batch: int,
) -> tuple[dict[tuple[str, str], Seen | None], dict[tuple[str, str], str]]:
    seen: dict[tuple[str, str], Seen | None] = {}
    refused: dict[tuple[str, str], str] = {}
    by_org: dict[str, list[str]] = {}
    quoted: list[tuple[str, str]] = []
    for org_id, sn in wanted:
        if "'" in sn:  # a search expression cannot carry it (no escape is documented)
            quoted.append((org_id, sn))
        else:
            by_org.setdefault(org_id, []).append(sn)

    def job(org_id: str, sns: list[str]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            found: dict[str, PvsDevice] = {}
            page: int | None = 1
            try:
                while page is not None:
                    answer = await lookup.call(
                        f"search {len(sns)} sns page {page}",
                        functools.partial(
                            dps.search_devices, org_id, sns=sns, page=page, page_size=len(sns)
                        ),
                    )
                    found |= {device.sn: device for device in answer.devices}
                    page = answer.next_page
            except DpsRejected as exc:
                refused.update(dict.fromkeys(((org_id, sn) for sn in sns), str(exc)))
            else:
                for sn in sns:
                    device = found.get(sn)
                    seen[org_id, sn] = None if device is None else _seen(device)
            progress.advance(len(sns))

        return run

    jobs = [
        job(org_id, sns[i : i + batch])
        for org_id, sns in by_org.items()
        for i in range(0, len(sns), batch)
    ]
    await _workers(concurrency, jobs)
    if quoted:
        more, also = await _by_get(lookup, dps, quoted, concurrency, progress)
        seen |= more
        refused |= also
    return seen, refused


async def check(
    cfg: Config,
    *,
    since: dt.datetime | None = None,
    method: Method = "auto",
    rate: float | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    batch: int = SEARCH_BATCH,
) -> tuple[Report, list[Expected]]:
    """Compare the lifecycle topic with DPS; the report, and every child compared.

    Args:
        cfg: the configuration (``kafka``, and ``sink`` for the mapping, DPS and pace).
        since: only children whose latest change is at or after this.
        method: ``get``, ``search`` or ``auto``.
        rate: DPS calls per second, at most (default ``sink.rate_limit``).
        concurrency: DPS calls in flight, at most (default ``sink.concurrency``).
        progress: show progress on stderr.
        batch: sns a search call, at most (:data:`SEARCH_BATCH`).
    """
    s = cfg.sink
    mapper = Mapper(
        sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
        device_data=s.device_data,
    )  # fmt: skip
    states, unreadable = await read_states(cfg, since)
    children = [expect(state, mapper) for state in states]
    wanted = list(
        dict.fromkeys((c.org_id, c.sn) for c in children if c.sn is not None and c.org_id)
    )
    chosen: Literal["get", "search"] = method if method != "auto" else "get"
    if method == "auto" and len(wanted) > AUTO_GET_MAX:
        chosen = "search"
    in_flight = concurrency or s.concurrency
    batch = max(1, min(batch, SEARCH_BATCH))
    async with DpsClient(s.dps, pool_size=in_flight) as dps:
        lookup = _Lookup(cfg, dps, rate=rate if rate is not None else s.rate_limit)
        with _Progress(len(wanted), enabled=progress).shown() as shown:
            if chosen == "get":
                seen, refused = await _by_get(lookup, dps, wanted, in_flight, shown)
            else:
                seen, refused = await _by_search(lookup, dps, wanted, in_flight, shown, batch=batch)
    findings = []
    for child in children:
        key = (child.org_id or "", child.sn or "")
        found = judge(child, seen.get(key), on_delete=s.on_delete, refused=refused.get(key))
        if found is not None:
            findings.append(found)
    kinds = Counter(c.state.state for c in children)
    report = Report(
        method=chosen,
        since=None if since is None else since.astimezone(dt.UTC).isoformat(),
        children=len(children),
        added=kinds["added"],
        deleted=kinds["deleted"],
        sns=len(wanted),
        dps_calls=lookup.calls,
        differences=sum(f.counted for f in findings),
        findings=findings,
        unreadable=unreadable,
    )
    return report, children


# -- Putting the missing back ------------------------------------------------------------


async def put_back(cfg: Config, children: list[Expected], findings: list[Finding]) -> list[str]:
    """Put each ``missing`` child back on the added topic, in one transaction.

    The transactional id is ``{kafka.client_id}-reconcile``: a second run fences the
    first, whose records are then aborted (never seen by the sink, which reads
    committed).

    Returns:
        The device ids put back, in order.
    """
    missing = {f.device_id for f in findings if f.kind == "missing"}
    states = [c.state for c in children if c.state.device_id in missing]
    if not states:
        return []
    topic = cfg.kafka.topics.added
    headers = [("reconciled-at", utc_now().encode())]
    producer = kafka.producer(
        cfg.kafka, transactional_id=f"{cfg.kafka.client_id}-reconcile", linger_ms=0
    )
    async with producer, producer.transaction():
        for state in states:
            value = _encode(added_record(state))
            await producer.send(topic, value, key=state.device_id.encode(), headers=headers)
    log.info("reconcile: put %d children back on %s", len(states), topic)
    return [state.device_id for state in states]


# -- The command -------------------------------------------------------------------------


def _table(report: Report) -> Table:
    table = Table(title="reconcile: lifecycle topic vs DPS")
    columns = ("kind", "device_id", "sn", "gateway", "gen", "state", "changed_at", "org (mapping)")
    for column in (*columns, "DPS", "DPS org", "detail"):
        table.add_column(column, justify="right" if column == "gen" else "left")
    for f in report.findings:
        kind = f"[red]{f.kind}[/red]" if f.counted else f"{f.kind} (not counted)"
        table.add_row(
            kind,
            escape(f.device_id),
            escape(f.sn or "-"),
            escape(f.gateway_id),
            str(f.generation),
            f.state,
            escape(f.changed_at),
            escape(f.org_id or "-"),
            escape(f.dps_status or "-"),
            escape(f.dps_org_id or "-"),
            escape(f.detail),
        )
    return table


def summary(report: Report) -> str:
    """One line: what was compared and what differs."""
    window = f" changed since {report.since}" if report.since else ""
    counts = Counter(f.kind for f in report.findings)
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"
    return (
        f"{report.children} children{window} ({report.added} added, {report.deleted} "
        f"deleted), {report.sns} sns looked up by {report.method} in {report.dps_calls} DPS "
        f"calls: {report.differences} differences (findings: {found})"
    )


async def reconcile(
    cfg: Config,
    *,
    since: dt.datetime | None = None,
    method: Method = "auto",
    redrive: bool = False,
    as_json: bool = False,
    rate: float | None = None,
    concurrency: int | None = None,
    progress: bool = True,
    out: IO[str] | None = None,
) -> int:
    """Check, print, and put the missing back if asked; returns the exit code (0 or 3)."""
    stream = out or sys.stdout
    with contextlib.suppress(Exception):
        behind = await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added)
        if behind:
            log.warning(
                "the sink (group %s) has not committed %d records of %s yet: children "
                "still on their way are reported missing",
                cfg.sink.group_id, behind, cfg.kafka.topics.added,
            )  # fmt: skip
    started = time.monotonic()
    report, children = await check(
        cfg, since=since, method=method, rate=rate, concurrency=concurrency, progress=progress
    )
    if redrive:
        report.redriven = await put_back(cfg, children, report.findings)
    log.info("reconcile: %s in %.1f s", summary(report), time.monotonic() - started)
    if as_json:
        stream.write(msgspec.json.encode(report).decode() + "\n")
    else:
        console = make_console(file=stream)
        if report.findings:
            console.print(_table(report))
        console.print(escape(summary(report)))
        if redrive:
            put = ", ".join(report.redriven) or "nothing"
            console.print(escape(f"put back on {cfg.kafka.topics.added}: {put}"))
    if report.unreadable:
        log.warning(
            "reconcile: %d lifecycle records could not be read (not compared)", report.unreadable
        )
    return DIFFERENCES if report.differences else 0
