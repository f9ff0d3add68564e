"""``python -m benchmarks --history N``: ``pipeline trace`` and ``audit`` on a long history.

1. Fill: ``N`` down events, each naming two added children and one child IoTDA failed;
   of the added children the even ones are allocated and the odd ones dead-lettered
   (DPS code 35404), except a few planted gaps (no outcome at all, :data:`GAP_EVERY`).
   So ``iotda.down-events``, ``iotda.subdevices.failed``, ``dps.allocations`` and
   ``dps.allocations.dlq`` hold ``N`` records each and ``iotda.subdevices.added`` ``2N``,
   all consistent with each other, spread over :data:`SPAN_MS` of record time ending now
   (each record timestamped as the pipeline would: the event, the router 20 ms later, the
   sink 200 ms later), each with a ``traceparent`` header. Written as fast as aiokafka
   takes it: records appended to one batch per partition (the partition every pipeline
   producer picks, :func:`pipeline.io.kafka.partition_of`), whole batches sent with
   ``acks=all``, many in flight; topics with ``kafka.partitions`` partitions.
2. Measure, each a ``pipeline`` subprocess as an operator runs it, :data:`RUNS` times:
   ``trace --sn`` for children across the history (allocated, dead-lettered, a planted
   gap, an IoTDA-failed one, one that does not exist) with a 10-minute
   ``--since``/``--until`` window around the event, two of them also without a window
   (the key's partitions read whole); ``trace --device-id``; and ``audit --since
   --until`` over the whole history when the command exists (``pipeline audit --help``
   succeeds).
   Wall time and peak RSS of each child (``os.wait4``'s rusage).
3. Report medians; write them to ``benchmarks/results/summary-history.json``.

The topics are removed at the end, as every bench run's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from aiokafka.errors import KafkaError
from rich.table import Table

from benchmarks import procs
from benchmarks.context import Context
from benchmarks.options import Options
from benchmarks.report import save
from benchmarks.services import ensure_services
from pipeline.io import kafka
from pipeline.schemas import (
    AddedChild,
    Allocation,
    AllocationFailure,
    DownEventRecord,
    FailedChild,
    format_time,
)
from pipeline.stages.sink.outcomes import GROUP, SOURCE, source_header

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder
    from rich.console import Console

    from pipeline.config import Config

__all__ = ["GAP_EVERY", "RUNS", "SPAN_MS", "TRACE_TARGET", "fill", "measure", "run"]

SPAN_MS = 24 * 3600 * 1000
"""Record time the history spans, ending now."""
GAP_EVERY = 100_003
"""Every this many-th added child has no outcome: a planted gap for the audit."""
RUNS = 3
"""Runs of each command; the median is reported."""
TRACE_TARGET = 5.0
"""Seconds ``pipeline trace`` may take on 1,000,000 records a topic (issue 17)."""
_IN_FLIGHT = 32
"""Batches sent and not yet acknowledged, at most."""
_BATCH_BYTES = 512 * 1024
_GATEWAY_EVENTS = 100
"""Down events per gateway: the gateways number N / 100."""
_WINDOW = dt.timedelta(minutes=5)
"""Each side of an event's time, for the windowed trace."""
_LIMIT = 900.0
"""Seconds one command may take before the bench gives up on it."""

_ENCODE = msgspec.json.Encoder().encode


# -- 1. Fill --------------------------------------------------------------------------------


def _names(i: int, gateways: int) -> dict[str, str]:
    """The names of down event ``i``: its gateway, event and failed node."""
    return {"gateway": f"gw-{i % gateways:06d}", "event": f"ev-{i:08d}", "failed": f"f-{i:08d}"}


def child_sn(i: int, k: int) -> str:
    """The sn (node_id) of down event ``i``'s child ``k`` (0 or 1)."""
    return f"n-{2 * i + k:09d}"


def child_device(i: int, k: int) -> str:
    """The device_id of down event ``i``'s child ``k``."""
    return f"d-{2 * i + k:09d}"


def has_outcome(i: int, k: int) -> bool:
    """Whether child ``k`` of event ``i`` got an allocation or a DLQ record (not a gap)."""
    return (2 * i + k) % GAP_EVERY != GAP_EVERY - 1


def _traceparent(i: int, span: int) -> list[tuple[str, bytes]]:
    return [("traceparent", f"00-{i + 1:032x}-{span + 1:016x}-01".encode())]


class _Writer:
    """One open batch per (topic, partition); full batches sent, at most a few in flight."""

    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, int]) -> None:
        self._producer = producer
        self._partitions = partitions
        self._batches: dict[tuple[str, int], BatchBuilder] = {}
        self._flying: set[asyncio.Future[Any]] = set()
        self.count: dict[str, int] = dict.fromkeys(partitions, 0)
        self._next: dict[tuple[str, int], int] = {}  # the topics are new: offsets from 0

    async def add(
        self, topic: str, key: bytes, value: bytes, ms: int, headers: list[tuple[str, bytes]]
    ) -> bytes:
        """Append a record; its ``source`` header value (``topic/partition/offset``)."""
        where = (topic, kafka.partition_of(key, self._partitions[topic]))
        offset = self._next.get(where, 0)
        self._next[where] = offset + 1
        batch = self._batches.get(where)
        if batch is None:
            batch = self._batches[where] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=ms, headers=headers) is None:
            await self._send(where, batch)
            batch = self._batches[where] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=ms, headers=headers) is None:
                msg = f"a record of {len(value)} bytes does not fit an empty batch"
                raise procs.BenchError(msg)
        self.count[topic] += 1
        return source_header(topic, where[1], offset)

    async def _send(self, where: tuple[str, int], batch: BatchBuilder) -> None:
        batch.close()
        self._flying.add(await self._producer.send_batch(batch, where[0], partition=where[1]))
        if len(self._flying) >= _IN_FLIGHT:
            done, self._flying = await asyncio.wait(
                self._flying, return_when=asyncio.FIRST_COMPLETED
            )
            for future in done:
                future.result()

    async def flush(self) -> None:
        for where, batch in self._batches.items():
            await self._send(where, batch)
        self._batches.clear()
        for future in asyncio.as_completed(self._flying):
            await future
        self._flying.clear()


async def fill(cfg: Config, n: int, end_ms: int, progress: Console | None = None) -> dict[str, Any]:
    """Write the history of ``n`` down events ending at ``end_ms``; what was written."""
    t = cfg.kafka.topics
    topics = (t.down_events, t.added, t.failed, t.allocations, t.allocations_dlq)
    start_ms = end_ms - SPAN_MS
    step = SPAN_MS / n
    started = time.monotonic()
    async with kafka.reader(cfg.kafka) as reader:
        parts = await kafka.partitions(reader, *topics)
    counts = {topic: sum(tp.topic == topic for tp in parts) for topic in topics}
    gateways = max(1, n // _GATEWAY_EVENTS)
    producer = kafka.producer(cfg.kafka, max_batch_size=_BATCH_BYTES, linger_ms=50)
    async with producer:
        writer = _Writer(producer, counts)
        for i in range(n):
            await _event(writer, cfg, i, int(start_ms + i * step), _names(i, gateways))
            if progress is not None and i and i % (n // 10 or 1) == 0:
                rate = sum(writer.count.values()) / (time.monotonic() - started)
                progress.print(f"  {i:,} of {n:,} events written ({rate:,.0f} records/s)")
        await writer.flush()
    seconds = time.monotonic() - started
    total = sum(writer.count.values())
    return {
        "events": n,
        "records": writer.count,
        "partitions": counts,
        "seconds": round(seconds, 1),
        "records_per_s": round(total / seconds),
        "gaps": sum(not has_outcome(i, k) for i in range(n) for k in (0, 1)),
        "first_ms": start_ms,
        "last_ms": int(start_ms + (n - 1) * step) + 200,
    }


async def _event(writer: _Writer, cfg: Config, i: int, at: int, names: dict[str, str]) -> None:
    """Down event ``i`` at ``at`` ms and everything the pipeline wrote for it."""
    t = cfg.kafka.topics
    gateway, event_id = names["gateway"], names["event"]
    event_time = format_time(dt.datetime.fromtimestamp(at / 1000, dt.UTC))
    children = [
        {"node_id": child_sn(i, k), "device_id": child_device(i, k), "product_id": "prod",
         "name": f"inverter {2 * i + k}", "model": "SG110CX"}
        for k in (0, 1)
    ]  # fmt: skip
    failed = {"node_id": names["failed"], "product_id": "prod", "error_code": "101004",
              "error_msg": "the node id already exists"}  # fmt: skip
    down = DownEventRecord(
        gateway_id=gateway,
        mqtt_topic=f"$oc/devices/{gateway}/sys/events/down",
        received_at=event_time,
        event=msgspec.Raw(_ENCODE({"services": [{
            "service_id": "$sub_device_manager", "event_type": "add_sub_device_response",
            "event_time": event_time, "event_id": event_id,
            "paras": {"successful_devices": children, "failed_devices": [failed]},
        }]})),
    )  # fmt: skip
    await writer.add(t.down_events, gateway.encode(), _ENCODE(down), at, _traceparent(i, 0))
    routed = at + 20
    failed_value = FailedChild(
        gateway_id=gateway, event_id=event_id, event_time=event_time, event_time_raw=event_time,
        reason=msgspec.Raw(_ENCODE(failed)),
    )  # fmt: skip
    await writer.add(
        t.failed, names["failed"].encode(), _ENCODE(failed_value), routed, _traceparent(i, 1)
    )
    for k, device in enumerate(children):
        child = AddedChild(
            gateway_id=gateway, event_id=event_id, event_time=event_time,
            event_time_raw=event_time, generation=1, device=msgspec.Raw(_ENCODE(device)),
        )  # fmt: skip
        added = _ENCODE(child)
        sn, device_id = child_sn(i, k), child_device(i, k)
        source = await writer.add(
            t.added, device_id.encode(), added, routed, _traceparent(i, 2 + k)
        )
        if not has_outcome(i, k):
            continue
        # As the sink writes them: the outcome names its input record (pipeline audit's link).
        outcome_headers = [(SOURCE, source), (GROUP, cfg.sink.group_id.encode())]
        done = at + 200
        stamp = format_time(dt.datetime.fromtimestamp(done / 1000, dt.UTC))
        if k == 0:
            pvs = {"sn": sn, "orgId": cfg.sink.org_id, "allocateStatus": "allocated"}
            value = Allocation(
                sn=sn, org_id=cfg.sink.org_id, device_id=device_id, gateway_id=gateway,
                event_id=event_id, attempts=1, request_id=f"req-{2 * i}", allocated_at=stamp,
                device=msgspec.Raw(_ENCODE(pvs)),
            )  # fmt: skip
            await writer.add(
                t.allocations, sn.encode(), _ENCODE(value), done,
                _traceparent(i, 4) + outcome_headers,
            )  # fmt: skip
        else:
            failure = AllocationFailure(
                sn=sn, org_id=cfg.sink.org_id, device_id=device_id, gateway_id=gateway,
                event_id=event_id, attempts=1, error_kind="rejected", code=35404,
                msg="the registration group does not exist", request_id=f"req-{2 * i + 1}",
                failed_at=stamp, http_status=200, record=msgspec.Raw(added),
            )  # fmt: skip
            await writer.add(
                t.allocations_dlq, sn.encode(), _ENCODE(failure), done,
                _traceparent(i, 5) + outcome_headers,
            )  # fmt: skip


# -- 2. Measure -----------------------------------------------------------------------------


def _timed(argv: list[str], env: dict[str, str], config: list[str]) -> dict[str, Any]:
    """Run ``python -m pipeline ARGV``: its exit code, wall time and peak RSS (``os.wait4``)."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
            [sys.executable, "-m", "pipeline", *config, "--log-level", "error", *argv],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        )  # fmt: skip
        deadline = started + _LIMIT
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
            time.sleep(0.002)
        seconds = time.monotonic() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "exit": child.returncode,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / 1e6, 1),
        "stdout_tail": stdout.decode(errors="replace").strip().splitlines()[-1:],
        "stderr_tail": stderr.decode(errors="replace").strip().splitlines()[-2:],
    }


def _iso(ms: int) -> str:
    return format_time(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))


def _cases(n: int, start_ms: int) -> list[tuple[str, list[str], int]]:
    """(name, trace arguments, the exit code expected) for the children measured."""
    step = SPAN_MS / n
    gap = next(
        ((i, k) for c in range(GAP_EVERY - 1, 2 * n, GAP_EVERY) for i, k in [divmod(c, 2)]),
        None,
    )
    picks = [("allocated, mid", n // 2, 0, True), ("dead-lettered, late", n - 3, 1, True),
             ("allocated, early", 7, 0, False)]  # fmt: skip
    if gap is not None:
        picks.append(("planted gap", *gap, False))
    cases = []
    for name, i, k, whole in picks:
        at = int(start_ms + i * step)
        window = ["--since", _iso(at - int(_WINDOW.total_seconds() * 1000)),
                  "--until", _iso(at + int(_WINDOW.total_seconds() * 1000))]  # fmt: skip
        if whole:  # the whole history: the sn and device_id partitions read to the end
            cases.append((f"--sn, {name}", ["trace", "--sn", child_sn(i, k)], 0))
        cases.append((f"--sn, {name}, window", ["trace", "--sn", child_sn(i, k), *window], 0))
    mid = n // 3
    at = int(start_ms + mid * step)
    window = ["--since", _iso(at - int(_WINDOW.total_seconds() * 1000)),
              "--until", _iso(at + int(_WINDOW.total_seconds() * 1000))]  # fmt: skip
    cases.append(
        ("--device-id, window", ["trace", "--device-id", child_device(mid, 1), *window], 0)
    )
    cases.append(("--sn, IoTDA-failed, window", ["trace", "--sn", f"f-{mid:08d}", *window], 0))
    cases.append(("--sn, unknown, window", ["trace", "--sn", "no-such-sn", *window], 4))
    return cases


def audit_available(env: dict[str, str], config: list[str]) -> bool:
    """Whether ``pipeline audit --help`` succeeds (the command exists)."""
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pipeline", *config, "audit", "--help"],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode == 0


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return round(float(statistics.median(r[field] for r in runs)), 3)


async def measure(
    filled: dict[str, Any], env: dict[str, str], config: list[str], console: Console
) -> dict[str, Any]:
    """Time ``pipeline trace`` (and ``pipeline audit``) on the filled topics."""
    traces = []
    for name, argv, expected in _cases(filled["events"], filled["first_ms"]):
        runs = [await asyncio.to_thread(_timed, argv, env, config) for _ in range(RUNS)]
        wrong = [r for r in runs if r["exit"] != expected]
        entry = {
            "case": name, "argv": argv, "expected_exit": expected,
            "median_s": _median(runs, "seconds"), "max_s": max(r["seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "exits": [r["exit"] for r in runs],
            "records_found": runs[-1]["stdout_tail"],
        }  # fmt: skip
        if wrong:
            entry["unexpected"] = wrong[0]
        traces.append(entry)
        console.print(f"  trace {name}: median {entry['median_s']:.2f} s (exits {entry['exits']})")
    audit: dict[str, Any] = {"available": audit_available(env, config)}
    if audit["available"]:
        argv = ["audit", "--since", _iso(filled["first_ms"] - 60_000),
                "--until", _iso(filled["last_ms"] + 60_000), "--json", "--limit", "1"]  # fmt: skip
        console.print(f"  audit over the whole history: {' '.join(argv)}")
        result = await asyncio.to_thread(_timed, argv, env, config)
        audit |= {
            "argv": argv, "seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "exit": result["exit"], "expected_exit": 1 if filled["gaps"] else 0,
            "stdout_tail": result["stdout_tail"], "stderr_tail": result["stderr_tail"],
        }  # fmt: skip
        try:  # its one JSON line: the counts, to hold against the gaps planted
            report = orjson.loads(result["stdout_tail"][-1])
            audit |= {"children": report["children"], "counts": report["counts"]}
        except (IndexError, orjson.JSONDecodeError, KeyError, TypeError):
            audit["counts"] = None
    else:
        console.print("  audit: not available (pipeline audit --help fails)")
    windowed = [t["median_s"] for t in traces if t["case"].endswith("window")]
    unwindowed = [t["median_s"] for t in traces if not t["case"].endswith("window")]
    return {
        "trace": traces,
        "trace_median_s": {
            "window": round(statistics.median(windowed), 3) if windowed else None,
            "no_window": round(statistics.median(unwindowed), 3) if unwindowed else None,
        },
        "trace_max_s": max(t["max_s"] for t in traces),
        "trace_target_s": TRACE_TARGET,
        "audit": audit,
    }


# -- The run --------------------------------------------------------------------------------


def table(console: Console, doc: dict[str, Any]) -> None:
    """The results as a table."""
    h = doc["history"]
    filled = h["fill"]
    console.print(
        f"history: {filled['events']:,} down events; records {filled['records']} written "
        f"in {filled['seconds']:,.1f} s ({filled['records_per_s']:,} records/s), "
        f"{filled['gaps']} planted gaps"
    )
    out = Table(title=f"pipeline trace on that history (median of {RUNS})")
    for column in ("case", "median s", "max s", "peak RSS MB", "exits"):
        out.add_column(column, justify="left" if column == "case" else "right")
    for t in h["trace"]:
        slow = t["median_s"] > TRACE_TARGET
        median = f"[red]{t['median_s']:.2f}[/red]" if slow else f"{t['median_s']:.2f}"
        out.add_row(t["case"], median, f"{t['max_s']:.2f}", f"{t['peak_rss_mb']:.0f}",
                    ",".join(map(str, t["exits"])))  # fmt: skip
    console.print(out)
    audit = h["audit"]
    if audit["available"]:
        console.print(
            f"pipeline audit over the whole history: {audit['seconds']:.1f} s, peak RSS "
            f"{audit['peak_rss_mb']:.0f} MB, exit {audit['exit']} (expected "
            f"{audit['expected_exit']}): {' '.join(audit['stdout_tail'])}"
        )
    else:
        console.print("pipeline audit: not available")


async def run(
    cfg: Config, n: int, *, config_path: str | None, summary: Path | None, console: Console
) -> int:
    """Fill, measure, report; the exit code (0, or 1 when a service or command failed)."""
    started_at = dt.datetime.now(dt.UTC)
    with console.status("checking Mosquitto and Kafka (starting deploy/local if need be)"):
        await ensure_services(cfg)  # as every mode of the bench does
    ctx = Context(cfg, Options(), config_path=config_path, log_dir=Path(tempfile.gettempdir()))
    mine = ctx.config("history")
    t = mine.kafka.topics
    names = [t.down_events, t.added, t.failed, t.allocations, t.allocations_dlq, t.deleted,
             t.releases]  # fmt: skip
    ctx.topics.extend(names)
    try:
        await kafka.ensure_topics(mine.kafka, names)
        end_ms = int(time.time() * 1000) - 60_000
        console.print(f"filling {n:,} down events (and their children and outcomes)")
        filled = await fill(mine, n, end_ms, console)
        console.print(
            f"  {sum(filled['records'].values()):,} records in {filled['seconds']:.1f} s "
            f"({filled['records_per_s']:,} records/s)"
        )
        config = ["--config", config_path] if config_path else []
        measured = await measure(filled, procs.child_env(mine), config, console)
    except (KafkaError, procs.BenchError) as exc:
        console.print(f"[red]benchmarks: {exc}[/red]")
        return 1
    finally:
        with contextlib.suppress(Exception):
            await ctx.cleanup()
    doc = {
        "meta": {
            "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "history": {"fill": filled, **measured},
    }
    table(console, doc)
    if summary is not None:
        await asyncio.to_thread(save, console, summary, doc, "summary")
    return 0
